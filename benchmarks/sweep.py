"""Train over a grid of RunConfig overrides and seeds; print one row per run.

Each row gives the final in-vocab and held-out CER and word accuracy, and the
first epoch from which the headline target (in-vocab CER <= 0.01 and word
accuracy >= 0.97) holds to the end ("-" if it never does). Run from the
repository root, for example:

    python benchmarks/sweep.py --grid input_gain=1,2,4,8,12 --seeds 0,1,2
    python benchmarks/sweep.py --grid batch_size=4,8,16,32 --seeds 0,1,2
    python benchmarks/sweep.py --grid bidirectional=True,False hidden=32,64

Metrics are deterministic; the seconds column is only indicative when two
sweeps share the machine.
"""
import argparse
import dataclasses
import itertools
import os
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as iam_handwriting.py does when run as a script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import iam_handwriting as ih  # noqa: E402

FIELDS = {f.name: f.type for f in dataclasses.fields(ih.RunConfig)}


def parse_value(name, text):
    default = getattr(ih.RunConfig, name)
    if isinstance(default, bool):
        if text not in ("True", "False"):
            raise ValueError(f"{name} takes True or False, got {text!r}")
        return text == "True"
    return type(default)(text)


def parse_grid(items):
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in FIELDS or name == "seed" or not values:
            raise SystemExit(f"sweep.py: error: expected FIELD=V1,V2 with FIELD one of "
                             f"{', '.join(n for n in FIELDS if n != 'seed')}, got {item!r}")
        grid[name] = [parse_value(name, v) for v in values.split(",")]
    return grid


def target_epoch(history):
    ok = [e["in_vocab"]["cer"] <= 0.01 and e["in_vocab"]["word_acc"] >= 0.97 for e in history]
    return next((i + 1 for i in range(len(ok)) if all(ok[i:])), None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", nargs="*", default=[], metavar="FIELD=V1,V2", help="RunConfig fields to vary")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    args = p.parse_args(argv)
    grid = parse_grid(args.grid)
    seeds = [int(s) for s in args.seeds.split(",")]
    ih.keep_freed_memory()
    names = list(grid)
    print(" ".join(f"{n:>13}" for n in names) + f" {'seed':>4} {'iv CER':>7} {'iv acc':>6} "
          f"{'ho CER':>7} {'ho acc':>6} {'target@':>7} {'seconds':>7}")
    for values in itertools.product(*grid.values()):
        for seed in seeds:
            cfg = ih.RunConfig(seed=seed, **dict(zip(names, values)))
            t0 = time.perf_counter()
            result = ih.train(cfg, verbose=False)
            iv, ho = result["final"]["in_vocab"], result["final"]["held_out"]
            first = target_epoch(result["history"])
            print(" ".join(f"{str(v):>13}" for v in values) + f" {seed:4d} {iv['cer']:7.4f} {iv['word_acc']:6.3f} "
                  f"{ho['cer']:7.4f} {ho['word_acc']:6.3f} {first or '-':>7} {time.perf_counter() - t0:7.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
