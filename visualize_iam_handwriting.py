"""Figures for a run of iam_handwriting.py, drawn from its run.json.

Reads the run summary written by `python iam_handwriting.py --save-json run.json`
and writes PNGs into one folder; it never trains and only reads run.json:

    alphabet.png              the ten stroke templates, pen order and stroke starts
    word_renderings.png       six training words as the renderer draws them (jitter, slant)
    training_curves.png       CTC loss per character and CER per epoch
    ctc_alignment.png         trajectory, softmax over time and argmax path for a short word
    ctc_alignment_long.png    the same for a long word
    confusion_chars.png       character confusions over every prediction in run.json
    lexicon_size.png          word accuracy against lexicon size (only if run.json has `decoding`)

Usage:
    python visualize_iam_handwriting.py                      # run.json -> viz/
    python visualize_iam_handwriting.py run.json --out viz/
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import iam_handwriting as ih

PROG = "visualize_iam_handwriting.py"
MAKE_RUN = "python iam_handwriting.py --seed 0 --save-json run.json"
DPI = 110
EMPTY = "\u2205"  # the empty side of an insertion or deletion in the confusion matrix
CLASS_LABELS = ["blank"] + list(ih.ALPHABET)  # row k of a (T, K) log-prob array
CHAR_COLOURS = colormaps["tab10"].colors  # character i of a word gets colour i % 10

# ---------------------------------------------------------------------------
# Reading run.json
# ---------------------------------------------------------------------------

REQUIRED_KEYS = ("config", "history", "final", "predictions", "alignments", "split")


def _fail(path, what):
    raise ih.UserError(f"run summary {path!r} {what}")


def alignment_arrays(rec):
    """One run.json alignment record with its lists as checked numpy arrays.

    Returns word, xy (T, 2), traj (T, 3), char_of (T,), log_probs (T, K),
    argmax_path (T,), decoded, cer. ValueError/KeyError/TypeError if malformed.
    """
    word = str(rec["word"])
    ih.encode(word)  # ValueError for characters outside the alphabet
    a = {
        "word": word,
        "xy": np.asarray(rec["xy"], dtype=float),  # (T, 2)
        "traj": np.asarray(rec["traj"], dtype=float),  # (T, 3)
        "char_of": np.asarray(rec["char_of"], dtype=int),  # (T,)
        "log_probs": np.asarray(rec["log_probs"], dtype=float),  # (T, K)
        "argmax_path": np.asarray(rec["argmax_path"], dtype=int),  # (T,)
        "decoded": str(rec["decoded"]),
        "cer": float(rec["cer"]),
    }
    T = len(a["xy"])
    expected = {"xy": (T, 2), "traj": (T, 3), "char_of": (T,), "log_probs": (T, ih.N_CLASSES), "argmax_path": (T,)}
    if T == 0 or any(a[k].shape != shape for k, shape in expected.items()):
        found = ", ".join(f"{k} {a[k].shape}" for k in expected)
        raise ValueError(f"array shapes do not fit together (T time steps, K = {ih.N_CLASSES}): {found}")
    if a["char_of"].min() < 0 or a["char_of"].max() >= len(word):
        raise ValueError("char_of indexes outside the word")
    return a


def _check_config(cfg):
    int(cfg["seed"]), float(cfg["jitter"]), float(cfg["slant_max"])


def _check_metrics(m):
    float(m["cer"]), float(m["word_acc"]), float(m["loss"])


def _check_history(history):
    for e in history:
        int(e["epoch"]), float(e["train_loss"])
        _check_metrics(e["in_vocab"])
        _check_metrics(e["held_out"])


def _check_final(final):
    _check_metrics(final["in_vocab"])
    _check_metrics(final["held_out"])


def _check_predictions(predictions):
    for p in predictions:
        str(p["word"]), str(p["split"]), str(p["decoded"])


def _check_split(split):
    if not split["train_words"] or not all(isinstance(w, str) for w in split["train_words"]):
        raise ValueError("train_words must be a non-empty list of words")


def _check_alignments(alignments):
    """Returns the records as `alignment_arrays`."""
    if len(alignments) < 2:
        raise ValueError(f"holds {len(alignments)} records, expected 2 (a short and a long word)")
    return [alignment_arrays(a) for a in alignments]


def _check_decoding(dec):
    for row in dec["rows"]:
        int(row["lexicon_size"]), str(row["decoder"]), str(row["split"])
        float(row["word_acc"]), float(row["seconds_per_word"])


# What the figures read from each top-level key. A check raises KeyError, TypeError or
# ValueError if the value is unusable, and may return a replacement (checked arrays).
RUN_CHECKS = {"config": _check_config, "history": _check_history, "final": _check_final,
              "predictions": _check_predictions, "split": _check_split, "alignments": _check_alignments,
              "decoding": _check_decoding}  # decoding is optional


def load_run(path):
    """run.json as a dict, checked, with each alignment as `alignment_arrays`.

    Raises iam_handwriting.UserError (one line, naming the file) if the file is
    missing, not JSON, of another schema_version or missing what the figures need.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ih.UserError(f"run summary {path!r} does not exist; make it with: {MAKE_RUN}") from None
    except OSError as e:
        raise ih.UserError(f"cannot read run summary {path!r}: {e.strerror or e}") from None
    try:
        doc = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        _fail(path, f"is not valid JSON ({e})")
    if not isinstance(doc, dict):
        _fail(path, "is not a JSON object")
    if "schema_version" not in doc:
        _fail(path, f"has no schema_version; remake it with: {MAKE_RUN}")
    if doc["schema_version"] != ih.SCHEMA_VERSION:
        _fail(path, f"has schema_version {doc['schema_version']!r}, this script reads {ih.SCHEMA_VERSION}; "
                    f"remake it with: {MAKE_RUN}")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        _fail(path, f"is missing required keys: {', '.join(missing)}")
    for key, check in RUN_CHECKS.items():
        if key not in doc:
            continue
        try:
            replacement = check(doc[key])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            _fail(path, f"has a malformed {key!r}: {detail}")
        if replacement is not None:
            doc[key] = replacement
    return doc


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def new_figure(width, height):
    """A pyplot-free figure with an Agg canvas (no global matplotlib state touched)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path):
    """Render to memory, then write atomically (temporary file in the same folder + rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    try:
        ih.atomic_write(path, buf.getvalue())
    except OSError as e:
        raise ih.UserError(f"cannot write {path!r}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------


def ink_segments(xy, pen_up):
    """Pen-down line segments between consecutive samples.

    xy (T, 2), pen_up (T,) with 1 on each stroke's first sample. Returns
    segments (N, 2, 2), the sample index each segment ends at (N,), and the
    pen-up jumps (M, 2, 2) from one stroke's end to the next stroke's start.
    """
    ends = np.arange(1, len(xy))
    down = pen_up[1:] < 0.5  # a segment into a stroke start is a move in the air
    segs = np.stack([xy[:-1], xy[1:]], axis=1)  # (T-1, 2, 2)
    return segs[down], ends[down], segs[~down]


def draw_ink(ax, xy, pen_up, colours, lw=2.2, air=True):
    """Ink as coloured segments (colours: one per sample, used at the segment's end)."""
    segs, ends, jumps = ink_segments(xy, pen_up)
    ax.add_collection(LineCollection(segs, colors=[colours[i] for i in ends], linewidths=lw, capstyle="round"))
    if air and len(jumps):
        ax.add_collection(LineCollection(jumps, colors="0.6", linewidths=0.8, linestyles=":"))
    ax.set_aspect("equal")
    ax.autoscale_view()


def char_spans(char_of, n_chars):
    """(first, last) sample index of every character of the word, None for one with no samples."""
    spans = []
    for i in range(n_chars):
        idx = np.flatnonzero(char_of == i)
        spans.append((int(idx[0]), int(idx[-1])) if len(idx) else None)
    return spans


def probability_cmap(rgb=(0.08, 0.1, 0.35)):
    """One dark colour whose opacity is the probability, so shading drawn below shows through."""
    ramp = np.column_stack([np.tile(rgb, (256, 1)), np.linspace(0.0, 1.0, 256)])
    return ListedColormap(ramp)


def draw_softmax(ax, a):
    """Heatmap of P(class | t), K rows, with each true character's time span shaded on its row."""
    probs = np.exp(a["log_probs"]).T  # (K, T)
    T = probs.shape[1]
    for i, span in enumerate(char_spans(a["char_of"], len(a["word"]))):
        if span is None:
            continue
        first, last = span
        k = ih.encode(a["word"][i])[0]
        ax.add_patch(Rectangle((first - 0.5, k - 0.5), last - first + 1, 1.0, facecolor=CHAR_COLOURS[i % 10],
                               alpha=0.45, edgecolor="none", zorder=0))
        ax.axvline(first - 0.5, color="0.8", lw=0.6, zorder=0)
    im = ax.imshow(probs, aspect="auto", cmap=probability_cmap(), vmin=0.0, vmax=1.0, interpolation="nearest",
                   extent=(-0.5, T - 0.5, ih.N_CLASSES - 0.5, -0.5), zorder=1)
    ax.set_yticks(range(ih.N_CLASSES), CLASS_LABELS, family="monospace")
    ax.set_ylabel("output class")
    ax.set_xlim(-0.5, T - 0.5)
    return im


def greedy_string(log_probs):
    """Best-path decode of one (T, K) log-prob array, via iam_handwriting.greedy_decode."""
    return ih.decode_labels(ih.greedy_decode(log_probs[:, None, :], [len(log_probs)])[0])


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def fig_alphabet(run):
    fig = new_figure(13.5, 6.0)
    axes = fig.subplots(2, 5, sharex=True, sharey=True)
    cmap = colormaps["viridis"]
    for ax, c in zip(axes.ravel(), ih.ALPHABET):
        g = ih.GLYPHS[c]
        n = len(g.points)
        order = cmap(np.linspace(0.0, 1.0, n))  # (n, 4) colour by drawing order
        ax.axhline(0.0, color="0.75", lw=0.8)
        ax.axhline(0.5, color="0.75", lw=0.8, ls="--")
        ax.axvline(g.width, color="0.85", lw=0.8, ls=":")
        draw_ink(ax, g.points, g.stroke_start, order, lw=2.5)
        ax.scatter(*g.points.T, c=order, s=10, zorder=3)
        starts = np.flatnonzero(g.stroke_start > 0.5)
        for s_i, s in enumerate(starts, 1):
            ax.plot(*g.points[s], "o", ms=11, mfc="white", mec="crimson", mew=1.8, zorder=4)
            ax.text(*g.points[s], str(s_i), ha="center", va="center", fontsize=7, color="crimson", zorder=5)
        _, ends, _ = ink_segments(g.points, g.stroke_start)
        for e in ends[2::5]:  # an arrowhead every few samples shows the direction of travel
            ax.annotate("", xy=g.points[e], xytext=g.points[e - 1], zorder=4,
                        arrowprops=dict(arrowstyle="-|>", color=order[e], lw=0, mutation_scale=16))
        ax.set_title(f"'{c}': {n} samples, {len(starts)} stroke{'s' if len(starts) > 1 else ''}", fontsize=11)
        ax.set_xlim(-0.1, 0.7)
        ax.set_ylim(-0.12, 1.02)
    for ax in axes[:, 0]:
        ax.set_ylabel("y (x-height 0.5)")
    for ax in axes[-1]:
        ax.set_xlabel("x")
    cb = fig.colorbar(ScalarMappable(cmap=cmap), ax=axes, shrink=0.8, pad=0.03, ticks=[0, 1])
    cb.ax.set_yticklabels(["first\nsample", "last\nsample"])
    cb.set_label("pen order")
    fig.suptitle("Stroke templates of the 10-letter alphabet: colour = pen order, numbered circle = stroke start "
                 "(pen lands), arrowheads = direction of travel,\nsolid line = baseline, dashed = x-height, "
                 "dotted = advance width", fontsize=11)
    return fig


def pick_render_words(train_words, n=6):
    """n training words spread from shortest to longest, deterministically."""
    ordered = sorted(set(train_words), key=lambda w: (len(w), w))
    idx = np.unique(np.round(np.linspace(0, len(ordered) - 1, min(n, len(ordered)))).astype(int))
    return [ordered[i] for i in idx]


def fig_word_renderings(run):
    cfg = run["config"]
    words = pick_render_words(run["split"]["train_words"])
    rng = np.random.default_rng(int(cfg["seed"]))
    fig = new_figure(13.0, 5.8)
    axes = fig.subplots(2, 3).ravel()
    stroke_cmap = colormaps["tab10"]
    for ax, w in zip(axes, words):
        r = ih.render_word(w, rng, float(cfg["jitter"]), float(cfg["slant_max"]))
        template = ih.render_word(w, np.random.default_rng(0), 0.0, 0.0)  # no jitter, no slant
        pen_up = r.traj[:, 2]
        stroke_id = np.cumsum(pen_up > 0.5) - 1  # (T,)
        draw_ink(ax, template.xy, template.traj[:, 2], ["0.82"] * len(template.xy), lw=5.0, air=False)
        draw_ink(ax, r.xy, pen_up, [stroke_cmap(s % 10) for s in stroke_id], lw=2.0)
        starts = np.flatnonzero(pen_up > 0.5)
        ax.plot(*r.xy[starts].T, "o", ms=6, mfc="white", mec="black", mew=1.2, zorder=4)
        ax.set_title(f"'{w}'  T = {len(r.xy)} samples, {len(starts)} strokes", fontsize=11)
        ax.set_ylim(-0.25, 1.1)
        ax.tick_params(labelsize=8)
    for ax in axes[len(words):]:
        ax.set_visible(False)
    fig.suptitle(f"Training words as the renderer draws them (jitter {cfg['jitter']}, slant up to "
                 f"\u00b1{cfg['slant_max']}, rng seed {cfg['seed']}): each colour = one pen stroke, "
                 "\u25cb = stroke start (pen_up = 1),\ndotted = pen moving in the air, thick grey = the "
                 "template without jitter or slant", fontsize=11)
    return fig


def label_ends(ax, ends, min_gap=0.09):
    """Write each curve's final value just right of its last point, spread so labels never overlap.

    ends: (x, y, colour, text) per curve. Call after the axis limits are final.
    """
    to_axes = ax.transData + ax.transAxes.inverted()
    placed = sorted(((*to_axes.transform((x, y)), x, y, colour, text) for x, y, colour, text in ends),
                    key=lambda e: e[1])
    last = min_gap / 2 - min_gap  # the lowest label stays clear of the x axis
    for xf, yf, x, y, colour, text in placed:
        yf = max(yf, last + min_gap)
        last = yf
        ax.annotate(text, (x, y), xytext=(xf + 0.03, yf), textcoords="axes fraction", color=colour,
                    fontsize=10, va="center", arrowprops=dict(arrowstyle="-", color=colour, lw=0.6))


def fig_training_curves(run):
    hist = run["history"]
    fig = new_figure(12.0, 4.8)
    if not hist:
        ax = fig.subplots()
        ax.set_axis_off()
        finals = "\n".join(f"final {name} CER {run['final'][split]['cer']:.3f}, "
                            f"word accuracy {run['final'][split]['word_acc']:.1%}"
                            for split, name in (("in_vocab", "in-vocab"), ("held_out", "held-out")))
        ax.text(0.5, 0.5, "No training history in this run.json:\nthe model was loaded and evaluated "
                          f"without training (--load-model).\n\n{finals}",
                ha="center", va="center", fontsize=13, transform=ax.transAxes)
        fig.suptitle("Training curves", fontsize=13)
        return fig
    ep = np.array([e["epoch"] for e in hist])
    ax_loss, ax_cer = fig.subplots(1, 2)
    curves = [("train (fresh renderings)", [e["train_loss"] for e in hist], "tab:blue", "-"),
              ("in-vocab eval", [e["in_vocab"]["loss"] for e in hist], "tab:orange", "-"),
              ("held-out eval", [e["held_out"]["loss"] for e in hist], "tab:green", "--")]
    for label, ys, colour, ls in curves:
        ax_loss.plot(ep, ys, ls, color=colour, marker="o", ms=3, label=label)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("CTC loss per character (nats, log scale)")
    ax_loss.set_title("CTC loss")
    ax_loss.legend()
    cer_curves = [("in_vocab", "in-vocab words", "tab:orange"),
                  ("held_out", "held-out words (never trained on)", "tab:green")]
    for split, label, colour in cer_curves:
        ax_cer.plot(ep, [e[split]["cer"] for e in hist], color=colour, marker="o", ms=3, label=label)
    ax_cer.set_ylim(bottom=0.0, top=max(0.05, max(e[s]["cer"] for e in hist for s, _, _ in cer_curves)) * 1.08)
    ax_cer.set_xlabel("epoch")
    ax_cer.set_ylabel("character error rate (edits / characters)")
    ax_cer.set_title("Character error rate (greedy decoding)")
    ax_cer.legend()
    for ax in (ax_loss, ax_cer):
        ax.set_xlim(ep[0] - 0.5, ep[-1] + 0.5 + 0.3 * max(ep[-1] - ep[0], 3))  # room for the end labels
        ax.grid(alpha=0.3)
    label_ends(ax_loss, [(ep[-1], ys[-1], colour, f"{ys[-1]:.3g}") for _, ys, colour, _ in curves])
    label_ends(ax_cer, [(ep[-1], hist[-1][split]["cer"], colour,
                         f"CER {hist[-1][split]['cer']:.3f}\nword acc {hist[-1][split]['word_acc']:.0%}")
                        for split, _, colour in cer_curves], min_gap=0.13)
    c = run["config"]
    layers = c.get("layers", 1)
    fig.suptitle(f"Training: {'B' if c.get('bidirectional', True) else 'forward-only '}LSTM, "
                 f"{layers} layer{'s' if layers != 1 else ''} of {c.get('hidden', '?')} cells per direction, "
                 f"{len(hist)} epochs; final values labelled at the right",
                 fontsize=13)
    return fig


def fig_ctc_alignment(a):
    word, T = a["word"], len(a["xy"])
    fig = new_figure(12.0, 8.2)
    gs = fig.add_gridspec(3, 1, height_ratios=[2.4, 3.0, 0.9])
    ax_pen = fig.add_subplot(gs[0])
    ax_hm = fig.add_subplot(gs[1])
    ax_path = fig.add_subplot(gs[2], sharex=ax_hm)
    colours = [CHAR_COLOURS[i % 10] for i in a["char_of"]]
    draw_ink(ax_pen, a["xy"], a["traj"][:, 2], colours, lw=2.5)
    below = a["xy"][:, 1].min() - 0.22
    for i, c in enumerate(word):  # the true character, boxed under its ink so it is not mistaken for ink
        pts = a["xy"][a["char_of"] == i]
        if len(pts):
            ax_pen.text(pts[:, 0].mean(), below, c, ha="center", va="center", fontsize=13, family="monospace",
                        color=CHAR_COLOURS[i % 10], bbox=dict(boxstyle="round", fc="white", ec=CHAR_COLOURS[i % 10]))
    ax_pen.set_ylim(below - 0.15, a["xy"][:, 1].max() + 0.1)
    ax_pen.set_title(f"Pen trajectory of '{word}' ({T} samples), coloured by the character each sample draws "
                     "(dotted = pen in the air)", fontsize=11)
    ax_pen.set_xlabel("x")
    ax_pen.set_ylabel("y")
    im = draw_softmax(ax_hm, a)
    ax_hm.set_title("Network output P(class | time step): dark = probable; coloured boxes = where each true "
                    "character is being written", fontsize=11)
    fig.colorbar(im, ax=ax_hm, pad=0.01, label="probability")
    ax_hm.tick_params(labelbottom=False)
    path = a["argmax_path"]
    for t, k in enumerate(path):
        if k == ih.BLANK:
            ax_path.text(t, 0.5, "\u00b7", ha="center", va="center", color="0.6", fontsize=12)
        else:
            first = t == 0 or path[t - 1] != k  # a repeat of the previous step collapses into it
            ax_path.text(t, 0.5, CLASS_LABELS[k], ha="center", va="center", fontsize=12, family="monospace",
                         color="black" if first else "0.65")
    ax_path.set_yticks([])
    ax_path.set_ylim(0, 1)
    ax_path.set_xlabel("time step (pen sample)")
    ax_path.set_title("Most probable class per time step (\u00b7 = blank). Greedy decode: merge repeats (grey), "
                      "drop blanks", fontsize=11)
    verdict = "correct" if a["decoded"] == word else f"CER {a['cer']:.2f}"
    decoded = f"'{a['decoded']}'" if a["decoded"] else "nothing (all blank)"
    fig.suptitle(f"CTC alignment, in-vocab word '{word}': decoded {decoded} vs target '{word}' ({verdict})",
                 fontsize=13)
    return fig


def confusion_counts(pairs, alphabet=ih.ALPHABET):
    """Character confusion counts from (reference, hypothesis) string pairs.

    Each pair is aligned with iam_handwriting.edit_alignment. Returns
    (matrix, labels): matrix[i, j] counts reference character labels[i]
    decoded as labels[j]; the last label is EMPTY, so the last column counts
    deletions and the last row insertions. Characters outside `alphabet` get
    labels of their own before EMPTY.
    """
    aligned = [p for ref, hyp in pairs for p in ih.edit_alignment(ref, hyp)]
    extra = sorted({c for p in aligned for c in p if c is not None and c not in alphabet})
    labels = list(alphabet) + extra + [EMPTY]
    index = {c: i for i, c in enumerate(labels[:-1])}
    empty = len(labels) - 1
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for r, h in aligned:
        matrix[index.get(r, empty), index.get(h, empty)] += 1
    return matrix, labels


def fig_confusion(run):
    fig = new_figure(13.0, 6.2)
    axes = fig.subplots(1, 2)
    names = {"in_vocab": "in-vocab words", "held_out": "held-out words (never trained on)"}
    cmap = colormaps["Blues"].copy()
    cmap.set_bad("white")
    for ax, split in zip(axes, ("in_vocab", "held_out")):
        preds = [(p["word"], p["decoded"]) for p in run["predictions"] if p["split"] == split]
        m, labels = confusion_counts(preds)
        n = len(labels)
        shown = np.ma.masked_equal(m, 0)
        vmax = max(int(m.max()), 2)
        im = ax.imshow(shown, cmap=cmap, norm=LogNorm(vmin=1, vmax=vmax))
        for i, j in zip(*np.nonzero(m)):
            bright = np.log(m[i, j]) > 0.6 * np.log(vmax)
            error = i != j or i == n - 1
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8 if m[i, j] < 1000 else 6,
                    color="white" if bright else ("firebrick" if error else "black"))
            if error:  # errors are rare and pale on a count scale: outline them
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="firebrick", lw=1.2))
        ax.axhline(n - 1.5, color="0.4", lw=0.8)
        ax.axvline(n - 1.5, color="0.4", lw=0.8)
        ax.set_xticks(range(n), labels[:-1] + [f"{EMPTY}\ndel"], family="monospace")
        ax.set_yticks(range(n), labels[:-1] + [f"{EMPTY} ins"], family="monospace")
        ax.set_xlabel("decoded character   (last column: deleted, nothing decoded)")
        ax.set_ylabel("true character   (last row: inserted, not in the word)")
        n_chars = sum(len(w) for w, _ in preds)
        errors = int(m.sum() - np.trace(m[:-1, :-1]))
        ax.set_title(f"{names[split]}: {len(preds)} predictions, {n_chars} true characters,\n"
                     f"{errors} edits (CER {errors / max(n_chars, 1):.3f})", fontsize=11)
        fig.colorbar(im, ax=ax, shrink=0.8, label="count (log colour scale)")
    fig.suptitle("Character confusions over every prediction in run.json (Levenshtein alignment of target "
                 "and decode);\ndiagonal = correct, red boxes = errors", fontsize=12)
    return fig


