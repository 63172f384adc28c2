"""Latency of the pen pad's POST /read: is a typical line read in at most 300 ms?

Starts the --serve server in this process on a free port of 127.0.0.1 (the LM built first, as
--serve does), posts each line's strokes as JSON through the standard library's HTTP client,
and prints the round-trip time per request: the greedy reading the page asks for after every
stroke, and the greedy + LM reading it asks for when the writer pauses. Run it on an idle
machine, from the repository root:

    python benchmarks/serve_latency.py                              # the shipped model, synthetic lines
    python benchmarks/serve_latency.py --load-model m.npz --ink a.inkml b.xml c.json
    python benchmarks/serve_latency.py --lines 40 --repeats 3

Without --ink the lines are the lines task's first test lines (synthetic cursive, 25-45
characters, as IAM-OnDB text lines), drawn at IAM-OnDB's scale and 20 ms sampling.
"""
import http.client
import json
import os
import sys
import threading
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as iam_handwriting.py does when run as a script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import iam_handwriting as ih  # noqa: E402

BUDGET_MS = 300.0  # the bound for a typical line


def synthetic_bodies(n):
    """n request bodies: lines-task test lines in sensor units (y down) with their pen times."""
    bodies = []
    for s in ih.line_eval_set("test", 1)[:n]:
        points, times = ih.sensor_points(s.xy), ih.pen_times(s.xy, s.pen_up, 0.0)
        stroke = np.cumsum(s.pen_up).astype(int) - 1
        strokes = [np.column_stack([points[stroke == k], times[stroke == k]]).tolist() for k in range(stroke.max() + 1)]
        bodies.append((s.text, strokes))
    return bodies


def file_bodies(paths):
    """Request bodies from ink files (any --read format): one per file, y down."""
    bodies = []
    for path in paths:
        ink = ih.parse_ink(ih.read_ink_bytes(path), path)
        columns = [ink.points] + ([ink.times[:, None]] if ink.times is not None else [])
        values = np.concatenate(columns, axis=1)
        bodies.append((path, [values[ink.stroke == k].tolist() for k in range(ink.stroke[-1] + 1)]))
    return bodies


def post(port, strokes, lm):
    body = json.dumps({"strokes": strokes, "lm": lm}).encode()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/read", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    doc = json.loads(response.read())
    conn.close()
    ms = 1000 * (time.perf_counter() - t0)
    if response.status != 200:
        raise ih.UserError(f"POST /read answered {response.status}: {doc.get('error')}")
    return ms, doc


def main(argv=None):
    p = ih.OneLineParser(prog="serve_latency.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--load-model", metavar="PATH", default=None,
                   help=f"an iam-ondb model with its input normalisation (default: {ih.DEFAULT_MODEL})")
    p.add_argument("--ink", nargs="+", metavar="FILE", help="ink files to post instead of synthetic lines")
    p.add_argument("--lines", type=ih.whole_number(1, 40), default=20, help="synthetic lines (without --ink)")
    p.add_argument("--repeats", type=ih.whole_number(1, 100), default=3, help="requests per line and mode")
    args = p.parse_args(argv)
    try:
        params, cfg, normalisation = ih.load_reading_model(args.load_model)
        bodies = file_bodies(args.ink) if args.ink else synthetic_bodies(args.lines)
        t0 = time.perf_counter()
        server = ih.start_pad(ih.Reader(params, cfg, normalisation), 0, log=print)
        print(f"model {args.load_model or ih.DEFAULT_MODEL}: hidden {cfg.hidden}, {cfg.features}; "
              f"server and LM ready in {time.perf_counter() - t0:.1f} s; LM reading {'on' if server.lm else 'off'}")
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        post(server.server_port, bodies[0][1], server.lm)  # warm-up: first-call costs are not a line's
        modes = [False] + ([True] if server.lm else [])
        times = {lm: [] for lm in modes}
        frames = []
        for name, strokes in bodies:
            for lm in modes:
                for _ in range(args.repeats):
                    ms, doc = post(server.server_port, strokes, lm)
                    times[lm].append(ms)
            frames.append(sum(line["frames"] for line in doc["lines"]))
            print(f"  {sum(len(s) for s in strokes):5d} points {frames[-1]:5d} steps  "
                  f"{doc['lines'][0]['text']!r:.60}  (ink of {name!r:.50})")
        server.shutdown()
        server.server_close()
    except ih.UserError as e:
        print(f"serve_latency.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(bodies)} lines, median {np.median(frames):.0f} network steps (max {max(frames)}), "
          f"{args.repeats} requests each; round trip in ms:")
    for lm, ms in times.items():
        ms = np.array(ms)
        verdict = "within" if np.median(ms) <= BUDGET_MS else "OVER"
        print(f"  {'greedy + LM' if lm else 'greedy     '}  median {np.median(ms):6.1f}  p90 {np.percentile(ms, 90):6.1f}  "
              f"max {ms.max():6.1f}  -> median {verdict} the {BUDGET_MS:.0f} ms budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
