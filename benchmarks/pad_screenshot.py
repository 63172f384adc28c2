"""A screenshot of the pen pad reading a line, for the README (needs Debian's chromium).

Serves the pad in this process on a free port of 127.0.0.1, has headless Chromium draw a
synthetic cursive line on the page with pointer events (the page's #draw= replay), waits for
the greedy and LM readings and saves the window as a PNG. Run from the repository root:

    python benchmarks/pad_screenshot.py viz/pen_pad.png                       # the shipped model
    python benchmarks/pad_screenshot.py viz/pen_pad.png --load-model m.npz --text "move to stop him"
"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.parse

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as iam_handwriting.py does when run as a script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import iam_handwriting as ih  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def drawn_line(text, width=700.0, seed=7):
    """A lines-task writer's `text` as canvas strokes [[[x, y, t_ms], ...], ...], y down, width px wide."""
    s = ih.render_writer_line(text, "test", 3, seed)
    t = 1000 * ih.pen_times(s.xy, s.pen_up, 0.0)
    stroke = np.cumsum(s.pen_up).astype(int) - 1
    xy = (s.xy - [s.xy[:, 0].min(), s.xy[:, 1].max()]) * (width / np.ptp(s.xy[:, 0])) * [1, -1] + [20, 40]
    return [np.column_stack([xy[stroke == k], t[stroke == k]]).round(2).tolist() for k in range(stroke.max() + 1)]


def main(argv=None):
    p = ih.OneLineParser(prog="pad_screenshot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--load-model", metavar="PATH", default=None, help=f"default: {ih.DEFAULT_MODEL}")
    p.add_argument("--text", default="the quick brown fox", help="what the synthetic writer writes")
    args = p.parse_args(argv)
    try:
        if not os.path.exists(CHROMIUM):
            raise ih.UserError(f"needs {CHROMIUM} (apt-get install chromium)")
        ih.check_writable(args.out, "screenshot")
        server = ih.start_pad(ih.Reader(*ih.load_reading_model(args.load_model)), 0, log=print)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/#draw=" + \
            urllib.parse.quote(json.dumps(drawn_line(args.text), separators=(",", ":")))
        with tempfile.TemporaryDirectory() as profile:
            r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                                "--window-size=1000,640", "--hide-scrollbars", f"--user-data-dir={profile}",
                                f"--screenshot={os.path.abspath(args.out)}", url],
                               capture_output=True, text=True, timeout=180)
        server.shutdown()
        server.server_close()
        if r.returncode != 0 or not os.path.exists(args.out):
            raise ih.UserError(f"chromium failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
    except ih.UserError as e:
        print(f"pad_screenshot.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
