"""Score the readings a run.json holds with today's error measures, split by split.

run.json keeps every evaluation line's transcription and its reading by the
run's final decoder. This recomputes, without the model or the data, CER and
the three word error rates of error_counts: WER over the tokens as written,
the plain WER (case and punctuation dropped) and the piece WER (punctuation
marks and clitics as words of their own, so that only the space before them
is ignored, which the IAM-OnDB transcriptions write on some forms and not on
others: `Mr . Gaitskell`, `it.`). It also counts, per split, the lines whose
transcription spaces its punctuation (`word .`) more often than it attaches it
(`word.`), and how many of those the reading spaces. With --data-dir (the
IAM-OnDB folder the run read), it also splits each split's word edits by where
they come from (word_error_breakdown), with the dictionary the run's lm decoder
used, rebuilt from that folder's training and validation transcriptions: how
many fall on reference tokens outside the dictionary, which only spelling can
read. Run from the repository root:

    python benchmarks/rescore.py iam.json
    python benchmarks/rescore.py iam.json --splits validation validation2
    python benchmarks/rescore.py iam.json --data-dir DIR
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
    parser.add_argument("--data-dir", help="the IAM-OnDB folder the run read: also break the word errors down "
                                           "against the run's dictionary")
    args = parser.parse_args(argv)
    try:
        with open(args.run_json, encoding="utf-8") as f:
            run = json.load(f)
        predictions, config = run["predictions"], run.get("config", {})
        if not isinstance(config, dict):
            raise TypeError("its config is not an object")
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
    if args.data_dir:
        try:
            words = run_dictionary(args.data_dir, config, by_split)
        except ih.UserError as e:
            sys.exit(f"rescore.py: {e}")
        print(f"\nword edits against the run's dictionary of {len(words)} words "
              f"(oov: on a reference token with a piece outside it)")
        print(f"{'split':12s} {'tokens':>7s} {'oov tokens':>10s} {'read right':>10s} {'edits':>6s}  "
              f"{'oov':>5s} {'similar':>7s} {'other':>5s} {'deleted':>7s} {'inserted':>8s}  oov share")
        for split in args.splits or sorted(by_split):
            refs, hyps = zip(*by_split[split])
            known = ih.in_dictionary_tokens(refs, words)
            tokens = [tok for ref in refs for tok in ref.split()]
            oov_tokens = sum(tok not in known for tok in tokens)
            e = ih.word_error_breakdown(refs, hyps, known)
            edits = sum(e[k] for k in ("oov", "similar", "other", "deleted", "inserted"))
            print(f"{split:12s} {len(tokens):7d} {oov_tokens:10d} {oov_tokens - e['oov']:10d} {edits:6d}  "
                  f"{e['oov']:5d} {e['similar']:7d} {e['other']:5d} {e['deleted']:7d} {e['inserted']:8d}  "
                  f"{e['oov'] / max(edits, 1):.1%}")


def run_dictionary(data_dir, config, by_split):
    """The lm decoder's LM words (a set) for a run of `config` on the folder
    data_dir, whose transcriptions must be the ones the run's readings hold."""
    lines, _ = ih.load_iam_ondb(data_dir, log=lambda message: None)
    texts = {split: tuple(line.text for line in lines.get(split, ())) for split in ("train", "validation")}
    for split, pairs in by_split.items():
        if split in lines and sorted(t for t, _ in pairs) != sorted(line.text for line in lines[split]):
            raise ih.UserError(f"the {split} transcriptions of {data_dir} are not the ones the run read")
    settings = {k: config[k] for k in ("dictionary_size", "dictionary_file", "lm_file") if config.get(k) is not None}
    for name, value in settings.items():
        error = ih.setting_error(name, value)
        if error:
            raise ih.UserError(f"the run's config: {name} {error}")
    cfg = ih.RunConfig(task="iam-ondb", **settings)
    return set(ih.ranked_lm_words(cfg, texts)[:cfg.dictionary_size])


if __name__ == "__main__":
    main()
