"""Score the readings a run.json holds with today's error measures, split by split.

run.json keeps every evaluation line's transcription and its reading by the
run's final decoder. This recomputes, without the model or the data, CER and
the three word error rates of error_counts: WER over the tokens as written,
the plain WER (case and punctuation dropped) and the piece WER (punctuation
marks and clitics as words of their own, so that only the space before them
is ignored, which the IAM-OnDB transcriptions write on some forms and not on
others: `Mr . Gaitskell`, `it.`). It also counts, per split, the lines whose
transcription spaces its punctuation (`word .`) more often than it attaches it
(`word.`), and how many of those the reading spaces. Run from the repository
root:

    python benchmarks/rescore.py iam.json
    python benchmarks/rescore.py iam.json --splits validation validation2
"""
import argparse
import json
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import iam_handwriting as ih  # noqa: E402

SPACED = re.compile(r"\w\s+[,.;:?!]")
ATTACHED = re.compile(r"\w[,.;:?!]")


def spaces_its_punctuation(text):
    return len(SPACED.findall(text)) > len(ATTACHED.findall(text))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_json")
    parser.add_argument("--splits", nargs="+", help="the splits to score (default: every split in the file)")
    args = parser.parse_args(argv)
    try:
        with open(args.run_json, encoding="utf-8") as f:
            predictions = json.load(f)["predictions"]
        by_split = defaultdict(list)
        for p in predictions:
            if not all(isinstance(p[k], str) for k in ("split", "text", "decoded")):
                raise TypeError(f"a prediction's split, text and decoded must be strings, not {p!r:.80}")
            by_split[p["split"]].append((p["text"], p["decoded"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"rescore.py: cannot read the predictions of {args.run_json}: {e}")
    missing = sorted(set(args.splits or ()) - by_split.keys())
    if missing:
        sys.exit(f"rescore.py: {args.run_json} holds no readings of {', '.join(missing)} "
                 f"(it has {', '.join(sorted(by_split))})")
    print(f"{'split':12s} {'lines':>6s} {'CER':>7s} {'WER':>7s} {'plain':>7s} {'pieces':>7s}  spaced-punctuation lines read spaced")
    for split in args.splits or sorted(by_split):
        refs, hyps = zip(*by_split[split])
        m = ih.rates(ih.error_counts(refs, hyps))
        spaced = [h for r, h in zip(refs, hyps) if spaces_its_punctuation(r)]
        read_spaced = sum(spaces_its_punctuation(h) for h in spaced)
        print(f"{split:12s} {len(refs):6d} {m['cer']:7.4f} {m['wer']:7.2%} {m['wer_plain']:7.2%} {m['wer_pieces']:7.2%}"
              f"  {read_spaced} of {len(spaced)}")


if __name__ == "__main__":
    main()
