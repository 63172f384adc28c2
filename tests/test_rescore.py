"""benchmarks/rescore.py: a run.json's readings scored again, and its errors on bad files."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rescore(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rescore.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_rescore_gives_each_split_its_three_word_error_rates(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"predictions": [
        {"split": "validation", "text": "Mr . Brown said", "decoded": "Mr. Brown said"},
        {"split": "validation", "text": "it was", "decoded": "it is"},
        {"split": "test", "text": "Yes .", "decoded": "Yes ."}]}))
    r = rescore(run, "--splits", "validation")
    assert r.returncode == 0, r.stderr
    row = r.stdout.splitlines()[1].split()
    # As written 3 of the 6 tokens are wrong (Mr ., was); plain 1 of 5 and pieces 1 of 6 (was).
    assert row[:2] == ["validation", "2"] and row[3:6] == ["50.00%", "20.00%", "16.67%"]
    assert r.stdout.rstrip().endswith("0 of 1") and "test" not in r.stdout


def test_rescore_refuses_a_missing_file_and_an_absent_split(tmp_path):
    r = rescore(tmp_path / "none.json")
    assert r.returncode != 0 and "cannot read" in r.stderr and len(r.stderr.splitlines()) == 1
    (tmp_path / "run.json").write_text(json.dumps({"predictions": [{"split": "test", "text": 1, "decoded": "a"}]}))
    r = rescore(tmp_path / "run.json")
    assert r.returncode != 0 and "must be strings" in r.stderr and len(r.stderr.splitlines()) == 1
    (tmp_path / "run.json").write_text(json.dumps({"config": [], "predictions": []}))
    r = rescore(tmp_path / "run.json")
    assert r.returncode != 0 and "config is not an object" in r.stderr and len(r.stderr.splitlines()) == 1
    (tmp_path / "run.json").write_text(json.dumps({"predictions": []}))
    r = rescore(tmp_path / "run.json", "--splits", "test")
    assert r.returncode != 0 and "holds no readings of test" in r.stderr and len(r.stderr.splitlines()) == 1


def test_rescore_splits_the_word_errors_against_the_dictionary_rebuilt_from_the_folder(tmp_path):
    import iam_handwriting as ih

    texts = {"train": "the cat zxqv", "validation": "qqzj said zxqv", "test": "a dog"}
    samples = {split: [ih.render_writer_line(text, split, 0, 100 + i)] for i, (split, text) in enumerate(texts.items())}
    ih.export_iam_ondb(tmp_path / "db", samples, log=lambda message: None)
    run = tmp_path / "run.json"
    # qqzj is in no dictionary and read wrong; said is in it and read wrong; zxqv, read right, is in the
    # dictionary only as a training token
    run.write_text(json.dumps({"config": {"dictionary_size": 20000}, "predictions": [
        {"split": "validation", "text": "qqzj said zxqv", "decoded": "qqz sand zxqv"},
        {"split": "test", "text": "a dog", "decoded": "a dog zxqv"}]}))
    r = rescore(run, "--data-dir", tmp_path / "db")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.split("word edits")[1].splitlines()[2:]}
    # tokens, oov tokens, read right, edits, oov, similar, other, deleted, inserted, oov share
    assert rows["validation"][1:11] == ["3", "1", "0", "2", "1", "1", "0", "0", "0", "50.0%"]
    assert rows["test"][1:11] == ["2", "0", "0", "1", "0", "0", "0", "0", "1", "0.0%"]
    # readings of other transcriptions than the folder's are refused in one line
    run.write_text(json.dumps({"predictions": [{"split": "validation", "text": "the end", "decoded": "the end"}]}))
    r = rescore(run, "--data-dir", tmp_path / "db")
    assert r.returncode != 0 and "are not the ones the run read" in r.stderr and len(r.stderr.splitlines()) == 1
    # and a run.json whose dictionary settings are no settings, in one line too
    for size, message in (("abc", "must be a whole number"), (-5, "must lie in 1..")):
        run.write_text(json.dumps({"config": {"dictionary_size": size}, "predictions": [
            {"split": "test", "text": "a dog", "decoded": "a dog"}]}))
        r = rescore(run, "--data-dir", tmp_path / "db")
        assert r.returncode != 0 and f"dictionary_size {message}" in r.stderr and len(r.stderr.splitlines()) == 1
