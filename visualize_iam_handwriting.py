"""Figures for a run of iam_handwriting.py, drawn from its run.json.

Reads the run summary written by `python iam_handwriting.py --save-json run.json`
(schema 2, any task) and writes PNGs into one folder. It never trains and only
reads run.json; the figure set depends on the run's task:

  words (printed words over ten letters):
    alphabet.png              the stroke templates: pen order, stroke starts, direction of travel
    word_renderings.png       six training words as the renderer draws them (jitter, slant)
  lines (cursive lines by synthetic writers):
    six_writers.png           one test line written by six test writers, neatest to sloppiest
  lines and iam-ondb:
    per_writer_cer.png        CER of every validation and test writer, sorted, with the split's CER
  every task:
    training_curves.png       CTC loss, CER and WER per epoch on the monitored splits
    ctc_alignment.png         ink coloured by true character, output distribution with each
                              character's time span, argmax path: a short sample
    ctc_alignment_long.png    the same for a long sample
    confusion_chars.png       character confusions over every prediction in run.json
  only with a `decoding` block:
    lexicon_size.png          words: word accuracy and decoding time against lexicon size
    dictionary_size.png       lines, iam-ondb: WER per decoder against dictionary size, OOV rate

Every value the figures read is checked first (a bad one is reported as one line
naming the file and the key), every figure is then rendered to memory, and only
then are the files written: a bad run.json leaves the folder as it was. Known
figure files in the folder that this run does not make are listed, never deleted.

Usage:
    python visualize_iam_handwriting.py                      # run.json -> viz/
    python visualize_iam_handwriting.py run.json --out viz/
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

import iam_handwriting as ih

PROG = "visualize_iam_handwriting.py"
MAKE_RUN = "python iam_handwriting.py --seed 0 --save-json run.json"
DPI = 110
EMPTY = "\u2205"  # the empty side of an insertion or deletion in the confusion matrix
SPACE = "\u2423"  # how a space is shown as a class or a character
CHAR_COLOURS = colormaps["tab10"].colors  # character i of a text gets colour i % 10
SPLIT_COLOURS = ("tab:orange", "tab:green", "tab:red", "tab:purple")  # task.splits in order
SPLIT_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # (line, marker) per split in decoding figures
SPLIT_NAMES = {"in_vocab": "in-vocab words", "held_out": "held-out words (never trained on)",
               "validation": "validation writers", "validation2": "second validation set", "test": "test writers"}
NOUN = {"words": "word"}  # what one sample of a task is called; anything else: "line"
DECODING_KIND = {"words": "lexicon", "lines": "dictionary", "iam-ondb": "dictionary"}
DECODER_ORDER = ("greedy", "beam", "lexicon", "dictionary", "unigram", "bigram")
MODEL_SOURCES = ("trained", "untrained", "loaded")

# ---------------------------------------------------------------------------
# Reading run.json: every value a figure reads is checked here, and only the
# checked values reach the figures
# ---------------------------------------------------------------------------

REQUIRED_KEYS = ("task", "config", "model_source", "history", "final", "predictions", "alignments", "split")


MAX_MAGNITUDE = 1e12  # no value of run.json is larger: finite extremes (1e308) would collapse or overflow a plot


class Malformed(Exception):
    """A value the figures read is missing or unusable; the message starts with its key."""


class Field:
    """One value of run.json and its key path (e.g. history[3].validation.cer), so
    that a check that fails can say which key it was."""

    def __init__(self, value, path):
        self.value, self.path = value, path

    def fail(self, problem):
        raise Malformed(f"{self.path} {problem}")

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.seq()[key]
        if not isinstance(self.value, dict):
            self.fail("is not a JSON object")
        if key not in self.value:
            raise Malformed(f"{self.path}.{key} is missing" if self.path else f"{key} is missing")
        return Field(self.value[key], f"{self.path}.{key}" if self.path else key)

    def has(self, key):
        return isinstance(self.value, dict) and key in self.value

    def items(self):
        """[(key, Field)] of a JSON object."""
        if not isinstance(self.value, dict):
            self.fail("is not a JSON object")
        return [(k, self[k]) for k in self.value]

    def seq(self, min_len=0):
        """[Field] of a JSON list with at least min_len items."""
        if not isinstance(self.value, list):
            self.fail("is not a list")
        if len(self.value) < min_len:
            self.fail(f"holds {len(self.value)} items, expected at least {min_len}")
        return [Field(v, f"{self.path}[{i}]") for i, v in enumerate(self.value)]

    def number(self, low=None, high=None):
        """A finite float within [low, high]."""
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(f"is {v!r}, expected a number")
        if isinstance(v, float) and not math.isfinite(v):
            self.fail(f"is {v}, expected a finite number")
        if abs(v) > MAX_MAGNITUDE:  # compared before float(): an int of 400 digits has no float
            shown = f"{v:.3g}" if isinstance(v, float) or abs(v) < 1e300 else f"an integer of {len(str(abs(v)))} digits"
            self.fail(f"is {shown}, beyond the +-{MAX_MAGNITUDE:g} any value of run.json may have")
        if (low is not None and v < low) or (high is not None and v > high):
            self.fail(f"is {v}, expected a number in {low if low is not None else '-inf'}.."
                      f"{high if high is not None else 'inf'}")
        return float(v)

    def integer(self, low=None, high=None):
        v = self.value
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            self.fail(f"is {v!r}, expected a whole number")
        return int(self.number(low, high))

    def string(self, nonempty=False):
        if not isinstance(self.value, str) or (nonempty and not self.value):
            self.fail(f"is {self.value!r}, expected {'a non-empty' if nonempty else 'a'} string")
        return self.value

    def flag(self):
        if not isinstance(self.value, bool):
            self.fail(f"is {self.value!r}, expected true or false")
        return self.value

    def choice(self, options):
        if self.value not in options:
            self.fail(f"is {self.value!r}, expected one of {', '.join(map(repr, options))}")
        return self.value

    def array(self, shape, integer=False, low=None, high=None):
        """A numeric array of `shape` (None: any length), finite, within [low, high]."""
        try:
            a = np.asarray(self.value)
        except ValueError:  # ragged
            a = np.asarray(None)
        if a.dtype.kind not in "iuf":
            self.fail("is not a numeric array (ragged, or holds something other than numbers)")
        a = a.astype(float)
        if a.ndim != len(shape) or any(n is not None and n != m for n, m in zip(shape, a.shape)):
            want = "(" + ", ".join("any" if n is None else str(n) for n in shape) + ")"
            self.fail(f"has shape {a.shape}, expected {want}")
        bad = np.flatnonzero(~np.isfinite(a).ravel())
        if len(bad):
            self.fail(f"holds {a.ravel()[bad[0]]} at flat index {bad[0]}, expected finite numbers")
        huge = np.flatnonzero(np.abs(a).ravel() > MAX_MAGNITUDE)
        if len(huge):
            self.fail(f"holds {a.ravel()[huge[0]]:.3g} at flat index {huge[0]}, beyond the +-{MAX_MAGNITUDE:g} any "
                      "value of run.json may have")
        if integer and not np.array_equal(a, np.round(a)):
            self.fail("holds a number that is not whole, expected class or character indices")
        outside = np.flatnonzero((a < (-np.inf if low is None else low)) | (a > (np.inf if high is None else high)))
        if len(outside):
            self.fail(f"holds {a.ravel()[outside[0]]:g} at flat index {outside[0]}, expected values in {low}..{high}")
        return a.astype(int) if integer else a


def check_metrics(f):
    """{cer, wer, word_acc, loss}. Word accuracy is 1 - WER, which insertions can make negative."""
    return {"cer": f["cer"].number(0), "wer": f["wer"].number(0), "word_acc": f["word_acc"].number(high=1.0),
            "loss": f["loss"].number(0)}


def check_task(f):
    name = f["name"].choice(ih.TASK_NAMES)
    alphabet = f["alphabet"].string(nonempty=True)
    if len(set(alphabet)) != len(alphabet):
        f["alphabet"].fail(f"is {alphabet!r}, which repeats a character")
    splits = [s.string(nonempty=True) for s in f["splits"].seq(1)]
    if len(set(splits)) != len(splits):
        f["splits"].fail("repeats a split")
    monitor = [s.choice(splits) for s in f["monitor"].seq()]
    return {"name": name, "alphabet": alphabet, "splits": splits, "monitor": monitor}


def check_config(f, task):
    cfg = {"hidden": f["hidden"].integer(1), "layers": f["layers"].integer(1),
           "bidirectional": f["bidirectional"].flag(), "seed": f["seed"].integer(0)}
    if task["name"] == "words":  # word_renderings.png redraws words with these
        cfg.update(jitter=f["jitter"].number(0), slant_max=f["slant_max"].number(0))
    return cfg


def check_history(f, task, model_source):
    history, last = [], 0
    for e in f.seq():
        epoch = e["epoch"].integer(last + 1)  # strictly increasing from 1
        history.append({"epoch": epoch, "train_loss": e["train_loss"].number(0),
                        **{split: check_metrics(e[split]) for split in task["monitor"]}})
        last = epoch
    if model_source == "trained" and not history:
        f.fail("is empty, but model_source says the model was trained")
    return history


def check_predictions(f, task):
    return [{"text": p["text"].string(), "split": p["split"].choice(task["splits"]), "decoded": p["decoded"].string()}
            for p in f.seq()]


def check_alignment(f, task):
    """One alignment record with its lists as numpy arrays (T time steps, K classes)."""
    K = 1 + len(task["alphabet"])
    text = f["text"].string(nonempty=True)
    xy = f["xy"].array((None, 2))  # (T, 2)
    T = len(xy)
    if T == 0:
        f["xy"].fail("is empty")
    char_of = None if f["char_of"].value is None else f["char_of"].array((T,), True, 0, len(text) - 1)  # (T,)
    writer = f["writer"].value
    if writer is not None:
        writer = f["writer"].string()
    return {"text": text, "split": f["split"].string(), "writer": writer, "xy": xy,
            "pen_up": f["pen_up"].array((T,), low=0.0, high=1.0),  # (T,)
            "char_of": char_of,
            "log_probs": f["log_probs"].array((T, K), high=1e-3),  # (T, K); rounding may give +0.0001
            "argmax_path": f["argmax_path"].array((T,), True, 0, K - 1),  # (T,)
            "decoded": f["decoded"].string(), "cer": f["cer"].number(0)}


def check_per_writer(f, task):
    groups = {name: {"split": g["split"].choice(task["splits"]), "cer": g["cer"].number(0)} for name, g in f.items()}
    if not groups:
        f.fail("is empty")
    return groups


def check_line_text(f):
    """A text six_writers.png can render: words of a-z separated by single spaces."""
    text = f.string(nonempty=True)
    if any(c not in ih.LINE_ALPHABET for c in text) or text != " ".join(text.split()):
        f.fail(f"is {text!r}, expected words of a-z separated by single spaces")
    return text


def check_split(f, task):
    if task["name"] == "words":  # word_renderings.png draws training words with the printed glyphs
        words = [w.string(nonempty=True) for w in f["train_words"].seq(1)]
        for i, w in enumerate(words):
            if any(c not in task["alphabet"] or c not in ih.GLYPHS for c in w):
                f["train_words"][i].fail(f"is {w!r}, which has letters outside the alphabet {task['alphabet']!r}")
        return {"train_words": words}
    if task["name"] == "lines":  # six_writers.png draws this iam_handwriting.py's writers
        seed = f["data_seed"].integer()
        if seed != ih.LINES_DATA_SEED:
            f["data_seed"].fail(f"is {seed}, but this iam_handwriting.py draws its writers from data seed "
                                f"{ih.LINES_DATA_SEED}; six_writers.png would show other writers")
        return {"data_seed": seed}
    return {}


def check_decoding(f, task):
    kind = f["kind"].choice((DECODING_KIND[task["name"]],))
    rows = []
    for r in f["rows"].seq(1):
        row = {"size": r["size"].integer(1), "decoder": r["decoder"].string(nonempty=True),
               "split": r["split"].choice(task["splits"]), **{k: r[k].number(0) for k in ("cer", "wer")},
               "word_acc": r["word_acc"].number(high=1.0), "seconds_per_seq": r["seconds_per_seq"].number(0),
               "n": r["n"].integer(0)}
        if kind == "dictionary":
            row["oov_rate"] = r["oov_rate"].number(0, 1)
        rows.append(row)
    dec = {"kind": kind, "rows": rows}
    if f.has("beam_width"):
        dec["beam_width"] = f["beam_width"].integer(1)
    if kind == "dictionary" and f.has("perplexity"):
        dec["perplexity"] = {}
        for size, by_lm in f["perplexity"].items():  # JSON keys are strings: "1000"
            if not size.isdigit() or int(size) < 1:
                by_lm.fail("is keyed by something other than a dictionary size")
            dec["perplexity"][int(size)] = {lm: p.number(1.0) for lm, p in by_lm.items()}
    return dec


def check_run(doc):
    """The values the figures read, checked and converted; Malformed naming the first bad key."""
    root = Field(doc, "")
    task = check_task(root["task"])
    model_source = root["model_source"].choice(MODEL_SOURCES)
    run = {"task": task, "config": check_config(root["config"], task), "model_source": model_source,
           "history": check_history(root["history"], task, model_source),
           "final": {split: check_metrics(root["final"][split]) for split in task["splits"]},
           "predictions": check_predictions(root["predictions"], task),
           "alignments": [check_alignment(a, task) for a in root["alignments"].seq(2)],
           "split": check_split(root["split"], task)}
    if task["name"] != "words":  # per_writer_cer.png
        run["per_writer"] = check_per_writer(root["per_writer"], task)
    if task["name"] == "lines":  # six_writers.png writes the short alignment line
        run["six_writers_text"] = check_line_text(root["alignments"][0]["text"])
    if root.has("decoding"):
        run["decoding"] = check_decoding(root["decoding"], task)
    return run


def load_run(path):
    """run.json, checked, as `check_run` returns it.

    Raises iam_handwriting.UserError (one line naming the file, and the key if one
    is bad) if the file is missing, not JSON, of another schema_version, or holds
    a value the figures cannot use.
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
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise ih.UserError(f"run summary {path!r} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ih.UserError(f"run summary {path!r} is not a JSON object")
    if doc.get("schema_version") != ih.SCHEMA_VERSION:
        found = f"schema_version {doc['schema_version']!r}" if "schema_version" in doc else "no schema_version"
        raise ih.UserError(f"run summary {path!r} has {found}, this script reads {ih.SCHEMA_VERSION}; "
                           f"remake it with: {MAKE_RUN}")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise ih.UserError(f"run summary {path!r} is missing required keys: {', '.join(missing)}")
    try:
        return check_run(doc)
    except Malformed as e:
        raise ih.UserError(f"run summary {path!r}: {e}") from None


# ---------------------------------------------------------------------------
# Drawing helpers shared by the figures and the GIF
# ---------------------------------------------------------------------------


def new_figure(width, height):
    """A pyplot-free figure with an Agg canvas (no global matplotlib state touched)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def shown(c):
    """A character as a figure shows it: a space is visible."""
    return SPACE if c == " " else c


def class_labels(alphabet):
    """Names of the K classes: row k of a (T, K) log-prob array is 'blank' for k = 0, else alphabet[k - 1]."""
    return ["blank"] + [shown(c) for c in alphabet]


def noun(run):
    return NOUN.get(run["task"]["name"], "line")


def split_name(split):
    return SPLIT_NAMES.get(split, split.replace("_", "-"))


def model_name(cfg):
    """'BLSTM, 1 layer of 64 cells per direction' or 'forward-only LSTM, 1 layer of 64 cells'."""
    layers = f"{cfg['layers']} layer{'s' if cfg['layers'] != 1 else ''} of {cfg['hidden']} cells"
    return f"BLSTM, {layers} per direction" if cfg["bidirectional"] else f"forward-only LSTM, {layers}"


def char_colours(char_of):
    """(T,) colour of each sample: its character's colour, black where the character is unknown."""
    if char_of is None:
        return None
    return [CHAR_COLOURS[i % 10] for i in char_of]


def ink_segments(xy, pen_up):
    """Pen-down line segments between consecutive samples.

    xy (T, 2), pen_up (T,) with 1 on each stroke's first sample. Returns
    segments (N, 2, 2), the sample index each segment ends at (N,), and the
    pen-up moves (M, 2, 2) from one stroke's end to the next stroke's start.
    """
    ends = np.arange(1, len(xy))
    down = pen_up[1:] < 0.5  # a segment into a stroke start is a move in the air
    segs = np.stack([xy[:-1], xy[1:]], axis=1)  # (T-1, 2, 2)
    return segs[down], ends[down], segs[~down]


def draw_ink(ax, xy, pen_up, colours=None, lw=2.2, air=True, zorder=2):
    """Pen-down ink as segments, each in the colour of the sample it ends on
    (colours (T,), or None for black); pen-up moves as dotted grey lines.
    Returns the ink's LineCollection (gid 'ink')."""
    segs, ends, moves = ink_segments(xy, pen_up)
    seg_colours = "black" if colours is None else [colours[i] for i in ends]
    ink = LineCollection(segs, colors=seg_colours, linewidths=lw, capstyle="round", zorder=zorder, gid="ink")
    ax.add_collection(ink)
    if air and len(moves):
        ax.add_collection(LineCollection(moves, colors="0.55", linewidths=0.8, linestyles=":", zorder=zorder - 0.5,
                                         gid="pen-up"))
    ax.update_datalim(xy)
    ax.autoscale_view()
    return ink


def value_runs(values):
    """Maximal runs of one value in values (T,), such as an argmax path: [(value, first, last)]."""
    change = np.flatnonzero(np.diff(values)) + 1
    firsts, lasts = np.r_[0, change], np.r_[change, len(values)] - 1
    return [(int(values[a]), int(a), int(b)) for a, b in zip(firsts, lasts)]


def char_runs(char_of):
    """Runs of consecutive samples drawing one character: [(i, first, last)].

    char_of (T,) or None. A letter with a delayed stroke (an i dot, a t bar,
    written after its word) has two runs; a space has none.
    """
    return [] if char_of is None else value_runs(char_of)


def probability_cmap(rgb=(0.08, 0.1, 0.35)):
    """One dark colour whose opacity is the probability."""
    ramp = np.column_stack([np.tile(rgb, (256, 1)), np.linspace(0.0, 1.0, 256)])
    return ListedColormap(ramp)


def draw_softmax(ax, a, alphabet):
    """Heat map of P(class | t) (gid 'softmax', array (K, T)), with an outline
    (gid 'span') around each true character's time span on its class's row."""
    probs = np.exp(a["log_probs"]).T  # (K, T)
    K, T = probs.shape
    im = ax.imshow(probs, aspect="auto", cmap=probability_cmap(), vmin=0.0, vmax=1.0, interpolation="nearest",
                   extent=(-0.5, T - 0.5, K - 0.5, -0.5), zorder=1)
    im.set_gid("softmax")
    ax.hlines(np.arange(K - 1) + 0.5, -0.5, T - 0.5, color="0.88", lw=0.5, zorder=0.5)  # rules between rows
    for i, first, last in char_runs(a["char_of"]):
        c = a["text"][i]
        if c in alphabet:
            ax.add_patch(Rectangle((first - 0.5, alphabet.index(c) + 0.5), last - first + 1, 1.0, fill=False,
                                   edgecolor=CHAR_COLOURS[i % 10], lw=1.8, zorder=3, gid="span"))
    ax.set_yticks(range(K), class_labels(alphabet), family="monospace", fontsize=8 if K > 12 else 10)
    ax.set_ylabel("output class")
    ax.set_xlim(-0.5, T - 0.5)
    return im


def draw_argmax_path(ax, path, alphabet):
    """The most probable class per step as runs: each run of a character class
    is a bar over its steps with the character (gid 'path-char') at its first
    step; blank steps are a thin grey line. Read left to right, the characters
    are the greedy decode (merge repeats, drop blanks)."""
    T = len(path)
    ax.plot([-0.5, T - 0.5], [0.25, 0.25], color="0.75", lw=1.0)
    runs = [(k, a, b) for k, a, b in value_runs(path) if k != ih.BLANK]
    ax.add_collection(LineCollection([[(a - 0.45, 0.25), (b + 0.45, 0.25)] for _, a, b in runs], colors="black",
                                     linewidths=5, capstyle="butt"))
    steps_per_letter = 10.0 * T / max(ax.get_window_extent().width, 1.0)  # an 11-point letter is ~10 pixels
    level, last = 0, -np.inf
    for k, a, _ in runs:
        level = 1 - level if a - last < steps_per_letter else 0  # letters that would touch alternate in height
        last = a
        ax.text(a, (0.58, 0.85)[level], shown(alphabet[k - 1]), ha="center", va="center", fontsize=11,
                family="monospace", gid="path-char", in_layout=False)  # inside the axes: no layout work
    ax.set_yticks([])
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.5, T - 0.5)


