"""A PyTorch peer of iam_handwriting.py's BLSTM + CTC training, for benchmarks only.

The peer is the project's network written as a PyTorch user would write it:
`nn.LSTM` (per layer a pair of one-way LSTMs, the second reading every
sequence reversed within its own length, or with --torch-lstm bidirectional one
bidirectional `nn.LSTM` over a packed batch), `nn.Linear` to the K classes
(blank = class 0), `F.log_softmax`, `F.ctc_loss` summed over the batch and
divided by the number of sequences (the project's normalisation: the gradient
of the mean per-line negative log-likelihood), a global-norm clip at
cfg.grad_clip and `torch.optim.Adam` under the project's linear learning-rate
schedule. It reads the project's batches: `pad_batch` (the same shift, scale
and squash), `make_batches` (the same bucketing and shuffle), and sequences
whose labels cannot fit their length are skipped as `train_step` skips them.

Three modes (run from the repository root, with a Python that has torch; torch
is a benchmark-only dependency, never needed by the project or its tests):

    python benchmarks/torch_peer.py --check                # the peer computes the project's function
    python benchmarks/torch_peer.py                        # step: one training step, project vs torch
    python benchmarks/torch_peer.py --threads 2 --workers 2 --steps 40
    python benchmarks/torch_peer.py --data-dir DIR         # step, on real IAM-OnDB training batches
    python benchmarks/torch_peer.py train --data-dir DIR --save-json torch.json

step (default) times one training step (pad, forward, CTC, backward, clip,
Adam) at IAM-OnDB scale, the project's `train_step` (with `--workers`
processes, `ih.Pool`) and the torch peer's (with `--threads` intra-op threads)
alternated in one process on the same batches: project, torch, project, ...
Batches are synthetic by default (B = 8, T 680-720, D = 25 unit-variance
features normalised as iam-ondb's graves25, K = 81, labels of 30), or real
IAM-OnDB training lines with --data-dir. It prints the median, min and max ms
per step of each side and the ratio project / torch. The process is set up as
the CLI sets itself up (one BLAS thread for numpy, freed memory kept); to run
without this machine's OpenBLAS core-type override, unset it in the command
alone:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/torch_peer.py

train trains the peer on the real IAM-OnDB as the project's iam-ondb defaults
train (the same features and normalisation, initial weights drawn by the
project's init_params from the same seed, batches, bucketing, shuffle order,
learning-rate schedule and early stopping), evaluates the validation greedy
CER after every epoch with the project's greedy decoder and CER on the torch
log-probabilities, and logs epoch, train loss (per character, as the project),
validation CER and the cumulative wall time. That time is the sum of the
epochs' seconds, each (as run.json's history "seconds") the epoch's training
steps and its validation pass; loading and featurising the data is not in it.
--save-json writes the history and the wall time to the first validation CER
at or below --target-cer (0.25) and to the best. The test split is never
evaluated.

--check runs, in float64 on a tiny batch, the project and the peer with the
peer's weights copied from the project's params dict, and prints the largest
differences of the log-probabilities, the loss and every gradient, and of the
parameters after three clipped Adam steps.

Where nn.LSTM and torch.optim differ from the project, the peer is made to
compute the project's function exactly: the project has one bias per gate,
nn.LSTM two (bias_ih + bias_hh, entering only as their sum), so bias_hh is
held at zero outside the optimiser (else the bias would take two Adam steps
per step and count twice in the clip norm); the project's Adam adds eps to
sqrt(v) before the bias correction (the Adam paper's efficient form), torch
after it, so the peer passes eps / sqrt(1 - beta2^t) each step (with the
learning rate); and torch's clip_grad_norm_ divides by norm + 1e-6, so the clip
is written out as the project's. The project's gates use tanh(z / 2) / 2 + 1 / 2
for the sigmoid, the same function.

Timings on a shared machine vary from run to run; compare the two sides only
within one run, where they alternate.
"""
import argparse
import dataclasses
import json
import math
import os
import string
import sys
import time
from types import SimpleNamespace

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as iam_handwriting.py does when run as a script; torch.set_num_threads overrides

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import iam_handwriting as ih  # noqa: E402

