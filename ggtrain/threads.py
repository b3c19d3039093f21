"""One thread knob for the pools that share the CPU: OpenMP (our Cython kernels), Numba, BLAS.

The kernels call scipy's OpenBLAS (scipy.linalg.cython_blas) from inside their own OpenMP threads,
so that BLAS must run single-threaded: a threaded BLAS inside a prange would oversubscribe the
cores. numpy's own OpenBLAS (a separate copy, used by `@` in Python code) stays at 1 too (see
set_threads). Our Cython kernels and Numba's `omp` layer share one libgomp, whose barrier spin
ggtrain/__init__.py shortens (GOMP_SPINCOUNT) before it loads: on a shared machine long spins make
every parallel region wait for a descheduled thread.
"""

from __future__ import annotations

import os

import psutil

from ggtrain.kernels.blas import (
    _openblas,
    blas_threads,
    set_kernel_blas_single_threaded,
    set_numpy_blas_threads,
)

__all__ = ["blas_threads", "default_threads", "get_threads", "set_kernel_blas_single_threaded",
           "set_numpy_blas_threads", "set_threads"]

_threads: int | None = None


def default_threads() -> int:
    """Physical cores (hyper-threads share a core's FMA units, so they do not speed up GEMM)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def set_threads(n: int) -> int:
    """Use n threads in our OpenMP kernels and Numba; both OpenBLAS copies stay at 1 (scipy's runs
    inside the kernels' threads, numpy's only does the thin LoRA products). Returns n."""
    global _threads
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    from ggtrain import kernels
    kernels.set_num_threads(n)
    set_kernel_blas_single_threaded()
    if "numpy" in _openblas():
        # numpy's BLAS only serves the LoRA products (rank r: far too thin to split), and a threaded
        # OpenBLAS spins for its workers: on a busy machine a 0.2 ms product took 25 ms with 2.
        _openblas()["numpy"][0](1)
    import numba
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    _threads = n
    return n


def get_threads() -> int:
    """The count last given to set_threads (default_threads() before any call)."""
    return _threads if _threads is not None else default_threads()
