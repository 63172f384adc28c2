"""Bidirectional LSTM + CTC reading synthetic online handwriting, in numpy.

A scaled-down reproduction of Graves, Liwicki, Fernandez, Bertolami, Bunke and
Schmidhuber, "A Novel Connectionist System for Unconstrained Handwriting
Recognition", IEEE TPAMI 31(5), 2009: a bidirectional LSTM with a
connectionist temporal classification (CTC) output layer reads unsegmented pen
trajectories and emits character sequences, with no segmentation step.

What is scaled down, and why:
- Data. The IAM-OnDB / IAM-DB corpora cannot be downloaded here, so words are
  drawn by a numpy renderer from a 10-letter stroke alphabet ("colitnmaeu") and
  a 47-word vocabulary; per-word slant and per-point jitter stand in for
  different writers. Input is 3 features per pen sample (dx, dy, pen_up), not
  the paper's 25.
- Model. One BLSTM layer of 64 cells per direction by default (the paper's
  networks are larger); stacked layers and a unidirectional baseline are
  flags.
- Decoding. Greedy best-path decoding by default. Prefix beam search and a
  dictionary-constrained decoder (the single-word case of the paper's token
  passing) are in the decoding section; there is no bigram language model.

Everything below is hand-written numpy: the LSTM forward pass and
back-propagation through time, the log-space CTC forward-backward, the
decoders and Adam.

Shapes: T time steps, B batch, D input features, H hidden units per direction,
R directions (1 or 2), K classes (blank + 10 letters), L label length,
S = 2L + 1 extended labels.

Usage:
    python iam_handwriting.py --seed 0 --save-json run.json   # headline run
    python iam_handwriting.py --quick --save-json run.json    # CI smoke run
    python iam_handwriting.py --save-model model.npz          # keep the weights
    python iam_handwriting.py --load-model model.npz          # evaluate only
    python iam_handwriting.py --load-model model.npz --lexicon-sizes 47,100,1000,10000
                                                              # the lexicon-size experiment
    python iam_handwriting.py --help                          # every flag
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

if __name__ == "__main__":
    # One BLAS thread, set before numpy loads BLAS. Measured: faster here (the
    # matrices are small; two threads add 6% wall and double the CPU time), and
    # float32 matmul results depend on the BLAS thread count, so this keeps a
    # seed's metrics the same on machines with different numbers of cores.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

# ---------------------------------------------------------------------------
# Constants and configuration
# ---------------------------------------------------------------------------

ALPHABET = "colitnmaeu"
BLANK = 0
N_CLASSES = 1 + len(ALPHABET)  # K: blank + letters
IN_DIM = 3  # (dx, dy, pen_up)

# The 47 words of the earlier study, kept so results stay comparable.
VOCAB = (
    "ant ill tan lot mit nan tic tin out ate eat tea ice lit non nun men mat "
    "net moo moon loom noon name nice cone tone lane amen main mine lent tent "
    "team lime time mile tail lion into icon actin tonic milne linen matte atone"
).split()

SCHEMA_VERSION = 1


@dataclass
class RunConfig:
    """Every hyperparameter of a run. The defaults are the headline run."""

    seed: int = 0  # root of every random stream (split, data, init, shuffle, eval)
    # data
    word_repeats: int = 6  # renderings of each training word per epoch
    eval_repeats: int = 8  # fresh renderings of each word for evaluation
    holdout_frac: float = 0.2  # share of VOCAB held out for the compositional test
    jitter: float = 0.014  # std of per-point Gaussian pen jitter (unit-box units)
    slant_max: float = 0.15  # per-word shear x += slant * y, slant ~ U(-max, max)
    input_gain: float = 12.0  # one sample spacing of pen movement enters the network as this (README)
    # model
    hidden: int = 64  # H, LSTM cells per direction
    layers: int = 1  # stacked (B)LSTM layers
    bidirectional: bool = True  # False: the forward-only baseline
    dtype: str = "float32"  # training precision (gradient checks use float64)
    # optimisation
    epochs: int = 10  # passes over the freshly rendered training set
    batch_size: int = 4  # sequences per Adam step
    lr: float = 1e-2  # Adam step size at the start
    lr_final: float = 0.1  # the step size decays linearly to lr * lr_final by the last step
    grad_clip: float = 5.0  # global-norm gradient clip
    # decoding
    decoder: str = "greedy"  # how the final evaluation decodes: greedy, beam, lexicon
    beam_width: int = 16  # prefixes kept by the beam decoder


QUICK_OVERRIDES = dict(hidden=32, epochs=6, batch_size=8)  # --quick: a CI smoke run of under 2 s


# ---------------------------------------------------------------------------
# Synthetic handwriting
# ---------------------------------------------------------------------------
# Glyphs live in a unit box: baseline y = 0, x-height 0.5, ascenders up to 0.9.
# Each glyph is a list of strokes (dense polylines) and an advance width.

SAMPLE_SPACING = 0.085  # pen samples are this far apart along the ink
LETTER_GAP = 0.08  # blank space between consecutive glyph boxes


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


def _resample(polyline, spacing):
    """Evenly spaced points along a polyline: (n, 2) with n = ink length / spacing + 1."""
    seg = np.linalg.norm(np.diff(polyline, axis=0), axis=1)
    arclen = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(round(arclen[-1] / spacing)) + 1)
    s = np.linspace(0.0, arclen[-1], n)
    return np.stack([np.interp(s, arclen, polyline[:, 0]), np.interp(s, arclen, polyline[:, 1])], axis=1)


@dataclass(frozen=True)
class Glyph:
    points: np.ndarray  # (n, 2) pen samples of all strokes, in drawing order
    stroke_start: np.ndarray  # (n,) 1.0 on the first sample of each stroke
    width: float  # advance before the letter gap


def _make_glyph(strokes, width):
    pts = [_resample(s, SAMPLE_SPACING) for s in strokes]
    starts = [np.eye(1, len(p)).ravel() for p in pts]
    return Glyph(np.concatenate(pts), np.concatenate(starts), width)


GLYPHS = {c: _make_glyph(*GLYPH_STROKES[c]) for c in ALPHABET}


@dataclass
class Rendering:
    """One handwritten word."""

    word: str
    traj: np.ndarray  # (T, 3) float64 (dx, dy, pen_up); dx, dy of the first sample are 0
    labels: list  # class ids, 1 + ALPHABET.index(c)
    xy: np.ndarray  # (T, 2) absolute pen positions
    char_of: np.ndarray  # (T,) index into `word` of the character each sample draws


def encode(word):
    """Class ids of a word; ValueError naming any character outside ALPHABET."""
    bad = sorted({c for c in word if c not in ALPHABET})
    if bad:
        raise ValueError(f"characters {''.join(bad)!r} in {word!r} are not in the alphabet {ALPHABET!r}")
    return [1 + ALPHABET.index(c) for c in word]


def decode_labels(labels):
    """Inverse of `encode` for class ids 1..K-1."""
    return "".join(ALPHABET[k - 1] for k in labels)


def render_word(word, rng, jitter=0.014, slant_max=0.15):
    """Draw `word` with one random slant and per-point Gaussian jitter.

    Glyph templates are placed left to right (advance = width + LETTER_GAP),
    sheared by x += slant * y, then every sample is jittered.
    """
    labels = encode(word)
    glyphs = [GLYPHS[c] for c in word]
    offsets = np.cumsum([0.0] + [g.width + LETTER_GAP for g in glyphs[:-1]])
    xy = np.concatenate([g.points + (dx, 0.0) for g, dx in zip(glyphs, offsets)])  # (T, 2)
    pen_up = np.concatenate([g.stroke_start for g in glyphs])  # (T,)
    char_of = np.repeat(np.arange(len(word)), [len(g.points) for g in glyphs])  # (T,)
    slant = rng.uniform(-slant_max, slant_max)
    xy[:, 0] += slant * xy[:, 1]
    xy += rng.normal(0.0, jitter, size=xy.shape)
    dxy = np.diff(xy, axis=0, prepend=xy[:1])  # (T, 2)
    traj = np.column_stack([dxy, pen_up])
    return Rendering(word, traj, labels, xy, char_of)


def render_words(words, repeats, rng, cfg):
    """`repeats` fresh renderings of every word, word-major order."""
    return [render_word(w, rng, cfg.jitter, cfg.slant_max) for w in words for _ in range(repeats)]


def split_vocab(rng, holdout_frac):
    """(training words, held-out words): a seeded permutation of VOCAB."""
    n_held = int(round(holdout_frac * len(VOCAB)))
    order = rng.permutation(len(VOCAB))
    held = sorted(VOCAB[i] for i in order[:n_held])
    return [w for w in VOCAB if w not in held], held


def pad_batch(renderings, input_gain, dtype=np.float64):
    """Stack trajectories into zero-padded network inputs.

    Pen steps are scaled so that one sample spacing reads as `input_gain`;
    pen_up stays 0/1. Returns X (T, B, 3) and lengths (B,).
    """
    lengths = np.array([len(r.traj) for r in renderings])
    T, B = int(lengths.max()), len(renderings)
    X = np.zeros((T, B, IN_DIM), dtype=dtype)
    time_idx = np.concatenate([np.arange(n) for n in lengths])
    batch_idx = np.repeat(np.arange(B), lengths)
    scale = np.array([input_gain / SAMPLE_SPACING, input_gain / SAMPLE_SPACING, 1.0])
    X[time_idx, batch_idx] = np.concatenate([r.traj for r in renderings]) * scale
    return X, lengths


# ---------------------------------------------------------------------------
# BLSTM
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


def init_params(rng, hidden=64, layers=1, bidirectional=True, in_dim=IN_DIM, n_classes=N_CLASSES):
    """Uniform(+-1/sqrt(H)) weights, zero biases except the forget gate at 1.0."""
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
    dZ = np.empty_like(A)  # dLoss / dz divided by k, (R, T, B, 4H)
    d_act = np.empty((R, B, 4 * H), A.dtype)  # dLoss / d[i, f, g, o]
    dh_next = np.zeros((R, B, H), A.dtype)
    dc_next = np.zeros((R, B, H), A.dtype)
    c_zero = np.zeros((R, B, H), A.dtype)
    for t in reversed(range(T)):
        a, tc, dz = A[:, t], TC[:, t], dZ[:, t]
        dh = dHs[:, t] + dh_next
        # dc_t = dh_t * o * (1 - tanh(c_t)^2) + dc_{t+1} * f_{t+1}
        dc = tc * tc
        np.subtract(1.0, dc, out=dc)
        dc *= a[..., 3 * H:]
        dc *= dh
        dc += dc_next
        np.multiply(dc, a[..., 2 * H:3 * H], out=d_act[..., :H])  # di = dc * g
        np.multiply(dc, C[:, t - 1] if t else c_zero, out=d_act[..., H:2 * H])  # df = dc * c_{t-1}
        np.multiply(dc, a[..., :H], out=d_act[..., 2 * H:3 * H])  # dg = dc * i
        np.multiply(dh, tc, out=d_act[..., 3 * H:])  # do = dh * tanh(c)
        np.multiply(U[:, t], U[:, t], out=dz)
        np.subtract(1.0, dz, out=dz)
        dz *= d_act
        dh_next = dz @ WhT_k
        dc_next = dc * a[..., H:2 * H]
    # Weight gradients: one matmul over all time steps each (h_{-1} = 0).
    dZ_flat = dZ.reshape(R, T * B, 4 * H)
    dWx = (X.reshape(R, T * B, D).transpose(0, 2, 1) @ dZ_flat) * k
    dWh = (Hs[:, :-1].reshape(R, (T - 1) * B, H).transpose(0, 2, 1)
           @ dZ[:, 1:].reshape(R, (T - 1) * B, 4 * H)) * k
    db = dZ_flat.sum(axis=1) * k
    dX = (dZ_flat @ (Wx * k).transpose(0, 2, 1)).reshape(R, T, B, D)
    return dX, (dWx, dWh, db)


def forward(params, X, lengths):
    """BLSTM -> linear -> log-softmax.

    X (T, B, D), lengths (B,). Returns log_probs (T, B, K) and a cache for
    `backward`. Rows beyond a sequence's length are finite but meaningless.
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
        layer_caches.append((inp, lc))
        inp = np.concatenate(outs, axis=-1)  # (T, B, R*H)
    logits = inp @ params["out_W"] + params["out_b"]  # (T, B, K)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    mask = np.arange(T)[:, None] < lengths  # (T, B)
    return log_probs, (layer_caches, inp, rev, mask)