ADAM_BETAS = (0.9, 0.999)  # ih.adam_step's defaults
ADAM_EPS = 1e-8
TORCH_LSTMS = ("pair", "bidirectional")


# ---------------------------------------------------------------------------
# The peer
# ---------------------------------------------------------------------------


class TorchPeer(nn.Module):
    """BLSTM (`layers` layers, `hidden` cells per direction) -> linear -> log-softmax.

    lstm "pair": per layer two one-way nn.LSTMs, the second reading each sequence
    reversed within its own length (padding trails, as in the project);
    "bidirectional": one nn.LSTM(bidirectional=True) over a packed batch.
    """

    def __init__(self, in_dim, hidden, layers, n_classes, lstm="pair"):
        super().__init__()
        self.kind, self.layers, self.hidden = lstm, layers, hidden
        if lstm == "pair":
            self.lstms = nn.ModuleList(
                nn.ModuleList(nn.LSTM(in_dim if layer == 0 else 2 * hidden, hidden) for _ in range(2))
                for layer in range(layers))
        else:
            self.lstm = nn.LSTM(in_dim, hidden, num_layers=layers, bidirectional=True)
        self.out = nn.Linear(2 * hidden, n_classes)
        for _, _, _, _, _, bias_hh in self.cells():
            with torch.no_grad():
                bias_hh.zero_()
            bias_hh.requires_grad_(False)  # one bias per gate, as the project (class docstring of the module)

    def cells(self):
        """(layer, direction, weight_ih, weight_hh, bias_ih, bias_hh) of every LSTM cell."""
        for layer in range(self.layers):
            for r in range(2):
                if self.kind == "pair":
                    m, suffix = self.lstms[layer][r], "_l0"
                else:
                    m, suffix = self.lstm, f"_l{layer}" + ("_reverse" if r else "")
                yield (layer, r, *(getattr(m, f"{name}{suffix}")
                                   for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))

    def forward(self, x, lengths):
        """x (T, B, D) zero-padded, lengths (B,) int64 on the CPU. Returns log-probs (T, B, K)."""
        T, B = x.shape[:2]
        if self.kind == "pair":
            t = torch.arange(T)[:, None]
            rev = torch.where(t < lengths, lengths - 1 - t, t)  # ih.reverse_time_index
            cols = torch.arange(B)
            h = x
            for fwd, bwd in self.lstms:
                ahead, _ = fwd(h)
                back, _ = bwd(h[rev, cols])
                h = torch.cat([ahead, back[rev, cols]], dim=-1)
        else:
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            h, _ = pad_packed_sequence(self.lstm(packed)[0], total_length=T)
        return F.log_softmax(self.out(h), dim=-1)


def load_project_params(model, params):
    """Copy a project params dict (lstm{l}_Wx (2, D, 4H), lstm{l}_Wh (2, H, 4H), lstm{l}_b (2, 4H), gate
    blocks [i, f, g, o] as nn.LSTM's; out_W (2H, K), out_b (K,)) into the peer: x @ Wx is Wx.T @ x."""
    with torch.no_grad():
        for layer, r, w_ih, w_hh, b_ih, b_hh in model.cells():
            w_ih.copy_(torch.from_numpy(np.ascontiguousarray(params[f"lstm{layer}_Wx"][r].T)))
            w_hh.copy_(torch.from_numpy(np.ascontiguousarray(params[f"lstm{layer}_Wh"][r].T)))
            b_ih.copy_(torch.from_numpy(params[f"lstm{layer}_b"][r]))
            b_hh.zero_()
        model.out.weight.copy_(torch.from_numpy(np.ascontiguousarray(params["out_W"].T)))
        model.out.bias.copy_(torch.from_numpy(params["out_b"]))


