"""Hostile input that must neither hang, exhaust memory, lose results, be silently ignored nor
end in a traceback (issue 14).

IAM-OnDB folders here are the small hand-written fixtures of test_iamondb_io.py with one file
changed; runs that could exhaust memory before their fix run in a subprocess with a capped
address space, so a regression fails the test instead of the machine.
"""
import os
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
from test_iamondb_io import REFERENCE_LINE, quiet, write_reference_db, write_text

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