def backward(params, cache, grad_logits):
    """Gradients of the loss for every parameter, given dLoss/dlogits (T, B, K).

    Steps beyond each sequence's length are ignored.
    """
    layer_caches, top, rev, mask = cache
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
        dHs = np.stack([dinp[..., :H], dinp[rev, cols, H:]] if R == 2 else [dinp])  # (R, T, B, H)
        dX, (dWx, dWh, db) = lstm_backward(params[f"lstm{layer}_Wx"], params[f"lstm{layer}_Wh"], lc, dHs)
        grads[f"lstm{layer}_Wx"], grads[f"lstm{layer}_Wh"], grads[f"lstm{layer}_b"] = dWx, dWh, db
        dinp = dX[0] + dX[1][rev, cols] if R == 2 else dX[0]
    return grads


# ---------------------------------------------------------------------------
# CTC
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
        pos = np.arange(len(flat)) - np.repeat(np.cumsum(L) - L, L)
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
    """
    T, B, S = log_emit.shape
    # Two columns of -inf on the left make the s-1 and s-2 predecessors views.
    alpha = np.full((T, B, S + 2), -np.inf)
    alpha[0, :, 2:4] = log_emit[0, :, :2]  # start in the first blank or the first label
    skip_penalty = np.where(skip, 0.0, -np.inf)
    for t in range(1, T):
        prev = alpha[t - 1]
        # stay in s, or advance from s - 1 (blank <-> label) ...
        acc = np.logaddexp(prev[:, 2:], prev[:, 1:-1])
        # ... or jump over a blank from s - 2 when the two labels differ
        acc = np.logaddexp(acc, prev[:, :-2] + skip_penalty)
        np.add(acc, log_emit[t], out=alpha[t, :, 2:])
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
# Decoding and metrics
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


@dataclass(frozen=True)
class Lexicon:
    """Dictionary words as a prefix tree; node 0 is the empty prefix."""

    words: tuple  # the W words, in the order scores are reported
    label: np.ndarray  # (N,) class id of each node's last letter (BLANK at the root)
    parent: np.ndarray  # (N,) node of the prefix one letter shorter (the root is its own parent)
    skip: np.ndarray  # (N,) True where the letter differs from its parent's, so no blank is needed between
    end: np.ndarray  # (W,) node at which each word ends


def build_lexicon(words):
    """Prefix tree of `words`; ValueError for an empty lexicon, an empty word or a foreign letter."""
    words = tuple(words)
    if not words:
        raise ValueError("the lexicon is empty")
    node_of, label, parent = {"": 0}, [BLANK], [0]
    for w in words:
        if not w:
            raise ValueError("the lexicon holds an empty word")
        ids = encode(w)
        for n in range(1, len(w) + 1):
            if w[:n] not in node_of:
                node_of[w[:n]] = len(label)
                label.append(ids[n - 1])
                parent.append(node_of[w[:n - 1]])
    label, parent = np.array(label), np.array(parent)
    skip = label != label[parent]
    skip[0] = False
    return Lexicon(words, label, parent, skip, np.array([node_of[w] for w in words]))


def lexicon_log_likelihoods(log_probs, lengths, lexicon):
    """Exact CTC log p(word | x_b) for every lexicon word and sequence: (W, B).

    log_probs (T, B, K), lengths (B,). The CTC forward recursion run on the
    prefix tree instead of one chain per word (token passing restricted to
    single words): each node has a state "on its last letter" and a state "in
    a blank after it", and words sharing a prefix share its computation. The
    only Python loop is over time.
    """
    lp = np.asarray(log_probs, dtype=np.float64).transpose(0, 2, 1)  # (T, K, B)
    lengths = np.asarray(lengths)
    N, B = len(lexicon.label), lp.shape[2]
    parent = lexicon.parent
    skip_penalty = np.where(lexicon.skip, 0.0, -np.inf)[:, None]  # (N, 1)
    on_letter = np.full((N, B), -np.inf)  # log P(alignment so far spells the node, ends on its letter)
    in_blank = np.full((N, B), -np.inf)  # ... and ends in a blank after it
    in_blank[0] = 0.0  # before the first step: the empty prefix, probability one
    scores = np.full((len(lexicon.words), B), -np.inf)
    for t in range(lp.shape[0]):
        emit = lp[t, lexicon.label]  # (N, B)
        emit[0] = -np.inf  # the root has no letter to be on
        # enter a node's letter from its parent's blank, or straight from the
        # parent's letter when the two letters differ; or stay on the letter
        from_parent = np.logaddexp(in_blank[parent], on_letter[parent] + skip_penalty)
        on_letter, in_blank = (np.logaddexp(on_letter, from_parent) + emit,
                               np.logaddexp(in_blank, on_letter) + lp[t, BLANK])
        done = np.flatnonzero(lengths == t + 1)
        if len(done):
            end = lexicon.end[:, None]
            scores[:, done] = np.logaddexp(on_letter[end, done], in_blank[end, done])
    return scores


def lexicon_decode(log_probs, lexicon, word_log_prior=None):
    """The most probable dictionary word for one sequence (T, K).

    lexicon: a list of words or a Lexicon. Returns (word, log_prob) with
    log_prob the exact CTC log-likelihood of the word plus its prior, if given.
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
    out = np.full((int(lengths.max()), len(log_probs), K), -np.log(K))
    time_idx = np.concatenate([np.arange(n) for n in lengths])
    out[time_idx, np.repeat(np.arange(len(log_probs)), lengths)] = np.concatenate(log_probs)
    return out, lengths


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
# Optimiser
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
# Training and evaluation
# ---------------------------------------------------------------------------