def project_layout(model, of="grad"):
    """The peer's gradients (of="grad") or weights (of="data") as a project params dict."""
    def get(t):
        return (t.grad if of == "grad" else t).detach().numpy()
    out = {}
    for layer, r, w_ih, w_hh, b_ih, _ in model.cells():
        for key, value in ((f"lstm{layer}_Wx", get(w_ih).T), (f"lstm{layer}_Wh", get(w_hh).T),
                           (f"lstm{layer}_b", get(b_ih))):
            out.setdefault(key, [None, None])[r] = value
    out = {k: np.stack(v) for k, v in out.items()}
    out["out_W"], out["out_b"] = get(model.out.weight).T, get(model.out.bias)
    return out


def make_optimizer(model, cfg):
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=ADAM_BETAS,
                            eps=ADAM_EPS)


def clip_global_norm_(params, max_norm):
    """ih.clip_global_norm: scale all gradients by max_norm / norm when norm > max_norm. Returns the norm."""
    grads = [p.grad for p in params]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    if norm > max_norm:
        torch._foreach_mul_(grads, max_norm / norm)
    return norm


def torch_train_step(model, opt, samples, lr, cfg, data, dtype=np.float32, project_eps=True):
    """ih.train_step for the peer: pad, forward, CTC, backward, clip and Adam on one minibatch.
    Returns (summed nll of the usable sequences, their label count, number skipped).
    project_eps False: torch's Adam as it comes, with a constant eps (only --check uses it)."""
    targets = [s.labels for s in samples]
    usable = ih.ctc_feasible([len(s.traj) for s in samples], targets)
    n_used = int(usable.sum())
    if n_used == 0:
        return 0.0, 0, len(samples)
    samples = [s for s, u in zip(samples, usable) if u]
    targets = [s.labels for s in samples]
    X, lengths = ih.pad_batch(samples, data.input_shift, data.input_scale, dtype, data.input_squash)
    lengths = torch.from_numpy(lengths)
    log_probs = model(torch.from_numpy(X), lengths)
    nll = F.ctc_loss(log_probs, torch.tensor([c for y in targets for c in y], dtype=torch.long), lengths,
                     torch.tensor([len(y) for y in targets], dtype=torch.long), blank=ih.BLANK, reduction="sum")
    opt.zero_grad(set_to_none=True)
    (nll / n_used).backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    norm = clip_global_norm_(params, cfg.grad_clip)
    nll_sum = float(nll.detach())
    if not (math.isfinite(nll_sum) and math.isfinite(norm)):
        raise ih.Diverged(f"{'loss' if not math.isfinite(nll_sum) else 'gradient norm'} is "
                          f"{nll_sum if not math.isfinite(nll_sum) else norm}")
    t = opt.state[params[0]]["step"] + 1 if opt.state.get(params[0]) else 1
    for group in opt.param_groups:
        group["lr"] = lr
        if project_eps:
            group["eps"] = ADAM_EPS / math.sqrt(1 - ADAM_BETAS[1] ** int(t))  # the project's eps (module docstring)
    opt.step()
    return nll_sum, sum(len(y) for y in targets), len(usable) - n_used


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def synthetic_alphabet(n):
    chars = string.ascii_letters + string.digits + string.punctuation + " "
    if n > len(chars):
        raise SystemExit(f"at most {len(chars) + 1} classes")
    return chars[:n]


def synthetic_data(rng, n, length, dim, n_classes, label_length, cfg):
    """n Samples with unit-variance random features (graves25-like), lengths uniform in `length`, random
    labels, and the input normalisation iam_ondb_data gives graves25 features."""
    alphabet = synthetic_alphabet(n_classes - 1)
    samples = []
    for _ in range(n):
        T = int(rng.integers(length[0], length[1] + 1))
        labels = rng.integers(1, n_classes, label_length).tolist()
        samples.append(ih.Sample(ih.decode_labels(labels, alphabet), rng.standard_normal((T, dim)).astype(np.float32),
                                 labels, None, None, None))
    data = SimpleNamespace(alphabet=alphabet, input_shift=np.zeros(dim),
                           input_scale=np.full(dim, cfg.input_gain * np.sqrt(2 / dim)),
                           input_squash=ih.JUMP_SQUASH * cfg.input_gain)
    return samples, data