def greedy_string(log_probs, alphabet):
    """Best-path decode of one (T, K) log-prob array, via iam_handwriting.greedy_decode."""
    return ih.decode_labels(ih.greedy_decode(log_probs[:, None, :], [len(log_probs)])[0], alphabet)


def quoted(text):
    return f"'{text}'" if text else "nothing (every step's most probable class is blank)"


# ---------------------------------------------------------------------------
# Figures of the printed words
# ---------------------------------------------------------------------------


def fig_alphabet(run):
    alphabet = run["task"]["alphabet"]
    cols = 5
    rows = math.ceil(len(alphabet) / cols)
    fig = new_figure(13.5, 3.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True)).ravel()
    cmap = colormaps["viridis"]
    for ax, c in zip(axes, alphabet):
        g = ih.GLYPHS[c]
        n = len(g.points)
        order = cmap(np.linspace(0.0, 1.0, n))  # (n, 4) colour by drawing order
        ax.axhline(0.0, color="0.75", lw=0.8)
        ax.axhline(0.5, color="0.75", lw=0.8, ls="--")
        ax.axvline(g.width, color="0.85", lw=0.8, ls=":")
        draw_ink(ax, g.points, g.stroke_start, order, lw=2.5, zorder=3)
        ax.scatter(*g.points.T, c=order, s=10, zorder=4)
        starts = np.flatnonzero(g.stroke_start > 0.5)
        for s_i, s in enumerate(starts, 1):
            # A ring around the start, under the ink, and its number beside it: a short
            # stroke (the i dot) stays visible.
            ax.plot(*g.points[s], "o", ms=12, mfc="none", mec="crimson", mew=1.5, zorder=2)
            ax.annotate(str(s_i), g.points[s], xytext=(-11, 7), textcoords="offset points", ha="center",
                        va="center", fontsize=9, color="crimson", fontweight="bold", zorder=5)
        _, ends, _ = ink_segments(g.points, g.stroke_start)
        e = ends[2::5]  # an arrowhead every few samples shows the direction of travel
        step = g.points[e] - g.points[e - 1]  # (n, 2)
        step *= 0.06 / np.linalg.norm(step, axis=1, keepdims=True).clip(1e-12)  # about a head's length: no shaft
        ax.quiver(*g.points[e].T, *step.T, color=order[e], angles="xy", scale_units="xy", scale=1, pivot="tip",
                  width=0.012, headwidth=4, headlength=4.5, headaxislength=4, zorder=4)
        ax.set_title(f"'{c}': {n} samples, {len(starts)} stroke{'s' if len(starts) > 1 else ''}", fontsize=11)
        ax.set_xlim(-0.12, 0.7)
        ax.set_ylim(-0.12, 1.02)
    for ax in axes[len(alphabet):]:
        ax.set_visible(False)
    for ax in axes.reshape(rows, cols)[:, 0]:
        ax.set_ylabel("y (x-height 0.5)")
    for ax in axes.reshape(rows, cols)[-1]:
        ax.set_xlabel("x")
    cb = fig.colorbar(ScalarMappable(cmap=cmap), ax=axes.tolist(), shrink=0.8, pad=0.03, ticks=[0, 1])
    cb.ax.set_yticklabels(["first\nsample", "last\nsample"])
    cb.set_label("pen order")
    fig.suptitle(f"Stroke templates of the {len(alphabet)}-letter alphabet: colour = pen order, red ring and number "
                 "= stroke start (pen lands), arrowheads = direction of travel,\nsolid line = baseline, dashed = "
                 "x-height, dotted = advance width", fontsize=11)
    return fig