STREAMS = ("split", "data", "init", "shuffle", "eval")


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


def make_batches(renderings, batch_size, order):
    """Consecutive chunks of `order`, each sorted by length so padding is short."""
    lengths = np.array([len(r.traj) for r in renderings])
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in chunks]


def train_step(params, adam, renderings, lr, cfg, timer):
    """Forward, CTC, backward, clip and Adam on one minibatch.

    Returns (summed nll of the usable sequences, their label count, number of
    sequences skipped for impossible alignments).
    """
    t0 = time.perf_counter()
    X, lengths = pad_batch(renderings, cfg.input_gain, params["out_W"].dtype)
    targets = [r.labels for r in renderings]
    t0 = timer.add("data", t0)
    log_probs, cache = forward(params, X, lengths)
    t0 = timer.add("forward", t0)
    nll, grad = ctc_loss(log_probs, lengths, targets)
    usable = np.isfinite(nll)
    t0 = timer.add("ctc", t0)
    n_used = int(usable.sum())
    if n_used:
        grads = backward(params, cache, grad / n_used)
        t0 = timer.add("backward", t0)
        clip_global_norm(grads, cfg.grad_clip)
        adam_step(params, grads, adam, lr)
        timer.add("optimiser", t0)
    n_chars = sum(len(t) for t, u in zip(targets, usable) if u)
    return float(nll[usable].sum()), n_chars, len(renderings) - n_used


