"""Speed and pruning of the lm decoder on a saved lines model.

Decodes validation lines with the token-passing decoder (dictionary + bigram
LM) at several dictionary sizes and beams, and prints milliseconds per line,
validation CER/WER, and how often each beam returns the same words as the
widest beam given. Run from the repository root:

    python iam_handwriting.py --task lines --save-model lines.npz
    python benchmarks/decoding.py lines.npz                              # 20,000 words, beams 16 64 1024
    python benchmarks/decoding.py lines.npz --sizes 1000 20000 --beams 64 256 --lines 100
"""
import dataclasses
import os
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as iam_handwriting.py does when run as a script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import iam_handwriting as ih  # noqa: E402


def main(argv=None):
    p = ih.OneLineParser(prog="decoding.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a lines model saved with --save-model")
    p.add_argument("--sizes", type=ih.whole_number(1, ih.N_ENGLISH_WORDS), nargs="+", default=[20000],
                   help="dictionary sizes")
    p.add_argument("--beams", type=ih.whole_number(1, 100_000), nargs="+", default=[16, 64, 1024],
                   help="beams to time; the last is the reference for agreement")
    p.add_argument("--lines", type=ih.whole_number(1, 200), default=200, help="validation lines to decode")
    p.add_argument("--lm-weight", type=float, default=1.0, help="language-model weight")
    p.add_argument("--word-penalty", type=float, default=0.0, help="word insertion penalty")
    args = p.parse_args(argv)
    try:
        params, cfg = ih.load_model(args.model)
        if cfg.task != "lines":
            raise ih.UserError(f"{args.model!r} holds a {cfg.task} model; this benchmark reads lines models")
    except ih.UserError as e:
        p.exit(2, f"decoding.py: error: {e}\n")
    ih.keep_freed_memory()
    data = ih.TASKS["lines"].make_data(cfg, ih.make_streams(cfg.seed), ih.serial_map, print)
    samples = data.eval_sets["validation"][:args.lines]
    log_probs = ih.run_model(params, samples, data)
    refs = [s.text for s in samples]
    frames = sum(len(lp) for lp in log_probs)
    print(f"{len(samples)} validation lines, {frames / len(samples):.0f} samples per line; lm_weight "
          f"{args.lm_weight}, word_penalty {args.word_penalty}")
    print(f"{'size':>6} {'beam':>6} {'ms/line':>8} {'CER':>7} {'WER':>7} {'same words as beam ' + str(args.beams[-1]):>26}")
    for size in args.sizes:
        lex, lm = ih.dictionary_lexicon(size, ih.LINE_ALPHABET), ih.language_model(size, 2)
        found = {}
        for beam in args.beams:
            c = dataclasses.replace(cfg, lm_beam=beam, lm_weight=args.lm_weight, word_penalty=args.word_penalty)
            decode = ih.make_decoder("lm", c, ih.LINE_ALPHABET, lex, lm)
            t0 = time.perf_counter()
            found[beam] = decode(log_probs)
            found[beam, "ms"] = 1e3 * (time.perf_counter() - t0) / len(samples)
        for beam in args.beams:
            m = ih.rates(ih.error_counts(refs, found[beam]))
            same = sum(a == b for a, b in zip(found[beam], found[args.beams[-1]]))
            print(f"{size:6d} {beam:6d} {found[beam, 'ms']:8.1f} {m['cer']:7.4f} {m['wer']:7.4f} "
                  f"{same:>18d}/{len(samples)} ({same / len(samples):.1%})", flush=True)


if __name__ == "__main__":
    main()