def fig_lexicon_size(run):
    dec = run["decoding"]
    fig = new_figure(12.0, 4.8)
    ax_acc, ax_time = fig.subplots(1, 2)
    known = ["greedy", "beam", "lexicon"]
    decoders = sorted({r["decoder"] for r in dec["rows"]}, key=lambda d: (known.index(d) if d in known else 3, d))
    colours = {d: colormaps["tab10"](i) for i, d in enumerate(decoders)}
    styles = {"in_vocab": ("-", "o", "in-vocab"), "held_out": ("--", "s", "held-out")}
    sizes = sorted({int(r["lexicon_size"]) for r in dec["rows"]})
    for d in decoders:
        for split, (ls, marker, split_name) in styles.items():
            rows = sorted((r for r in dec["rows"] if r["decoder"] == d and r["split"] == split),
                          key=lambda r: r["lexicon_size"])
            if not rows:
                continue
            x = [int(r["lexicon_size"]) for r in rows]
            if len(x) == 1 and len(sizes) > 1:  # a decoder that ignores the lexicon: one level everywhere
                x = [sizes[0], sizes[-1]]
                rows = rows * 2
            # greedy and beam often score the same: greedy is a wide pale band under the others
            wide = d == "greedy"
            kw = dict(color=colours[d], ls=ls, marker=marker, ms=9 if wide else 5, lw=6 if wide else 1.8,
                      alpha=0.35 if wide else 1.0, zorder=1 if wide else 2, label=f"{d}, {split_name}")
            ax_acc.plot(x, [r["word_acc"] for r in rows], **kw)
            ax_time.plot(x, [1e3 * r["seconds_per_word"] for r in rows], **kw)
    for ax in (ax_acc, ax_time):
        ax.set_xscale("log")
        ax.set_xlabel("lexicon size (words the decoder may choose from, log scale)")
        ax.grid(alpha=0.3)
        ax.set_xticks(sizes, [str(s) for s in sizes])
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_ylabel("word accuracy")
    ax_acc.set_title("Word accuracy")
    ax_acc.legend(fontsize=9)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("decoding time per word (ms, log scale)")
    ax_time.set_title("Decoding cost")
    fig.suptitle(f"Decoders against lexicon size (beam width {dec.get('beam_width', '?')}); "
                 "solid = in-vocab words, dashed = held-out words", fontsize=12)
    return fig


