"""One thread knob for the pools that share the CPU: OpenMP (our Cython kernels), Numba, BLAS.

The kernels call scipy's OpenBLAS (scipy.linalg.cython_blas) from inside their own OpenMP threads,
so that BLAS must run single-threaded: a threaded BLAS inside a prange would oversubscribe the
cores. numpy's own OpenBLAS (a separate copy, used by `@` in Python code) gets the full count.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import psutil

_threads: int | None = None

# (set, get) function names of the OpenBLAS that scipy / numpy wheels bundle (symbol-prefixed builds)
_OPENBLAS_SYMBOLS = {
    "scipy": [("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
              ("openblas_set_num_threads", "openblas_get_num_threads")],
    "numpy": [("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
              ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
              ("openblas_set_num_threads", "openblas_get_num_threads")],
}


def default_threads() -> int:
    """Physical cores (hyper-threads share a core's FMA units, so they do not speed up GEMM)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@functools.cache
def _openblas() -> dict[str, tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]]:
    """{'scipy' | 'numpy': (set_num_threads, get_num_threads)} of the OpenBLAS each wheel bundles
    (in site-packages/scipy.libs, numpy.libs). Missing for a BLAS we do not know (then untouched)."""
    import numpy
    import scipy
    found = {}
    for label, pkg in (("scipy", scipy), ("numpy", numpy)):
        libdir = Path(pkg.__file__).parent.parent / f"{pkg.__name__}.libs"
        for path in sorted(libdir.glob("lib*openblas*.so*")):
            lib = ctypes.CDLL(str(path))  # already loaded by the package: this returns its handle
            for set_name, get_name in _OPENBLAS_SYMBOLS[label]:
                setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
                if setter is not None and getter is not None:
                    setter.argtypes, setter.restype = [ctypes.c_int], None
                    getter.argtypes, getter.restype = [], ctypes.c_int
                    found[label] = (setter, getter)
                    break
    return found


def blas_threads() -> dict[str, int]:
    """Current thread counts of the bundled OpenBLAS copies, e.g. {'scipy': 1, 'numpy': 2}."""
    return {label: get() for label, (_, get) in _openblas().items()}


def set_kernel_blas_single_threaded() -> None:
    """scipy's OpenBLAS runs inside the kernels' threads: one thread each, no pool of its own."""
    if "scipy" in _openblas():
        _openblas()["scipy"][0](1)


def set_numpy_blas_threads(n: int) -> None:
    """Threads of numpy's own OpenBLAS (set_threads keeps it at 1); for baselines in bench/."""
    if "numpy" in _openblas():
        _openblas()["numpy"][0](int(n))


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