EVAL_BATCH = 64  # measured fastest per frame for the forward pass alone
EVAL_THREADS = 2  # numpy releases the GIL in ufuncs and BLAS; batches are independent


def run_model(params, renderings, input_gain):
    """Log-probabilities for every rendering: a list of (T_i, K) float64 arrays."""
    order = np.argsort([len(r.traj) for r in renderings], kind="stable")
    chunks = [order[i:i + EVAL_BATCH] for i in range(0, len(order), EVAL_BATCH)]

    def run_chunk(idx):
        X, lengths = pad_batch([renderings[i] for i in idx], input_gain, params["out_W"].dtype)
        log_probs, _ = forward(params, X, lengths)
        return [log_probs[:n, b].astype(np.float64) for b, n in enumerate(lengths)]

    out = [None] * len(renderings)
    with ThreadPoolExecutor(EVAL_THREADS) as pool:
        for idx, lps in zip(chunks, pool.map(run_chunk, chunks)):
            for i, lp in zip(idx, lps):
                out[i] = lp
    return out


def word_metrics(renderings, words):
    """Corpus CER (total edits / total characters) and exact-match word accuracy."""
    edits = sum(levenshtein(r.word, w) for r, w in zip(renderings, words))
    return {"cer": edits / sum(len(r.word) for r in renderings),
            "word_acc": float(np.mean([r.word == w for r, w in zip(renderings, words)]))}


