"""Where a real-scale training step of iam_handwriting.py spends its time.

Reads IAM-OnDB training batches as the iam-ondb task trains on them (the
headline recipe: B = 8, two BLSTM layers of 100, graves25, K = 81, float32)
and reports, in ms per step and % of the step:

1. one process: the step under cProfile (standard library), by function:
   pad_batch, lstm_forward and lstm_backward (both layers and directions:
   the time loops and the matmuls over all steps), the rest of forward and
   backward (the output layer, log-softmax, the direction gathers), CTC
   (the alpha/beta recursion and the rest of ctc_loss), clip and Adam;
2. two processes (the CLI's default): the step's wall time, what the main
   process waits for its worker, and the hand-off itself: pickling the
   parameters and a part's inputs to the worker and its gradients back;
3. the floor: numpy calls per time step in each loop times the measured
   fixed cost of one call, against the time the loop's recurrent matmuls
   take at their real sizes; and the step's FLOP-bound time, its matmuls'
   floating-point operations at the speed of one large matmul.

Run from the repository root, on an idle machine:

    python benchmarks/profile_step.py --data-dir DIR [--steps 30] [--save-json profile.json]
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/profile_step.py --data-dir DIR

The process is set up as the CLI sets itself up (one BLAS thread, freed
memory kept). Only the training split is read into steps; nothing is
evaluated.
"""
import cProfile
import dataclasses
import json
import os
import pickle
import pstats
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as iam_handwriting.py does when run as a script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import iam_handwriting as ih  # noqa: E402

# numpy calls per time step in each loop that compute (ufuncs and matmuls; the views taken by
# basic slicing cost a fraction of a call each and are not counted), read off the code; keep
# them in step with the loops (lstm_backward was 15 before its factors left the loop).
LOOP_CALLS = {"lstm_forward": 10, "lstm_backward": 7, "ctc_alpha": 15}


def real_batches(cfg, n_batches):
    """The first n training batches of epoch 1, as fit() draws them."""
    task = ih.TASKS["iam-ondb"]
    streams = ih.make_streams(cfg.seed)
    pool = ih.Pool(2)
    try:
        data = ih.iam_ondb_data(cfg, streams, pool.map, lambda *a, **k: None)
    finally:
        pool.close()
    data.eval_sets.clear()  # nothing is evaluated here
    samples = data.training_samples(streams["data"], ih.serial_map)
    order = streams["shuffle"].permutation(len(samples))
    batches = ih.make_batches(samples, cfg.batch_size, order, task.bucket, streams["shuffle"])
    return data, streams, [[samples[i] for i in idx] for idx in batches[:n_batches]]


def fresh_model(cfg, data, streams):
    K, D = 1 + len(data.alphabet), ih.feature_dim(cfg)
    params = {k: v.astype(cfg.dtype) for k, v in ih.init_params(
        streams["init"], cfg.hidden, cfg.layers, True, D, K).items()}
    return params, ih.adam_init(params)


def run_steps(cfg, data, params, adam, batches, pool=None):
    """Seconds per step of each batch, and the Timer of the main process."""
    timer, seconds = ih.Timer(), []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        ih.train_step(params, adam, batch, ih.learning_rate(cfg, i, len(batches)), cfg, data, timer, pool)
        seconds.append(time.perf_counter() - t0)
    return seconds, timer


