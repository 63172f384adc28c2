"""Animated GIF of the network's outputs on one handwritten sample, from run.json.

Takes one alignment record of run.json (its pen trajectory and the network's
per-step log-probabilities): for a words run the long in-vocab word
(alignments[1]), for a lines or iam-ondb run the short test line
(alignments[0]). Frame by frame it draws the ink up to pen sample t, reveals
the network's output at steps 1..t and shows the greedy CTC decode of those
outputs. Nothing is retrained or re-run: every number comes from run.json.

What the animation is not: the network reading the sample as it is written.
The outputs were computed once, for the whole sample; the animation reveals
them left to right. In a bidirectional network every output depends on the
whole sample, including the ink after step t; in a forward-only network the
output at step t depends on samples 1..t only.

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
MAX_FRAMES = 120  # longer samples show every k-th time step
ANIMATED = {"words": 1}  # which alignment record a task's GIF animates; any other task: 0
# (figure inches, dpi, ink width, decode font size): a word in 648 x 504 pixels; a line is long
# and has 28 classes or more, so any other task gets 960 x 528.
FRAME_STYLE = {"words": ((7.2, 5.6), 90, 2.4, 16)}
LINE_STYLE = ((12.0, 6.6), 80, 1.6, 13)


def frame_steps(T, max_frames=None):
    """Time steps shown by successive frames (at most max_frames, default MAX_FRAMES,
    plus the last): every k-th step, always ending on T - 1."""
    stride = max(1, math.ceil(T / (max_frames or MAX_FRAMES)))
    steps = list(range(0, T, stride))
    if steps[-1] != T - 1:
        steps.append(T - 1)
    return steps


def describe_outputs(cfg, noun):
    """What one revealed column is, true for the run's network."""
    if cfg["bidirectional"]:
        return f"every output is computed from the whole {noun} (both directions), not only the ink up to the cursor"
    return "a forward-only network's output at step t depends on pen samples 1..t only"


def build_animation(run):
    """The frame figure and show(t), which updates it to time step t.

    Returns (fig, show, a): a is the alignment record animated (T time steps).
    """
    task = run["task"]["name"]
    a, alphabet, noun = run["alignments"][ANIMATED.get(task, 0)], run["task"]["alphabet"], viz.noun(run)
    xy, pen_up, text, T = a["xy"], a["pen_up"], a["text"], len(a["xy"])
    K = 1 + len(alphabet)
    size, dpi, ink_width, decode_size = FRAME_STYLE.get(task, LINE_STYLE)
    fig = viz.new_figure(*size)
    fig.set_dpi(dpi)
    gs = fig.add_gridspec(3, 1, height_ratios=[2.0, 0.8 + 0.1 * K, 0.9])
    ax_pen, ax_hm, ax_txt = (fig.add_subplot(g) for g in gs)

    viz.draw_ink(ax_pen, xy, pen_up, ["0.88"] * T, lw=1.2, air=False)  # the whole sample, faintly
    ax_pen.set_aspect("equal", adjustable="datalim")
    segs, ends, _ = viz.ink_segments(xy, pen_up)
    colours = viz.char_colours(a["char_of"])
    seg_colours = np.array([colours[e] if colours else (0.0, 0.0, 0.0) for e in ends])  # (N, 3)
    ink = LineCollection([], linewidths=ink_width, capstyle="round")
    ax_pen.add_collection(ink)
    (pen,) = ax_pen.plot([], [], "o", ms=7, mfc="crimson", mec="black", zorder=5)
    ax_pen.set_xticks([])
    ax_pen.set_yticks([])
    pen_title = ax_pen.set_title("", fontsize=10)

    viz.draw_softmax(ax_hm, a, alphabet)
    ax_hm.tick_params(labelsize=8 if K <= 12 else 6)
    ax_hm.set_xlabel("time step t (pen sample)", fontsize=9)
    ax_hm.set_ylabel("output class", fontsize=9)
    spans = ", outlines = true characters' spans" if a["char_of"] is not None else ""
    ax_hm.set_title(f"Network output P(class | t), shown up to the cursor (grey: not shown yet){spans};\n"
                    f"{describe_outputs(run['config'], noun)}", fontsize=9)
    cover = ax_hm.add_patch(Rectangle((0, -0.5), 0, K, facecolor="0.93", edgecolor="none", zorder=4))
    cursor = ax_hm.axvline(0, color="crimson", lw=1.2, zorder=5)
    (pick,) = ax_hm.plot([], [], "s", ms=7, mfc="none", mec="crimson", mew=1.5, zorder=6)

    ax_txt.set_axis_off()
    decode_text = ax_txt.text(0.5, 0.72, "", ha="center", va="center", fontsize=decode_size,
                              family="monospace", transform=ax_txt.transAxes)
    ax_txt.text(0.5, 0.12, f"target '{text}'  (greedy CTC decode: argmax per step, merge repeats, drop blanks)",
                ha="center", va="center", fontsize=9, color="0.3", transform=ax_txt.transAxes)
    network = "BLSTM" if run["config"]["bidirectional"] else "forward-only LSTM"
    fig.suptitle(f"Outputs of the {network} for the handwritten {noun} '{text}'", fontsize=12)

    def show(t):
        shown = ends <= t
        ink.set_segments(segs[shown])
        ink.set_color(seg_colours[shown])
        pen.set_data([xy[t, 0]], [xy[t, 1]])
        pen_title.set_text(f"Pen trajectory: samples 1-{t + 1} of {T} drawn")
        cover.set_x(t + 0.5)
        cover.set_width(T - 1 - t)
        cursor.set_xdata([t, t])
        pick.set_data([t], [a["argmax_path"][t]])
        decoded = viz.greedy_string(a["log_probs"][: t + 1], alphabet)
        if t == T - 1:
            verdict = "correct" if decoded == text else f"CER {ih.cer(decoded, text):.2f}"
            decode_text.set_text(f"greedy decode of all {T} outputs: '{decoded}'  ({verdict})")
        else:
            decode_text.set_text(f"greedy decode of outputs 1-{t + 1}: '{decoded}'")

    show(T - 1)
    fig.canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout: frames must not jump, and re-layout is half the cost
    return fig, show, a


def render_frames(run, steps=None):
    """One RGB array (H, W, 3) per time step in `steps` (default: frame_steps(T))."""
    fig, show, a = build_animation(run)
    frames = []
    for t in frame_steps(len(a["xy"])) if steps is None else steps:
        show(t)
        fig.canvas.draw()
        frames.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())  # (H, W, 3)
    return frames


def encode_gif(frames, frame_ms):
    """GIF bytes that loop forever; the last frame holds for HOLD_MS."""
    durations = [frame_ms] * (len(frames) - 1) + [HOLD_MS]
    # one frame (a one-sample alignment): Pillow takes a single frame's duration as a number only
    return iio.imwrite("<bytes>", np.stack(frames), extension=".gif",
                       duration=durations if len(frames) > 1 else HOLD_MS, loop=0)


def make_gif(run):
    """Render and encode; if the GIF exceeds MAX_BYTES, drop every other frame until it fits."""
    frames = render_frames(run)
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
        data, n_frames = make_gif(run)
        if len(data) > MAX_BYTES:
            raise ih.UserError(f"the GIF would be {len(data)} bytes, over the {MAX_BYTES}-byte limit")
        ih.write_or_refuse(args.out, data, "GIF")
    except ih.UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({n_frames} frames, {len(data) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