def pick_render_words(train_words, n=6):
    """n training words spread from shortest to longest, deterministically."""
    ordered = sorted(set(train_words), key=lambda w: (len(w), w))
    idx = np.unique(np.round(np.linspace(0, len(ordered) - 1, min(n, len(ordered)))).astype(int))
    return [ordered[i] for i in idx]


def fig_word_renderings(run):
    cfg = run["config"]
    words = pick_render_words(run["split"]["train_words"])
    rng = np.random.default_rng(cfg["seed"])
    fig = new_figure(13.0, 5.8)
    axes = fig.subplots(2, 3).ravel()
    stroke_cmap = colormaps["tab10"]
    for ax, w in zip(axes, words):
        r = ih.render_word(w, rng, cfg["jitter"], cfg["slant_max"])
        template = ih.render_word(w, np.random.default_rng(0), 0.0, 0.0)  # no jitter, no slant
        stroke_id = np.cumsum(r.pen_up > 0.5) - 1  # (T,)
        draw_ink(ax, template.xy, template.pen_up, ["0.82"] * len(template.xy), lw=5.0, air=False)
        draw_ink(ax, r.xy, r.pen_up, [stroke_cmap(s % 10) for s in stroke_id], lw=2.0, zorder=3)
        starts = np.flatnonzero(r.pen_up > 0.5)
        ax.plot(*r.xy[starts].T, "o", ms=7, mfc="none", mec="black", mew=1.0, zorder=2.5)  # under the ink: i dots show
        ax.set_aspect("equal")
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


