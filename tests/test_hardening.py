"""Outputs that must not destroy anything, runs that fail cleanly, and bad model files.

Each class of failure is exercised once through a real (quick) run, not only
with --epochs 0, so failures that only show after training are covered too.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import with_ctrl_c

import iam_handwriting as ih

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--quick", "--epochs", "2"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "iam_handwriting.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, **kw)


def one_error_line(r, code=2):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stdout[-500:], r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


# ---------------------------------------------------------------------------
# The writer: regular files atomically, devices and FIFOs straight through
# ---------------------------------------------------------------------------


def test_regular_file_is_replaced_atomically_and_keeps_its_permissions(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    os.chmod(path, 0o640)
    ih.write_output(str(path), b"new", "test file")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_symlink_is_followed_and_stays_a_symlink(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    ih.write_output(str(link), b"new", "test file")
    assert link.is_symlink() and target.read_bytes() == b"new"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "not-yet.json")
    ih.write_output(str(dangling), b"made", "test file")
    assert dangling.is_symlink() and (tmp_path / "not-yet.json").read_bytes() == b"made"


def test_fifo_is_written_through_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    ih.write_output(str(fifo), b"through the pipe", "test file")
    reader.join(timeout=10)  # a daemon: if the FIFO was replaced, the blocked reader cannot hang the tests
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_character_device_is_written_through_not_replaced(tmp_path):
    device = tmp_path / "null"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a private /dev/null
    except (PermissionError, OSError):
        pytest.skip("creating a device node needs root")
    ih.write_output(str(device), b"x" * 1000, "test file")
    assert stat.S_ISCHR(os.stat(device).st_mode)


@pytest.mark.parametrize("case,message", [
    ("folder", "is a folder"), ("trailing_slash", "folder separator"), ("read_only", "read-only"),
    ("long_name", "too long"), ("under_a_file", "is a file"),
])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, case, message):
    (tmp_path / "ro.json").write_text("keep")
    os.chmod(tmp_path / "ro.json", 0o444)
    (tmp_path / "a_file").write_text("x")
    path = {"folder": tmp_path, "trailing_slash": f"{tmp_path}/newdir/", "read_only": tmp_path / "ro.json",
            "long_name": tmp_path / ("x" * 300), "under_a_file": tmp_path / "a_file" / "run.json"}[case]
    with pytest.raises(ih.UserError, match=message):
        ih.check_writable(str(path), "run summary")
    assert (tmp_path / "ro.json").read_text() == "keep"


def test_a_long_but_legal_name_is_written(tmp_path):
    path = tmp_path / ("r" * 250)  # the temporary name must not add to it
    ih.check_writable(str(path), "run summary")
    ih.write_output(str(path), b"ok", "run summary")
    assert path.read_bytes() == b"ok"


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    path.write_text("previous run")

    def interrupted(*args):
        raise ih.Terminated()  # as SIGTERM arriving between writing and renaming

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(ih.Terminated):
        ih.write_output(str(path), b"half", "run summary")
    assert path.read_text() == "previous run"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


# ---------------------------------------------------------------------------
# The command line: refused before work, or failing cleanly after it
# ---------------------------------------------------------------------------


def test_one_path_for_two_outputs_or_an_input_is_refused(tmp_path):
    model = tmp_path / "m.npz"
    model.write_bytes(b"precious")
    for args in (["--load-model", model, "--save-json", model],
                 ["--save-json", tmp_path / "x", "--save-model", tmp_path / "x"],
                 ["--load-model", model, "--save-model", tmp_path / "." / "m.npz"]):
        line = one_error_line(cli(*args, "--epochs", "0") if "--load-model" not in args else cli(*args))
        assert "name the same file" in line
    assert model.read_bytes() == b"precious"


def test_trailing_slash_fails_before_training(tmp_path):
    r = cli(*QUICK, "--save-json", f"{tmp_path}/newdir/")
    assert "folder separator" in one_error_line(r)
    assert "epoch" not in r.stdout


def test_the_memory_check_counts_label_length_not_sequence_length(monkeypatch):
    """IAM-OnDB lines are up to ~2,200 samples but ~60 characters: the CTC lattice is
    (T, 2B, 2L + 1), and taking L ~ T / 2 refused the paper-sized run on a 24 GiB machine."""
    from types import SimpleNamespace
    import dataclasses
    monkeypatch.setattr(ih, "physical_memory", lambda: 16 * 2**30)
    line = SimpleNamespace(traj=np.zeros((2230, 25)), xy=np.zeros((2230, 2)), pen_up=np.zeros(2230), labels=[1] * 60)
    data = SimpleNamespace(eval_sets={"validation": [line], "test": [line]}, epoch_size=1, training_held=False)
    cfg = dataclasses.replace(ih.RunConfig(), task="lines", hidden=100, batch_size=8)
    ih.check_memory(cfg, data, training=True)  # about 1 GiB: accepted
    with pytest.raises(ih.UserError, match="GiB"):  # a step of 64 lines of 2,230 samples at H 1024: about 17 GiB
        ih.check_memory(dataclasses.replace(cfg, hidden=1024, batch_size=64), data, training=True)


@pytest.mark.parametrize("args,message", [
    (["--hidden", "100000"], "--hidden"), (["--layers", "1000"], "--layers"),
    (["--beam-width", "100000000"], "--beam-width"), (["--lm-beam", "0"], "--lm-beam"),
    (["--hidden", "1024", "--batch-size", "1024"], "GiB"),
    (["--task", "lines", "--lexicon-sizes", "100"], "--lexicon-sizes is for the words task"),
    (["--dictionary-sizes", "1000"], "not words"),
    (["--decoder", "lm"], "--decoder lm is not available for the words task"),
    (["--task", "lines", "--decoder", "lexicon"], "not available for the lines task"),
    (["--features", "graves25"], "--features is for the iam-ondb task"),
    (["--task", "iam-ondb"], "needs --data-dir"),
    (["--task", "lines", "--export-iam-ondb", "{file}"], "not a folder"),
])
def test_sizes_and_task_flags_are_checked_before_training(tmp_path, args, message):
    (tmp_path / "a_file").write_text("x")
    short = [] if "--export-iam-ondb" in args else ["--epochs", "0"]  # an export refuses training flags
    r = cli(*[a.format(file=tmp_path / "a_file") for a in args], *short)
    assert message in one_error_line(r)


def test_a_closed_stdout_does_not_stop_the_run_or_lose_results(tmp_path):
    out = tmp_path / "p.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "iam_handwriting.py"), *QUICK, "--save-json", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and json.loads(out.read_text())["schema_version"] == ih.SCHEMA_VERSION


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupting_training_is_one_line_and_writes_nothing(tmp_path, sig, code):
    out = tmp_path / "run.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "iam_handwriting.py"), "--epochs", "50", "--save-json",
                             str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=with_ctrl_c)
    assert proc.stdout.readline().startswith("memory:")
    assert proc.stdout.readline().startswith("epoch")  # training is under way
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [err.strip()] and "interrupted at epoch" in err and "nothing written" in err
    assert list(tmp_path.iterdir()) == []


def run_main(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["iam_handwriting.py"])
    code = ih.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_diverged_run_says_where_and_keeps_the_previous_model(tmp_path, monkeypatch, capsys):
    model = tmp_path / "m.npz"
    model.write_bytes(b"the good model")
    real_ctc = ih.ctc_loss
    calls = []

    def blows_up(log_probs, lengths, targets):
        calls.append(1)
        nll, grad = real_ctc(log_probs, lengths, targets)
        return (nll * np.nan, grad) if len(calls) == 5 else (nll, grad)

    monkeypatch.setattr(ih, "ctc_loss", blows_up)
    code, out, err = run_main(monkeypatch, capsys, *QUICK, "--save-model", model, "--save-json", tmp_path / "r.json")
    assert code == 3
    assert err.count("\n") == 1 and "diverged at epoch 1, step 5: loss is nan" in err and "nothing written" in err
    assert model.read_bytes() == b"the good model" and not (tmp_path / "r.json").exists()


def test_impossible_alignments_are_counted_apart_from_divergence():
    cfg = ih.RunConfig(hidden=4)
    data = ih.TASKS["words"].make_data(cfg, ih.make_streams(0), ih.serial_map, print)
    params = {k: v.astype(np.float32) for k, v in ih.init_params(np.random.default_rng(0), hidden=4).items()}
    good = ih.render_word("ant", np.random.default_rng(1))
    short = ih.Sample("nunnun", good.traj[:4], [6, 10, 6, 6, 10, 6], good.xy[:4], good.pen_up[:4], None)
    _, _, skipped = ih.train_step(params, ih.adam_init(params), [good, short], 1e-3, cfg, data, ih.Timer())
    assert skipped == 1
    broken = ih.Sample("ant", good.traj * np.nan, good.labels, good.xy, good.pen_up, None)
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises(ih.Diverged, match="loss is nan"), np.errstate(all="ignore"):
        ih.train_step(params, ih.adam_init(params), [broken], 1e-3, cfg, data, ih.Timer())
    assert all(np.array_equal(before[k], params[k]) for k in params)  # nothing applied


def test_a_failed_final_write_keeps_a_copy_and_says_where(tmp_path, monkeypatch, capsys, model_write_fails):
    code, out, err = run_main(monkeypatch, capsys, *QUICK, "--save-model", tmp_path / "m.npz")
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err
    rescued = err.split("a copy was saved to ")[1].strip()
    params, cfg = ih.load_model(rescued)  # the trained model is not lost
    assert cfg.epochs == 2
    os.unlink(rescued)


# ---------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------


def altered(model_file, tmp_path, drop=(), **changes):
    with np.load(model_file, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    cfg = json.loads(str(arrays.pop("__config__")))
    cfg.update(changes)
    for key in drop:
        cfg.pop(key)
    path = tmp_path / "altered.npz"
    np.savez(path, __config__=np.array(json.dumps(cfg)), **arrays)
    return path


@pytest.mark.parametrize("drop,changes,message", [
    ((), {"seed": -1}, "seed must lie in"),
    ((), {"bidirectional": "no"}, "bidirectional must be bool"),
    ((), {"eval_repeats": 10**9}, "eval_repeats must lie in"),
    ((), {"beam_width": 10**8}, "beam_width must lie in"),
    (("hidden",), {}, "missing config keys: hidden"),
    ((), {"task": "poetry"}, "task must be one of"),
])
def test_bad_model_configs_are_refused_in_one_line(quick_model_file, tmp_path, drop, changes, message):
    line = one_error_line(cli("--load-model", altered(quick_model_file, tmp_path, drop, **changes)))
    assert "invalid config" in line and message in line


def test_a_model_file_from_before_tasks_loads_as_a_words_model(quick_model_file, tmp_path):
    path = altered(quick_model_file, tmp_path, drop=ih.FIELDS_ADDED_AFTER_SCHEMA_1)
    params, cfg = ih.load_model(str(path))
    assert cfg.task == "words" and cfg.features == "raw"


@pytest.mark.parametrize("content,message", [
    (b"not a zip at all", "not a model file"), (None, "pickled objects"),
    (b"root:x:0:0:root:/root:/bin/bash\n", "not an npz archive"), (b"\x80\x04K\x01.", "a Python pickle"),
])
def test_files_that_are_not_model_files_say_so(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    if content is None:
        with open(path, "wb") as f:
            np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(content)
    assert message in one_error_line(cli("--load-model", path))