def profile_one_process(cfg, data, streams, batches, warmup):
    params, adam = fresh_model(cfg, data, streams)
    run_steps(cfg, data, params, adam, batches[:warmup])
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    run_steps(cfg, data, params, adam, batches[warmup:])
    profiler.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    own = {}
    for (path, _, name), (_, _, tottime, cumtime, _) in stats.items():
        if os.path.basename(path) == "iam_handwriting.py":
            own[name] = own.get(name, np.zeros(2)) + (tottime, cumtime)
    n = len(batches) - warmup
    cum = {name: 1e3 * v[1] / n for name, v in own.items()}
    rows = [
        ("pad_batch (inputs)", cum.get("pad_batch", 0.0)),
        ("lstm_forward (input matmul, time loop)", cum["lstm_forward"]),
        ("rest of forward (output layer, log-softmax, gathers)", cum["forward"] - cum["lstm_forward"]),
        ("CTC recursion (ctc_alpha, alpha and beta)", cum["ctc_alpha"]),
        ("rest of CTC (gathers, posteriors, gradient)", cum["ctc_loss"] - cum["ctc_alpha"]),
        ("lstm_backward (time loop, weight and input matmuls)", cum["lstm_backward"]),
        ("rest of backward (output layer, gathers)", cum["backward"] - cum["lstm_backward"]),
        ("clip and Adam", cum.get("clip_global_norm", 0.0) + cum.get("adam_step", 0.0)),
    ]
    step = 1e3 * wall / n
    rows.append(("other (feasibility, Python)", step - sum(ms for _, ms in rows)))
    return step, rows


