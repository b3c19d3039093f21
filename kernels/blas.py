"""The OpenBLAS copies that scipy and numpy bundle: find them and set their thread counts.

The kernels call scipy's OpenBLAS (scipy.linalg.cython_blas) from inside their own OpenMP threads,
so that BLAS must run single-threaded; ggtrain.threads sets every pool from one knob with these.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

# (set, get) function names of the OpenBLAS that scipy / numpy wheels bundle (symbol-prefixed builds)
_OPENBLAS_SYMBOLS = {
    "scipy": [("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
              ("openblas_set_num_threads", "openblas_get_num_threads")],
    "numpy": [("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
              ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
              ("openblas_set_num_threads", "openblas_get_num_threads")],
}


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


@functools.cache
def blas_cores() -> dict[str, str]:
    """The kernel set each bundled OpenBLAS chose at load (openblas_get_corename), e.g.
    {'scipy': 'SkylakeX', 'numpy': 'Haswell'}: OPENBLAS_CORETYPE in the environment overrides it,
    which benchmarks report beside their figures."""
    import numpy
    import scipy
    names = ("scipy_openblas_get_corename", "scipy_openblas_get_corename64_", "openblas_get_corename64_",
             "openblas_get_corename")
    found = {}
    for label, pkg in (("scipy", scipy), ("numpy", numpy)):
        for path in sorted((Path(pkg.__file__).parent.parent / f"{pkg.__name__}.libs").glob("lib*openblas*.so*")):
            lib = ctypes.CDLL(str(path))
            fn = next((getattr(lib, n) for n in names if getattr(lib, n, None) is not None), None)
            if fn is not None:
                fn.argtypes, fn.restype = [], ctypes.c_char_p
                found[label] = fn().decode()
                break
    return found
