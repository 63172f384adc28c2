"""Real English for the lm decoder: tokens, case, the real-English LM, ARPA and word-list files."""
import dataclasses
import json
import os
import re
import string
import subprocess
import sys
import types

import numpy as np
import pytest

import iam_handwriting as ih

# Lines in the style of IAM-OnDB's transcriptions (written here, not taken from the database).
LINES = [
    'A MOVE to stop Mr . Gaitskell', '"I don\'t know," she said, "but it\'s there."', "the man's hat - and Mr. Foot's",
    "(1) 15 years ago ... he 's gone", "U.S. troops; well-known 'Twas ...." , "Dr. O'Neill asked: why?!",
    "we 're here , they'll go", '"" # etc, (2). 7.', "It's 1953 - Labour's 're-think'", "I'm   spaced  out",
    "x", "'s", "'", "...", "Ma'am I'd you'VE SHE'S", "end.)",
]


@pytest.mark.parametrize("text", LINES)
def test_splitting_and_gluing_gives_back_the_transcription(text):
    pieces = ih.split_line(text)
    assert ih.glue_pieces(pieces) == " ".join(text.split())
    for token, group in zip(text.split(), _groups(pieces)):
        assert "".join(group) == token and all(group)


def _groups(pieces):
    groups = []
    for piece, glued in pieces:
        if glued:
            groups[-1].append(piece)
        else:
            groups.append([piece])
    return groups


def test_round_trip_on_many_random_lines_of_words_punctuation_and_clitics():
    rng = np.random.default_rng(0)
    parts = ["the", "Mr", "I", "1953", "don't", "'s", "'re", "well-known", "U.S", "A", "MOVE", "x"]
    punct = list(".,;:!?\"'()-#")
    for _ in range(2000):
        tokens = []
        for _ in range(rng.integers(1, 9)):
            core = str(rng.choice(parts)) if rng.random() < 0.9 else ""
            tok = "".join(rng.choice(punct, rng.integers(0, 3))) + core + "".join(rng.choice(punct, rng.integers(0, 3)))
            tokens.append(tok or ".")
        text = " ".join(tokens)
        assert ih.glue_pieces(ih.split_line(text)) == text


@pytest.mark.parametrize("token,pieces", [
    ("said,", ["said", ","]), ('"I', ['"', "I"]), ("man's", ["man", "'s"]), ("(2).", ["(", "2", ")", "."]),
    ("'s", ["'s"]), ("don't", ["don't"]), ("Mr.", ["Mr", "."]), ("-", ["-"]), ("they'll", ["they", "'ll"]),
    ("SHE'S", ["SHE", "'S"]), ("U.S.", ["U.S", "."]), ("'Twas", ["'", "Twas"]), ('it\'s."', ["it", "'s", ".", '"']),
])
def test_punctuation_and_clitics_are_split_off(token, pieces):
    assert ih.split_token(token) == pieces


def test_piece_kinds_and_lm_words():
    assert [ih.piece_kind(p) for p in ("said", ",", "'s", "'S", "1953", "don't", "...")] == \
        [ih.WORD, ih.PUNCT, ih.CLITIC, ih.CLITIC, ih.WORD, ih.WORD, ih.PUNCT]
    assert ih.lm_words('"I said, Mr. Foot\'s') == ['"', "i", "said", ",", "mr", ".", "foot", "'s"]


def test_case_probabilities_count_words_of_two_letters_or_more():
    logp = ih.case_log_probs(["The cat SAT on the mat", "I a McDonald"])  # lower 4, capital 1, upper 1; I, a, McDonald not
    np.testing.assert_allclose(np.exp([logp[c] for c in ih.CASES]), np.array([5, 2, 2]) / 9)


TRAIN = ["The cat sat on the mat .", '"I said , the cat \'s hat"', "A DOG sat .", "the cat sat ."]
VALID = ["the dog sat on the hat .", "the cat .", "a house by the water"]  # house, by, water: symspellpy only


def test_the_real_english_lm_normalises_and_mixes_both_sources():
    counts = ih.english_counts(tuple(TRAIN), tuple(VALID))
    assert {",", ".", '"', "'s"} <= set(counts.words)  # punctuation comes from the transcriptions
    assert 0 < counts.lam < 1 and counts.prob.sum() == pytest.approx(1.0)
    words = counts.words[:300]
    lm = ih.english_language_model(tuple(TRAIN), tuple(VALID), words, 2)
    V = len(words)
    for prev in (ih.LM_START, 0, words.index(","), V - 1):
        total = np.exp(ih.lm_log_prob(lm, np.full(V, prev), np.arange(V))).sum()
        total += 0.0 if prev == ih.LM_START else lm.p_end
        assert total == pytest.approx(1.0, abs=1e-9)
    # a pair the transcriptions hold twice is more probable than the word after any other
    cat, sat = words.index("cat"), words.index("sat")
    assert ih.lm_log_prob(lm, [cat], [sat])[0] > np.log((1 - lm.p_end) * lm.bigram.unigram[sat]) + 1


