"""Gated FFN activations, forward/backward (ggml's swiglu and geglu).

    SwiGLU: y = silu(g) * u,        silu(g) = g · sigmoid(g)
    GeGLU:  y = gelu_tanh(g) * u,   gelu_tanh(g) = ½ g (1 + tanh(√(2/π) (g + 0.044715 g³)))

g is the ffn_gate projection, u the ffn_up projection, both (T, n_ff). ggml's CPU geglu reads
gelu from an f16 lookup table (GGML_GELU_FP16); we compute the same tanh formula in full precision,
which is what the table approximates and what has a derivative.

Both sigmoid and tanh are written with e = exp(-|x|) <= 1 (no overflow for any input):
sigmoid(x) = 1/(1+e) or e/(1+e); tanh(|x|) = (1-e²)/(1+e²). On float32 the exponentials of a block
of elements go through vecmath.exp_shift_inplace (vectorised) instead of one libm call each; float64
(the tests' finite differences) keeps math.exp.

Work is split in blocks of BLOCK elements; arrays under PARALLEL_MIN elements run on the calling
thread: waking the thread pool costs more than these memory-bound loops when the machine is busy.
"""

import math

import numba
import numpy as np
from ggtrain.kernels import PARALLEL_MIN, get_num_threads, widest_module
from ggtrain.kernels.vecmath import exp_shift_inplace
from numba import njit, prange

_vec = widest_module("activation")  # f32 forwards and backwards in C on AVX2 / AVX512 CPUs

GELU_COEF_A = 0.044715
SQRT_2_OVER_PI = 0.79788456080286535587989211986876
BLOCK = 4096  # elements per block (its scratch stays in L1)

SWIGLU_FWD, SWIGLU_BWD, GEGLU_FWD, GEGLU_BWD = 0, 1, 2, 3


@njit(cache=True, fastmath=True)
def _neg_exp(x, i0, i1, fast, e, kbuf):
    # e[:n] = exp(-|x[i0:i1]|) (x already scaled as the caller needs); n = i1 - i0
    n = i1 - i0
    if fast:
        for i in range(n):
            e[i] = -abs(x[i0 + i])
        exp_shift_inplace(e[:n], 0.0, kbuf)
    else:
        for i in range(n):
            e[i] = math.exp(-abs(x[i0 + i]))


@njit(cache=True, fastmath=True)
def _block(op, dy, g, u, out1, out2, i0, i1, fast, a, e, kbuf):
    # one block [i0, i1) of op; a, e (BLOCK,) scratch in the data dtype, kbuf (BLOCK,) int32
    n = i1 - i0
    one = g.dtype.type(1.0)  # constants in the data dtype: no silent promotion of f32 to f64
    half = g.dtype.type(0.5)
    two = g.dtype.type(2.0)
    three = g.dtype.type(3.0)
    if op == SWIGLU_FWD or op == SWIGLU_BWD:
        _neg_exp(g, i0, i1, fast, e, kbuf)
        for i in range(n):
            x = g[i0 + i]
            s = one / (one + e[i])
            s = s if x >= 0 else e[i] * s  # sigmoid(x)
            if op == SWIGLU_FWD:
                out1[i0 + i] = x * s * u[i0 + i]
            else:  # d silu/dg = s (1 + g (1 - s))
                out1[i0 + i] = dy[i0 + i] * u[i0 + i] * s * (one + x * (one - s))
                out2[i0 + i] = dy[i0 + i] * x * s
    else:
        c = g.dtype.type(SQRT_2_OVER_PI)
        ca = g.dtype.type(GELU_COEF_A)
        for i in range(n):
            x = g[i0 + i]
            a[i] = two * c * x * (one + ca * x * x)  # tanh(z) with z = a/2: e = exp(-|a|)
        _neg_exp(a, 0, n, fast, e, kbuf)
        for i in range(n):
            x = g[i0 + i]
            t = (one - e[i]) / (one + e[i])
            t = t if a[i] >= 0 else -t  # tanh(√(2/π) (x + 0.044715 x³))
            if op == GEGLU_FWD:
                out1[i0 + i] = half * x * (one + t) * u[i0 + i]
            else:  # d gelu/dg = ½ (1 + t) + ½ g (1 - t²) √(2/π) (1 + 3·0.044715 g²)
                dgelu = half * (one + t) + half * x * (one - t * t) * c * (one + three * ca * x * x)
                out1[i0 + i] = dy[i0 + i] * u[i0 + i] * dgelu
                out2[i0 + i] = dy[i0 + i] * half * x * (one + t)