# ---------------------------------------------------------------------------
# Figures of the cursive lines
# ---------------------------------------------------------------------------

SLOPPY_TRAITS = ("inertia", "warp_rms", "tremor")  # what makes a synthetic hand hard to read


def sloppiness(writers):
    """(N,) how sloppy each writer is among `writers`, 0 neatest .. 1 sloppiest:
    the mean over SLOPPY_TRAITS of the writer's rank, scaled to 0..1 (pen
    inertia rounds and shrinks letters, warp bends their shapes, tremor roughens
    the ink; ranks make the three comparable whatever their units)."""
    traits = np.array([[getattr(w, t) for t in SLOPPY_TRAITS] for w in writers])  # (N, 3)
    ranks = traits.argsort(axis=0).argsort(axis=0) / max(len(writers) - 1, 1)  # (N, 3)
    return ranks.mean(axis=1)


def six_writer_picks():
    """[(test writer index, sloppiness)] for six test writers from the neatest to
    the sloppiest, evenly spaced in sloppiness order. Each writer is ranked
    among all writers of the lines task (training, validation and test)."""
    writers = [(split, i, w) for split in ih.LINE_WRITERS for i, w in enumerate(ih.line_writers(split))]
    scores = sloppiness([w for _, _, w in writers])
    test = sorted((float(score), i) for score, (split, i, _) in zip(scores, writers) if split == "test")
    chosen = np.unique(np.round(np.linspace(0, len(test) - 1, 6)).astype(int))
    return [(test[j][1], test[j][0]) for j in chosen]