def two_processes(cfg, data, streams, batches, warmup):
    params, adam = fresh_model(cfg, data, streams)
    pool = ih.Pool(2)
    try:
        run_steps(cfg, data, params, adam, batches[:warmup], pool)
        seconds, timer = run_steps(cfg, data, params, adam, batches[warmup:], pool)
    finally:
        pool.close()
    n = len(batches) - warmup
    # The hand-off, measured alone: the job (params, the part's inputs) out, the gradients back.
    batch = batches[-1]
    half = batch[len(batch) // 2:]
    X, lengths = ih.pad_batch(half, data.input_shift, data.input_scale, cfg.dtype, data.input_squash)
    job = (ih.part_gradients, (params, X, lengths, [s.labels for s in half], len(batch)))
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    t0 = time.perf_counter()
    for _ in range(20):
        pickle.loads(pickle.dumps(job, pickle.HIGHEST_PROTOCOL))
        pickle.loads(pickle.dumps((grads, 0.0, 0), pickle.HIGHEST_PROTOCOL))
    hand_off = 1e3 * (time.perf_counter() - t0) / 20
    sizes = len(pickle.dumps(job, pickle.HIGHEST_PROTOCOL)), len(pickle.dumps(grads, pickle.HIGHEST_PROTOCOL))
    return 1e3 * float(np.mean(seconds)), {k: 1e3 * v / n for k, v in timer.seconds.items()}, hand_off, sizes


def floor(cfg, data, batches):
    """Per loop: calls per step x fixed cost per call, and the matmuls' own time, in ms per step."""
    T = float(np.mean([max(len(s.traj) for s in b) for b in batches]))
    R, H, B = 2, cfg.hidden, cfg.batch_size
    L = float(np.mean([max(len(s.labels) for s in b) for b in batches]))
    S = int(2 * L + 1)

    def per_call(fn, reps=20_000):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    out = {}
    for name, shape in (("lstm_forward", (R, B, 4 * H)), ("lstm_backward", (R, B, 4 * H)),
                        ("ctc_alpha", (2 * B, S))):
        dtype = np.float64 if name == "ctc_alpha" else np.dtype(cfg.dtype)
        a, b = np.ones(shape, dtype), np.ones(shape, dtype)
        cost = per_call(lambda: np.multiply(a, b, out=a))
        small = per_call(lambda: np.multiply(a[..., :1], b[..., :1], out=a[..., :1]))
        matmul = 0.0
        if name != "ctc_alpha":
            h, w, r = np.ones((R, B, H), dtype), np.ones((R, H, 4 * H), dtype), np.empty((R, B, 4 * H), dtype)
            matmul = per_call(lambda: np.matmul(h, w, out=r), 5_000)
        loops = cfg.layers if name != "ctc_alpha" else 1
        out[name] = {"calls_per_step": LOOP_CALLS[name], "us_per_call": 1e6 * cost, "us_per_empty_call": 1e6 * small,
                     "us_per_recurrent_matmul": 1e6 * matmul,
                     "floor_ms": 1e3 * loops * T * LOOP_CALLS[name] * small,
                     "matmul_ms": 1e3 * loops * T * matmul}
    # The step's arithmetic: every matmul of forward and backward (each done once forward and
    # twice backward, for the data and the weight gradients), at the speed of one large matmul.
    K, D = 1 + len(data.alphabet), ih.feature_dim(cfg)
    in_dims = [D] + [R * H] * (cfg.layers - 1)
    flops = 3 * 2 * T * B * (sum(R * (d + H) * 4 * H for d in in_dims) + R * H * K)
    x, w = np.ones((8192, 200), cfg.dtype), np.ones((200, 400), cfg.dtype)
    gflops = 2 * 8192 * 200 * 400 / per_call(lambda: x @ w, 50) / 1e9
    return T, S, out, {"gflop_per_step": flops / 1e9, "gflops_one_core": gflops,
                       "flop_bound_ms": 1e3 * flops / 1e9 / gflops}


def main(argv=None):
    p = ih.OneLineParser(prog="profile_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="the IAM-OnDB folder")
    p.add_argument("--steps", type=ih.whole_number(1, 10_000), default=30, help="profiled steps (30)")
    p.add_argument("--warmup", type=ih.whole_number(0, 100), default=3, help="untimed steps first (3)")
    p.add_argument("--save-json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    ih.keep_freed_memory()
    cfg = ih.RunConfig(task="iam-ondb", data_dir=args.data_dir, **ih.TASKS["iam-ondb"].defaults)
    try:
        if args.save_json:
            ih.check_writable(args.save_json, "profile")  # refused before the work, not after it
        data, streams, batches = real_batches(cfg, args.warmup + args.steps)
    except ih.UserError as e:
        p.exit(2, f"profile_step.py: error: {e}\n")
    cfg = dataclasses.replace(cfg, alphabet=data.alphabet)
    T, S, loops, arithmetic = floor(cfg, data, batches[args.warmup:])
    print(f"numpy {np.__version__}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; "
          f"B = {cfg.batch_size}, layers {cfg.layers}, H = {cfg.hidden}, K = {1 + len(data.alphabet)}, {cfg.dtype}; "
          f"{args.steps} real training batches, mean longest T {T:.0f}, mean S {S}", flush=True)
    step, rows = profile_one_process(cfg, data, streams, batches, args.warmup)
    print(f"\none process, under cProfile: {step:.1f} ms/step")
    for what, ms in rows:
        print(f"  {what:55s} {ms:8.1f} ms {100 * ms / step:5.1f} %")
    wall, phases, hand_off, sizes = two_processes(cfg, data, streams, batches, args.warmup)
    print(f"\ntwo processes (train_step with ih.Pool(2)): {wall:.1f} ms/step; main process by phase: "
          + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(f"  hand-off alone (pickle out and back, {sizes[0] / 1e6:.2f} MB job, {sizes[1] / 1e6:.2f} MB gradients): "
          f"{hand_off:.2f} ms")
    print("\nfloor of the time loops (per step of the training batch, both layers):")
    for name, f in loops.items():
        print(f"  {name:14s} {f['calls_per_step']:3d} calls/step x {f['us_per_empty_call']:.2f} us (a call on a "
              f"1-wide view; {f['us_per_call']:.2f} us at the loop's size) = {f['floor_ms']:6.1f} ms of fixed cost; "
              f"recurrent matmuls alone {f['matmul_ms']:6.1f} ms")
    print(f"  the step's matmuls: {arithmetic['gflop_per_step']:.1f} GFLOP at {arithmetic['gflops_one_core']:.0f} GFLOP/s "
          f"(one large float32 matmul on one core) = {arithmetic['flop_bound_ms']:.0f} ms on one core, half that on two")
    if args.save_json:
        ih.write_output(args.save_json, json.dumps({
            "argv": sys.argv[1:], "numpy": np.__version__, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
            "mean_T": T, "mean_S": S, "one_process_ms": step, "one_process_rows": rows,
            "two_process_ms": wall, "two_process_phases_ms": phases, "hand_off_ms": hand_off,
            "hand_off_bytes": sizes, "loops": loops, "arithmetic": arithmetic}, indent=1).encode(), "profile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
