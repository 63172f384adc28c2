"""Test session setup: one BLAS thread, as the command line runs; helpers several test files share.

Set before numpy loads BLAS. In-process training tests are several times
slower with a second BLAS thread fighting the other tests' processes, and
float32 results depend on the thread count.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the BLAS threads are set)
import pytest  # noqa: E402


def log_softmax(z):
    """Log-probabilities from scores z (..., K), along the last axis."""
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def with_ctrl_c():
    """preexec_fn for a child a test sends Ctrl-C: a background job (nohup ... &) starts it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def model_write_fails(monkeypatch):
    """write_output fails with a full disk for the model file and writes everything else."""
    import iam_handwriting as ih
    real_write = ih.write_output

    def disk_full(path, data, what, durable=True):
        if what == "model file":
            raise OSError(28, "No space left on device")
        return real_write(path, data, what, durable)

    monkeypatch.setattr(ih, "write_output", disk_full)


@pytest.fixture(scope="session")
def quick_model_file(tmp_path_factory):
    """A words model of one --quick epoch, for tests that load it or alter copies of it (never it)."""
    path = tmp_path_factory.mktemp("model") / "m.npz"
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "iam_handwriting.py"), "--quick",
                        "--epochs", "1", "--quiet", "--save-model", str(path)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return path
