"""Train over a grid of RunConfig overrides and seeds; print one row per run.

Each row gives the final CER and word accuracy (words) or WER (lines) of every
evaluation split and, for words, the first epoch from which the headline target
(in-vocab CER <= 0.01 and word accuracy >= 0.97) holds to the end ("-" if it
never does). Run from the repository root, for example:

    python benchmarks/sweep.py --grid input_gain=1,2,4,8,12 --seeds 0,1,2
    python benchmarks/sweep.py --grid batch_size=4,8,16,32 --seeds 0,1,2
    python benchmarks/sweep.py --grid bidirectional=True,False hidden=32,64
    python benchmarks/sweep.py --task lines --grid epochs=4 batch_size=8,16 --seeds 0

Metrics are deterministic; the seconds column is only indicative when two
sweeps share the machine.
"""
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
    """A grid value as the RunConfig field's type, checked against the field's range."""
    kind = ih.CONFIG_FIELDS[name].type
    try:
        value = ih.value_from_text(kind, text)
    except ValueError:
        raise ValueError(f"{name} takes {ih.TEXT_VALUES[kind][1]}, got {text!r}") from None
    problem = ih.setting_error(name, value)
    if problem:
        raise ValueError(f"{name} {problem}")
    return value


def parse_grid(items):
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in FIELDS or name in ("seed", "task") or not values:
            raise ValueError(f"expected FIELD=V1,V2 with FIELD one of "
                             f"{', '.join(n for n in FIELDS if n not in ('seed', 'task'))}, got {item!r}")
        grid[name] = [parse_value(name, v) for v in values.split(",")]
    return grid


def target_epoch(history):
    """The words task's target (in-vocab CER <= 0.01, word accuracy >= 0.97): first epoch it holds to the end."""
    ok = [e["in_vocab"]["cer"] <= 0.01 and e["in_vocab"]["word_acc"] >= 0.97 for e in history]
    return next((i + 1 for i in range(len(ok)) if all(ok[i:])), None)


def main(argv=None):
    p = ih.OneLineParser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=ih.TASK_NAMES[:2], default="words", help="the task (default words)")
    p.add_argument("--grid", nargs="*", default=[], metavar="FIELD=V1,V2", help="RunConfig fields to vary")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    args = p.parse_args(argv)
    try:
        grid = parse_grid(args.grid)
        seeds = [parse_value("seed", s) for s in args.seeds.split(",")]
    except ValueError as e:
        p.error(str(e))
    ih.keep_freed_memory()
    names = list(grid)
    task = ih.TASKS[args.task]
    metric = "word_acc" if args.task == "words" else "wer"
    header = None
    for values in itertools.product(*grid.values()):
        for seed in seeds:
            cfg = ih.RunConfig(**{**task.defaults, "task": args.task, "seed": seed, **dict(zip(names, values))})
            t0 = time.perf_counter()
            result = ih.train(cfg, verbose=False)
            if header is None:
                header = " ".join(f"{n:>13}" for n in names) + f" {'seed':>4}" + "".join(
                    f" {split[:8] + ' CER':>13} {metric:>8}" for split in result["final"]) + \
                    (f" {'target@':>7}" if args.task == "words" else "") + f" {'seconds':>7}"
                print(header)
            row = " ".join(f"{str(v):>13}" for v in values) + f" {seed:4d}" + "".join(
                f" {m['cer']:13.4f} {m[metric]:8.3f}" for m in result["final"].values())
            if args.task == "words":
                row += f" {target_epoch(result['history']) or '-':>7}"
            print(row + f" {time.perf_counter() - t0:7.1f}", flush=True)


if __name__ == "__main__":
    main()