ARPA = """\\data\\
ngram 1=5
ngram 2=4

\\1-grams:
-1.0000\t<s>\t-0.3010
-0.6990\tthe\t-0.2218
-0.5229\tcat
-1.2000\t<unk>
-0.8239\t</s>

\\2-grams:
-0.3010\t<s> the
-0.1761\tthe cat
-0.2000\tcat </s>
-0.5000\tThe </s>

\\end\\
"""


def write(tmp_path, name, data):
    path = tmp_path / name
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return str(path)


def test_an_arpa_file_gives_its_own_probabilities_with_back_off(tmp_path):
    path = write(tmp_path, "lm.arpa", ARPA)
    ih.read_arpa.cache_clear()
    assert ih.arpa_vocabulary(ih.read_arpa(path)) == ("cat", "the")
    words = ("the", "cat", "dog")  # dog is not in the file: <unk>
    lm = ih.arpa_language_model(path, words, 2)
    lp = lambda prev, nxt: float(ih.lm_log_prob(lm, [prev], [nxt])[0]) / np.log(10)  # noqa: E731
    assert lp(ih.LM_START, 0) == pytest.approx(-0.3010)  # listed <s> the
    assert lp(ih.LM_START, 1) == pytest.approx(-0.3010 - 0.5229)  # bo(<s>) + p(cat)
    assert lp(0, 1) == pytest.approx(-0.1761)
    assert lp(0, 2) == pytest.approx(-0.2218 - 1.2)  # bo(the) + p(<unk>)
    assert lp(1, 0) == pytest.approx(-0.6990)  # cat has no back-off weight: 0
    end = lambda prev: float(ih.lm_end_log_prob(lm, [prev])[0]) / np.log(10)  # noqa: E731
    assert end(1) == pytest.approx(-0.2) and end(0) == pytest.approx(-0.5)  # "The </s>" is read lower-cased
    assert end(2) == pytest.approx(-0.8239)
    unigram = ih.arpa_language_model(path, words, 1)
    assert float(ih.lm_log_prob(unigram, [0], [1])[0]) / np.log(10) == pytest.approx(-0.5229)


def test_a_word_list_is_one_word_per_line_in_order(tmp_path):
    path = write(tmp_path, "words.txt", "the\nCat\n\n  dog \nthe\n,\n")
    ih.read_word_list.cache_clear()
    assert ih.read_word_list(path) == ("the", "cat", "dog", ",")


def _fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("make,message", [
    (lambda t: write(t, "a", "ngram 1=1\n"), "does not start with \\\\data\\\\"),
    (lambda t: write(t, "a", ARPA.replace("ngram 1=5", "ngram 1=6")), "declares 6 1-grams, the file lists 5"),
    (lambda t: write(t, "a", ARPA.replace("-0.5229", "abc")), "line 8: 'abc' is not a number"),
    (lambda t: write(t, "a", ARPA.replace("-0.5229", "nan")), "not a finite log10 value"),
    (lambda t: write(t, "a", ARPA.replace("-0.5229", "0.5")), "not a finite log10 value"),
    (lambda t: write(t, "a", ARPA.replace("-0.1761\tthe cat", "-0.1761\tthe")), "expected log10p, 2 words"),
    (lambda t: write(t, "a", ARPA.replace("\\end\\\n", "")), "no \\\\end\\\\"),
    (lambda t: write(t, "a", ARPA.replace("-0.8239\t</s>\n", "").replace("ngram 1=5", "ngram 1=4")), "no </s>"),
    (lambda t: write(t, "a", ARPA.replace("ngram 2=4", "ngram 2=x")), "expected 'ngram N=count'"),
    (lambda t: write(t, "a", ARPA.replace("ngram 1=5", "ngram 1=999999999")), "n-grams; at most"),
    (lambda t: write(t, "a", b"\\data\\\n\x00\x01\x02"), "binary data"),
    (lambda t: write(t, "a", b"\\data\\\n\xff\xfe"), "not UTF-8"),
    (lambda t: str(t / "missing.arpa"), "No such file"),
    (_fifo, "not a regular file"),
    (lambda t: str(t), "not a regular file"),
])
def test_malformed_arpa_files_give_one_clear_line(tmp_path, make, message):
    ih.read_arpa.cache_clear()
    with pytest.raises(ih.UserError, match=message) as e:
        ih.read_arpa(make(tmp_path))
    assert "\n" not in str(e.value) and "--lm" in str(e.value)


