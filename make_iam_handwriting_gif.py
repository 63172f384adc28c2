"""Animated GIF of the trained network reading one handwritten word, from run.json.

Takes the long alignment word in run.json (alignments[1]: its pen trajectory and
the network's per-step log-probabilities) and shows, frame by frame, the ink
drawn so far, the softmax over classes revealed up to that step, and the running
greedy CTC decode. Nothing is retrained or re-run: every number comes from
run.json. The network is bidirectional, so each output already depends on the
whole word; the animation reveals its outputs left to right.

Usage:
    python make_iam_handwriting_gif.py                                  # run.json -> iam_handwriting.gif
    python make_iam_handwriting_gif.py run.json --out iam_handwriting.gif
"""
from __future__ import annotations

import math
import sys

import imageio.v3 as iio
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.patches import Rectangle

import iam_handwriting as ih
import visualize_iam_handwriting as viz

PROG = "make_iam_handwriting_gif.py"
MAX_BYTES = 2_000_000  # the GIF must stay under 2 MB
FRAME_MS = 80  # 12.5 frames per second
HOLD_MS = 1500  # the last frame stays up this long before the loop restarts
MAX_FRAMES = 120  # longer words show every k-th time step
FIG_SIZE, DPI = (7.2, 5.6), 90  # 648 x 504 pixels


def frame_steps(T, max_frames=MAX_FRAMES):
    """Time steps shown by successive frames: every k-th step, always ending on T - 1."""
    stride = max(1, math.ceil(T / max_frames))
    steps = list(range(0, T, stride))
    if steps[-1] != T - 1:
        steps.append(T - 1)
    return steps


def render_frames(a, steps):
    """One RGB array (H, W, 3) per time step in `steps`; the figure is built once and updated."""
    xy, pen_up, char_of, word = a["xy"], a["traj"][:, 2], a["char_of"], a["word"]
    T = len(xy)
    fig = viz.new_figure(*FIG_SIZE)
    fig.set_dpi(DPI)
    gs = fig.add_gridspec(3, 1, height_ratios=[2.0, 2.6, 0.9])
    ax_pen, ax_hm, ax_txt = (fig.add_subplot(g) for g in gs)

    viz.draw_ink(ax_pen, xy, pen_up, ["0.88"] * T, lw=1.2, air=False)  # the whole word, faintly
    segs, ends, _ = viz.ink_segments(xy, pen_up)
    seg_colours = np.array([viz.CHAR_COLOURS[char_of[e] % 10] for e in ends])  # (N, 3)
    ink = LineCollection([], linewidths=2.4, capstyle="round")
    ax_pen.add_collection(ink)
    (pen,) = ax_pen.plot([], [], "o", ms=7, mfc="crimson", mec="black", zorder=5)
    ax_pen.set_xticks([])
    ax_pen.set_yticks([])
    pen_title = ax_pen.set_title("", fontsize=10)

    viz.draw_softmax(ax_hm, a)
    ax_hm.tick_params(labelsize=8)
    ax_hm.set_xlabel("time step (pen sample)", fontsize=9)
    ax_hm.set_ylabel("output class", fontsize=9)
    ax_hm.set_title("Softmax output: dark = probable, coloured box = true character's span, grey = not read yet",
                    fontsize=9)
    cover = ax_hm.add_patch(Rectangle((0, -0.5), 0, ih.N_CLASSES, facecolor="0.93", edgecolor="none", zorder=3))
    cursor = ax_hm.axvline(0, color="crimson", lw=1.2, zorder=4)
    (pick,) = ax_hm.plot([], [], "s", ms=7, mfc="none", mec="crimson", mew=1.5, zorder=5)

    ax_txt.set_axis_off()
    decode_text = ax_txt.text(0.5, 0.72, "", ha="center", va="center", fontsize=16, family="monospace",
                              transform=ax_txt.transAxes)
    ax_txt.text(0.5, 0.12, f"target '{word}'  (greedy CTC decode: argmax per step, merge repeats, drop blanks)",
                ha="center", va="center", fontsize=9, color="0.3", transform=ax_txt.transAxes)
    fig.suptitle(f"A bidirectional LSTM reading the handwritten word '{word}'", fontsize=12)

    pen_title.set_text(f"Pen trajectory read so far: sample {T} of {T}")
    fig.canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout: frames must not jump, and re-layout is half the cost

    frames = []
    for t in steps:
        shown = ends <= t
        ink.set_segments(segs[shown])
        ink.set_color(seg_colours[shown])
        pen.set_data([xy[t, 0]], [xy[t, 1]])
        pen_title.set_text(f"Pen trajectory read so far: sample {t + 1} of {T}")
        cover.set_x(t + 0.5)
        cover.set_width(T - 1 - t)
        cursor.set_xdata([t, t])
        pick.set_data([t], [a["argmax_path"][t]])
        so_far = viz.greedy_string(a["log_probs"][: t + 1])
        if t == T - 1:
            verdict = "correct" if so_far == word else f"CER {ih.cer(so_far, word):.2f}"
            decode_text.set_text(f"decoded '{so_far}'  ({verdict})")
        else:
            decode_text.set_text(f"decoded so far: '{so_far}'" if so_far else "decoded so far: nothing")
        fig.canvas.draw()
        frames.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())  # (H, W, 3)
    return frames


def encode_gif(frames, frame_ms):
    """GIF bytes that loop forever; the last frame holds for HOLD_MS."""
    durations = [frame_ms] * (len(frames) - 1) + [HOLD_MS]
    return iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=durations, loop=0)


def make_gif(a):
    """Render and encode; if the GIF exceeds MAX_BYTES, drop every other frame until it fits."""
    frames = render_frames(a, frame_steps(len(a["xy"])))
    keep = 1
    while True:
        chosen = frames[::keep]
        if keep > 1 and chosen[-1] is not frames[-1]:
            chosen.append(frames[-1])
        data = encode_gif(chosen, min(FRAME_MS * keep, 250))
        if len(data) <= MAX_BYTES or len(chosen) <= 2:
            return data, len(chosen)
        keep *= 2


def main(argv=None):
    args = viz.build_parser(PROG, __doc__, "iam_handwriting.gif", "GIF to write").parse_args(argv)
    try:
        run = viz.load_run(args.run)
        ih.check_writable(args.out, "GIF")
        data, n_frames = make_gif(run["alignments"][1])
        if len(data) > MAX_BYTES:
            raise ih.UserError(f"the GIF would be {len(data)} bytes, over the {MAX_BYTES}-byte limit")
        try:
            ih.atomic_write(args.out, data)
        except OSError as e:
            raise ih.UserError(f"cannot write GIF {args.out!r}: {e.strerror or e}") from None
    except ih.UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({n_frames} frames, {len(data) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