def load_iam_ondb(cfg, streams, log=print):
    """ih.iam_ondb_data with a two-process pool for the featurising; the test split is dropped."""
    pool = ih.Pool(2)
    try:
        data = ih.iam_ondb_data(cfg, streams, pool.map, log)
    finally:
        pool.close()
    data.eval_sets.pop("test", None)  # never evaluated here
    return data


def iam_config(args, **more):
    base = dict(ih.TASKS["iam-ondb"].defaults, seed=args.seed, hidden=args.hidden, batch_size=args.batch_size)
    if args.layers:
        base["layers"] = args.layers
    base.update(more)
    return ih.RunConfig(task="iam-ondb", data_dir=args.data_dir or "", **base)


def versions(threads):
    blas = ""
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f" ({deps.get('name')} {deps.get('version')})"
    except Exception:  # noqa: BLE001 - only for the printout
        pass
    env = "  ".join(f"{v}={os.environ[v]!r}" if v in os.environ else f"{v} unset"
                    for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                              "MKL_NUM_THREADS"))
    backend = [line.split(":", 1)[1].strip() for line in torch.__config__.parallel_info().splitlines()
               if line.startswith("ATen parallel backend")]
    return (f"numpy {np.__version__}{blas}, torch {torch.__version__} ({'MKL' if torch.backends.mkl.is_available() else 'no MKL'}"
            f", {(backend or ['?'])[0]}), Python {sys.version.split()[0]}, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()} (asked {threads})\n{env}")


# ---------------------------------------------------------------------------
# --check
# ---------------------------------------------------------------------------