def evaluate(params, renderings, input_gain, decode=None):
    """Loss, CER and word accuracy of one evaluation set.

    `decode` (from make_decoder) maps a list of (T_i, K) log-prob arrays to
    words; greedy by default. Returns (metrics, per-rendering log-probs, words).
    """
    log_probs = run_model(params, renderings, input_gain)
    nll = -ctc_log_likelihood(*pad_log_probs(log_probs), [r.labels for r in renderings])
    words = (decode or make_decoder("greedy"))(log_probs)
    finite = np.isfinite(nll)
    n_chars = sum(len(r.word) for r, f in zip(renderings, finite) if f)
    return {**word_metrics(renderings, words), "loss": float(nll[finite].sum() / max(n_chars, 1))}, log_probs, words


def make_eval_sets(cfg, streams):
    train_words, held_out = split_vocab(streams["split"], cfg.holdout_frac)
    eval_sets = {
        "in_vocab": render_words(train_words, cfg.eval_repeats, streams["eval"], cfg),
        "held_out": render_words(held_out, cfg.eval_repeats, streams["eval"], cfg),
    }
    return train_words, held_out, eval_sets


def pick_alignment_words(train_words):
    """A short and a long in-vocab word for alignment pictures ('ant', 'actin' when possible)."""
    short = "ant" if "ant" in train_words else min(train_words, key=len)
    long = "actin" if "actin" in train_words else max(train_words, key=len)
    return short, long


def alignment_record(rendering, log_probs):
    path = np.argmax(log_probs, axis=1)
    decoded = decode_labels(greedy_decode(log_probs[:, None, :], [len(log_probs)])[0])
    return {
        "word": rendering.word,
        "xy": rendering.xy.round(5).tolist(),
        "traj": rendering.traj.round(5).tolist(),
        "char_of": rendering.char_of.tolist(),
        "log_probs": log_probs.round(4).tolist(),
        "argmax_path": path.tolist(),
        "decoded": decoded,
        "cer": cer(decoded, rendering.word),
    }


def final_report(params, cfg, eval_sets, train_words, timer):
    """The evaluation part of run.json: final metrics, per word, predictions, alignments."""
    t0 = time.perf_counter()
    decode = make_decoder(cfg.decoder, cfg.beam_width)
    final, per_word, predictions, alignments = {}, {}, [], []
    lp_of = {}
    for split, renders in eval_sets.items():
        metrics, log_probs, words = evaluate(params, renders, cfg.input_gain, decode)
        final[split] = metrics
        for r, w, lp in zip(renders, words, log_probs):
            predictions.append({"word": r.word, "split": split, "decoded": w})
            entry = per_word.setdefault(r.word, {"split": split, "n": 0, "edits": 0, "correct": 0})
            entry["n"] += 1
            entry["edits"] += levenshtein(r.word, w)
            entry["correct"] += int(r.word == w)
            lp_of.setdefault(r.word, (r, lp))
    for w, e in per_word.items():
        e["cer"] = e["edits"] / (e["n"] * len(w))
        e["word_acc"] = e["correct"] / e["n"]
    for w in pick_alignment_words(train_words):
        alignments.append(alignment_record(*lp_of[w]))
    timer.add("evaluation", t0)
    return {"final": final, "per_word": per_word, "predictions": predictions, "alignments": alignments}


DECODERS = ("greedy", "beam", "lexicon")


def make_decoder(name, beam_width=16, lexicon=VOCAB):
    """A function from a list of (T_i, K) log-prob arrays to decoded words.

    The lexicon decoder's default dictionary is the whole vocabulary, held-out
    words included, as in the paper (test words are in the dictionary).
    """
    if name == "greedy":
        return lambda lps: [decode_labels(d) for d in greedy_decode(*pad_log_probs(lps))]
    if name == "beam":
        return lambda lps: [decode_labels(beam_search_decode(lp, beam_width)[0]) for lp in lps]
    if name == "lexicon":
        lex = build_lexicon(lexicon)
        return lambda lps: lexicon_decode_many(lps, lex)
    raise ValueError(f"unknown decoder {name!r}; choose from {DECODERS}")


