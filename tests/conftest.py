"""Test session setup: one BLAS thread, as the command line runs.

Set before numpy loads BLAS. In-process training tests are several times
slower with a second BLAS thread fighting the other tests' processes, and
float32 results depend on the thread count.
"""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
