"""Speed and pruning of the lm decoder on a saved lines or IAM-OnDB model.

Runs the network over evaluation lines (timed: the forward pass in lines/s),
decodes them with the token-passing decoder (dictionary + bigram LM, the
model's own weights and penalties) at several dictionary sizes and beams, and
prints milliseconds per line, CER/WER, how often each beam returns the same
words as the widest beam given, and, for each beam whose 16x is also given,
how many lines the 16x wider beam reads differently. Run from the repository
root:

    python iam_handwriting.py --task lines --save-model lines.npz
    python benchmarks/decoding.py lines.npz                              # 20,000 words, beams 16 64 1024
    python benchmarks/decoding.py lines.npz --sizes 1000 20000 --beams 64 256 --lines 100
    python benchmarks/decoding.py models/iam_ondb.npz --data-dir DIR --beams 64 1024      # the validation lines lm tuning leaves out
    python benchmarks/decoding.py models/iam_ondb.npz --data-dir DIR --beams 64 256 1024 4096 16384
    python benchmarks/decoding.py models/iam_ondb.npz --data-dir DIR --split validation2 --lines all --beams 64
    python benchmarks/decoding.py models/iam_ondb.npz --data-dir DIR --beams 64 1024 --workers 2   # lines dealt over 2 processes

An IAM-OnDB model reads DIR with its own features and normalisation and
decodes with the real-English dictionary and LM that the iam-ondb task builds
from the training and validation transcriptions. Its default lines are the
decoder's check lines (the validation lines after each tuning line, as the
decoder comparison's beam check reads them); --lines N takes the split's
first N, --lines all the whole split. The test lines are featurised with
the rest but never run or decoded unless --split test is given.
"""
import dataclasses
import os
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as iam_handwriting.py does when run as a script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import iam_handwriting as ih  # noqa: E402


def line_count(text):
    if text in ("all", "check"):
        return text
    return ih.whole_number(1, 100_000)(text)


def model_and_data(args):
    """(params, cfg, data): the model, and its task's data read as the model reads it
    (its config, and the input normalisation saved with it, as --load-model does)."""
    params, cfg = ih.load_model(args.model)
    if cfg.task == "iam-ondb":
        if not args.data_dir:
            raise ih.UserError(f"{args.model!r} holds an iam-ondb model; give the IAM-OnDB folder with --data-dir")
        cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
    elif cfg.task != "lines":
        raise ih.UserError(f"{args.model!r} holds a {cfg.task} model; this benchmark reads lines and iam-ondb models")
    normalisation = ih.load_normalisation(args.model, cfg)
    data = ih.TASKS[cfg.task].make_data(cfg, ih.make_streams(cfg.seed), ih.serial_map, print)
    if normalisation:
        data.input_shift, data.input_scale, data.input_squash = (normalisation[k] for k in ("shift", "scale", "squash"))
    return params, cfg, data


def main(argv=None):
    p = ih.OneLineParser(prog="decoding.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a lines or iam-ondb model saved with --save-model")
    p.add_argument("--data-dir", default=None, help="the IAM-OnDB folder (an iam-ondb model)")
    p.add_argument("--split", default="validation", help="the evaluation split to read (validation)")
    p.add_argument("--sizes", type=ih.whole_number(1, ih.N_ENGLISH_WORDS), nargs="+", default=[20000],
                   help="dictionary sizes")
    p.add_argument("--beams", type=ih.whole_number(1, 100_000), nargs="+", default=[16, 64, 1024],
                   help="beams to time; the last is the reference for agreement")
    p.add_argument("--lines", type=line_count, default=None,
                   help="lines to decode: N (the first N), all, or check (iam-ondb default: the check lines; "
                        "lines: 200)")
    p.add_argument("--lm-weight", type=float, default=None, help="language-model weight (the model's)")
    p.add_argument("--word-penalty", type=float, default=None, help="word insertion penalty (the model's)")
    p.add_argument("--workers", type=ih.whole_number(1, 64), default=1,
                   help="processes the lines are dealt over, as the lm decoder of a run deals them (1)")
    args = p.parse_args(argv)
    try:
        params, cfg, data = model_and_data(args)
    except ih.UserError as e:
        p.exit(2, f"decoding.py: error: {e}\n")
    ih.keep_freed_memory()
    real = cfg.task == "iam-ondb"
    split = data.eval_sets.get(args.split)
    if not split:
        p.exit(2, f"decoding.py: error: the data has no {args.split} lines\n")
    lines = args.lines or ("check" if real else 200)
    if lines == "check":
        samples = ih.tuning_split(data.eval_sets["validation"], cfg.lm_tuning or ih.TUNING_LINES)[1]
    else:
        samples = split if lines == "all" else split[:lines]
    cfg = dataclasses.replace(cfg, lm_weight=cfg.lm_weight if args.lm_weight is None else args.lm_weight,
                              word_penalty=cfg.word_penalty if args.word_penalty is None else args.word_penalty)
    t0 = time.perf_counter()
    log_probs = ih.run_model(params, samples, data)
    forward = time.perf_counter() - t0
    refs = [s.text for s in samples]
    frames = sum(len(lp) for lp in log_probs)
    texts = data.lm_texts or None
    print(f"{len(samples)} {args.split if lines != 'check' else 'validation check'} lines, {frames / len(samples):.0f} "
          f"samples per line; forward pass {len(samples) / forward:.1f} lines/s ({ih.EVAL_THREADS} threads); "
          f"lm_weight {cfg.lm_weight}, word_penalty {cfg.word_penalty}, oov {cfg.oov} (penalty {cfg.oov_penalty})")
    print(f"{'size':>6} {'beam':>6} {'ms/line':>8} {'lines/s':>8} {'CER':>7} {'WER':>7} "
          f"{'same words as beam ' + str(args.beams[-1]):>26} {'changed by a 16x beam':>22}")
    pool = ih.Pool(args.workers) if args.workers > 1 else None
    try:
        for size in args.sizes:
            compare_beams(args, cfg, data, texts, size, log_probs, refs, pool and pool.map)
    finally:
        if pool:
            pool.close()


def compare_beams(args, cfg, data, texts, size, log_probs, refs, parallel_map):
    """Decode the lines at every beam of args.beams, at one dictionary size, and print a row per beam."""
    n = len(refs)
    lex = ih.decoder_lexicon(cfg, data.alphabet, texts, size)
    lm = ih.decoder_language_model(cfg, texts, size, 2)
    found = {}
    for beam in args.beams:
        decode = ih.make_decoder("lm", dataclasses.replace(cfg, lm_beam=beam), data.alphabet, lex, lm,
                                 parallel_map=parallel_map)
        t0 = time.perf_counter()
        found[beam] = decode(log_probs)
        found[beam, "s"] = time.perf_counter() - t0
    for beam in args.beams:
        m = ih.rates(ih.error_counts(refs, found[beam]))
        same = sum(a == b for a, b in zip(found[beam], found[args.beams[-1]]))
        wider, changed = found.get(ih.BEAM_CHECK_FACTOR * beam), ""  # the check: beam against 16x beam
        if wider is not None:
            n_changed = sum(a != b for a, b in zip(found[beam], wider))
            changed = f"{n_changed:d}/{n} ({n_changed / n:.1%})"
        print(f"{size:6d} {beam:6d} {1e3 * found[beam, 's'] / n:8.1f} {n / found[beam, 's']:8.2f} "
              f"{m['cer']:7.4f} {m['wer']:7.4f} {same:>18d}/{n} ({same / n:.1%}) {changed:>22}", flush=True)


if __name__ == "__main__":
    main()