def lexicon_experiment(params, cfg, sizes, log=print):
    """Greedy, beam and lexicon decoding of every evaluation word against
    lexicons of the given sizes: the 47 vocabulary words (held-out words
    included) plus distractor pseudo-words. Returns run.json's `decoding`."""
    t_start = time.perf_counter()
    _, _, eval_sets = make_eval_sets(cfg, make_streams(cfg.seed))
    log_probs = {split: run_model(params, renders, cfg.input_gain) for split, renders in eval_sets.items()}

    def timed(split, decode):
        t0 = time.perf_counter()
        words = decode(log_probs[split])
        seconds = time.perf_counter() - t0
        n = len(eval_sets[split])
        return {**word_metrics(eval_sets[split], words), "seconds_per_word": seconds / n, "n_words": n}

    fixed = {(d, split): timed(split, make_decoder(d, cfg.beam_width))
             for d in ("greedy", "beam") for split in eval_sets}
    distractors = distractor_words(max(sizes) - len(VOCAB))
    rows = []
    for size in sizes:
        decode = make_decoder("lexicon", lexicon=VOCAB + distractors[:size - len(VOCAB)])
        for split in eval_sets:
            found = {"greedy": fixed["greedy", split], "beam": fixed["beam", split], "lexicon": timed(split, decode)}
            rows += [{"lexicon_size": size, "decoder": d, "split": split, **m} for d, m in found.items()]
    decoding = {"lexicon_sizes": list(sizes), "beam_width": cfg.beam_width, "rows": rows,
                "seconds": time.perf_counter() - t_start}
    log(format_decoding(decoding))
    return decoding


def format_decoding(decoding):
    lines = [f"{'lexicon':>8} {'decoder':>8}   {'in-vocab CER':>12} {'acc':>6}   "
             f"{'held-out CER':>12} {'acc':>6}   {'ms/word':>8}"]
    by_key = {(r["lexicon_size"], r["decoder"], r["split"]): r for r in decoding["rows"]}
    for size in decoding["lexicon_sizes"]:
        for d in DECODERS:
            iv, ho = by_key[size, d, "in_vocab"], by_key[size, d, "held_out"]
            seconds = iv["seconds_per_word"] * iv["n_words"] + ho["seconds_per_word"] * ho["n_words"]
            ms = 1e3 * seconds / (iv["n_words"] + ho["n_words"])
            lines.append(f"{size:8d} {d:>8}   {iv['cer']:12.4f} {iv['word_acc']:6.3f}   "
                         f"{ho['cer']:12.4f} {ho['word_acc']:6.3f}   {ms:8.2f}")
    lines.append(f"decoding experiment: {decoding['seconds']:.1f}s")
    return "\n".join(lines)


def fit(cfg, streams, train_words, eval_sets, timer, verbose=True, log=print):
    """The training loop: fresh renderings every epoch, minibatch Adam, and an
    evaluation of both splits after each epoch. Returns (params, history,
    number of sequences skipped for impossible alignments)."""
    dtype = np.dtype(cfg.dtype)
    params = {k: v.astype(dtype) for k, v in init_params(
        streams["init"], cfg.hidden, cfg.layers, cfg.bidirectional).items()}
    adam = adam_init(params)
    total_steps = cfg.epochs * -(-len(train_words) * cfg.word_repeats // cfg.batch_size)
    history, skipped = [], 0
    for epoch in range(1, cfg.epochs + 1):
        e0 = time.perf_counter()
        t0 = time.perf_counter()
        renders = render_words(train_words, cfg.word_repeats, streams["data"], cfg)
        order = streams["shuffle"].permutation(len(renders))
        timer.add("data", t0)
        loss_sum, n_chars = 0.0, 0
        for idx in make_batches(renders, cfg.batch_size, order):
            lr = learning_rate(cfg, adam["t"], total_steps)
            s, n, k = train_step(params, adam, [renders[i] for i in idx], lr, cfg, timer)
            loss_sum, n_chars, skipped = loss_sum + s, n_chars + n, skipped + k
        t0 = time.perf_counter()
        entry = {"epoch": epoch, "train_loss": loss_sum / max(n_chars, 1)}
        for split, renders_eval in eval_sets.items():
            entry[split] = evaluate(params, renders_eval, cfg.input_gain)[0]
        timer.add("evaluation", t0)
        entry["seconds"] = time.perf_counter() - e0
        history.append(entry)
        if verbose:
            log(format_epoch(entry, cfg.epochs))
    return params, history, skipped


def train_and_evaluate(cfg, params=None, verbose=True, log=print):
    """Train a model as configured (or, given `params`, only evaluate them) and report.

    Returns (params, result): result is what run.json holds, less
    schema_version and env (see run_json).
    """
    wall0 = time.perf_counter()
    timer = Timer()
    streams = make_streams(cfg.seed)
    t0 = time.perf_counter()
    train_words, held_out, eval_sets = make_eval_sets(cfg, streams)
    timer.add("data", t0)
    history, skipped = [], 0
    if params is None:
        params, history, skipped = fit(cfg, streams, train_words, eval_sets, timer, verbose, log)
    result = {"config": dataclasses.asdict(cfg), "history": history,
              **final_report(params, cfg, eval_sets, train_words, timer),
              "split": {"train_words": train_words, "held_out_words": held_out},
              "timing": timer.seconds, "skipped": skipped}
    result["wall_seconds"] = time.perf_counter() - wall0
    return params, result


def train(cfg, verbose=True):
    """Train as configured; returns what run.json holds, as a dict."""
    return run_json(train_and_evaluate(cfg, verbose=verbose)[1])


def format_epoch(e, n_epochs):
    iv, ho = e["in_vocab"], e["held_out"]
    return (f"epoch {e['epoch']:3d}/{n_epochs}  loss {e['train_loss']:.4f}  "
            f"in-vocab CER {iv['cer']:.4f} acc {iv['word_acc']:.3f}  "
            f"held-out CER {ho['cer']:.4f} acc {ho['word_acc']:.3f}  {e['seconds']:.2f}s")


# ---------------------------------------------------------------------------
# run.json, model files and CLI
# ---------------------------------------------------------------------------


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of unmapping it.

    Each forward pass allocates its caches afresh (a few MB). By default glibc
    returns such blocks to the kernel on free, and faulting the pages back in
    on the next step costs more than the arithmetic at small batch sizes
    (README, Performance). A no-op where libc has no mallopt.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 25) and mallopt(M_TRIM_THRESHOLD, 1 << 30))


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


