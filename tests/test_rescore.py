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
    (tmp_path / "run.json").write_text(json.dumps({"predictions": []}))
    r = rescore(tmp_path / "run.json", "--splits", "test")
    assert r.returncode != 0 and "holds no readings of test" in r.stderr and len(r.stderr.splitlines()) == 1
