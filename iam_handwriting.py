"""Bidirectional LSTM + CTC reading online handwriting, in numpy.

A scaled-down reproduction of Graves, Liwicki, Fernandez, Bertolami, Bunke and
Schmidhuber, "A Novel Connectionist System for Unconstrained Handwriting
Recognition", IEEE TPAMI 31(5), 2009: a bidirectional LSTM with a
connectionist temporal classification (CTC) output layer reads unsegmented pen
trajectories and emits character sequences, with no segmentation step.

Three tasks share one model, one CTC, one set of decoders and one training loop:
- words (the default, the seed task): 47 words over ten printed letters
  "colitnmaeu", drawn by a numpy renderer. Every letter starts with a pen
  lift, so the task is easy; it is kept as a fast, saturated baseline.
- lines: the paper's setting in miniature. Text lines of English words
  (sampled from symspellpy's word and word-pair counts) written in connected
  cursive (Hershey Script Simplex glyphs) by 260 synthetic writers, each with
  their own slant, size, spacing, baseline, letter shapes, pen inertia, speed
  and tremor; training, validation and test writers are disjoint.
- iam-ondb: the real IAM-OnDB, for users who have it (the paper's data; it
  needs a registration at its official site and may not be redistributed),
  with the preprocessing and the 25 online features of Liwicki and Bunke
  (2006) that the paper uses, and early stopping on validation.

What is scaled down: the synthetic data, the network (one BLSTM layer by
default; the real IAM-OnDB's recipe stacks two and trains them on freshly
distorted ink each epoch), the optimiser (Adam on minibatches). Decoding: greedy best path,
prefix beam search, a single-word dictionary decoder, and the paper's token
passing over a dictionary with a word bigram language model (for real English:
punctuation and clitics split off, case variants, spelled out-of-dictionary
tokens; --lm and --dictionary read ARPA files and word lists).

Everything below is hand-written numpy: the LSTM forward pass and
back-propagation through time, the log-space CTC forward-backward, the
decoders, the language model and Adam.

Shapes: T time steps, B batch, D input features, H hidden units per direction,
R directions (1 or 2), K classes (blank + the task's characters), L label
length, S = 2L + 1 extended labels, N prefix-tree nodes, W dictionary words.

Contents. The numbers are those of the rulers below ("# -- name --" lines are
sub-headings inside a section). The model comes first and the data sources
after it, so that a reader who opens the file for the model meets it early;
the data sources are blocks of their own, and section 21 makes each a Task.
  The model and its training, written once for every task
     1. Constants, configuration and tasks: RunConfig (every setting, its flag
        and its valid range), TaskData and Task (the TASKS table is in 21,
        after the data sources it names)
     2. Samples, alphabets and pen paths
     3. Network input
     4. BLSTM
     5. CTC
     6. Decoding and metrics: greedy, CER and WER, prefix beam search, the
        prefix tree and the dictionary decoder, the word language model
     7. Decoding: real English (tokens, case, out-of-dictionary tokens, ARPA
        and word-list files)
     8. Decoding: token passing with a language model
     9. Optimiser (Adam)
    10. Training and evaluation
  The data sources, each a self-contained block
    11. Printed words (the seed task)
    12. Cursive lines: glyphs
    13. Cursive lines: writers
    14. Cursive lines: the pen
    15. Cursive lines: English text
    16. Cursive lines: the synthetic database
    17. IAM-OnDB: reading the database
    18. IAM-OnDB: preprocessing (Liwicki and Bunke 2006)
    19. IAM-OnDB: the 25 online features
    20. IAM-OnDB: writing the format
    21. Tasks: each data source as a Task, and the TASKS table
  Files and the command line
    22. Files: run.json, model files, safe writing
    23. Reading ink: InkML, JSON strokes, pages, --read and --serve
    24. Command line

Usage:
    python iam_handwriting.py --seed 0 --save-json run.json        # words: headline run
    python iam_handwriting.py --quick --save-json run.json         # CI smoke run
    python iam_handwriting.py --task lines --seed 0 --save-json lines.json
    python iam_handwriting.py --task lines --load-model m.npz --decoder lm --dictionary-sizes 1000,5000,20000
    python iam_handwriting.py --task lines --export-iam-ondb DIR   # synthetic lines in the IAM-OnDB format
    python iam_handwriting.py --task iam-ondb --data-dir DIR --decoder lm --save-json iam.json   # the paper's experiment
    python iam_handwriting.py --load-model iam.npz --data-dir DIR --decoder lm --oov chars --dictionary-sizes 5000,20000
    python iam_handwriting.py --read line.inkml page.json --json   # read ink with the shipped IAM-OnDB model
    python iam_handwriting.py --serve                              # pen pad at http://127.0.0.1:8009/
    python iam_handwriting.py --help                               # every flag
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import functools
import http.server
import importlib.resources
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import shutil
import signal
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
import xml.parsers.expat
import zipfile
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple
from xml.sax.saxutils import quoteattr

if __name__ == "__main__":
    # One BLAS thread, set before numpy loads BLAS. Measured: faster here (the
    # matrices are small; two threads add 6% wall and double the CPU time), and
    # float32 matmul results depend on the BLAS thread count, so this keeps a
    # seed's metrics the same on machines with different numbers of cores.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

# ---------------------------------------------------------------------------
# 1. Constants, configuration and tasks
# ---------------------------------------------------------------------------

BLANK = 0  # class 0 is the CTC blank; character c of a task's alphabet is class 1 + alphabet.index(c)
SCHEMA_VERSION = 2  # run.json: 2 added the task, WER and the lines task's keys
TASK_NAMES = ("words", "lines", "iam-ondb")
DECODERS = ("greedy", "beam", "lexicon", "lm")
FEATURE_SETS = ("raw", "graves25")
OOV_MODES = ("none", "chars", "char-bigram", "token")  # how the lm decoder reads out-of-dictionary tokens (see reading_lexicon)
N_ENGLISH_WORDS = 82_680  # words over a-z in symspellpy's counts, less the excluded ones (a test checks it)


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


LM_TASKS = ("lines", "iam-ondb")  # the tasks of English text, which the lm decoder reads


def _setting(default, help, low=None, high=None, above=None, choices=None, flag=None, tasks=None,
             since_schema_1=False, decoding=False):
    """A RunConfig field with its help text and its valid range: one table serves
    the command line, saved model files and --help.

    flag: the command-line flag that sets the field (True: --name-with-dashes;
    None: none; build_parser adds each). tasks: the only tasks whose runs take the flag (None: all).
    since_schema_1: model files of schema 1 lack the field (it takes its
    default). decoding: only the final decoding reads it, so a resumed run, a
    loaded model and --read may change it (DECODING_FIELDS)."""
    return dataclasses.field(default=default, metadata=dict(help=help, low=low, high=high, above=above,
                                                            choices=choices, flag=flag, tasks=tasks,
                                                            since_schema_1=since_schema_1, decoding=decoding))


@dataclass
class RunConfig:
    """Every setting of a run. The defaults are the words task's headline run;
    each task overrides some of them (Task.defaults)."""

    seed: int = _setting(0, "root of every random stream (split, data, init, shuffle, eval)", low=0, high=2**32 - 1,
                         flag=True)
    task: str = _setting("words", "words (printed seed task), lines (cursive text lines), iam-ondb (real data)",
                         choices=TASK_NAMES, flag=True, since_schema_1=True)
    # data: printed words
    word_repeats: int = _setting(6, "words: renderings of each training word per epoch", low=1, high=1000,
                                 flag=True, tasks=("words",))
    eval_repeats: int = _setting(8, "words: fresh renderings of each word for evaluation", low=1, high=1000,
                                 flag=True, tasks=("words",))
    holdout_frac: float = _setting(0.2, "words: share of the 47 words held out for the compositional test", above=0.0,
                                   high=0.9, flag=True, tasks=("words",))
    jitter: float = _setting(0.014, "words: std of per-point Gaussian pen jitter (unit-box units)", low=0.0, high=0.5,
                             flag=True, tasks=("words",))
    slant_max: float = _setting(0.15, "words: per-word shear x += slant * y, slant ~ U(-max, max)", low=0.0, high=2.0,
                                flag=True, tasks=("words",))
    # data: cursive lines
    lines_per_epoch: int = _setting(1200, "fresh training lines rendered per epoch", low=1, high=1_000_000,
                                    flag=True, tasks=("lines",), since_schema_1=True)
    eval_lines_per_writer: int = _setting(10, "lines: validation and test lines per writer", low=1, high=10,
                                          flag=True, tasks=("lines",), since_schema_1=True)
    # data: IAM-OnDB
    data_dir: str = _setting("", "the IAM-OnDB folder (holding lineStrokes/, ascii/ and the split files)",
                             flag=True, tasks=("iam-ondb",), since_schema_1=True)
    features: str = _setting("raw", "network input: raw (dx, dy, pen_up) or graves25 (the paper's 25 features)",
                             choices=FEATURE_SETS, flag=True, tasks=("iam-ondb",), since_schema_1=True)
    # No flag: the model's output classes follow from the data, so a given alphabet could only contradict it.
    alphabet: str = _setting("", "iam-ondb: the characters the model reads, set from the training transcriptions",
                             since_schema_1=True)
    augment: float = _setting(0.0, "iam-ondb: strength of a fresh random distortion of every training line each "
                                   "epoch (1: shear up to 0.15, x and y scale and resampling step by up to e^0.1, "
                                   "rotation up to 0.02 rad, elastic x warp up to 0.1 corpus heights); 0: none",
                              low=0.0, high=2.0, flag=True, tasks=("iam-ondb",), since_schema_1=True)
    # network input
    input_gain: float = _setting(12.0, "one sample spacing of pen movement enters the network as this", above=0.0,
                                 high=1e4, flag=True)
    # model
    hidden: int = _setting(64, "LSTM cells per direction", low=1, high=1024, flag=True)
    layers: int = _setting(1, "stacked (B)LSTM layers", low=1, high=8, flag=True)
    # No flag of its own: the default is on, so the command line turns it off with the switch --unidirectional.
    bidirectional: bool = _setting(True, "False: the forward-only baseline")
    dtype: str = _setting("float32", "training precision (gradient checks use float64)",
                          choices=("float32", "float64"), flag=True)
    # optimisation
    epochs: int = _setting(10, "training epochs", low=0, high=100_000, flag=True)
    batch_size: int = _setting(4, "sequences per Adam step", low=1, high=1024, flag=True)
    lr: float = _setting(1e-2, "Adam step size at the start", above=0.0, high=1e3, flag=True)
    lr_final: float = _setting(0.1, "the step size decays linearly to lr * lr_final by the last step", low=0.0,
                               high=1.0, flag=True)
    grad_clip: float = _setting(5.0, "global-norm gradient clip", above=0.0, high=1e6, flag=True)
    init_from: str = _setting("", "start training from this saved model's LSTM weights instead of random ones "
                                  "(pretraining, e.g. on synthetic lines); the output weights of the blank and "
                                  "of the characters both alphabets share are kept, the others drawn afresh",
                              flag=True, since_schema_1=True)
    weight_noise: float = _setting(0.0, "std of Gaussian noise added to every weight for each step's gradient "
                                        "(Graves 2011; the update applies to the noise-free weights)", low=0.0, high=1.0,
                                        flag=True, since_schema_1=True)
    dropout: float = _setting(0.0, "share of each BLSTM layer's outputs zeroed for each training step, before the "
                                   "next layer and the output layer (Pham et al. 2014; the rest are scaled by "
                                   "1 / (1 - dropout), so evaluation uses them all as they are)", low=0.0, high=0.9,
                              flag=True, since_schema_1=True)
    workers: int = _setting(1, "processes sharing each training batch (gradients summed)", low=1, high=16,
                            flag=True, since_schema_1=True)
    patience: int = _setting(0, "early stopping: keep the best validation epoch's weights and stop after this "
                                "many epochs without a better one (0: train every epoch, keep the last)",
                             low=0, high=100_000, flag=True, since_schema_1=True)
    # decoding
    decoder: str = _setting("greedy", "how the final evaluation decodes", choices=DECODERS, flag=True, decoding=True)
    beam_width: int = _setting(16, "prefixes kept by the beam decoder", low=1, high=4096, flag=True, decoding=True)
    dictionary_size: int = _setting(20_000, "words in the lm decoder's dictionary (the most frequent)", low=1,
                                    high=N_ENGLISH_WORDS, flag=True, tasks=LM_TASKS, since_schema_1=True, decoding=True)
    lm_weight: float = _setting(1.0, "weight of the language model's log-probability in the lm decoder",
                                low=0.0, high=100.0, flag=True, tasks=LM_TASKS, since_schema_1=True, decoding=True)
    word_penalty: float = _setting(0.0, "added to the lm decoder's score per word (negative: fewer words)",
                                   low=-100.0, high=100.0,
                                   flag=True, tasks=LM_TASKS, since_schema_1=True, decoding=True)
    lm_beam: int = _setting(64, "tokens (history, tree node) kept per time step by the lm decoder", low=1,
                            high=1_000_000, flag=True, tasks=LM_TASKS, since_schema_1=True, decoding=True)
    oov: str = _setting("none", "lm decoder: out-of-dictionary tokens are not read (none), or spelled with a cost "
                                "per character (chars), a character bigram of the training words (char-bigram) or "
                                "per token (token)", choices=OOV_MODES,
                                flag=True, tasks=LM_TASKS, since_schema_1=True, decoding=True)
    oov_penalty: float = _setting(0.0, "lm decoder: added per spelled out-of-dictionary token", low=-100.0,
                                  high=100.0, flag=True, tasks=LM_TASKS, since_schema_1=True, decoding=True)
    lm_tuning: int = _setting(0, "lm decoder: choose lm_weight, word_penalty and oov_penalty on about this many "
                                 "validation lines (every k-th) before the final evaluation; 0: use them as given",
                              low=0, high=100_000, flag=True, tasks=LM_TASKS, since_schema_1=True, decoding=True)
    lm_file: str = _setting("", "lm decoder: an ARPA n-gram file (unigrams and bigrams are used); not given: built in",
                            flag="--lm", tasks=LM_TASKS, since_schema_1=True, decoding=True)
    dictionary_file: str = _setting("", "lm decoder: a word list, one word per line, most frequent first; "
                                        "not given: built in",
                                        flag="--dictionary", tasks=LM_TASKS, since_schema_1=True, decoding=True)


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def flag_name(name):
    """The command-line flag of `name`: a RunConfig field's own (--lm for lm_file; None: it has
    none), else the argparse spelling of another option (dictionary_sizes: --dictionary-sizes)."""
    flag = CONFIG_FIELDS[name].metadata["flag"] if name in CONFIG_FIELDS else True
    return "--" + name.replace("_", "-") if flag is True else flag


# How a value of each field type is read from text, and what a message calls the type.
TEXT_VALUES = {"int": (int, "a whole number"), "float": (float, "a number"),
               "bool": ({"True": True, "False": False}.__getitem__, "True or False"), "str": (str, "text")}


def value_from_text(kind, text):
    """The value of field type `kind` that `text` spells; ValueError 'expected a whole number, got ...' if none."""
    read, wanted = TEXT_VALUES[kind]
    try:
        return read(text)
    except (KeyError, ValueError):
        raise ValueError(f"expected {wanted}, got {text!r}") from None


def range_error(value, low=None, high=None, above=None):
    """Why `value` is outside low..high (above: an exclusive lower bound), or None if it is inside."""
    if (low is not None and value < low) or (above is not None and value <= above) or \
            (high is not None and value > high):
        lo = f"{low}" if low is not None else f"above {above}" if above is not None else ""
        return f"must lie in {lo}..{high}, got {value!r}" if high is not None else f"must be at least {lo}, got {value!r}"
    return None


def setting_error(name, value):
    """Why `value` is not valid for RunConfig field `name`, or None if it is."""
    meta, kind = CONFIG_FIELDS[name].metadata, CONFIG_FIELDS[name].type
    expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[kind]
    if not isinstance(value, expected) or (kind != "bool" and isinstance(value, bool)):
        return f"must be {TEXT_VALUES[kind][1] if kind in ('int', 'float') else kind}, got {value!r}"
    if kind == "float" and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if meta["choices"] is not None and value not in meta["choices"]:
        return f"must be one of {', '.join(meta['choices'])}; got {value!r}"
    return range_error(value, meta["low"], meta["high"], meta["above"])


def check_config(cfg):
    """cfg itself if every field has a usable value, else ValueError naming the first that has not."""
    for name in CONFIG_FIELDS:
        problem = setting_error(name, getattr(cfg, name))
        if problem:
            raise ValueError(f"{name} {problem}")
    return cfg


# -- Tasks --
# A task is a small value: its alphabet, how it makes its data, its splits and
# its default settings. The model, CTC, decoders, training loop, run.json and
# the figures are written once and take a task.


@dataclass
class TaskData:
    """One run's data for a task."""

    alphabet: str  # class 1 + i is alphabet[i]; 0 is the blank
    eval_sets: dict  # split name -> [Sample], in report order
    training_samples: Callable  # (rng, parallel_map) -> [Sample] for one epoch
    epoch_size: int  # training samples per epoch
    input_shift: np.ndarray  # (D,) the network reads (traj - shift) * scale
    input_scale: np.ndarray  # (D,)
    input_squash: float  # > 0: inputs pass through squash * tanh(x / squash) (pad_batch); 0: as they are
    alignment_picks: list  # [(split, index)]: samples whose CTC alignment run.json keeps (short, long)
    info: dict  # run.json "split": what the splits hold
    training_held: bool = False  # True: training_samples returns samples already in memory (not drawn per epoch)
    lm_texts: dict = field(default_factory=dict)  # {"train", "validation": transcriptions} for the real-English LM


@dataclass(frozen=True)
class Task:
    """One task; the TASKS table (section 21) builds each with keywords."""

    name: str
    alphabet: str | None  # class 1 + i is alphabet[i]; None: read from the data (cfg.alphabet)
    monitor: tuple  # evaluation splits scored after every epoch (all are scored at the end)
    group_by: str  # run.json keeps per-group error counts: "word" (per_word) or "writer" (per_writer)
    decoders: tuple  # decoders the final evaluation may use
    flags: tuple  # command-line options that set no RunConfig field and that only this task takes
    defaults: dict  # RunConfig overrides: the task's headline run
    quick: dict  # further overrides for --quick
    make_data: Callable  # (cfg, streams, parallel_map, log) -> TaskData
    shown: tuple = ("cer", "wer")  # metrics the epoch log lines show
    bucket: int = 16  # training batches of similar length, drawn from groups of this many (0: any lengths)
    lexicon: tuple = ()  # the "lexicon" decoder's dictionary, unless it is given one (only a task with one offers it)

    @property
    def options(self):
        """Command-line options that only this task takes: RunConfig fields whose `tasks` name it, then its flags."""
        return tuple(n for n, f in CONFIG_FIELDS.items() if self.name in (f.metadata["tasks"] or ())) + self.flags


def n_classes(cfg):
    """K: the blank plus the task's characters."""
    return 1 + len(cfg.alphabet or TASKS[cfg.task].alphabet)


# ---------------------------------------------------------------------------
# 2. Samples, alphabets and pen paths
# ---------------------------------------------------------------------------
# A pen path is points (N, 2) with stroke ids (N,): one stroke is one pen-down
# segment, and the ids are non-decreasing in writing order. Every data source
# (printed glyphs, cursive lines, IAM-OnDB files) ends up as one.


@dataclass
class Sample:
    """One handwritten sequence and its transcription."""

    text: str
    traj: np.ndarray  # (T, D) input features before normalisation (float32 for IAM-OnDB); raw: (dx, dy, pen_up)
    labels: list  # class ids of `text`
    xy: np.ndarray  # (T, 2) pen positions, y up (for figures and export)
    pen_up: np.ndarray  # (T,) 1.0 on the first sample of every stroke
    char_of: np.ndarray | None  # (T,) index into `text` of the character each sample draws (None if unknown)
    writer: str | None = None


def encode(text, alphabet):
    """Class ids of `text`; ValueError naming any character outside `alphabet`."""
    bad = sorted({c for c in text if c not in alphabet})
    if bad:
        raise ValueError(f"characters {''.join(bad)!r} in {text!r} are not in the alphabet {alphabet!r}")
    return [1 + alphabet.index(c) for c in text]


def decode_labels(labels, alphabet):
    """Inverse of `encode` for class ids 1..K-1."""
    return "".join(alphabet[k - 1] for k in labels)


def stroke_starts(stroke):
    """(N,) bool, True on the first point of every stroke: wherever the id changes, and on the
    first point whatever its id (a prepended -1 would miss a first id of -1)."""
    stroke = np.asarray(stroke)
    starts = np.ones(len(stroke), dtype=bool)
    starts[1:] = stroke[1:] != stroke[:-1]
    return starts


def ragged_arange(counts):
    """(sum counts,) 0, 1, ..., counts[i] - 1 for each i in turn: every item's place within
    its run, for runs of counts (S,) items laid end to end."""
    counts = np.asarray(counts)
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def fill_padded(out, rows, lengths):
    """out (T, B, ...) with rows (sum lengths, ...), sequence after sequence, written
    left-aligned into its columns; the rest of out is kept (the padding)."""
    out[ragged_arange(lengths), np.repeat(np.arange(len(lengths)), lengths)] = rows
    return out


def ink_length(points, stroke):
    """(N,) distance along the ink from the start of each point's stroke."""
    step = np.linalg.norm(np.diff(points, axis=0), axis=1)  # (N-1,)
    total = np.concatenate([[0.0], np.cumsum(step)])
    return total - total[np.flatnonzero(stroke_starts(stroke))][np.cumsum(stroke_starts(stroke)) - 1]


def resample_strokes(values, stroke, key, step):
    """Sample every stroke at evenly spaced values of `key`, both ends included.

    values (N, C) quantities along a pen path, stroke (N,) its stroke ids, key
    (N,) non-decreasing within each stroke (distance along the ink, or time).
    A stroke whose key spans L gets n = max(2, round(L / step) + 1) points at
    key = 0, L/(n-1), ..., L from its start. Returns the new values (M, C),
    their stroke ids (M,) and each new point's fractional index into the old
    points (M,), for carrying other per-point quantities along.
    """
    starts = stroke_starts(stroke)
    first = np.flatnonzero(starts)  # (S,)
    span, n = resampled_counts(stroke, key, step)
    new_stroke = np.repeat(np.arange(len(first)), n)
    k = ragged_arange(n)
    pos = k * np.repeat(span / (n - 1), n)
    pos[np.cumsum(n) - 1] = span  # exactly the stroke's end, as np.linspace does
    # The strokes laid end to end on one axis, a gap apart, so one np.interp serves them all.
    offset = np.cumsum(np.append(0.0, span[:-1] + 1.0))  # (S,)
    stroke_index = np.cumsum(starts) - 1  # (N,)
    axis = key - key[first][stroke_index] + offset[stroke_index]
    query = pos + offset[new_stroke]
    new_values = np.column_stack([np.interp(query, axis, v) for v in np.asarray(values, float).T])
    return new_values, new_stroke, np.interp(query, axis, np.arange(len(axis), dtype=float))


def resampled_counts(stroke, key, step):
    """(span (S,), n (S,)): the key span of each stroke and the points resample_strokes gives it,
    so that a caller can bound the size of a resampling before doing it."""
    first = np.flatnonzero(stroke_starts(stroke))  # (S,)
    last = np.append(first[1:], len(stroke)) - 1
    span = key[last] - key[first]
    return span, np.maximum(2, np.round(span / step).astype(np.int64) + 1)


def pen_trajectory(xy, stroke):
    """(T, 3) network input (dx, dy, pen_up): dx, dy of the first sample are 0,
    pen_up is 1 on the first sample of every stroke."""
    dxy = np.diff(xy, axis=0, prepend=xy[:1])
    return np.column_stack([dxy, stroke_starts(stroke).astype(float)])


# ---------------------------------------------------------------------------
# 3. Network input
# ---------------------------------------------------------------------------


def raw_input_scale(cfg, spacing):
    """(3,) scale of raw input (dx, dy, pen_up): a pen step of `spacing` (the data's sample
    spacing) enters the network as cfg.input_gain; pen_up stays 0 or 1."""
    return np.array([cfg.input_gain / spacing, cfg.input_gain / spacing, 1.0])


def pad_batch(samples, shift, scale, dtype=np.float64, squash=0.0):
    """Stack trajectories into zero-padded network inputs x = (traj - shift) * scale,
    then, if squash > 0, x = squash * tanh(x / squash).

    The squash leaves ordinary pen steps almost as they are and bounds the
    jumps between strokes, which in a text line are tens of sample spacings
    long. Returns X (T, B, D) and lengths (B,); sequences are left-aligned.
    """
    lengths = np.array([len(s.traj) for s in samples])
    T, B, D = int(lengths.max()), len(samples), samples[0].traj.shape[1]
    x = (np.concatenate([s.traj for s in samples]) - shift) * scale
    X = fill_padded(np.zeros((T, B, D), dtype=dtype), squash * np.tanh(x / squash) if squash else x, lengths)
    return X, lengths


# ---------------------------------------------------------------------------
# 4. BLSTM
# ---------------------------------------------------------------------------
# Parameters are a flat dict. Layer l has, for R directions stacked on axis 0,
#   lstm{l}_Wx (R, D_l, 4H), lstm{l}_Wh (R, H, 4H), lstm{l}_b (R, 4H),
# with gate blocks ordered [i, f, g, o]; the output layer is out_W (R*H, K),
# out_b (K,). Both directions run through the same LSTM code at once: the
# backward direction simply reads each sequence reversed in time.
#
#   i, f, o = sigmoid(.),  g = tanh(.)   of  x_t Wx + h_{t-1} Wh + b
#   c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)
#
# All four gate nonlinearities are one tanh: sigmoid(z) = 0.5 tanh(z / 2) + 0.5.


def init_params(rng, hidden=64, layers=1, bidirectional=True, in_dim=None, n_classes=None):
    """Uniform(+-1/sqrt(H)) weights, zero biases except the forget gate at 1.0.
    in_dim and n_classes default to the words task's (IN_DIM, N_CLASSES): the tests rely on
    that; the module always passes them."""
    in_dim = IN_DIM if in_dim is None else in_dim
    n_classes = N_CLASSES if n_classes is None else n_classes
    R, H = (2 if bidirectional else 1), hidden
    scale = 1.0 / np.sqrt(H)
    params = {}
    for layer in range(layers):
        d_in = in_dim if layer == 0 else R * H
        params[f"lstm{layer}_Wx"] = rng.uniform(-scale, scale, (R, d_in, 4 * H))
        params[f"lstm{layer}_Wh"] = rng.uniform(-scale, scale, (R, H, 4 * H))
        bias = np.zeros((R, 4 * H))
        bias[:, H:2 * H] = 1.0  # forget gate open: remember by default early on
        params[f"lstm{layer}_b"] = bias
    out_scale = 1.0 / np.sqrt(R * H)
    params["out_W"] = rng.uniform(-out_scale, out_scale, (R * H, n_classes))
    params["out_b"] = np.zeros(n_classes)
    return params


def transfer_params(params, alphabet, source, source_alphabet):
    """params (a fresh init) with the LSTM weights of `source`, a params dict of the
    same network, and the output weights (columns of out_W, entries of out_b) of the
    blank and of every character of `alphabet` that `source_alphabet` also has.
    The other output columns keep their fresh values."""
    moved = {k: (source[k] if k.startswith("lstm") else v).astype(v.dtype) for k, v in params.items()}
    shared = [(1 + i, 1 + source_alphabet.index(c)) for i, c in enumerate(alphabet) if c in source_alphabet]
    to, of = np.array([0] + [t for t, _ in shared]), np.array([0] + [f for _, f in shared])
    moved["out_W"][:, to] = source["out_W"][:, of]
    moved["out_b"][to] = source["out_b"][of]
    return moved


def model_shape(params):
    """(layers, directions, hidden) read off a params dict."""
    layers = sum(1 for k in params if k.endswith("_Wh"))
    R, H, _ = params["lstm0_Wh"].shape
    return layers, R, H


def _gate_scales(H, dtype):
    """scale, shift (4H,) with act = tanh(scale * z) * scale + shift for gates [i, f, g, o].

    scale is 1/2 for the sigmoid gates and 1 for g, so d act / d z =
    scale^2 * (1 - tanh^2): the constant scale^2 is applied to the weights,
    not to every time step.
    """
    half, one = np.full(H, 0.5), np.ones(H)
    scale = np.concatenate([half, half, one, half])
    shift = np.concatenate([half, half, 0 * one, half])
    return scale.astype(dtype), shift.astype(dtype)


def reverse_time_index(lengths, T):
    """(T, B) index that reverses each sequence within its own length.

    Padding stays in place, so reversed sequences are still left-aligned and
    padded at the end. Applying the gather twice is the identity.
    """
    t = np.arange(T)[:, None]
    return np.where(t < lengths, lengths - 1 - t, t)


def lstm_forward(Wx, Wh, b, X):
    """Run R independent LSTMs over left-aligned, end-padded inputs.

    Wx (R, D, 4H), Wh (R, H, 4H), b (R, 4H), X (R, T, B, D).
    Returns hidden states Hs (R, T, B, H) and the cache for lstm_backward.
    Padding needs no mask: it only ever follows a sequence's last step.
    """
    R, T, B, D = X.shape
    H = Wh.shape[1]
    scale, shift = _gate_scales(H, X.dtype)
    # One matmul projects every step's input; U then holds tanh(scale * z).
    U = np.matmul(X.reshape(R, T * B, D), Wx * scale).reshape(R, T, B, 4 * H)
    U += (b * scale)[:, None, None, :]
    Wh_scaled = Wh * scale
    A = np.empty((R, T, B, 4 * H), X.dtype)  # gate activations [i, f, g, o]
    C = np.empty((R, T, B, H), X.dtype)  # cell states
    TC = np.empty((R, T, B, H), X.dtype)  # tanh(c)
    Hs = np.empty((R, T, B, H), X.dtype)
    recurrent = np.empty((R, B, 4 * H), X.dtype)
    h = np.zeros((R, B, H), X.dtype)
    c = np.zeros((R, B, H), X.dtype)
    for t in range(T):
        u, a = U[:, t], A[:, t]
        np.matmul(h, Wh_scaled, out=recurrent)
        u += recurrent
        np.tanh(u, out=u)
        np.multiply(u, scale, out=a)
        a += shift
        np.multiply(a[..., H:2 * H], c, out=C[:, t])  # f * c_{t-1}
        C[:, t] += a[..., :H] * a[..., 2 * H:3 * H]  # + i * g
        np.tanh(C[:, t], out=TC[:, t])
        np.multiply(a[..., 3 * H:], TC[:, t], out=Hs[:, t])  # o * tanh(c)
        h, c = Hs[:, t], C[:, t]
    return Hs, (X, U, A, C, TC, Hs)


def lstm_backward(Wx, Wh, cache, dHs):
    """Back-propagation through time for lstm_forward.

    dHs (R, T, B, H) is dLoss/dh_t from above. Returns dX (R, T, B, D) and
    (dWx, dWh, db) with the shapes of (Wx, Wh, b).
    """
    X, U, A, C, TC, Hs = cache
    R, T, B, H = Hs.shape
    D = X.shape[-1]
    scale, _ = _gate_scales(H, A.dtype)
    k = scale * scale  # d act / d z = k * (1 - u^2); k is applied to the weights
    WhT_k = (Wh * k).transpose(0, 2, 1).copy()  # (R, 4H, H), contiguous for BLAS
    # The time loop pays for each of its numpy calls T times, so every factor that does not depend
    # on the recursion is taken out of it and computed for all steps at once: dZ (dLoss / dz over
    # k, (R, T, B, 4H)) starts as d act / d z times what multiplies each gate in the loss,
    # [i, f, g, o] -> [g, c_{t-1}, i, tanh(c_t)]; the loop then only scales it by dc_t (for i, f,
    # g) or dh_t (for o). P = o (1 - tanh(c)^2) carries dh_t into dc_t.
    dZ = np.multiply(U, U)
    np.subtract(1.0, dZ, out=dZ)
    dZ[..., :H] *= A[..., 2 * H:3 * H]
    dZ[:, 1:, :, H:2 * H] *= C[:, :-1]
    dZ[:, 0, :, H:2 * H] = 0.0  # c_{-1} = 0
    dZ[..., 2 * H:3 * H] *= A[..., :H]
    dZ[..., 3 * H:] *= TC
    P = np.multiply(TC, TC)
    np.subtract(1.0, P, out=P)
    P *= A[..., 3 * H:]
    dZ_gates = dZ.reshape(R, T, B, 4, H)
    forget = A[..., H:2 * H]
    dh_next = np.zeros((R, B, H), A.dtype)
    dc_next = np.zeros((R, B, H), A.dtype)
    for t in reversed(range(T)):
        dh = dHs[:, t] + dh_next
        # dc_t = dh_t * o * (1 - tanh(c_t)^2) + dc_{t+1} * f_{t+1}
        dc = dh * P[:, t]
        dc += dc_next
        dZ_gates[:, t, :, :3] *= dc[:, :, None, :]
        dZ_gates[:, t, :, 3] *= dh
        np.matmul(dZ[:, t], WhT_k, out=dh_next)
        np.multiply(dc, forget[:, t], out=dc_next)
    # Weight gradients: one matmul over all time steps each (h_{-1} = 0).
    dZ_flat = dZ.reshape(R, T * B, 4 * H)
    dWx = (X.reshape(R, T * B, D).transpose(0, 2, 1) @ dZ_flat) * k
    dWh = (Hs[:, :-1].reshape(R, (T - 1) * B, H).transpose(0, 2, 1)
           @ dZ[:, 1:].reshape(R, (T - 1) * B, 4 * H)) * k
    db = dZ_flat.sum(axis=1) * k
    dX = (dZ_flat @ (Wx * k).transpose(0, 2, 1)).reshape(R, T, B, D)
    return dX, (dWx, dWh, db)


def forward(params, X, lengths, keep=None, cache=True):
    """BLSTM -> linear -> log-softmax.

    X (T, B, D), lengths (B,). keep: dropout, None in evaluation; else
    (layers, T, B, R*H) factors (0 or 1 / (1 - dropout)) multiplying each
    layer's outputs before the next layer or the output layer reads them.
    Returns log_probs (T, B, K) and a cache for `backward` (None with
    cache=False: evaluation, which then holds one layer's activations at a
    time instead of every layer's). Rows beyond a sequence's length are
    finite but meaningless.
    """
    layers, R, H = model_shape(params)
    dtype = params["out_W"].dtype
    T, B, _ = X.shape
    lengths = np.asarray(lengths)
    rev = reverse_time_index(lengths, T)  # (T, B)
    cols = np.arange(B)
    inp = np.asarray(X, dtype)
    layer_caches = []
    for layer in range(layers):
        # Direction 1 reads every sequence backwards from its own last sample.
        X_dirs = np.stack([inp, inp[rev, cols]] if R == 2 else [inp])  # (R, T, B, D)
        Hs, lc = lstm_forward(params[f"lstm{layer}_Wx"], params[f"lstm{layer}_Wh"],
                              params[f"lstm{layer}_b"], X_dirs)
        outs = [Hs[0], Hs[1][rev, cols]] if R == 2 else [Hs[0]]  # back to forward time
        if cache:
            layer_caches.append((inp, lc))
        del X_dirs, Hs, lc  # without a cache, nothing of this layer but its outputs outlives it
        inp = np.concatenate(outs, axis=-1)  # (T, B, R*H)
        if keep is not None:
            inp *= keep[layer]
    logits = inp @ params["out_W"] + params["out_b"]  # (T, B, K)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    if not cache:
        return log_probs, None
    mask = np.arange(T)[:, None] < lengths  # (T, B)
    return log_probs, (layer_caches, inp, rev, mask, keep)


def backward(params, cache, grad_logits):
    """Gradients of the loss for every parameter, given dLoss/dlogits (T, B, K).

    Steps beyond each sequence's length are ignored.
    """
    layer_caches, top, rev, mask, keep = cache
    layers, R, H = model_shape(params)
    T, B, K = grad_logits.shape
    cols = np.arange(B)
    dlogits = (grad_logits * mask[..., None]).astype(top.dtype)
    grads = {
        "out_W": top.reshape(T * B, -1).T @ dlogits.reshape(T * B, K),
        "out_b": dlogits.sum(axis=(0, 1)),
    }
    dinp = dlogits @ params["out_W"].T  # (T, B, R*H)
    for layer in reversed(range(layers)):
        inp, lc = layer_caches[layer]
        if keep is not None:
            dinp = dinp * keep[layer]
        dHs = np.stack([dinp[..., :H], dinp[rev, cols, H:]] if R == 2 else [dinp])  # (R, T, B, H)
        dX, (dWx, dWh, db) = lstm_backward(params[f"lstm{layer}_Wx"], params[f"lstm{layer}_Wh"], lc, dHs)
        grads[f"lstm{layer}_Wx"], grads[f"lstm{layer}_Wh"], grads[f"lstm{layer}_b"] = dWx, dWh, db
        dinp = dX[0] + dX[1][rev, cols] if R == 2 else dX[0]
    return grads


# ---------------------------------------------------------------------------
# 5. CTC
# ---------------------------------------------------------------------------
# Graves, Fernandez, Gomez, Schmidhuber (2006). The extended label sequence
# l' puts a blank around every label: S = 2L + 1 states. alpha[t, s] is the
# log-probability of all alignment prefixes of length t + 1 ending in state s;
# the backward variables are the same recursion run on the time- and
# label-reversed problem, so one function computes both.


def extend_targets(targets):
    """Pad a list of B label sequences into extended labels.

    Returns ext (B, S) class ids (blank at even s), label lengths L (B,) and
    the skip mask (B, S): s may be entered from s - 2 (a label that differs
    from the label two states back).
    """
    L = np.array([len(y) for y in targets], dtype=int)
    B, L_max = len(targets), int(L.max(initial=0))
    ext = np.zeros((B, 2 * L_max + 1), dtype=int)
    if L.sum():
        flat = np.concatenate([np.asarray(y, dtype=int) for y in targets])
        rows = np.repeat(np.arange(B), L)
        pos = ragged_arange(L)
        ext[rows, 2 * pos + 1] = flat
    return ext, L, _skip_mask(ext)


def _skip_mask(ext):
    skip = np.zeros(ext.shape, dtype=bool)
    skip[:, 2:] = (ext[:, 2:] != BLANK) & (ext[:, 2:] != ext[:, :-2])
    return skip


def ctc_alpha(log_emit, skip):
    """Forward variables in log space.

    log_emit (T, B, S): log y_t(l'_s), -inf for states past a label's end.
    skip (B, S). Returns alpha (T, B, S).

    Each step sums three predecessors in log space as m + log(sum exp(x - m))
    with m their elementwise maximum: exact like np.logaddexp, but about twice
    as fast at line scale, because exp and log are vectorised and logaddexp is not.
    """
    T, B, S = log_emit.shape
    # Two columns of -inf on the left make the s-1 and s-2 predecessors views.
    alpha = np.full((T, B, S + 2), -np.inf)
    alpha[0, :, 2:4] = log_emit[0, :, :2]  # start in the first blank or the first label
    skip_penalty = np.where(skip, 0.0, -np.inf)
    jump, top, total, term = (np.empty((B, S)) for _ in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        for t in range(1, T):
            prev = alpha[t - 1]
            # stay in s, or advance from s - 1 (blank <-> label), or jump over a
            # blank from s - 2 when the two labels differ
            stay, advance = prev[:, 2:], prev[:, 1:-1]
            np.add(prev[:, :-2], skip_penalty, out=jump)
            np.maximum(stay, advance, out=top)
            np.maximum(top, jump, out=top)
            np.maximum(top, -1e300, out=top)  # where no path reaches s, any finite shift gives exp(-inf) = 0
            np.exp(np.subtract(stay, top, out=total), out=total)
            total += np.exp(np.subtract(advance, top, out=term), out=term)
            total += np.exp(np.subtract(jump, top, out=term), out=term)
            out = alpha[t, :, 2:]
            np.log(total, out=out)
            out += top
            out += log_emit[t]
    return alpha[:, :, 2:]


def _ctc_problem(log_probs, input_lengths, targets):
    """Validate the inputs and gather each target's emission log-probabilities.

    Returns lp (T, B, K) float64, lengths (B,), ext (B, S), n_states (B,),
    log_emit (T, B, S) with -inf past each target's extended length, skip (B, S).
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    T, B, K = lp.shape
    lengths = np.asarray(input_lengths, dtype=int)
    if lengths.shape != (B,) or len(targets) != B:
        raise ValueError(f"need {B} input lengths and {B} targets, got {lengths.shape} and {len(targets)}")
    if B and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(f"input lengths must lie in 1..{T}, got {lengths.min()}..{lengths.max()}")
    ext, L, skip = extend_targets(targets)
    if L.sum() and (ext.max() >= K or np.concatenate([np.asarray(y) for y in targets]).min() < 1):
        raise ValueError(f"target labels must lie in 1..{K - 1}")
    n_states = 2 * L + 1
    state_ok = np.arange(ext.shape[1]) < n_states[:, None]  # (B, S)
    log_emit = np.where(state_ok, lp[:, np.arange(B)[:, None], ext], -np.inf)  # (T, B, S)
    return lp, lengths, ext, n_states, log_emit, skip


def _final_log_p(alpha, lengths, n_states):
    """log p(l|x): paths end in the last label or the final blank at t = T_b - 1."""
    cols = np.arange(len(lengths))
    last = alpha[lengths - 1, cols]  # (B, S)
    before_last = np.where(n_states > 1, last[cols, np.maximum(n_states - 2, 0)], -np.inf)
    return np.logaddexp(last[cols, n_states - 1], before_last)


def ctc_log_likelihood(log_probs, input_lengths, targets):
    """log p(target | input) (B,) by the forward recursion alone (no gradient)."""
    _, lengths, _, n_states, log_emit, skip = _ctc_problem(log_probs, input_lengths, targets)
    return _final_log_p(ctc_alpha(log_emit, skip), lengths, n_states)


def ctc_loss(log_probs, input_lengths, targets):
    """CTC negative log-likelihood and its gradient with respect to the logits.

    log_probs (T, B, K) log-softmax outputs, input_lengths (B,), targets a list
    of B label sequences with ids in 1..K-1. Returns nll (B,) and grad
    (T, B, K) = d nll_b / d logits = softmax - posteriors, zero beyond each
    input length. An impossible alignment (fewer steps than labels plus
    adjacent repeats) gives nll = inf and a zero gradient.
    """
    lp, lengths, ext, n_states, log_emit, skip = _ctc_problem(log_probs, input_lengths, targets)
    T, B, K = lp.shape
    S = ext.shape[1]
    cols = np.arange(B)
    state_ok = np.arange(S) < n_states[:, None]  # (B, S)
    # beta is alpha of the time- and label-reversed problem, mapped back; both
    # recursions run as one over a doubled batch.
    rev_t = reverse_time_index(lengths, T)[:, :, None]  # (T, B, 1)
    rev_s = np.where(state_ok, n_states[:, None] - 1 - np.arange(S), np.arange(S))  # (B, S)
    gather = (rev_t, cols[None, :, None], rev_s[None])
    both = ctc_alpha(np.concatenate([log_emit, log_emit[gather]], axis=1),
                     np.concatenate([skip, _skip_mask(ext[cols[:, None], rev_s])]))
    alpha, beta = both[:, :B], both[:, B:][gather]
    log_p = _final_log_p(alpha, lengths, n_states)
    possible = np.isfinite(log_p)

    # Posterior of state s at t: alpha * beta / (y_t(l'_s) p); the emission at
    # t is counted in both alpha and beta, hence divided out once.
    time_ok = np.arange(T)[:, None] < lengths  # (T, B)
    keep = time_ok[:, :, None] & state_ok[None] & possible[None, :, None]
    log_post = np.where(keep, alpha + beta - np.where(keep, log_emit, 0.0)
                        - np.where(possible, log_p, 0.0)[None, :, None], -np.inf)
    onehot = (ext[:, :, None] == np.arange(K)) & state_ok[:, :, None]  # (B, S, K)
    post = (np.exp(log_post).transpose(1, 0, 2) @ onehot).transpose(1, 0, 2)  # (T, B, K)
    grad = np.where((time_ok & possible)[:, :, None], np.exp(lp) - post, 0.0)
    return -log_p, grad




# ---------------------------------------------------------------------------
# 6. Decoding and metrics
# ---------------------------------------------------------------------------


def greedy_decode(log_probs, lengths):
    """Best path: argmax per step, merge repeats, drop blanks.

    log_probs (T, B, K), lengths (B,). Returns B lists of class ids.
    """
    path = np.argmax(log_probs, axis=-1)  # (T, B)
    T = path.shape[0]
    prev = np.vstack([np.full((1, path.shape[1]), -1), path[:-1]])
    keep = (path != BLANK) & (path != prev) & (np.arange(T)[:, None] < np.asarray(lengths))
    return [path[keep[:, b], b].tolist() for b in range(path.shape[1])]


def _edit_table(ref, hyp):
    """Levenshtein dynamic-programming table as rows: D[i][j] = distance(ref[:i], hyp[:j])."""
    D = [list(range(len(hyp) + 1))]
    for i, r in enumerate(ref, 1):
        above, row = D[-1], [i]
        for j, h in enumerate(hyp, 1):
            row.append(min(above[j] + 1, row[j - 1] + 1, above[j - 1] + (r != h)))
        D.append(row)
    return D


def levenshtein(a, b):
    """Minimum number of insertions, deletions and substitutions turning a into b."""
    return _edit_table(a, b)[-1][-1]


def edit_alignment(ref, hyp):
    """One minimal alignment as (ref item or None, hyp item or None) pairs.

    None on the hyp side is a deletion, on the ref side an insertion. Ties
    prefer match/substitution, then deletion, then insertion.
    """
    D = _edit_table(ref, hyp)
    i, j, pairs = len(ref), len(hyp), []
    while i or j:
        if i and j and D[i][j] == D[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            pairs.append((ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif i and D[i][j] == D[i - 1][j] + 1:
            pairs.append((ref[i - 1], None))
            i -= 1
        else:
            pairs.append((None, hyp[j - 1]))
            j -= 1
    return pairs[::-1]


def cer(pred, target):
    """Character error rate of one prediction: edits / len(target)."""
    return levenshtein(target, pred) / max(len(target), 1)


def plain_words(text):
    """The words of `text` case-folded, with every character that is neither a letter nor a
    digit removed, and words left empty dropped: `"Mr. Brown," he said.` -> mr brown he said."""
    words = ("".join(c for c in w if c.isalnum()).casefold() for w in text.split())
    return [w for w in words if w]


def piece_words(text):
    """The words of `text` as the LM reads them (split_line): clitics and punctuation marks
    are words of their own, case is kept, and so `Mr . Brown,` and `Mr. Brown ,` are both
    Mr . Brown , (as a tokenised corpus writes them, and the IAM transcriptions on some forms
    but not on others)."""
    return [piece for piece, _ in split_line(text)]


def error_counts(refs, hyps):
    """Edit counts over a corpus: characters, character edits, words, word edits, and
    the words and word edits of plain_words and of piece_words.

    Words are the transcription's space-separated tokens, case and punctuation
    kept (`said,` is one word); word edits are the Levenshtein distance between
    the word sequences (substitutions, deletions, insertions), as for the
    paper's word accuracy. The plain counts ignore case and punctuation, as
    some papers do; the piece counts ignore only whether a space comes before
    a punctuation mark or a clitic.
    """
    return {"chars": sum(len(r) for r in refs), "edits": sum(levenshtein(r, h) for r, h in zip(refs, hyps)),
            "words": sum(len(r.split()) for r in refs),
            "word_edits": sum(levenshtein(r.split(), h.split()) for r, h in zip(refs, hyps)),
            "plain_words": sum(len(plain_words(r)) for r in refs),
            "plain_word_edits": sum(levenshtein(plain_words(r), plain_words(h)) for r, h in zip(refs, hyps)),
            "piece_words": sum(len(piece_words(r)) for r in refs),
            "piece_word_edits": sum(levenshtein(piece_words(r), piece_words(h)) for r, h in zip(refs, hyps))}


def rates(counts):
    """CER = edits / characters, WER = word edits / words and word accuracy = 1 - WER
    (the paper's measure; for single words it is the share read exactly); wer_plain
    and wer_pieces likewise over plain_words and piece_words (when counted)."""
    words = max(counts["words"], 1)
    out = {"cer": counts["edits"] / max(counts["chars"], 1), "wer": counts["word_edits"] / words,
           "word_acc": (counts["words"] - counts["word_edits"]) / words}
    if "plain_words" in counts:
        out["wer_plain"] = counts["plain_word_edits"] / max(counts["plain_words"], 1)
    if "piece_words" in counts:
        out["wer_pieces"] = counts["piece_word_edits"] / max(counts["piece_words"], 1)
    return out


def beam_search_decode(log_probs, beam_width=16):
    """CTC prefix beam search over one sequence (Graves 2012, ch. 7; Hannun 2014).

    log_probs (T, K). Every labeling prefix in the beam carries two
    log-probabilities: of the alignments so far that collapse to it and end in
    a blank, and of those that end in its last label. Returns (labels,
    log_prob), the most probable prefix at the end and its total log
    probability as accumulated by the search (exact if nothing was pruned).
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    if beam_width < 1:
        raise ValueError(f"beam_width must be at least 1, got {beam_width}")
    K = lp.shape[1]
    prefixes = [()]
    ends_blank = np.array([0.0])  # (W,)
    ends_label = np.array([-np.inf])  # (W,)
    for y in lp:
        total = np.logaddexp(ends_blank, ends_label)
        last = np.array([p[-1] if p else BLANK for p in prefixes])  # (W,)
        # blank: the prefix does not change and now ends in a blank
        stay_blank = total + y[BLANK]
        # repeat of the last label with no blank between: merges, prefix unchanged
        stay_label = np.where(last != BLANK, ends_label + y[last], -np.inf)
        # extension by label k (W, K-1); repeating the last label needs a blank first
        extend = total[:, None] + y[None, 1:]
        repeat = np.flatnonzero(last != BLANK)
        extend[repeat, last[repeat] - 1] = ends_blank[repeat] + y[last[repeat]]
        # an extension that spells a prefix already in the beam merges into it
        index = {p: i for i, p in enumerate(prefixes)}
        for i, p in enumerate(prefixes):
            j = index.get(p[:-1]) if p else None
            if j is not None:
                stay_label[i] = np.logaddexp(stay_label[i], extend[j, p[-1] - 1])
                extend[j, p[-1] - 1] = -np.inf
        # keep the beam_width most probable of all candidates (stable: ties keep order)
        scores = np.concatenate([np.logaddexp(stay_blank, stay_label), extend.ravel()])
        keep = np.argsort(-scores, kind="stable")[:beam_width]
        keep = keep[np.isfinite(scores[keep])] if np.isfinite(scores[keep[0]]) else keep[:1]
        W = len(prefixes)
        parent, k = np.divmod(keep - W, K - 1)
        prefixes = [prefixes[c] if c < W else prefixes[j] + (int(kk) + 1,) for c, j, kk in zip(keep, parent, k)]
        ends_blank = np.where(keep < W, stay_blank[np.minimum(keep, W - 1)], -np.inf)
        ends_label = np.where(keep < W, stay_label[np.minimum(keep, W - 1)],
                              extend.ravel()[np.maximum(keep - W, 0)])
    total = np.logaddexp(ends_blank, ends_label)
    best = int(np.argmax(total))
    return list(prefixes[best]), float(total[best])


# Kinds of dictionary entries. How two entries may follow each other without a
# space (GLUES) is decided by their kinds; see split_token for where they come from.
WORD, CLITIC, PUNCT, SPELLED = range(4)
KIND_NAMES = ("word", "clitic", "punctuation", "spelled")
GLUES = np.zeros((4, 4), bool)  # GLUES[a, b]: entry b may follow entry a with no space between
GLUES[:, PUNCT] = GLUES[PUNCT, :] = True  # punctuation attaches to anything: 'said,'  '"I'  '(2).'
GLUES[[WORD, SPELLED], CLITIC] = True  # a clitic attaches to the word before it: "man's"
GLUES[SPELLED, SPELLED] = True  # a spelled out-of-dictionary token goes on, one character at a time


@dataclass(frozen=True)
class Lexicon:
    """Dictionary entries as a prefix tree; node 0 is the empty prefix (the root).

    Spelled entries (single characters of out-of-dictionary tokens, kind
    SPELLED) have a subtree of their own under the root, so an entry "a" and
    the spelled character "a" are different nodes."""

    words: tuple  # the W entries (their spelling), in the order scores are reported
    alphabet: str  # the task's characters: class 1 + i is alphabet[i]
    label: np.ndarray  # (N,) class id of each node's last letter (BLANK at the root)
    parent: np.ndarray  # (N,) node of the prefix one letter shorter (the root is its own parent)
    skip: np.ndarray  # (N,) True where the letter differs from its parent's, so no blank is needed between
    end: np.ndarray  # (W,) node at which each entry ends
    word_at: np.ndarray  # (N,) the entry ending at each node, -1 for none
    child_start: np.ndarray  # (N + 1,) the children of node n are children[child_start[n]:child_start[n + 1]]
    children: np.ndarray  # (N - 1,) every node but the root, grouped by parent
    kind: np.ndarray  # (W,) WORD, CLITIC, PUNCT or SPELLED
    lm_id: np.ndarray  # (W,) the language-model word each entry is read as (-1 for spelled characters)
    cost: np.ndarray  # (W,) log-probability of the spelling given the LM word (its case; a spelled character)
    glue_to: np.ndarray  # (N, 4) for a child of the root: True if its subtree holds an entry that may follow
    #                     an entry of that kind with no space (GLUES); False elsewhere
    spelling: np.ndarray  # (S + 1, S + 1) log P(next | previous) over the S spelled characters in entry order,
    #                      index S the edge of the token (oov "char-bigram"); all 0: no character model


def build_lexicon(words, alphabet=None, kind=None, lm_id=None, cost=None, spelling=None):
    """Prefix tree of `words`; ValueError for an empty lexicon, an empty or repeated word, or a foreign letter.

    alphabet: default the words task's (ALPHABET). kind, lm_id, cost (W,): how
    the lm decoder reads each entry (default: each a WORD, its own LM word, at
    no cost). spelling: Lexicon.spelling, for the S SPELLED entries (default all 0: none)."""
    alphabet = ALPHABET if alphabet is None else alphabet
    words = tuple(words)
    if not words:
        raise ValueError("the lexicon is empty")
    W = len(words)
    kind = np.full(W, WORD) if kind is None else np.asarray(kind)
    node_of, label, parent = {(False, ""): 0}, [BLANK], [0]
    for w, k in zip(words, kind):
        if not w:
            raise ValueError("the lexicon holds an empty word")
        ids, tree = encode(w, alphabet), bool(k == SPELLED)  # spelled characters: a subtree of their own
        for n in range(1, len(w) + 1):
            if (tree, w[:n]) not in node_of:
                node_of[tree, w[:n]] = len(label)
                label.append(ids[n - 1])
                parent.append(node_of[tree if n > 1 else False, w[:n - 1]])
    keys = [(bool(k == SPELLED), w) for k, w in zip(kind, words)]
    if len(set(keys)) < W:
        raise ValueError(f"the lexicon holds {next(w for (s, w) in keys if keys.count((s, w)) > 1)!r} more than once")
    label, parent = np.array(label), np.array(parent)
    skip = label != label[parent]
    skip[0] = False
    end = np.array([node_of[k] for k in keys])
    word_at = np.full(len(label), -1)
    word_at[end] = np.arange(W)
    children = np.argsort(parent[1:], kind="stable") + 1
    child_start = np.searchsorted(parent[children], np.arange(len(label) + 1))
    first = np.array([node_of[s, w[:1]] for s, w in keys])  # (W,) the root child each entry starts with
    glue_to = np.zeros((len(label), 4), bool)
    for a in range(4):
        glue_to[first[GLUES[a, kind]], a] = True
    n_spelled = int((kind == SPELLED).sum())
    spelling = np.zeros((n_spelled + 1, n_spelled + 1)) if spelling is None else np.asarray(spelling, dtype=float)
    if spelling.shape != (n_spelled + 1, n_spelled + 1):
        raise ValueError(f"the spelling model is {spelling.shape}, for {n_spelled} spelled characters")
    return Lexicon(words, alphabet, label, parent, skip, end, word_at, child_start, children, kind,
                   np.arange(W) if lm_id is None else np.asarray(lm_id),
                   np.zeros(W) if cost is None else np.asarray(cost, dtype=float), glue_to, spelling)


# The CTC recursion on a prefix tree, shared by the single-word lexicon decoder
# and the language-model decoder. A node has two states: "on its label" (the
# node's last letter, or the space at a line decoder's root) and "in a blank
# after it".


def entering(parent_on_label, parent_in_blank, skip):
    """Log mass that may enter a node's label from its parent: from the parent's
    blank, or straight from the parent's label when the two labels differ."""
    return np.logaddexp(parent_in_blank, np.where(skip, parent_on_label, -np.inf))


def tree_step(on_label, in_blank, enter, emit_label, emit_blank):
    """One time step: a label is reached by staying on it or by entering it; a
    blank by staying in it or by leaving the label. Returns the new (on_label, in_blank)."""
    return np.logaddexp(on_label, enter) + emit_label, np.logaddexp(in_blank, on_label) + emit_blank


def lexicon_log_likelihoods(log_probs, lengths, lexicon):
    """Exact CTC log p(word | x_b) for every lexicon word and sequence: (W, B).

    log_probs (T, B, K), lengths (B,). The CTC forward recursion run on the
    prefix tree instead of one chain per word (token passing restricted to
    single words), over every node at once: words sharing a prefix share its
    computation. The only Python loop is over time.
    """
    lp = np.asarray(log_probs, dtype=np.float64).transpose(0, 2, 1)  # (T, K, B)
    lengths = np.asarray(lengths)
    N, B = len(lexicon.label), lp.shape[2]
    parent, skip = lexicon.parent, lexicon.skip[:, None]
    on_label = np.full((N, B), -np.inf)  # log P(alignment so far spells the node, ends on its letter)
    in_blank = np.full((N, B), -np.inf)  # ... and ends in a blank after it
    in_blank[0] = 0.0  # before the first step: the empty prefix, probability one
    scores = np.full((len(lexicon.words), B), -np.inf)
    for t in range(lp.shape[0]):
        emit = lp[t, lexicon.label]  # (N, B)
        emit[0] = -np.inf  # the root has no letter to be on
        on_label, in_blank = tree_step(on_label, in_blank, entering(on_label[parent], in_blank[parent], skip),
                                       emit, lp[t, BLANK])
        done = np.flatnonzero(lengths == t + 1)
        if len(done):
            end = lexicon.end[:, None]
            scores[:, done] = np.logaddexp(on_label[end, done], in_blank[end, done])
    return scores


def lexicon_decode(log_probs, lexicon, word_log_prior=None):
    """The most probable dictionary word for one sequence (T, K).

    lexicon: a list of words or a Lexicon. Returns (word, log_prob) with
    log_prob the exact CTC log-likelihood of the word plus its prior, if given.
    The module decodes with lexicon_decode_many; this one-sequence form, with
    its prior, is kept for the tests, which check the decoder through it.
    """
    lex = lexicon if isinstance(lexicon, Lexicon) else build_lexicon(lexicon)
    lp = np.asarray(log_probs, dtype=np.float64)
    scores = lexicon_log_likelihoods(lp[:, None, :], [len(lp)], lex)[:, 0]
    if word_log_prior is not None:
        prior = np.asarray(word_log_prior, dtype=np.float64)
        if prior.shape != scores.shape:
            raise ValueError(f"word_log_prior needs one value per word ({len(scores)}), got shape {prior.shape}")
        scores = scores + prior
    best = int(np.argmax(scores))
    return lex.words[best], float(scores[best])


LEXICON_BATCH = 32  # sequences decoded together against one lexicon


def lexicon_decode_many(log_probs_list, lex):
    """lexicon_decode for a list of (T_i, K) arrays, batched. Returns the words."""
    words = []
    for start in range(0, len(log_probs_list), LEXICON_BATCH):
        lp, lengths = pad_log_probs(log_probs_list[start:start + LEXICON_BATCH])
        scores = lexicon_log_likelihoods(lp, lengths, lex)  # (W, B)
        words += [lex.words[i] for i in np.argmax(scores, axis=0)]
    return words


def pad_log_probs(log_probs):
    """Stack (T_i, K) arrays into (T, B, K), padding with uniform rows. Returns it and lengths (B,)."""
    lengths = np.array([len(lp) for lp in log_probs])
    K = log_probs[0].shape[1]
    out = fill_padded(np.full((int(lengths.max()), len(log_probs), K), -np.log(K)), np.concatenate(log_probs), lengths)
    return out, lengths


# The paper's decoder: token passing over a dictionary with a word language model.

# -- The word language model --


@dataclass(frozen=True)
class BigramModel:
    """A smoothed word bigram distribution over a vocabulary: interpolated absolute
    discounting (Ney, Essen and Kneser 1994),

        P(w | v) = max(c(v, w) - D, 0) / c(v) + backoff(v) P(w),   backoff(v) = D n(v) / c(v),

    with c(v, w) the pair counts in units of the smallest count the list keeps,
    c(v) their sum over w, n(v) the number of listed followers, P(w) the word
    frequencies and D = n1 / (n1 + 2 n2) from the pairs counted once and twice
    (in those units). A word with no listed followers uses P(w) alone. For
    every v, P(. | v) sums to one over the vocabulary.
    """

    words: tuple  # (V,) the vocabulary; a word's id is its index
    unigram: np.ndarray  # (V,) P(w)
    pair_key: np.ndarray  # (P,) sorted v * V + w of the listed pairs
    pair_prob: np.ndarray  # (P,) the discounted part max(c(v, w) - D, 0) / c(v)
    backoff: np.ndarray  # (V,)
    discount: float  # D


def discounted_pairs(v, w, c, V):
    """Absolute discounting of pair counts c (P,) of word ids v, w < V (BigramModel's
    formula): returns (sorted keys v * V + w, their discounted part, backoff (V,), D)."""
    n1, n2 = np.count_nonzero(c < 2), np.count_nonzero((c >= 2) & (c < 3))
    D = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
    c_v = np.bincount(v, weights=c, minlength=V)  # (V,)
    n_v = np.bincount(v, minlength=V)
    backoff = np.where(n_v > 0, D * n_v / np.maximum(c_v, 1e-300), 1.0)
    key = v.astype(np.int64) * V + w
    order = np.argsort(key)
    return key[order], (np.maximum(c - D, 0.0) / np.maximum(c_v[v], 1e-300))[order], backoff, D


def bigram_prob(model, prev, nxt):
    """P(nxt | prev) for word-id arrays of one shape."""
    prev, nxt = np.asarray(prev), np.asarray(nxt)
    key = prev.astype(np.int64) * len(model.words) + nxt
    at = np.minimum(np.searchsorted(model.pair_key, key), len(model.pair_key) - 1)
    listed = np.where(model.pair_key[at] == key, model.pair_prob[at], 0.0)
    return listed + model.backoff[prev] * model.unigram[nxt]


LM_START = -1  # the context of a line's first word
EMISSION_FLOOR = 1e-4  # with pruning on, labels less probable than this at a step are not entered


@dataclass(frozen=True)
class LanguageModel:
    """A word language model over a dictionary, line start and end included:

        P(w | <s>)  = P(w)                        a line's first word: the word frequencies
        P(w | v)    = (1 - p_end) P_bigram(w | v) order 2
                    = (1 - p_end) P(w)            order 1 (the context is ignored)
        P(</s> | v) = p_end

    Lines start anywhere in a text, so the first word follows the word
    frequencies (as the line sampler draws it). For every context the
    probabilities sum to one over the dictionary, plus </s> after a word.

    A model read from an ARPA file has its own start and end rows instead:
    P(w | <s>) = first[w], P(</s> | v) = end[v], and P(w | v) = P_bigram(w | v)
    unscaled (order 2); order 1 uses P(w) and p_end for every context.
    """

    bigram: BigramModel  # over the dictionary, in the lexicon's word order
    p_end: float
    order: int  # 1: unigram, 2: bigram
    first: np.ndarray | None = None  # (V,) P(w | <s>), or None for the word frequencies
    end: np.ndarray | None = None  # (V,) P(</s> | v), or None for p_end (with P(w | v) scaled by 1 - p_end)


def lm_log_prob(lm, prev, nxt):
    """log P(nxt | prev) for word-id arrays of one shape; prev may be LM_START."""
    prev, nxt = np.asarray(prev), np.asarray(nxt)
    start = prev == LM_START
    p = lm.bigram.unigram[nxt]
    if lm.order == 2:
        at_start = p if lm.first is None else lm.first[nxt]
        p = np.where(start, at_start, bigram_prob(lm.bigram, np.where(start, 0, prev), nxt))
    scale = 1 - lm.p_end if lm.end is None else 1.0
    with np.errstate(divide="ignore"):
        return np.log(np.where(start, p, scale * p))


def lm_end_log_prob(lm, prev):
    """log P(</s> | prev) for a word-id array; prev may be LM_START."""
    prev = np.asarray(prev)
    if lm.end is None or lm.order == 1:
        return np.full(prev.shape, np.log(lm.p_end))
    with np.errstate(divide="ignore"):
        return np.log(np.where(prev == LM_START, lm.p_end, lm.end[np.maximum(prev, 0)]))


def lm_perplexity(lm, lines, tokenise=str.split):
    """(perplexity, out-of-dictionary rate) of `lm` on text lines.

    Every in-dictionary word and each line's end is scored; a word after an
    out-of-dictionary word is scored as a line's first. Out-of-dictionary
    words cannot be scored by a closed-vocabulary model: they are left out
    and counted. tokenise: a line -> its LM words (lm_words for real English).
    """
    index = {w: i for i, w in enumerate(lm.bigram.words)}
    prev, nxt, last, n_words, n_oov = [], [], [], 0, 0
    for line in lines:
        context = LM_START
        for word in tokenise(line):
            n_words += 1
            i = index.get(word)
            if i is None:
                n_oov, context = n_oov + 1, LM_START
                continue
            prev.append(context)
            nxt.append(i)
            context = i
        last.append(context)
    log_p = lm_log_prob(lm, prev, nxt).sum() + lm_end_log_prob(lm, last).sum()
    return float(np.exp(-log_p / (len(nxt) + len(lines)))), n_oov / max(n_words, 1)


LM_SEED = 2006  # lines drawn to estimate p_end


@functools.lru_cache(maxsize=1)
def line_end_probability():
    """p_end = lines / words over 5,000 lines from the line sampler (a fixed seed):
    the maximum-likelihood probability that a line ends after a word."""
    rng = np.random.default_rng(LM_SEED)
    lines = [sample_line(rng) for _ in range(5000)]
    return len(lines) / sum(len(line.split()) for line in lines)


@functools.lru_cache(maxsize=8)
def language_model(size, order):
    """The unigram (order 1) or bigram (order 2) model over the `size` most frequent English words."""
    return LanguageModel(build_bigram_model(size), line_end_probability(), order)


@functools.lru_cache(maxsize=4)
def dictionary_lexicon(size, alphabet):
    """Prefix tree of the `size` most frequent English words: the lm decoder's dictionary."""
    return build_lexicon(english_words()[0][:size], alphabet)


def check_dictionary_alphabet(size, alphabet):
    """UserError unless the `size`-word dictionary can be spelled in `alphabet` (an
    iam-ondb alphabet comes from its training text and may lack letters). The
    dictionaries are nested, so the largest one used is the one to check."""
    missing = set("".join(english_words()[0][:size])) - set(alphabet)
    if missing:
        raise UserError(f"the {size}-word dictionary needs the letters {''.join(sorted(missing))!r}, which the "
                        "training transcriptions never use, so the model cannot output them")


# ---------------------------------------------------------------------------
# 7. Decoding: real English (tokens, case, out-of-dictionary tokens, ARPA and word-list files)
# ---------------------------------------------------------------------------
# IAM-OnDB transcriptions are written text with capitals, digits and
# punctuation, and their tokens are space-separated as written ("Mr . Gaitskell",
# "said,", '"I', "'s"). The dictionary and the LM see each token split into
# pieces (split_token); the decoder reads pieces, each either after a space or
# glued to the one before (GLUES says which kinds may glue), and glue_pieces
# writes them back. Case: every LM word (lower case) may be written lower case,
# Capitalised or in CAPITALS; the LM scores the lower-case word and the spelling
# costs log P(case), estimated from the training transcriptions (case_log_probs).
# Tokens outside the dictionary (numbers, names) can be spelled character by
# character (cfg.oov): "chars" costs log(1/A) per character (a uniform
# character model over the A letters and digits) plus oov_penalty per token;
# "char-bigram" scores the characters with a character bigram of the training
# words (spelling_log_probs), the token's end included, so that English-like
# spellings cost less than noise; "token" costs oov_penalty per token whatever
# its length.

CLITICS = ("'s", "'re", "'ve", "'ll", "'m", "'d")  # split off the word before; the n't forms stay whole words
CASES = ("lower", "capital", "upper")


def _is_clitic(piece):
    return piece.lower() in CLITICS


def split_token(token):
    """A space-free token -> its pieces, which concatenate back to it: trailing
    and leading punctuation one character each, then a clitic off the word.
    'said,' -> said ,   '"I' -> " I   "man's" -> man 's   '(2).' -> ( 2 ) .
    A clitic alone ("'s") and inner punctuation ("don't", "U.S") stay whole."""
    core, tail = token, []
    while core and not core[-1].isalnum():
        tail.append(core[-1])
        core = core[:-1]
    lead = []
    while core and not core[0].isalnum() and not _is_clitic(core):
        lead.append(core[0])
        core = core[1:]
    clitic = [core[-len(c):] for c in CLITICS if len(core) > len(c) and core.lower().endswith(c)
              and core[-len(c) - 1].isalnum()][:1]
    if clitic:
        core = core[:-len(clitic[0])]
    return lead + ([core] if core else []) + clitic + tail[::-1]


def split_line(text):
    """A transcription -> [(piece, glued)], glued True where the piece follows the
    previous one with no space; glue_pieces inverts it (for single-spaced text)."""
    return [(piece, i > 0) for token in text.split() for i, piece in enumerate(split_token(token))]


def glue_pieces(pieces):
    """[(piece, glued)] -> the text, with a space before every piece not glued."""
    return "".join(piece if glued or i == 0 else " " + piece for i, (piece, glued) in enumerate(pieces))


def lm_words(text):
    """The language model's tokens of a transcription: its pieces, lower-cased."""
    return [piece.lower() for piece, _ in split_line(text)]


def piece_kind(piece):
    """WORD, CLITIC or PUNCT (no letter or digit) for one piece."""
    return CLITIC if _is_clitic(piece) else WORD if any(c.isalnum() for c in piece) else PUNCT


def spellings(word):
    """{case: spelling} of a lower-case LM word: as it is, Capitalised, in CAPITALS."""
    return {"lower": word, "capital": word[:1].upper() + word[1:], "upper": word.upper()}


def case_log_probs(texts):
    """{case: log P(case)} from the word pieces of `texts` with at least two letters
    (one letter cannot tell Capitalised from CAPITALS); add-one smoothed, so no texts
    give 1/3 each. Mixed case ("McDonald") counts as none of the three."""
    counts = dict.fromkeys(CASES, 1)
    for text in texts:
        for piece, _ in split_line(text):
            if sum(c.isalpha() for c in piece) >= 2:
                for case, spelled in spellings(piece.lower()).items():
                    if piece == spelled:
                        counts[case] += 1
                        break
    total = sum(counts.values())
    return {case: math.log(n / total) for case, n in counts.items()}


# The character bigram's counts are interpolated with its add-one unigram at
# this weight: on the validation pieces outside the 20,000-word dictionary,
# the log-likelihood per character is -3.14 at 5, -3.13 at 20 to 100 (uniform
# over the 61 letters and digits: -4.11; a character trigram: -2.98).
SPELLING_PRIOR_WEIGHT = 20.0


def spelling_log_probs(pieces, chars):
    """(S + 1, S + 1) log P(next | previous) of a character bigram over `chars`
    (S,), index S the edge of a token (row S: the first character; column S: the
    end), from the pieces (strings) every character of which is in chars:

        P(c | p) = (n(p c) + a P(c)) / (n(p) + a),   P(c) = (n(c) + 1) / (n + S + 1)

    with a = SPELLING_PRIOR_WEIGHT and n(c) counting every position, the end
    included. An empty token is impossible: P(end | start) is 0."""
    S, index = len(chars), {c: i for i, c in enumerate(chars)}
    pairs = [(a, b) for p in pieces if p and all(c in index for c in p)
             for seq in [[S] + [index[c] for c in p] + [S]] for a, b in zip(seq, seq[1:])]
    counts = np.zeros((S + 1, S + 1))
    if pairs:
        np.add.at(counts, tuple(np.array(pairs).T), 1)
    unigram = (counts.sum(0) + 1) / (counts.sum() + S + 1)
    prob = (counts + SPELLING_PRIOR_WEIGHT * unigram) / (counts.sum(1, keepdims=True) + SPELLING_PRIOR_WEIGHT)
    prob[S, S] = 0.0
    prob[S] /= prob[S].sum()
    with np.errstate(divide="ignore"):
        return np.log(prob)


def reading_lexicon(words, alphabet, case_logp, oov="none", spelling_pieces=()):
    """The lm decoder's Lexicon for LM words `words` (lower case, in LM id order).

    Each word enters as each distinct spelling (spellings) the alphabet can
    write, at cost log P(case), renormalised over those spellings (spellings
    that coincide, as "I" for Capitalised and CAPITALS, add up); a word the
    alphabet cannot write at all is left out. oov "chars", "char-bigram" or
    "token" adds every letter and digit of the alphabet as a SPELLED entry (see
    OOV_MODES); "char-bigram" scores them with spelling_log_probs of
    spelling_pieces (the words themselves if none are given)."""
    letters = set(alphabet)
    entries, kind, lm_id, cost = [], [], [], []
    for i, w in enumerate(words):
        variants = {}
        for case, spelled in spellings(w).items():
            if spelled and set(spelled) <= letters:
                variants[spelled] = np.logaddexp(variants.get(spelled, -np.inf), case_logp[case])
        total = np.logaddexp.reduce(list(variants.values())) if variants else 0.0
        for spelled, lp in variants.items():
            entries.append(spelled)
            kind.append(piece_kind(w))
            lm_id.append(i)
            cost.append(lp - total)
    if oov != "none":
        chars = [c for c in alphabet if c.isalnum()]
        for c in chars:
            entries.append(c)
            kind.append(SPELLED)
            lm_id.append(-1)
            cost.append(-math.log(len(chars)) if oov == "chars" else 0.0)
    spelling = spelling_log_probs(spelling_pieces or words, chars) if oov == "char-bigram" else None
    return build_lexicon(entries, alphabet, np.array(kind, int), np.array(lm_id, int), cost, spelling)


# The real-English model: symspellpy's counts and the training transcriptions,
# interpolated with weights fitted on the validation transcriptions (EM), which
# are also where the decoder's weights are tuned; never the test lines.

def mixture_weight(p1, p2, iterations=100):
    """The weight w maximising sum log(w p1 + (1 - w) p2) over tokens (EM), for two
    models' probabilities p1, p2 (n,) of the same held-out tokens."""
    keep = (p1 > 0) | (p2 > 0)
    if not keep.any():
        return 0.5
    p1, p2, w = p1[keep], p2[keep], 0.5
    for _ in range(iterations):
        w = float(np.mean(w * p1 / (w * p1 + (1 - w) * p2)))
    return w


@dataclass(frozen=True)
class EnglishCounts:
    """Unigram statistics of the real-English model over the union of symspellpy's
    words and the training pieces, most probable first."""

    words: tuple  # (U,) lower-case LM words
    prob: np.ndarray  # (U,) P(w) = lam P_train(w) + (1 - lam) P_symspell(w)
    lam: float  # the training text's weight, fitted on the validation pieces
    p_end: float  # training lines / training pieces


def _line_pairs(lines, index):
    """Consecutive (v, w) id pairs within each line of LM words, both in `index`."""
    pairs = [(index[a], index[b]) for line in lines for a, b in zip(line, line[1:]) if a in index and b in index]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


@functools.lru_cache(maxsize=2)
def english_counts(train, validation):
    """EnglishCounts from the training and validation transcriptions (tuples of lines)."""
    sym_words, sym_counts = english_words()
    train_lines = [lm_words(t) for t in train]
    train_counts = Counter(w for line in train_lines for w in line)
    words = list(sym_words) + sorted(set(train_counts) - set(sym_words))
    index = {w: i for i, w in enumerate(words)}
    p_sym = np.zeros(len(words))
    p_sym[:len(sym_words)] = sym_counts / sym_counts.sum()
    p_train = np.zeros(len(words))
    for w, n in train_counts.items():
        p_train[index[w]] = n
    p_train /= max(p_train.sum(), 1)
    held_out = [index[w] for t in validation for w in lm_words(t) if w in index]
    lam = mixture_weight(p_train[held_out], p_sym[held_out]) if held_out else 0.5
    prob = lam * p_train + (1 - lam) * p_sym
    order = np.argsort(-prob, kind="stable")
    n_pieces = sum(len(line) for line in train_lines)
    return EnglishCounts(tuple(words[i] for i in order), prob[order], lam,
                         len(train_lines) / n_pieces if n_pieces else line_end_probability())


@functools.lru_cache(maxsize=8)
def english_language_model(train, validation, words, order):
    """The real-English LanguageModel over the LM words `words` (a tuple):

        P(w)     = english_counts' unigram, restricted to `words` and renormalised
                   (a word neither source holds gets the smallest probability)
        P(w | v) = mu P_symspell(w | v) + (1 - mu) P_train(w | v)

    with each bigram absolutely discounted onto P(w) (discounted_pairs), so the
    mixture is again of BigramModel's form; mu is fitted on the validation pairs.
    p_end is the training lines' rate of line ends per piece."""
    counts = english_counts(train, validation)
    at = {w: i for i, w in enumerate(counts.words)}
    V, index = len(words), {w: i for i, w in enumerate(words)}
    uni = np.array([counts.prob[at[w]] if w in at else 0.0 for w in words])
    uni = np.where(uni > 0, uni, uni[uni > 0].min() if (uni > 0).any() else 1.0)
    uni /= uni.sum()
    sym_index = {w: i for i, w in enumerate(english_words()[0])}
    sym_to_ours = np.full(len(sym_index), -1)
    for w, i in sym_index.items():
        if w in index:
            sym_to_ours[i] = index[w]
    first, second, c = english_pairs()
    v, w = sym_to_ours[first], sym_to_ours[second]
    keep = (v >= 0) & (w >= 0)
    components = [discounted_pairs(v[keep], w[keep], c[keep] / c.min(), V)]
    train_pairs = _line_pairs([lm_words(t) for t in train], index)
    keys, n = np.unique(train_pairs[:, 0] * V + train_pairs[:, 1], return_counts=True)
    components.append(discounted_pairs(keys // V, keys % V, n.astype(float), V))
    models = [BigramModel(tuple(words), uni, k, p, b, d) for k, p, b, d in components]
    held = _line_pairs([lm_words(t) for t in validation], index)
    mu = mixture_weight(*(bigram_prob(m, held[:, 0], held[:, 1]) for m in models)) if len(held) else 0.5
    key = np.concatenate([components[0][0], components[1][0]])
    prob = np.concatenate([mu * components[0][1], (1 - mu) * components[1][1]])
    merged, where = np.unique(key, return_inverse=True)
    bigram = BigramModel(tuple(words), uni, merged, np.bincount(where, weights=prob),
                         mu * components[0][2] + (1 - mu) * components[1][2], components[1][3])
    return LanguageModel(bigram, counts.p_end, order)


# Files: an ARPA n-gram model (--lm) and a word list (--dictionary). Both are
# read whole, within a size bound, and every defect is one UserError line.

MAX_LM_FILE_BYTES = 100 * 2**20  # about 3 million n-grams, a few GB once parsed into Python objects
MAX_NGRAMS = 5_000_000  # declared in an ARPA header


def read_text_file(path, what):
    """A regular file's text (UTF-8), or one UserError line naming `what` and the cause."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"{what} {path!r}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {path!r} is not a regular file")
    if st.st_size > MAX_LM_FILE_BYTES:
        raise UserError(f"{what} {path!r} is {st.st_size / 2**20:.0f} MiB; at most {MAX_LM_FILE_BYTES // 2**20} MiB "
                        "are read")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LM_FILE_BYTES + 1)
    except OSError as e:
        raise UserError(f"{what} {path!r}: {e.strerror}") from None
    if len(data) > MAX_LM_FILE_BYTES:
        raise UserError(f"{what} {path!r} is larger than {MAX_LM_FILE_BYTES // 2**20} MiB")
    nul = data.find(b"\0")
    if nul >= 0:
        raise UserError(f"{what} {path!r} holds binary data (a NUL byte at offset {nul}), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path!r} is not UTF-8 text (byte {e.start})") from None


def _arpa_number(text, where):
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: {text[:40]!r} is not a number") from None
    if not math.isfinite(value) or value > 0:
        raise UserError(f"{where}: {text[:40]!r} is not a finite log10 value of at most 0")
    return value


@dataclass(frozen=True)
class ArpaModel:
    """The unigrams and bigrams of an ARPA file (log10 values; higher orders are ignored)."""

    unigram: dict  # word -> (log10 p, log10 backoff)
    bigram: dict  # (v, w) -> log10 p
    ignored_orders: tuple  # orders above 2 the file declared


@functools.lru_cache(maxsize=2)
def read_arpa(path):
    """Parse an ARPA n-gram file (what KenLM and SRILM write) with the standard library.

    Layout: "\\data\\", "ngram N=count" lines, then per order "\\N-grams:" and
    lines of "log10p w1 .. wN [log10 backoff]", then "\\end\\". Unigrams and
    bigrams are used; higher orders are skipped (the decoder is a bigram
    decoder). Words are lower-cased, as the LM scores lower-case words (the more
    probable of two that then coincide is kept). UserError on any defect."""
    text = read_text_file(path, "--lm")
    lines = [line.strip() for line in text.split("\n")]
    i = 0
    while i < len(lines) and not lines[i]:
        i += 1
    if i == len(lines) or lines[i] != "\\data\\":
        raise UserError(f"--lm {path!r} is not an ARPA file: it does not start with \\data\\")
    declared, i = {}, i + 1
    while i < len(lines) and lines[i].startswith("ngram "):
        m = re.fullmatch(r"ngram\s+(\d+)\s*=\s*(\d+)", lines[i])
        if not m or int(m[1]) < 1 or int(m[1]) in declared:
            raise UserError(f"--lm {path!r} line {i + 1}: expected 'ngram N=count', got {lines[i][:60]!r}")
        declared[int(m[1])] = int(m[2])
        i += 1
    if 1 not in declared:
        raise UserError(f"--lm {path!r}: the \\data\\ header declares no unigrams ('ngram 1=count')")
    if sum(declared.values()) > MAX_NGRAMS:
        raise UserError(f"--lm {path!r} declares {sum(declared.values())} n-grams; at most {MAX_NGRAMS} are read")
    grams, listed, order, ended = {n: {} for n in declared}, Counter(), None, False
    for i in range(i, len(lines)):
        line, where = lines[i], f"--lm {path!r} line {i + 1}"
        if not line:
            continue
        if line == "\\end\\":
            ended = True
            break
        m = re.fullmatch(r"\\(\d+)-grams:", line)
        if m:
            order = int(m[1])
            if order not in declared:
                raise UserError(f"{where}: a \\{order}-grams: section the header does not declare")
            continue
        if order is None:
            raise UserError(f"{where}: expected a \\N-grams: section, got {line[:60]!r}")
        if order > 2:
            continue
        fields = line.split()
        if len(fields) not in (order + 1, order + 2):
            raise UserError(f"{where}: expected log10p, {order} word{'s' if order > 1 else ''} and an optional "
                            f"backoff, got {line[:60]!r}")
        logp = _arpa_number(fields[0], where)
        backoff = _arpa_number(fields[-1], where) if len(fields) == order + 2 else 0.0
        key = tuple(w.lower() for w in fields[1:order + 1])
        known = grams[order].get(key)
        if known is None or known[0] < logp:
            grams[order][key] = (logp, backoff)
        listed[order] += 1
    if not ended:
        raise UserError(f"--lm {path!r} has no \\end\\ line: the file is cut short")
    for n in (1, 2):
        if n in declared and listed[n] != declared[n]:
            raise UserError(f"--lm {path!r}: the header declares {declared[n]} {n}-grams, the file lists {listed[n]}")
    if ("</s>",) not in grams[1]:
        raise UserError(f"--lm {path!r} has no </s> unigram, so a line cannot end")
    return ArpaModel(grams[1], {k: p for k, (p, _) in grams.get(2, {}).items()},
                     tuple(n for n in sorted(declared) if n > 2))


ARPA_SPECIAL = ("<s>", "</s>", "<unk>")


def arpa_vocabulary(arpa):
    """The ARPA model's words, most probable first (<s>, </s> and <unk> left out)."""
    words = [w for (w,) in arpa.unigram if w not in ARPA_SPECIAL]
    return tuple(sorted(words, key=lambda w: -arpa.unigram[w,][0]))


@functools.lru_cache(maxsize=8)
def arpa_language_model(path, words, order):
    """The LanguageModel of an ARPA file over the LM words `words` (a tuple), in ARPA semantics:

        P(w | v) = 10^p(v w) if the pair is listed, else 10^(bo(v) + p(w)),

    with <s> and </s> as listed (first and end). A word the file does not list
    is <unk>, and UserError if the file has no <unk>."""
    arpa = read_arpa(path)
    missing = [w for w in words if (w,) not in arpa.unigram]
    if missing and ("<unk>",) not in arpa.unigram:
        raise UserError(f"--lm {path!r} has no <unk>, and {len(missing)} dictionary words are not in it "
                        f"(e.g. {missing[0]!r})")
    unk = arpa.unigram.get(("<unk>",), (-99.0, 0.0))

    def uni(w):
        return arpa.unigram.get((w,), unk)

    index = {w: i for i, w in enumerate(words)}
    p = 10.0 ** np.array([uni(w)[0] for w in words])  # (V,)
    bo = 10.0 ** np.array([uni(w)[1] for w in words])
    pairs = [(index[v], index[w], q) for (v, w), q in arpa.bigram.items() if v in index and w in index]
    v, w, q = (np.array(x) for x in zip(*pairs)) if pairs else (np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    key = v.astype(np.int64) * len(words) + w
    sort = np.argsort(key)
    # listed part = 10^p(v w) - bo(v) P(w), so that listed + bo(v) P(w) is the ARPA probability
    bigram = BigramModel(tuple(words), p, key[sort], (10.0 ** q - bo[v] * p[w])[sort], bo, 0.0)
    bo_start, p_stop = 10.0 ** uni("<s>")[1], 10.0 ** arpa.unigram["</s>",][0]
    first = np.array([10.0 ** arpa.bigram[("<s>", x)] if ("<s>", x) in arpa.bigram else bo_start * p[i]
                      for i, x in enumerate(words)])
    end = np.array([10.0 ** arpa.bigram[(x, "</s>")] if (x, "</s>") in arpa.bigram else bo[i] * p_stop
                    for i, x in enumerate(words)])
    return LanguageModel(bigram, p_stop, order if arpa.bigram else 1, first, end)


MAX_WORD_LENGTH = 100  # characters in one dictionary word


@functools.lru_cache(maxsize=2)
def read_word_list(path):
    """A dictionary file: one word per line, most frequent first (the order sizes
    cut at), blank lines skipped, repeats (after lower-casing) kept once; UserError
    on anything else."""
    words, seen = [], set()
    for i, line in enumerate(read_text_file(path, "--dictionary").split("\n")):
        word = line.strip()
        if not word:
            continue
        where = f"--dictionary {path!r} line {i + 1}"
        if len(word.split()) > 1:
            raise UserError(f"{where} holds more than one word ({word[:60]!r}); the file has one word per line")
        if len(word) > MAX_WORD_LENGTH or not word.isprintable():
            raise UserError(f"{where}: {word[:40]!r} is not a word (unprintable or over {MAX_WORD_LENGTH} characters)")
        if word.lower() not in seen:
            seen.add(word.lower())
            words.append(word.lower())
    if not words:
        raise UserError(f"--dictionary {path!r} holds no words")
    return tuple(words)


# Which dictionary and LM a run decodes with: the word-list and ARPA files if
# given, else the real-English model when the task has transcriptions (iam-ondb),
# else symspellpy's lower-case words (lines).

def ranked_lm_words(cfg, texts):
    """Every LM word the decoder may use, most probable first (dictionary sizes cut this)."""
    if cfg.dictionary_file:
        return read_word_list(cfg.dictionary_file)
    if cfg.lm_file:
        return arpa_vocabulary(read_arpa(cfg.lm_file))
    if texts:
        return english_counts(texts["train"], texts["validation"]).words
    return english_words()[0]


@functools.lru_cache(maxsize=8)
def _reading_lexicon(words, alphabet, train, oov):
    """reading_lexicon with the case and the spelling models of the training transcriptions `train`."""
    pieces = [piece for text in train for piece, _ in split_line(text) if piece_kind(piece) == WORD] \
        if oov == "char-bigram" else ()
    return reading_lexicon(words, alphabet, case_log_probs(train), oov, pieces)


def decoder_lexicon(cfg, alphabet, texts, size):
    """The lm decoder's Lexicon: the `size` most probable LM words, in every spelling the alphabet can write."""
    words = ranked_lm_words(cfg, texts)[:size]
    if not (cfg.dictionary_file or cfg.lm_file or texts) and cfg.oov == "none":
        return dictionary_lexicon(size, alphabet)  # symspellpy's lower-case words, the lines task's dictionary
    return _reading_lexicon(tuple(words), alphabet, texts.get("train", ()) if texts else (), cfg.oov)


def decoder_language_model(cfg, texts, size, order):
    """The LanguageModel (order 1 or 2) over decoder_lexicon's LM words; order 0: None."""
    if order == 0:
        return None
    words = tuple(ranked_lm_words(cfg, texts)[:size])
    if cfg.lm_file:
        return arpa_language_model(cfg.lm_file, words, order)
    if texts:
        return english_language_model(texts["train"], texts["validation"], words, order)
    if cfg.dictionary_file:
        raise UserError("--dictionary without --lm needs transcriptions to estimate the LM from (the iam-ondb "
                        "task), or --lm-weight 0")
    return language_model(size, order)


# ---------------------------------------------------------------------------
# 8. Decoding: token passing with a language model
# ---------------------------------------------------------------------------

class _Histories:
    """Word histories of a line as a tree: id 0 is the empty history, and every
    other history is its parent plus one word (a code: lm_decode uses entry * 2 +
    glued). Each carries its score so far, the sum of word_score(previous, word)."""

    def __init__(self, n_words, word_score):
        self.parent, self.word, self.score = np.array([-1]), np.array([LM_START]), np.array([0.0])
        self.keys, self.ids_of_keys = np.empty(0, np.int64), np.empty(0, int)  # sorted (parent, word) keys
        self.n_words, self.word_score = n_words, word_score

    def extend(self, parent, word):
        """Ids of the histories parent + word (arrays), created where new."""
        key = parent.astype(np.int64) * self.n_words + word
        pos = np.minimum(np.searchsorted(self.keys, key), max(len(self.keys) - 1, 0))
        known = self.keys[pos] == key if len(self.keys) else np.zeros(len(key), bool)
        new_keys, first = np.unique(key[~known], return_index=True)
        if len(new_keys):
            p, w = parent[~known][first], word[~known][first]
            self.score = np.concatenate([self.score, self.score[p] + self.word_score(self.word[p], w)])
            at = np.searchsorted(self.keys, new_keys)
            self.keys = np.insert(self.keys, at, new_keys)
            self.ids_of_keys = np.insert(self.ids_of_keys, at, len(self.parent) + np.arange(len(new_keys)))
            self.parent, self.word = np.concatenate([self.parent, p]), np.concatenate([self.word, w])
        return self.ids_of_keys[np.searchsorted(self.keys, key)]

    def words(self, h):
        out = []
        while h > 0:
            out.append(int(self.word[h]))
            h = self.parent[h]
        return out[::-1]


def group_logsumexp(values, starts):
    """Log-sum-exp of the rows of values (C, J) in each group of consecutive rows
    starting at `starts` (U,); returns (U, J)."""
    top = np.maximum.reduceat(values, starts, axis=0)
    shift = np.where(np.isfinite(top), top, 0.0)
    size = np.diff(np.append(starts, len(values)))
    with np.errstate(divide="ignore"):
        return np.log(np.add.reduceat(np.exp(values - np.repeat(shift, size, axis=0)), starts, axis=0)) + shift


def _children_of(lexicon, node):
    """Every child of every token's node, token by token: (tok (C,), child (C,)).

    Token j's children are children[child_start[node[j]]:child_start[node[j] + 1]];
    the candidates repeat j once per child, and `offset` counts 0, 1, ... within
    each token's run, so child_start + offset walks each run."""
    n_child = lexicon.child_start[node + 1] - lexicon.child_start[node]  # (M,)
    tok = np.repeat(np.arange(len(node)), n_child)
    offset = ragged_arange(n_child)
    return tok, lexicon.children[lexicon.child_start[node[tok]] + offset]


def _glue_targets(lexicon, tok, entry, first_letters):
    """Root children each word-end token may enter with no space: (tok (C,), child (C,)).

    For an entry of kind k, the targets are the first letters whose subtree holds
    an entry GLUES allows after kind k (lexicon.glue_to); one pass per kind."""
    out_tok, out_child = [np.zeros(0, int)], [np.zeros(0, int)]
    for k in range(len(KIND_NAMES)):
        ok = first_letters[lexicon.glue_to[first_letters, k]]
        these = tok[lexicon.kind[entry] == k]
        out_tok.append(np.repeat(these, len(ok)))
        out_child.append(np.tile(ok, len(these)))
    return np.concatenate(out_tok), np.concatenate(out_child)


def _completions(lexicon, histories, hist, node, glued):
    """Tokens at the end of an entry they may complete: (tokens (E,), entries (E,)).

    A token glued to the entry before completes only if GLUES allows its entry
    after that one (the last word of its history)."""
    entry = lexicon.word_at[node]
    last = histories.word[hist] >> 1  # -1 (LM_START >> 1) for the empty history
    prev_kind = np.where(last >= 0, lexicon.kind[np.maximum(last, 0)], 0)
    allowed = ~glued | ((last >= 0) & GLUES[prev_kind, lexicon.kind[np.maximum(entry, 0)]])
    tokens = np.flatnonzero((entry >= 0) & allowed)
    return tokens, entry[tokens]


# lm_decode's candidates for one time step, one block per CTC case. A block is
# (hist (C,), node (C,), glued (C,), mass (C, 3)) with mass = [on_label,
# in_blank, entering] log-probabilities; tree_step then advances them all.


def _entered(hist, node, glued, mass):
    """A block of candidates that enter `node` at this step with log-mass `mass` (C,);
    nothing of theirs is on the label or in a blank yet."""
    block = np.full((len(node), 3), -np.inf)
    block[:, 2] = mass
    return hist, node, glued, block


def _staying(hist, node, glued, on_label, in_blank):
    """CTC case "repeat the label, or a blank": every token as it is, on its node."""
    block = np.full((len(node), 3), -np.inf)
    block[:, 0], block[:, 1] = on_label, in_blank
    return hist, node, glued, block


def _into_children(lexicon, hist, node, glued, on_label, in_blank, likely):
    """CTC case "the next label of the entry": every child of a token's node whose label is
    likely, entered from the token's label only if the labels differ, always from a blank
    (entering with the child's skip)."""
    tok, child = _children_of(lexicon, node)
    keep = likely[lexicon.label[child]]
    tok, child = tok[keep], child[keep]
    return _entered(hist[tok], child, glued[tok], entering(on_label[tok], in_blank[tok], lexicon.skip[child]))


def _out_of_entries(lexicon, histories, hist, node, glued, on_label, in_blank, likely, space, first_letters):
    """CTC case "the label after a finished entry", in the history extended by the entry:
    two blocks. Through the space to the root: the space differs from every letter, so the
    entry's label and a blank both lead to it. Glued into a first letter that GLUES allows:
    a letter equal to the entry's last one needs a blank between them."""
    done, entry = _completions(lexicon, histories, hist, node, glued)
    done_hist = histories.extend(hist[done], 2 * entry + glued[done])  # (E,)
    spaced = np.flatnonzero(np.full(len(done), likely[space]))
    g_at, g_child = _glue_targets(lexicon, np.arange(len(done)), entry, first_letters)
    keep = likely[lexicon.label[g_child]]
    g_at, g_child = g_at[keep], g_child[keep]
    end_tok = done[spaced]
    to_space = _entered(done_hist[spaced], np.zeros(len(spaced), int), np.zeros(len(spaced), bool),
                        np.logaddexp(on_label[end_tok], in_blank[end_tok]))
    end_tok = done[g_at]
    glued_on = _entered(done_hist[g_at], g_child, np.ones(len(g_at), bool),
                        entering(on_label[end_tok], in_blank[end_tok],
                                 lexicon.label[g_child] != lexicon.label[node[end_tok]]))
    return to_space, glued_on


def _from_nothing(lexicon, first_letters, likely, space, nothing):
    """CTC case "the line's first label", after only blanks (log-mass `nothing`): a first
    letter, or the leading space, in the empty history."""
    starts = np.concatenate([first_letters[likely[lexicon.label[first_letters]]], [0] if likely[space] else []])
    return _entered(np.zeros(len(starts), int), starts.astype(int), np.zeros(len(starts), bool),
                    np.full(len(starts), nothing))


def _dominated(histories, hist, node, glued, on_label, in_blank, n_nodes):
    """(M,) True for tokens that can never win: another token has the same future
    and scores at least as much in both CTC states.

    Two tokens with the same last entry, node and glued flag differ only in the
    words before: every continuation adds the same to both, in proportion to
    their on-label and in-blank masses (the LM sees only the last entry). If
    token A's history score plus each of its masses is at least token B's,
    every continuation of B scores at most the same continuation of A. This is
    the recombination of equal futures in token passing (the paper keeps one
    token per word state), and exact for a Viterbi score; for the sum over
    alignments it is not: B's reading may also hold mass in other tokens (its
    alignments that are still in the previous word), which A's may lack. So
    lm_decode drops dominated tokens only where the beam would prune anyway
    (_beam_survivors). Each group is compared with its best token."""
    score = histories.score[hist]
    a, b = on_label + score, in_blank + score  # (M,)
    key = ((histories.word[hist].astype(np.int64) + 1) * n_nodes + node) * 2 + glued  # LM_START is -1
    order = np.lexsort((-np.logaddexp(a, b), key))  # by group, best first
    first = np.flatnonzero(np.diff(key[order], prepend=-1) != 0)
    leader = order[np.repeat(first, np.diff(np.append(first, len(order))))]  # (M,) each token's group leader, by order
    dominated = np.zeros(len(hist), bool)
    dominated[order] = (a[order] <= a[leader]) & (b[order] <= b[leader]) & (order != leader)
    return dominated


def _beam_survivors(histories, hist, node, glued, on_label, in_blank, n_nodes, beam):
    """(M,) True for the tokens lm_decode keeps after a step: every reachable
    token when at most `beam` are (or beam is None); else the dominated ones
    (_dominated) go first, and the best `beam` by history score plus CTC mass
    are chosen among those that remain."""
    alive = np.isfinite(on_label) | np.isfinite(in_blank)
    if beam is None or alive.sum() <= beam:
        return alive
    alive &= ~_dominated(histories, hist, node, glued, on_label, in_blank, n_nodes)
    if alive.sum() <= beam:
        return alive
    score = np.where(alive, np.logaddexp(on_label, in_blank) + histories.score[hist], -np.inf)
    kept = np.zeros(len(node), bool)
    kept[np.argpartition(-score, beam - 1)[:beam]] = True
    return kept


def lm_decode(log_probs, lexicon, lm, lm_weight=1.0, word_penalty=0.0, beam=64, oov_penalty=0.0):
    """The best reading of one text line: token passing on the prefix tree of the
    dictionary (Young, Russell and Thornton 1989), with a word language model.

    log_probs (T, K), whose alphabet has the space. A line is dictionary
    entries, each after a single space or glued to the one before (GLUES: e.g.
    punctuation), with optionally a space at either edge and blanks anywhere.
    A reading scores

        log p_CTC(labels | x) + sum over entries of [cost + word_penalty + lm_weight * log P_LM(word | previous)]
                              + lm_weight * log P_LM(</s> | last word),

    with p_CTC summed over the edge-space variants and all their alignments;
    cost is the entry's spelling (its case) and P_LM scores its LM word
    (lexicon.lm_id). A run of glued SPELLED characters (an out-of-dictionary
    token) scores cost per character, and word_penalty + oov_penalty once,
    with no LM score; the word after it is scored as a line's first. With a
    character model (lexicon.spelling) the run also scores
    log P(c1 | edge) + log P(c2 | c1) + ... + log P(edge | cn).

    A token is a (history, tree node, glued) triple carrying the CTC
    log-probabilities of the alignments so far that end on the node's label or
    in a blank after it (the root's label is the space); glued tokens entered
    their entry with no space. Tokens with the same triple spell the same
    labels, and merge by adding probabilities, as in prefix beam search; so
    with no pruning the scores are exact. At an entry's end a token may emit
    the space and move to the root, or glue into a first letter, with the
    entry appended to its history and scored by the language model.

    beam: the number of tokens kept after each time step, the best by score;
    None keeps every token (exact, and exponential in T: tiny problems only).
    Once the beam is full, a token also enters only labels more probable than
    EMISSION_FLOOR at that step (every label alike: letters, the space, and
    the space out of the all-blank start), and a step where only the blank is
    (most steps of a trained network) just advances the tokens: most of the
    speed. A beam that never fills prunes nothing: the exact result.
    lm: a LanguageModel over the LM words, or None for a uniform word prior.
    Vectorised over tokens; the Python loop is over time steps. Returns
    (entries, score, glued) with glued[i] True where entry i follows entry
    i - 1 with no space; ([], -inf, []) if no reading fits in T steps.
    """
    if " " not in lexicon.alphabet:
        raise ValueError("lm_decode reads lines: the alphabet needs the space")
    if beam is not None and beam < 1:
        raise ValueError(f"beam must be at least 1 (or None for no pruning), got {beam}")
    if lm is not None and lexicon.lm_id.max() >= len(lm.bigram.words):
        raise ValueError("the lexicon reads words the language model does not have")
    lp = np.asarray(log_probs, dtype=np.float64)
    N = len(lexicon.label)
    space = 1 + lexicon.alphabet.index(" ")
    node_class = np.where(np.arange(N) == 0, space, lexicon.label)  # the class each node's label emits
    kind, lm_id = lexicon.kind, lexicon.lm_id
    spelling = lexicon.spelling
    edge = len(spelling) - 1
    spelled_index = np.where(kind == SPELLED, np.cumsum(kind == SPELLED) - 1, edge)  # (W,) row and column in spelling

    def context(entry):
        """The LM context after an entry: its LM word; LM_START after a spelled character or at the start."""
        spelled = (entry < 0) | (kind[np.maximum(entry, 0)] == SPELLED)
        return np.where(spelled, LM_START, lm_id[np.maximum(entry, 0)])

    def spelled_end(entry):
        """log P(edge | the entry's character) where the entry is spelled (a spelled token ends there), else 0."""
        return np.where((entry >= 0) & (kind[np.maximum(entry, 0)] == SPELLED),
                        spelling[spelled_index[np.maximum(entry, 0)], edge], 0.0)

    def word_score(prev_code, code):
        """Score of appending history code (entry * 2 + glued) after prev_code."""
        entry, glued, prev = code >> 1, (code & 1) == 1, prev_code >> 1
        spelled = kind[entry] == SPELLED
        goes_on = spelled & glued & (prev >= 0) & (kind[np.maximum(prev, 0)] == SPELLED)
        lm_part = lm_log_prob(lm, context(prev), np.maximum(lm_id[entry], 0)) if lm is not None else 0.0
        new_token = word_penalty + np.where(spelled, oov_penalty, lm_weight * lm_part) + spelled_end(prev)
        character = np.where(spelled, spelling[np.where(goes_on, spelled_index[np.maximum(prev, 0)], edge),
                                               spelled_index[entry]], 0.0)
        return lexicon.cost[entry] + character + np.where(goes_on, 0.0, new_token)

    histories = _Histories(2 * len(lexicon.words), word_score)
    hist, node, glued = np.array([0]), np.array([0]), np.array([False])  # (M,) the tokens
    on_label, in_blank = np.array([-np.inf]), np.array([-np.inf])  # (M,)
    nothing = 0.0  # log P(only blanks so far): no label emitted yet
    first_letters = lexicon.children[lexicon.child_start[0]:lexicon.child_start[1]]
    everything = np.ones(lp.shape[1], bool)
    for y in lp:
        full = beam is not None and len(node) >= beam
        likely = y > np.log(EMISSION_FLOOR) if full else everything  # (K,)
        if not likely[1:].any():  # only the blank: nothing new can start
            on_label, in_blank = tree_step(on_label, in_blank, -np.inf, y[node_class[node]], y[BLANK])
            nothing += y[BLANK]
            continue
        # Candidates, one block per CTC case: every token as it is; a child of
        # its node; out of a finished entry, through the space or glued; and the
        # line's first label after only blanks.
        blocks = [_staying(hist, node, glued, on_label, in_blank),
                  _into_children(lexicon, hist, node, glued, on_label, in_blank, likely),
                  *_out_of_entries(lexicon, histories, hist, node, glued, on_label, in_blank, likely, space,
                                   first_letters),
                  _from_nothing(lexicon, first_letters, likely, space, nothing)]
        c_hist, c_node, c_glued, c_mass = (np.concatenate(parts) for parts in zip(*blocks))
        c_node = c_node.astype(int)
        # Tokens that spell the same labels merge.
        key = (c_hist.astype(np.int64) * N + c_node) * 2 + c_glued
        order = np.argsort(key, kind="stable")
        starts = np.flatnonzero(np.diff(key[order], prepend=-1) != 0)
        merged = group_logsumexp(c_mass[order], starts)
        hist, node, glued = c_hist[order][starts], c_node[order][starts], c_glued[order][starts]
        on_label, in_blank = tree_step(merged[:, 0], merged[:, 1], merged[:, 2], y[node_class[node]], y[BLANK])
        nothing += y[BLANK]
        alive = _beam_survivors(histories, hist, node, glued, on_label, in_blank, N, beam)
        hist, node, glued, on_label, in_blank = hist[alive], node[alive], glued[alive], on_label[alive], in_blank[alive]

    # A line ends on an entry (its last one not followed by a space) or on the
    # space after one; both spell the same entries and are added together.
    total = np.logaddexp(on_label, in_blank)
    done, entry = _completions(lexicon, histories, hist, node, glued)
    after_space = np.flatnonzero((node == 0) & (hist > 0))
    line_hist = np.concatenate([histories.extend(hist[done], 2 * entry + glued[done]), hist[after_space]])
    if not len(line_hist):
        return [], -np.inf, []
    order = np.argsort(line_hist, kind="stable")
    starts = np.flatnonzero(np.diff(line_hist[order], prepend=-1) != 0)
    ctc = group_logsumexp(np.concatenate([total[done], total[after_space]])[order][:, None], starts)[:, 0]
    line_hist = line_hist[order][starts]
    last = histories.word[line_hist] >> 1
    end_score = lm_weight * lm_end_log_prob(lm, context(last)) if lm is not None else 0.0
    score = ctc + histories.score[line_hist] + end_score + spelled_end(last)
    best = int(np.argmax(score))
    codes = histories.words(line_hist[best])
    return [lexicon.words[c >> 1] for c in codes], float(score[best]), [bool(c & 1) for c in codes]


# Decoding time, estimated before any work: lm_decode costs about a fixed
# overhead per time step plus a cost per token per step. Measured on this
# machine when idle: 44 ms for an 836-step IAM-OnDB line at beam 64, and 369 ms
# a line at beam 1,024 on the 103 check lines of 776 steps (0.4 us per
# token-step beyond the step overhead; 1 us, the earlier constant, was measured
# under load and overestimated the beam-1,024 headline's decoding 2x). The
# bound refuses only what would take days.
LM_STEP_SECONDS = 6e-5
LM_TOKEN_STEP_SECONDS = 4e-7
TUNING_DECODES = 20  # grid points a coordinate search typically scores (tune_lm_decoder)
LM_TIME_LIMIT = 48 * 3600.0  # seconds of lm decoding a run may be estimated to need
LM_TIME_WARNING = 3600.0


def lm_decoding_seconds(cfg, data, n_sizes):
    """Estimated seconds of lm decoding in a run: the final evaluation if it uses
    the lm decoder, and the dictionary experiment at n_sizes sizes (0: none),
    from the evaluation lines' lengths, cfg.lm_beam and cfg.workers."""
    lengths = {split: [len(s.traj) for s in samples] for split, samples in data.eval_sets.items()}

    def per_line(split, beam=cfg.lm_beam):
        n = lengths.get(split)
        return float(np.mean(n)) * (LM_STEP_SECONDS + beam * LM_TOKEN_STEP_SECONDS) if n else 0.0

    seconds = sum(per_line(s) * len(n) for s, n in lengths.items()) if cfg.decoder == "lm" else 0.0
    validation = lengths.get("validation", [])
    if cfg.decoder == "lm" and cfg.lm_tuning:  # tune_final_decoder
        seconds += per_line("validation") * len(tuning_split(validation, cfg.lm_tuning)[0]) * TUNING_DECODES
    if n_sizes:
        decoders = 3 * n_sizes + len(OOV_MODES)  # dictionary, unigram, bigram per size; the OOV comparison
        tuning = len(tuning_split(validation, TUNING_LINES)[0])  # and about as many check lines
        seconds += per_line("validation") * tuning * (TUNING_DECODES * decoders + len(OOV_MODES) + 1)
        seconds += per_line("validation", BEAM_CHECK_FACTOR * cfg.lm_beam) * tuning  # wider_beam_check
        seconds += per_line("test") * len(lengths.get("test", [])) * 3 * n_sizes
    return seconds / cfg.workers  # make_decoder deals the lines over the run's processes


def check_lm_decoding_time(cfg, data, n_sizes, log=None):
    """UserError if the run's lm decoding is estimated to take longer than LM_TIME_LIMIT; a log line beyond an hour."""
    seconds = lm_decoding_seconds(cfg, data, n_sizes)
    if seconds > LM_TIME_LIMIT:
        raise UserError(f"--lm-beam {cfg.lm_beam}: the lm decoding would take about {seconds / 3600:.0f} hours "
                        f"(estimated from {LM_TOKEN_STEP_SECONDS * 1e6:.1f} us per token and time step); the bound "
                        f"is {LM_TIME_LIMIT / 3600:.0f} hours; use a smaller --lm-beam")
    if seconds > LM_TIME_WARNING and log:
        log(f"note: the lm decoding is estimated to take about {seconds / 3600:.1f} hours at --lm-beam {cfg.lm_beam}")
    return seconds


def lm_read(log_probs, lexicon, lm, lm_weight, word_penalty, beam, oov_penalty):
    """One line's lm_decode reading, its pieces glued back into a string; a
    module-level function, so that a worker process can run it (make_decoder)."""
    words, _, glued = lm_decode(log_probs, lexicon, lm, lm_weight, word_penalty, beam, oov_penalty)
    return glue_pieces(list(zip(words, glued)))


def make_decoder(name, cfg, alphabet, lexicon=None, lm=None, texts=None, parallel_map=None):
    """A function from a list of (T_i, K) log-prob arrays to decoded strings.

    lexicon: the dictionary (default: for "lexicon", the task's Task.lexicon:
    for words the whole vocabulary, held-out words included, as in the paper
    whose test words are in the dictionary; for "lm", decoder_lexicon at
    cfg.dictionary_size).
    lm: the language model of the "lm" decoder (default: the bigram
    decoder_language_model over that dictionary; None when cfg.lm_weight is 0).
    texts: {"train": lines, "validation": lines} of the task's transcriptions
    (iam-ondb) for the real-English dictionary and LM, or None.
    parallel_map: a Pool's map, over which the "lm" decoder deals its lines
    (each reading is independent of the others, so the result is the same);
    None reads them in this process.
    """
    if name == "greedy":
        return lambda lps: [decode_labels(d, alphabet) for d in greedy_decode(*pad_log_probs(lps))]
    if name == "beam":
        return lambda lps: [decode_labels(beam_search_decode(lp, cfg.beam_width)[0], alphabet) for lp in lps]
    if name == "lexicon":
        lex = build_lexicon(TASKS[cfg.task].lexicon if lexicon is None else lexicon, alphabet)
        return lambda lps: lexicon_decode_many(lps, lex)
    if name == "lm":
        if lexicon is None:
            lexicon = decoder_lexicon(cfg, alphabet, texts, cfg.dictionary_size)
            lm = decoder_language_model(cfg, texts, cfg.dictionary_size, 2 if cfg.lm_weight > 0 else 0)

        # The lexicon and LM travel with every map (about 13 MB pickled at 20,000 words, 55 ms),
        # a small price against seconds of decoding per half of a chunk.
        read = functools.partial(lm_read, lexicon=lexicon, lm=lm, lm_weight=cfg.lm_weight,
                                 word_penalty=cfg.word_penalty, beam=cfg.lm_beam, oov_penalty=cfg.oov_penalty)
        return lambda lps: (parallel_map or serial_map)(read, list(lps))
    raise ValueError(f"unknown decoder {name!r}; choose from {', '.join(DECODERS)}")


# ---------------------------------------------------------------------------
# 9. Optimiser
# ---------------------------------------------------------------------------


def clip_global_norm(grads, max_norm):
    """Scale all gradients together so their joint L2 norm is at most max_norm.

    Returns the norm before clipping.
    """
    norm = float(np.sqrt(sum(float(np.vdot(g, g)) for g in grads.values())))
    if norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


def adam_init(params):
    return {"t": 0, "m": {k: np.zeros_like(p) for k, p in params.items()},
            "v": {k: np.zeros_like(p) for k, p in params.items()}}


def learning_rate(cfg, step, total_steps):
    """Linear decay from cfg.lr at step 0 to cfg.lr * cfg.lr_final at the last step."""
    frac = step / max(total_steps - 1, 1)
    return cfg.lr * (1.0 - (1.0 - cfg.lr_final) * frac)


def adam_step(params, grads, state, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """One Adam update of every parameter, in place (Kingma and Ba 2015)."""
    state["t"] += 1
    t = state["t"]
    step = lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)  # both bias corrections
    for k, p in params.items():
        m, v, g = state["m"][k], state["v"][k], grads[k]
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * g * g
        p -= step * m / (np.sqrt(v) + eps)




# ---------------------------------------------------------------------------
# 10. Training and evaluation
# ---------------------------------------------------------------------------

STREAMS = ("split", "data", "init", "shuffle", "eval", "noise")  # appended: spawned children keep their seeds


def make_streams(seed):
    """Independent named generators, so e.g. evaluation data never shifts training data."""
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: np.random.default_rng(s) for name, s in zip(STREAMS, children)}


class Timer:
    """Accumulates wall seconds per phase."""

    def __init__(self):
        self.seconds = {}

    def add(self, phase, since):
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now


class Diverged(Exception):
    """Training produced a non-finite loss or gradient."""


def make_batches(samples, batch_size, order, bucket=0, rng=None):
    """Minibatches of sample indices, each sorted by length so padding is short.

    bucket 0: consecutive chunks of `order`. bucket n: `order` is cut into
    groups of n batches, each group sorted by length and cut into batches, and
    the batches are shuffled with `rng`; so a batch holds sequences of similar
    length, and a step costs its own length rather than its longest outlier.
    """
    lengths = np.array([len(s.traj) for s in samples])
    if bucket:
        group = bucket * batch_size
        order = np.concatenate([g[np.argsort(lengths[g], kind="stable")]
                                for g in (order[i:i + group] for i in range(0, len(order), group))])
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = [chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in chunks]
    return [batches[i] for i in rng.permutation(len(batches))] if bucket else batches


def ctc_feasible(lengths, targets):
    """(B,) bool: can T_b steps carry the labels? Each label needs a step, and
    each repeated letter a blank between its two copies."""
    need = [len(y) + sum(a == b for a, b in zip(y, y[1:])) for y in targets]
    return np.asarray(lengths) >= np.array(need, dtype=int)


def part_gradients(params, X, lengths, targets, n_used, timer=None, kept=None, dropout=0.0):
    """Forward, CTC and backward on one part of a batch.

    kept: None, or the part's dropout draw, (layers, T, B, R*H) booleans, True
    for the outputs kept (a quarter of the bytes of float32 factors, to send
    to a worker). Returns (grads of the summed nll / n_used, the summed nll,
    its label count). Runs in worker processes too, so it only reads its arguments.
    """
    timer = timer or Timer()
    t0 = time.perf_counter()
    keep = None if kept is None else kept.astype(params["out_W"].dtype) / (1.0 - dropout)
    log_probs, cache = forward(params, X, lengths, keep)
    t0 = timer.add("forward", t0)
    nll, grad = ctc_loss(log_probs, lengths, targets)
    t0 = timer.add("ctc", t0)
    grads = backward(params, cache, grad / n_used)
    timer.add("backward", t0)
    usable = ctc_feasible(lengths, targets)
    return grads, float(nll[usable].sum()), sum(len(y) for y, u in zip(targets, usable) if u)


def train_step(params, adam, samples, lr, cfg, data, timer, pool=None, noise_rng=None):
    """Forward, CTC, backward, clip and Adam on one minibatch.

    With a pool, the length-sorted batch is cut into one contiguous part per
    process and the parts' gradients are summed (equal to one process up to
    float rounding). With cfg.weight_noise, the gradient is taken at the
    weights plus Gaussian noise drawn from noise_rng, and applied to the
    weights without it. With cfg.dropout, one draw from noise_rng (after the
    weight noise) covers the whole batch and each part gets its slice, so the
    parts see what one process would. Sequences whose labels cannot fit their
    length are skipped. Returns (summed nll of the usable sequences, their label count,
    number skipped). Raises Diverged on a non-finite loss or gradient, before
    the parameters are touched.
    """
    t0 = time.perf_counter()
    dtype = params["out_W"].dtype
    targets = [s.labels for s in samples]
    usable = ctc_feasible([len(s.traj) for s in samples], targets)
    n_used = int(usable.sum())
    if n_used == 0:
        return 0.0, 0, len(samples)
    samples = [s for s, u in zip(samples, usable) if u]
    n_parts = min(pool.processes if pool else 1, len(samples))
    bounds = np.linspace(0, len(samples), n_parts + 1).round().astype(int)

    at = params
    if cfg.weight_noise:
        at = {k: v + noise_rng.normal(0.0, cfg.weight_noise, v.shape).astype(v.dtype) for k, v in params.items()}
    kept = None
    if cfg.dropout:
        layers, R, H = model_shape(params)
        kept = noise_rng.random((layers, max(len(s.traj) for s in samples), len(samples), R * H),
                                dtype=np.float32) >= cfg.dropout

    def part(i):
        part_samples = samples[bounds[i]:bounds[i + 1]]
        X, lengths = pad_batch(part_samples, data.input_shift, data.input_scale, dtype, data.input_squash)
        part_kept = None if kept is None else kept[:, :X.shape[0], bounds[i]:bounds[i + 1]]
        return X, lengths, [s.labels for s in part_samples], part_kept

    # The workers' parts go out first, so that they start while this process pads its own.
    pending = []
    for i in range(1, n_parts):
        X, lengths, part_targets, part_kept = part(i)
        pending.append(pool.submit(part_gradients, at, X, lengths, part_targets, n_used, None, part_kept,
                                   cfg.dropout))
    X, lengths, part_targets, part_kept = part(0)
    t0 = timer.add("data", t0)
    grads, nll_sum, n_chars = part_gradients(at, X, lengths, part_targets, n_used, timer, part_kept, cfg.dropout)
    t0 = time.perf_counter()
    for other in pending:
        g, s, n = other.get()
        for k in grads:
            grads[k] += g[k]
        nll_sum, n_chars = nll_sum + s, n_chars + n
    t0 = timer.add("wait", t0)
    norm = clip_global_norm(grads, cfg.grad_clip)
    if not (math.isfinite(nll_sum) and math.isfinite(norm)):
        raise Diverged(f"{'loss' if not math.isfinite(nll_sum) else 'gradient norm'} is "
                       f"{nll_sum if not math.isfinite(nll_sum) else norm}")
    adam_step(params, grads, adam, lr)
    timer.add("optimiser", t0)
    return nll_sum, n_chars, len(usable) - n_used


class WorkerLost(Exception):
    """A worker process died (the OOM killer, a signal): its share of the work is lost."""


def _start_worker():
    # A forked worker inherits the main process's handlers, and SIGTERM's raises Terminated: on
    # pool.terminate() that printed a traceback from the worker. A worker dies quietly on SIGTERM
    # and ignores Ctrl-C, which reaches every process of the group; only the main process reports.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked while Pool forked it


def _apply_to_chunk(fn, chunk):
    out = [fn(item) for item in chunk]
    # What a map job frees (featurising's temporaries, earlier replies) is not reused by the
    # training steps between maps, and keep_freed_memory would hold it resident all run.
    release_freed_memory()
    return out


def _worker_loop(conn):
    """A worker process: run (sequence number, fn, args) jobs from `conn` until it closes, and
    send back (sequence number, ok, result or exception)."""
    _start_worker()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        seq, fn, args = job
        try:
            reply = (seq, True, fn(*args))
        except Exception as e:  # noqa: BLE001 - raised again in the main process
            reply = (seq, False, e)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as e:  # noqa: BLE001 - an exception that cannot be pickled
            conn.send((seq, False, RuntimeError(f"{type(e).__name__} in a worker: {e}")))


POOL_POLL_SECONDS = 0.25  # a waiting main process looks at signals and dead workers this often


class _Worker:
    """One worker process and its own pipe: no lock is shared with the other workers, so a killed
    worker cannot leave one held (multiprocessing.Pool then hangs, in get() and in terminate())."""

    def __init__(self, context):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_loop, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.queued, self.results, self.busy = [], {}, False

    def send_next(self):
        """Send the next queued job, only to an idle worker: both ends never block sending at once."""
        if self.queued and not self.busy:
            self.conn.send(self.queued.pop(0))
            self.busy = True

    def lost(self):
        code = self.process.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               and -code in signal.valid_signals() else f"exit status {code}")
        return WorkerLost(f"worker process {self.process.pid} died ({how}; out of memory?)")

    def wait_for(self, seq):
        while seq not in self.results:
            ready = multiprocessing.connection.wait([self.conn, self.process.sentinel], POOL_POLL_SECONDS)
            if self.conn in ready:
                try:
                    done, ok, value = self.conn.recv()
                except (EOFError, OSError):
                    self.process.join(1.0)
                    raise self.lost() from None
                self.results[done] = (ok, value)
                self.busy = False
                self.send_next()
            elif ready:  # the sentinel alone: the process ended with nothing left to read
                self.process.join(1.0)
                raise self.lost()
        ok, value = self.results.pop(seq)
        if not ok:
            raise value
        return value


class _Pending:
    """A submitted job; get() waits for its result (signals are handled while it waits)."""

    def __init__(self, worker, seq):
        self.worker, self.seq = worker, seq

    def get(self):
        return self.worker.wait_for(self.seq)


class Pool:
    """`processes - 1` worker processes that share batches and rendering with this one.

    Workers are forked after the data is built, so they start with the same
    module state (glyph tables, word statistics). Jobs are module-level
    functions of their arguments, dealt to the workers in turn; results come
    back in submission order, so what a run computes does not depend on
    timing. A worker that dies raises WorkerLost in the waiting process.
    """

    def __init__(self, processes):
        self.processes = processes
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        # SIGTERM stays blocked from fork until a worker has reset the handler it inherits
        # (_start_worker); a signal meanwhile waits for this process's unblocking below.
        masking = hasattr(signal, "pthread_sigmask")
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if masking else None
        self.workers = []
        try:
            for _ in range(processes - 1):
                self.workers.append(_Worker(context))
        except BaseException:
            self.close()
            raise
        finally:
            if masking:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.jobs = 0

    def submit(self, fn, *args):
        worker = self.workers[self.jobs % len(self.workers)]
        worker.queued.append((self.jobs, fn, args))
        self.jobs += 1
        try:
            worker.send_next()
        except (EOFError, OSError):
            raise worker.lost() from None
        return _Pending(worker, self.jobs - 1)

    def map(self, fn, items):
        """[fn(item) for item in items], the items split evenly over the processes; each
        process then gives the heap that its share freed back to the kernel."""
        chunks = np.array_split(np.arange(len(items)), self.processes)
        pending = [self.submit(_apply_to_chunk, fn, [items[i] for i in c]) for c in chunks[1:]]
        out = _apply_to_chunk(fn, [items[i] for i in chunks[0]])
        for p in pending:
            out += p.get()
        return out

    def close(self):
        """Stop every worker, even in the middle of a job (they die quietly on SIGTERM)."""
        for w in self.workers:
            if w.process.is_alive():
                w.process.terminate()
        for w in self.workers:
            w.process.join(5.0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()


def serial_map(fn, items):
    return _apply_to_chunk(fn, items)


EVAL_BATCH = 64  # measured fastest per frame for the forward pass alone
EVAL_FRAMES = 32_768  # padded frames per evaluation chunk: at H = 100 about 11 kB each (caches, logits)
EVAL_THREADS = 2  # numpy releases the GIL in ufuncs and BLAS; chunks are independent


def eval_chunks(lengths):
    """Index chunks of a length-sorted order, each at most EVAL_BATCH sequences
    and EVAL_FRAMES padded frames (one sequence at least), so that an
    evaluation's memory is bounded by its longest line, not its number of lines."""
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = np.asarray(lengths)[order]
    chunks, start = [], 0
    while start < len(order):
        width = np.arange(1, min(EVAL_BATCH, len(order) - start) + 1)
        fits = width * sorted_lengths[start:start + len(width)] <= EVAL_FRAMES  # non-increasing: lengths sorted
        n = max(1, int(fits.sum()))
        chunks.append(order[start:start + n])
        start += n
    return chunks


def model_outputs(params, samples, data):
    """Yield (indices, [(T_i, K) float64 log-probs]) chunk by chunk (eval_chunks),
    EVAL_THREADS chunks at a time, so that only those chunks' outputs are held."""
    def run_chunk(idx):
        X, lengths = pad_batch([samples[i] for i in idx], data.input_shift, data.input_scale, params["out_W"].dtype,
                               data.input_squash)
        log_probs, _ = forward(params, X, lengths, cache=False)
        return [log_probs[:n, b].astype(np.float64) for b, n in enumerate(lengths)]

    chunks = eval_chunks([len(s.traj) for s in samples])
    with ThreadPoolExecutor(EVAL_THREADS) as threads:
        for first in range(0, len(chunks), EVAL_THREADS):
            group = chunks[first:first + EVAL_THREADS]
            yield from zip(group, threads.map(run_chunk, group))


def run_model(params, samples, data):
    """Log-probabilities for every sample: a list of (T_i, K) float64 arrays.
    For small sets; evaluate() and the experiments go chunk by chunk."""
    out = [None] * len(samples)
    for idx, lps in model_outputs(params, samples, data):
        for i, lp in zip(idx, lps):
            out[i] = lp
    return out


def evaluate(params, samples, data, decode, keep=(), also=None):
    """Loss, CER, WER and word accuracy of one evaluation set, chunk by chunk.

    `decode` (from make_decoder) maps a list of (T_i, K) log-prob arrays to
    strings. also: {name: decode} for more decoders, whose rates go under
    metrics[name] (the greedy reading beside the lm decoder's). Returns
    (metrics, decoded strings, {i: (T_i, K) log-probs} for the sample indices
    in `keep`).
    """
    n, also = len(samples), also or {}
    nll, hyps, kept, keep = np.zeros(n), [None] * n, {}, set(keep)
    more = {name: [None] * n for name in also}
    for idx, lps in model_outputs(params, samples, data):
        nll[idx] = -ctc_log_likelihood(*pad_log_probs(lps), [samples[i].labels for i in idx])
        for i, lp, h in zip(idx, lps, decode(lps)):
            hyps[i] = h
            if i in keep:
                kept[i] = lp
        for name, other in also.items():
            for i, h in zip(idx, other(lps)):
                more[name][i] = h
    finite = np.isfinite(nll)
    n_chars = sum(len(s.labels) for s, f in zip(samples, finite) if f)
    refs = [s.text for s in samples]
    metrics = {**rates(error_counts(refs, hyps)), **{name: rates(error_counts(refs, h)) for name, h in more.items()}}
    return {**metrics, "loss": float(nll[finite].sum() / max(n_chars, 1))}, hyps, kept


def alignment_record(sample, split, log_probs, alphabet):
    """What the alignment figures need about one sample, as JSON-ready lists."""
    decoded = decode_labels(greedy_decode(log_probs[:, None, :], [len(log_probs)])[0], alphabet)
    return {
        "text": sample.text, "split": split, "writer": sample.writer,
        "xy": sample.xy.round(5).tolist(),
        "pen_up": sample.pen_up.tolist(),
        "char_of": sample.char_of.tolist() if sample.char_of is not None else None,
        "log_probs": log_probs.round(4).tolist(),
        "argmax_path": np.argmax(log_probs, axis=1).tolist(),
        "decoded": decoded,
        "cer": cer(decoded, sample.text),
    }


def group_errors(task, eval_sets, hyps_of):
    """run.json's per-word or per-writer error counts and rates, over every evaluation split."""
    groups = {}
    for split, samples in eval_sets.items():
        for s, h in zip(samples, hyps_of[split]):
            name = s.text if task.group_by == "word" else s.writer
            entry = groups.setdefault(name, {"split": split, "n": 0, **dict.fromkeys(error_counts([], []), 0)})
            entry["n"] += 1
            for k, v in error_counts([s.text], [h]).items():
                entry[k] += v
    return {name: {**e, **rates(e)} for name, e in groups.items()}


def final_report(params, cfg, task, data, timer, parallel_map=None):
    """The evaluation part of run.json: final metrics, per group, predictions,
    alignments. parallel_map: as in make_decoder."""
    t0 = time.perf_counter()
    decode = make_decoder(cfg.decoder, cfg, data.alphabet, texts=data.lm_texts or None, parallel_map=parallel_map)
    final, predictions, hyps_of, log_probs_of = {}, [], {}, {}
    for split, samples in data.eval_sets.items():
        picks = [i for pick_split, i in data.alignment_picks if pick_split == split]
        also = {"greedy": make_decoder("greedy", cfg, data.alphabet)} if cfg.decoder != "greedy" else None
        final[split], hyps_of[split], log_probs_of[split] = evaluate(params, samples, data, decode, picks, also)
        predictions += [{"text": s.text, "split": split, "writer": s.writer, "decoded": h}
                        for s, h in zip(samples, hyps_of[split])]
    alignments = [alignment_record(data.eval_sets[split][i], split, log_probs_of[split][i], data.alphabet)
                  for split, i in data.alignment_picks]
    timer.add("evaluation", t0)
    return {"final": final, f"per_{task.group_by}": group_errors(task, data.eval_sets, hyps_of),
            "predictions": predictions, "alignments": alignments}


def decoding_experiment(outputs, samples, sizes, fixed, by_size, describe=None):
    """Decode evaluation splits with each decoder, timing it, chunk by chunk.

    outputs(split) -> (indices, [(T_i, K) arrays]) chunks (model_outputs), so
    that only one chunk's log-probs are held while every decoder reads it.
    samples: {split: [Sample]}. fixed: {name: decode} for decoders that ignore
    the size (run once, reported at every size); by_size(size) -> {name:
    (decode, extra dict for its rows)}; describe(size, refs, hyps) -> more keys
    for a row. Returns rows of {size, decoder, split, cer, wer, word_acc,
    seconds_per_seq, n, ...}.
    """
    decoders = {(None, name): (decode, {}) for name, decode in fixed.items()}
    for size in sizes:
        decoders.update({(size, name): found for name, found in by_size(size).items()})
    rows = []
    for split, split_samples in samples.items():
        hyps = {key: [None] * len(split_samples) for key in decoders}
        seconds = dict.fromkeys(decoders, 0.0)
        for idx, lps in outputs(split):
            for key, (decode, _) in decoders.items():
                t0 = time.perf_counter()
                for i, h in zip(idx, decode(lps)):
                    hyps[key][i] = h
                seconds[key] += time.perf_counter() - t0
        refs = [s.text for s in split_samples]
        scores = {key: {**rates(error_counts(refs, hyps[key])), "seconds_per_seq": seconds[key] / len(refs),
                        "n": len(refs)} for key in decoders}
        for size in sizes:
            for (at, name), (_, extra) in decoders.items():
                if at is None or at == size:
                    more = describe(size, refs, hyps[at, name]) if describe else {}
                    rows.append({"size": size, "decoder": name, "split": split, **scores[at, name], **extra, **more})
    return rows


def lexicon_experiment(params, cfg, data, sizes, log=print, parallel_map=None):
    """Greedy, beam and lexicon decoding of every evaluation word against
    lexicons of the given sizes: the 47 vocabulary words (held-out words
    included) plus distractor pseudo-words. Returns run.json's `decoding`.
    parallel_map is not used: these decoders are vectorised over the words
    already, and take milliseconds."""
    t_start = time.perf_counter()
    distractors = distractor_words(max(sizes) - len(VOCAB))
    rows = decoding_experiment(
        lambda split: model_outputs(params, data.eval_sets[split], data), data.eval_sets, sizes,
        {d: make_decoder(d, cfg, data.alphabet) for d in ("greedy", "beam")},
        lambda size: {"lexicon": (make_decoder("lexicon", cfg, data.alphabet,
                                               VOCAB + distractors[:size - len(VOCAB)]), {})})
    decoding = {"kind": "lexicon", "sizes": list(sizes), "beam_width": cfg.beam_width, "rows": rows,
                "seconds": time.perf_counter() - t_start}
    log(format_decoding(decoding))
    return decoding


def word_error_breakdown(refs, hyps, dictionary):
    """Where a corpus's word errors come from.

    Each line's word-level edit alignment splits its word edits into: oov
    (reference words outside the dictionary, which a closed-vocabulary decoder
    cannot produce), similar (substitutions by a dictionary word within two
    letters), other (the remaining substitutions), deleted and inserted; these
    sum to the word edits. merged (a hypothesis word spelling two consecutive
    reference words) and split (a reference word read as two consecutive
    hypothesis words) count segmentation errors, whose edits appear above.
    """
    counts = dict.fromkeys(("oov", "similar", "other", "deleted", "inserted", "merged", "split"), 0)
    for ref, hyp in zip(refs, hyps):
        r, h = ref.split(), hyp.split()
        counts["merged"] += sum(w in {a + b for a, b in zip(r, r[1:])} for w in h)
        counts["split"] += sum(w in {a + b for a, b in zip(h, h[1:])} for w in r)
        for a, b in edit_alignment(r, h):
            if a == b:
                continue
            kind = ("inserted" if a is None else "oov" if a not in dictionary else "deleted" if b is None
                    else "similar" if levenshtein(a, b) <= 2 else "other")
            counts[kind] += 1
    return counts


LM_WEIGHTS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # the tuning grid; the search starts at weight 1, penalty 0
WORD_PENALTIES = (-4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0, 10.0)
OOV_PENALTIES = (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0)  # per spelled token, when the dictionary spells (cfg.oov)
TUNING_LINES = 100  # validation lines used for tuning (every k-th); the lines after them check the OOV modes
# The headline real run tunes on more: 480 of testset_v's lines (every 3rd) read the second validation
# set 0.34 points of WER better than 103 did, for about 25 more minutes of a run within its 2 hours.
HEADLINE_TUNING_LINES = 400


def tune_lm_decoder(cfg, log_probs, refs, lex, lm, parallel_map=None):
    """(lm_weight, word_penalty, oov_penalty) for the lm decoder, chosen on validation lines.

    A coordinate search on the grid LM_WEIGHTS x WORD_PENALTIES (x OOV_PENALTIES
    if the lexicon spells out-of-dictionary tokens): from weight 1, penalties 0,
    move to the neighbour with the lowest (WER, CER) until none is better.
    With lm None (a uniform word prior) the weight is not tuned. parallel_map:
    as in make_decoder.
    """
    grids = (LM_WEIGHTS if lm is not None else (0.0,), WORD_PENALTIES,
             OOV_PENALTIES if (lex.kind == SPELLED).any() else (0.0,))
    cost = {}

    def evaluate(point):
        if point not in cost:
            w, p, o = (grid[i] for grid, i in zip(grids, point))
            tuned = dataclasses.replace(cfg, lm_weight=w, word_penalty=p, oov_penalty=o)
            m = rates(error_counts(refs, make_decoder("lm", tuned, lex.alphabet, lex, lm,
                                                     parallel_map=parallel_map)(log_probs)))
            cost[point] = (m["wer"], m["cer"])
        return cost[point]

    here = tuple(grid.index(1.0 if i == 0 and lm is not None else 0.0) for i, grid in enumerate(grids))
    while True:
        around = [here[:d] + (here[d] + step,) + here[d + 1:] for d in range(3) for step in (-1, 1)
                  if 0 <= here[d] + step < len(grids[d])]
        best = min([here] + around, key=evaluate)  # ties keep the current point
        if best == here:
            return tuple(grid[i] for grid, i in zip(grids, here))
        here = best


def tuning_split(validation, n):
    """(tuning lines, check lines): about n validation lines, every k-th, and the n lines
    right after them (k at least 2, so the two sets never share a line)."""
    step = max(2, len(validation) // n)
    return validation[::step], validation[1::step]


def tune_final_decoder(params, cfg, data, log=print, parallel_map=None):
    """cfg with the lm decoder's weight and penalties chosen (tune_lm_decoder) on
    about cfg.lm_tuning validation lines, at cfg's dictionary, LM file and OOV
    mode; and run.json's `lm_tuning` record of what was chosen on which lines.
    parallel_map: as in make_decoder."""
    t0 = time.perf_counter()
    samples = tuning_split(data.eval_sets["validation"], cfg.lm_tuning)[0]
    texts = data.lm_texts or None
    lexicon = decoder_lexicon(cfg, data.alphabet, texts, cfg.dictionary_size)
    lm = decoder_language_model(cfg, texts, cfg.dictionary_size, 2)
    weight, penalty, oov_penalty = tune_lm_decoder(cfg, run_model(params, samples, data), [s.text for s in samples],
                                                   lexicon, lm, parallel_map)
    record = {"lines": len(samples), "lm_weight": weight, "word_penalty": penalty, "oov_penalty": oov_penalty,
              "seconds": time.perf_counter() - t0}
    log(f"lm decoder tuned on {len(samples)} validation lines in {record['seconds']:.0f} s: lm_weight {weight}, "
        f"word_penalty {penalty}, oov_penalty {oov_penalty}")
    return dataclasses.replace(cfg, lm_weight=weight, word_penalty=penalty, oov_penalty=oov_penalty), record


def in_dictionary_tokens(refs, words):
    """The reference tokens (as written) every piece of which, lower-cased, is an LM word in `words`."""
    return {tok for ref in refs for tok in ref.split() if all(p.lower() in words for p in split_token(tok))}


def dictionary_experiment(params, cfg, data, sizes, log=print, split="test", parallel_map=None):
    """The paper's comparison, on the test lines (or, with split "validation",
    on the validation lines not used for tuning): greedy; the dictionary with a
    uniform word prior; dictionary + unigram; dictionary + bigram; at each
    dictionary size. The LM weight and penalties of each decoder are tuned on
    every k-th validation line (TUNING_LINES of them), never on test lines.

    Out-of-dictionary tokens: at the largest size, the bigram decoder is tuned
    with each OOV mode (none, chars, token) and scored on the validation lines
    right after the tuning lines; the best (lowest WER, then CER) is used for
    every size and decoder. Log-probs are computed chunk by chunk
    (model_outputs), so memory does not grow with the number of lines.
    parallel_map: as in make_decoder. Returns run.json's `decoding`."""
    t_start = time.perf_counter()
    texts = data.lm_texts or None
    validation = data.eval_sets["validation"]
    tune_samples, check_samples = tuning_split(validation, TUNING_LINES)
    tune_lps, check_lps = run_model(params, tune_samples, data), run_model(params, check_samples, data)
    tune_refs, check_refs = [s.text for s in tune_samples], [s.text for s in check_samples]
    tuned_on = set(map(id, tune_samples))
    report = {"test": data.eval_sets["test"]} if split == "test" else \
        {"validation": [s for s in validation if id(s) not in tuned_on]}
    report_refs = [s.text for s in report[split]]
    tokenise = lm_words if (texts or cfg.lm_file or cfg.dictionary_file) else str.split

    largest = max(sizes)
    oov_modes = {}
    if texts or cfg.oov != "none":  # the real-English task, or a run that asked for spelling
        lm = decoder_language_model(cfg, texts, largest, 2)
        for mode in OOV_MODES:
            mode_cfg = dataclasses.replace(cfg, oov=mode)
            lex = decoder_lexicon(mode_cfg, data.alphabet, texts, largest)
            t0 = time.perf_counter()
            weight, penalty, oov_penalty = tune_lm_decoder(mode_cfg, tune_lps, tune_refs, lex, lm, parallel_map)
            chosen = dataclasses.replace(mode_cfg, lm_weight=weight, word_penalty=penalty, oov_penalty=oov_penalty)
            m = rates(error_counts(check_refs, make_decoder("lm", chosen, data.alphabet, lex, lm,
                                                           parallel_map=parallel_map)(check_lps)))
            oov_modes[mode] = {"wer": m["wer"], "cer": m["cer"], "lm_weight": weight, "word_penalty": penalty,
                               "oov_penalty": oov_penalty, "seconds": time.perf_counter() - t0}
            log(f"oov {mode}: validation WER {m['wer']:.4f} CER {m['cer']:.4f} on {len(check_refs)} lines "
                f"(tuned on {len(tune_refs)} others: lm_weight {weight}, word_penalty {penalty}, "
                f"oov_penalty {oov_penalty})")
        oov = min(OOV_MODES, key=lambda mode: (oov_modes[mode]["wer"], oov_modes[mode]["cer"]))
        log(f"oov: {oov} reads the validation lines best; used for every decoder below")
    else:
        oov = cfg.oov
    cfg = dataclasses.replace(cfg, oov=oov)
    known = oov_modes.get(oov)  # the OOV comparison tuned this decoder already
    beam_check = wider_beam_check(cfg, data.alphabet, texts, largest, check_lps, tune_lps, tune_refs, log,
                                  known and (known["lm_weight"], known["word_penalty"], known["oov_penalty"]),
                                  parallel_map)
    tuned, perplexity, oov_rate = {}, {}, {}

    def by_size(size):
        lex = decoder_lexicon(cfg, data.alphabet, texts, size)
        lms = {"dictionary": None, "unigram": decoder_language_model(cfg, texts, size, 1),
               "bigram": decoder_language_model(cfg, texts, size, 2)}
        perplexity[size] = {name: lm_perplexity(lm, report_refs, tokenise)[0] for name, lm in lms.items() if lm}
        oov_rate[size] = lm_perplexity(lms["unigram"], report_refs, tokenise)[1]
        decoders = {}
        for name, lm in lms.items():
            t0 = time.perf_counter()
            weight, penalty, oov_penalty = tune_lm_decoder(cfg, tune_lps, tune_refs, lex, lm, parallel_map)
            tuned[size, name] = (weight, penalty, oov_penalty)
            log(f"dictionary {size}, {name}: lm_weight {weight}, word_penalty {penalty}, oov_penalty {oov_penalty} "
                f"(tuned on {len(tune_refs)} validation lines in {time.perf_counter() - t0:.0f} s)")
            chosen = dataclasses.replace(cfg, lm_weight=weight, word_penalty=penalty, oov_penalty=oov_penalty)
            decoders[name] = (make_decoder("lm", chosen, data.alphabet, lex, lm, parallel_map=parallel_map),
                              {"lm_weight": weight, "word_penalty": penalty, "oov_penalty": oov_penalty})
        return decoders

    def describe(size, refs, hyps):
        words = set(ranked_lm_words(cfg, texts)[:size])
        dictionary = in_dictionary_tokens(refs, words) if tokenise is lm_words else words
        return {"oov_rate": oov_rate[size], "errors": word_error_breakdown(refs, hyps, dictionary)}

    rows = decoding_experiment(lambda s: model_outputs(params, report[s], data), report, sizes,
                               {"greedy": make_decoder("greedy", cfg, data.alphabet)}, by_size, describe)
    decoding = {"kind": "dictionary", "sizes": list(sizes), "lm_beam": cfg.lm_beam, "rows": rows,
                "perplexity": {str(k): v for k, v in perplexity.items()}, "tuning_lines": len(tune_refs),
                "oov": oov, "oov_modes": oov_modes, "oov_check_lines": len(check_refs) if oov_modes else 0,
                "beam_check": beam_check,
                "dictionary_source": dictionary_source(cfg, texts), "seconds": time.perf_counter() - t_start}
    log(format_decoding(decoding))
    return decoding


BEAM_CHECK_FACTOR = 16  # the pruning check: how much wider the second beam is


def wider_beam_check(cfg, alphabet, texts, size, check_lps, tune_lps, tune_refs, log, weights=None,
                     parallel_map=None):
    """How many validation check lines the bigram decoder (tuned, at `size`) reads
    differently with a BEAM_CHECK_FACTOR times wider beam: pruning that loses the
    objective's best reading shows here. weights: (lm_weight, word_penalty,
    oov_penalty) if already tuned; parallel_map: as in make_decoder. Returns
    {beam, wider, lines, changed}."""
    lex, lm = decoder_lexicon(cfg, alphabet, texts, size), decoder_language_model(cfg, texts, size, 2)
    weight, penalty, oov_penalty = weights or tune_lm_decoder(cfg, tune_lps, tune_refs, lex, lm, parallel_map)
    tuned = dataclasses.replace(cfg, lm_weight=weight, word_penalty=penalty, oov_penalty=oov_penalty)
    widest = CONFIG_FIELDS["lm_beam"].metadata["high"]
    wide = dataclasses.replace(tuned, lm_beam=min(cfg.lm_beam * BEAM_CHECK_FACTOR, widest))
    shipped, wider = (make_decoder("lm", c, alphabet, lex, lm, parallel_map=parallel_map)(check_lps)
                      for c in (tuned, wide))
    changed = sum(a != b for a, b in zip(shipped, wider))
    log(f"beam check: --lm-beam {wide.lm_beam} changes {changed} of {len(check_lps)} validation lines read at "
        f"{cfg.lm_beam} (dictionary {size}, bigram)")
    return {"beam": cfg.lm_beam, "wider": wide.lm_beam, "lines": len(check_lps), "changed": changed}


def dictionary_source(cfg, texts):
    """What the lm decoder's dictionary and LM come from, for run.json."""
    return {"dictionary": cfg.dictionary_file or ("ARPA vocabulary" if cfg.lm_file else "built in"),
            "lm": cfg.lm_file or ("symspellpy counts + training transcriptions (mixture fitted on validation)"
                                  if texts else "symspellpy counts"),
            "tokens": "pieces (split_token), lower-cased, case as log P(case)" if (texts or cfg.lm_file or
                                                                                 cfg.dictionary_file) else "words"}


def format_decoding(decoding):
    splits = list(dict.fromkeys(r["split"] for r in decoding["rows"]))
    decoders = list(dict.fromkeys(r["decoder"] for r in decoding["rows"]))
    lines = [f"{'size':>8} {'decoder':>10}" + "".join(f"   {s[:12]:>12} {'CER':>6} {'WER':>6}" for s in splits)
             + f"   {'ms/seq':>8}"]
    by_key = {(r["size"], r["decoder"], r["split"]): r for r in decoding["rows"]}
    for size in decoding["sizes"]:
        for d in decoders:
            rows = [by_key[size, d, s] for s in splits]
            ms = 1e3 * sum(r["seconds_per_seq"] * r["n"] for r in rows) / sum(r["n"] for r in rows)
            lines.append(f"{size:8d} {d:>10}" + "".join(f"   {'':>12} {r['cer']:6.4f} {r['wer']:6.3f}" for r in rows)
                         + f"   {ms:8.2f}")
    lines.append(f"decoding experiment: {decoding['seconds']:.1f}s")
    return "\n".join(lines)


class Progress:
    """A live line within an epoch (samples done, frames/s, time left), only on a terminal."""

    def __init__(self, enabled, log):
        self.enabled, self.log, self.shown = enabled, log, 0.0

    def update(self, epoch, n_epochs, done, total, frames, seconds, steps_left, seconds_per_step):
        now = time.perf_counter()
        if not self.enabled or now - self.shown < 0.5:
            return
        self.shown = now
        left = steps_left * seconds_per_step
        self.log(f"\repoch {epoch}/{n_epochs}  {done}/{total} sequences  {frames / max(seconds, 1e-9):,.0f} frames/s  "
                 f"about {left / 60:.0f} min {left % 60:02.0f} s of training left ", end="")

    def clear(self):
        if self.enabled:
            self.log("\r" + " " * 100 + "\r", end="")


@dataclass
class TrainingState:
    """Where training stands after an epoch: everything fit() needs to carry on
    exactly as if it had not stopped (checkpoint files hold one)."""

    epoch: int  # epochs done
    params: dict
    adam: dict  # adam_init's layout
    streams: dict  # stream name -> bit generator state (the data and shuffle streams move each epoch)
    history: list
    skipped: int
    best_epoch: int  # the epoch whose weights are kept (0: none yet)
    best_params: dict | None  # those weights, when cfg.patience keeps the best epoch; else None
    train_seconds: float

    def stopped(self, cfg):
        """True once every epoch ran, or validation has not improved for cfg.patience epochs."""
        return self.epoch >= cfg.epochs or bool(cfg.patience and self.epoch - self.best_epoch >= cfg.patience)

    def final_params(self):
        return self.best_params if self.best_params is not None else self.params


def better(entry, best, split):
    """Early stopping's test: a lower (CER, loss) on the monitored split than the best so far."""
    return best is None or (entry[split]["cer"], entry[split]["loss"]) < (best[split]["cer"], best[split]["loss"])


def fit(cfg, task, data, streams, timer, pool=None, log=print, progress=None, status=None, state=None,
        checkpoint=None):
    """The training loop: one epoch of training samples at a time, minibatch
    Adam, and an evaluation of the task's monitored splits after each epoch.

    state: a TrainingState to continue from (a resumed run); checkpoint(state)
    is called after every epoch. With cfg.patience, the weights of the epoch
    with the best (CER, loss) on the first monitored split are kept, and
    training stops after cfg.patience epochs without a better one (the paper's
    early stopping). Returns the final TrainingState. Raises Diverged with the
    epoch and step.
    """
    dtype = np.dtype(cfg.dtype)
    if state is None:
        params = {k: v.astype(dtype) for k, v in init_params(
            streams["init"], cfg.hidden, cfg.layers, cfg.bidirectional, feature_dim(cfg), n_classes(cfg)).items()}
        if cfg.init_from:
            source, source_cfg = load_model(cfg.init_from)
            source_alphabet = source_cfg.alphabet or TASKS[source_cfg.task].alphabet
            params = transfer_params(params, data.alphabet, source, source_alphabet)
            log(f"initialised the LSTM from {cfg.init_from} ({source_cfg.task} model; output weights of "
                f"{len(set(data.alphabet) & set(source_alphabet))} shared characters and the blank kept)")
        state = TrainingState(0, params, adam_init(params), {}, [], 0, 0, None, 0.0)
    else:
        for name, bit_state in state.streams.items():
            streams[name].bit_generator.state = bit_state
    params, adam = state.params, state.adam
    steps_per_epoch = -(-data.epoch_size // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    greedy = make_decoder("greedy", cfg, data.alphabet)
    parallel_map = pool.map if pool else serial_map
    status = {} if status is None else status
    watched = task.monitor[0]
    while not state.stopped(cfg):
        epoch = state.epoch + 1
        status["where"] = f"at epoch {epoch} of {cfg.epochs}"
        e0 = t0 = time.perf_counter()
        samples = data.training_samples(streams["data"], parallel_map)
        order = streams["shuffle"].permutation(len(samples))
        timer.add("data", t0)
        loss_sum, n_chars, done, frames = 0.0, 0, 0, 0
        s0 = time.perf_counter()
        for step, idx in enumerate(make_batches(samples, cfg.batch_size, order, task.bucket, streams["shuffle"]), 1):
            lr = learning_rate(cfg, adam["t"], total_steps)
            try:
                s, n, k = train_step(params, adam, [samples[i] for i in idx], lr, cfg, data, timer, pool,
                                     streams["noise"])
            except Diverged as e:
                raise Diverged(f"training diverged at epoch {epoch}, step {step}: {e}") from None
            loss_sum, n_chars, state.skipped = loss_sum + s, n_chars + n, state.skipped + k
            done, frames = done + len(idx), frames + sum(len(samples[i].traj) for i in idx)
            if progress:
                elapsed = time.perf_counter() - s0
                per_step = (state.train_seconds + elapsed) / (adam["t"] or 1)
                progress.update(epoch, cfg.epochs, done, len(samples), frames, elapsed, total_steps - adam["t"],
                                per_step)
        state.train_seconds += time.perf_counter() - s0
        if progress:
            progress.clear()
        t0 = time.perf_counter()
        entry = {"epoch": epoch, "train_loss": loss_sum / max(n_chars, 1)}
        for split in task.monitor:
            entry[split] = evaluate(params, data.eval_sets[split], data, greedy)[0]
        timer.add("evaluation", t0)
        entry["seconds"] = time.perf_counter() - e0
        improved = better(entry, state.history[state.best_epoch - 1] if state.best_epoch else None, watched)
        if cfg.patience and improved:
            state.best_params = {k: v.copy() for k, v in params.items()}
        if improved or not cfg.patience:
            state.best_epoch = epoch
        state.epoch = epoch
        state.history.append(entry)
        state.streams = {name: g.bit_generator.state for name, g in streams.items()}
        log(format_epoch(entry, cfg.epochs, task) + ("  best" if cfg.patience and improved else ""))
        if checkpoint:
            status["where"] = f"while writing the checkpoint after epoch {epoch}"
            checkpoint(state)
    if cfg.patience and state.history:
        log(f"kept the weights of epoch {state.best_epoch} (best validation CER "
            f"{state.history[state.best_epoch - 1][watched]['cer']:.4f})"
            + (f"; stopped after {cfg.patience} epochs without improvement" if state.epoch < cfg.epochs else ""))
    return state


MEMORY_LIMIT = 0.5  # of the machine's physical memory: a run estimated to need more is refused up front


def training_bytes(cfg, longest, n_classes, longest_label):
    """Rough peak memory of one training step with sequences of length `longest`
    and labels of up to `longest_label` characters.

    Per layer and direction, the forward pass caches 11 H-wide arrays per time
    step and batch entry (gates, cell, tanh(cell), hidden), the backward pass 4
    more; CTC holds a few float64 (T, 2B, S) arrays, S = 2 L + 1.
    """
    R, H, B, T = (2 if cfg.bidirectional else 1), cfg.hidden, cfg.batch_size, longest
    itemsize = np.dtype(cfg.dtype).itemsize
    lstm = cfg.layers * R * T * B * 15 * H * itemsize
    ctc = 6 * T * 2 * B * (2 * longest_label + 1) * 8
    return lstm + ctc + 4 * T * B * n_classes * 8


def physical_memory():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


BASE_BYTES = 64 * 2**20  # the interpreter, numpy and this module, where the resident size cannot be read


def sample_bytes(sample):
    return sample.traj.nbytes + sample.xy.nbytes + sample.pen_up.nbytes


def forward_chunk_bytes(cfg, frames, in_dim, n_classes):
    """Rough peak memory of one evaluation forward pass over `frames` padded frames
    (model_outputs): one layer's 11 H-wide activations per direction (forward
    with cache=False frees each layer's before the next), the layer inputs and
    outputs, the logits and their float64 copies."""
    R = 2 if cfg.bidirectional else 1
    itemsize = np.dtype(cfg.dtype).itemsize
    lstm = R * frames * 11 * cfg.hidden * itemsize
    layer_io = 2 * frames * (R * in_dim + 2 * R * cfg.hidden) * itemsize
    return lstm + layer_io + frames * n_classes * (3 * itemsize + 8)


def ctc_chunk_bytes(frames, n_classes, longest_label):
    """Rough peak memory of ctc_log_likelihood on a chunk of `frames` padded frames:
    the padded float64 log-probs, the emissions and the forward lattice."""
    return frames * (2 * n_classes + 2 * (2 * longest_label + 3)) * 8


def memory_estimate(cfg, data, training, resident=None):
    """Predicted peak resident memory of the run, in bytes, by part: held (what
    this process holds now: `resident` bytes as measured, else BASE_BYTES and
    the samples of every split), fresh (an epoch of training samples, for
    tasks that draw them each epoch), work (the larger of a training step and
    an evaluation: EVAL_THREADS forward chunks and one CTC chunk), workers (the
    other processes, each holding its share of the largest training step all
    through training, the per-epoch validation included), and their total."""
    evals = [s for samples in data.eval_sets.values() for s in samples]
    per_sample = sum(sample_bytes(s) for s in evals) / max(len(evals), 1)  # training lines are drawn like these
    # Held training samples cost nothing to fetch, and the longest of them sizes a training step.
    lines = evals + (list(data.training_samples(None, serial_map)) if data.training_held and training else [])
    if resident is None:
        resident = BASE_BYTES + int(per_sample * (len(evals) + (data.epoch_size if data.training_held else 0)))
    fresh = 0 if data.training_held or not training else int(per_sample * data.epoch_size)
    longest = max(len(s.traj) for s in lines)
    eval_label = max(len(s.labels) for s in lines)
    # Training text is drawn like the evaluation text; twice its longest label leaves a margin.
    train_label = min(longest, 2 * eval_label)
    K, D = n_classes(cfg), evals[0].traj.shape[1]
    part = dataclasses.replace(cfg, batch_size=-(-cfg.batch_size // cfg.workers))  # this process's share
    step = training_bytes(part, longest, K, train_label) if training else 0
    frames = max(min(EVAL_FRAMES, EVAL_BATCH * longest), longest)
    evaluation = EVAL_THREADS * forward_chunk_bytes(cfg, frames, D, K) + ctc_chunk_bytes(frames, K, eval_label)
    work = max(step, evaluation)
    # keep_freed_memory leaves a worker's heap at its largest step while this process validates;
    # a worker of a run that does not train only featurises and decodes, in little memory.
    workers = (cfg.workers - 1) * (BASE_BYTES + step)
    return {"held": resident, "fresh": fresh, "work": work, "workers": workers,
            "total": resident + fresh + work + workers}


def check_memory(cfg, data, training, log=None):
    """The run's memory_estimate from what the process holds now; UserError, before
    any training, if it exceeds MEMORY_LIMIT of the machine's memory, naming the
    part that is too large."""
    need = memory_estimate(cfg, data, training, resident_bytes())
    # Reading and featurising may already have peaked higher (IAM-OnDB); that peak is measured, not predicted.
    need["total"] = max(need["total"], peak_rss() or 0)
    have = physical_memory()
    if log:
        log(f"memory: about {need['total'] / 2**30:.2f} GiB predicted (held now {need['held'] / 2**30:.2f}, "
            f"training data drawn per epoch {need['fresh'] / 2**30:.2f}, largest step {need['work'] / 2**30:.2f}"
            + (f", worker processes {need['workers'] / 2**30:.2f}" if need["workers"] else "") + ")")
    if have and need["held"] + need["fresh"] + need["work"] + need["workers"] > MEMORY_LIMIT * have:
        if need["work"] + need["workers"] >= max(need["fresh"], need["held"]):
            remedy = "use a smaller --hidden, --layers or --batch-size" + (", or fewer --workers" if need["workers"] else "")
        elif need["fresh"] >= need["held"]:
            remedy = "the training data drawn per epoch is too large; use fewer --lines-per-epoch"
        else:
            remedy = "the data itself is too large"
        raise UserError(f"this configuration would need about {need['total'] / 2**30:.1f} GiB, more than "
                        f"{MEMORY_LIMIT:.0%} of this machine's {have / 2**30:.1f} GiB; {remedy}")
    return need


def resident_bytes():
    """This process's resident memory now, in bytes (Linux /proc), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_rss(children=False):
    """This process's peak resident memory so far, in bytes (None where unknown);
    children: that of its largest child process that has ended."""
    try:
        import resource
        kib = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return kib if sys.platform == "darwin" else kib * 1024  # macOS reports bytes, Linux KiB


def feature_dim(cfg):
    """D: what the network reads per pen sample (pen_trajectory or features_graves25)."""
    return {"raw": IN_DIM, "graves25": len(GRAVES25_NAMES)}[cfg.features]


def train_and_evaluate(cfg, params=None, verbose=True, log=print, status=None, experiment=None, dictionary_size=0,
                       checkpoint_to=None, resume=False, normalisation=None):
    """Train a model as configured (or, given `params`, only evaluate them) and report.

    experiment: (params, cfg, data, log=) -> run.json's `decoding`, run on the
    same data after the final evaluation. dictionary_size: the largest
    dictionary the experiment decodes with, checked against the alphabet before
    training. checkpoint_to: a path that receives a checkpoint after every
    epoch; resume: continue from the checkpoint there (same config), to the
    same result as a run that was never interrupted. Returns (params,
    result): result is what run.json holds, less schema_version and env (see
    run_json). normalisation: {shift, scale, squash} to use instead of the
    statistics of the task's training data (a loaded model's, load_normalisation).
    """
    wall0 = time.perf_counter()
    task = TASKS[cfg.task]
    timer = Timer()
    streams = make_streams(cfg.seed)
    status = {} if status is None else status
    status["where"] = "while preparing the data"
    t0 = time.perf_counter()
    history, skipped, loaded = [], 0, params is not None
    pool = Pool(cfg.workers) if cfg.workers > 1 else None
    try:
        data = task.make_data(cfg, streams, pool.map if pool else serial_map, log)
        release_freed_memory()  # the raw ink and the unnormalised features, before the resident size is read
        timer.add("data", t0)
        if task.alphabet is None:
            cfg = dataclasses.replace(cfg, alphabet=data.alphabet)  # saved with the model
        if normalisation:
            data.input_shift, data.input_scale, data.input_squash = (normalisation[k] for k in ("shift", "scale", "squash"))
        memory = check_memory(cfg, data, training=params is None, log=log if verbose else None)
        dictionary_size = max(dictionary_size, cfg.dictionary_size if cfg.decoder == "lm" else 0)
        if dictionary_size:
            check_dictionary_alphabet(dictionary_size, data.alphabet)
        check_lm_decoding_time(cfg, data, len(getattr(experiment, "keywords", {}).get("sizes", ())) if dictionary_size
                               else 0, log if verbose else None)
        state = None
        if params is None:
            progress = Progress(verbose and sys.stdout.isatty(), log)
            if resume:
                state = load_checkpoint(checkpoint_to, cfg)
                log(f"resuming from {checkpoint_to} after epoch {state.epoch}")
            save = (lambda st: write_output(checkpoint_to, checkpoint_bytes(st, cfg, data), "checkpoint")) \
                if checkpoint_to else None
            state = fit(cfg, task, data, streams, timer, pool, log if verbose else (lambda *a, **k: None),
                        progress, status, state, save)
            params, history, skipped = state.final_params(), state.history, state.skipped
        # The workers stay for the decoding: the lm decoder deals its lines over them.
        parallel_map = pool.map if pool else None
        lm_tuning = None
        if cfg.decoder == "lm" and cfg.lm_tuning:
            status["where"] = "while tuning the lm decoder"
            cfg, lm_tuning = tune_final_decoder(params, cfg, data, log if verbose else (lambda *a, **k: None),
                                                parallel_map)
        status["where"] = "during the final evaluation"
        source = "loaded" if loaded else "trained" if history else "untrained"  # untrained: --epochs 0
        result = {"config": dataclasses.asdict(cfg), "model_source": source, "history": history,
                  "best_epoch": state.best_epoch if state else None, "lm_tuning": lm_tuning,
                  **final_report(params, cfg, task, data, timer, parallel_map),
                  "split": data.info, "timing": timer.seconds, "skipped": skipped}
        result["wall_seconds"] = time.perf_counter() - wall0
        if experiment:
            status["where"] = "during the decoding experiment"
            result["decoding"] = experiment(params, cfg, data, log=log, parallel_map=parallel_map)
    finally:
        if pool:
            pool.close()
    result["input"] = input_normalisation(data)
    # Peaks of the whole run: this process's and its largest worker's (the workers have been joined).
    result["memory"] = {"predicted_bytes": memory["total"], "peak_rss_bytes": peak_rss(),
                        "worker_peak_rss_bytes": peak_rss(children=True) if pool else None}
    return params, result


def train(cfg, verbose=True):
    """Train as configured; returns what run.json holds, as a dict. For the tests and
    benchmarks/sweep.py: the command line calls train_and_evaluate itself."""
    return run_json(train_and_evaluate(cfg, verbose=verbose)[1])


def format_epoch(e, n_epochs, task):
    parts = [f"epoch {e['epoch']:3d}/{n_epochs}  loss {e['train_loss']:.4f}"]
    for split in task.monitor:
        m = e[split]
        names = {"cer": "CER", "wer": "WER", "word_acc": "acc"}
        parts.append(f"{split.replace('_', '-')} " + " ".join(f"{names[k]} {m[k]:.4f}" for k in task.shown))
    return "  ".join(parts) + f"  {e['seconds']:.2f}s"


# ---------------------------------------------------------------------------
# 11. Printed words (the seed task)
# ---------------------------------------------------------------------------
# Glyphs live in a unit box: baseline y = 0, x-height 0.5, ascenders up to 0.9.
# Each glyph is a list of strokes (dense polylines) and an advance width.

ALPHABET = "colitnmaeu"
N_CLASSES = 1 + len(ALPHABET)  # K: blank + letters
IN_DIM = 3  # (dx, dy, pen_up)
SAMPLE_SPACING = 0.085  # pen samples are this far apart along the ink
LETTER_GAP = 0.08  # blank space between consecutive glyph boxes

# The 47 words of the earlier study, kept so results stay comparable.
VOCAB = (
    "ant ill tan lot mit nan tic tin out ate eat tea ice lit non nun men mat "
    "net moo moon loom noon name nice cone tone lane amen main mine lent tent "
    "team lime time mile tail lion into icon actin tonic milne linen matte atone"
).split()


def _arc(cx, cy, rx, ry, deg_from, deg_to, n=64):
    """Dense points on an ellipse arc, counter-clockwise if deg_to > deg_from."""
    a = np.radians(np.linspace(deg_from, deg_to, n))
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], axis=1)


def _polyline(*parts):
    """Join point lists and arrays into one (n, 2) polyline."""
    return np.concatenate([np.asarray(p, dtype=float).reshape(-1, 2) for p in parts])


GLYPH_STROKES = {
    # c: open ellipse arc, counter-clockwise from upper right to lower right.
    "c": ([_arc(0.22, 0.25, 0.2, 0.25, 40, 320)], 0.44),
    # o: closed ellipse from the top.
    "o": ([_arc(0.22, 0.25, 0.2, 0.25, 90, 455)], 0.44),
    # l: tall stem with a small exit tick.
    "l": ([_polyline([(0.12, 0.95), (0.12, 0.06), (0.16, 0.0), (0.24, 0.02)])], 0.30),
    # i: short stem, then the dot as its own stroke.
    "i": ([_polyline([(0.1, 0.5), (0.1, 0.05), (0.14, 0.0), (0.22, 0.02)]),
           _polyline([(0.1, 0.7), (0.12, 0.75)])], 0.28),
    # t: stem, then the crossbar as its own stroke.
    "t": ([_polyline([(0.15, 0.82), (0.15, 0.06), (0.19, 0.0), (0.28, 0.02)]),
           _polyline([(0.0, 0.52), (0.32, 0.52)])], 0.34),
    # n: down stroke, retrace up, one arch.
    "n": ([_polyline([(0.05, 0.5), (0.05, 0.0), (0.05, 0.28)],
                     _arc(0.21, 0.28, 0.16, 0.2, 180, 0), [(0.38, 0.0)])], 0.46),
    # m: down stroke, two arches.
    "m": ([_polyline([(0.05, 0.5), (0.05, 0.0), (0.05, 0.28)],
                     _arc(0.17, 0.28, 0.12, 0.2, 180, 0), [(0.29, 0.0), (0.29, 0.28)],
                     _arc(0.41, 0.28, 0.12, 0.2, 180, 0), [(0.54, 0.0)])], 0.60),
    # u: down into a cup, up, then the right stem down.
    "u": ([_polyline([(0.05, 0.5), (0.05, 0.2)], _arc(0.2, 0.2, 0.15, 0.2, 180, 360),
                     [(0.35, 0.5), (0.37, 0.0)])], 0.44),
    # a: closed loop, then a tail down its right side.
    "a": ([_polyline(_arc(0.2, 0.25, 0.18, 0.24, 10, 370), [(0.39, 0.5), (0.41, 0.0)])], 0.46),
    # e: horizontal bar into a counter-clockwise loop that stays open.
    "e": ([_polyline([(0.03, 0.22), (0.38, 0.27)], _arc(0.21, 0.25, 0.18, 0.24, 15, 320))], 0.44),
}


@dataclass(frozen=True)
class Glyph:
    points: np.ndarray  # (n, 2) pen samples of all strokes, in drawing order
    stroke_start: np.ndarray  # (n,) 1.0 on the first sample of each stroke
    width: float  # advance before the letter gap


def _make_glyph(strokes, width):
    # One stroke at a time: the glyphs, and so the seed task's numbers, stay as they were.
    pts = [resample_strokes(s, np.zeros(len(s), int), ink_length(s, np.zeros(len(s), int)), SAMPLE_SPACING)[0]
           for s in strokes]
    starts = [np.eye(1, len(p)).ravel() for p in pts]
    return Glyph(np.concatenate(pts), np.concatenate(starts), width)


GLYPHS = {c: _make_glyph(*GLYPH_STROKES[c]) for c in ALPHABET}


def render_word(word, rng, jitter=0.014, slant_max=0.15):
    """Draw `word` with one random slant and per-point Gaussian jitter.

    Glyph templates are placed left to right (advance = width + LETTER_GAP),
    sheared by x += slant * y, then every sample is jittered.
    """
    labels = encode(word, ALPHABET)
    glyphs = [GLYPHS[c] for c in word]
    offsets = np.cumsum([0.0] + [g.width + LETTER_GAP for g in glyphs[:-1]])
    xy = np.concatenate([g.points + (dx, 0.0) for g, dx in zip(glyphs, offsets)])  # (T, 2)
    pen_up = np.concatenate([g.stroke_start for g in glyphs])  # (T,)
    char_of = np.repeat(np.arange(len(word)), [len(g.points) for g in glyphs])  # (T,)
    slant = rng.uniform(-slant_max, slant_max)
    xy[:, 0] += slant * xy[:, 1]
    xy += rng.normal(0.0, jitter, size=xy.shape)
    traj = pen_trajectory(xy, np.cumsum(pen_up) - 1)
    return Sample(word, traj, labels, xy, pen_up, char_of)


def render_words(words, repeats, rng, cfg):
    """`repeats` fresh renderings of every word, word-major order."""
    return [render_word(w, rng, cfg.jitter, cfg.slant_max) for w in words for _ in range(repeats)]


def split_vocab(rng, holdout_frac):
    """(training words, held-out words): a seeded permutation of VOCAB."""
    n_held = int(round(holdout_frac * len(VOCAB)))
    order = rng.permutation(len(VOCAB))
    held = sorted(VOCAB[i] for i in order[:n_held])
    return [w for w in VOCAB if w not in held], held


LEXICON_SEED = 20090501  # fixed: every run sees the same distractor words


def distractor_words(n, real_words=VOCAB):
    """The first n of a fixed sequence of distinct 3-5 letter pseudo-words, none a real word.

    Candidates are drawn in fixed-size chunks, so a lexicon of a given size is
    the same whatever larger size is also asked for.
    """
    rng = np.random.default_rng(LEXICON_SEED)
    seen, out = set(real_words), []
    while len(out) < n:
        lengths = rng.integers(3, 6, size=4096)
        letters = rng.integers(0, len(ALPHABET), size=(4096, 5))
        for length, row in zip(lengths, letters):
            w = "".join(ALPHABET[i] for i in row[:length])
            if w not in seen:
                seen.add(w)
                out.append(w)
    return out[:n]


# ---------------------------------------------------------------------------
# 12. Cursive lines: glyphs
# ---------------------------------------------------------------------------
# Hershey Script Simplex ("scripts"), the 1967 US National Bureau of Standards
# stroke font, from the PyPI package Hershey-Fonts. Font units: y down,
# baseline y = 9, x-height line y = 0, about 17 units per letter; lowercase
# letters end on the joining point (advance, 4), 16 of them start on it.

LINE_ALPHABET = string.ascii_lowercase + " "  # K = 28 with the blank
FONT_BASELINE = 9.0
FONT_XHEIGHT = 9.0
LINE_UNIT = 0.5 / FONT_XHEIGHT  # font units -> output units (x-height 0.5, as the printed words)
# Polylines a writer adds after the word, as IAM-OnDB writers do: the i and j
# dots, the t bar and the x crossing (indices into the glyph's polylines).
DELAYED_POLYLINES = {"i": (0,), "j": (0,), "t": (2,), "x": (1,)}


@functools.lru_cache(maxsize=1)
def script_glyphs():
    """{letter: (vertices (n, 2), polyline id (n,), delayed (n,) bool, advance)} for a-z, font units.

    Vertices are in plotter order with the retraces the font has (the second
    and third polylines of 'm' start on ink already drawn).
    """
    try:
        from HersheyFonts import HersheyFonts
    except ImportError:
        raise UserError("the lines task needs the Hershey-Fonts package: pip install Hershey-Fonts") from None
    font = HersheyFonts()
    font.load_default_font("scripts")
    table = {}
    for c in string.ascii_lowercase:
        polylines = [np.array(p, dtype=float) for p in font.strokes_for_text(c)]
        ids = np.repeat(np.arange(len(polylines)), [len(p) for p in polylines])
        advance = float(next(iter(font.glyphs_for_text(c))).char_width)
        table[c] = (np.concatenate(polylines), ids, np.isin(ids, DELAYED_POLYLINES.get(c, ())), advance)
    return table


# ---------------------------------------------------------------------------
# 13. Cursive lines: writers
# ---------------------------------------------------------------------------

WARP_WAVES = 3  # sinusoids in one letter's deformation field


@dataclass(frozen=True)
class WriterStyle:
    """One writer's hand, drawn once. Lengths are font units (x-height 9)."""

    slant: float  # shear x += slant * height above the baseline (+ leans right)
    size: float  # x-height scale
    width: float  # horizontal scale on top of size
    letter_spacing: float  # added to every letter's advance
    word_spacing: float  # gap between words, on top of the letter spacing
    tilt: float  # baseline angle, radians counter-clockwise
    drift: tuple  # (amplitude, wavelength): slow vertical wander of the baseline
    warp: np.ndarray  # (26, WARP_WAVES, 5) per-letter deformation: amplitude (2), wave vector (2), phase
    warp_rms: float  # RMS displacement of those fields
    inertia: float  # how far the pen lags behind its path, in output samples
    ink_per_sample: float  # ink between samples at full speed, per unit of size
    curve_slowdown: float  # how much the pen slows in tight curves
    tremor: float  # std of per-sample jitter
    dot_offset: np.ndarray  # (2,) where i and j dots land, relative to the font's
    bar_scale: float  # length of t and x crossings relative to the font's
    bar_offset: np.ndarray  # (2,) where the crossings land


def random_warp(rng, n, rms):
    """(n, WARP_WAVES, 5) smooth displacement fields d(p) = sum_m a_m sin(k_m . p + phi_m).

    Wavelengths of 10-25 font units, about a letter, so a field bends a
    letter's shape rather than roughening its outline. Each field is scaled to
    RMS displacement `rms` (a scalar or (n,)).
    """
    amp = rng.normal(size=(n, WARP_WAVES, 2))
    amp *= np.reshape(rms, (-1, 1, 1)) / np.sqrt(0.5 * (amp ** 2).sum(axis=(1, 2), keepdims=True))
    angle = rng.uniform(0, 2 * np.pi, size=(n, WARP_WAVES))
    wavenumber = 2 * np.pi / rng.uniform(10.0, 25.0, size=(n, WARP_WAVES))
    wave = np.stack([np.cos(angle), np.sin(angle)], axis=-1) * wavenumber[..., None]
    phase = rng.uniform(0, 2 * np.pi, size=(n, WARP_WAVES, 1))
    return np.concatenate([amp, wave, phase], axis=-1)


def apply_warp(points, warp):
    """Displace points (N, 2) by their own fields warp (N, WARP_WAVES, 5)."""
    arg = (warp[..., 2:4] * points[:, None, :]).sum(-1) + warp[..., 4]  # (N, M)
    return points + (warp[..., :2] * np.sin(arg)[..., None]).sum(axis=1)


def draw_writer(rng):
    """A writer's style. The ranges are the README's table (which says why none is narrower)."""
    warp_rms = rng.uniform(0.08, 0.15) * FONT_XHEIGHT
    return WriterStyle(
        slant=rng.uniform(-0.4, 0.4),
        size=rng.uniform(0.8, 1.25),
        width=rng.uniform(0.75, 1.3),
        letter_spacing=rng.uniform(-1.5, 3.0),
        word_spacing=rng.uniform(6.0, 14.0),
        tilt=np.radians(rng.uniform(-3.0, 3.0)),
        drift=(rng.uniform(0.0, 2.0), rng.uniform(120.0, 400.0)),
        warp=random_warp(rng, 26, warp_rms),
        warp_rms=warp_rms,
        inertia=rng.uniform(0.0, 2.0),
        ink_per_sample=4.9 * rng.uniform(0.75, 1.25),
        curve_slowdown=rng.uniform(0.5, 2.0),
        tremor=rng.uniform(0.05, 0.25),
        dot_offset=rng.uniform([-1.5, -2.0], [2.5, 1.0]),
        bar_scale=rng.uniform(0.7, 1.4),
        bar_offset=rng.uniform([-1.5, -1.5], [2.5, 1.5]),
    )


# ---------------------------------------------------------------------------
# 14. Cursive lines: the pen
# ---------------------------------------------------------------------------

CONNECTOR_POINTS = 5  # vertices inside the arc that carries the pen from letter to letter
DENSE_STEP = 0.25  # font units between points of the ideal pen path
FINE = 4  # pen positions simulated per output sample
LINE_SAMPLE_SPACING = 4.9 * LINE_UNIT  # a typical writer's ink per sample on straight ink, output units


def add_connectors(x, height, letter_of, polyline, delayed, word_of):
    """Arc the pen's way from each letter's end to the next letter's start.

    Letters that start on their bowl (a c d e g o q w) start away from the
    joining point, and a straight connector would cut through the bowl; a
    writer arcs over it. A quadratic Bezier from the previous letter's last
    vertex, bulging up by 0.3 of its horizontal span, goes before the letter's
    first vertex and belongs to that letter. All arrays are per vertex (V,).
    """
    main = np.flatnonzero(~delayed)
    prev, nxt = main[:-1], main[1:]
    joins = (letter_of[nxt] != letter_of[prev]) & (word_of[letter_of[nxt]] == word_of[letter_of[prev]])
    gap = np.hypot(x[nxt] - x[prev], height[nxt] - height[prev])
    at, came_from = nxt[joins & (gap > 1.0)], prev[joins & (gap > 1.0)]  # (J,)
    x0, h0, x1, h1 = x[came_from], height[came_from], x[at], height[at]
    cx, ch = (x0 + x1) / 2, np.maximum(h0, h1) + 0.3 * np.abs(x1 - x0)
    u = np.linspace(0, 1, CONNECTOR_POINTS + 2)[1:-1, None]  # (P, 1)
    bx = ((1 - u) ** 2 * x0 + 2 * u * (1 - u) * cx + u ** 2 * x1).T.ravel()  # (J * P,)
    bh = ((1 - u) ** 2 * h0 + 2 * u * (1 - u) * ch + u ** 2 * h1).T.ravel()
    where = np.repeat(at, CONNECTOR_POINTS)
    return (np.insert(x, where, bx), np.insert(height, where, bh), np.insert(letter_of, where, letter_of[where]),
            np.insert(polyline, where, polyline[where]), np.insert(delayed, where, False))


def line_layout(text, writer, rng):
    """The ideal pen path of a line, before any timing: where the pen should go.

    Letters are placed with the writer's spacing and deformed by the writer's
    field for that letter plus a third as much for this instance; within a
    word the pen stays down from letter to letter; the dots and crossings are
    delayed strokes written after their word. Returns points (V, 2) in font
    units (y up, baseline 0), stroke ids (V,) in writing order, and char_of
    (V,), the index into `text` of the letter each vertex belongs to.
    """
    table = script_glyphs()
    letter_pos = np.array([i for i, c in enumerate(text) if c != " "])  # (n,) letters' indices into text
    letters = [text[i] for i in letter_pos]
    word_of = np.cumsum([c == " " for c in text])[letter_pos]  # (n,)
    size = writer.size * np.exp(rng.normal(0, 0.04))  # per-line variation on top of the writer's
    slant = writer.slant + rng.normal(0, 0.03)
    advance = np.array([table[c][3] for c in letters]) * size * writer.width
    advance += (writer.letter_spacing + rng.normal(0, 0.5, len(letters))) * size
    starts_word = np.diff(word_of, prepend=0) > 0
    gap = np.where(starts_word, (writer.word_spacing + rng.normal(0, 1.0, len(letters))) * size, 0.0)
    origin = np.cumsum(gap + np.append(0.0, advance[:-1]))  # (n,) left edge of each letter

    glyphs = [table[c] for c in letters]
    letter_of = np.repeat(np.arange(len(letters)), [len(g[0]) for g in glyphs])  # (V,)
    local = np.concatenate([g[0] for g in glyphs])  # (V, 2) glyph coordinates
    polyline = np.concatenate([g[1] for g in glyphs])
    delayed = np.concatenate([g[2] for g in glyphs])
    alphabet_index = np.array([ord(c) - ord("a") for c in letters])
    local = apply_warp(local, writer.warp[alphabet_index[letter_of]])
    local = apply_warp(local, random_warp(rng, len(letters), writer.warp_rms / 3)[letter_of])

    # Dots land at the writer's offset; crossings are rescaled about their centre and shifted.
    jitter = rng.normal(0, 0.6, size=(len(letters), 2))[letter_of]
    is_dot = delayed & np.isin(np.array(letters)[letter_of], ["i", "j"])
    is_bar = delayed & ~is_dot
    local[is_dot] += writer.dot_offset + jitter[is_dot]
    bar_letters, bar_index = np.unique(letter_of[is_bar], return_inverse=True)
    centre = np.zeros((len(bar_letters), 2))
    np.add.at(centre, bar_index, local[is_bar])
    centre /= np.bincount(bar_index, minlength=len(bar_letters))[:, None].clip(1)
    local[is_bar] = centre[bar_index] + (local[is_bar] - centre[bar_index]) * writer.bar_scale
    local[is_bar] += writer.bar_offset + jitter[is_bar]

    x = local[:, 0] * size * writer.width + origin[letter_of]
    height = (FONT_BASELINE - local[:, 1]) * size
    x, height, letter_of, polyline, delayed = add_connectors(x, height, letter_of, polyline, delayed, word_of)
    x = x + slant * height
    tilt = writer.tilt + rng.normal(0, np.radians(0.5))
    points = np.column_stack([x * np.cos(tilt) - height * np.sin(tilt), x * np.sin(tilt) + height * np.cos(tilt)])
    amplitude, wavelength = writer.drift
    points[:, 1] += amplitude * np.sin(2 * np.pi * points[:, 0] / wavelength + rng.uniform(0, 2 * np.pi))

    # Writing order: each word's pen-down stroke, then its delayed polylines one by one.
    delayed_rank = np.where(delayed, 1 + polyline + 100 * letter_of, 0)
    word = word_of[letter_of]
    order = np.lexsort((np.arange(len(points)), delayed_rank, word))
    key = word[order] * 100_000 + delayed_rank[order]
    stroke = np.cumsum(np.diff(key, prepend=-1) != 0) - 1
    return points[order], stroke, letter_pos[letter_of][order]


def critically_damped_kernel(tau):
    """Impulse response of two cascaded one-pole low-passes with time constant tau (steps).

    h[k] = (1 - r)^2 (k + 1) r^k with r = exp(-1 / tau): a pen pulled towards
    its target without overshoot, lagging it by 2 tau steps.
    """
    if tau <= 0:
        return np.ones(1)
    r = np.exp(-1.0 / tau)
    k = np.arange(int(np.ceil(12 * tau)) + 1)
    h = (1 - r) ** 2 * (k + 1) * r ** k
    return h / h.sum()


def lowpass_strokes(points, stroke, kernel, settle):
    """Filter each stroke of points (N, 2) causally with `kernel`, strokes independent.

    Each stroke is padded before with copies of its first point (the pen rests
    there, so the filter starts on the ink) and after with `settle` copies of
    its last (the pen settles onto the end before lifting). Returns the
    filtered points, their stroke ids and the index of the input point each
    output point stands for.
    """
    K = len(kernel) - 1
    first = np.flatnonzero(stroke_starts(stroke))
    n = np.diff(np.append(first, len(stroke)))  # (S,)
    padded = n + K + settle
    local = ragged_arange(padded) - K
    source = np.clip(local, 0, np.repeat(n - 1, padded)) + np.repeat(first, padded)
    # The start padding is as long as the kernel, so no output sees the previous stroke.
    smooth = np.column_stack([np.convolve(points[source, c], kernel)[:len(source)] for c in range(2)])
    keep = local >= 0
    return smooth[keep], np.repeat(np.arange(len(n)), padded)[keep], source[keep]


def time_pen_path(points, stroke, char_of, writer):
    """Sample the ideal path as a pen would be sampled at a fixed rate.

    The pen moves fast on straight ink and slows in tight curves; it lags
    behind the path by the writer's inertia (which rounds corners and shrinks
    small loops). Returns samples (T, 2), stroke ids (T,), char_of (T,).
    """
    dense, dense_stroke, source = resample_strokes(points, stroke, ink_length(points, stroke), DENSE_STEP)
    dense_char = char_of[np.ceil(source).astype(int)]  # a connector belongs to the letter it leads into
    starts = stroke_starts(dense_stroke)
    step = np.diff(dense, axis=0, append=dense[-1:])
    heading = np.arctan2(step[:, 1], step[:, 0])
    turn = np.abs(np.angle(np.exp(1j * np.diff(heading, prepend=heading[:1]))))  # radians per dense step
    turn[starts] = 0.0
    turn[np.append(starts[1:], True)] = 0.0  # a stroke's last point has no heading of its own
    curvature = np.convolve(turn, np.ones(9) / 9, mode="same") / DENSE_STEP  # per font unit, over ~2 units
    speed = 1.0 / (1.0 + 2.0 * writer.curve_slowdown * curvature)
    clock = np.cumsum(np.where(starts, 0.0, DENSE_STEP / speed))
    spacing = writer.ink_per_sample * writer.size
    fine, fine_stroke, fine_source = resample_strokes(dense, dense_stroke, clock, spacing / FINE)
    fine_char = dense_char[np.round(fine_source).astype(int)]
    lag = writer.inertia * FINE  # in fine steps
    smooth, smooth_stroke, smooth_source = lowpass_strokes(
        fine, fine_stroke, critically_damped_kernel(lag / 2), int(np.ceil(lag)))
    first = np.flatnonzero(stroke_starts(smooth_stroke))
    local = np.arange(len(smooth_stroke)) - first[np.cumsum(stroke_starts(smooth_stroke)) - 1]
    keep = local % FINE == 0
    return smooth[keep], smooth_stroke[keep], fine_char[smooth_source[keep]]


def render_line(text, writer, rng):
    """`text` (a-z and single spaces) in `writer`'s hand.

    Returns a Sample: xy (T, 2) in output units (x-height 0.5, y up), traj
    (T, 3) = (dx, dy, pen_up), char_of (T,) into `text`. pen_up is 1 on the
    first sample of every word and of every delayed stroke, and nowhere else.
    A space draws no ink: its only trace is the pen lift before the next word,
    so no sample belongs to it.
    """
    labels = encode(text, LINE_ALPHABET)
    if not text.strip(" ") or "  " in text or text != text.strip(" "):
        raise ValueError(f"a line is words separated by single spaces, got {text!r}")
    points, stroke, char_of = line_layout(text, writer, rng)
    samples, sample_stroke, sample_char = time_pen_path(points, stroke, char_of, writer)
    samples = samples + rng.normal(0, writer.tremor, size=samples.shape)
    xy = samples * LINE_UNIT
    return Sample(text, pen_trajectory(xy, sample_stroke), labels, xy, stroke_starts(sample_stroke).astype(float),
                  sample_char)


# ---------------------------------------------------------------------------
# 15. Cursive lines: English text
# ---------------------------------------------------------------------------
# Word and word-pair counts from the PyPI package symspellpy (large web and book
# corpora): 82,765 words and 242,342 pairs, read as data files. The pair list
# keeps only pairs counted at least 6,400,000 times, so rare pairs are missing
# and the model backs off to word frequencies.

UNIGRAM_FILE = "frequency_dictionary_en_82_765.txt"
BIGRAM_FILE = "frequency_bigramdictionary_en_243_342.txt"


def _symspell_text(name):
    try:
        return (importlib.resources.files("symspellpy") / name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, OSError) as e:
        raise UserError(f"the lines task needs symspellpy's word counts ({e}); pip install 'symspellpy>=6.7.1'") from None


# Web-scale counts carry web spam: these explicit, slur and spam words would
# otherwise turn up in sampled lines and README figures, so they are left out
# of the statistics (everything else is kept as counted).
EXCLUDED_WORDS = frozenset("""
    anal babes bitch bitches bitching blowjob blowjobs bondage boob boobies boobs busty cock cocks cocksucker
    cocksuckers cum cumming cums cunt cunts dick dicks dildo dildoes dildos erotic erotica escort escorts fetish
    fuck fucked fucker fuckers fucking fucks hardcore horny hottie hotties incest masturbate masturbates
    masturbating masturbation milf milfs naked nigger nipple nipples nude nudes nympho orgies orgy porn porno
    pornographic pornography pussies pussy shit shitting shitty slut sluts slutty spank spanked spanking
    spankings squirting threesome threesomes tit tits titties titty twat valium viagra voyeur wank wanking
    whore whores xxx""".split())


@functools.lru_cache(maxsize=1)
def english_words():
    """(words, counts (V,)): every word over a-z in symspellpy's counts, most frequent first,
    less EXCLUDED_WORDS."""
    words, counts = [], []
    for line in _symspell_text(UNIGRAM_FILE).splitlines():
        parts = line.split()
        if len(parts) == 2 and re.fullmatch("[a-z]+", parts[0]) and parts[0] not in EXCLUDED_WORDS:
            words.append(parts[0])
            counts.append(int(parts[1]))
    if len(words) != N_ENGLISH_WORDS:  # symspellpy 6.7.0 shipped an older list: other text, other numbers
        raise UserError(f"symspellpy's {UNIGRAM_FILE} gives {len(words)} words, not the {N_ENGLISH_WORDS} "
                        "this code was measured on; pip install 'symspellpy>=6.7.1'")
    order = np.argsort(-np.array(counts), kind="stable")
    return tuple(words[i] for i in order), np.array(counts, dtype=float)[order]


@functools.lru_cache(maxsize=1)
def english_pairs():
    """(first (P,), second (P,), count (P,)): word-pair counts as ids into english_words()."""
    index = {w: i for i, w in enumerate(english_words()[0])}
    first, second, counts = [], [], []
    for line in _symspell_text(BIGRAM_FILE).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in index and parts[1] in index:
            first.append(index[parts[0]])
            second.append(index[parts[1]])
            counts.append(int(parts[2]))
    return np.array(first), np.array(second), np.array(counts, dtype=float)


def build_bigram_model(vocabulary_size=None):
    """The bigram model over the `vocabulary_size` most frequent words (all if None)."""
    words, counts = english_words()
    V = len(words) if vocabulary_size is None else min(vocabulary_size, len(words))
    first, second, pair_counts = english_pairs()
    unit = pair_counts.min()
    keep = (first < V) & (second < V)
    key, prob, backoff, D = discounted_pairs(first[keep], second[keep], pair_counts[keep] / unit, V)
    return BigramModel(words[:V], counts[:V] / counts[:V].sum(), key, prob, backoff, D)


@dataclass(frozen=True)
class TextSampler:
    """Cumulative tables for drawing words from a BigramModel quickly."""

    model: BigramModel
    unigram_cdf: np.ndarray  # (V,)
    row_start: np.ndarray  # (V + 1,) the listed followers of v are pairs row_start[v]:row_start[v + 1]
    pair_cdf: np.ndarray  # (P,) running sum of pair_prob within each row


@functools.lru_cache(maxsize=1)
def english_text_sampler():
    model = build_bigram_model()
    V = len(model.words)
    row_start = np.searchsorted(model.pair_key, np.arange(V + 1, dtype=np.int64) * V)
    running = np.cumsum(model.pair_prob)
    before_row = np.concatenate([[0.0], running])[row_start[:-1]]  # (V,)
    pair_cdf = running - np.repeat(before_row, np.diff(row_start))
    return TextSampler(model, np.cumsum(model.unigram), row_start, pair_cdf)


def next_word(sampler, prev, rng):
    """Draw w ~ P(w | prev), or from the word frequencies when prev is None."""
    u = rng.random()
    if prev is not None:
        lo, hi = sampler.row_start[prev], sampler.row_start[prev + 1]
        if hi > lo and u < sampler.pair_cdf[hi - 1]:  # one of the listed followers
            j = lo + np.searchsorted(sampler.pair_cdf[lo:hi], u, side="right")
            return int(sampler.model.pair_key[j] % len(sampler.model.words))
        u = rng.random()
    return int(min(np.searchsorted(sampler.unigram_cdf, u * sampler.unigram_cdf[-1], side="right"),
                   len(sampler.unigram_cdf) - 1))


LINE_CHARS = (25, 45)  # line length in characters, as IAM-OnDB text lines
LINE_WORDS = (4, 9)


def sample_line(rng):
    """One line of text: a word-bigram Markov chain started from the word
    frequencies, run until a length drawn from LINE_CHARS is reached; lines
    outside LINE_CHARS or LINE_WORDS are drawn again. Sampled, not real text."""
    sampler = english_text_sampler()
    words = sampler.model.words
    while True:
        target = rng.integers(LINE_CHARS[0], LINE_CHARS[1] + 1)
        ids = [next_word(sampler, None, rng)]
        length = len(words[ids[0]])
        while length < target:
            ids.append(next_word(sampler, ids[-1], rng))
            length += 1 + len(words[ids[-1]])
        if LINE_CHARS[0] <= length <= LINE_CHARS[1] and LINE_WORDS[0] <= len(ids) <= LINE_WORDS[1]:
            return " ".join(words[i] for i in ids)


# ---------------------------------------------------------------------------
# 16. Cursive lines: the synthetic database
# ---------------------------------------------------------------------------
# Writers and the validation and test lines are fixed (LINES_DATA_SEED), the
# same for every run, like a real corpus; the run's seed draws the training
# lines. Writers of the three splits are disjoint, as in IAM-OnDB-t1, and so
# are the texts.

LINES_DATA_SEED = 2009
LINE_WRITERS = {"train": 200, "validation": 20, "test": 40}
MAX_EVAL_LINES_PER_WRITER = 10
LINE_SPLITS = ("validation", "test")


def writer_id(split, i):
    return f"{split[:2]}{i:03d}"


def line_writer(split, i):
    """Writer i of a split, drawn from its own seed: the same style in every run."""
    code = list(LINE_WRITERS).index(split)
    return draw_writer(np.random.default_rng([LINES_DATA_SEED, code, i]))


@functools.lru_cache(maxsize=None)
def line_writers(split):
    return tuple(line_writer(split, i) for i in range(LINE_WRITERS[split]))


@functools.lru_cache(maxsize=1)
def line_eval_texts():
    """{split: [[text] * MAX_EVAL_LINES_PER_WRITER per writer]} for validation and test.

    Each writer's lines come from the writer's own text stream, so fewer lines
    per writer are a prefix of more; a line already used elsewhere is drawn again.
    """
    seen, texts = set(), {}
    for code, split in enumerate(LINE_SPLITS, start=1):
        texts[split] = []
        for i in range(LINE_WRITERS[split]):
            rng = np.random.default_rng([LINES_DATA_SEED, code, i, 1])
            mine = []
            while len(mine) < MAX_EVAL_LINES_PER_WRITER:
                text = sample_line(rng)
                if text not in seen:
                    seen.add(text)
                    mine.append(text)
            texts[split].append(mine)
    return texts


def render_writer_line(text, split, i, seed):
    """Writer i of `split` writing `text`; `seed` fixes the per-line variation."""
    sample = render_line(text, line_writers(split)[i], np.random.default_rng(seed))
    sample.writer = writer_id(split, i)
    return sample


def line_eval_set(split, lines_per_writer):
    """The fixed validation or test lines: every writer of the split, `lines_per_writer` each."""
    code = LINE_SPLITS.index(split) + 1
    return [render_writer_line(text, split, i, [LINES_DATA_SEED, code, i, 2, j])
            for i, texts in enumerate(line_eval_texts()[split]) for j, text in enumerate(texts[:lines_per_writer])]


def draw_training_lines(n, rng):
    """(texts, writer indices, render seeds) for n fresh training lines; never a validation or test text."""
    held = {t for split in LINE_SPLITS for texts in line_eval_texts()[split] for t in texts}
    texts = []
    while len(texts) < n:
        text = sample_line(rng)
        if text not in held:
            texts.append(text)
    return texts, rng.integers(LINE_WRITERS["train"], size=n), rng.integers(2**63, size=n)


# ---------------------------------------------------------------------------
# 17. IAM-OnDB: reading the database
# ---------------------------------------------------------------------------
# The IAM On-Line Handwriting Database needs a registration and cannot be
# downloaded here, so the reader follows the on-disk format as public loaders
# describe it (README.md, References), and it is tested on files
# written in that format. The files are untrusted: XML is parsed with the
# standard library's expat with every entity declaration, external entity and
# external DTD refused, so a "billion laughs" file is rejected unexpanded.
#
# The format facts the reader relies on (the layout, the split files, the ascii
# files, lineStrokes and original XML, forms.txt, known bad files), and where
# each was checked, are in README.md under "References".

IAM_SPLIT_FILES = {  # split name -> IAM-OnDB-t1 file in the data root
    "train": "trainset.txt",
    "validation": "testset_v.txt",  # validation 1
    "validation2": "testset_t.txt",  # validation 2
    "test": "testset_f.txt",  # final test
}
PUBLISHED_LINE_COUNTS = {"train": 5364, "test": 3859}  # from the paper; printed, never asserted
IAM_ENCODING = "iso-8859-1"  # the XML files declare it; the ascii files are read the same way
IAM_ROOT = "WhiteboardCaptureSession"
CSR_MARKER = "%" * 11  # in ascii files; public loaders read it as a line break
LINE_BREAK = re.compile(r"\r\n|\r|\n")  # not str.splitlines: latin-1 byte 0x85 (cp1252 "...") is U+0085
BLANKS = " \t\r\n\x0b\x0c"  # what .strip() removes here; U+0085 and U+00A0 may be text
SAMPLE_PERIOD = 0.02  # seconds between pen samples in the real files

FORM_ID = re.compile(r"(?P<prefix>[A-Za-z0-9]+)-(?P<number>\d+)(?P<letter>[A-Za-z]?)")
LINE_FILE = re.compile(r"(?P<form>[A-Za-z0-9]+-\d+[A-Za-z]?)-(?P<number>\d+)\.xml")
DATA_FOLDERS = ("lineStrokes", "ascii", "original")


class IamOnDbError(UserError):
    """A problem with the data on disk, said in one line that names the file or folder."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever was interpolated


class IamOnDbBoundError(IamOnDbError):
    """A file beyond the bounds below: refused outright, never skipped as merely invalid."""


MAX_LINE_STROKES = 5_000  # per line file; real lines have at most about 100
MAX_COORDINATE = 1e7  # |x|, |y| in sensor units; real whiteboards span about 7,000 x 1,500
MAX_TIME = 1e12  # |time| in seconds; real files count from about 1.5e7


# Safe XML: expat with entities refused.
# The files come from a download, so they are untrusted: a DTD entity could expand
# exponentially (billion laughs) or pull in a local file. No real IAM-OnDB file needs a DTD,
# so every entity declaration and every external DTD or entity is refused outright.


class _BadContent(Exception):
    """Raised inside expat handlers; becomes an IamOnDbError naming the file."""


def _refuse_entity_declaration(name, *_):
    raise _BadContent(f"refused DTD entity declaration {name!r}")


def _refuse_unparsed_entity(name, *_):
    raise _BadContent(f"refused unparsed entity {name!r}")


def _refuse_external_entity(context, base, system_id, public_id):
    raise _BadContent(f"refused external entity {system_id or public_id!r}")


def _refuse_external_dtd(name, system_id, public_id, has_internal_subset):
    if system_id or public_id:
        raise _BadContent(f"refused external DTD {system_id or public_id!r}")


def _safe_parser() -> xml.parsers.expat.XMLParserType:
    parser = xml.parsers.expat.ParserCreate()  # the encoding comes from the XML declaration
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse_external_dtd
    parser.EntityDeclHandler = _refuse_entity_declaration
    parser.UnparsedEntityDeclHandler = _refuse_unparsed_entity
    parser.ExternalEntityRefHandler = _refuse_external_entity
    return parser


def _parse(parser, data: bytes, source: str) -> None:
    """Run an expat parser over a whole file, turning any failure into an IamOnDbError."""
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as err:
        raise IamOnDbError(f"{source}: invalid XML ({err})") from None
    except _BadContent as err:
        raise IamOnDbError(f"{source}: {err} (line {parser.CurrentLineNumber})") from None


# lineStrokes and original files.


@dataclass(frozen=True, eq=False)
class LineInk:
    """The ink of one lineStrokes file."""

    points: np.ndarray  # (N, 2) float64 x, y in sensor units, y pointing down
    stroke: np.ndarray  # (N,) int64 pen-down segment of each point, 0..S-1 in drawing order
    times: np.ndarray  # (N,) float64 seconds
    corners: dict  # e.g. {"DiagonallyOppositeCoords": (6512.0, 1376.0), ...}; whiteboard corners
    sensor_corner: str | None  # SensorLocation@corner, "top_left" in every file seen


def parse_line_strokes(data: bytes, source: str) -> LineInk:
    """Points, strokes, times and whiteboard corners of one lineStrokes XML file.

    Points are collected by a start-element handler without building a tree. Strokes without
    points are dropped, so stroke ids stay 0..S-1. Raises IamOnDbError naming `source` for
    invalid XML, a refused entity, a wrong root, a missing or non-numeric attribute, or no points.
    """
    xs, ys, ts = [], [], []  # attribute strings; numpy converts them in one call each
    first_point = []  # index into xs of each Stroke's first point
    corners, sensor = {}, []
    in_stroke = seen_root = False

    def start(name, attrs):
        nonlocal in_stroke, seen_root
        if not seen_root:
            if name != IAM_ROOT:
                raise _BadContent(f"root element <{name}>, expected <{IAM_ROOT}>")
            seen_root = True
        elif name == "Point":
            if not in_stroke:
                raise _BadContent("<Point> outside a <Stroke>")
            try:
                xs.append(attrs["x"])
                ys.append(attrs["y"])
                ts.append(attrs["time"])
            except KeyError as missing:
                raise _BadContent(f"<Point> without the {missing} attribute") from None
        elif name == "Stroke":
            in_stroke = True
            first_point.append(len(xs))
        elif name.endswith("OppositeCoords"):
            if "x" not in attrs or "y" not in attrs:
                raise _BadContent(f"<{name}> without x and y")
            corners[name] = (attrs["x"], attrs["y"])
        elif name == "SensorLocation":
            sensor.append(attrs.get("corner"))

    def end(name):
        nonlocal in_stroke
        if name == "Stroke":
            in_stroke = False

    parser = _safe_parser()
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    _parse(parser, data, source)

    if not xs:
        raise IamOnDbError(f"{source}: no <Point> elements")
    try:
        points = np.array([xs, ys], dtype=np.float64).T  # (N, 2)
        times = np.array(ts, dtype=np.float64)  # (N,)
        corners = {k: (float(x), float(y)) for k, (x, y) in corners.items()}
    except ValueError as err:
        raise IamOnDbError(f"{source}: non-numeric coordinate or time ({err})") from None
    if not (np.isfinite(points).all() and np.isfinite(times).all()):
        raise IamOnDbError(f"{source}: non-finite coordinate or time")
    if np.abs(points).max() > MAX_COORDINATE or np.abs(times).max() > MAX_TIME:
        # finite, but differences of such values overflow and the features become NaN
        raise IamOnDbBoundError(f"{source}: a coordinate beyond +-{MAX_COORDINATE:g} sensor units or a time beyond "
                                f"+-{MAX_TIME:g} s (largest {np.abs(points).max():g}, {np.abs(times).max():g})")
    counts = np.diff(np.append(first_point, len(xs)))  # (S_all,) points per Stroke element
    counts = counts[counts > 0]
    if len(counts) > MAX_LINE_STROKES:  # noise removal compares strokes pairwise
        raise IamOnDbBoundError(f"{source}: {len(counts):,} strokes, more than the {MAX_LINE_STROKES:,} a line may have")
    stroke = np.repeat(np.arange(len(counts)), counts)  # (N,)
    return LineInk(points, stroke, times, corners, sensor[0] if sensor else None)


class _FoundWriter(Exception):
    """Stops the parse once General/Form is seen: the rest of the file is the form's ink."""


def parse_form_writer(data: bytes, source: str) -> str | None:
    """General/Form@writerID of an original/**/strokes*.xml file, or None when absent.

    Same entity refusals as the line parser; raises IamOnDbError for invalid XML.
    """
    path, found = [], []  # open elements; the writer id once seen

    def start(name, attrs):
        if name == "Form" and path[-1:] == ["General"]:
            found.append(attrs.get("writerID", "").strip())
            raise _FoundWriter
        path.append(name)

    def end(name):
        path.pop()

    parser = _safe_parser()
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        _parse(parser, data, source)
    except _FoundWriter:
        pass
    return found[0] if found and found[0] else None


# ascii, split and forms.txt files.


def parse_ascii(text: str, source: str) -> list[str]:
    """The CSR lines of an ascii file: what was written, one entry per lineStrokes file.

    The marker %%%%%%%%%%% counts as a line break, blank lines are dropped and each line is
    stripped, as public loaders do. Raises IamOnDbError when there is no "CSR:" line.
    """
    lines = LINE_BREAK.split(re.sub(CSR_MARKER + "+", "\n", text))
    heads = [i for i, line in enumerate(lines) if line.strip(BLANKS) == "CSR:"]
    if not heads:
        raise IamOnDbError(f"{source}: no 'CSR:' section")
    return [line.strip(BLANKS) for line in lines[heads[0] + 1:] if line.strip(BLANKS)]


def _quoted_prefix(text: str, limit: int = 40) -> str:
    """repr of text, cut to its first `limit` characters: a bad entry may be a whole file."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def parse_split_file(text: str, source: str) -> list[str]:
    """Form ids of a split file, in file order without repeats (entries have a leading space)."""
    form_ids = []
    for number, line in enumerate(LINE_BREAK.split(text), start=1):
        entry = line.strip(BLANKS)
        if not entry:
            continue
        if not FORM_ID.fullmatch(entry):  # also keeps "../" out of the paths built from it
            raise IamOnDbError(f"{source} line {number}: {_quoted_prefix(entry)} is not a form id like a01-000u")
        if entry not in form_ids:
            form_ids.append(entry)
    return form_ids


def parse_forms_txt(text: str) -> dict[str, str]:
    """form id -> writer id from forms.txt: first two whitespace-separated columns, '#' skipped."""
    writers = {}
    for line in LINE_BREAK.split(text):
        columns = line.split()
        if len(columns) >= 2 and not columns[0].startswith("#"):
            writers[columns[0]] = columns[1]
    return writers


MAX_FILE_BYTES = 16 * 2**20  # any one file of the database; the largest real line file is about 105 kB


def _open_without_waiting(path, flags):
    # A FIFO would block open() until some writer appears; non-blocking, it opens and is refused below.
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _read_bytes(path: str) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES; IamOnDbError naming the file for
    anything else (a FIFO, a device such as /dev/zero, a symlink to either, an oversized file)."""
    try:
        with open(path, "rb", opener=_open_without_waiting) as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
                raise IamOnDbError(f"cannot read {path}: it is {kind}, not a regular file")
            data = f.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise IamOnDbError(f"cannot read {path}: larger than {MAX_FILE_BYTES:,} bytes, the most a file of "
                                   "the database may hold")
            return data
    except PermissionError:
        raise IamOnDbError(f"cannot read {path}: permission denied") from None
    except OSError as err:
        raise IamOnDbError(f"cannot read {path}: {err.strerror or err}") from None


def _raise_unreadable_folder(err: OSError):
    raise IamOnDbError(f"cannot read folder {err.filename}: {err.strerror or err}")


# -- Finding the data --


def _subfolders(path: str) -> list[str]:
    try:
        return sorted(entry.path for entry in os.scandir(path) if entry.is_dir())
    except OSError:  # only a hint: an unreadable folder is just not searched
        return []


def _layout_hint(data_dir: str) -> str:
    """Where the data seems to be, when data_dir is not the root (the usual mistakes)."""
    base = os.path.basename(os.path.normpath(data_dir))
    if base in DATA_FOLDERS:
        parent = os.path.dirname(os.path.normpath(data_dir))
        return f"; {data_dir} looks like the {base}/ folder itself: pass its parent {parent}"
    found = {name: [] for name in ("lineStrokes", "ascii")}
    children = _subfolders(data_dir)[:200]  # two levels, bounded: enough for the usual mistakes
    for folder in children + [grandchild for child in children for grandchild in _subfolders(child)][:2000]:
        for name in found:
            if os.path.isdir(os.path.join(folder, name)):
                found[name].append(folder)
    together = sorted(set(found["lineStrokes"]) & set(found["ascii"]))
    if together:
        return f"; found lineStrokes/ and ascii/ in {together[0]}: pass that folder"
    if found["lineStrokes"] or found["ascii"]:
        where = ", ".join(f"{name}/ in {places[0]}" for name, places in found.items() if places)
        return f"; found {where}: move lineStrokes/, ascii/, original/ and the split files into one folder and pass it"
    return ""


def check_layout(data_dir: str) -> None:
    """Raise IamOnDbError unless data_dir holds lineStrokes/ and ascii/."""
    if not os.path.exists(data_dir):
        raise IamOnDbError(f"IAM-OnDB folder not found: {data_dir}")
    if not os.path.isdir(data_dir):
        raise IamOnDbError(f"IAM-OnDB path is not a folder: {data_dir}")
    missing = [name + "/" for name in ("lineStrokes", "ascii") if not os.path.isdir(os.path.join(data_dir, name))]
    if missing:
        raise IamOnDbError(
            f"{data_dir} is not the IAM-OnDB root: no {' or '.join(missing)} in it (expected lineStrokes/, "
            f"ascii/, original/ and {', '.join(IAM_SPLIT_FILES.values())} side by side){_layout_hint(data_dir)}")


def read_split_files(data_dir: str) -> dict[str, list[str]]:
    """split name -> form ids, from the IAM-OnDB-t1 files. Train, validation and
    test are required (missing or empty -> IamOnDbError); validation 2
    (testset_t.txt) may be missing or empty, as in an export of the lines task."""
    splits, split_of = {}, {}
    for split, name in IAM_SPLIT_FILES.items():
        path = os.path.join(data_dir, name)
        optional = split == "validation2"
        if not os.path.isfile(path):
            if optional:
                continue
            elsewhere = [f for f in _subfolders(data_dir) if os.path.isfile(os.path.join(f, name))]
            hint = f"; found one in {elsewhere[0]}: move the four split files up" if elsewhere else ""
            raise IamOnDbError(f"missing split file {path} (the IAM-OnDB-t1 files belong in the data root){hint}")
        form_ids = parse_split_file(_read_bytes(path).decode(IAM_ENCODING), path)
        if not form_ids:
            if optional:
                continue
            raise IamOnDbError(f"empty split file {path}: no form ids")
        for form_id in form_ids:
            if form_id in split_of:  # the splits are writer-disjoint by design
                raise IamOnDbError(f"{path}: form {form_id} is also in {IAM_SPLIT_FILES[split_of[form_id]]}")
            split_of[form_id] = split
        splits[split] = form_ids
    return splits


def find_line_files(strokes_root: str) -> tuple[dict[str, tuple[str, dict[int, str]]], list[str], dict[str, list]]:
    """form id -> (folder relative to lineStrokes/, {line number: path}); unrecognised files; and
    form id -> ["<path> and <name>", ...] for every further file of a line number it already has
    (a01-000u-01.xml and a01-000u-001.xml)."""
    forms, unrecognised, twice = {}, [], {}
    for dirpath, dirnames, filenames in os.walk(strokes_root, onerror=_raise_unreadable_folder):
        dirnames.sort()
        folder = os.path.relpath(dirpath, strokes_root)
        for name in sorted(filenames):
            match = LINE_FILE.fullmatch(name)
            entry = forms.setdefault(match["form"], (folder, {})) if match else None
            if entry is None or entry[0] != folder:  # not a line file, or a form in two folders
                unrecognised.append(os.path.join(dirpath, name))
                continue
            if int(match["number"]) in entry[1]:  # which of the two is the line cannot be told
                twice.setdefault(match["form"], []).append(f"{entry[1][int(match['number'])]} and {name}")
            entry[1][int(match["number"])] = os.path.join(dirpath, name)
    return forms, unrecognised, twice


# -- Loading --


@dataclass(frozen=True, eq=False)
class InkLine:
    """One handwritten text line of IAM-OnDB."""

    line_id: str  # "a01-000u-01"
    form_id: str  # "a01-000u": text a01-000, copy u
    writer: str  # General/Form@writerID, else forms.txt, else the form id
    split: str  # "train", "validation", "validation2" or "test"
    text: str  # the CSR transcription
    points: np.ndarray  # (N, 2) float64 x, y sensor units, y down
    stroke: np.ndarray  # (N,) int64 pen-down segment, 0..S-1
    times: np.ndarray  # (N,) float64 seconds
    path: str = ""  # the lineStrokes file it was read from, for messages


@dataclass
class _Tally:
    """What the loader skipped or ignored, with a few example paths per reason."""

    skipped: Counter = field(default_factory=Counter)  # reason -> files or forms (the name says)
    lines_lost: int = 0  # line files of split forms not loaded
    ignored: Counter = field(default_factory=Counter)
    writer_from: Counter = field(default_factory=Counter)  # where each loaded form's writer came from
    examples: dict = field(default_factory=dict)  # reason -> up to 3 paths or ids

    def note(self, counter: Counter, reason: str, example: str, count: int = 1):
        counter[reason] += count
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(example)

    def skip(self, reason: str, example: str, lines_lost: int):
        self.note(self.skipped, reason, example)
        self.lines_lost += lines_lost


def _writer_of(data_dir, form_id, folder, forms_txt, tally) -> str:
    """General/Form@writerID of the form's original file, else forms.txt, else the form id."""
    path = os.path.join(data_dir, "original", folder, f"strokes{FORM_ID.fullmatch(form_id)['letter']}.xml")
    if os.path.isfile(path):
        raw = _read_bytes(path)  # unreadable: fatal, like every other file
        try:
            writer = parse_form_writer(raw, path)
        except IamOnDbError:  # corrupt: the writer comes from elsewhere
            writer = None
            tally.note(tally.ignored, "invalid original files", path)
        if writer:
            tally.writer_from["original"] += 1
            return writer
    if form_id in forms_txt:
        tally.writer_from["forms.txt"] += 1
        return forms_txt[form_id]
    tally.note(tally.writer_from, "unknown (form id used)", form_id)
    return form_id


def _load_form(data_dir, form_id, folder, numbered, split, forms_txt, tally) -> list[InkLine]:
    """The loadable lines of one form; skips are counted in tally, unreadable files raise."""
    ascii_path = os.path.join(data_dir, "ascii", folder, form_id + ".txt")
    if not os.path.isfile(ascii_path):
        tally.skip("forms without an ascii file", ascii_path, len(numbered))
        return []
    raw = _read_bytes(ascii_path)
    try:
        texts = parse_ascii(raw.decode(IAM_ENCODING), ascii_path)
    except IamOnDbError:
        tally.skip("forms whose ascii file has no CSR section", ascii_path, len(numbered))
        return []
    if sorted(numbered) != list(range(1, len(texts) + 1)):
        tally.skip("forms whose CSR line count differs from their line files",
                   f"{form_id} ({len(texts)} CSR lines, {len(numbered)} line files)", len(numbered))
        return []
    writer = _writer_of(data_dir, form_id, folder, forms_txt, tally)
    lines = []
    for number, path in sorted(numbered.items()):
        raw = _read_bytes(path)
        try:
            ink = parse_line_strokes(raw, path)
        except IamOnDbBoundError:
            raise
        except IamOnDbError:
            tally.skip("invalid line files", path, 1)
            continue
        lines.append(InkLine(f"{form_id}-{number:02d}", form_id, writer, split, texts[number - 1],
                          ink.points, ink.stroke, ink.times, path))
    return lines


def load_iam_ondb(data_dir, log=print) -> tuple[dict[str, list[InkLine]], dict]:
    """Every line of the four IAM-OnDB-t1 splits, and a summary of what was read and skipped.

    data_dir holds lineStrokes/, ascii/, optionally original/ and forms.txt, and the split files
    trainset.txt (-> "train"), testset_v.txt (-> "validation"), testset_t.txt (-> "validation2"),
    testset_f.txt (-> "test"). A corrupt line file, a form without ascii file or with a CSR line
    count unlike its line files are skipped and counted. A missing or mislaid folder, a missing
    or empty split, and an unreadable file raise IamOnDbError. Lines sorted by line id per split.
    The summary is logged through `log` (one string per call) and returned as a dict.
    """
    started = time.perf_counter()
    data_dir = os.fspath(data_dir)
    check_layout(data_dir)
    form_ids_by_split = read_split_files(data_dir)
    split_of = {form_id: split for split, ids in form_ids_by_split.items() for form_id in ids}
    forms_txt_path = os.path.join(data_dir, "forms.txt")
    forms_txt = parse_forms_txt(_read_bytes(forms_txt_path).decode(IAM_ENCODING)) if os.path.isfile(forms_txt_path) else {}
    line_files, unrecognised, twice = find_line_files(os.path.join(data_dir, "lineStrokes"))

    tally = _Tally()
    for path in unrecognised:
        tally.note(tally.ignored, "files in lineStrokes/ that are not line files", path)
    lines_by_split = {split: [] for split in form_ids_by_split}
    for form_id in sorted(line_files):
        folder, numbered = line_files[form_id]
        if form_id not in split_of:  # not parsed: IAM-OnDB-t1 leaves these forms out
            tally.note(tally.ignored, "forms in no split file", form_id)
            tally.ignored["lines of forms in no split file"] += len(numbered)
            continue
        split = split_of[form_id]
        if form_id in twice:
            tally.skip("forms with two files for one line number", twice[form_id][0], len(numbered) + len(twice[form_id]))
            continue
        lines_by_split[split] += _load_form(data_dir, form_id, folder, numbered, split, forms_txt, tally)
    for form_id in sorted(set(split_of) - set(line_files)):
        tally.skip("split forms without line files", form_id, 0)

    for split, lines in lines_by_split.items():
        if not lines:
            path = os.path.join(data_dir, IAM_SPLIT_FILES[split])
            n_forms = len(form_ids_by_split[split])
            raise IamOnDbError(f"{path} lists {n_forms} form{'s' * (n_forms != 1)} but none has a loadable line")

    summary = {
        "data_dir": data_dir,
        "lines": {split: len(lines) for split, lines in lines_by_split.items()},
        "forms": {split: len({l.form_id for l in lines}) for split, lines in lines_by_split.items()},
        "writers": {split: len({l.writer for l in lines}) for split, lines in lines_by_split.items()},
        "skipped": dict(tally.skipped),
        "lines_lost": tally.lines_lost,
        "ignored": dict(tally.ignored),
        "writer_from": dict(tally.writer_from),
        "examples": tally.examples,
        "seconds": time.perf_counter() - started,
    }
    for text in format_summary(summary).splitlines():
        log(text)
    return lines_by_split, summary


def format_summary(summary: dict) -> str:
    """A few lines: lines, forms and writers per split, then skips and ignored files with examples."""
    def counted(counts):
        return "; ".join(f"{reason}: {n}" + (f" (e.g. {', '.join(summary['examples'][reason])})"
                                             if reason in summary["examples"] else "")
                         for reason, n in counts.items())

    out = [f"IAM-OnDB {summary['data_dir']}: {sum(summary['lines'].values())} lines in {summary['seconds']:.2f} s"]
    for split, n in summary["lines"].items():
        paper = f"   (paper: {PUBLISHED_LINE_COUNTS[split]:,})" if split in PUBLISHED_LINE_COUNTS else ""
        out.append(f"  {split:<12}{n:>6} lines {summary['forms'][split]:>5} forms "
                   f"{summary['writers'][split]:>4} writers{paper}")
    if summary["skipped"]:
        out.append(f"  skipped (line files lost: {summary['lines_lost']}): {counted(summary['skipped'])}")
    if summary["ignored"]:
        out.append(f"  ignored: {counted(summary['ignored'])}")
    out.append(f"  writer ids of forms: {counted(summary['writer_from'])}")
    return "\n".join(out)

# ---------------------------------------------------------------------------
# 18. IAM-OnDB: preprocessing (Liwicki and Bunke 2006)
# ---------------------------------------------------------------------------
# The paper's front end for IAM-OnDB: one line of pen samples (sensor units, y
# down) is cleaned, deskewed, deslanted, normalised to corpus height 1 and
# resampled along the ink; delayed strokes are removed and kept as the "hat"
# feature. Everything after the first step works with y up, in corpus heights:
# baseline y = 0, corpus line y = 1. Choices where the papers are silent:
# - strokes stay separate: trajectory features never cross a pen-up (Liwicki
#   and Bunke join strokes with pen-up lines);
# - skew: a robust regression line through the baseline's local minima;
# - slant: 1-degree bins over +-60 degrees, segment length x a Gaussian
#   (sigma 30 degrees) around the vertical, shear about the mean y;
# - one scale factor for all three zones (the paper scales each zone);
# - spacing 0.15 corpus heights: about 20 samples per letter, the 15-25 of
#   IAM lines after preprocessing;
# - vicinity: the point and 3 on either side within its stroke; context map:
#   3x3 pixels of 0.5 corpus heights aligned to the baseline.

IAM_SPACING = 0.15  # resampling step in corpus heights: ~20 points per letter (docstring)
MAX_LINE_SAMPLES = 20_000  # per line after resampling: about 1,000 letters; real lines have a few thousand at most
ZERO_LENGTH = 1e-9  # shorter than this (corpus heights) counts as no movement

SPIKE_FACTOR = 10.0  # a step this many times the median step is a tracker glitch, not a hand
SPECK_MAX_POINTS = 2  # strokes this short may be noise ...
SPECK_ISOLATION = 1.0  # ... if farther than this many line heights from any other ink
SPECK_CHUNK = 2**18  # (candidate, stroke) pairs compared at once: about 8 MB

MAX_SKEW = np.radians(45.0)  # beyond this the "line" is not a line; clip the estimate
ROBUST_TRIM = 2.0  # extrema beyond this many robust sigmas from the fit are ascenders etc.
ROBUST_ITERATIONS = 3  # refits of the trimmed regression

SLANT_MAX_DEG = 60  # histogram covers -60..60 degrees from the vertical, 1-degree bins
SLANT_SIGMA_DEG = 30.0  # Gaussian weight around the vertical: near-vertical ink decides
SLANT_SMOOTHING = np.array([0.25, 0.5, 0.25])  # Liwicki and Bunke's histogram smoothing

DELAYED_MIN_Y = 0.75  # delayed strokes sit high: most points above 3/4 of the corpus height
DELAYED_MAX_WIDTH = 2.0  # dots and bars are small (corpus heights); longer strokes are words
DELAYED_MAX_HEIGHT = 1.0
HAT_MARGIN = 0.2  # a removed stroke's x-range widened by this much, so a dot covers its stem

X_HIGHPASS_HALF = 30  # x minus its moving average over 61 points (~3 letters)
VICINITY_HALF = 3  # vicinity = 7 points (~1 corpus height of ink)
ZONE_MARGIN = 0.3  # ascender points are above 1 + margin, descender points below -margin
ZONE_X_RADIUS = 0.5  # ... counted within this x-distance of the point
CONTEXT_CELL = 0.5  # side of one cell of the 3x3 context map (corpus heights)

GRAVES25_NAMES = (
    "pen_up", "hat", "speed", "x_highpass", "y",
    "dir_cos", "dir_sin", "curv_cos", "curv_sin",
    "vic_aspect", "vic_slope_cos", "vic_slope_sin", "vic_curliness", "vic_linearity",
    "ascenders", "descenders",
    "ctx_top_left", "ctx_top", "ctx_top_right",
    "ctx_left", "ctx_centre", "ctx_right",
    "ctx_bottom_left", "ctx_bottom", "ctx_bottom_right",
)


# -- Input validation and stroke bookkeeping --

def validate_line(points, stroke, times=None):
    """Check one line and return (points (N, 2) float64, stroke (N,) 0..S-1, times (N,)).

    Stroke ids may be any non-decreasing integers; they are relabelled 0..S-1. times=None
    means uniform sampling at SAMPLE_PERIOD. Raises ValueError for an empty line,
    wrong shapes, non-finite values or decreasing stroke ids.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.size == 0:
        raise ValueError("empty line: no points")
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {points.shape}")
    n = len(points)
    stroke = np.asarray(stroke)
    if stroke.shape != (n,):
        raise ValueError(f"stroke must have shape ({n},), got {stroke.shape}")
    if not np.issubdtype(stroke.dtype, np.integer):
        if not np.all(np.isfinite(stroke)) or np.any(stroke != np.round(stroke)):
            raise ValueError("stroke ids must be integers")
    if np.any(np.diff(stroke) < 0):
        raise ValueError("stroke ids must be non-decreasing (points in writing order)")
    times = (np.arange(n) * SAMPLE_PERIOD if times is None
             else np.asarray(times, dtype=np.float64))
    if times.shape != (n,):
        raise ValueError(f"times must have shape ({n},), got {times.shape}")
    if not (np.all(np.isfinite(points)) and np.all(np.isfinite(times))):
        raise ValueError("points and times must be finite")
    return points, relabel_strokes(stroke), times


def relabel_strokes(stroke):
    """Stroke ids 0..S-1 in order of appearance, (N,) int: a new id wherever the id changes, so
    gaps from removed strokes close (and the export writes one <Stroke> per run)."""
    return np.cumsum(stroke_starts(stroke)) - 1


def stroke_bounds(stroke):
    """Index of the first and the last point of each point's stroke: (N,), (N,)."""
    starts = np.flatnonzero(stroke_starts(stroke))
    ends = np.append(starts[1:] - 1, len(stroke) - 1)
    which = relabel_strokes(stroke)
    return starts[which], ends[which]


def stroke_steps(points, stroke):
    """Steps into and out of each point within its stroke.

    Returns (step_in (N, 2) = p[t] - p[t-1], step_out (N, 2) = p[t+1] - p[t], has_in (N,),
    has_out (N,)); a step across a pen-up or past a stroke end is zero and its flag False.
    points may also be (N,) (times). Slicing instead of gathering neighbours: this is the
    hot path of most features.
    """
    same = stroke[1:] == stroke[:-1]  # (N-1,)
    step = (points[1:] - points[:-1]) * same.reshape((-1,) + (1,) * (points.ndim - 1))
    zero = np.zeros((1,) + points.shape[1:])
    return (np.concatenate((zero, step)), np.concatenate((step, zero)),
            np.concatenate(([False], same)), np.concatenate((same, [False])))


def _lengths(vectors):
    """(N,) Euclidean lengths of the rows of vectors (N, 2)."""
    return np.hypot(vectors[:, 0], vectors[:, 1])


def _median(values):
    """Median of a 1-D array (np.median's checks cost more than the sort at these sizes)."""
    ordered = np.sort(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _prefix_sums(values):
    """(N+1,) [0, v0, v0+v1, ...]: window sums become two lookups."""
    return np.concatenate(([0.0], np.cumsum(values, dtype=np.float64)))


def _safe_divide(num, den, default):
    """num / den where den > ZERO_LENGTH**2, else default: degenerate geometry stays finite."""
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    out = np.full(num.shape, float(default))
    return np.divide(num, den, out=out, where=den > ZERO_LENGTH ** 2)


def flip_to_y_up(points):
    """(N, 2) with y negated: IAM-OnDB's y grows downwards, everything after this grows up."""
    return points * np.array([1.0, -1.0])


# -- Duplicates and noise --

def _drop_consecutive_duplicates(points, stroke, times):
    """Keep the first of any run of identical consecutive points within a stroke."""
    step_in, _, has_in, _ = stroke_steps(points, stroke)
    keep = ~(has_in & (step_in[:, 0] == 0) & (step_in[:, 1] == 0))  # (N,)
    return points[keep], stroke[keep], times[keep]


def _spikes(points, stroke):
    """(N,) bool: interior points that jump out and straight back.

    A spike's steps in and out both exceed SPIKE_FACTOR x the line's median step, and its
    two neighbours are closer to each other than it is to either of them.
    """
    into, out_of, has_in, has_out = stroke_steps(points, stroke)
    step_in, step_out = _lengths(into), _lengths(out_of)  # (N,) 0 at stroke ends
    moving = step_in[step_in > 0]
    if moving.size == 0:
        return np.zeros(len(points), dtype=bool)
    big = SPIKE_FACTOR * _median(moving)
    shortcut = _lengths(into + out_of)  # p[t+1] - p[t-1]
    return (has_in & has_out & (step_in > big) & (step_out > big)
            & (shortcut < np.minimum(step_in, step_out)))


def _isolated_specks(points, stroke):
    """(N,) bool: points of strokes of <= SPECK_MAX_POINTS points far from all other ink.

    "Far" = more than SPECK_ISOLATION line heights from the bounding box of every other
    stroke, the line height being the 5-95 percentile spread of y (about two corpus
    heights), so i-dots (well under one line height from their stem) stay. Boxes instead of
    points keep this O(specks x strokes) in time; the comparison runs in chunks of SPECK_CHUNK
    pairs, so memory stays bounded.
    """
    mask = np.zeros(len(points), dtype=bool)
    counts = np.bincount(stroke)
    small = counts[stroke] <= SPECK_MAX_POINTS
    if len(counts) < 2 or not small.any():
        return mask
    y_sorted = np.sort(points[:, 1])
    lo, hi = y_sorted[int(0.05 * (len(y_sorted) - 1))], y_sorted[int(0.95 * (len(y_sorted) - 1))]
    if hi - lo <= 0:
        return mask  # a flat line gives no scale to call anything far
    starts = np.flatnonzero(stroke_starts(stroke))
    box_min = np.minimum.reduceat(points, starts, axis=0)  # (S, 2)
    box_max = np.maximum.reduceat(points, starts, axis=0)
    cand = np.flatnonzero(small)  # (M,)
    per_chunk = max(1, SPECK_CHUNK // len(starts))  # candidates per (chunk, S, 2) block: memory stays bounded
    for at in range(0, len(cand), per_chunk):
        c = cand[at:at + per_chunk]  # (C,)
        p = points[c, None, :]  # (C, 1, 2)
        outside = np.maximum(np.maximum(box_min[None] - p, p - box_max[None]), 0.0)  # (C, S, 2)
        dist = np.hypot(outside[..., 0], outside[..., 1])  # (C, S)
        dist[np.arange(len(c)), stroke[c]] = np.inf
        mask[c[dist.min(axis=1) > SPECK_ISOLATION * (hi - lo)]] = True
    return mask


def remove_duplicates_and_noise(points, stroke, times):
    """Drop duplicate points, spikes and isolated specks.

    Rules, in order: (1) a point equal to the previous point of its stroke is dropped
    (zero-length steps carry no direction); (2) spikes (`_spikes`: out-and-back jumps over
    10x the median step) are dropped, then duplicates again; (3) strokes of at most 2 points
    farther than one line height from all other ink are dropped (`_isolated_specks`). If (3)
    would empty the line it is skipped. Stroke ids come back relabelled 0..S'-1.

    points (N, 2), stroke (N,), times (N,) -> points (N', 2), stroke (N',), times (N',).
    """
    points, stroke, times = _drop_consecutive_duplicates(points, stroke, times)
    keep = ~_spikes(points, stroke)
    points, stroke, times = _drop_consecutive_duplicates(
        points[keep], stroke[keep], times[keep])
    keep = ~_isolated_specks(points, stroke)
    if keep.any():
        points, stroke, times = points[keep], stroke[keep], times[keep]
    return points, relabel_strokes(stroke), times


# Regression lines and local extrema (shared by skew, baseline and corpus line).

class FittedLine(NamedTuple):
    """y = intercept + slope * x."""

    intercept: float
    slope: float

    def at(self, x):
        return self.intercept + self.slope * np.asarray(x, dtype=float)


def fit_line_least_squares(x, y):
    """Least-squares Line through (x, y); slope 0 if x does not vary (a vertical line)."""
    x_mean, y_mean = x.sum() / len(x), y.sum() / len(y)
    dx = x - x_mean
    sxx = dx @ dx
    if sxx <= ZERO_LENGTH ** 2 * len(x) * (1.0 + abs(x_mean)) ** 2:
        return FittedLine(float(y_mean), 0.0)
    slope = (dx @ (y - y_mean)) / sxx
    return FittedLine(float(y_mean - slope * x_mean), float(slope))


def fit_line_robust(x, y):
    """Least-squares Line after trimming points beyond ROBUST_TRIM robust sigmas, refit.

    The robust sigma is 1.4826 x the median absolute deviation of the residuals, so a
    minority of outliers (descender bottoms among baseline minima, ascender tops among
    corpus maxima) does not move the line.
    """
    keep = np.ones(len(x), dtype=bool)
    line = fit_line_least_squares(x, y)
    exact = ZERO_LENGTH * (1.0 + np.abs(y).max())  # residuals this small count as on the line
    for _ in range(ROBUST_ITERATIONS):
        resid = y - (line.intercept + line.slope * x)
        centre = _median(resid[keep])
        sigma = 1.4826 * _median(np.abs(resid[keep] - centre))
        new_keep = np.abs(resid - centre) <= ROBUST_TRIM * sigma + exact
        if new_keep.sum() < 2 or (new_keep == keep).all():
            break
        keep = new_keep
        line = fit_line_least_squares(x[keep], y[keep])
    return line


def local_extrema(points, stroke):
    """Interior local minima and maxima of y within each stroke: (N,) bool, (N,) bool.

    Stroke ends are never extrema (a pen-down point is not a turning point). A plateau
    counts once, at its first point.
    """
    step_in, step_out, has_in, has_out = stroke_steps(points, stroke)
    interior = has_in & has_out
    rise_in, rise_out = step_in[:, 1], step_out[:, 1]
    return (interior & (rise_in < 0) & (rise_out >= 0),
            interior & (rise_in > 0) & (rise_out <= 0))


def rotate(points, angle, centre):
    """(N, 2) rotated counter-clockwise by angle (radians) about centre (2,)."""
    c, s = np.cos(angle), np.sin(angle)
    return (points - centre) @ np.array([[c, s], [-s, c]]) + centre


# -- Skew --

def correct_skew(points, stroke):
    """Rotate a y-up line so its baseline is level; returns (points (N, 2), skew angle).

    The skew is the angle of a robust regression line (`fit_line_robust`) through the local
    minima of y (the baseline points), chosen over all points because ascenders and
    descenders spread unevenly along a line and tilt an all-points fit. With fewer than 3
    minima (very short lines) all points are used. The angle (radians, counter-clockwise =
    line rising to the right) is clipped to +-45 degrees; the rotation is about the centroid.
    """
    minima, _ = local_extrema(points, stroke)
    if minima.sum() >= 3 and np.ptp(points[minima, 0]) > 0:
        line = fit_line_robust(points[minima, 0], points[minima, 1])
    else:
        line = fit_line_least_squares(points[:, 0], points[:, 1])
    angle = float(np.clip(np.arctan(line.slope), -MAX_SKEW, MAX_SKEW))
    return rotate(points, -angle, points.mean(axis=0)), angle


# -- Slant --

def slant_histogram(points, stroke):
    """Weighted, smoothed histogram of pen-down segment angles from the vertical.

    Returns (centres (B,) degrees, -60..60, histogram (B,)). Each segment between
    consecutive points of a stroke is oriented upwards, its angle from the vertical is
    atan2(dx, dy) (positive = leaning right), and it adds
    length * exp(-angle^2 / (2 * 30deg^2)) to its 1-degree bin: only near-vertical ink
    says where the writing leans, and weighting by length makes the estimate independent of
    pen speed. The histogram is smoothed with (0.25, 0.5, 0.25).
    """
    seg = np.diff(points, axis=0)  # (N-1, 2)
    length = _lengths(seg)
    use = (stroke[1:] == stroke[:-1]) & (length > 0)
    seg, length = seg[use], length[use]
    seg = np.where(seg[:, 1:2] < 0, -seg, seg)
    angle = np.degrees(np.arctan2(seg[:, 0], seg[:, 1]))
    weight = length * np.exp(-0.5 * (angle / SLANT_SIGMA_DEG) ** 2)
    bins = np.rint(angle).astype(np.int64) + SLANT_MAX_DEG
    inside = (bins >= 0) & (bins <= 2 * SLANT_MAX_DEG)
    hist = np.bincount(bins[inside], weights=weight[inside], minlength=2 * SLANT_MAX_DEG + 1)
    centres = np.arange(-SLANT_MAX_DEG, SLANT_MAX_DEG + 1, dtype=float)
    return centres, np.convolve(hist, SLANT_SMOOTHING, mode="same")


def correct_slant(points, stroke):
    """Shear a y-up line upright; returns (points (N, 2), slant angle in radians).

    slant = the argmax of `slant_histogram` (0 if the line has no segment within 60 degrees
    of the vertical); x <- x - tan(slant) * (y - y_ref) with y_ref the mean y, so the
    line's centre stays put.
    """
    centres, hist = slant_histogram(points, stroke)
    slant = float(np.radians(centres[np.argmax(hist)])) if hist.max() > 0 else 0.0
    sheared = points.copy()
    sheared[:, 0] -= np.tan(slant) * (points[:, 1] - points[:, 1].mean())
    return sheared, slant


# Baseline, corpus line and height normalisation.

def fit_baseline_and_corpus(points, stroke):
    """Baseline and corpus line of a y-up line: (FittedLine, FittedLine), the corpus line above.

    Baseline = `fit_line_robust` through the local minima of y, corpus line = the same
    through the local maxima (so descender bottoms and ascender tops are trimmed). With
    fewer than 2 minima (maxima) the line is horizontal through the lowest (highest) point.
    If the two lines are then less than 5% of the ink's height apart at the middle of the
    line (one point, a flat or vertical stroke, a failed fit), the baseline becomes
    horizontal through the lowest point and the corpus line lies the ink's larger extent
    (or 1 unit, for a single point) above it.
    """
    minima, maxima = local_extrema(points, stroke)
    x, y = points[:, 0], points[:, 1]
    baseline = (fit_line_robust(x[minima], y[minima]) if minima.sum() >= 2
                else FittedLine(float(y.min()), 0.0))
    corpus = (fit_line_robust(x[maxima], y[maxima]) if maxima.sum() >= 2
              else FittedLine(float(y.max()), 0.0))
    x_mid = 0.5 * (x.min() + x.max())
    height = float(corpus.at(x_mid) - baseline.at(x_mid))
    if not height > max(0.05 * np.ptp(y), ZERO_LENGTH * (1.0 + np.abs(points).max())):
        extent = max(np.ptp(x), np.ptp(y))
        baseline = FittedLine(float(y.min()), 0.0)
        corpus = FittedLine(float(y.min()) + (extent if extent > 0 else 1.0), 0.0)
    return baseline, corpus


def normalise_height(points, baseline, corpus):
    """Scale a y-up line to corpus height 1; returns (points (N, 2), corpus height h).

    h = corpus(x_mid) - baseline(x_mid) at the middle of the ink's x-range, and
    x' = (x - x_min) / h,  y' = (y - baseline(x)) / h,
    so the baseline becomes y = 0 everywhere and the corpus line y = 1 (exactly, if the two
    lines are parallel). Raises ValueError unless the corpus line is above the baseline.
    """
    x, y = points[:, 0], points[:, 1]
    x_mid = 0.5 * (x.min() + x.max())
    h = float(corpus.at(x_mid) - baseline.at(x_mid))
    if not h > 0:
        raise ValueError(f"the corpus line must lie above the baseline (height {h})")
    return np.column_stack([(x - x.min()) / h, (y - baseline.at(x)) / h]), h


# Speed (before resampling).

def point_speed(points, stroke, times):
    """Pen speed at each point, (N,): |p[t+1] - p[t-1]| / (time[t+1] - time[t-1]).

    Central difference within the stroke, one-sided at its ends, 0 for a single-point
    stroke; units are those of points per second. Non-increasing times (duplicated
    timestamps) use the line's median sampling period instead.
    """
    step_in, step_out, has_in, has_out = stroke_steps(points, stroke)
    dist = _lengths(step_in + step_out)  # |p[t+1] - p[t-1]|, one-sided at stroke ends
    dt_in, dt_out, _, _ = stroke_steps(times, stroke)
    dt = dt_in + dt_out
    steps = np.diff(times)
    period = _median(steps[steps > 0]) if np.any(steps > 0) else SAMPLE_PERIOD
    n_steps = has_in.astype(float) + has_out
    return dist / np.where(dt > 0, dt, np.maximum(n_steps, 1.0) * period)


# -- Delayed strokes and the hat feature --

def remove_delayed_strokes(points, stroke):
    """Find delayed strokes of a height-normalised line; returns (keep (N,), hat_ranges (R, 2)).

    A stroke (not the first) is delayed, like an i-dot or a t-bar, if all of:
    - it is high: more than half its points are above y = 0.75 (t-bars are often crossed
      just under the corpus line);
    - it goes back over written ink: the middle of its x-range lies left of the rightmost x
      of all earlier strokes;
    - it is small: at most 2 corpus heights wide and 1 high (longer strokes are words).
    hat_ranges holds (x_min, x_max) of each removed stroke, for `hat_feature`.
    """
    x, y = points[:, 0], points[:, 1]
    starts = np.flatnonzero(stroke_starts(stroke))
    counts = np.diff(np.append(starts, len(points)))
    x_min, x_max = np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts)  # (S,)
    y_min, y_max = np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts)
    high = np.add.reduceat((y > DELAYED_MIN_Y).astype(float), starts) / counts > 0.5
    written_right_edge = np.concatenate(([-np.inf], np.maximum.accumulate(x_max)[:-1]))
    delayed = (high & (0.5 * (x_min + x_max) < written_right_edge)
               & (x_max - x_min <= DELAYED_MAX_WIDTH) & (y_max - y_min <= DELAYED_MAX_HEIGHT))
    delayed[0] = False
    return ~delayed[stroke], np.column_stack([x_min[delayed], x_max[delayed]])


def hat_feature(x, hat_ranges, margin=HAT_MARGIN):
    """(T,) 1.0 where x lies within a removed stroke's x-range widened by margin, else 0.0."""
    lo, hi = hat_ranges[:, :1] - margin, hat_ranges[:, 1:] + margin  # (R, 1)
    under = (x >= lo) & (x <= hi)  # (R, T): a short leading axis reduces fast
    return under.any(axis=0).astype(np.float64)


# -- The whole preprocessing --

@dataclass(frozen=True)
class Preprocessed:
    """One normalised, resampled line (y up, corpus heights; arrays are read-only)."""

    points: np.ndarray  # (T, 2) equidistant ink; baseline y = 0, corpus line y = 1
    stroke: np.ndarray  # (T,) int stroke id 0..S-1 (delayed strokes removed and relabelled)
    pen_up: np.ndarray  # (T,) 1.0 on the first point of each stroke
    speed: np.ndarray  # (T,) corpus heights / s, measured before resampling, interpolated
    hat: np.ndarray  # (T,) 1.0 where a delayed stroke was removed at this x
    hat_ranges: np.ndarray  # (R, 2) x-ranges of the removed delayed strokes
    baseline: FittedLine  # as used for normalisation: after skew and slant, y-up sensor units
    corpus: FittedLine  # likewise; corpus(x) - baseline(x) at mid-line = corpus_height
    corpus_height: float  # sensor units per output unit
    skew: float  # radians the input line rose to the right (undone by rotation)
    slant: float  # radians the writing leaned right of vertical (undone by shear)
    spacing: float  # resampling step, corpus heights
    source: np.ndarray | None = None  # (T,) fractional index of the input point each point lies at (ink spans)


def _read_only(a):
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


@dataclass(frozen=True)
class Distortion:
    """A random change of one line's height-normalised ink (corpus heights, baseline y = 0),
    for training augmentation. It acts after the skew and slant corrections, which would
    otherwise undo most of it, and before speed, delayed strokes and resampling."""

    matrix: np.ndarray  # (2, 2) applied to every point: shear, x and y scale, a small rotation
    warp_amplitude: float  # x += a sin(2 pi x / wavelength + phase): letters locally wider or narrower
    warp_wavelength: float  # corpus heights; a / wavelength is small enough to keep x monotone
    warp_phase: float
    spacing_factor: float  # the resampling step times this: the same ink in fewer or more samples


def draw_distortion(rng, strength):
    """A Distortion whose every part scales with `strength` (0..2; see RunConfig.augment)."""
    def within(r):
        return rng.uniform(-r, r) * strength
    shear, x_scale, y_scale, angle = within(0.15), np.exp(within(0.1)), np.exp(within(0.1)), within(0.02)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # dx'/dx = 1 + 2 pi a / wavelength cos(...) >= 1 - 2 pi 0.2 / 2 > 0 at strength 2: no ink folds back.
    return Distortion(rotation @ np.array([[x_scale, shear], [0.0, y_scale]]), rng.uniform(0, 0.1) * strength,
                      rng.uniform(2.0, 5.0), rng.uniform(0, 2 * np.pi), float(np.exp(within(0.1))))


def apply_distortion(points, distortion):
    """(N, 2) points moved by the Distortion's matrix, then warped along x."""
    moved = points @ distortion.matrix.T
    moved[:, 0] += distortion.warp_amplitude * np.sin(2 * np.pi * moved[:, 0] / distortion.warp_wavelength
                                                      + distortion.warp_phase)
    return moved


def preprocess(points, stroke, times=None, spacing=IAM_SPACING, distortion=None):
    """Liwicki-Bunke normalisation of one IAM-OnDB line -> Preprocessed.

    points (N, 2) sensor units with y DOWN (as in the XML), stroke (N,) non-decreasing ids,
    times (N,) seconds (None = every 20 ms). Steps: flip to y up, remove duplicates and
    noise, correct skew, correct slant, fit baseline and corpus line, normalise height,
    measure speed, remove delayed strokes (kept as hat ranges), resample every `spacing`
    corpus heights. A line of one point, identical points or a single vertical stroke gives
    a short, finite result (T >= 2); an empty line, or one that would resample to more than
    MAX_LINE_SAMPLES points, raises ValueError. A Distortion (training augmentation) moves
    the normalised points and scales the resampling step.
    """
    points, stroke, times = validate_line(points, stroke, times)
    points = flip_to_y_up(points)
    points, stroke, source = remove_duplicates_and_noise(points, stroke, np.arange(len(points)))
    times = times[source]  # only points are dropped, so the input indices can ride along as "times"
    points, skew = correct_skew(points, stroke)
    points, slant = correct_slant(points, stroke)
    baseline, corpus = fit_baseline_and_corpus(points, stroke)
    points, corpus_height = normalise_height(points, baseline, corpus)
    if distortion is not None:
        points, spacing = apply_distortion(points, distortion), spacing * distortion.spacing_factor
    speed = point_speed(points, stroke, times)  # (N,) corpus heights / s
    keep, hat_ranges = remove_delayed_strokes(points, stroke)
    points, stroke, speed, source = points[keep], relabel_strokes(stroke[keep]), speed[keep], source[keep]
    ink = ink_length(points, stroke)  # (N,)
    span, n = resampled_counts(stroke, ink, spacing)
    if not n.sum() <= MAX_LINE_SAMPLES:
        raise ValueError(f"the line would resample to {n.sum():,} samples, more than {MAX_LINE_SAMPLES:,}: its ink is "
                         f"{span.sum():.3g} corpus heights long (corpus height {corpus_height:.3g} sensor units)")
    new_points, new_stroke, frac = resample_strokes(points, stroke, ink, spacing)
    new_speed = np.interp(frac, np.arange(len(speed), dtype=float), speed)
    pen_up = stroke_starts(new_stroke).astype(np.float64)
    return Preprocessed(
        points=_read_only(new_points), stroke=_read_only(new_stroke),
        pen_up=_read_only(pen_up), speed=_read_only(new_speed),
        hat=_read_only(hat_feature(new_points[:, 0], hat_ranges)),
        hat_ranges=_read_only(hat_ranges), baseline=baseline, corpus=corpus,
        corpus_height=corpus_height, skew=skew, slant=slant, spacing=float(spacing),
        source=_read_only(np.interp(frac, np.arange(len(source), dtype=float), source)))


# ---------------------------------------------------------------------------
# 19. IAM-OnDB: the 25 online features
# ---------------------------------------------------------------------------

def moving_average(values, half_window):
    """(T,) centred mean over values[t-h .. t+h], the window clipped at the sequence ends."""
    n = len(values)
    csum = _prefix_sums(values)
    idx = np.arange(n)
    lo, hi = np.maximum(idx - half_window, 0), np.minimum(idx + half_window + 1, n)
    return (csum[hi] - csum[lo]) / (hi - lo)


def writing_direction(points, stroke):
    """(T, 2) cos, sin of the chord p[t+1] - p[t-1] (one-sided at stroke ends); (0, 0) if
    the stroke has one point. The centred chord is the tangent of equidistant ink."""
    step_in, step_out, _, _ = stroke_steps(points, stroke)
    chord = step_in + step_out  # p[t+1] - p[t-1]
    return _safe_divide(chord, _lengths(chord)[:, None], 0.0)


def curvature(points, stroke):
    """(T, 2) cos, sin of the turning angle between u = p[t] - p[t-1] and v = p[t+1] - p[t]:
    cos = u.v / (|u||v|), sin = (u x v) / (|u||v|) (positive = turning left). (1, 0), no
    turn, at stroke ends."""
    u, v, _, _ = stroke_steps(points, stroke)
    norms = _lengths(u) * _lengths(v)
    cos = _safe_divide(u[:, 0] * v[:, 0] + u[:, 1] * v[:, 1], norms, 1.0)
    sin = _safe_divide(u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0], norms, 0.0)
    return np.column_stack([cos, sin])


def vicinity_features(points, stroke, half=VICINITY_HALF):
    """(T, 5) aspect, slope cos, slope sin, curliness, linearity of each point's vicinity.

    Vicinity = points t-half .. t+half of the same stroke (fewer near its ends); dx, dy =
    its bounding-box width and height; c = chord from its first to its last point.
        aspect    = (dy - dx) / (dy + dx)           (0 for a single point)
        slope     = c / |c|                         ((0, 0) if |c| = 0)
        curliness = path length / max(dx, dy)       (1 for a single point, as a straight line)
        linearity = mean over the vicinity of the squared distance to the line through c
                    (to c's first point when |c| = 0, a closed loop)
    """
    first, last = stroke_bounds(stroke)
    idx = np.arange(len(points))
    v_first, v_last = np.maximum(idx - half, first), np.minimum(idx + half, last)  # (T,)
    n_valid = v_last - v_first + 1
    # (K, T) rather than (T, K): numpy reduces over a short leading axis much faster
    want = np.arange(-half, half + 1)[:, None] + idx[None, :]  # (K, T)
    vic = np.minimum(np.maximum(want, v_first), v_last)  # clamped copies repeat the ends
    x, y = np.ascontiguousarray(points[:, 0]), np.ascontiguousarray(points[:, 1])
    rx, ry = x[vic] - x[v_first], y[vic] - y[v_first]  # (K, T) relative to the first point
    dx, dy = rx.max(axis=0) - rx.min(axis=0), ry.max(axis=0) - ry.min(axis=0)  # (T,)
    aspect = _safe_divide(dy - dx, dy + dx, 0.0)
    chord = points[v_last] - points[v_first]  # (T, 2)
    chord_len = _lengths(chord)
    slope = _safe_divide(chord, chord_len[:, None], 0.0)
    step = _lengths(points[1:] - points[:-1]) * (stroke[1:] == stroke[:-1])
    ink = _prefix_sums(step)  # (T,) ink length so far, flat across pen-ups
    curliness = _safe_divide(ink[v_last] - ink[v_first], np.maximum(dx, dy), 1.0)
    # squared distance to the chord line = cross(r, c)^2 / |c|^2; sum first, divide once.
    # The clamped copies repeat the first or last point, which lie on the chord (and are
    # the first point of a closed loop), so they add 0 and only n_valid must be right.
    cross_sq = ((rx * chord[:, 1] - ry * chord[:, 0]) ** 2).sum(axis=0)  # (T,)
    linearity = _safe_divide(cross_sq, chord_len ** 2, 0.0) / n_valid
    loop = np.flatnonzero(chord_len <= ZERO_LENGTH)
    linearity[loop] = (rx[:, loop] ** 2 + ry[:, loop] ** 2).sum(axis=0) / n_valid[loop]
    return np.column_stack([aspect, slope, curliness, linearity])


def zone_counts(points, margin=ZONE_MARGIN, x_radius=ZONE_X_RADIUS):
    """(T, 2) ascender, descender counts: points j with |x_j - x_t| <= x_radius and
    y_j > 1 + margin (above the corpus line), resp. y_j < -margin (below the baseline).
    Counts all ink of the line (pseudo-offline), via prefix sums over x-sorted points."""
    x, y = points[:, 0], points[:, 1]
    order = np.argsort(x, kind="stable")
    xs = x[order]
    lo = np.searchsorted(xs, x - x_radius, side="left")
    hi = np.searchsorted(xs, x + x_radius, side="right")
    counts = []
    for in_zone in (y[order] > 1.0 + margin, y[order] < -margin):
        csum = _prefix_sums(in_zone)
        counts.append(csum[hi] - csum[lo])
    return np.column_stack(counts).astype(np.float64)


def context_map(points, cell=CONTEXT_CELL):
    """(T, 9) the 3x3 neighbourhood, around each point's pixel, of a coarse bitmap of counts.

    The bitmap counts the line's points per cell x cell pixel; pixels are aligned to x = 0
    and to the baseline y = 0, so with cell = 0.5 pixel rows split the corpus zone in two
    and the line y = 1 is a pixel border. A point's own pixel is the centre cell (it counts
    the point itself); the 9 values are in reading order (top row first, left to right).
    """
    col = np.floor(points[:, 0] / cell).astype(np.int64)  # (T,)
    row = np.floor(points[:, 1] / cell).astype(np.int64)
    col -= col.min() - 1  # one empty pixel of margin on every side
    row -= row.min() - 1
    n_rows = int(row.max()) + 2
    n_cols = int(col.max()) + 2
    bitmap = np.bincount(col * n_rows + row, minlength=n_cols * n_rows)  # (n_cols * n_rows,)
    bitmap = bitmap.reshape(n_cols, n_rows)
    return np.column_stack([bitmap[col + dc, row + dr]
                            for dr in (1, 0, -1) for dc in (-1, 0, 1)]).astype(np.float64)


def features_graves25(pre):
    """The 25 features of Liwicki and Bunke (2006) per point, (T, 25) float64.

    With p[t] = (x, y) the preprocessed point, stroke-relative neighbours p[t-1], p[t+1]:
     1 pen_up        1 on the first point of a stroke, else 0
     2 hat           1 if a delayed stroke was removed at this x (+-0.2), else 0
     3 speed         |p[t+1]-p[t-1]| / dt before resampling, interpolated (corpus heights/s)
     4 x_highpass    x - mean(x[t-30 .. t+30])
     5 y             y (baseline 0, corpus line 1)
     6 dir_cos       (p[t+1]-p[t-1])_x / |p[t+1]-p[t-1]|
     7 dir_sin       (p[t+1]-p[t-1])_y / |p[t+1]-p[t-1]|
     8 curv_cos      u.v / (|u||v|),  u = p[t]-p[t-1], v = p[t+1]-p[t]
     9 curv_sin      (u x v) / (|u||v|)
    10 vic_aspect    (dy - dx) / (dy + dx) of the vicinity's bounding box
    11 vic_slope_cos c_x / |c|, c = last - first vicinity point
    12 vic_slope_sin c_y / |c|
    13 vic_curliness vicinity path length / max(dx, dy)
    14 vic_linearity mean squared distance of vicinity points to the line through c
    15 ascenders     #points with y > 1.3 and |x_j - x| <= 0.5
    16 descenders    #points with y < -0.3 and |x_j - x| <= 0.5
    17-25 ctx_*      #points in the 3x3 pixels around p[t]'s pixel of a 0.5 x 0.5 bitmap
    Degenerate geometry gives the defaults documented in each helper; all values are finite.
    """
    points, stroke = pre.points, pre.stroke
    return np.column_stack([
        pre.pen_up, pre.hat, pre.speed,
        points[:, 0] - moving_average(points[:, 0], X_HIGHPASS_HALF), points[:, 1],
        writing_direction(points, stroke),
        curvature(points, stroke),
        vicinity_features(points, stroke),
        zone_counts(points),
        context_map(points),
    ])

# ---------------------------------------------------------------------------
# 20. IAM-OnDB: writing the format
# ---------------------------------------------------------------------------
# So that synthetic cursive lines can be exported and read back through the
# same loader, preprocessing and features as the real database.


@dataclass(frozen=True, eq=False)
class Form:
    """One form to write: one writer's copy of a text, as lines of ink.

    lines: [(text, points (N, 2), stroke (N,), times (N,) or None), ...] for lines 01, 02, ...
    Points are rounded to integer sensor units (y down); a new <Stroke> starts wherever the
    stroke id changes; times are written with two decimals, and None means a 20 ms clock.
    """

    form_id: str  # "a01-000u" (text a01-000, copy u) or "d04-081" (no letter)
    writer: str  # General/Form@writerID in original/<..>/strokes<letter>.xml (and forms.txt)
    lines: list
    prompt: list | None = None  # lines of the OCR section; None: the written texts
    marker_joins: tuple = ()  # i listed: CSR lines i and i+1 (0-based) are joined by %%%%%%%%%%%


def _form_folder(form_id: str) -> str:
    """'a01-000u' -> 'a01/a01-000': the copy letter is not part of the folder."""
    parts = FORM_ID.fullmatch(form_id)
    return os.path.join(parts["prefix"], f"{parts['prefix']}-{parts['number']}")


def _checked_line(form_id: str, number: int, line) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None]:
    """The line as arrays; ValueError when it would not read back as written."""
    text, points, stroke, times = line
    where = f"{form_id} line {number}"
    if not text or text != text.strip(BLANKS) or LINE_BREAK.search(text) or CSR_MARKER in text:
        raise ValueError(f"{where}: text {text!r} must be one non-empty line, without surrounding blanks or {CSR_MARKER}")
    text.encode(IAM_ENCODING)  # UnicodeEncodeError (a ValueError) for text outside ISO-8859-1
    points = np.asarray(points, dtype=np.float64)
    stroke = np.asarray(stroke)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0 or stroke.shape != (len(points),):
        raise ValueError(f"{where}: need points (N, 2), N >= 1, and stroke (N,); got {points.shape}, {stroke.shape}")
    if times is not None:
        times = np.asarray(times, dtype=np.float64)
        if times.shape != (len(points),):
            raise ValueError(f"{where}: times {times.shape}, expected ({len(points)},)")
    return text, points, stroke, times


def _stroke_set_xml(points: np.ndarray, runs: np.ndarray, times: np.ndarray) -> list[str]:
    """<StrokeSet> lines for points (N, 2), stroke runs (N,) from relabel_strokes, times (N,)."""
    xy = np.rint(points).astype(np.int64).tolist()
    stamps = [f"{t:.2f}" for t in times]
    starts = np.flatnonzero(stroke_starts(runs)).tolist() + [len(points)]
    out = ["  <StrokeSet>"]
    for begin, end in zip(starts[:-1], starts[1:]):
        out.append(f'    <Stroke colour="black" start_time="{stamps[begin]}" end_time="{stamps[end - 1]}">')
        out += [f'      <Point x="{x}" y="{y}" time="{t}"/>' for (x, y), t in zip(xy[begin:end], stamps[begin:end])]
        out.append("    </Stroke>")
    out.append("  </StrokeSet>")
    return out


def _whiteboard_xml(corners: dict) -> list[str]:
    out = ["  <WhiteboardDescription>", '    <SensorLocation corner="top_left"/>']
    out += [f'    <{name} x="{x}" y="{y}"/>' for name, (x, y) in corners.items()]
    return out + ["  </WhiteboardDescription>"]


def _board_corners(all_points: np.ndarray) -> dict:
    """Whiteboard corners from the ink's bounding box, as in the real files: the diagonal corner
    is (max x, max y), the vertical one shares its y, the horizontal one its x."""
    lo = np.floor(all_points.min(axis=0)).astype(int).tolist()
    hi = np.ceil(all_points.max(axis=0)).astype(int).tolist()
    return {"DiagonallyOppositeCoords": (hi[0], hi[1]), "VerticallyOppositeCoords": (lo[0], hi[1]),
            "HorizontallyOppositeCoords": (hi[0], lo[1])}


def _xml_bytes(body: list[str]) -> bytes:
    lines = ['<?xml version="1.0" encoding="ISO-8859-1"?>', f"<{IAM_ROOT}>", *body, f"</{IAM_ROOT}>", ""]
    return "\n".join(lines).encode(IAM_ENCODING, errors="xmlcharrefreplace")


def _ascii_text(form: Form, texts: list[str]) -> str:
    csr = "".join(text + (CSR_MARKER if i in form.marker_joins else "\n") for i, text in enumerate(texts))
    prompt = "\n".join(form.prompt if form.prompt is not None else texts)
    return f"OCR:\n\n{prompt}\n\nCSR:\n\n{csr}"


def _export_file(path, data):
    # Atomic like every output, but no fsync per file: an export is thousands of small files.
    write_output(path, data, "export file", durable=False)


def _write_form(out_dir: str, form: Form, write_original: bool) -> None:
    """The lineStrokes, ascii and (if asked) original files of one form."""
    if not FORM_ID.fullmatch(form.form_id):
        raise ValueError(f"{form.form_id!r} is not a form id like a01-000u")
    if not form.lines:
        raise ValueError(f"{form.form_id}: a form needs at least one line")
    folder = _form_folder(form.form_id)
    clock = 1.0  # a 20 ms clock for lines without times, running on through the form
    lines = []  # (text, points (N, 2), stroke runs (N,), times (N,))
    for number, line in enumerate(form.lines, start=1):
        text, points, stroke, times = _checked_line(form.form_id, number, line)
        if times is None:
            times = clock + SAMPLE_PERIOD * np.arange(len(points))  # (N,)
        clock = float(times[-1]) + 1.0
        lines.append((text, points, relabel_strokes(stroke), times))
    corners = _board_corners(np.concatenate([points for _, points, _, _ in lines]))  # one board per form

    for number, (_, points, runs, times) in enumerate(lines, start=1):
        body = _whiteboard_xml(corners) + _stroke_set_xml(points, runs, times)
        _export_file(os.path.join(out_dir, "lineStrokes", folder, f"{form.form_id}-{number:02d}.xml"), _xml_bytes(body))
    texts = [text for text, *_ in lines]
    _export_file(os.path.join(out_dir, "ascii", folder, form.form_id + ".txt"), _ascii_text(form, texts).encode(IAM_ENCODING))
    if not write_original:
        return
    body = ["  <General>", f"    <Form writerID={quoteattr(form.writer)}/>", "  </General>", "  <Transcription>"]
    body += [f'    <TextLine id="{form.form_id}-{n:02d}" text={quoteattr(t)}/>' for n, t in enumerate(texts, 1)]
    body += ["  </Transcription>", *_whiteboard_xml(corners)]
    offsets = np.cumsum([0] + [runs[-1] + 1 for _, _, runs, _ in lines[:-1]])  # keep the lines' strokes apart
    body += _stroke_set_xml(np.concatenate([points for _, points, _, _ in lines]),
                            np.concatenate([runs + o for (_, _, runs, _), o in zip(lines, offsets)]),
                            np.concatenate([times for *_, times in lines]))
    letter = FORM_ID.fullmatch(form.form_id)["letter"]
    _export_file(os.path.join(out_dir, "original", folder, f"strokes{letter}.xml"), _xml_bytes(body))


def write_iam_ondb(out_dir, forms: list[Form], splits: dict[str, list[str]], *,
                   write_original: bool = True, write_forms_txt: bool = False) -> None:
    """Write forms in the IAM-OnDB layout, readable by load_iam_ondb.

    Writes lineStrokes/<p>/<p-nnn>/<form>-NN.xml, ascii/<p>/<p-nnn>/<form>.txt and (unless
    write_original is False) original/<p>/<p-nnn>/strokes<letter>.xml with General/Form@writerID,
    Transcription/TextLine and the form's ink; then the four split files from `splits`
    (split name -> form ids; a missing name gives an empty file), and forms.txt if asked.
    Input that would not read back as written raises ValueError.
    """
    out_dir = os.fspath(out_dir)
    for form in forms:
        _write_form(out_dir, form, write_original)
    for split, name in IAM_SPLIT_FILES.items():
        bad = [form_id for form_id in splits.get(split, []) if not FORM_ID.fullmatch(form_id)]
        if bad:
            raise ValueError(f"split {split}: {bad[0]!r} is not a form id like a01-000u")
        entries = "".join(f" {form_id}\n" for form_id in splits.get(split, []))  # leading space as in the real files
        _export_file(os.path.join(out_dir, name), entries.encode(IAM_ENCODING))
    if write_forms_txt:
        rows = "".join(f"{form.form_id} {form.writer}\n" for form in forms)
        _export_file(os.path.join(out_dir, "forms.txt"), rows.encode(IAM_ENCODING))



SENSOR_SCALE = 200  # sensor units per output unit: an x-height of about 100 units
LINES_PER_FORM = 8


def sensor_points(xy):
    """Output units (y up) -> integer-valued sensor coordinates (y down), as in the real files."""
    return np.rint(np.column_stack([500 + SENSOR_SCALE * xy[:, 0], 2000 - SENSOR_SCALE * xy[:, 1]]))


def pen_times(xy, pen_up, start):
    """(T,) seconds: 20 ms between samples, and between strokes 0.1 s plus 20 ms per sample
    spacing the pen travels in the air, as a writer lifts, moves and lands."""
    jump = np.linalg.norm(np.diff(xy, axis=0, prepend=xy[:1]), axis=1) / LINE_SAMPLE_SPACING
    step = np.where(pen_up > 0, 0.1 + SAMPLE_PERIOD * jump, SAMPLE_PERIOD)
    step[0] = 0.0
    return start + np.cumsum(step)


def export_iam_ondb(out_dir, samples_by_split, log=print):
    """Write samples (lines task Samples with writers) in the IAM-OnDB layout.

    Each writer's lines become forms of up to LINES_PER_FORM lines; split names
    map to the IAM-OnDB-t1 split files. Returns the number of lines written.
    """
    forms, splits, n_lines = [], {split: [] for split in IAM_SPLIT_FILES}, 0
    split_of = {}
    for split, samples in samples_by_split.items():
        for s in samples:
            if split_of.setdefault(s.writer, split) != split:  # form ids derive from writers
                raise ValueError(f"writer {s.writer!r} has lines in {split_of[s.writer]} and {split}; "
                                 "IAM-OnDB-t1 splits are writer-disjoint")
    for split, samples in samples_by_split.items():
        by_writer = {}
        for s in samples:
            by_writer.setdefault(s.writer, []).append(s)
        for writer, mine in sorted(by_writer.items()):
            for k in range(0, len(mine), LINES_PER_FORM):
                form_id = f"{writer}-{k // LINES_PER_FORM:03d}"
                clock, lines = 1.0, []
                for s in mine[k:k + LINES_PER_FORM]:
                    times = pen_times(s.xy, s.pen_up, clock)
                    clock = float(times[-1]) + 2.0
                    lines.append((s.text, sensor_points(s.xy), np.cumsum(s.pen_up) - 1, times))
                forms.append(Form(form_id, writer, lines))
                splits[split].append(form_id)
                n_lines += len(lines)
    write_iam_ondb(out_dir, forms, splits)
    return n_lines


# ---------------------------------------------------------------------------
# 21. Tasks: each data source as a Task, and the TASKS table
# ---------------------------------------------------------------------------


def words_data(cfg, streams, parallel_map, log):
    """The seed task: renderings of the 47 words; 38 train, 9 held out entirely."""
    train_words, held_out = split_vocab(streams["split"], cfg.holdout_frac)
    eval_sets = {
        "in_vocab": render_words(train_words, cfg.eval_repeats, streams["eval"], cfg),
        "held_out": render_words(held_out, cfg.eval_repeats, streams["eval"], cfg),
    }
    short, long = pick_alignment_words(train_words)
    picks = [("in_vocab", cfg.eval_repeats * train_words.index(w)) for w in (short, long)]
    return TaskData(ALPHABET, eval_sets,
                    lambda rng, parallel_map: render_words(train_words, cfg.word_repeats, rng, cfg),
                    len(train_words) * cfg.word_repeats, np.zeros(IN_DIM), raw_input_scale(cfg, SAMPLE_SPACING), 0.0,
                    picks,
                    {"train_words": train_words, "held_out_words": held_out})


def pick_alignment_words(train_words):
    """A short and a long in-vocab word for alignment pictures ('ant', 'actin' when possible)."""
    short = "ant" if "ant" in train_words else min(train_words, key=len)
    long = "actin" if "actin" in train_words else max(train_words, key=len)
    return short, long


JUMP_SQUASH = 3.0  # lines: inputs beyond about 3 sample spacings (times the gain) are squashed, see pad_batch


def short_and_median(samples, split):
    """Alignment picks: the shortest and the median line of a split."""
    by_length = np.argsort([len(s.text) for s in samples], kind="stable")
    return [(split, int(by_length[0])), (split, int(by_length[len(samples) // 2]))]


def _render_training_line(args):
    text, writer_index, seed = args
    return render_writer_line(text, "train", int(writer_index), int(seed))


def lines_data(cfg, streams, parallel_map, log):
    """Cursive lines: fresh training lines by the 200 training writers every
    epoch; fixed validation and test lines by 20 and 40 other writers."""
    eval_sets = {split: line_eval_set(split, cfg.eval_lines_per_writer) for split in LINE_SPLITS}

    def training_samples(rng, parallel_map):
        texts, writers, seeds = draw_training_lines(cfg.lines_per_epoch, rng)
        return parallel_map(_render_training_line, list(zip(texts, writers, seeds)))

    info = {"writers": {split: LINE_WRITERS[split] for split in LINE_WRITERS},
            "lines": {split: len(s) for split, s in eval_sets.items()}, "data_seed": LINES_DATA_SEED,
            "train_lines_per_epoch": cfg.lines_per_epoch}
    return TaskData(LINE_ALPHABET, eval_sets, training_samples, cfg.lines_per_epoch, np.zeros(IN_DIM),
                    raw_input_scale(cfg, LINE_SAMPLE_SPACING),
                    JUMP_SQUASH * cfg.input_gain, short_and_median(eval_sets["test"], "test"), info)


def line_features(pre, features):
    """(T, D) float32 network input of one preprocessed line: graves25 or raw (dx, dy, pen_up)."""
    traj = features_graves25(pre) if features == "graves25" else pen_trajectory(pre.points, pre.stroke)
    # float32 halves the features of the 12k lines (about 1 GB instead of 2); the network reads
    # float32 anyway, so this rounds each input once before normalisation instead of after it.
    with np.errstate(over="ignore"):  # an overflow becomes inf, which the callers refuse
        return traj.astype(np.float32)


def _featurise_line(args):
    """One IAM-OnDB line as a Sample without labels (they need the alphabet); with an
    augmentation (strength, seed), distorted by the Distortion that seed draws."""
    line, features, augmentation = args
    where = line.path or line.line_id
    distortion = None if augmentation is None else \
        draw_distortion(np.random.default_rng(augmentation[1]), augmentation[0])
    try:
        pre = preprocess(line.points, line.stroke, line.times, distortion=distortion)
    except ValueError as e:
        raise IamOnDbBoundError(f"{where}: {e}") from None
    traj = line_features(pre, features)
    if not np.isfinite(traj).all():  # a backstop: the reader's bounds should make this impossible
        raise IamOnDbBoundError(f"{where}: its {features} features are not finite")
    return Sample(line.text, traj, [], np.asarray(pre.points, np.float32),
                  np.asarray(pre.pen_up, np.float32), None, line.writer)


IAM_EVAL_SPLITS = ("validation", "validation2", "test")
FEATURISE_BATCH = 500  # lines featurised per parallel_map call


def feature_moments(trajs, group=FEATURISE_BATCH):
    """Mean and standard deviation (D,) of the frames of (T_i, D) arrays, in float64,
    a group of arrays at a time so that no copy of all frames is made. Shifted by the
    first group's mean, so that E[x^2] - E[x]^2 does not cancel."""
    pivot = np.concatenate(trajs[:group]).mean(axis=0, dtype=np.float64)
    n, total, squares = 0, 0.0, 0.0
    for i in range(0, len(trajs), group):
        frames = np.concatenate(trajs[i:i + group]).astype(np.float64) - pivot
        n, total, squares = n + len(frames), total + frames.sum(axis=0), squares + (frames * frames).sum(axis=0)
    mean = total / n
    return pivot + mean, np.sqrt(np.maximum(squares / n - mean * mean, 0.0))


def iam_ondb_data(cfg, streams, parallel_map, log):
    """IAM-OnDB-t1 from cfg.data_dir: the training set every epoch, choices on
    validation, results on the final test set.

    The alphabet is every character of the training transcriptions (the
    paper's 80 + blank); a validation or test character outside it cannot be
    produced, so it counts as an error, and a warning says how many there are.
    Features are standardised with training-set statistics (graves25), or
    scaled by the input gain per resampling step (raw). With cfg.augment, each
    epoch's training lines are featurised afresh from their ink, each under its
    own Distortion drawn from the epoch's data stream; the normalisation stays
    that of the undistorted lines.
    """
    if not cfg.data_dir:
        raise UserError("--task iam-ondb needs --data-dir, the IAM-OnDB folder")
    t0 = time.perf_counter()
    lines, summary = load_iam_ondb(cfg.data_dir, log)
    t1 = time.perf_counter()

    def featurise(split_lines, mapper, seeds=None):
        # A few hundred lines at a time, so that the workers' pickled results stay small next to the features.
        jobs = [(line, cfg.features, None if seeds is None else (cfg.augment, int(seed)))
                for line, seed in zip(split_lines, [None] * len(split_lines) if seeds is None else seeds)]
        return [s for i in range(0, len(jobs), FEATURISE_BATCH)
                for s in mapper(_featurise_line, jobs[i:i + FEATURISE_BATCH])]

    samples = {split: featurise(split_lines, parallel_map) for split, split_lines in lines.items() if split_lines}
    # Augmentation featurises the training ink afresh each epoch, so it keeps the ink.
    train_lines = lines["train"] if cfg.augment else None
    del lines
    t2 = time.perf_counter()
    n_lines = sum(len(s) for s in samples.values())
    log(f"preprocessed and featurised {n_lines} lines ({cfg.features}) in {t2 - t1:.1f} s "
        f"({n_lines / max(t2 - t1, 1e-9):.0f} lines/s; reading the files took {t1 - t0:.1f} s)")
    alphabet = cfg.alphabet or "".join(sorted({c for s in samples["train"] for c in s.text}))

    def label(split_samples):
        for s in split_samples:
            s.labels = encode("".join(c for c in s.text if c in alphabet), alphabet)
        return split_samples

    unknown = Counter(c for split_samples in samples.values() for s in split_samples for c in s.text
                      if c not in alphabet)
    for split_samples in samples.values():
        label(split_samples)
    if unknown:
        log(f"warning: {sum(unknown.values())} characters of the evaluation lines are not in the training "
            f"alphabet and count as errors: {', '.join(f'{c!r} x{n}' for c, n in unknown.most_common(5))}")
    train = samples["train"]
    if cfg.features == "graves25":
        # Unit variance per feature, scaled so the 25 carry the input power of two raw channels at the gain.
        shift, std = feature_moments([s.traj for s in train])
        scale = cfg.input_gain * np.sqrt(2 / len(shift)) / np.maximum(std, 1e-6)
    else:
        shift, scale = np.zeros(IN_DIM), raw_input_scale(cfg, IAM_SPACING)
    eval_sets = {split: samples[split] for split in IAM_EVAL_SPLITS if split in samples}
    info = {**{k: summary[k] for k in ("lines", "forms", "writers", "skipped", "ignored")},
            "alphabet": alphabet, "unknown_characters": dict(unknown), "features": cfg.features,
            "read_seconds": t1 - t0, "featurise_seconds": t2 - t1}
    lm_texts = {"train": tuple(s.text for s in train),
                "validation": tuple(s.text for s in eval_sets.get("validation", []))}  # never the test lines
    n_train = len(train)
    if cfg.augment:
        del train, samples["train"]  # the clean features served only for the normalisation

        def training_samples(rng, parallel_map):
            return label(featurise(train_lines, parallel_map, rng.integers(2**63, size=len(train_lines))))
    else:
        def training_samples(rng, parallel_map):
            return train
    return TaskData(alphabet, eval_sets, training_samples, n_train, shift, scale,
                    JUMP_SQUASH * cfg.input_gain, short_and_median(eval_sets["test"], "test"), info,
                    training_held=not cfg.augment, lm_texts=lm_texts)


def export_lines_task(cfg, out_dir, log=print):
    """Write the lines task in the IAM-OnDB layout: cfg.lines_per_epoch training
    lines drawn with the run's seed by the training writers, and the fixed
    validation and test lines. Returns the number of lines written."""
    t0 = time.perf_counter()
    streams = make_streams(cfg.seed)
    data = lines_data(cfg, streams, serial_map, log)
    samples = {"train": data.training_samples(streams["data"], serial_map), **data.eval_sets}
    # Into a temporary sibling, renamed into place at the end: a whole export or none, even after a
    # full disk or Ctrl-C (out_dir is new or empty: check_export_folder).
    target = os.path.abspath(out_dir)
    existed = os.path.isdir(target)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.tmp-")
    try:
        n = export_iam_ondb(tmp, samples)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private
        os.replace(tmp, target)  # replaces an empty folder
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not existed and os.path.isdir(target) and not os.listdir(target):
            os.rmdir(target)  # made by the writability check
        if isinstance(e, OSError):
            raise UserError(f"cannot write the export into {out_dir!r}: {e.strerror or e}; nothing written") from None
        raise
    log(f"wrote {n} lines ({', '.join(f'{split} {len(s)}' for split, s in samples.items())}) in the IAM-OnDB "
        f"format to {out_dir} in {time.perf_counter() - t0:.1f} s")
    return n


LM_FLAGS = ("dictionary_sizes", "experiment_split")  # the LM_TASKS' options besides RunConfig fields

TASKS = {
    "words": Task(name="words", alphabet=ALPHABET, monitor=("in_vocab", "held_out"), group_by="word",
                  decoders=("greedy", "beam", "lexicon"), flags=("lexicon_sizes",), defaults={},
                  quick=dict(hidden=32, epochs=6, batch_size=8), make_data=words_data, shown=("cer", "word_acc"),
                  bucket=0, lexicon=tuple(VOCAB)),
    "lines": Task(name="lines", alphabet=LINE_ALPHABET, monitor=("validation",), group_by="writer",
                  decoders=("greedy", "beam", "lm"), flags=LM_FLAGS + ("export_iam_ondb",),
                  defaults=dict(hidden=100, batch_size=8, epochs=22, lr=1e-2, lr_final=0.1, workers=2),
                  quick=dict(hidden=32, epochs=2, lines_per_epoch=160, eval_lines_per_writer=2), make_data=lines_data),
    "iam-ondb": Task(name="iam-ondb", alphabet=None, monitor=("validation",), group_by="writer",
                     decoders=("greedy", "beam", "lm"), flags=LM_FLAGS,
                     defaults=dict(hidden=100, layers=2, batch_size=8, epochs=15, lr=1e-2, lr_final=0.1, workers=2,
                                   patience=6, augment=1.0, features="graves25", oov="char-bigram",
                                   lm_tuning=HEADLINE_TUNING_LINES, lm_beam=1024),
                     quick=dict(hidden=32, epochs=2, patience=0, lm_beam=64), make_data=iam_ondb_data),
}


# ---------------------------------------------------------------------------
# 22. Files: run.json, model files, safe writing
# ---------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporary files are removed on the way out."""


@functools.lru_cache(maxsize=None)
def _libc():
    """The C library, looked up once (find_library runs ldconfig); None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except (OSError, TypeError):
        return None


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of unmapping it.

    Each forward pass allocates its caches afresh (a few MB). By default glibc
    returns such blocks to the kernel on free, and faulting the pages back in
    on the next step costs more than the arithmetic at small batch sizes
    (README, Performance). A no-op where libc has no mallopt.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 25) and mallopt(M_TRIM_THRESHOLD, 1 << 30))


def release_freed_memory():
    """Give the heap's free pages back to the kernel now (glibc's malloc_trim).

    keep_freed_memory keeps what a training step frees, for the next step;
    reading and featurising free many small blocks that nothing reuses soon,
    and held them resident: after loading the 12,179 IAM-OnDB lines the main
    process held 1.32 GiB without this, 0.75 GiB with it. A no-op where libc
    has no malloc_trim.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False


def output_target(path, what):
    """Where writing `path` goes: ("file", path) or ("stream", path), symlinks followed.

    A regular file or a new path is written atomically; a character device
    or a FIFO (/dev/stdout, /dev/null, a pipe) is written straight to, never
    replaced. UserError for a folder, a name ending in a separator, a file
    without write permission (refused even for root, who could write it), or
    another kind of file.
    """
    if not path or path.endswith(("/", os.sep)):
        raise UserError(f"cannot write {what} {path!r}: the name ends in a folder separator; give a file name")
    try:  # /dev/stdout on a pipe resolves to "pipe:[N]", which no path names: open it by the given name
        given = os.stat(path)
        if stat.S_ISCHR(given.st_mode) or stat.S_ISFIFO(given.st_mode):
            return "stream", path
    except OSError:
        pass
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return "file", real
    except OSError as e:
        blocker = _file_in_the_way(os.path.dirname(real)) if isinstance(e, NotADirectoryError) else None
        reason = _in_the_way(blocker) if blocker else (e.strerror or str(e))
        raise UserError(f"cannot write {what} {path!r}: {reason}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"cannot write {what} {path!r}: it is a folder")
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return "stream", real
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"cannot write {what} {path!r}: it is neither a regular file, a FIFO nor a character device")
    if not st.st_mode & 0o222:
        raise UserError(f"cannot write {what} {path!r}: the file is read-only")
    return "file", real


def _file_in_the_way(folder):
    """The nearest existing ancestor of `folder` (itself included) if it is a file, else None."""
    p = os.path.abspath(folder)
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p if os.path.lexists(p) and not os.path.isdir(p) else None


def _in_the_way(blocker):
    """Why `blocker` (from _file_in_the_way) is not a folder."""
    if os.path.islink(blocker) and not os.path.exists(blocker):
        return f"{blocker!r} is a dangling symbolic link (to {os.readlink(blocker)!r}), not a folder"
    return f"{blocker!r} is a file, not a folder"


def check_folder_writable(folder, what):
    """Create `folder` if needed and prove a file can be written in it; UserError if not."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        blocker = _file_in_the_way(folder)
        reason = _in_the_way(blocker) if blocker else (e.strerror or str(e))
        raise UserError(f"cannot write {what}: {reason}") from None


def check_writable(path, what):
    """Fail before any work, not after it, if `path` cannot be written."""
    kind, real = output_target(path, what)
    if kind == "stream":
        if not os.access(real, os.W_OK):
            raise UserError(f"cannot write {what} {path!r}: permission denied")
        return
    folder, name = os.path.split(real)
    check_folder_writable(folder, f"{what} {path!r}")
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(name)) > limit:
        raise UserError(f"cannot write {what} {path!r}: the file name is too long (more than {limit} bytes)")


def write_output(path, data: bytes, what, durable=True):
    """Write `data` to `path`: atomically for a regular file (temporary file in
    the same folder, then rename; a symlink keeps pointing at it), straight
    through for a device or FIFO. A reader never sees a half-written file, and
    an interrupted run (Ctrl-C, SIGTERM) leaves the previous file intact and
    no temporary file behind. durable: also fsync before the rename, so the
    new file survives a crash of the machine."""
    kind, real = output_target(path, what)
    if kind == "stream":
        with open(real, "wb") as f:
            f.write(data)
        return
    folder = os.path.dirname(real)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")  # short: a long file name must still fit
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        try:
            mode = stat.S_IMODE(os.stat(real).st_mode)  # an existing file keeps its permissions
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp makes files private (0600)
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_or_refuse(path, data: bytes, what):
    """write_output for the figure scripts: a failure the checks before the work could not
    foresee (a full disk) is one UserError line, and the previous file stays."""
    try:
        write_output(path, data, what)
    except OSError as e:
        raise UserError(f"cannot write {what} {path!r}: {e.strerror or e}") from None


def env_info():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "git_commit": commit}


def run_json(result):
    """Order the keys of run.json and add schema, task and environment."""
    task = TASKS[result["config"]["task"]]
    doc = {"schema_version": SCHEMA_VERSION,
           "task": {"name": task.name, "alphabet": result["config"]["alphabet"] or task.alphabet,
                    "splits": list(result["final"]),
                    "monitor": list(task.monitor), "group_by": task.group_by},
           "config": result["config"], "env": env_info()}
    doc.update({k: v for k, v in result.items() if k != "config"})
    return doc


def json_bytes(doc):
    return (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode()


def input_normalisation(data):
    """What the network's input layer was fitted to: {shift, scale, squash} as JSON-ready
    lists, saved with the model so that it can read ink without its training set."""
    return {"shift": np.asarray(data.input_shift, float).tolist(),
            "scale": np.asarray(data.input_scale, float).tolist(), "squash": float(data.input_squash)}


def model_bytes(params, cfg, normalisation=None):
    """npz of the parameter arrays plus the config (and the input normalisation) as JSON strings."""
    if not all(np.isfinite(v).all() for v in params.values()):
        raise ValueError("refusing to save weights that are not finite")
    buf = io.BytesIO()
    extra = {"__input__": np.array(json.dumps(normalisation))} if normalisation else {}
    np.savez(buf, __config__=np.array(json.dumps(dataclasses.asdict(cfg))), **extra, **params)
    return buf.getvalue()


def checkpoint_path(model_path):
    """Where a run that saves its model to `model_path` keeps its checkpoint."""
    return model_path + ".checkpoint"


# Settings that only the final decoding reads: a resumed run may change them.
DECODING_FIELDS = tuple(n for n, f in CONFIG_FIELDS.items() if f.metadata["decoding"])


def checkpoint_bytes(state, cfg, data):
    """npz of a TrainingState: the weights, Adam's moments, the kept best weights, and the
    rest (config, epoch, random streams, history) as one JSON string."""
    arrays = {f"params/{k}": v for k, v in state.params.items()}
    arrays.update({f"adam_{m}/{k}": v for m in ("m", "v") for k, v in state.adam[m].items()})
    if state.best_params is not None:
        arrays.update({f"best/{k}": v for k, v in state.best_params.items()})
    meta = {"config": dataclasses.asdict(cfg), "epoch": state.epoch, "adam_t": state.adam["t"],
            "streams": state.streams, "history": state.history, "skipped": state.skipped,
            "best_epoch": state.best_epoch, "train_seconds": state.train_seconds,
            "input": input_normalisation(data)}
    buf = io.BytesIO()
    np.savez(buf, __checkpoint__=np.array(json.dumps(meta)), **arrays)
    return buf.getvalue()


MAX_CHECKPOINT_META_BYTES = 64 * 2**20  # the JSON part: the config, random states and the history (kB per epoch)


def check_checkpoint_members(path, cfg):
    """ValueError unless every member of checkpoint `path` declares at most the size of an
    array of cfg's parameter shapes (or, for the JSON part, MAX_CHECKPOINT_META_BYTES), checked
    before any member is inflated: a small hostile file cannot ask for gigabytes."""
    biggest = max(math.prod(shape) for shape in parameter_shapes(cfg).values()) * 8 + 2**16  # + the .npy header
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            limit = MAX_CHECKPOINT_META_BYTES if info.filename.startswith("__checkpoint__") else biggest
            if info.file_size > limit:
                raise ValueError(f"{info.filename} declares {info.file_size:,} bytes, more than its arrays can hold")


def load_checkpoint(path, cfg):
    """The TrainingState in checkpoint `path`; UserError if it is missing, unreadable,
    or was made with other training settings than cfg."""
    try:
        check_checkpoint_members(path, cfg)
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = _load_json(str(arrays.pop("__checkpoint__")))
        saved = config_from_file(meta["config"])
        groups = {g: {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(g + "/")}
                  for g in ("params", "adam_m", "adam_v", "best")}
        state = TrainingState(int(meta["epoch"]), groups["params"],
                              {"t": int(meta["adam_t"]), "m": groups["adam_m"], "v": groups["adam_v"]},
                              dict(meta["streams"]), list(meta["history"]), int(meta["skipped"]),
                              int(meta["best_epoch"]), groups["best"] or None, float(meta["train_seconds"]))
    except FileNotFoundError:
        raise UserError(f"no checkpoint {path!r} to resume from (a run with --save-model writes one "
                        "after every epoch)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"checkpoint {path!r} is not a usable checkpoint ({_not_a_model_reason(path, e)})") from None
    differ = [n for n in CONFIG_FIELDS if n not in DECODING_FIELDS + ("alphabet",)
              and getattr(saved, n) != getattr(cfg, n)]
    if cfg.alphabet and saved.alphabet != cfg.alphabet:
        differ.append("alphabet")
    if differ:
        raise UserError(f"checkpoint {path!r} was made with other settings ({', '.join(f'{n} {getattr(saved, n)!r}' for n in differ)}); "
                        "resume with the command that started the run")
    expected = {k: v.shape for k, v in init_params(np.random.default_rng(0), cfg.hidden, cfg.layers,
                                                   cfg.bidirectional, feature_dim(cfg), n_classes(cfg)).items()}
    dtype = np.dtype(cfg.dtype)
    for group in (state.params, state.adam["m"], state.adam["v"]) + ((state.best_params,) if state.best_params else ()):
        if {k: v.shape for k, v in group.items()} != expected or \
                not all(v.dtype == dtype and np.isfinite(v).all() for v in group.values()):
            raise UserError(f"checkpoint {path!r} does not hold the arrays its config describes")
    if not 0 <= state.best_epoch <= state.epoch == len(state.history) <= cfg.epochs:
        raise UserError(f"checkpoint {path!r} is inconsistent (epoch {state.epoch}, {len(state.history)} "
                        f"epochs of history, best epoch {state.best_epoch})")
    return state


# Model files from before the task field existed (schema 1) are words models;
# the fields added since take their defaults. Any other missing field is refused.
FIELDS_ADDED_AFTER_SCHEMA_1 = tuple(n for n, f in CONFIG_FIELDS.items() if f.metadata["since_schema_1"])


def config_from_file(saved):
    """RunConfig from a model file's config dict; ValueError naming what is wrong."""
    if not isinstance(saved, dict):
        raise ValueError("the config is not a JSON object")
    unknown = sorted(set(saved) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    missing = sorted(set(CONFIG_FIELDS) - set(saved) - set(FIELDS_ADDED_AFTER_SCHEMA_1))
    if missing:
        raise ValueError(f"missing config keys: {', '.join(missing)}")
    cfg = check_config(RunConfig(**saved))
    problem = task_config_error(cfg)
    if problem:
        raise ValueError(problem)
    return cfg


def task_config_error(cfg):
    """Why a valid config does not fit its own task (a hand-edited model file), or None."""
    task = TASKS[cfg.task]
    if task.alphabet is not None and cfg.alphabet not in ("", task.alphabet):
        return f"alphabet {cfg.alphabet[:40]!r} is not the {task.name} task's, whose alphabet is fixed"
    if task.alphabet is None and not cfg.alphabet:
        return f"a {task.name} model needs the alphabet it was trained on"
    if len(set(cfg.alphabet)) != len(cfg.alphabet):
        return "alphabet repeats a character"
    if "features" not in task.options and cfg.features != "raw":
        return f"features {cfg.features!r}: the {task.name} task reads raw pen moves only"
    return None


def _not_a_model_reason(path, error):
    """Why np.load refused `path`. numpy reads any file that is neither .npy nor .npz as a
    pickle, so its "pickled data" message also covers plain text; the first byte tells."""
    if "Object arrays" in str(error):
        return "it holds pickled objects"
    if "pickle" in str(error):  # "pickled data" (numpy 1.x), "pickled (object) data" (2.x)
        try:
            with open(path, "rb") as f:
                is_pickle = f.read(1) == b"\x80"  # the PROTO opcode that starts pickles since protocol 2
        except OSError:
            is_pickle = False
        return "it is a Python pickle" if is_pickle else "it is not an npz archive"
    return getattr(error, "strerror", None) or error


class _NoDraws:
    """An rng for init_params that returns read-only zeros without allocating them: the shapes alone."""

    def uniform(self, low, high, size):
        return np.broadcast_to(np.float64(0.0), size)


def parameter_shapes(cfg):
    """name -> shape of the parameters a config describes, without allocating them."""
    return {k: v.shape for k, v in init_params(_NoDraws(), cfg.hidden, cfg.layers, cfg.bidirectional,
                                               feature_dim(cfg), n_classes(cfg)).items()}


MAX_JSON_MEMBER_BYTES = 2**20  # __config__ and __input__ of a model file: a few kB in a real one


def _member_header(z, info):
    """(shape, dtype) of an .npy member of an open ZipFile, from its header alone."""
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"member {info.filename} has npy format version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _read_member(z, info):
    with z.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _json_member(z, info, path):
    """The JSON string held by a 0-d unicode member, read only if its declared size is small."""
    if info.file_size > MAX_JSON_MEMBER_BYTES:
        raise UserError(f"model file {path!r} is not a model file ({info.filename} declares "
                        f"{info.file_size:,} bytes; a config is a few kB)")
    shape, dtype = _member_header(z, info)
    if shape != () or dtype.kind != "U":
        raise ValueError(f"{info.filename} is not a string")
    return str(_read_member(z, info))


def _load_json(text):
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None


def _read_model_archive(path):
    """(arrays, RunConfig) of a model npz. Each member's size and header are checked against the
    shapes the config describes before the member is read, so a zip bomb, or a member that
    declares 10^12 floats, is refused without inflating it."""
    with zipfile.ZipFile(path) as z:
        members = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i for i in z.infolist()}
        if "__config__" not in members:
            raise KeyError("__config__")
        text = _json_member(z, members.pop("__config__"), path)
        members.pop("__input__", None)  # the input normalisation: load_normalisation
        try:
            cfg = config_from_file(_load_json(text))
            expected = parameter_shapes(cfg)
        except (TypeError, ValueError) as e:
            raise UserError(f"model file {path!r} has an invalid config: {e}") from None
        if set(members) != set(expected):
            raise UserError(f"model file {path!r} does not hold the parameters its config describes")
        arrays = {}
        for name, info in members.items():
            shape, dtype = _member_header(z, info)
            if dtype.hasobject:
                raise ValueError("Object arrays cannot be loaded")  # reported as 'holds pickled objects'
            if shape != expected[name] or info.file_size > math.prod(shape) * dtype.itemsize + 2**16:  # + header
                raise UserError(f"model file {path!r} does not hold the parameters its config describes")
            if dtype.kind != "f":
                raise UserError(f"model file {path!r} holds weights that are not finite floating-point numbers")
            arrays[name] = _read_member(z, info)
    return arrays, cfg


def load_model(path):
    """(params, RunConfig) from a model file; UserError if missing, not a model file or inconsistent."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # opening it below says why
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        # Reading a FIFO would block and /dev/zero never ends.
        raise UserError(f"model file {path!r} is not a regular file")
    try:
        if zipfile.is_zipfile(path):
            arrays, cfg = _read_model_archive(path)
        else:
            loaded = np.load(path, allow_pickle=False)  # to say what the file is instead
            raise ValueError("a single array, not an npz archive" if not hasattr(loaded, "files")
                             else "not an npz archive")
    except FileNotFoundError:
        raise UserError(f"model file {path!r} does not exist (make one with --save-model)") from None
    except IsADirectoryError:
        raise UserError(f"model file {path!r} is a folder") from None
    except KeyError:
        raise UserError(f"model file {path!r} is not a model file (it has no config)") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"model file {path!r} is not a model file ({_not_a_model_reason(path, e)})") from None
    if not all(np.isfinite(v).all() for v in arrays.values()):
        raise UserError(f"model file {path!r} holds weights that are not finite floating-point numbers")
    return {k: v.astype(cfg.dtype) for k, v in arrays.items()}, cfg


def load_normalisation(path, cfg):
    """The input normalisation {shift, scale, squash} saved with the model in `path`
    (input_normalisation), or None for files from before it was saved; UserError if
    it does not fit cfg's features. Call after load_model has validated the file."""
    try:
        with zipfile.ZipFile(path) as z:
            info = next((i for i in z.infolist() if i.filename in ("__input__", "__input__.npy")), None)
            if info is None:
                return None
            norm = _load_json(_json_member(z, info, path))  # bounded in size, like the config
        shift, scale = (np.array(norm[k], dtype=float) for k in ("shift", "scale"))
        squash = float(norm["squash"])
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError):
        raise UserError(f"model file {path!r} has an unreadable input normalisation") from None
    D = feature_dim(cfg)
    if shift.shape != (D,) or scale.shape != (D,) or not (np.isfinite(shift).all() and np.isfinite(scale).all()
                                                           and (scale > 0).all() and 0 <= squash < math.inf):
        raise UserError(f"model file {path!r} has an input normalisation that does not fit its {D} input features")
    return {"shift": shift, "scale": scale, "squash": squash}


# ---------------------------------------------------------------------------
# 23. Reading ink: InkML, JSON strokes, pages, --read and --serve
# ---------------------------------------------------------------------------
# Ink from outside the database -- a W3C InkML file, an IAM-OnDB lineStrokes
# file, a JSON list of strokes, or strokes drawn on the pen pad -- becomes pen
# samples (N, 2), y down, with stroke ids. A page is split into text lines by
# the vertical extent of its strokes, and every line goes through the IAM-OnDB
# preprocessing and features (`preprocess`, `line_features`: the evaluation
# path's own functions) into a model that carries its input normalisation. So
# the same ink gives the same reading whichever way it comes in.
#
# Every input is untrusted: XML goes through `_safe_parser` (entities refused),
# JSON refuses NaN and Infinity, and bytes, points, strokes and the resampled
# length of a line are bounded before the work that they would make large.
# Scale does not matter (the preprocessing normalises the corpus height) and
# neither does the sampling rate (it resamples by distance); times are only
# used for the speed feature, and ink without times is read as written at the
# training set's mean speed.

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
DEFAULT_MODEL = os.path.join(MODEL_DIR, "iam_ondb.npz")  # --read and --serve read with it unless --load-model
SHIPPED_MODEL_NOTE = ("two BLSTM layers of 100 trained on IAM-OnDB-t1's 5,364 training lines with ink augmentation (the "
                      "iam-ondb headline, seed 0): greedy CER 0.111, WER 42%% on its 3,859 test lines; IAM-OnDB's "
                      "terms restrict it to non-commercial research")
PAD_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "iam_handwriting_pad.html")
READ_DECODERS = ("greedy", "beam", "lm")
READ_SETTINGS = DECODING_FIELDS  # the decoding flags --read and --serve take
MAX_INK_BYTES = 4 * 2**20  # a file or stdin; a lineStrokes file of ~570 samples is ~30 kB
MAX_INK_POINTS = 100_000  # pen samples per input: 300 IAM-OnDB validation lines have a median 584, at most 1,224
MAX_INK_STROKES = 5_000
MAX_LINE_POINTS = 20_000  # pen samples in one text line after page grouping
MAX_INK_FRAMES = 50_000  # ... and of all lines of an input
MAX_PAGE_LINES = 200  # text lines of a page
MAX_COORDINATE = 1e9  # |x|, |y|, |t| beyond this are refused: no device reports them, and squares overflow
MAX_BODY_BYTES = 2**20  # POST /read
DRAIN_BYTES = 4 * 2**20  # a larger body is refused with 413 unread (the connection closes); a smaller one is read and dropped
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8009
SERVE_TIMEOUT = 30.0  # seconds a client may take to send its request
CORE_STROKE = 0.3  # page grouping: strokes at least this share of the tall strokes' height make lines ...
NEAR_STROKES = 3  # ... a line's last this many tall strokes give its current band ...
APART = 0.5  # ... and a stroke this many band heights above or below it is on another line
LINE_OVERLAP = 0.5  # ... and lines whose bands overlap by this share of the narrower are one
BELOW_PENALTY = 2.0  # small marks (dots, bars) belong to the line below them more often than above
TIME_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "\u00b5s": 1e-6, "min": 60.0}


class InkError(UserError):
    """Ink that cannot be read, said in one line that names the input."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True, eq=False)
class Ink:
    """Pen samples of one input, in writing order."""

    source: str  # the file name, "-" for stdin, "request" for the server
    format: str  # "inkml", "linestrokes" or "json"
    points: np.ndarray  # (N, 2) float64, y down (as IAM-OnDB and screens)
    stroke: np.ndarray  # (N,) int64 stroke ids 0..S-1
    times: np.ndarray | None  # (N,) float64 seconds; None when the input has no times
    y_sign: float = 1.0  # -1: the input's y grows upwards; output coordinates are given back in its own


def checked_ink(source, fmt, strokes, times=None, y_sign=1.0):
    """Ink from per-stroke (n_i, 2) arrays (y down) and optional (n_i,) times; InkError for no ink,
    too much ink, non-finite or absurd values. Empty strokes are dropped."""
    keep = [i for i, s in enumerate(strokes) if len(s)]
    n = sum(len(strokes[i]) for i in keep)
    if n == 0:
        raise InkError(f"{source}: no ink (no pen samples)")
    if n > MAX_INK_POINTS or len(keep) > MAX_INK_STROKES:
        raise InkError(f"{source}: {n} pen samples in {len(keep)} strokes; at most {MAX_INK_POINTS} samples "
                       f"and {MAX_INK_STROKES} strokes are read")
    points = np.concatenate([np.asarray(strokes[i], np.float64).reshape(-1, 2) for i in keep])  # (N, 2)
    stroke = np.repeat(np.arange(len(keep)), [len(strokes[i]) for i in keep])  # (N,)
    t = None if times is None else np.concatenate([np.asarray(times[i], np.float64) for i in keep])  # (N,)
    for name, values in (("coordinate", points), ("time", t)):
        if values is not None and not np.isfinite(values).all():
            raise InkError(f"{source}: a {name} is not a finite number (NaN or infinity)")
        if values is not None and np.abs(values).max() > MAX_COORDINATE:
            raise InkError(f"{source}: a {name} is beyond +-{MAX_COORDINATE:.0e}")
    return Ink(source, fmt, points, stroke, t, y_sign)


# JSON strokes: [[[x, y], ...], ...] or [[[x, y, t], ...], ...], or {"strokes": ..., "y_up": bool}.

def _refuse_constant(name):
    raise ValueError(f"{name} is not a number")


def parse_json_strokes(data: bytes, source: str, y_up=False) -> Ink:
    """Ink from a JSON list of strokes, each a list of [x, y] or [x, y, t] (t in seconds).

    y grows downwards unless y_up (or the object form's "y_up": true)."""
    try:
        doc = json.loads(data.decode("utf-8-sig"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InkError(f"{source}: invalid JSON ({e})") from None
    if isinstance(doc, dict):
        strokes, y_up = doc.get("strokes"), doc.get("y_up", y_up)
        if not isinstance(y_up, bool):
            raise InkError(f"{source}: \"y_up\" must be true or false")
    else:
        strokes = doc
    if not isinstance(strokes, list) or not all(isinstance(s, list) for s in strokes):
        raise InkError(f"{source}: expected a list of strokes [[[x, y], ...], ...] or {{\"strokes\": [...]}}")
    n = sum(len(s) for s in strokes)
    if n > MAX_INK_POINTS:
        raise InkError(f"{source}: {n} pen samples; at most {MAX_INK_POINTS} are read")
    arrays = []
    for i, s in enumerate(strokes):
        try:
            a = np.asarray(s, dtype=np.float64) if s else np.zeros((0, 2))
        except (TypeError, ValueError):
            a = None
        if a is None or a.ndim != 2 or a.shape[1] not in (2, 3):
            raise InkError(f"{source}: stroke {i} is not a list of [x, y] or [x, y, t] points")
        arrays.append(a)
    widths = {a.shape[1] for a in arrays if len(a)}
    if len(widths) > 1:
        raise InkError(f"{source}: some points have a time and some not; give t on every point or none")
    sign = -1.0 if y_up else 1.0
    xy = [a[:, :2] * np.array([1.0, sign]) for a in arrays]
    times = [a[:, 2] for a in arrays] if widths == {3} else None
    return checked_ink(source, "json", xy, times, sign)


# W3C InkML (https://www.w3.org/TR/InkML/): <trace> text is points separated by commas, each the
# values of the trace format's channels in order. A value may carry a prefix: "!" explicit, "'"
# first difference, '"' second difference, which holds for that channel until another prefix;
# "#" starts a hexadecimal number, "*" repeats the previous value. A trace's format is that of
# its (or its traceGroup's) contextRef, else the last <traceFormat> or <context> outside
# <definitions>, else X Y. Channels other than X, Y and T are ignored, as are penUp traces.

_INKML_TOKEN = re.compile(r"""\s*(?:([!'"])|([-+]?\s*(?:\#[0-9A-Fa-f]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))"""
                          r"""|([TF*?])|(\S))""")
_INKML_ORDER = {"!": 0, "'": 1, '"': 2}


def _inkml_number(text):
    text = text.replace(" ", "").replace("\t", "").replace("\n", "").replace("\r", "")
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    return sign * int(body[1:], 16) if body.startswith("#") else sign * float(body)


def parse_inkml_trace(text, n_channels, needed, source):
    """(n, n_channels) explicit values of one <trace>'s text (differences undone) in the
    channels `needed` (indices; X, Y and T); the other channels may hold anything, read as 0."""
    rows = [p.split() for p in text.split(",")]
    if rows and not rows[-1]:
        rows.pop()  # a trailing comma
    try:  # the common case: plain decimal numbers only
        values = np.array(rows, dtype=np.float64)
        if values.ndim == 2 and values.shape[1] >= n_channels:
            return values[:, :n_channels]
    except ValueError:
        pass
    out = np.zeros((len(rows), n_channels))
    order = [0] * n_channels  # the difference order of each channel, sticky until the next prefix
    prev, vel = np.zeros(n_channels), np.zeros(n_channels)
    for i, point in enumerate(text.split(",")[:len(rows)]):
        values, pending = [], None
        for m in _INKML_TOKEN.finditer(point):
            qualifier, number, special, junk = m.groups()
            if junk:
                raise InkError(f"{source}: unexpected {junk!r} in a <trace>")
            if qualifier:
                pending = _INKML_ORDER[qualifier]
            elif number or special:
                values.append((pending, _inkml_number(number) if number else special))
                pending = None
        if len(values) < n_channels:
            raise InkError(f"{source}: a <trace> point has {len(values)} values; its trace format has "
                           f"{n_channels} channels")
        for c, (q, v) in enumerate(values[:n_channels]):
            if c not in needed:
                continue
            order[c] = order[c] if q is None else q
            if isinstance(v, str):
                if v != "*" or i == 0:
                    raise InkError(f"{source}: a <trace> value {v!r} where a number is needed")
                v, q_now = prev[c], 0
            else:
                q_now = order[c]
            if q_now and i == 0:
                raise InkError(f"{source}: a <trace> starts with a difference, not a value")
            x = v if q_now == 0 else prev[c] + v if q_now == 1 else prev[c] + vel[c] + v  # ! ' "
            vel[c], prev[c] = (x - prev[c] if i else 0.0), x
            out[i, c] = x
    return out


def parse_inkml(data: bytes, source: str) -> Ink:
    """Ink from an InkML file: every pen-down <trace> (in <traceGroup>s too) is a stroke."""
    formats, contexts = {}, {}  # xml:id -> [(name, units, orientation)] of the regular channels
    state = {"current": [("X", None, None), ("Y", None, None)], "channels": None, "format_id": "",
             "ctx_format": None, "ctx_id": "", "trace": None, "commas": 0}
    stack, group_ctx, traces = [], [], []  # open elements; contextRef of open traceGroups; (format, text)

    def ref(value):
        return (value or "").lstrip("#")

    def start(name, attrs):
        local = name.rsplit(":", 1)[-1]  # InkML may come with a namespace prefix
        if not stack and local != "ink":
            raise _BadContent(f"root element <{name}>, expected <ink>")
        stack.append(local)
        if local == "traceFormat":
            state["channels"], state["format_id"] = [], attrs.get("xml:id") or attrs.get("id") or ""
        elif local == "channel" and state["channels"] is not None and "intermittentChannels" not in stack:
            state["channels"].append((attrs.get("name", ""), attrs.get("units"), attrs.get("orientation")))
        elif local == "context":
            state["ctx_format"] = formats.get(ref(attrs.get("traceFormatRef")))
            state["ctx_id"] = attrs.get("xml:id") or attrs.get("id") or ""
        elif local == "traceGroup":
            group_ctx.append(ref(attrs.get("contextRef")) or (group_ctx[-1] if group_ctx else ""))
        elif local == "trace":
            ctx = ref(attrs.get("contextRef")) or (group_ctx[-1] if group_ctx else "")
            fmt = contexts.get(ctx) or state["current"]
            state["trace"] = None if attrs.get("type", "penDown") == "penUp" else (fmt, [])

    def end(name):
        local = stack.pop()
        if local == "traceFormat":
            channels, state["channels"] = state["channels"], None
            if state["format_id"]:
                formats[state["format_id"]] = channels
            if stack and stack[-1] in ("context", "inkSource"):
                state["ctx_format"] = channels
            elif "definitions" not in stack:
                state["current"] = channels
        elif local == "context":
            fmt = state["ctx_format"] or state["current"]
            if state["ctx_id"]:
                contexts[state["ctx_id"]] = fmt
            if "definitions" not in stack:
                state["current"] = fmt
        elif local == "traceGroup":
            group_ctx.pop()
        elif local == "trace" and state["trace"] is not None:
            traces.append((state["trace"][0], "".join(state["trace"][1])))
            state["trace"] = None

    def text(chars):
        if stack and stack[-1] == "trace" and state["trace"] is not None:
            state["trace"][1].append(chars)
            state["commas"] += chars.count(",")
            if state["commas"] > MAX_INK_POINTS:
                raise _BadContent(f"more than {MAX_INK_POINTS} pen samples")

    parser = _safe_parser()
    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    try:
        _parse(parser, data, source)
    except IamOnDbError as e:
        raise InkError(str(e)) from None
    strokes, times = [], []
    has_time = bool(traces) and all(any(c[0] == "T" for c in fmt) for fmt, _ in traces)
    for fmt, body in traces:
        names = [c[0] for c in fmt]
        if "X" not in names or "Y" not in names:
            raise InkError(f"{source}: a <trace> whose trace format has no X and Y channels")
        needed = {names.index(c) for c in ("X", "Y", "T") if c in names}
        values = parse_inkml_trace(body, len(fmt), needed, source)  # (n, channels)
        if not len(values):
            continue
        sign = np.array([-1.0 if fmt[names.index(c)][2] == "-ve" else 1.0 for c in "XY"])  # y down
        strokes.append(values[:, [names.index("X"), names.index("Y")]] * sign)
        if has_time:
            t = values[:, names.index("T")]
            times.append(t * _time_factor(fmt[names.index("T")][1], t, source))
    return checked_ink(source, "inkml", strokes, times if has_time else None)


def _time_factor(units, t, source):
    """Seconds per unit of an InkML T channel. Without units: pens sample at 5-1000 Hz, so a
    median step of at least 0.5 cannot be seconds and is read as milliseconds."""
    if units:
        if units not in TIME_UNITS:
            raise InkError(f"{source}: time units {units!r} (expected one of {', '.join(TIME_UNITS)})")
        return TIME_UNITS[units]
    steps = np.diff(t)
    steps = steps[steps > 0]
    return 1e-3 if len(steps) and _median(steps) >= 0.5 else 1.0


def inkml_bytes(points, stroke, times=None):
    """W3C InkML of pen samples: one <trace> per stroke, channels X and Y (y down) and, with
    times, T in seconds. For converting ink, and for the tests."""
    channels = [("X", ""), ("Y", "")] + ([("T", ' units="s"')] if times is not None else [])
    values = np.column_stack([points] + ([times] if times is not None else []))  # (N, 2 or 3)
    body = ['<?xml version="1.0" encoding="UTF-8"?>', '<ink xmlns="http://www.w3.org/2003/InkML">',
            "  <traceFormat>"] + [f'    <channel name="{n}" type="decimal"{u}/>' for n, u in channels] + \
           ["  </traceFormat>"]
    for k in range(int(stroke.max()) + 1 if len(stroke) else 0):
        body.append("  <trace>" + ", ".join(" ".join(repr(float(v)) for v in row) for row in values[stroke == k])
                    + "</trace>")
    return ("\n".join(body + ["</ink>"]) + "\n").encode()


class _Root(Exception):
    """Stops the parse at the root element: its name says the format."""


def ink_format(data: bytes, source: str) -> str:
    """"inkml", "linestrokes" or "json", from the content (not the file name)."""
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head in (b"[", b"{"):
        return "json"
    if head == b"<":
        def root(name, attrs):
            raise _Root(name)
        parser = _safe_parser()
        parser.StartElementHandler = root
        try:
            _parse(parser, data, source)
        except _Root as r:
            name = str(r)
            if name.rsplit(":", 1)[-1] == "ink":
                return "inkml"
            if name == IAM_ROOT:
                return "linestrokes"
            raise InkError(f"{source}: an XML file with root <{name}>, neither InkML <ink> nor IAM-OnDB "
                           f"<{IAM_ROOT}>") from None
        except IamOnDbError as e:
            raise InkError(str(e)) from None
        raise InkError(f"{source}: an XML file without elements")
    raise InkError(f"{source}: neither InkML, IAM-OnDB lineStrokes XML nor JSON strokes")


def parse_ink(data: bytes, source: str, y_up=False) -> Ink:
    """Ink from the bytes of any of the three formats. y_up applies to JSON only (InkML says
    its orientation per channel; lineStrokes y grows downwards)."""
    if len(data) > MAX_INK_BYTES:
        raise InkError(f"{source}: more than {MAX_INK_BYTES // 2**20} MB; not a file of handwriting")
    fmt = ink_format(data, source)
    if fmt == "json":
        return parse_json_strokes(data, source, y_up)
    if fmt == "inkml":
        return parse_inkml(data, source)
    try:
        line = parse_line_strokes(data, source)
    except IamOnDbError as e:
        raise InkError(str(e)) from None
    starts = np.flatnonzero(stroke_starts(line.stroke))
    bounds = list(zip(starts, np.append(starts[1:], len(line.stroke))))
    return checked_ink(source, "linestrokes", [line.points[a:b] for a, b in bounds],
                       [line.times[a:b] for a, b in bounds])


def read_ink_bytes(path):
    """The bytes of a file, or of stdin for "-", at most MAX_INK_BYTES + 1 of them (so that
    parse_ink can refuse a larger input without reading it all); InkError if unreadable."""
    try:
        if path == "-":
            return sys.stdin.buffer.read(MAX_INK_BYTES + 1)
        with open(path, "rb") as f:
            return f.read(MAX_INK_BYTES + 1)
    except FileNotFoundError:
        raise InkError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InkError(f"{path}: a folder, not a file of ink") from None
    except OSError as e:
        raise InkError(f"{path}: cannot read it ({e.strerror or e})") from None


# Pages: strokes into text lines.

def group_lines(points, stroke):
    """Text lines of a page, top to bottom: a list of stroke-id arrays, each in writing order.

    Tall strokes (at least CORE_STROKE of the 90th-percentile stroke height) make lines. In
    writing order, a tall stroke starts a new line on a carriage return: its centre lies left
    of where the previous tall stroke began and outside the band (median top to median bottom)
    of the current line's last NEAR_STROKES tall strokes, or left of the previous stroke's
    centre and APART band heights clear of that band (after a line of one stroke). Lines
    whose bands overlap by LINE_OVERLAP of the narrower are then merged (ink added to a line
    later). Every other stroke (dots, bars, commas) joins the line of the tall stroke nearest
    to its box, distances below a stroke counting double. points (N, 2) y down, stroke (N,)
    ids 0..S-1.
    """
    starts = np.flatnonzero(stroke_starts(stroke))
    lo, hi = np.minimum.reduceat(points, starts), np.maximum.reduceat(points, starts)  # (S, 2)
    height, cx, cy = hi[:, 1] - lo[:, 1], 0.5 * (lo[:, 0] + hi[:, 0]), 0.5 * (lo[:, 1] + hi[:, 1])
    tall = np.quantile(height, 0.9)
    if len(starts) == 1 or tall <= 0:
        return [np.arange(len(starts))]
    core = np.flatnonzero(height >= CORE_STROKE * tall)
    line_of = np.full(len(starts), -1)
    members = [[core[0]]]  # per line, its tall strokes
    for s in core[1:]:
        recent = members[-1][-NEAR_STROKES:]
        band_lo, band_hi = np.median(lo[recent, 1]), np.median(hi[recent, 1])
        prev = members[-1][-1]
        outside = not band_lo <= cy[s] <= band_hi
        apart = max(lo[s, 1] - band_hi, band_lo - hi[s, 1]) > APART * (band_hi - band_lo)
        if (cx[s] < lo[prev, 0] and outside) or (cx[s] < cx[prev] and apart):
            members.append([])
        members[-1].append(s)
    if len(members) > MAX_PAGE_LINES:
        raise ValueError(f"more than {MAX_PAGE_LINES} text lines")
    members = [np.array(m) for m in members]
    # Lines whose vertical bands (median top to median bottom) overlap are one line.
    while len(members) > 1:
        bands = np.array([[np.median(lo[m, 1]), np.median(hi[m, 1])] for m in members])  # (L, 2)
        overlap = np.minimum(bands[:, None, 1], bands[None, :, 1]) - np.maximum(bands[:, None, 0], bands[None, :, 0])
        width = bands[:, 1] - bands[:, 0]  # (L,)
        joined = np.triu(overlap >= LINE_OVERLAP * np.minimum(width[:, None], width[None, :]), k=1)  # (L, L)
        if not joined.any():
            break
        a, b = np.argwhere(joined)[0]  # the first pair in order, as a scan would find it
        members[a] = np.concatenate([members[a], members.pop(b)])
    for k, m in enumerate(members):
        line_of[m] = k
    core_lo, core_hi = lo[core], hi[core]  # (C, 2)
    for s in np.flatnonzero(line_of < 0):
        below = np.maximum(lo[s, 1] - core_hi[:, 1], 0.0)  # the mark lies below the tall stroke
        above = np.maximum(core_lo[:, 1] - hi[s, 1], 0.0)
        side = np.maximum(np.maximum(core_lo[:, 0] - hi[s, 0], lo[s, 0] - core_hi[:, 0]), 0.0)
        line_of[s] = line_of[core[np.argmin(np.hypot(side, above + BELOW_PENALTY * below))]]
    order = np.argsort([np.median(cy[m]) for m in members], kind="stable")
    return [np.flatnonzero(line_of == k) for k in order]


# -- The model and one reading --

def load_reading_model(path=None):
    """(params, cfg, normalisation) of a model that can read new ink: an iam-ondb model
    (graves25 or raw features) saved with its input normalisation. UserError in one line
    otherwise; path None is the shipped model."""
    if path is None:
        if not os.path.exists(DEFAULT_MODEL):
            raise UserError(f"no model to read with: the shipped IAM-OnDB model {DEFAULT_MODEL} is not in this "
                            "copy; give --load-model PATH (a model saved by --task iam-ondb --save-model PATH)")
        path = DEFAULT_MODEL
    params, cfg = load_model(path)
    if cfg.task != "iam-ondb":
        raise UserError(f"model file {path!r} holds a {cfg.task} model; reading ink needs an iam-ondb model "
                        "(trained on IAM-OnDB's preprocessing and features)")
    if cfg.features not in ("graves25", "raw") or not cfg.alphabet:
        raise UserError(f"model file {path!r} holds an iam-ondb model without its features or alphabet")
    normalisation = load_normalisation(path, cfg)
    if normalisation is None:
        raise UserError(f"model file {path!r} has no input normalisation (__input__): it was saved before "
                        "model files carried one, so it cannot read ink without its training set")
    return params, cfg, normalisation


@dataclass
class Reader:
    """A loaded model with its decoders, ready to read lines of ink."""

    params: dict
    cfg: RunConfig
    normalisation: dict  # {shift (D,), scale (D,), squash}
    decoders: dict = field(default_factory=dict)  # name -> decode([(T, K) log-probs]) -> [str], built on use

    def decode(self, name, log_probs):
        if name not in self.decoders:
            if name == "lm" and not (self.cfg.lm_file or self.cfg.dictionary_file):  # the built-in dictionary
                check_dictionary_alphabet(self.cfg.dictionary_size, self.cfg.alphabet)
            self.decoders[name] = make_decoder(name, self.cfg, self.cfg.alphabet)
        return self.decoders[name]([log_probs])[0]

    def mean_speed(self):
        """The speed feature's training mean (shift), for ink without times; 1 for raw features."""
        return float(self.normalisation["shift"][GRAVES25_NAMES.index("speed")]) \
            if self.cfg.features == "graves25" else 1.0


def line_input(ink, strokes, mean_speed, features):
    """One text line of `ink` (the strokes `strokes`) as network input.

    Returns (traj (T, D) float32, source (T,) index into ink.points of the input point each
    step lies at). Without times the pen is taken to move at constant speed: times are the
    distance along the ink, and the speed feature becomes mean_speed."""
    index = np.flatnonzero(np.isin(ink.stroke, strokes))  # (n,) in writing order
    if len(index) > MAX_LINE_POINTS:
        raise InkError(f"{ink.source}: a text line of {len(index)} pen samples (at most {MAX_LINE_POINTS})")
    points, stroke = ink.points[index], ink.stroke[index]
    if ink.times is not None:
        times = ink.times[index]
    else:
        times = np.concatenate(([0.0], np.cumsum(_lengths(np.diff(points, axis=0)))))  # (n,)
    try:
        pre = preprocess(points, stroke, times)  # bounded by MAX_LINE_SAMPLES
    except ValueError as e:
        raise InkError(f"{ink.source}: {e}") from None
    if ink.times is None:  # pre.speed * corpus height is about 1: distance per distance
        pre = dataclasses.replace(pre, speed=_read_only(pre.speed * pre.corpus_height * mean_speed))
    traj = line_features(pre, features)
    if not np.isfinite(traj).all():
        raise InkError(f"{ink.source}: the preprocessing of a line gave non-finite features")
    return traj, index[np.clip(np.rint(pre.source).astype(np.int64), 0, len(index) - 1)]


def line_log_probs(reader, traj):
    """(T, K) float64 log-probabilities of one line, normalised as in training (pad_batch)."""
    n = reader.normalisation
    X, lengths = pad_batch([Sample("", traj, [], None, None, None)], n["shift"], n["scale"],
                           reader.params["out_W"].dtype, n["squash"])
    log_probs, _ = forward(reader.params, X, lengths, cache=False)
    return log_probs[:, 0].astype(np.float64)


def character_spans(log_probs):
    """The greedy path's output characters and where they came from.

    Returns (labels (C,), spike (C, 2), span (C, 2)): spike = first and last step of the
    character's run of argmax labels, span = the steps from halfway after the previous
    spike to halfway before the next (the first starts at 0, the last ends at T - 1).
    The labels are exactly greedy_decode's."""
    path = np.argmax(log_probs, axis=1)  # (T,)
    T = len(path)
    first = np.flatnonzero(np.diff(path, prepend=-1) != 0)  # (R,) run starts
    last = np.append(first[1:], T) - 1
    chars = path[first] != BLANK
    first, last, labels = first[chars], last[chars], path[first][chars]
    cut = (last[:-1] + first[1:] + 1) // 2  # the first step of each span after the first
    span = np.column_stack([np.append(0, cut), np.append(cut - 1, T - 1)]).astype(np.int64)
    return labels, np.column_stack([first, last]), span


def _box(ink, index):
    """[x_min, y_min, x_max, y_max] of ink.points[index], in the input's own orientation."""
    p = ink.points[index] * np.array([1.0, ink.y_sign])
    lo, hi = p.min(axis=0), p.max(axis=0)
    return [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]


def read_line(reader, ink, strokes, traj, source, decoders, seconds=0.0):
    """Readings of one text line (its line_input) and the ink span of each greedy output
    character, as JSON; seconds: time already spent on the line (its preprocessing)."""
    t0 = time.perf_counter() - seconds
    log_probs = line_log_probs(reader, traj)
    labels, spike, span = character_spans(log_probs)
    readings = {"greedy": decode_labels(labels.tolist(), reader.cfg.alphabet)}
    for name in decoders:
        if name != "greedy":
            readings[name] = reader.decode(name, log_probs)
    chars = []
    for k, (c, (s0, s1), (f0, f1)) in enumerate(zip(labels, spike, span)):
        a, b = source[f0], source[f1]
        chars.append({
            "char": reader.cfg.alphabet[c - 1],
            "p": round(float(np.exp(log_probs[s0:s1 + 1, c].max())), 4),  # the spike's height
            "spike": [int(s0), int(s1)], "frames": [int(f0), int(f1)],  # network steps
            "points": [int(min(a, b)), int(max(a, b))],  # indices into the input's pen samples, in order
            "at": [round(float(v), 3) for v in ink.points[source[s0]] * np.array([1.0, ink.y_sign])],
            "box": [round(v, 3) for v in _box(ink, source[f0:f1 + 1])],
        })
    index = np.flatnonzero(np.isin(ink.stroke, strokes))
    extra = {name: readings[name] for name in readings if name not in ("greedy", "lm")}
    return {"text": readings[decoders[0]], "greedy": readings["greedy"], "lm": readings.get("lm"), **extra,
            "seconds": round(time.perf_counter() - t0, 4), "frames": len(traj), "strokes": strokes.tolist(),
            "box": [round(v, 3) for v in _box(ink, index)], "chars": chars}


def read_ink(reader, ink, decoders=("greedy",)):
    """Every text line of `ink`, top to bottom: the --read --json document of one input.
    decoders[0] gives each line's "text"; "greedy" is always there."""
    t0 = time.perf_counter()
    try:
        groups = group_lines(ink.points, ink.stroke)
    except ValueError as e:
        raise InkError(f"{ink.source}: {e}") from None
    inputs, frames = [], 0
    for strokes in groups:  # all lines preprocessed first: the whole input's network steps are bounded
        t1 = time.perf_counter()
        traj, source = line_input(ink, strokes, reader.mean_speed(), reader.cfg.features)
        frames += len(traj)
        if frames > MAX_INK_FRAMES:
            raise InkError(f"{ink.source}: more than {MAX_INK_FRAMES} network steps of ink (about 50 text lines)")
        inputs.append((strokes, traj, source, time.perf_counter() - t1))
    lines = [read_line(reader, ink, strokes, traj, source, decoders, seconds)
             for strokes, traj, source, seconds in inputs]
    return {"source": ink.source, "format": ink.format, "points": len(ink.points),
            "strokes": int(ink.stroke[-1]) + 1, "times": ink.times is not None, "lines": lines,
            "seconds": round(time.perf_counter() - t0, 4)}


def make_reader(args):
    """The Reader for --read and --serve: the model of --load-model (or the shipped one)
    with the decoding flags applied."""
    params, cfg, normalisation = load_reading_model(args.load_model)
    cfg = check_config(dataclasses.replace(cfg, **{
        n: getattr(args, n) for n in READ_SETTINGS if getattr(args, n) is not None}))
    return Reader(params, cfg, normalisation)


def check_read_arguments(args):
    """One line for flags that --read and --serve do not take."""
    if args.read and args.serve is not None:
        raise UserError("--read and --serve cannot be combined")
    if args.json and not args.read:
        raise UserError("--json goes with --read")
    if args.y_up and not args.read:
        raise UserError("--y-up goes with --read (the pad sends y down)")
    taken = ("read", "serve", "json", "y_up", "load_model", "quiet") + READ_SETTINGS
    given = [flag_name(n) for n, v in vars(args).items() if n not in taken and v not in (None, False)]
    if given:
        raise UserError(f"{', '.join(given)} cannot be combined with --read or --serve")
    if args.decoder is not None and args.decoder not in READ_DECODERS:
        raise UserError(f"--decoder {args.decoder} cannot read ink (choose from {', '.join(READ_DECODERS)})")


def read_files(args, log=print):
    """--read FILE [FILE ...]: one line of text per line of ink (prefixed by the file name when
    there are several files), or with --json one JSON document per file. A bad file stops the
    run with one line; the readings of the files before it are already printed."""
    reader = make_reader(args)
    decoders = tuple(dict.fromkeys((reader.cfg.decoder, "greedy", "lm"))) if args.json else (reader.cfg.decoder,)
    if args.json and "lm" in decoders and reader.cfg.decoder != "lm":
        try:
            reader.decode("lm", np.zeros((1, n_classes(reader.cfg))))  # builds the dictionary and the LM
        except UserError:
            decoders = tuple(d for d in decoders if d != "lm")  # the alphabet cannot spell the dictionary
    for path in args.read:
        ink = parse_ink(read_ink_bytes(path), path, args.y_up)
        result = read_ink(reader, ink, decoders)
        if args.json:
            log(json.dumps(result, allow_nan=False))
        else:
            for line in result["lines"]:
                log(f"{path}: {line['text']}" if len(args.read) > 1 else line["text"])
    return 0


# The pen pad: --serve [PORT].

class PadServer(http.server.ThreadingHTTPServer):
    """The pen pad's server: the page and POST /read, on 127.0.0.1 only."""

    daemon_threads = True  # Ctrl-C does not wait for a client that keeps its connection open

    def __init__(self, port, reader, page, log=print):
        self.reader, self.page, self.log = reader, page, log
        self.lock = threading.Lock()  # one reading at a time: the decoders' caches are not shared safely
        super().__init__((SERVE_HOST, port), PadHandler)
        self.hosts = {f"{h}:{self.server_port}" for h in ("127.0.0.1", "localhost")}
        self.lm = False  # whether the LM reading is offered (serve builds it first)

    def read(self, body):
        """One POST /read body -> the --read --json document. The body is JSON strokes, or
        {"strokes": [...], "y_up": bool, "lm": bool}; lm false (while writing) skips the LM reading."""
        ink = parse_json_strokes(body, "request")
        doc = json.loads(body)  # parsed once already, so valid
        lm = doc.get("lm", True) if isinstance(doc, dict) else True
        if not isinstance(lm, bool):
            raise InkError("request: \"lm\" must be true or false")
        with self.lock:
            return read_ink(self.reader, ink, ("greedy", "lm") if lm and self.lm else ("greedy",))


class PadHandler(http.server.BaseHTTPRequestHandler):
    """GET / -> the page; POST /read (application/json strokes) -> the --read --json document.
    No CORS headers: other sites' pages can neither read the answers nor send JSON here."""

    server_version = "iam_handwriting"
    sys_version = ""
    timeout = SERVE_TIMEOUT
    protocol_version = "HTTP/1.0"  # one request per connection

    def _send(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                             "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status, message):
        self.close_connection = True
        self._send(status, json_bytes({"error": " ".join(str(message).split())}))

    def _host_ok(self):
        if self.headers.get("Host") in self.server.hosts:
            return True
        self._error(403, "unexpected Host header (the pad answers to 127.0.0.1 and localhost only)")
        return False

    def do_GET(self):
        if not self._host_ok():
            return
        if self.path.split("?", 1)[0] in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8")
        else:
            self._error(404, f"no {self.path.split('?', 1)[0]!r} here: the pad is at /")

    def do_POST(self):
        if not self._host_ok():
            return
        if self.path != "/read":
            return self._error(404, "POST strokes to /read")
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            return self._error(415, "POST /read takes Content-Type: application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "POST /read needs a Content-Length")
        if length < 0:
            return self._error(400, "negative Content-Length")
        if length > MAX_BODY_BYTES:
            if length <= DRAIN_BYTES:  # read and dropped, so that the client sees the answer, not a reset
                try:
                    while length > 0:
                        chunk = self.rfile.read(min(length, 2**16))
                        if not chunk:
                            break
                        length -= len(chunk)
                except OSError:
                    pass
            return self._error(413, f"request body over {MAX_BODY_BYTES} bytes; at most {MAX_BODY_BYTES} are read")
        try:
            body = self.rfile.read(length)
        except OSError:
            self.close_connection = True
            return
        if len(body) < length:
            return self._error(400, "the request body is shorter than its Content-Length")
        try:
            status, result = 200, self.server.read(body)
        except UserError as e:
            return self._error(400, e)
        except Exception as e:  # a bug must not stop the pad; say what it was in one line
            self.server.log(f"iam_handwriting.py: error reading a request: {type(e).__name__}: {e}")
            return self._error(500, f"{type(e).__name__}: {e}")
        self._send(status, (json.dumps(result, allow_nan=False, separators=(",", ":")) + "\n").encode())

    def log_message(self, format, *args):
        pass  # no line per stroke; errors are logged by do_POST


def start_pad(reader, port, log=print):
    """A PadServer on 127.0.0.1:port (not yet serving), its LM reading built first so that the
    first request does not wait for it; without one if the alphabet cannot spell the dictionary."""
    try:
        with open(PAD_PAGE, "rb") as f:
            page = f.read()
    except OSError as e:
        raise UserError(f"cannot read the pen pad's page {PAD_PAGE}: {e.strerror or e}") from None
    try:
        server = PadServer(port, reader, page, log)
    except OSError as e:
        raise UserError(f"cannot serve on {SERVE_HOST}:{port}: {e.strerror or e}") from None
    try:
        reader.decode("lm", np.zeros((1, n_classes(reader.cfg))))  # builds the dictionary and the LM
        server.lm = True
    except UserError as e:
        log(f"no LM reading: {e}")
    return server


def serve(args, log=print):
    """--serve [PORT]: the pen pad on http://127.0.0.1:PORT/ until Ctrl-C (PORT 0: any free port)."""
    server = start_pad(make_reader(args), args.serve, log)
    log(f"pen pad at http://{SERVE_HOST}:{server.server_port}/ (Ctrl-C stops it)")
    try:
        server.serve_forever(poll_interval=0.2)
    except (KeyboardInterrupt, Terminated):
        pass
    finally:
        server.server_close()
    log("pen pad stopped")
    return 0


# ---------------------------------------------------------------------------
# 24. Command line
# ---------------------------------------------------------------------------


def _setting_type(name):
    """An argparse type for RunConfig field `name`, with the field's own range check."""
    kind = CONFIG_FIELDS[name].type

    def parse(text):
        try:
            value = value_from_text(kind, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        problem = setting_error(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


MAX_LEXICON = 100_000  # distinct 3-5 letter strings over 10 letters: 111,000


def whole_number(low, high):
    """An argparse type: an int in low..high, or a one-line error (also for the benchmark scripts)."""
    def parse(text):
        try:
            value = value_from_text("int", text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        problem = range_error(value, low, high)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


def _sizes(low, high, what):
    def parse(text):
        try:
            sizes = [int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
        bad = [n for n in sizes if not low <= n <= high]
        if bad:
            raise argparse.ArgumentTypeError(f"sizes must lie in {low}..{high} ({what}), got {bad[0]}")
        return sorted(set(sizes))
    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2, and a negative
    number in scientific notation (--word-penalty -1e1) is a value, not an unknown option."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# Flags that set a RunConfig field (their argparse dest is the field's name).
CONFIG_FLAGS = tuple(n for n in CONFIG_FIELDS if flag_name(n))
# Config flags a loaded model may take: main checks --task and --features against the file and
# reads the data from --data-dir (the folder may have moved since training).
LOADED_MODEL_FIELDS = ("task", "data_dir", "features")
# Flags that only training reads, refused with --load-model, in the order the refusal names them:
# every config flag but the decoding ones and LOADED_MODEL_FIELDS, then the training switches.
TRAINING_FLAGS = tuple(n for n in CONFIG_FLAGS if not CONFIG_FIELDS[n].metadata["decoding"]
                       and n not in LOADED_MODEL_FIELDS) + ("unidirectional", "quick", "resume")
# Flags only some tasks take (Task.options), in the order check_task_arguments looks at them: the
# first given that the task does not take is the one named. The config fields whose `tasks` name
# some, then the tasks' own options (Task.flags).
TASK_FLAGS = tuple(n for n, f in CONFIG_FIELDS.items() if f.metadata["tasks"]) + \
    tuple(dict.fromkeys(n for t in TASKS.values() for n in t.flags))


def _default_text(name):
    """'(default X)', with the tasks whose headline runs differ."""
    default = CONFIG_FIELDS[name].default
    others = [f"{t.name}: {t.defaults[name]}" for t in TASKS.values() if name in t.defaults]
    return f"(default {default!r}" + (f"; {', '.join(others)}" if others else "") + ")"


def build_parser():
    p = OneLineParser(prog="iam_handwriting.py", description=__doc__.split("\n\n")[0])

    def setting(name, **kw):
        meta = CONFIG_FIELDS[name].metadata
        low = meta["low"] if meta["low"] is not None else meta["above"]
        bounds = f"; {'above ' if meta['above'] is not None else ''}{low:g}..{meta['high']:g}" \
            if meta["high"] is not None else ""
        if meta["choices"] is not None:
            kw.setdefault("metavar", "{" + ",".join(meta["choices"]) + "}")
        p.add_argument(flag_name(name), dest=name, type=_setting_type(name), default=None,
                       help=f"{meta['help']}{bounds} {_default_text(name)}", **kw)

    setting("task")
    setting("seed")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke preset: " + "; ".join(f"{t.name}: " + ", ".join(f"{k} {v}" for k, v in t.quick.items())
                                                         for t in TASKS.values()))
    setting("epochs")
    setting("hidden")
    setting("layers")
    p.add_argument("--unidirectional", action="store_true", help="forward-only LSTM baseline")
    setting("input_gain")
    setting("dtype")
    setting("batch_size")
    setting("lr")
    setting("lr_final")
    setting("grad_clip")
    setting("workers")
    setting("patience")
    setting("weight_noise")
    setting("dropout")
    setting("init_from", metavar="MODEL")
    setting("augment")
    setting("word_repeats")
    setting("eval_repeats")
    setting("holdout_frac")
    setting("jitter")
    setting("slant_max")
    setting("lines_per_epoch")
    setting("eval_lines_per_writer")
    setting("data_dir", metavar="DIR")
    setting("features")
    setting("decoder")
    setting("beam_width")
    p.add_argument("--lexicon-sizes", type=_sizes(len(VOCAB), MAX_LEXICON, f"the lexicon holds the {len(VOCAB)} "
                                                  "vocabulary words"), default=None, metavar="N,N,...",
                   help="words: after training or loading, decode with lexicons of these sizes (the vocabulary plus "
                        "pseudo-word distractors), e.g. 47,100,1000,10000")
    setting("dictionary_size")
    p.add_argument("--dictionary-sizes", type=_sizes(1, N_ENGLISH_WORDS, "most frequent English words"),
                   default=None, metavar="N,N,...",
                   help="lines: after training or loading, compare greedy, dictionary, unigram and bigram decoding "
                        "with dictionaries of these sizes, e.g. 1000,5000,20000")
    setting("lm_weight")
    setting("word_penalty")
    setting("lm_beam")
    setting("lm_file", metavar="FILE")
    setting("dictionary_file", metavar="FILE")
    setting("oov")
    setting("oov_penalty")
    setting("lm_tuning", metavar="N")
    p.add_argument("--experiment-split", choices=("test", "validation"), default=None,
                   help="--dictionary-sizes: report on the test lines (default), or on the validation lines not "
                        "used for tuning (choosing a recipe without touching the test lines)")
    p.add_argument("--export-iam-ondb", metavar="DIR", default=None,
                   help="lines: write the synthetic lines in the IAM-OnDB layout and format into DIR, then stop")
    p.add_argument("--save-json", metavar="PATH", help="write the run summary (run.json) here")
    p.add_argument("--save-model", metavar="PATH", help="write the trained parameters and config (npz) here")
    p.add_argument("--load-model", metavar="PATH", help="evaluate this saved model instead of training")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoint that --save-model PATH keeps in "
                        "PATH.checkpoint after every epoch (give the command that started the run)")
    p.add_argument("--read", nargs="+", metavar="FILE",
                   help="read handwriting: W3C InkML, IAM-OnDB lineStrokes XML or JSON strokes [[[x, y(, t)], ...], "
                        "...] ('-': stdin); prints one line of text per line of ink, lines found by their "
                        "vertical extent. Uses --load-model, else the shipped IAM-OnDB model "
                        f"{os.path.join(os.path.basename(MODEL_DIR), os.path.basename(DEFAULT_MODEL))} "
                        f"({SHIPPED_MODEL_NOTE}); --decoder {'|'.join(READ_DECODERS)}")
    p.add_argument("--json", action="store_true",
                   help="with --read: one JSON document per file: per line the text, the greedy and LM readings, "
                        "the time taken and each character's ink span (from the CTC alignment)")
    p.add_argument("--y-up", action="store_true", help="with --read: in JSON strokes y grows upwards (default: down)")
    p.add_argument("--serve", nargs="?", const=SERVE_PORT, default=None, type=whole_number(0, 65535),
                   metavar="PORT", help=f"the pen pad: a web page to write on and see the reading, at "
                                        f"http://{SERVE_HOST}:PORT/ (default {SERVE_PORT}; 0: any free port); "
                                        "same model as --read; Ctrl-C stops it")
    p.add_argument("--quiet", action="store_true", help="no per-epoch log lines")
    return p


def config_from_args(args):
    task = TASKS[args.task or "words"]
    overrides = {**task.defaults, **(task.quick if args.quick else {})}
    for name in CONFIG_FLAGS:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.unidirectional:
        overrides["bidirectional"] = False
    return check_config(RunConfig(**overrides))


def flag_given(value):
    """Whether a flag was given: 0, 0.0 and "" are values, unlike None (not given) and False (a switch left off)."""
    return value is not None and value is not False


PATH_FLAGS = ("load_model", "save_json", "save_model", "export_iam_ondb", "data_dir", "init_from")
# What an export reads.
EXPORT_FLAGS = ("task", "seed", "lines_per_epoch", "eval_lines_per_writer", "quick", "quiet", "export_iam_ondb")


def check_arguments(args):
    """One line for flag combinations and output paths that cannot work, before any work."""
    for name in PATH_FLAGS:
        if getattr(args, name) == "":
            raise UserError(f"{flag_name(name)} needs a path, got an empty one")
    if flag_given(args.export_iam_ondb):
        ignored = [flag_name(n) for n in vars(args) if n not in EXPORT_FLAGS and flag_given(getattr(args, n))]
        if ignored:
            raise UserError(f"{', '.join(ignored)} cannot be combined with --export-iam-ondb (the export writes the "
                            "lines and stops; it takes only --task lines, --seed, --lines-per-epoch, "
                            "--eval-lines-per-writer and --quick)")
    if flag_given(args.load_model):
        given_flags = [flag_name(n) for n in TRAINING_FLAGS if flag_given(getattr(args, n))]
        if given_flags:
            raise UserError(f"{', '.join(given_flags)} cannot be combined with --load-model "
                            "(the model file holds its config)")
    if args.resume and not args.save_model:
        raise UserError("--resume needs --save-model PATH: the checkpoint is PATH.checkpoint")
    paths = {"--load-model": args.load_model, "--save-json": args.save_json, "--save-model": args.save_model}
    given = {flag: os.path.realpath(p) for flag, p in paths.items() if p}
    for i, (a, pa) in enumerate(given.items()):
        for b, pb in list(given.items())[i + 1:]:
            if pa == pb:
                raise UserError(f"{a} and {b} name the same file {paths[a]!r}; one would destroy the other")
    for path, what in ((args.save_json, "run summary"), (args.save_model, "model file")):
        if path:
            check_writable(path, what)


def check_task_arguments(args, task):
    """One line for flags the task does not take."""
    for name in TASK_FLAGS:
        if flag_given(getattr(args, name)) and name not in task.options:
            takers = [t.name for t in TASKS.values() if name in t.options]
            raise UserError(f"{flag_name(name)} is for the {' and '.join(takers)} task"
                            f"{'s' if len(takers) > 1 else ''}, not {task.name}")
    if args.decoder is not None and args.decoder not in task.decoders:
        raise UserError(f"--decoder {args.decoder} is not available for the {task.name} task "
                        f"(choose from {', '.join(task.decoders)})")


def check_tuning_arguments(args, cfg):
    """One line if a weight or penalty of the lm decoder is given while the run tunes it on validation."""
    given = [flag_name(n) for n in ("lm_weight", "word_penalty", "oov_penalty") if flag_given(getattr(args, n))]
    if cfg.decoder == "lm" and cfg.lm_tuning and given:
        raise UserError(f"{', '.join(given)}: the lm decoder's weight and penalties are tuned on validation lines in "
                        f"this run (--lm-tuning {cfg.lm_tuning}); add --lm-tuning 0 to use given values")


def check_init_model(cfg):
    """The --init-from model, read before any work: UserError unless its LSTM has the
    shape this run trains (its output layer may have other characters)."""
    if not cfg.init_from:
        return
    params, source = load_model(cfg.init_from)
    # The output layer is left out: IAM-OnDB's alphabet is only known once the data is read.
    want = {k: v.shape for k, v in init_params(_NoDraws(), cfg.hidden, cfg.layers, cfg.bidirectional,
                                               feature_dim(cfg), 1).items() if k.startswith("lstm")}
    have = {k: v.shape for k, v in params.items() if k.startswith("lstm")}
    if want != have:
        raise UserError(f"--init-from {cfg.init_from!r}: its LSTM (hidden {source.hidden}, layers {source.layers}, "
                        f"{'bi' if source.bidirectional else 'uni'}directional, {source.features} features) does "
                        f"not fit this run's (hidden {cfg.hidden}, layers {cfg.layers}, "
                        f"{'bi' if cfg.bidirectional else 'uni'}directional, {cfg.features} features)")


def check_lm_files(cfg):
    """Read --lm and --dictionary before any work, so a bad file is one line up front (they are cached)."""
    if cfg.lm_file:
        arpa = read_arpa(cfg.lm_file)
        if not arpa_vocabulary(arpa):
            raise UserError(f"--lm {cfg.lm_file!r} lists no words besides <s>, </s> and <unk>")
    if cfg.dictionary_file:
        read_word_list(cfg.dictionary_file)
    if cfg.dictionary_file and not cfg.lm_file and cfg.task != "iam-ondb" and cfg.lm_weight > 0:
        raise UserError("--dictionary without --lm needs transcriptions to estimate the LM from (the iam-ondb "
                        "task), or --lm-weight 0")


def check_export_folder(path):
    """An export goes into a new or empty folder, never over other files. A new folder is not
    made here: the export appears whole, renamed from a temporary sibling (export_lines_task)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"--export-iam-ondb {path!r}: {_in_the_way(os.path.abspath(path))}; choose a new or empty folder")
    if os.path.isdir(path) and os.listdir(path):
        raise UserError(f"--export-iam-ondb {path!r}: the folder is not empty; choose a new or empty folder")
    check_folder_writable(os.path.dirname(os.path.abspath(path)), f"the export into {path!r}")


def print_summary(result, task, log=print):
    for split, m in result["final"].items():
        greedy = f"  (greedy CER {m['greedy']['cer']:.4f} WER {m['greedy']['wer']:.4f})" if "greedy" in m else ""
        log(f"final {split:10s}  CER {m['cer']:.4f}  WER {m['wer']:.4f}  word acc {m['word_acc']:.3f}  "
            f"loss/char {m['loss']:.4f}{greedy}")
    log(f"wall {result['wall_seconds']:.2f}s  skipped (impossible alignments) {result['skipped']}")


def safe_log():
    """print that survives a closed stdout (`| head`): once a write fails, the
    rest of the output goes to /dev/null and the run carries on."""
    def log(*args, **kw):
        try:
            print(*args, **kw, flush=True)
        except (BrokenPipeError, OSError):
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except OSError:
                pass
    return log


def kept_checkpoint(args):
    """'; ... kept' when an interrupted or diverged run leaves a checkpoint to resume from."""
    path = checkpoint_path(args.save_model) if args.save_model and not args.load_model else None
    return f"; the checkpoint {path} is kept (add --resume to continue)" if path and os.path.isfile(path) else ""


def _raise_terminated(signum, frame):
    raise Terminated()


def write_results(outputs, log):
    """Write (path, bytes, what) outputs, each on its own: one that fails is kept in the
    temporary folder and the others are still written. Returns the paths written; raises one
    UserError, after trying them all, that says what failed and where each copy went."""
    written, failed = [], []
    for path, data, what in outputs:
        try:
            write_output(path, data, what)
        except OSError as e:
            try:
                fd, rescue = tempfile.mkstemp(prefix="iam_handwriting-", suffix=os.path.splitext(path)[1] or ".out")
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                kept = f"; a copy was saved to {rescue}"
            except OSError:
                kept = "; no copy could be saved elsewhere either"
            failed.append(f"cannot write {what} {path!r}: {e.strerror or e}{kept}")
            continue
        written.append(path)
        log(f"wrote {path}")
    if failed:
        raise UserError("; ".join(failed + [f"wrote {p}" for p in written]))
    return written


def main(argv=None):
    # No blanket np.errstate here: the few places that make non-finite numbers on purpose (log 0 in
    # log space, an overflow the caller refuses) say so locally, so that any other floating-point
    # problem shows as numpy's warning (the tests turn it into an error).
    args = build_parser().parse_args(argv)
    log = safe_log()
    keep_freed_memory()
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated) if sys.platform != "win32" else None
    status = {"where": "before training"}
    try:
        if args.read or args.serve is not None or args.json or args.y_up:
            check_read_arguments(args)
            status["where"] = "while reading"
            return serve(args, log) if args.serve is not None else read_files(args, log)
        check_arguments(args)
        if args.load_model:
            params, cfg = load_model(args.load_model)
            normalisation = load_normalisation(args.load_model, cfg)
            task = TASKS[cfg.task]
            if args.task and args.task != cfg.task:
                raise UserError(f"the model file holds a {cfg.task} model, not {args.task}")
            check_task_arguments(args, task)
            if flag_given(args.features) and args.features != cfg.features:
                raise UserError(f"--features {args.features} contradicts the model file, which reads {cfg.features}")
            # --data-dir: the data may have moved since training (or was given relative to another folder)
            cfg = check_config(dataclasses.replace(cfg, **{
                n: getattr(args, n) for n in DECODING_FIELDS + ("data_dir",) if flag_given(getattr(args, n))}))
        else:
            task = TASKS[args.task or "words"]
            check_task_arguments(args, task)
            params, cfg, normalisation = None, config_from_args(args), None
        for flag, path in (("--lm", args.lm_file), ("--dictionary", args.dictionary_file)):
            if path == "":
                raise UserError(f"{flag} '': the path is empty")
        check_tuning_arguments(args, cfg)
        check_lm_files(cfg)
        check_init_model(cfg)
        if args.export_iam_ondb:
            check_export_folder(args.export_iam_ondb)
            export_lines_task(cfg, args.export_iam_ondb, log)
            return 0
        experiment = None
        if args.lexicon_sizes:
            experiment = functools.partial(lexicon_experiment, sizes=args.lexicon_sizes)
        elif args.dictionary_sizes:
            experiment = functools.partial(dictionary_experiment, sizes=args.dictionary_sizes,
                                           split=args.experiment_split or "test")
        checkpoint = None
        if args.save_model and params is None and output_target(args.save_model, "model file")[0] == "file":
            checkpoint = checkpoint_path(args.save_model)
            if output_target(checkpoint, "checkpoint")[0] != "file":  # reading or rewriting a FIFO would block
                raise UserError(f"checkpoint {checkpoint!r} is a FIFO or a device, not a regular file; "
                                "move it or choose another --save-model")
            check_writable(checkpoint, "checkpoint")
        params, result = train_and_evaluate(cfg, params, verbose=not args.quiet, log=log, status=status,
                                            experiment=experiment, dictionary_size=max(args.dictionary_sizes or [0]),
                                            checkpoint_to=checkpoint, resume=args.resume, normalisation=normalisation)
        cfg = RunConfig(**result["config"])  # iam-ondb: with the alphabet read from the data
        print_summary(result, task, log)
        outputs = []
        if args.save_model:
            outputs.append((args.save_model, model_bytes(params, cfg, result["input"]), "model file"))
        if args.save_json:
            outputs.append((args.save_json, json_bytes(run_json(result)), "run summary"))
        status["where"] = "while writing results"
        written = write_results(outputs, log)
        if checkpoint and args.save_model in written and os.path.exists(checkpoint):
            os.unlink(checkpoint)  # the model file now holds what the checkpoint was kept for
    except UserError as e:
        print(f"iam_handwriting.py: error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"iam_handwriting.py: error: {e}; nothing written{kept_checkpoint(args)}", file=sys.stderr)
        return 3
    except WorkerLost as e:
        print(f"iam_handwriting.py: error: {e} {status['where']}; nothing written{kept_checkpoint(args)}",
              file=sys.stderr)
        return 4
    except (KeyboardInterrupt, Terminated) as e:
        print(f"iam_handwriting.py: interrupted {status['where']}; nothing written{kept_checkpoint(args)}",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return 0


if __name__ == "__main__":
    sys.exit(main())