@njit(cache=True)
def _run_serial(op, dy, g, u, out1, out2, fast):
    n = g.shape[0]
    a = np.empty(BLOCK, g.dtype)
    e = np.empty(BLOCK, g.dtype)
    kbuf = np.empty(BLOCK, np.int32)
    for b in range((n + BLOCK - 1) // BLOCK):
        _block(op, dy, g, u, out1, out2, b * BLOCK, min(n, (b + 1) * BLOCK), fast, a, e, kbuf)


@njit(cache=True, parallel=True)
def _run_parallel(op, dy, g, u, out1, out2, fast, nt):
    # nt: numba.get_num_threads(), from Python (inside a cached kernel it would be a dynamic global)
    n = g.shape[0]
    a = np.empty((nt, BLOCK), g.dtype)
    e = np.empty((nt, BLOCK), g.dtype)
    kbuf = np.empty((nt, BLOCK), np.int32)
    for b in prange((n + BLOCK - 1) // BLOCK):
        t = numba.get_thread_id()
        _block(op, dy, g, u, out1, out2, b * BLOCK, min(n, (b + 1) * BLOCK), fast, a[t], e[t], kbuf[t])


def _run(op: int, dy: np.ndarray | None, g: np.ndarray, u: np.ndarray, n_out: int):
    if g.shape != u.shape or (dy is not None and dy.shape != g.shape):
        raise ValueError(f"activation: shape mismatch g {g.shape}, u {u.shape}" + (f", dy {dy.shape}" if dy is not None else ""))
    dt = g.dtype if g.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    gf = np.ascontiguousarray(g, dtype=dt).reshape(-1)
    uf = np.ascontiguousarray(u, dtype=dt).reshape(-1)
    dyf = gf if dy is None else np.ascontiguousarray(dy, dtype=dt).reshape(-1)
    out1 = np.empty_like(gf)
    out2 = np.empty_like(gf) if n_out == 2 else out1
    nth = get_num_threads() if gf.shape[0] >= PARALLEL_MIN else 1
    if _vec is not None and dt == np.float32 and op in (SWIGLU_FWD, GEGLU_FWD):
        _vec.gated_forward(op == GEGLU_FWD, gf, uf, out1, nth)
    elif _vec is not None and dt == np.float32:
        _vec.gated_backward(op == GEGLU_BWD, dyf, gf, uf, out1, out2, nth)
    elif gf.shape[0] >= PARALLEL_MIN:
        _run_parallel(op, dyf, gf, uf, out1, out2, dt == np.float32, numba.get_num_threads())
    else:
        _run_serial(op, dyf, gf, uf, out1, out2, dt == np.float32)
    return out1.reshape(g.shape), out2.reshape(g.shape)


def swiglu_forward(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """g (T, n_ff), u (T, n_ff) -> y = silu(g) * u (T, n_ff)."""
    return _run(SWIGLU_FWD, None, g, u, 1)[0]


def swiglu_backward(dy: np.ndarray, g: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dy, g, u (T, n_ff) -> dg, du (T, n_ff)."""
    return _run(SWIGLU_BWD, dy, g, u, 2)


def geglu_forward(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """g (T, n_ff), u (T, n_ff) -> y = gelu_tanh(g) * u (T, n_ff)."""
    return _run(GEGLU_FWD, None, g, u, 1)[0]


def geglu_backward(dy: np.ndarray, g: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dy, g, u (T, n_ff) -> dg, du (T, n_ff)."""
    return _run(GEGLU_BWD, dy, g, u, 2)