def figures(run):
    """(file name, function making the figure) for everything this run.json supports."""
    out = [("alphabet.png", lambda: fig_alphabet(run)),
           ("word_renderings.png", lambda: fig_word_renderings(run)),
           ("training_curves.png", lambda: fig_training_curves(run)),
           ("ctc_alignment.png", lambda: fig_ctc_alignment(run["alignments"][0])),
           ("ctc_alignment_long.png", lambda: fig_ctc_alignment(run["alignments"][1])),
           ("confusion_chars.png", lambda: fig_confusion(run))]
    if "decoding" in run:
        out.append(("lexicon_size.png", lambda: fig_lexicon_size(run)))
    return out


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def build_parser(prog=PROG, doc=__doc__, out="viz", out_help="folder for the PNGs (created if missing)"):
    """[run.json] [--out OUT]: the command line of both figure scripts."""
    p = ih.OneLineParser(prog=prog, description=doc.split("\n\n")[0],
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", nargs="?", default="run.json", help="run summary written by iam_handwriting.py --save-json")
    p.add_argument("--out", default=out, help=out_help)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run = load_run(args.run)
        ih.check_folder_writable(args.out, f"into output folder {args.out!r}")
        for name, make in figures(run):
            path = os.path.join(args.out, name)
            save_png(make(), path)
            print(f"wrote {path}")
    except ih.UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