def fig_six_writers(run):
    text = run["six_writers_text"]
    picks = six_writer_picks()
    samples = [ih.render_writer_line(text, "test", i, 0) for i, _ in picks]
    width = max(np.ptp(s.xy[:, 0]) for s in samples)
    height = max(np.ptp(s.xy[:, 1]) for s in samples)
    row = float(np.clip(15.5 * height / width, 1.2, 3.0)) + 0.3  # inches: the ink at equal aspect, plus a title
    fig = new_figure(16.0, row * len(picks) + 0.8)
    axes = fig.subplots(len(picks), 1)
    for ax, (i, score), s in zip(axes, picks, samples):
        w = ih.line_writers("test")[i]
        xy = s.xy - [s.xy[:, 0].min(), 0.0]  # (T, 2) every line starts at x = 0
        draw_ink(ax, xy, s.pen_up, lw=1.9)
        ax.update_datalim([(0.0, xy[:, 1].min()), (width, xy[:, 1].max())])  # one x scale for all six
        ax.autoscale_view()
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_color("0.85")
        ax.set_title(f"test writer {s.writer}: sloppiness {score:.2f} (inertia {w.inertia:.2f} samples, warp "
                     f"{w.warp_rms:.2f}, tremor {w.tremor:.2f});  slant {w.slant:+.2f}, size {w.size:.2f}, width "
                     f"{w.width:.2f}, letter spacing {w.letter_spacing:+.1f}, word spacing {w.word_spacing:.1f}, "
                     f"T = {len(s.xy)} samples", fontsize=10, loc="left")
    fig.suptitle(f"'{text}' written by six of the 40 test writers, neatest to sloppiest (black = pen down, dotted "
                 "= pen moving in the air)\nsloppiness = mean rank of pen inertia, letter warp and tremor among all "
                 f"{sum(ih.LINE_WRITERS.values())} synthetic writers, 0 = neatest, 1 = sloppiest; lengths in font "
                 "units (x-height 9)", fontsize=12)
    return fig


