"""One thread knob for the three pools that share the CPU: OpenMP (our Cython kernels), Numba, BLAS.

The kernels call scipy's OpenBLAS (scipy.linalg.cython_blas) from inside their own OpenMP threads,
so that BLAS must run single-threaded: a threaded BLAS inside a prange would oversubscribe the
cores. numpy's own OpenBLAS (a separate copy, used by `@` in Python code) gets the full count.
"""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path

import psutil

_threads: int | None = None


def default_threads() -> int:
    """Physical cores (hyper-threads share a core's FMA units, so they do not speed up GEMM)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def openblas_setters() -> dict[str, ctypes._CFuncPtr]:
    """set_num_threads of the OpenBLAS copies bundled with scipy and numpy, by which library."""
    import numpy as np
    import scipy
    found = {}
    for label, pkg, names in (
        ("scipy", scipy, ("scipy_openblas_set_num_threads", "openblas_set_num_threads")),
        ("numpy", np, ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                       "openblas_set_num_threads")),
    ):
        libdir = Path(pkg.__file__).parent.parent / f"{pkg.__name__}.libs"
        for path in sorted(glob.glob(str(libdir / "libscipy_openblas*.so*")) + glob.glob(str(libdir / "libopenblas*.so*"))):
            lib = ctypes.CDLL(path)
            for name in names:
                fn = getattr(lib, name, None)
                if fn is not None:
                    fn.argtypes, fn.restype = [ctypes.c_int], None
                    found[label] = fn
                    break
    return found


def set_threads(n: int) -> int:
    """Use n threads in our OpenMP kernels, Numba and numpy's BLAS; scipy's BLAS (called by the
    kernels from inside their threads) is kept at 1. Returns n."""
    global _threads
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    from ggtrain import kernels
    kernels.set_num_threads(n)
    setters = openblas_setters()
    if "scipy" in setters:
        setters["scipy"](1)
    if "numpy" in setters:
        setters["numpy"](n)
    import numba
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    _threads = n
    return n


def get_threads() -> int:
    """The count last given to set_threads (default_threads() before any call)."""
    return _threads if _threads is not None else default_threads()