def atomic_write(path, data: bytes):
    """Write via a temporary file in the same folder, then rename over `path`.

    A reader never sees a half-written file, and an interrupted run leaves the
    previous file intact. The file gets the usual umask-based permissions.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private (0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _file_in_the_way(folder):
    """The nearest existing ancestor of `folder` (itself included) if it is a file, else None."""
    p = os.path.abspath(folder)
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p if os.path.lexists(p) and not os.path.isdir(p) else None


def check_folder_writable(folder, what):
    """Create `folder` if needed and prove a file can be written in it; UserError if not."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        blocker = _file_in_the_way(folder)
        reason = f"{blocker!r} is a file, not a folder" if blocker else (e.strerror or str(e))
        raise UserError(f"cannot write {what}: {reason}") from None


def check_writable(path, what):
    """Fail before any work, not after it, if the file `path` cannot be written."""
    if os.path.isdir(path):
        raise UserError(f"cannot write {what} {path!r}: it is a folder")
    check_folder_writable(os.path.dirname(os.path.abspath(path)), f"{what} {path!r}")


def env_info():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "git_commit": commit}


def run_json(result):
    """Order the keys of run.json and add schema and environment."""
    doc = {"schema_version": SCHEMA_VERSION, "config": result["config"], "env": env_info()}
    doc.update({k: v for k, v in result.items() if k != "config"})
    return doc


def save_json(path, doc):
    atomic_write(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())


def save_model(path, params, cfg):
    """npz of the parameter arrays plus the config as a JSON string."""
    buf = io.BytesIO()
    np.savez(buf, __config__=np.array(json.dumps(dataclasses.asdict(cfg))), **params)
    atomic_write(path, buf.getvalue())