def fig_per_writer_cer(run):
    splits = [s for s in run["task"]["splits"] if any(g["split"] == s for g in run["per_writer"].values())]
    counts = [sum(g["split"] == s for g in run["per_writer"].values()) for s in splits]
    fig = new_figure(max(10.0, 2.0 + 0.2 * sum(counts)), 5.2)
    axes = np.atleast_1d(fig.subplots(1, len(splits), sharey=True, width_ratios=[max(n, 6) for n in counts]))
    top = max(0.05, max(g["cer"] for g in run["per_writer"].values()), *(run["final"][s]["cer"] for s in splits))
    for ax, split in zip(axes, splits):
        colour = SPLIT_COLOURS[run["task"]["splits"].index(split) % len(SPLIT_COLOURS)]
        writers = sorted((g["cer"], name) for name, g in run["per_writer"].items() if g["split"] == split)
        ax.bar(range(len(writers)), [c for c, _ in writers], color=colour, width=0.8, gid=f"bars:{split}")  # per bar
        cer = run["final"][split]["cer"]
        ax.axhline(cer, color="black", lw=1.4, ls="--", gid=f"split-cer:{split}")
        ax.text(0.02, cer, f" {split} CER {cer:.3f}", transform=ax.get_yaxis_transform(), va="bottom",
                fontsize=10)
        ax.set_xticks(range(len(writers)), [name for _, name in writers], rotation=90, fontsize=7,
                      family="monospace")
        ax.set_xlim(-0.7, len(writers) - 0.3)
        ax.set_title(f"{split_name(split)}: {len(writers)} writers", fontsize=11)
        ax.set_xlabel("writer (sorted by CER)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, top * 1.1)
    axes[0].set_ylabel("character error rate (edits / characters)")
    fig.suptitle("Character error rate per writer; dashed = the split's CER over all its characters "
                 "(every writer's lines pooled)", fontsize=12)
    return fig


# ---------------------------------------------------------------------------
# Figures of every task
# ---------------------------------------------------------------------------


def label_ends(ax, ends, min_gap=0.08):
    """Write each curve's final value in the right margin, level with its last
    point and spread so no two labels overlap. ends: (x, y, colour, text) per
    curve. Call after the axis limits are final."""
    to_axes = ax.transData + ax.transAxes.inverted()
    placed = sorted((tuple(to_axes.transform((x, y))), colour, text) for x, y, colour, text in ends)
    last = -min_gap / 2
    for (xf, yf), colour, text in sorted(placed, key=lambda e: e[0][1]):
        label_y = max(yf, last + min_gap)
        last = label_y
        # A plain line and text in axes coordinates (an annotation arrow costs a bezier clip per draw).
        ax.plot([xf, 1.025], [yf, label_y], color=colour, lw=0.6, transform=ax.transAxes, clip_on=False)
        ax.text(1.03, label_y, text, color=colour, fontsize=9, va="center", transform=ax.transAxes)


def plain_numbers():
    """Tick labels like 0.01 and 1 rather than 10^-2 on a log axis (a new formatter per axis)."""
    return FuncFormatter(lambda v, _: f"{v:g}")


def fig_training_curves(run):
    hist, task = run["history"], run["task"]
    fig = new_figure(13.0, 5.0)
    if not hist:
        ax = fig.subplots()
        ax.set_axis_off()
        why = {"untrained": "the model was not trained (--epochs 0): every number is from its random initial "
                            "weights",
               "loaded": "the model was loaded with --load-model and evaluated without training"}
        finals = "\n".join(f"final {split_name(s)}: CER {run['final'][s]['cer']:.3f}, WER {run['final'][s]['wer']:.3f}"
                           for s in task["splits"])
        ax.text(0.5, 0.5, f"No training history in this run.json:\n{why[run['model_source']]}.\n\n{finals}",
                ha="center", va="center", fontsize=13, transform=ax.transAxes)
        fig.suptitle(f"Training curves ({model_name(run['config'])})", fontsize=13)
        return fig
    ep = np.array([e["epoch"] for e in hist])
    colour = {s: SPLIT_COLOURS[i % len(SPLIT_COLOURS)] for i, s in enumerate(task["splits"])}
    ax_loss, ax_err = fig.subplots(1, 2)
    # The synthetic tasks draw new training samples every epoch; IAM-OnDB has one fixed training set.
    train_label = "train (the same lines every epoch)" if run["task"]["name"] == "iam-ondb" else \
        "train (fresh samples each epoch)"
    loss_curves = [("train", train_label, [e["train_loss"] for e in hist], "tab:blue")]
    loss_curves += [(s, f"{split_name(s)}", [e[s]["loss"] for e in hist], colour[s]) for s in task["monitor"]]
    for key, label, ys, c in loss_curves:
        ax_loss.plot(ep, ys, color=c, marker="o", ms=3, label=label, gid=f"loss:{key}")
    losses = [y for _, _, ys, _ in loss_curves for y in ys]
    if min(losses) > 0:
        ax_loss.set_yscale("log")
        ax_loss.yaxis.set_major_formatter(plain_numbers())
        if max(losses) < 10 * min(losses):  # less than a decade: label the minor ticks too
            ax_loss.yaxis.set_minor_formatter(plain_numbers())
        ax_loss.set_ylabel("CTC loss per character (nats, log scale)")
    else:  # a loss of 0 has no place on a log axis
        ax_loss.set_ylim(0.0, max(max(losses), 1e-3) * 1.08)
        ax_loss.set_ylabel("CTC loss per character (nats)")
    ax_loss.set_title("CTC loss")
    err_curves = []
    for s in task["monitor"]:
        for metric, ls in (("cer", "-"), ("wer", "--")):
            ys = [e[s][metric] for e in hist]
            ax_err.plot(ep, ys, ls, color=colour[s], marker="o", ms=3, label=f"{split_name(s)}, {metric.upper()}",
                        gid=f"{metric}:{s}")
            err_curves.append((ys, colour[s], metric.upper()))
    errors = [y for ys, _, _ in err_curves for y in ys]
    if min(errors) > 0 and max(errors) > 30 * min(errors):  # late epochs would hug a linear axis's zero
        ax_err.set_yscale("log")
        ax_err.yaxis.set_major_formatter(plain_numbers())
        ax_err.set_ylabel("error rate (CER: characters, WER: words; log scale)")
    else:
        ax_err.set_ylim(0.0, max(0.05, max(errors)) * 1.08)
        ax_err.set_ylabel("error rate (CER: characters, WER: words)")
    ax_err.set_title("Character (solid) and word (dashed) error rate, greedy decoding")
    for ax in (ax_loss, ax_err):
        ax.set_xlim(ep[0] - 0.3, ep[-1] + 0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="upper right")  # "best" costs a search; the curves fall away from there
    label_ends(ax_loss, [(ep[-1], ys[-1], c, f"{ys[-1]:.3g}") for _, _, ys, c in loss_curves])
    label_ends(ax_err, [(ep[-1], ys[-1], c, f"{name} {ys[-1]:.3f}") for ys, c, name in err_curves])
    fig.suptitle(f"Training: {model_name(run['config'])}, {len(hist)} epoch{'s' if len(hist) != 1 else ''}; "
                 "final values in the right margin", fontsize=13)
    return fig


def fig_ctc_alignment(run, index):
    a, alphabet = run["alignments"][index], run["task"]["alphabet"]
    text, T = a["text"], len(a["xy"])
    K = 1 + len(alphabet)
    width = float(np.clip(6.0 + T / 45, 12.0, 30.0))  # inches: about 2 time steps per millimetre on a long line
    below = a["xy"][:, 1].min() - 0.25  # where the true characters are written under the ink
    extent = np.ptp(a["xy"], axis=0) + [0.0, 0.5]  # (2,) the ink and the row of characters
    heights = [float(np.clip((width - 1.8) * extent[1] / max(extent[0], 1e-9), 1.4, 3.2)) + 0.4,
               0.6 + 0.16 * K, 1.0]  # inches: ink at equal aspect, heat map rows, argmax path
    fig = new_figure(width, sum(heights) + 0.9)
    gs = fig.add_gridspec(3, 1, height_ratios=heights)
    ax_pen = fig.add_subplot(gs[0])
    ax_hm = fig.add_subplot(gs[1])
    ax_path = fig.add_subplot(gs[2], sharex=ax_hm)

    draw_ink(ax_pen, a["xy"], a["pen_up"], char_colours(a["char_of"]), lw=2.2)
    if a["char_of"] is not None:
        for i, c in enumerate(text):  # the true character, boxed under its ink so it is not taken for ink
            pts = a["xy"][a["char_of"] == i]
            if len(pts):
                ax_pen.text(pts[:, 0].mean(), below, shown(c), ha="center", va="center", fontsize=12, in_layout=False,
                            family="monospace", color=CHAR_COLOURS[i % 10],
                            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=CHAR_COLOURS[i % 10]))
        colouring = "coloured by the character each sample draws (the letter below its ink)"
    else:
        colouring = "(which character each sample draws is not known for this data)"
    ax_pen.update_datalim([(a["xy"][:, 0].min(), below - 0.15)])
    ax_pen.autoscale_view()
    ax_pen.set_aspect("equal", adjustable="datalim")
    ax_pen.set_title(f"Pen trajectory ({T} samples), {colouring}; dotted = pen moving in the air", fontsize=11)
    ax_pen.tick_params(labelsize=8)

    im = draw_softmax(ax_hm, a, alphabet)
    spans = ("; coloured outlines = where each true character is written (its samples' time steps)"
             if a["char_of"] is not None else "")
    if a["char_of"] is not None and " " in text:
        spans += f"; a space ({SPACE}) draws no ink, so it has no span"
    ax_hm.set_title(f"Network output P(class | time step), dark = probable{spans}", fontsize=11)
    fig.colorbar(im, ax=ax_hm, pad=0.005, fraction=0.02, label="probability")
    ax_hm.tick_params(labelbottom=False)

    draw_argmax_path(ax_path, a["argmax_path"], alphabet)
    ax_path.set_xlabel("time step (pen sample)")
    ax_path.set_title("Most probable class per time step: each run of one character class is a black bar with "
                      "the character at its first step (repeats merge), grey = blank;\nthe characters read left to "
                      "right are the greedy decode", fontsize=11)
    verdict = "correct" if a["decoded"] == text else f"CER {a['cer']:.2f}"
    who = f", writer {a['writer']}" if a["writer"] else ""
    fig.suptitle(f"CTC alignment, {a['split'].replace('_', '-')} {noun(run)} '{text}'{who}: "
                 f"decoded {quoted(a['decoded'])} ({verdict})", fontsize=13)
    return fig