def check(args):
    """Exit status 1 unless the peer and the project agree to 1e-8 relative, in float64."""
    torch.set_num_threads(args.threads or 1)
    rng = np.random.default_rng(args.seed)
    D, H, K = 5, 4, 7
    worst = 0.0

    def compare(what, ref, got):
        nonlocal worst
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        diff = float(np.max(np.abs(ref - got)))
        rel = diff / max(float(np.max(np.abs(ref))), 1e-300)
        worst = max(worst, rel)
        print(f"  {what:22s} max |diff| {diff:.2e}   relative {rel:.2e}")

    # Lengths 9..16, labels with repeats; the last sample's labels cannot fit its length.
    lengths, labels = [16, 9, 13, 12, 3], [[1, 2, 2, 3], [4, 4], [5, 1, 6, 6, 6], [], [2, 2, 2]]
    samples = [ih.Sample("", rng.standard_normal((n, D)).astype(np.float32), y, None, None, None)
               for n, y in zip(lengths, labels)]
    data = SimpleNamespace(input_shift=rng.standard_normal(D), input_scale=rng.uniform(0.5, 2.0, D), input_squash=3.0)
    for layers in (1, 2):
        for kind in TORCH_LSTMS:
            print(f"{layers} layer{'s' if layers > 1 else ''}, torch-lstm {kind}, B = 4 usable + 1 skipped, "
                  f"T <= 16, D = {D}, H = {H}, K = {K}, float64:")
            params = ih.init_params(rng, H, layers, True, D, K)
            for key in params:
                if key.endswith("_b") or key == "out_b":
                    params[key] += rng.uniform(-0.5, 0.5, params[key].shape)  # the bias layout is checked too
            model = TorchPeer(D, H, layers, K, kind).double()
            load_project_params(model, params)
            got = project_layout(model, "data")
            compare("weights (round trip)", np.concatenate([v.ravel() for v in params.values()]),
                    np.concatenate([got[k].ravel() for k in params]))
            # forward, CTC, backward on the usable samples
            used = samples[:4]
            X, lens = ih.pad_batch(used, data.input_shift, data.input_scale, np.float64, data.input_squash)
            targets = [s.labels for s in used]
            grads, nll_sum, _ = ih.part_gradients(params, X, lens, targets, len(used))
            lp_ref, _ = ih.forward(params, X, lens)
            lp = model(torch.from_numpy(X), torch.from_numpy(lens))
            mask = np.arange(X.shape[0])[:, None] < lens
            compare("log-probs", lp_ref[mask], lp.detach().numpy()[mask])
            nll = F.ctc_loss(lp, torch.tensor([c for y in targets for c in y], dtype=torch.long),
                             torch.from_numpy(lens), torch.tensor([len(y) for y in targets]), blank=0, reduction="sum")
            (nll / len(used)).backward()
            compare("loss (mean nll)", [nll_sum / len(used)], [float(nll.detach()) / len(used)])
            got = project_layout(model)
            for key in params:
                compare(f"d loss / d {key}", grads[key], got[key])
            # three train steps with skipping, clipping (the norm is above 0.05) and Adam under the schedule
            norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
            cfg = ih.RunConfig(task="iam-ondb", grad_clip=min(0.05, norm / 2), lr=1e-2, lr_final=0.1, dtype="float64")
            print(f"  three train_steps: gradient norm {norm:.3f} at the first, clipped at {cfg.grad_clip:.3f}; "
                  f"lr {', '.join(f'{ih.learning_rate(cfg, s, 3):g}' for s in range(3))}")
            p_ref, adam = {k: v.copy() for k, v in params.items()}, ih.adam_init(params)
            model, plain = TorchPeer(D, H, layers, K, kind).double(), TorchPeer(D, H, layers, K, kind).double()
            load_project_params(model, params)
            load_project_params(plain, params)
            opt, plain_opt = make_optimizer(model, cfg), make_optimizer(plain, cfg)
            for step in range(3):
                lr = ih.learning_rate(cfg, step, 3)
                a = ih.train_step(p_ref, adam, samples, lr, cfg, data, ih.Timer())
                b = torch_train_step(model, opt, samples, lr, cfg, data, np.float64)
                torch_train_step(plain, plain_opt, samples, lr, cfg, data, np.float64, project_eps=False)
                if a[1:] != b[1:]:
                    print(f"  step {step + 1}: project counts {a[1:]}, peer {b[1:]}")
                    worst = math.inf
                compare(f"step {step + 1} summed nll", [a[0]], [b[0]])
            ref = np.concatenate([p_ref[k].ravel() for k in p_ref])
            got = project_layout(model, "data")
            compare("weights after 3 steps", ref, np.concatenate([got[k].ravel() for k in p_ref]))
            got = project_layout(plain, "data")
            got = np.concatenate([got[k].ravel() for k in p_ref])
            print(f"  (with torch's constant Adam eps instead, not counted: max |diff| "
                  f"{np.max(np.abs(ref - got)):.2e})")
    ok = worst <= 1e-8
    print(f"largest relative difference {worst:.2e}: {'agree' if ok else 'DISAGREE'} to 1e-8")
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# step
# ---------------------------------------------------------------------------


def summary(times):
    ms = 1e3 * np.asarray(times)
    return f"median {np.median(ms):7.1f}  min {ms.min():7.1f}  max {ms.max():7.1f} ms/step"


