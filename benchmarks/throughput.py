"""Training throughput of iam_handwriting.py at several batch sizes.

For each batch size (and number of worker processes), times training steps
(pad, forward, CTC, backward, clip, Adam; no evaluation) on a task's training
data and model, and prints frames per second, milliseconds per Adam step and
the phase breakdown of the main process. Rendering the data is timed apart.
Run from the repository root:

    python benchmarks/throughput.py                        # words: batch 1 8 32 128, one process
    python benchmarks/throughput.py --task lines --batch-sizes 8 16 32 --workers 1 2
    python benchmarks/throughput.py --batch-sizes 8 --steps 40

The process is set up as the CLI sets itself up (one BLAS thread, freed
memory kept), so the numbers describe `python iam_handwriting.py`. To see
what each setting is worth:

    OPENBLAS_NUM_THREADS=2 python benchmarks/throughput.py   # two BLAS threads
    python benchmarks/throughput.py --dtype float64          # double precision
    python benchmarks/throughput.py --default-malloc         # glibc's default allocator policy

Timings on a shared machine vary from run to run; compare settings only
within one session of back-to-back runs.
"""
import dataclasses
import os
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as iam_handwriting.py does when run as a script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import iam_handwriting as ih  # noqa: E402


def time_steps(cfg, steps, warmup=2):
    """(seconds per step, frames per step, phase seconds per step, render seconds per sequence).

    Renders enough training data for warmup + steps batches, then times the steps.
    """
    task = ih.TASKS[cfg.task]
    streams = ih.make_streams(cfg.seed)
    pool = ih.Pool(cfg.workers) if cfg.workers > 1 else None
    try:
        parallel_map = pool.map if pool else ih.serial_map
        data = task.make_data(cfg, streams, parallel_map, lambda *a, **k: None)
        samples = []
        t0 = time.perf_counter()
        while len(samples) < (steps + warmup) * cfg.batch_size:
            samples += data.training_samples(streams["data"], parallel_map)
        render = (time.perf_counter() - t0) / len(samples)
        params = {k: v.astype(cfg.dtype) for k, v in ih.init_params(
            streams["init"], cfg.hidden, cfg.layers, cfg.bidirectional, ih.feature_dim(cfg),
            ih.n_classes(cfg)).items()}
        adam = ih.adam_init(params)
        batches = ih.make_batches(samples, cfg.batch_size, streams["shuffle"].permutation(len(samples)), task.bucket,
                                  streams["shuffle"])
        for idx in batches[:warmup]:
            ih.train_step(params, adam, [samples[i] for i in idx], cfg.lr, cfg, data, ih.Timer(), pool)
        timer, frames = ih.Timer(), 0
        t0 = time.perf_counter()
        for idx in batches[warmup:warmup + steps]:
            ih.train_step(params, adam, [samples[i] for i in idx], cfg.lr, cfg, data, timer, pool)
            frames += sum(len(samples[i].traj) for i in idx)
        seconds = time.perf_counter() - t0
    finally:
        if pool:
            pool.close()
    return seconds / steps, frames / steps, {k: v / steps for k, v in timer.seconds.items()}, render


def main(argv=None):
    p = ih.OneLineParser(prog="throughput.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("words", "lines"), default="words", help="whose data and model (default words)")
    p.add_argument("--batch-sizes", type=ih.whole_number(1, 1024), nargs="+", default=None,
                   help="batch sizes to time (default 1 8 32 128 for words, 8 16 32 for lines)")
    p.add_argument("--workers", type=ih.whole_number(1, 16), nargs="+", default=[1], help="processes per batch (default 1)")
    p.add_argument("--steps", type=ih.whole_number(1, 10_000), default=None,
                   help="timed steps per setting (default 60 for words, 12 for lines)")
    p.add_argument("--hidden", type=ih.whole_number(1, 1024), default=None,
                   help="LSTM cells per direction (default: the task's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="training precision")
    p.add_argument("--default-malloc", action="store_true",
                   help="skip iam_handwriting.keep_freed_memory(), to measure what it is worth")
    args = p.parse_args(argv)
    if not args.default_malloc:
        ih.keep_freed_memory()
    lines = args.task == "lines"
    sizes = args.batch_sizes or ([8, 16, 32] if lines else [1, 8, 32, 128])
    steps = args.steps or (12 if lines else 60)
    base = ih.RunConfig(task=args.task, dtype=args.dtype, **ih.TASKS[args.task].defaults)
    if args.hidden:
        base = dataclasses.replace(base, hidden=args.hidden)
    print(f"numpy {np.__version__}, {os.cpu_count()} cores, BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}, "
          f"{'default' if args.default_malloc else 'kept'} freed memory, task {args.task}, H = {base.hidden}, "
          f"{args.dtype}, {steps} steps per row")
    print(f"{'batch':>5} {'workers':>7} {'frames/s':>10} {'ms/step':>8} {'T mean':>7}   main process ms/step by phase"
          f"   render ms/seq")
    for workers in args.workers:
        for b in sizes:
            cfg = dataclasses.replace(base, batch_size=b, workers=workers, lines_per_epoch=max(b * 4, 64),
                                      eval_lines_per_writer=1)
            sec, frames, phases, render = time_steps(cfg, steps)
            shown = "  ".join(f"{k} {1e3 * v:.0f}" for k, v in phases.items())
            print(f"{b:5d} {workers:7d} {frames / sec:10,.0f} {1e3 * sec:8.1f} {frames / b:7.0f}   {shown}   "
                  f"{1e3 * render:.1f}", flush=True)


if __name__ == "__main__":
    main()