def test_an_arpa_file_over_the_size_bound_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(ih, "MAX_LM_FILE_BYTES", 100)
    ih.read_arpa.cache_clear()
    with pytest.raises(ih.UserError, match="at most"):
        ih.read_arpa(write(tmp_path, "a", ARPA))


@pytest.mark.parametrize("data,message", [
    ("the cat\n", "more than one word"), ("", "holds no words"), ("\n\n", "holds no words"),
    (b"the\x00\n", "binary data"), ("a" * 101 + "\n", "not a word"), ("ok\n\x07bell\n", "not a word"),
])
def test_malformed_word_lists_give_one_clear_line(tmp_path, data, message):
    ih.read_word_list.cache_clear()
    with pytest.raises(ih.UserError, match=message) as e:
        ih.read_word_list(write(tmp_path, "w", data))
    assert "\n" not in str(e.value) and "--dictionary" in str(e.value)


def run_cli(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(root, "iam_handwriting.py"), *map(str, args)], cwd=root,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag,make,message", [
    ("--lm", lambda t: write(t, "a", "\\data\\\nngram 1=1\n\n\\1-grams:\n-1\tthe\n"), "no \\\\end\\\\"),
    ("--lm", lambda t: write(t, "a", b"\x7fELF\x00\x00"), "binary data"),
    ("--lm", lambda t: str(t / "missing"), "No such file"),
    ("--lm", _fifo, "not a regular file"),
    ("--lm", lambda t: "", "the path is empty"),
    ("--dictionary", lambda t: write(t, "w", "two words\n"), "more than one word"),
    ("--dictionary", _fifo, "not a regular file"),
])
def test_bad_lm_and_dictionary_files_exit_2_with_one_line_before_any_work(tmp_path, flag, make, message):
    r = run_cli("--task", "lines", "--quick", "--decoder", "lm", flag, make(tmp_path))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), r.stderr
    assert "Traceback" not in r.stderr and "epoch" not in r.stdout


def test_an_lm_beam_whose_decoding_would_take_days_is_refused_with_its_estimate():
    line = ih.Sample("a b", np.zeros((700, 3)), [1], np.zeros((700, 2)), np.zeros(700), None)
    data = types.SimpleNamespace(eval_sets={"validation": [line] * 1438, "test": [line] * 3859})
    cfg = ih.RunConfig(task="iam-ondb", decoder="lm", lm_beam=64)
    assert ih.check_lm_decoding_time(cfg, data, 2) < ih.LM_TIME_LIMIT  # the shipped beam passes
    with pytest.raises(ih.UserError, match=r"--lm-beam 1000000: the lm decoding would take about \d+ hours") as e:
        ih.check_lm_decoding_time(dataclasses.replace(cfg, lm_beam=10**6), data, 2)
    assert "\n" not in str(e.value)
    # the estimate grows with the beam, the lines and the experiment's sizes
    seconds = [ih.lm_decoding_seconds(dataclasses.replace(cfg, lm_beam=b), data, n) for b, n in ((64, 0), (640, 0), (64, 3))]
    assert seconds[0] < seconds[1] and seconds[0] < seconds[2]
    # and the lines are dealt over the run's processes
    assert ih.lm_decoding_seconds(dataclasses.replace(cfg, workers=2), data, 0) == pytest.approx(seconds[0] / 2)


@pytest.mark.skipif(not os.environ.get("IAM_ONDB_DIR"), reason="set IAM_ONDB_DIR to the IAM-OnDB folder to run")
def test_every_real_transcription_splits_and_glues_back():
    """Opt-in, on the real database (never in CI): the tokenisation round trip on every line."""
    lines, _ = ih.load_iam_ondb(os.environ["IAM_ONDB_DIR"], log=lambda *a: None)
    texts = [line.text for split in lines.values() for line in split]
    assert len(texts) > 10_000
    assert all(ih.glue_pieces(ih.split_line(t)) == " ".join(t.split()) for t in texts)


