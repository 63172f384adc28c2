"""The command line end to end, in subprocesses: run.json, determinism,
saved models, and one-line errors for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS = {"schema_version", "task", "config", "env", "history", "final", "per_word", "alignments", "predictions",
            "timing", "skipped", "wall_seconds", "split"}


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "iam_handwriting.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def metrics(doc):
    """Everything in run.json that must not depend on timing."""
    history = [{k: v for k, v in e.items() if k != "seconds"} for e in doc["history"]]
    return history, doc["final"], doc["per_word"], doc["predictions"], doc["alignments"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quick")
    r = cli("--quick", "--seed", 3, "--save-json", folder / "nested" / "run.json", "--save-model", folder / "model.npz")
    assert r.returncode == 0, r.stderr
    return folder, r.stdout, json.loads((folder / "nested" / "run.json").read_text())


def test_quick_run_writes_a_complete_run_json(quick_run):
    folder, stdout, doc = quick_run
    assert RUN_KEYS <= doc.keys()
    assert doc["schema_version"] == 2
    assert doc["task"]["name"] == "words" and doc["task"]["splits"] == ["in_vocab", "held_out"]
    cfg = doc["config"]
    assert cfg["seed"] == 3 and cfg["epochs"] == len(doc["history"]) > 0
    for split in ("in_vocab", "held_out"):
        assert set(doc["final"][split]) == {"cer", "wer", "word_acc", "wer_plain", "wer_pieces", "loss"}
        assert doc["final"][split]["word_acc"] == pytest.approx(1 - doc["final"][split]["wer"])
        assert 0.0 <= doc["final"][split]["word_acc"] <= 1.0
    assert len(doc["history"][0]["in_vocab"]) == 6 and "train_loss" in doc["history"][0]
    train, held = doc["split"]["train_words"], doc["split"]["held_out_words"]
    assert len(train) == 38 and len(held) == 9
    n_eval = cfg["eval_repeats"] * 47
    assert len(doc["predictions"]) == n_eval
    assert {p["split"] for p in doc["predictions"] if p["text"] in held} == {"held_out"}
    assert set(doc["per_word"]) == set(train) | set(held)
    short, long = doc["alignments"]
    assert len(short["text"]) < len(long["text"]) and short["text"] in train and long["text"] in train
    T = len(long["xy"])
    assert np.shape(long["log_probs"]) == (T, 11) and len(long["char_of"]) == T == len(long["argmax_path"])
    assert {"data", "forward", "ctc", "backward", "optimiser", "evaluation"} <= doc["timing"].keys()
    assert doc["skipped"] == 0 and doc["wall_seconds"] > 0
    assert doc["env"]["numpy"] == np.__version__
    # one log line per epoch plus the summary
    assert sum(line.startswith("epoch") for line in stdout.splitlines()) == cfg["epochs"]
    assert "held-out CER" in stdout and "final held_out" in stdout


def test_same_seed_gives_identical_metrics(quick_run, tmp_path):
    _, _, first = quick_run
    r = cli("--quick", "--seed", 3, "--quiet", "--save-json", tmp_path / "again.json")
    assert r.returncode == 0, r.stderr
    assert "epoch" not in r.stdout  # --quiet
    assert metrics(json.loads((tmp_path / "again.json").read_text())) == metrics(first)


def test_saved_model_reproduces_the_metrics_when_loaded(quick_run, tmp_path):
    folder, _, trained = quick_run
    r = cli("--load-model", folder / "model.npz", "--save-json", tmp_path / "loaded.json")
    assert r.returncode == 0, r.stderr
    loaded = json.loads((tmp_path / "loaded.json").read_text())
    assert loaded["history"] == []
    assert loaded["config"] == trained["config"]
    assert loaded["final"] == trained["final"]
    assert loaded["predictions"] == trained["predictions"]


def test_lexicon_experiment_runs_on_a_saved_quick_model(quick_run, tmp_path):
    folder, _, trained = quick_run
    r = cli("--load-model", folder / "model.npz", "--decoder", "lexicon", "--beam-width", "4",
            "--lexicon-sizes", "200,47", "--save-json", tmp_path / "dec.json")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "dec.json").read_text())
    assert doc["config"]["decoder"] == "lexicon" and doc["config"]["beam_width"] == 4
    dec = doc["decoding"]
    assert dec["sizes"] == [47, 200] and dec["beam_width"] == 4 and dec["kind"] == "lexicon"
    assert len(dec["rows"]) == 2 * 3 * 2  # sizes x decoders x splits
    by_key = {(row["size"], row["decoder"], row["split"]): row for row in dec["rows"]}
    for split in ("in_vocab", "held_out"):
        greedy = by_key[47, "greedy", split]
        assert greedy["word_acc"] == pytest.approx(trained["final"][split]["word_acc"])
        for d in ("greedy", "beam"):  # they ignore the lexicon: the same row for every size
            assert {**by_key[200, d, split], "size": 47} == by_key[47, d, split]
        # the 47-word lexicon decoder is what the final evaluation used
        assert by_key[47, "lexicon", split]["word_acc"] == pytest.approx(doc["final"][split]["word_acc"])
        assert all(by_key[n, d, split]["seconds_per_seq"] > 0 for n in (47, 200) for d in ("greedy", "lexicon"))
    assert "decoder" in r.stdout and "decoding experiment" in r.stdout
    decoded = {p["decoded"] for p in doc["predictions"]}
    assert decoded <= set(doc["split"]["train_words"]) | set(doc["split"]["held_out_words"])


def corrupt_model(folder):
    path = folder / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 this is not really a zip file")
    return path


def wrong_shapes_model(folder):
    path = folder / "wrong.npz"
    cfg = {"hidden": 5}
    np.savez(path, __config__=np.array(json.dumps(cfg)), out_W=np.zeros((3, 3)))
    return path


def model_with(folder, name, change_config=None, change_arrays=None):
    """A copy of the quick run's model file with its config or arrays altered."""
    with np.load(folder / "model.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    cfg = json.loads(str(arrays.pop("__config__")))
    cfg.update(change_config or {})
    arrays.update(change_arrays or {})
    path = folder / name
    np.savez(path, __config__=np.array(json.dumps(cfg)), **arrays)
    return path


@pytest.mark.parametrize("config,arrays,message", [
    ({"dtype": "float16"}, None, "invalid config"),
    ({"hidden": -2}, None, "invalid config"),
    ({"no_such_field": 1}, None, "invalid config"),
    (None, {"out_b": np.array(["a"] * 11)}, "not finite floating-point"),
    ({"seed": -1}, None, "invalid config"),
    ({"bidirectional": "no"}, None, "invalid config"),
    ({"eval_repeats": 10**9}, None, "invalid config"),
    ({"beam_width": 10**8}, None, "invalid config"),
    (None, {"out_b": np.full(11, np.nan)}, "not finite floating-point"),
])
def test_altered_model_files_exit_2_with_one_line(quick_run, tmp_path, config, arrays, message):
    folder, _, _ = quick_run
    path = model_with(folder, f"altered-{tmp_path.name}.npz", config, arrays)
    r = cli("--load-model", path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--epochs", "-1"], "--epochs"),
    (["--hidden", "0"], "--hidden"),
    (["--layers", "0"], "--layers"),
    (["--batch-size", "zero"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--seed", "-3"], "--seed"),
    (["--no-such-flag"], "unrecognized"),
    (["--decoder", "viterbi"], "--decoder"),
    (["--beam-width", "0"], "--beam-width"),
    (["--lexicon-sizes", "10,100"], "--lexicon-sizes"),
    (["--lexicon-sizes", "47,many"], "--lexicon-sizes"),
    (["--save-json", "{file}/run.json"], "cannot write"),
    (["--save-model", "{file}/model.npz"], "cannot write"),
    (["--save-json", "{folder}"], "is a folder"),
    (["--load-model", "{folder}/missing.npz"], "does not exist"),
    (["--load-model", "{corrupt}"], "not a model file"),
    (["--load-model", "{wrong}"], "model file"),
    (["--load-model", "{corrupt}", "--hidden", "8"], "cannot be combined"),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(args, message, tmp_path):
    (tmp_path / "a_file").write_text("x")
    values = {"file": tmp_path / "a_file", "folder": tmp_path, "corrupt": corrupt_model(tmp_path),
              "wrong": wrong_shapes_model(tmp_path)}
    # --epochs 0 keeps a run that gets through short; a model file holds its own epochs (refused with it)
    short = [] if "--epochs" in args or "--load-model" in args else ["--epochs", "0"]
    r = cli(*[a.format(**values) for a in args], *short, "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0]
    assert "error" in lines[0]


def test_init_from_a_model_starts_from_its_weights_and_refuses_one_of_another_shape(quick_run, tmp_path):
    folder, _, _ = quick_run
    started = cli("--quick", "--seed", 3, "--epochs", 0, "--init-from", folder / "model.npz",
                  "--save-json", tmp_path / "started.json")
    loaded = cli("--load-model", folder / "model.npz", "--save-json", tmp_path / "loaded.json")
    assert started.returncode == loaded.returncode == 0, started.stderr + loaded.stderr
    assert "initialised the LSTM from" in started.stdout
    final = [json.loads((tmp_path / f"{name}.json").read_text())["final"] for name in ("started", "loaded")]
    assert final[0] == final[1]
    r = cli("--quick", "--hidden", 16, "--init-from", folder / "model.npz")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "does not fit this run's (hidden 16" in lines[0], r.stderr
    assert "epoch" not in r.stdout


def test_init_from_is_checked_before_an_iam_ondb_run_reads_its_alphabet(quick_run):
    import iam_handwriting as ih
    folder, _, _ = quick_run
    model = str(folder / "model.npz")
    ih.check_init_model(ih.RunConfig(task="iam-ondb", features="raw", hidden=32, init_from=model))  # fits
    with pytest.raises(ih.UserError, match="does not fit"):
        ih.check_init_model(ih.RunConfig(task="iam-ondb", features="graves25", hidden=32, init_from=model))


NEW_FLAGS = [  # (task, flag, value, field): RunConfig fields that had no flag before
    ("words", "--word-repeats", "3", "word_repeats"), ("words", "--eval-repeats", "2", "eval_repeats"),
    ("words", "--holdout-frac", "0.3", "holdout_frac"), ("words", "--jitter", "0.02", "jitter"),
    ("words", "--slant-max", "0.5", "slant_max"), ("lines", "--eval-lines-per-writer", "3", "eval_lines_per_writer"),
    ("words", "--input-gain", "6", "input_gain"), ("words", "--dtype", "float64", "dtype"),
    ("words", "--lr-final", "0.5", "lr_final"), ("words", "--grad-clip", "1.5", "grad_clip"),
]


@pytest.mark.parametrize("task,flag,value,field", NEW_FLAGS)
def test_every_config_flag_reaches_the_config(task, flag, value, field):
    import iam_handwriting as ih
    args = ih.build_parser().parse_args(["--task", task, flag, value])
    ih.check_task_arguments(args, ih.TASKS[task])
    cfg = ih.config_from_args(args)
    kind = ih.CONFIG_FIELDS[field].type
    assert getattr(cfg, field) == ih.value_from_text(kind, value) != ih.CONFIG_FIELDS[field].default


@pytest.mark.parametrize("task,flag,value,field", NEW_FLAGS)
def test_every_training_flag_is_refused_with_load_model(task, flag, value, field):
    import iam_handwriting as ih
    with pytest.raises(ih.UserError, match=f"^{flag} cannot be combined with --load-model"):
        ih.check_arguments(ih.build_parser().parse_args(["--load-model", "m.npz", flag, value]))


def test_every_config_field_has_a_flag_or_a_reason():
    import iam_handwriting as ih
    # alphabet comes from the data; bidirectional is switched off with --unidirectional
    assert [n for n in ih.CONFIG_FIELDS if not ih.flag_name(n)] == ["alphabet", "bidirectional"]


@pytest.mark.parametrize("args,message", [
    (["--jitter", "0.6"], "--jitter: must lie in 0.0..0.5, got 0.6"),
    (["--holdout-frac", "0"], "--holdout-frac: must lie in above 0.0..0.9, got 0.0"),
    (["--lr-final", "1.5"], "--lr-final: must lie in 0.0..1.0, got 1.5"),
    (["--dtype", "float16"], "--dtype: must be one of float32, float64"),
    (["--task", "lines", "--jitter", "0.01"], "--jitter is for the words task, not lines"),
    (["--eval-lines-per-writer", "2"], "--eval-lines-per-writer is for the lines task, not words"),
])
def test_a_bad_or_misplaced_new_flag_exits_2_with_one_line(args, message):
    r = cli(*args, "--epochs", "0", "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0] and "error" in lines[0]