def step_benchmark(args):
    threads, workers = args.threads or 1, args.workers or 1
    ih.keep_freed_memory()
    torch.set_num_threads(threads)
    cfg = iam_config(args, workers=workers)
    streams = ih.make_streams(args.seed)
    n_batches = args.warmup + args.steps
    if args.data_dir:
        data = load_iam_ondb(cfg, streams)
        samples = data.training_samples(streams["data"], ih.serial_map)
        order = streams["shuffle"].permutation(len(samples))
        batches = ih.make_batches(samples, cfg.batch_size, order, ih.TASKS["iam-ondb"].bucket, streams["shuffle"])
        batches = [[samples[i] for i in idx] for idx in batches[:n_batches]]
        where = f"IAM-OnDB training batches from {args.data_dir}"
    else:
        samples, data = synthetic_data(streams["data"], n_batches * cfg.batch_size, (680, 720), args.dim,
                                       args.classes, args.label_length, cfg)
        batches = [sorted(samples[i:i + cfg.batch_size], key=lambda s: len(s.traj))
                   for i in range(0, len(samples), cfg.batch_size)]
        where = f"synthetic batches (T 680-720, D = {args.dim}, labels of {args.label_length})"
    cfg = dataclasses.replace(cfg, alphabet=data.alphabet)
    K, D = 1 + len(data.alphabet), batches[0][0].traj.shape[1]
    params = {k: v.astype(np.float32) for k, v in ih.init_params(
        streams["init"], cfg.hidden, cfg.layers, True, D, K).items()}
    adam = ih.adam_init(params)
    model = TorchPeer(D, cfg.hidden, cfg.layers, K, args.torch_lstm)
    load_project_params(model, {k: v.copy() for k, v in params.items()})
    opt = make_optimizer(model, cfg)
    print(versions(threads))
    frames = np.mean([max(len(s.traj) for s in b) for b in batches])
    print(f"{where}: B = {cfg.batch_size}, mean longest T {frames:.0f}, H = {cfg.hidden}, layers {cfg.layers}, "
          f"K = {K}, float32; project: train_step with {workers} process{'es' if workers > 1 else ''}; torch: "
          f"torch-lstm {args.torch_lstm}, {threads} thread{'s' if threads > 1 else ''}; {args.warmup} warm-up + "
          f"{args.steps} timed steps per side, alternated", flush=True)
    pool = ih.Pool(workers) if workers > 1 else None
    times = {"project": [], "torch": []}
    try:
        for i, batch in enumerate(batches):
            lr = ih.learning_rate(cfg, i, len(batches))
            t0 = time.perf_counter()
            ih.train_step(params, adam, batch, lr, cfg, data, ih.Timer(), pool)
            t1 = time.perf_counter()
            torch_train_step(model, opt, batch, lr, cfg, data)
            t2 = time.perf_counter()
            if i >= args.warmup:
                times["project"].append(t1 - t0)
                times["torch"].append(t2 - t1)
    finally:
        if pool:
            pool.close()
    for side, ts in times.items():
        print(f"{side:8s} {summary(ts)}")
    p, t = np.median(times["project"]), np.median(times["torch"])
    print(f"ratio project / torch: {p / t:.2f} (medians), {min(times['project']) / min(times['torch']):.2f} (minima)")
    if args.save_json:
        write_json(args.save_json, {"mode": "step", "argv": sys.argv[1:], "versions": versions(threads),
                                    "seconds": times, "ratio_of_medians": p / t})
    return 0


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------


def torch_evaluate(model, samples, data, greedy):
    """ih.evaluate's metrics for the peer: the project's greedy decoder and CER/WER on the torch log-probs
    (chunks of ih.eval_chunks); the loss is F.ctc_loss per character over the sequences with a finite one."""
    hyps, nll = [None] * len(samples), np.zeros(len(samples))
    with torch.inference_mode():
        for idx in ih.eval_chunks([len(s.traj) for s in samples]):
            chunk = [samples[i] for i in idx]
            X, lengths = ih.pad_batch(chunk, data.input_shift, data.input_scale, np.float32, data.input_squash)
            lengths_t = torch.from_numpy(lengths)
            lp = model(torch.from_numpy(X), lengths_t)
            targets = [s.labels for s in chunk]
            nll[idx] = F.ctc_loss(lp, torch.tensor([c for y in targets for c in y], dtype=torch.long), lengths_t,
                                  torch.tensor([len(y) for y in targets], dtype=torch.long), blank=ih.BLANK,
                                  reduction="none").double().numpy()
            lp = lp.double().numpy()
            for i, h in zip(idx, greedy([lp[:n, b] for b, n in enumerate(lengths)])):
                hyps[i] = h
    finite = np.isfinite(nll)
    n_chars = sum(len(s.labels) for s, f in zip(samples, finite) if f)
    metrics = ih.rates(ih.error_counts([s.text for s in samples], hyps))
    return {**metrics, "loss": float(nll[finite].sum() / max(n_chars, 1))}