def check_config(cfg):
    """cfg itself if every field has a usable value, else ValueError naming the first that has not."""
    checks = {
        "hidden": cfg.hidden >= 1, "layers": cfg.layers >= 1, "epochs": cfg.epochs >= 0,
        "batch_size": cfg.batch_size >= 1, "lr": cfg.lr > 0, "lr_final": cfg.lr_final >= 0,
        "grad_clip": cfg.grad_clip > 0, "word_repeats": cfg.word_repeats >= 1, "eval_repeats": cfg.eval_repeats >= 1,
        "holdout_frac": 0 < cfg.holdout_frac < 1, "jitter": cfg.jitter >= 0, "slant_max": cfg.slant_max >= 0,
        "input_gain": cfg.input_gain > 0, "dtype": cfg.dtype in ("float32", "float64"),
        "decoder": cfg.decoder in DECODERS, "beam_width": cfg.beam_width >= 1,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{bad[0]} = {getattr(cfg, bad[0])!r} is out of range")
    return cfg


def load_model(path):
    """(params, RunConfig) from save_model's file; UserError if missing or corrupt."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise UserError(f"model file {path!r} does not exist (make one with --save-model)") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"model file {path!r} is not a readable npz: {e}") from None
    try:
        cfg = check_config(RunConfig(**json.loads(str(arrays.pop("__config__")))))
        expected = init_params(np.random.default_rng(0), cfg.hidden, cfg.layers, cfg.bidirectional)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"model file {path!r} has no valid config: {e}") from None
    if {k: v.shape for k, v in arrays.items()} != {k: v.shape for k, v in expected.items()}:
        raise UserError(f"model file {path!r} does not hold the parameters its config describes")
    if not all(v.dtype.kind == "f" and np.isfinite(v).all() for v in arrays.values()):
        raise UserError(f"model file {path!r} holds weights that are not finite floating-point numbers")
    return {k: v.astype(cfg.dtype) for k, v in arrays.items()}, cfg


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


MAX_LEXICON = 100_000  # distinct 3-5 letter strings over 10 letters: 111,000


def _lexicon_sizes(text):
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    bad = [n for n in sizes if not len(VOCAB) <= n <= MAX_LEXICON]
    if bad:
        raise argparse.ArgumentTypeError(f"sizes must lie in {len(VOCAB)}..{MAX_LEXICON} (the lexicon holds "
                                         f"the {len(VOCAB)} vocabulary words), got {bad[0]}")
    return sorted(set(sizes))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


TRAINING_FLAGS = ("seed", "hidden", "layers", "unidirectional", "epochs", "batch_size", "lr", "quick")


def build_parser():
    p = OneLineParser(prog="iam_handwriting.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=_int_at_least(0), default=None, help="root random seed (default 0)")
    p.add_argument("--quick", action="store_true", help=f"CI smoke preset: {QUICK_OVERRIDES}")
    p.add_argument("--epochs", type=_int_at_least(0), default=None,
                   help=f"training epochs (default {RunConfig.epochs})")
    p.add_argument("--hidden", type=_int_at_least(1), default=None,
                   help=f"LSTM cells per direction (default {RunConfig.hidden})")
    p.add_argument("--layers", type=_int_at_least(1), default=None, help="stacked BLSTM layers (default 1)")
    p.add_argument("--unidirectional", action="store_true", help="forward-only LSTM baseline")
    p.add_argument("--batch-size", type=_int_at_least(1), default=None,
                   help=f"sequences per Adam step (default {RunConfig.batch_size})")
    p.add_argument("--lr", type=_positive_float, default=None, help=f"Adam learning rate (default {RunConfig.lr})")
    p.add_argument("--decoder", choices=DECODERS, default=None,
                   help="how the final evaluation decodes: best path, prefix beam search, or the most probable "
                        "of the 47 vocabulary words (default greedy)")
    p.add_argument("--beam-width", type=_int_at_least(1), default=None,
                   help=f"prefixes kept by the beam decoder (default {RunConfig.beam_width})")
    p.add_argument("--lexicon-sizes", type=_lexicon_sizes, default=None, metavar="N,N,...",
                   help=f"after training or loading, decode with lexicons of these sizes (>= {len(VOCAB)}: "
                        "the vocabulary plus pseudo-word distractors), e.g. 47,100,1000,10000")
    p.add_argument("--save-json", metavar="PATH", help="write the run summary (run.json) here")
    p.add_argument("--save-model", metavar="PATH", help="write the trained parameters and config (npz) here")
    p.add_argument("--load-model", metavar="PATH", help="evaluate this saved model instead of training")
    p.add_argument("--quiet", action="store_true", help="no per-epoch log lines")
    return p


def config_from_args(args):
    overrides = dict(QUICK_OVERRIDES) if args.quick else {}
    for name in ("seed", "epochs", "hidden", "layers", "batch_size", "lr", "decoder", "beam_width"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.unidirectional:
        overrides["bidirectional"] = False
    return RunConfig(**overrides)


def print_summary(result, log=print):
    for split, m in result["final"].items():
        log(f"final {split:8s}  CER {m['cer']:.4f}  word acc {m['word_acc']:.3f}  loss/char {m['loss']:.4f}")
    log(f"wall {result['wall_seconds']:.2f}s  skipped {result['skipped']}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        for path, what in ((args.save_json, "run summary"), (args.save_model, "model file")):
            if path:
                check_writable(path, what)
        if args.load_model:
            given = [f"--{n.replace('_', '-')}" for n in TRAINING_FLAGS if getattr(args, n) not in (None, False)]
            if given:
                raise UserError(f"{', '.join(given)} cannot be combined with --load-model "
                                "(the model file holds its config)")
            params, cfg = load_model(args.load_model)
            cfg = dataclasses.replace(cfg, **{n: getattr(args, n) for n in ("decoder", "beam_width")
                                              if getattr(args, n) is not None})
            params, result = train_and_evaluate(cfg, params)
        else:
            cfg = config_from_args(args)
            params, result = train_and_evaluate(cfg, verbose=not args.quiet)
        print_summary(result)
        if args.lexicon_sizes:
            result["decoding"] = lexicon_experiment(params, cfg, args.lexicon_sizes)
        if args.save_model:
            save_model(args.save_model, params, cfg)
        if args.save_json:
            save_json(args.save_json, run_json(result))
    except UserError as e:
        print(f"iam_handwriting.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
