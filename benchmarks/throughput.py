"""Training throughput of iam_handwriting.py at several batch sizes.

For each batch size, times whole training epochs (render, pad, forward, CTC,
backward, clip, Adam; no evaluation) on the headline run's data and model, and
prints frames per second, seconds per epoch and milliseconds per Adam step.
Run from the repository root:

    python benchmarks/throughput.py                 # batch sizes 1 8 32 128
    python benchmarks/throughput.py --batch-sizes 8 --epochs 5

The process is set up as the CLI sets itself up (one BLAS thread, freed
memory kept), so the numbers describe `python iam_handwriting.py`. To see
what each setting is worth:

    OPENBLAS_NUM_THREADS=2 python benchmarks/throughput.py   # two BLAS threads
    python benchmarks/throughput.py --dtype float64          # double precision
    python benchmarks/throughput.py --default-malloc         # glibc's default allocator policy
"""
import argparse
import os
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as iam_handwriting.py does when run as a script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import iam_handwriting as ih  # noqa: E402


def time_epochs(batch_size, epochs, dtype, seed=0):
    """(seconds per epoch, frames per epoch, steps per epoch), median over `epochs` timed epochs."""
    cfg = ih.RunConfig(seed=seed, batch_size=batch_size, dtype=dtype)
    streams = ih.make_streams(seed)
    train_words, _ = ih.split_vocab(streams["split"], cfg.holdout_frac)
    params = {k: v.astype(cfg.dtype) for k, v in ih.init_params(streams["init"], cfg.hidden).items()}
    adam = ih.adam_init(params)
    timer = ih.Timer()
    seconds = []
    for epoch in range(epochs + 1):  # the first epoch warms up and is not counted
        t0 = time.perf_counter()
        renders = ih.render_words(train_words, cfg.word_repeats, streams["data"], cfg)
        order = streams["shuffle"].permutation(len(renders))
        batches = ih.make_batches(renders, batch_size, order)
        for idx in batches:
            ih.train_step(params, adam, [renders[i] for i in idx], cfg.lr, cfg, timer)
        if epoch:
            seconds.append(time.perf_counter() - t0)
    frames = sum(len(r.traj) for r in renders)
    return float(np.median(seconds)), frames, len(batches)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128], help="batch sizes to time")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per batch size (median reported)")
    p.add_argument("--dtype", default=ih.RunConfig.dtype, choices=["float32", "float64"], help="training precision")
    p.add_argument("--default-malloc", action="store_true",
                   help="skip iam_handwriting.keep_freed_memory(), to measure what it is worth")
    args = p.parse_args(argv)
    if not args.default_malloc:
        ih.keep_freed_memory()
    print(f"numpy {np.__version__}, {os.cpu_count()} cores, BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}, "
          f"{'default' if args.default_malloc else 'kept'} freed memory, H = {ih.RunConfig.hidden}, "
          f"{args.dtype}, epoch = 38 words x {ih.RunConfig.word_repeats} renderings")
    print(f"{'batch':>5} {'frames/s':>10} {'s/epoch':>8} {'ms/step':>8} {'steps/epoch':>11}")
    for b in args.batch_sizes:
        sec, frames, steps = time_epochs(b, args.epochs, args.dtype)
        print(f"{b:5d} {frames / sec:10,.0f} {sec:8.3f} {1e3 * sec / steps:8.2f} {steps:11d}", flush=True)


if __name__ == "__main__":
    main()
