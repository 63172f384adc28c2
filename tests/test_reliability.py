"""Hostile input that must neither hang, exhaust memory, lose results, be silently ignored nor
end in a traceback (issue 14).

IAM-OnDB folders here are the small hand-written fixtures of test_iamondb_io.py with one file
changed; runs that could exhaust memory before their fix run in a subprocess with a capped
address space, so a regression fails the test instead of the machine.
"""
import dataclasses
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import iam_handwriting as ih
from iam_handwriting import IamOnDbError
from test_iamondb_io import REFERENCE_LINE, one_line_ascii, quiet, write_reference_db, write_text

ROOT = Path(__file__).resolve().parents[1]
LINE = "lineStrokes/a01/a01-000/a01-000u-02.xml"  # a training line of the reference folder
MEMORY_CAP = 3 * 2**30  # address space of a capped subprocess


def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def cli(*args, capped=False, timeout=300, **kw):
    return subprocess.run([sys.executable, str(ROOT / "iam_handwriting.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_cap_memory if capped else None, **kw)


def one_error_line(r, code=2):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def run_fx(folder, *extra):
    """The audit's run on a changed IAM-OnDB folder, in a memory-capped subprocess."""
    return cli("--task", "iam-ondb", "--data-dir", folder, "--quick", "--epochs", "0", "--workers", "1", *extra,
               capped=True, timeout=120)


def load_in_thread(folder, timeout=20):
    """load_iam_ondb in a daemon thread: a hang fails the test instead of blocking it."""
    outcome = []

    def target():
        try:
            outcome.append(ih.load_iam_ondb(folder, log=quiet))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"load_iam_ondb still running after {timeout} s"
    return outcome[0]


# ---------------------------------------------------------------------------
# Files of the database: regular files of bounded size only
# ---------------------------------------------------------------------------


def test_a_fifo_as_line_file_is_refused_in_one_line_instead_of_hanging(tmp_path):
    root = write_reference_db(tmp_path)
    os.remove(os.path.join(root, LINE))
    os.mkfifo(os.path.join(root, LINE))
    outcome = load_in_thread(root)
    assert isinstance(outcome, IamOnDbError) and "FIFO" in str(outcome) and LINE in str(outcome), outcome


def test_a_line_file_linked_to_dev_zero_is_refused_naming_it(tmp_path):
    root = write_reference_db(tmp_path)
    os.remove(os.path.join(root, LINE))
    os.symlink("/dev/zero", os.path.join(root, LINE))
    line = one_error_line(run_fx(root))
    assert LINE in line and "device" in line


def test_an_oversized_file_is_refused_naming_it_without_reading_it_all(tmp_path, monkeypatch):
    root = write_reference_db(tmp_path)
    monkeypatch.setattr(ih, "MAX_FILE_BYTES", len(REFERENCE_LINE) + 100)
    with open(os.path.join(root, LINE), "wb") as f:
        f.write(REFERENCE_LINE.encode().replace(b"<StrokeSet>", b"<StrokeSet>" + b" " * 200))
    outcome = load_in_thread(root)
    assert isinstance(outcome, IamOnDbError) and LINE in str(outcome) and "bytes" in str(outcome), outcome


def line_file(strokes):
    """A lineStrokes document: strokes = [[(x, y), ...], ...], 20 ms between points."""
    body, t = [], 100.0
    for points in strokes:
        body.append('    <Stroke colour="black">')
        for x, y in points:
            body.append(f'      <Point x="{x}" y="{y}" time="{t:.2f}"/>')
            t += 0.02
        body.append("    </Stroke>")
    return ('<?xml version="1.0" encoding="ISO-8859-1"?>\n<WhiteboardCaptureSession>\n  <StrokeSet>\n'
            + "\n".join(body) + "\n  </StrokeSet>\n</WhiteboardCaptureSession>\n")


def test_a_line_of_many_one_point_strokes_is_refused_before_noise_removal(tmp_path):
    # 15,000 one-point strokes (1.2 MB): the pairwise speck test once asked for 3.6 GB here.
    root = write_reference_db(tmp_path)
    rng = np.random.default_rng(0)
    write_text(os.path.join(root, LINE), line_file([[tuple(p)] for p in rng.integers(0, 5000, (15_000, 2))]))
    line = one_error_line(run_fx(root))
    assert LINE in line and "15,000 strokes" in line and "5,000" in line


def test_isolated_specks_in_chunks_equal_the_point_by_point_definition(monkeypatch):
    rng = np.random.default_rng(1)
    points = rng.uniform(0, 10, (300, 2)) * [20, 1]  # (N, 2) ink in a band 10 high
    stroke = np.unique(np.sort(rng.integers(0, 120, 300)), return_inverse=True)[1]  # (N,) many 1-2 point strokes
    small = np.flatnonzero(np.bincount(stroke) <= ih.SPECK_MAX_POINTS)
    points[np.isin(stroke, small[::12])] += [0, 40]  # a few small strokes lifted well above the band
    starts = np.flatnonzero(ih.stroke_starts(stroke))
    lo, hi = np.percentile(points[:, 1], [5, 95], method="lower")
    expected = np.zeros(len(points), bool)
    for i in range(len(points)):
        if np.sum(stroke == stroke[i]) > ih.SPECK_MAX_POINTS:
            continue
        others = [s for s in range(len(starts)) if s != stroke[i]]
        gaps = [np.hypot(*np.maximum(np.maximum(points[stroke == s].min(0) - points[i],
                                                points[i] - points[stroke == s].max(0)), 0)) for s in others]
        expected[i] = min(gaps) > ih.SPECK_ISOLATION * (hi - lo)
    assert expected.any() and not expected.all()
    whole = ih._isolated_specks(points, stroke)
    monkeypatch.setattr(ih, "SPECK_CHUNK", 7)  # a chunk of one candidate at a time
    assert (ih._isolated_specks(points, stroke) == expected).all() and (whole == expected).all()


# ---------------------------------------------------------------------------
# Lines: bounded samples and coordinates, refused naming the file
# ---------------------------------------------------------------------------

ZIGZAG_AND_FAR_POINT = [[(x, x % 2) for x in range(20)] + [(100_000, 0)]]  # about 666,700 samples resampled
TEST_LINE = "lineStrokes/f07/f07-088/f07-088b-01.xml"  # the reference folder's test-split line


@pytest.mark.parametrize("relative", [LINE, TEST_LINE])
def test_a_small_line_that_would_resample_to_too_many_samples_is_refused_naming_it(tmp_path, relative):
    root = write_reference_db(tmp_path)
    write_text(os.path.join(root, relative), line_file(ZIGZAG_AND_FAR_POINT))
    line = one_error_line(run_fx(root, "--features", "raw"))
    assert relative in line and re.search(r"resample to 666,\d{3} samples", line) and f"{ih.MAX_LINE_SAMPLES:,}" in line


@pytest.mark.parametrize("relative,features", [(LINE, "graves25"), (LINE, "raw"), (TEST_LINE, "raw")])
def test_finite_but_huge_coordinates_are_refused_naming_the_file(tmp_path, relative, features):
    root = write_reference_db(tmp_path)
    write_text(os.path.join(root, relative), line_file([[(1000, 1000), (1010, 1020), (-1e308, 1e308)]]))
    line = one_error_line(run_fx(root, "--features", features))
    assert relative in line and "coordinate beyond" in line


def test_a_line_whose_features_are_not_finite_is_refused_naming_it(monkeypatch):
    line = ih.InkLine("a01-000u-01", "a01-000u", "w", "train", "a", np.array([[0.0, 0.0], [1.0, 1.0]]),
                      np.array([0, 0]), np.array([0.0, 0.02]), "lineStrokes/x.xml")
    assert np.isfinite(ih._featurise_line((line, "raw", None)).traj).all()
    monkeypatch.setattr(ih, "pen_trajectory", lambda xy, stroke: np.full((len(xy), 3), 1e39))  # inf in float32
    with pytest.raises(IamOnDbError, match=r"lineStrokes/x.xml: its raw features are not finite"):
        ih._featurise_line((line, "raw", None))


def test_two_files_for_one_line_skip_their_form_and_are_counted(tmp_path):
    root = write_reference_db(tmp_path)
    write_text(os.path.join(root, "lineStrokes/a01/a01-000/a01-000u-001.xml"), REFERENCE_LINE)
    write_text(os.path.join(root, "lineStrokes/a02/a02-000/a02-000u-01.xml"), REFERENCE_LINE)  # train keeps a line
    write_text(os.path.join(root, "ascii/a02/a02-000/a02-000u.txt"), one_line_ascii("kept"))
    write_text(os.path.join(root, "trainset.txt"), " a01-000u\n a02-000u\n")
    lines_by_split, summary = ih.load_iam_ondb(root, log=quiet)
    assert summary["skipped"] == {"forms with two files for one line number": 1}
    assert summary["lines_lost"] == 4  # the form's three line files and the second file for line 1
    example = summary["examples"]["forms with two files for one line number"][0]
    assert "a01-000u-001.xml" in example and "a01-000u-01.xml" in example
    assert not any(l.form_id == "a01-000u" for lines in lines_by_split.values() for l in lines)


def test_a_huge_bad_split_entry_is_quoted_by_a_short_prefix(tmp_path):
    root = write_reference_db(tmp_path)
    write_text(os.path.join(root, "trainset.txt"), " a01-000u\n" + "x" * 200_000 + "\n")
    with pytest.raises(IamOnDbError) as caught:
        ih.load_iam_ondb(root, log=quiet)
    message = str(caught.value)
    assert len(message) < 300 and "trainset.txt line 2" in message and "200,000 characters" in message, message[:400]


# ---------------------------------------------------------------------------
# Worker processes: a lost worker ends the run, workers end quietly
# ---------------------------------------------------------------------------


def _term_handler(sig):
    return signal.getsignal(sig)


def test_workers_reset_the_handlers_they_inherit():
    previous = signal.signal(signal.SIGTERM, ih._raise_terminated)
    try:
        pool = ih.Pool(2)
        try:
            assert pool.submit(_term_handler, signal.SIGTERM).get() == signal.SIG_DFL
            assert pool.submit(_term_handler, signal.SIGINT).get() == signal.SIG_IGN
        finally:
            pool.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_killed_worker_raises_worker_lost_instead_of_waiting_forever():
    pool = ih.Pool(2)
    try:
        job = pool.submit(time.sleep, 60)
        os.kill(pool.workers[0].process.pid, signal.SIGKILL)
        t0 = time.perf_counter()
        with pytest.raises(ih.WorkerLost, match=r"worker process \d+ died \(killed by SIGKILL"):
            job.get()
        assert time.perf_counter() - t0 < 10
    finally:
        pool.close()


_KEPT_BLOCKS = []


def _fragment_heap(_):
    """Allocate 200 MB in 16 kB blocks, keep every 8th alive and free the rest, a heap full of holes
    as featurising leaves it; the process's resident KiB then, before the map job ends."""
    blocks = [np.ones(2048) for _ in range(12_800)]
    _KEPT_BLOCKS.extend(blocks[::8])
    del blocks
    return resident_kib(os.getpid())


def resident_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or platform.libc_ver()[0] != "glibc",
                    reason="reads /proc and trims glibc's heap")
def test_a_worker_gives_back_what_its_map_jobs_freed():
    pool = ih.Pool(2)
    try:
        worker = pool.workers[0].process.pid
        _, holding = pool.map(_fragment_heap, [0, 1])  # one item for this process, one for the worker
        given_back = holding - resident_kib(worker)
        assert given_back > 100_000, given_back  # of the 175 MB freed; without the trim none
    finally:
        pool.close()


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return found


def start_lines_run(tmp_path):
    """A lines run with one worker; returns (process, worker pid) once its first epoch is checkpointed."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "iam_handwriting.py"), "--task", "lines", "--quick",
                             "--epochs", "40", "--workers", "2", "--save-model", tmp_path / "m.npz"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "m.npz.checkpoint").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.2)
    workers = children(proc.pid)
    assert len(workers) == 1, workers
    return proc, workers[0]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the worker through /proc")
def test_a_run_whose_worker_is_killed_ends_in_one_line_and_keeps_its_checkpoint(tmp_path):
    proc, worker = start_lines_run(tmp_path)
    os.kill(worker, signal.SIGKILL)  # as the OOM killer would
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 4 and len(lines) == 1 and "Traceback" not in err, (proc.returncode, err)
    assert f"worker process {worker} died (killed by SIGKILL" in lines[0] and "at epoch" in lines[0]
    assert "m.npz.checkpoint is kept" in lines[0] and (tmp_path / "m.npz.checkpoint").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the worker through /proc")
def test_sigterm_with_workers_is_one_line_without_a_worker_traceback(tmp_path):
    proc, _ = start_lines_run(tmp_path)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# ---------------------------------------------------------------------------
# Model files: sizes checked before reading, fields checked against the task
# ---------------------------------------------------------------------------

WORDS_CFG = {**ih.dataclasses.asdict(ih.RunConfig(hidden=4)), "epochs": 1}


def model_archive(path, cfg=WORDS_CFG, members=None, compress=True):
    """A model npz written member by member, so members can lie about their size."""
    import io
    import json
    import zipfile
    if members is None:
        members = ih.init_params(np.random.default_rng(0), 4, in_dim=3, n_classes=ih.N_CLASSES)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.array(cfg if isinstance(cfg, str) else json.dumps(cfg)))
        z.writestr("__config__.npy", buf.getvalue())
        for name, value in members.items():
            if isinstance(value, bytes):
                z.writestr(name + ".npy", value)
            else:
                buf = io.BytesIO()
                np.lib.format.write_array(buf, value)
                z.writestr(name + ".npy", buf.getvalue())
    return path


def test_a_well_formed_archive_loads(tmp_path):
    params, cfg = ih.load_model(str(model_archive(tmp_path / "m.npz")))
    assert cfg.hidden == 4 and set(params) == set(ih.parameter_shapes(cfg))


def test_a_zip_bomb_member_is_refused_before_it_is_inflated(tmp_path):
    # out_W declares the right shape, then 400 MB of zeros: 400 kB on disk.
    header = io_header((4 * 2, ih.N_CLASSES))
    bomb = model_archive(tmp_path / "bomb.npz", members={
        **ih.init_params(np.random.default_rng(0), 4, in_dim=3, n_classes=ih.N_CLASSES),
        "out_W": header + bytes(400 * 2**20)})
    assert bomb.stat().st_size < 2**20
    r = cli("--load-model", bomb, capped=True, timeout=60)
    assert "does not hold the parameters its config describes" in one_error_line(r)


def io_header(shape, dtype="<f8"):
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_a_member_declaring_a_trillion_floats_is_refused(tmp_path):
    path = model_archive(tmp_path / "big.npz", members={
        **ih.init_params(np.random.default_rng(0), 4, in_dim=3, n_classes=ih.N_CLASSES),
        "out_W": io_header((10**6, 10**6))})
    assert "does not hold the parameters" in one_error_line(cli("--load-model", path, capped=True, timeout=60))


def test_a_deeply_nested_config_is_refused_in_one_line(tmp_path):
    path = model_archive(tmp_path / "deep.npz", cfg="[" * 100_000 + "]" * 100_000)
    line = one_error_line(cli("--load-model", path, capped=True, timeout=60))
    assert "invalid config" in line and "nested too deeply" in line


def test_an_oversized_config_member_is_refused_without_reading_it(tmp_path):
    path = model_archive(tmp_path / "cfg.npz", cfg={**WORDS_CFG, "data_dir": "x" * (3 * 2**20)})
    assert "a config is a few kB" in one_error_line(cli("--load-model", path, capped=True, timeout=60))


@pytest.mark.parametrize("task,changes,message", [
    ("lines", {"alphabet": "ab"}, "alphabet 'ab' is not the lines task's"),
    ("lines", {"features": "graves25"}, "the lines task reads raw pen moves only"),
    ("words", {"alphabet": "colitnmaeux"}, "is not the words task's"),
    ("iam-ondb", {"alphabet": ""}, "needs the alphabet it was trained on"),
    ("iam-ondb", {"alphabet": "abca"}, "alphabet repeats a character"),
])
def test_config_fields_that_do_not_fit_the_task_are_refused(tmp_path, task, changes, message):
    cfg = {**WORDS_CFG, "task": task, "alphabet": "abc" if task == "iam-ondb" else "", **changes}
    probe = ih.RunConfig(**cfg)
    features = 25 if probe.features == "graves25" else 3  # shapes that match, so only the field is wrong
    k = 1 + len(probe.alphabet or (ih.TASKS[task].alphabet or ""))
    members = ih.init_params(np.random.default_rng(0), 4, in_dim=features, n_classes=max(k, 2))
    line = one_error_line(cli("--load-model", model_archive(tmp_path / "m.npz", cfg, members)))
    assert "invalid config" in line and message in line


# ---------------------------------------------------------------------------
# Flags: nothing given is ignored, nothing falsy counts as not given
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--save-model", "--save-json", "--load-model", "--export-iam-ondb", "--data-dir"])
def test_an_empty_path_is_a_bad_value(flag):
    task = {"--export-iam-ondb": "lines", "--data-dir": "iam-ondb"}.get(flag, "words")
    line = one_error_line(cli("--task", task, flag, "", "--quick", "--epochs", "0"))
    assert f"{flag} needs a path, got an empty one" in line


@pytest.mark.parametrize("args,named", [
    (["--save-json", "x.json", "--save-model", "y.npz"], "--save-json, --save-model"),
    (["--epochs", "3"], "--epochs"), (["--hidden", "8"], "--hidden"), (["--decoder", "beam"], "--decoder"),
    (["--workers", "2"], "--workers"),
    (["--lm", "x.arpa"], "--lm cannot"), (["--dictionary", "x.txt"], "--dictionary cannot"),  # flags named as typed
])
def test_flags_an_export_would_ignore_are_refused(tmp_path, args, named):
    line = one_error_line(cli("--task", "lines", "--quick", "--export-iam-ondb", tmp_path / "db", *args))
    assert named in line and "cannot be combined with --export-iam-ondb" in line
    assert not (tmp_path / "db").exists() and not (ROOT / "x.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--lm-weight", "0"], "--lm-weight is for the lines and iam-ondb tasks"),
    (["--word-penalty", "0"], "--word-penalty is for the lines and iam-ondb tasks"),
    (["--lm-beam", "1"], "--lm-beam is for"),
])
def test_a_zero_valued_task_flag_counts_as_given(args, message):
    assert message in one_error_line(cli("--quick", "--epochs", "0", *args))


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--seed", "0"), ("--patience", "0")])
def test_a_zero_valued_training_flag_is_refused_with_load_model(quick_model_file, flag, value):
    line = one_error_line(cli("--load-model", quick_model_file, flag, value))
    assert f"{flag} cannot be combined with --load-model" in line


def test_a_negative_number_in_scientific_notation_parses(tmp_path):
    args = build = ih.build_parser().parse_args(["--task", "lines", "--word-penalty", "-1e1", "--lm-weight", "1e-1"])
    assert build.word_penalty == -10.0 and args.lm_weight == 0.1
    line = one_error_line(cli("--task", "lines", "--word-penalty", "-1e3"))
    assert "--word-penalty" in line and "must lie in -100.0..100.0, got -1000.0" in line


@pytest.fixture(scope="module")
def iam_model(tmp_path_factory):
    """An untrained iam-ondb model of the reference folder, and the folder moved elsewhere after."""
    base = tmp_path_factory.mktemp("iam")
    root = write_reference_db(base / "db")
    r = cli("--task", "iam-ondb", "--data-dir", root, "--quick", "--epochs", "0", "--quiet", "--save-model",
            base / "m.npz")
    assert r.returncode == 0, r.stderr
    os.rename(root, base / "moved")
    return base / "m.npz", base / "moved"


def test_load_model_reads_the_given_data_dir(iam_model, tmp_path):
    model, moved = iam_model
    assert "not found" in one_error_line(cli("--load-model", model, "--quiet"))  # the stored folder is gone
    r = cli("--load-model", model, "--data-dir", moved, "--quiet", "--save-json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    import json
    assert json.loads((tmp_path / "r.json").read_text())["config"]["data_dir"] == str(moved)


def test_load_model_refuses_features_that_contradict_it(iam_model):
    model, moved = iam_model
    line = one_error_line(cli("--load-model", model, "--data-dir", moved, "--features", "raw"))
    assert "--features raw contradicts the model file, which reads graves25" in line
    r = cli("--load-model", model, "--data-dir", moved, "--features", "graves25", "--quiet")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------
# Outputs: each succeeds or is rescued on its own; an export is whole or absent
# ---------------------------------------------------------------------------


def test_a_failed_model_write_does_not_lose_the_run_summary(tmp_path, model_write_fails):
    logged = []
    outputs = [(str(tmp_path / "m.npz"), b"model", "model file"), (str(tmp_path / "r.json"), b"{}", "run summary")]
    with pytest.raises(ih.UserError) as caught:
        ih.write_results(outputs, logged.append)
    message = str(caught.value)
    assert (tmp_path / "r.json").read_bytes() == b"{}" and logged == [f"wrote {tmp_path / 'r.json'}"]
    assert "cannot write model file" in message and f"wrote {tmp_path / 'r.json'}" in message
    rescued = message.split("a copy was saved to ")[1].split(";")[0]
    assert open(rescued, "rb").read() == b"model"
    os.unlink(rescued)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="a pipe named through /proc")
def test_a_pipe_named_through_proc_or_dev_stdout_is_written_straight_to(tmp_path):
    read, write = os.pipe()
    try:
        assert ih.output_target(f"/proc/self/fd/{write}", "run summary") == ("stream", f"/proc/self/fd/{write}")
    finally:
        os.close(read)
        os.close(write)
    r = cli("--quick", "--epochs", "0", "--quiet", "--save-json", "/dev/stdout")  # stdout is a pipe here
    assert r.returncode == 0, r.stderr
    import json
    doc, _ = json.JSONDecoder().raw_decode(r.stdout[r.stdout.index("{"):])
    assert doc["schema_version"] == ih.SCHEMA_VERSION


def test_a_dangling_symlink_as_export_folder_is_called_that(tmp_path):
    link = tmp_path / "db"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ih.UserError, match="dangling symbolic link"):
        ih.check_export_folder(str(link))


EXPORT_CFG = ih.RunConfig(task="lines", lines_per_epoch=4, eval_lines_per_writer=1)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_an_export_that_fails_midway_leaves_nothing_and_can_be_run_again(tmp_path, monkeypatch, failure):
    real_write, calls = ih.write_output, []

    def fails_at_file_50(path, data, what, durable=True):
        calls.append(path)
        if len(calls) == 50:
            raise failure
        return real_write(path, data, what, durable)

    out = tmp_path / "db"
    ih.check_export_folder(str(out))
    monkeypatch.setattr(ih, "write_output", fails_at_file_50)
    with pytest.raises(ih.UserError if isinstance(failure, OSError) else KeyboardInterrupt) as caught:
        ih.export_lines_task(EXPORT_CFG, str(out), log=quiet)
    if isinstance(failure, OSError):
        assert "No space left on device; nothing written" in str(caught.value)
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # no partial export, no temporary folder
    monkeypatch.setattr(ih, "write_output", real_write)
    ih.check_export_folder(str(out))  # a re-run is not refused
    assert ih.export_lines_task(EXPORT_CFG, str(out), log=quiet) == 64
    lines_by_split, _ = ih.load_iam_ondb(out, log=quiet)
    assert sum(map(len, lines_by_split.values())) == 64
    assert [p for p in os.listdir(tmp_path)] == ["db"]


# ---------------------------------------------------------------------------
# Memory: an epoch of training lines is counted
# ---------------------------------------------------------------------------


def test_a_million_training_lines_per_epoch_are_refused_before_training(monkeypatch):
    monkeypatch.setattr(ih, "physical_memory", lambda: int(23.5 * 2**30))  # the audit's machine
    cfg = ih.RunConfig(task="lines", hidden=32, eval_lines_per_writer=1, lines_per_epoch=1_000_000)
    data = ih.TASKS["lines"].make_data(cfg, ih.make_streams(0), ih.serial_map, quiet)
    with pytest.raises(ih.UserError, match=r"the training data drawn per epoch is too large; use fewer --lines-per-epoch"):
        ih.check_memory(cfg, data, training=True)
    fine = ih.dataclasses.replace(cfg, lines_per_epoch=1200)
    need = ih.check_memory(fine, ih.dataclasses.replace(data, epoch_size=1200), training=True)
    assert need["fresh"] < 2**30


# ---------------------------------------------------------------------------
# The figure scripts: values the checks accept are drawn; the rest are refused in one line
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def words_run(tmp_path_factory):
    import json
    from test_figures import fake_lexicon_decoding
    path = tmp_path_factory.mktemp("words_run") / "run.json"
    r = cli("--quick", "--epochs", "1", "--quiet", "--save-json", path)
    assert r.returncode == 0, r.stderr
    return {**json.loads(path.read_text()), "decoding": fake_lexicon_decoding()}


def changed(doc, tmp_path, change):
    import json
    from test_figures import edited  # the figure tests' run.json editing helpers
    path = tmp_path / "run.json"
    path.write_text(json.dumps(edited(doc, change)))
    return path


def set_in(keys, value):
    from test_figures import set_key
    return set_key(keys, value)


@pytest.mark.parametrize("keys,value,named", [  # ids: the values themselves are unreadable as test ids
    (("alignments", 0, "xy", 0, 0), 1e308, "alignments[0].xy holds 1e+308"),
    (("alignments", 1, "xy", 3, 1), -1e308, "alignments[1].xy holds -1e+308"),
    (("config", "hidden"), 10**400, "config.hidden is an integer of 401 digits"),
    (("history", 0, "epoch"), 10**300, "history[0].epoch is 1e+300"),
    (("decoding", "rows", 0, "size"), 1e300, "decoding.rows[0].size is 1e+300"),
    (("final", "in_vocab", "cer"), 1e308, "final.in_vocab.cer is 1e+308"),
], ids=["xy", "xy_negative", "hidden", "epoch", "size", "cer"])
@pytest.mark.parametrize("script", ["visualize_iam_handwriting.py", "make_iam_handwriting_gif.py"])
def test_finite_extremes_in_run_json_are_refused_in_one_line(words_run, tmp_path, keys, value, named, script):
    path = changed(words_run, tmp_path, set_in(keys, value))
    r = subprocess.run([sys.executable, str(ROOT / script), path, "--out", tmp_path / "out"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    line = one_error_line(r)
    assert named in line and "beyond the +-1e+12" in line


def test_zero_losses_are_drawn_on_a_linear_axis(words_run, tmp_path):
    import visualize_iam_handwriting as viz

    def zero_losses(doc):
        for e in doc["history"]:
            e["train_loss"] = 0.0
            for split in doc["task"]["monitor"]:
                e[split]["loss"] = 0.0
    run = viz.load_run(changed(words_run, tmp_path, zero_losses))
    fig = viz.fig_training_curves(run)
    ax_loss = fig.axes[0]
    assert ax_loss.get_yscale() == "linear" and ax_loss.get_ylim()[0] == 0.0


def test_four_splits_with_a_decoding_block_are_drawn(words_run, tmp_path):
    import visualize_iam_handwriting as viz

    def four_splits(doc):
        doc["task"]["splits"] += ["extra_a", "extra_b"]
        for split in ("extra_a", "extra_b"):
            doc["final"][split] = doc["final"]["in_vocab"]
            doc["decoding"]["rows"] += [{**r, "split": split} for r in doc["decoding"]["rows"] if r["split"] == "in_vocab"]
    run = viz.load_run(changed(words_run, tmp_path, four_splits))
    fig = viz.fig_lexicon_size(run)
    plotted = {line.get_gid() for line in fig.axes[0].get_lines()}
    assert {"lexicon:extra_a", "lexicon:extra_b", "lexicon:in_vocab"} <= plotted


def test_a_twenty_thousand_character_prediction_is_left_out_of_the_confusions(words_run, tmp_path):
    def long_prediction(doc):
        doc["predictions"][0].update(text="a" * 20_000, decoded="c" * 20_000)
    path = changed(words_run, tmp_path, long_prediction)
    r = subprocess.run([sys.executable, str(ROOT / "visualize_iam_handwriting.py"), path, "--out", tmp_path / "v"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_cap_memory)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    import visualize_iam_handwriting as viz
    fig = viz.fig_confusion(viz.load_run(path))
    assert "1 too long to align left out" in fig.axes[0].get_title()


def test_a_one_sample_alignment_makes_a_one_frame_gif(words_run, tmp_path):
    def one_sample(doc):
        a = doc["alignments"][1]
        for key in ("xy", "pen_up", "argmax_path", "log_probs"):
            a[key] = a[key][:1]
        a["char_of"] = None if a["char_of"] is None else [0]
    path = changed(words_run, tmp_path, one_sample)
    r = subprocess.run([sys.executable, str(ROOT / "make_iam_handwriting_gif.py"), path, "--out", tmp_path / "a.gif"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "(1 frames" in r.stdout, r.stderr[-2000:]


def test_a_perplexity_of_1e308_is_refused_naming_its_key():
    import visualize_iam_handwriting as viz
    from test_figures import fake_dictionary_decoding
    dec = fake_dictionary_decoding()
    dec["perplexity"]["1000"]["bigram"] = 1e308
    task = {"name": "lines", "splits": ["validation", "test"]}
    assert viz.check_decoding(viz.Field(fake_dictionary_decoding(), "decoding"), task)["kind"] == "dictionary"
    with pytest.raises(viz.Malformed, match=r"decoding.perplexity.1000.bigram is 1e\+308, beyond"):
        viz.check_decoding(viz.Field(dec, "decoding"), task)


@pytest.mark.parametrize("flag", ["--load-model", "--init-from"])
@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_model_file_that_is_a_device_or_fifo_is_refused_at_once(tmp_path, flag, kind):
    path = "/dev/zero" if kind == "device" else tmp_path / "fifo"
    if kind == "fifo":
        os.mkfifo(path)
    # Capped and timed: without the check, /dev/zero fills memory and a FIFO blocks.
    line = one_error_line(cli(flag, path, *(["--epochs", "0"] if flag == "--init-from" else []), capped=True, timeout=60))
    assert "is not a regular file" in line