def confident(text, alphabet, rng, p=0.9, frames=3):
    """(T, K) log-probs of a network sure of `text`: each character for one frame, then blanks."""
    K = len(alphabet) + 1
    path = [c for ch in ih.encode(text, alphabet) for c in [ch] + [0] * (frames - 1)]
    lp = np.log(np.full((len(path) + 2, K), (1 - p) / (K - 1)))
    lp[np.arange(len(path)) + 1, path] = np.log(p)
    lp[[0, -1], 0] = np.log(p)
    z = lp + rng.normal(0, 0.2, size=lp.shape)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_the_real_english_decoder_reads_back_capitals_punctuation_and_a_spelled_number():
    rng = np.random.default_rng(1)
    text = '"The cat sat," said Mr. FOOT in 1953.'
    alphabet = "".join(sorted(set(text + "".join(TRAIN) + "0123456789 ")))
    texts = {"train": tuple(TRAIN), "validation": tuple(VALID)}
    cfg = ih.RunConfig(task="iam-ondb", decoder="lm", dictionary_size=2000, oov="chars", lm_beam=64)
    decode = ih.make_decoder("lm", cfg, alphabet, texts=texts)
    assert decode([confident(text, alphabet, rng)]) == [text]
    without = ih.make_decoder("lm", dataclasses.replace(cfg, oov="none"), alphabet, texts=texts)
    assert "1953" not in without([confident(text, alphabet, rng)])[0]  # no digit string is in the dictionary


def tiny_real_english(rng, letters=string.ascii_lowercase, test_texts=("the dog 's hat .", "on the mat")):
    """(params, data): a tiny untrained network and real-English validation and test lines
    (test_texts) of noise; the alphabet holds their characters and `letters`."""
    alphabet = "".join(sorted(set("".join(TRAIN + VALID) + "019 " + letters)))
    params = ih.init_params(rng, hidden=4, in_dim=3, n_classes=len(alphabet) + 1)

    def sample(text):
        T = 2 * len(text) + 2
        return ih.Sample(text, rng.normal(size=(T, 3)).astype(np.float32), ih.encode(text, alphabet), np.zeros((T, 2)),
                         np.zeros(T), None, "w1")
    validation = [sample(t) for t in VALID + ["the cat 19 .", "a dog ."]]
    test = [sample(t) for t in test_texts]
    data = ih.TaskData(alphabet, {"validation": validation, "test": test}, None, 0, np.zeros(3), np.ones(3), 0.0, [],
                       {}, lm_texts={"train": tuple(TRAIN), "validation": tuple(VALID)})
    return params, data


def test_the_dictionary_experiment_decodes_chunk_by_chunk_and_reports_oov_modes_oov_rates_and_perplexity(monkeypatch):
    """A tiny untrained network on real-English lines: every row, the OOV comparison on
    validation, perplexity and OOV rate per size, and a block the figure script accepts."""
    import visualize_iam_handwriting as viz
    params, data = tiny_real_english(np.random.default_rng(0), letters="",
                                     test_texts=("the dog 's hat .", "A cat 10 sat", "on the mat"))
    alphabet, test = data.alphabet, data.eval_sets["test"]
    chunks = []
    real_outputs = ih.model_outputs

    def outputs(params, samples, data):
        for idx, lps in real_outputs(params, samples, data):
            chunks.append(len(idx))
            yield idx, lps
    monkeypatch.setattr(ih, "model_outputs", outputs)
    monkeypatch.setattr(ih, "EVAL_BATCH", 1)  # one line a chunk
    dec = ih.dictionary_experiment(params, ih.RunConfig(task="iam-ondb", lm_beam=4), data, [30, 80],
                                   log=lambda *a: None)
    assert chunks == [1] * (3 + 2 + len(test))  # tuning, check and test lines, one chunk at a time
    assert {(r["size"], r["decoder"]) for r in dec["rows"]} == {(s, d) for s in (30, 80)
                                                                for d in ("greedy", "dictionary", "unigram", "bigram")}
    assert all(r["split"] == "test" and r["n"] == 3 and 0 <= r["oov_rate"] <= 1 for r in dec["rows"])
    assert set(dec["oov_modes"]) == set(ih.OOV_MODES) and dec["oov"] in ih.OOV_MODES
    assert dec["oov_check_lines"] == 2 and dec["tuning_lines"] == 3  # every other validation line each
    assert dec["beam_check"] == {"beam": 4, "wider": 64, "lines": 2, "changed": dec["beam_check"]["changed"]}
    assert set(dec["perplexity"]) == {"30", "80"} and all(p >= 1 for v in dec["perplexity"].values() for p in v.values())
    oov = {r["size"]: r["oov_rate"] for r in dec["rows"]}
    assert oov[80] <= oov[30]
    task = {"name": "iam-ondb", "alphabet": alphabet, "splits": ["validation", "test"], "monitor": ["validation"]}
    checked = viz.check_decoding(viz.Field(json.loads(json.dumps(dec)), "decoding"), task)
    assert len(checked["rows"]) == 8 and set(checked["perplexity"]) == {30, 80}