MAX_ALIGNMENT_CELLS = 4_000_000  # edit-table cells per pair: ih.edit_alignment's pure-Python table, ~1 s


def alignable(ref, hyp):
    """Whether a pair is small enough to align (a 20,000-character decode would need ~12 GB)."""
    return (len(ref) + 1) * (len(hyp) + 1) <= MAX_ALIGNMENT_CELLS


def confusion_counts(pairs, alphabet):
    """Character confusion counts from (reference, hypothesis) string pairs.

    Each pair is aligned with iam_handwriting.edit_alignment. Returns
    (matrix, labels): matrix[i, j] counts reference character labels[i]
    decoded as labels[j]; the last label is EMPTY, so the last column counts
    deletions and the last row insertions. Characters outside `alphabet` get
    labels of their own before EMPTY. Pairs too long to align (`alignable`) are left out.
    """
    aligned = [p for ref, hyp in pairs if alignable(ref, hyp) for p in ih.edit_alignment(ref, hyp)]
    extra = sorted({c for p in aligned for c in p if c is not None and c not in alphabet})
    labels = list(alphabet) + extra + [EMPTY]
    index = {c: i for i, c in enumerate(labels[:-1])}
    empty = len(labels) - 1
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for r, h in aligned:
        matrix[index.get(r, empty), index.get(h, empty)] += 1
    return matrix, labels


def fig_confusion(run):
    splits = run["task"]["splits"]
    alphabet = run["task"]["alphabet"]
    n_guess = len(alphabet) + 1
    panel = max(6.5, 1.5 + 0.27 * n_guess)  # inches per split
    fig = new_figure(panel * len(splits), panel * 0.9 + 0.9)
    axes = np.atleast_1d(fig.subplots(1, len(splits)))
    cmap = colormaps["Blues"].with_extremes(bad="white")  # masked = zero counts
    for ax, split in zip(axes, splits):
        preds = [(p["text"], p["decoded"]) for p in run["predictions"] if p["split"] == split]
        m, labels = confusion_counts(preds, alphabet)
        n = len(labels)
        vmax = max(int(m.max()), 2)
        im = ax.imshow(np.ma.masked_equal(m, 0), cmap=cmap, norm=LogNorm(vmin=1, vmax=vmax))
        im.set_gid(f"confusion:{split}")
        small = 8 if n <= 15 else 7
        errors = []
        for i, j in zip(*np.nonzero(m)):
            bright = np.log(m[i, j]) > 0.6 * np.log(vmax)
            error = i != j or i == n - 1
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=small if m[i, j] < 1000 else small - 2,
                    color="white" if bright else ("firebrick" if error else "black"), in_layout=False)
            if error:  # errors are rare and pale on a count scale: outline them
                errors.append(Rectangle((j - 0.5, i - 0.5), 1, 1))
        ax.add_collection(PatchCollection(errors, facecolors="none", edgecolors="firebrick", linewidths=1.2))
        ax.axhline(n - 1.5, color="0.4", lw=0.8)
        ax.axvline(n - 1.5, color="0.4", lw=0.8)
        names = [shown(c) for c in labels[:-1]]
        ax.set_xticks(range(n), names + [f"{EMPTY}\ndel"], family="monospace", fontsize=small + 1)
        ax.set_yticks(range(n), names + [f"{EMPTY} ins"], family="monospace", fontsize=small + 1)
        ax.set_xlabel("decoded character   (last column: deleted, nothing decoded)")
        ax.set_ylabel("true character   (last row: inserted, not in the text)")
        counted = [(t, d) for t, d in preds if alignable(t, d)]
        n_chars = sum(len(t) for t, _ in counted)
        edits = int(m.sum() - np.trace(m[:-1, :-1]))
        left_out = (f"; {len(preds) - len(counted)} too long to align left out" if len(counted) < len(preds) else "")
        ax.set_title(f"{split_name(split)}: {len(counted)} predictions, {n_chars} true characters{left_out},\n"
                     f"{edits} edits (CER {edits / max(n_chars, 1):.3f})", fontsize=11)
        fig.colorbar(im, ax=ax, shrink=0.7, pad=0.02, fraction=0.04, label="count (log colour scale)")
    space = f", {SPACE} = space" if " " in alphabet else ""
    fig.suptitle("Character confusions over every prediction in run.json (Levenshtein alignment of target "
                 f"and decode);\ndiagonal = correct, red boxes = errors{space}", fontsize=12)
    return fig


# ---------------------------------------------------------------------------
# Figures of the decoding experiments (run.json `decoding`)
# ---------------------------------------------------------------------------