def train(args):
    if not args.data_dir:
        raise SystemExit("train needs --data-dir, the IAM-OnDB folder")
    threads = args.threads or 2
    ih.keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    more = {k: getattr(args, k) for k in ("epochs", "patience") if getattr(args, k) is not None}
    cfg = iam_config(args, **more)
    task = ih.TASKS["iam-ondb"]
    streams = ih.make_streams(cfg.seed)
    t0 = time.perf_counter()
    data = load_iam_ondb(cfg, streams)
    data_seconds = time.perf_counter() - t0
    cfg = dataclasses.replace(cfg, alphabet=data.alphabet, workers=1)
    print(versions(threads))
    K, D = ih.n_classes(cfg), ih.feature_dim(cfg)
    model = TorchPeer(D, cfg.hidden, cfg.layers, K, args.torch_lstm)
    if args.init == "project":  # the project's initial weights for this seed (fit() draws them so)
        load_project_params(model, {k: v.astype(np.float32) for k, v in ih.init_params(
            streams["init"], cfg.hidden, cfg.layers, True, D, K).items()})
    opt = make_optimizer(model, cfg)
    steps_per_epoch = -(-data.epoch_size // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    greedy = ih.make_decoder("greedy", cfg, data.alphabet)
    watched = task.monitor[0]
    print(f"torch peer on {args.data_dir}: {data.epoch_size} training lines, {len(data.eval_sets[watched])} "
          f"{watched} lines, K = {K}, H = {cfg.hidden}, layers {cfg.layers}, torch-lstm {args.torch_lstm}, "
          f"batch {cfg.batch_size}, {cfg.epochs} epochs, patience {cfg.patience}, init {args.init}, "
          f"data {data_seconds:.1f} s", flush=True)
    history, best, best_epoch, wall, done_steps, skipped = [], None, 0, 0.0, 0, 0
    to_target = None
    for epoch in range(1, cfg.epochs + 1):
        e0 = time.perf_counter()
        samples = data.training_samples(streams["data"], ih.serial_map)
        order = streams["shuffle"].permutation(len(samples))
        loss_sum, n_chars = 0.0, 0
        model.train()
        for idx in ih.make_batches(samples, cfg.batch_size, order, task.bucket, streams["shuffle"]):
            lr = ih.learning_rate(cfg, done_steps, total_steps)
            s, n, k = torch_train_step(model, opt, [samples[i] for i in idx], lr, cfg, data)
            done_steps += n > 0  # a batch with no usable sequence takes no Adam step, as in train_step
            loss_sum, n_chars, skipped = loss_sum + s, n_chars + n, skipped + k
        e1 = time.perf_counter()
        model.eval()
        entry = {"epoch": epoch, "train_loss": loss_sum / max(n_chars, 1),
                 watched: torch_evaluate(model, data.eval_sets[watched], data, greedy)}
        e2 = time.perf_counter()
        wall += e2 - e0
        entry.update(seconds=e2 - e0, train_seconds=e1 - e0, eval_seconds=e2 - e1, cumulative_seconds=wall)
        improved = ih.better(entry, best, watched)
        if improved:
            best, best_epoch = entry, epoch
        if to_target is None and entry[watched]["cer"] <= args.target_cer:
            to_target = wall
        history.append(entry)
        m = entry[watched]
        print(f"epoch {epoch:3d}/{cfg.epochs}  loss {entry['train_loss']:.4f}  {watched} CER {m['cer']:.4f} "
              f"WER {m['wer']:.4f}  {entry['seconds']:.1f}s (train {entry['train_seconds']:.1f}s)  "
              f"total {wall:.1f}s" + ("  best" if improved else ""), flush=True)
        if cfg.patience and epoch - best_epoch >= cfg.patience:
            print(f"stopped after {cfg.patience} epochs without a better {watched} CER")
            break
    result = {"mode": "train", "argv": sys.argv[1:], "versions": versions(threads),
              "config": dataclasses.asdict(cfg), "torch_lstm": args.torch_lstm, "init": args.init,
              "threads": threads, "data_seconds": data_seconds, "history": history, "skipped": skipped,
              "best_epoch": best_epoch, "best_cer": best[watched]["cer"] if best else None,
              "seconds_to_best": best["cumulative_seconds"] if best else None,
              "target_cer": args.target_cer, "seconds_to_target": to_target}
    print(f"best {watched} CER {result['best_cer']} at epoch {best_epoch} after {result['seconds_to_best']} s; "
          f"CER <= {args.target_cer} after {to_target} s")
    if args.save_json:
        write_json(args.save_json, result)
    return 0


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")


def main(argv=None):
    p = ih.OneLineParser(prog="torch_peer.py", description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=("step", "train"), default="step",
                   help="step: time one training step, project vs torch (default); train: train the peer")
    p.add_argument("--check", action="store_true", help="only check that the peer computes the project's function")
    p.add_argument("--data-dir", default=None, help="the IAM-OnDB folder (step: real batches; train: required)")
    p.add_argument("--threads", type=ih.whole_number(1, 64), default=None,
                   help="torch intra-op threads (default 1 for step, 2 for train)")
    p.add_argument("--workers", type=ih.whole_number(1, 16), default=None,
                   help="step: the project's processes per batch, ih.Pool (default 1)")
    p.add_argument("--steps", type=ih.whole_number(1, 100_000), default=20, help="step: timed steps per side")
    p.add_argument("--warmup", type=ih.whole_number(0, 1000), default=2, help="step: untimed steps per side first")
    p.add_argument("--hidden", type=ih.whole_number(1, 1024), default=100, help="LSTM cells per direction (100)")
    p.add_argument("--layers", type=ih.whole_number(1, 8), default=None,
                   help="BLSTM layers (the project's iam-ondb default, 2)")
    p.add_argument("--batch-size", type=ih.whole_number(1, 1024), default=8, help="sequences per step (8)")
    p.add_argument("--classes", type=ih.whole_number(2, 96), default=81, help="step, synthetic: K with the blank (81)")
    p.add_argument("--dim", type=ih.whole_number(1, 1024), default=25, help="step, synthetic: features per sample (25)")
    p.add_argument("--label-length", type=ih.whole_number(1, 300), default=30,
                   help="step, synthetic: labels per line (30)")
    p.add_argument("--torch-lstm", choices=TORCH_LSTMS, default="pair",
                   help="pair: two one-way nn.LSTMs per layer (default); bidirectional: one over a packed batch")
    p.add_argument("--seed", type=ih.whole_number(0, 2**32 - 1), default=0, help="the project's seed (0)")
    p.add_argument("--epochs", type=ih.whole_number(1, 100_000), default=None,
                   help="train: epochs (the project's iam-ondb default, 10)")
    p.add_argument("--patience", type=ih.whole_number(0, 100_000), default=None,
                   help="train: early stopping patience (the project's 6; 0: none)")
    p.add_argument("--init", choices=("project", "torch"), default="project",
                   help="train: initial weights drawn by the project's init_params for the seed (default), or "
                        "nn.LSTM's and nn.Linear's own")
    p.add_argument("--target-cer", type=float, default=0.25, help="train: report the time to this validation CER")
    p.add_argument("--save-json", default=None, help="write the timings (step) or the history (train) here")
    args = p.parse_args(argv)
    if args.check:
        return check(args)
    try:
        return train(args) if args.mode == "train" else step_benchmark(args)
    except ih.UserError as e:  # a missing or broken data folder: one line, as the project gives
        p.exit(2, f"torch_peer.py: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
