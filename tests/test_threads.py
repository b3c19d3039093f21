"""ggtrain.threads: one knob for OpenMP (the kernels), Numba and the bundled OpenBLAS copies."""

from __future__ import annotations

import os
import subprocess
import sys

import numba
import pytest

from ggtrain import kernels, threads


def test_default_is_physical_cores() -> None:
    import psutil
    assert threads.default_threads() == (psutil.cpu_count(logical=False) or psutil.cpu_count())


def test_set_threads_reaches_every_pool() -> None:
    blas = threads.blas_threads()
    assert "scipy" in blas and "numpy" in blas, f"bundled OpenBLAS not found: {blas}"
    try:
        for n in (1, 2):
            assert threads.set_threads(n) == n
            assert threads.get_threads() == n
            assert kernels.get_num_threads() == n
            assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
            # scipy's BLAS runs inside the kernels' threads, numpy's does thin LoRA products: both 1
            assert threads.blas_threads() == {"scipy": 1, "numpy": 1}
    finally:
        threads.set_threads(threads.default_threads())


def test_loading_the_matmul_kernels_makes_scipy_blas_single_threaded() -> None:
    """In a fresh process with OPENBLAS_NUM_THREADS=2, the kernels' first use (which loads the
    compiled matmul module: importing ggtrain.kernels alone no longer does) sets scipy's BLAS to 1."""
    code = ("from ggtrain import threads; before = threads.blas_threads()['scipy']; "
            "import ggtrain.kernels; ggtrain.kernels.get_num_threads(); "
            "print(before, threads.blas_threads()['scipy'])")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    before, after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True, env=env).stdout.split()
    assert (int(before), int(after)) == (2, 1)


def test_numpy_blas_for_baselines() -> None:
    try:
        threads.set_numpy_blas_threads(2)
        assert threads.blas_threads()["numpy"] == 2
    finally:
        threads.set_threads(threads.default_threads())
    assert threads.blas_threads()["numpy"] == 1


def test_bad_count() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        threads.set_threads(0)