def test_the_lm_decoding_dealt_over_a_pool_reads_every_line_as_one_process_does():
    """The dictionary experiment (its tuning, OOV comparison, beam check and every decoder) with
    the lm decoder's lines dealt over two processes: the same rows, and the worker did take jobs."""
    params, data = tiny_real_english(np.random.default_rng(0), letters="",
                                     test_texts=("the dog 's hat .", "A cat 10 sat", "on the mat", "a dog ."))
    cfg = ih.RunConfig(task="iam-ondb", lm_beam=4)
    alone = ih.dictionary_experiment(params, cfg, data, [30], log=lambda *a: None)
    pool = ih.Pool(2)
    try:
        dealt = ih.dictionary_experiment(params, cfg, data, [30], log=lambda *a: None, parallel_map=pool.map)
        jobs = pool.jobs
    finally:
        pool.close()
    assert jobs > 30  # every tuning point and decoder sent half its lines to the worker

    def strip(decoding):
        return [{k: v for k, v in r.items() if k != "seconds_per_seq"} for r in decoding["rows"]]
    assert strip(dealt) == strip(alone)
    assert dealt["beam_check"] == alone["beam_check"] and dealt["oov_modes"].keys() == alone["oov_modes"].keys()
    assert all(dealt["oov_modes"][m]["wer"] == alone["oov_modes"][m]["wer"] for m in ih.OOV_MODES)


# The headline run's lm decoder is tuned on validation lines (--lm-tuning)


def test_the_final_lm_decoder_is_tuned_on_every_kth_validation_line_and_run_json_keeps_the_choice(monkeypatch):
    params, data = tiny_real_english(np.random.default_rng(0))
    seen = []

    def tune(cfg, log_probs, refs, lex, lm, parallel_map=None):
        seen.append(refs)
        return 2.0, -4.0, 8.0  # values no default has
    monkeypatch.setattr(ih, "tune_lm_decoder", tune)
    task = dataclasses.replace(ih.TASKS["iam-ondb"], make_data=lambda cfg, streams, pmap, log: data)
    monkeypatch.setitem(ih.TASKS, "iam-ondb", task)
    cfg = ih.RunConfig(task="iam-ondb", decoder="lm", lm_tuning=2, lm_beam=4, dictionary_size=80, oov="chars")
    _, result = ih.train_and_evaluate(cfg, params, verbose=False)
    validation = data.eval_sets["validation"]
    assert seen == [[s.text for s in validation[::2]]]  # 5 lines // 2: every 2nd
    assert (result["config"]["lm_weight"], result["config"]["word_penalty"], result["config"]["oov_penalty"]) == \
        (2.0, -4.0, 8.0)  # what decoded the final evaluation, and what a saved model carries
    assert {k: result["lm_tuning"][k] for k in ("lines", "lm_weight", "word_penalty", "oov_penalty")} == \
        {"lines": 3, "lm_weight": 2.0, "word_penalty": -4.0, "oov_penalty": 8.0}
    assert set(result["final"]["test"]) >= {"cer", "wer", "greedy"}  # the greedy reading beside the lm decoder's
    _, untuned = ih.train_and_evaluate(dataclasses.replace(cfg, lm_tuning=0), params, verbose=False)
    assert untuned["lm_tuning"] is None and untuned["config"]["lm_weight"] == 1.0 and len(seen) == 1


def test_the_iam_ondb_headline_is_the_chosen_recipe_and_a_given_weight_needs_tuning_off(tmp_path):
    defaults = ih.TASKS["iam-ondb"].defaults
    assert (defaults["layers"], defaults["epochs"], defaults["augment"], defaults["oov"], defaults["lm_tuning"],
            defaults["lm_beam"]) == (2, 15, 1.0, "char-bigram", 400, 1024)
    r = run_cli("--task", "iam-ondb", "--data-dir", tmp_path, "--decoder", "lm", "--lm-weight", "2", "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "add --lm-tuning 0" in lines[0], r.stderr
    r = run_cli("--task", "iam-ondb", "--data-dir", tmp_path / "none", "--decoder", "lm", "--lm-weight", "2",
                "--lm-tuning", "0", "--quiet")
    assert r.returncode == 2 and "folder not found" in r.stderr, r.stderr  # past the check, to the data
    r = run_cli("--task", "words", "--lm-tuning", "5")
    assert r.returncode == 2 and "--lm-tuning is for the lines and iam-ondb tasks" in r.stderr, r.stderr