def decoder_curves(ax, rows, value, splits):
    """One line per (decoder, split) through value(row) against row['size'],
    gid 'decoder:split'. Greedy is a wide pale band, as other decoders often
    score the same. Returns the plotted values."""
    decoders = sorted({r["decoder"] for r in rows},
                      key=lambda d: (DECODER_ORDER.index(d) if d in DECODER_ORDER else len(DECODER_ORDER), d))
    colours = {d: colormaps["tab10"](i) for i, d in enumerate(decoders)}
    styles = {s: SPLIT_STYLES[i % len(SPLIT_STYLES)] for i, s in enumerate(splits)}
    ys = []
    for d in decoders:
        for split in splits:
            points = sorted((r["size"], value(r)) for r in rows if r["decoder"] == d and r["split"] == split)
            if not points:
                continue
            ls, marker = styles[split]
            wide = d == "greedy"
            label = d if len(splits) == 1 else f"{d}, {split_name(split).split(' (')[0]}"
            ax.plot(*zip(*points), color=colours[d], ls=ls, marker=marker, ms=9 if wide else 5, lw=6 if wide else 1.8,
                    alpha=0.35 if wide else 1.0, zorder=1 if wide else 2, label=label, gid=f"{d}:{split}")
            ys += [y for _, y in points]
    sizes = sorted({r["size"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    return ys


def fit_to_data(ax, ys, low=None, high=None):
    """y limits around the data with a margin (clipped to [low, high]), so small differences show."""
    lo, hi = min(ys), max(ys)
    pad = max(0.1 * (hi - lo), 0.01)
    ax.set_ylim(max(lo - pad, -np.inf if low is None else low), min(hi + pad, np.inf if high is None else high))


def fig_lexicon_size(run):
    dec = run["decoding"]
    splits = [s for s in run["task"]["splits"] if any(r["split"] == s for r in dec["rows"])]
    fig = new_figure(13.0, 5.0)
    ax_acc, ax_time = fig.subplots(1, 2)
    fit_to_data(ax_acc, decoder_curves(ax_acc, dec["rows"], lambda r: r["word_acc"], splits), high=1.0)
    times = decoder_curves(ax_time, dec["rows"], lambda r: 1e3 * r["seconds_per_seq"], splits)
    for ax in (ax_acc, ax_time):
        ax.set_xlabel("lexicon size (words the decoder may choose from, log scale)")
    ax_acc.set_ylabel("word accuracy (axis fitted to the data)")
    ax_acc.set_title("Word accuracy")
    ax_acc.legend(fontsize=9)
    if min(times) > 0:
        ax_time.set_yscale("log")
    ax_time.set_ylabel(f"decoding time per word (ms{', log scale' if min(times) > 0 else ''})")
    ax_time.set_title("Decoding cost")
    beam = f" (beam width {dec['beam_width']})" if "beam_width" in dec else ""
    fig.suptitle(f"Decoders against lexicon size{beam}; solid = {split_name(splits[0])}"
                 + (f", dashed = {split_name(splits[1])}" if len(splits) > 1 else ""), fontsize=12)
    return fig


def fig_dictionary_size(run):
    dec = run["decoding"]
    splits = [s for s in run["task"]["splits"] if any(r["split"] == s for r in dec["rows"])]
    panels = 3 if "perplexity" in dec else 2
    fig = new_figure(6.0 * panels, 5.0)
    axes = fig.subplots(1, panels, width_ratios=[1.5] + [1.0] * (panels - 1))
    ax_wer, ax_oov = axes[0], axes[1]
    wers = decoder_curves(ax_wer, dec["rows"], lambda r: r["wer"], splits)
    if min(wers) > 0:  # WERs span decades across dictionary sizes: a linear axis flattens the large dictionary
        ax_wer.set_yscale("log")
        ax_wer.yaxis.set_major_formatter(plain_numbers())
        ax_wer.set_ylabel("word error rate (log scale)")
    else:
        fit_to_data(ax_wer, wers, low=0.0)
        ax_wer.set_ylabel("word error rate (axis fitted to the data)")
    ax_wer.set_title(f"WER on {', '.join(split_name(s) for s in splits)} by decoder")
    ax_wer.legend(fontsize=9)
    oov = sorted({(r["size"], r["oov_rate"]) for r in dec["rows"]})
    ax_oov.plot(*zip(*[(s, 100 * o) for s, o in oov]), color="black", marker="o", gid="oov")
    for s, o in oov:
        ax_oov.annotate(f"{100 * o:.1f}%", (s, 100 * o), xytext=(0, 7), textcoords="offset points", ha="center",
                        fontsize=9)
    ax_oov.set_xscale("log")
    ax_oov.set_xticks([s for s, _ in oov], [str(s) for s, _ in oov])
    ax_oov.minorticks_off()
    ax_oov.set_ylim(0, max(1.0, 100 * max(o for _, o in oov)) * 1.2)
    ax_oov.grid(alpha=0.3)
    ax_oov.set_ylabel("test words outside the dictionary (%)")
    ax_oov.set_title("Out-of-vocabulary rate: words no dictionary\ndecoder can output")
    if panels == 3:
        ax_ppl = axes[2]
        for lm in sorted({lm for by_lm in dec["perplexity"].values() for lm in by_lm}):
            pts = sorted((size, by_lm[lm]) for size, by_lm in dec["perplexity"].items() if lm in by_lm)
            ax_ppl.plot(*zip(*pts), marker="o", label=lm, gid=f"perplexity:{lm}")
        ax_ppl.set_xscale("log")
        ax_ppl.set_yscale("log")
        ax_ppl.set_xticks(sorted(dec["perplexity"]), [str(s) for s in sorted(dec["perplexity"])])
        ax_ppl.minorticks_off()
        ax_ppl.grid(alpha=0.3)
        ax_ppl.legend(fontsize=9)
        ax_ppl.set_ylabel("perplexity per word (log scale)")
        ax_ppl.set_title("Language model perplexity on the test text")
    for ax in axes:
        ax.set_xlabel("dictionary size (most frequent words, log scale)")
    fig.suptitle("Dictionary decoding against dictionary size: greedy (no dictionary), dictionary alone, "
                 "dictionary + unigram LM, dictionary + bigram LM", fontsize=12)
    return fig


# ---------------------------------------------------------------------------
# Which figures a run makes
# ---------------------------------------------------------------------------

ALL_TASKS = ih.TASK_NAMES
FIGURES = {  # file name -> (figure function, tasks that draw it, decoding kind it needs or None)
    "alphabet.png": (fig_alphabet, ("words",), None),
    "word_renderings.png": (fig_word_renderings, ("words",), None),
    "six_writers.png": (fig_six_writers, ("lines",), None),
    "training_curves.png": (fig_training_curves, ALL_TASKS, None),
    "ctc_alignment.png": (lambda run: fig_ctc_alignment(run, 0), ALL_TASKS, None),
    "ctc_alignment_long.png": (lambda run: fig_ctc_alignment(run, 1), ALL_TASKS, None),
    "per_writer_cer.png": (fig_per_writer_cer, ("lines", "iam-ondb"), None),
    "confusion_chars.png": (fig_confusion, ALL_TASKS, None),
    "lexicon_size.png": (fig_lexicon_size, ("words",), "lexicon"),
    "dictionary_size.png": (fig_dictionary_size, ("lines", "iam-ondb"), "dictionary"),
}


def why_not(name, run):
    """Why this run does not make figure `name`, or None if it does."""
    _, tasks, kind = FIGURES[name]
    if run["task"]["name"] not in tasks:
        return f"a figure of the {' and '.join(tasks)} task{'s' if len(tasks) > 1 else ''}; this is a " \
               f"{run['task']['name']} run"
    if kind and "decoding" not in run:
        return "this run.json has no decoding block: the decoding experiment was not run"
    return None


def figures(run):
    """[(file name, function making the figure)] for everything this run makes."""
    return [(name, lambda f=f: f(run)) for name, (f, _, _) in FIGURES.items() if why_not(name, run) is None]


def png_bytes(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


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
        paths = {name: os.path.join(args.out, name) for name, _ in figures(run)}
        for path in paths.values():
            ih.output_target(path, "figure")  # a folder or read-only file in the way fails before any drawing
        pngs = {name: png_bytes(make()) for name, make in figures(run)}  # all drawn before any is written
        for name, data in pngs.items():
            ih.write_or_refuse(paths[name], data, "figure")
    except ih.UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(f"wrote {path}")
    for name in FIGURES:
        path = os.path.join(args.out, name)
        if name not in paths and os.path.lexists(path):
            print(f"not updated by this run, left as it was: {path} ({why_not(name, run)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
