"""RMSNorm forward/backward (llama.cpp's ggml_rms_norm followed by ggml_mul with the weight).

    y = x / sqrt(mean(x²) + eps) * w        over the last dimension

Used on the residual stream (T, d) and per head on q/k (T, H, hd) for the q/k norms of Qwen3 and
Gemma 3. Gemma's "1 + w" is already folded into the stored weights by the GGUF converter, so the
weight is applied as is. The weight is frozen: the backward returns dx only.

Dtype-generic: f32 in -> f32 out, f64 in -> f64 out (tests run the kernels in f64). The sum of
squares and the backward's dot product are accumulated in f64 whatever the dtype (ggml does the
same: its sum is a ggml_float). Rows run in parallel for arrays of PARALLEL_MIN elements or more.
"""

import numpy as np
from ggtrain.kernels import PARALLEL_MIN  # smaller arrays run on the calling thread
from numba import njit, prange


@njit(cache=True, fastmath=True)
def _fwd_row(x, w, eps, y, rstd, r):
    # one row r: y = x · rstd · w, rstd = 1/sqrt(mean(x²) + eps)
    d = x.shape[1]
    ss = 0.0  # f64 accumulator
    for i in range(d):
        v = np.float64(x[r, i])
        ss += v * v
    s = 1.0 / np.sqrt(ss / d + eps)
    rstd[r] = s
    sf = x.dtype.type(s)
    for i in range(d):
        y[r, i] = x[r, i] * sf * w[i]


@njit(cache=True, fastmath=True)
def _bwd_row(dy, x, w, rstd, dx, r):
    # y_i = x_i r w_i, r = (mean(x²)+eps)^-1/2  =>  dx_i = r (dy_i w_i) - x_i r³/d Σ_j dy_j w_j x_j
    d = x.shape[1]
    dot = 0.0  # f64 accumulator
    for i in range(d):
        dot += np.float64(dy[r, i]) * w[i] * x[r, i]
    s = np.float64(rstd[r])
    sf = x.dtype.type(s)
    cf = x.dtype.type(dot * s * s * s / d)
    for i in range(d):
        dx[r, i] = sf * dy[r, i] * w[i] - cf * x[r, i]


@njit(cache=True)
def _rows_serial(backward, a, x, w, eps, rstd, out):
    # forward: a unused, out = y; backward: a = dy, out = dx
    for r in range(x.shape[0]):
        if backward:
            _bwd_row(a, x, w, rstd, out, r)
        else:
            _fwd_row(x, w, eps, out, rstd, r)


@njit(cache=True, parallel=True)
def _rows_parallel(backward, a, x, w, eps, rstd, out):
    for r in prange(x.shape[0]):
        if backward:
            _bwd_row(a, x, w, rstd, out, r)
        else:
            _fwd_row(x, w, eps, out, rstd, r)


def _rows(backward: bool, a: np.ndarray, x: np.ndarray, w: np.ndarray, eps: float, rstd: np.ndarray,
          out: np.ndarray) -> None:
    run = _rows_parallel if x.size >= PARALLEL_MIN else _rows_serial
    run(backward, a, x, w, float(eps), rstd, out)


def rmsnorm_forward(x: np.ndarray, w: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """x (..., d), w (d,) -> y (..., d) same dtype as x, rstd (...,) the 1/rms kept for the backward."""
    d = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, d)
    w = np.ascontiguousarray(w, dtype=x2.dtype)
    y = np.empty_like(x2)
    rstd = np.empty(x2.shape[0], dtype=x2.dtype)
    _rows(False, x2, x2, w, eps, rstd, y)
    return y.reshape(x.shape), rstd.reshape(x.shape[:-1])


def rmsnorm_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, rstd: np.ndarray) -> np.ndarray:
    """dy (..., d), x (..., d) the forward input, w (d,), rstd (...,) from the forward -> dx (..., d)."""
    d = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, d)
    dy2 = np.ascontiguousarray(dy, dtype=x2.dtype).reshape(-1, d)
    w = np.ascontiguousarray(w, dtype=x2.dtype)
    dx = np.empty_like(x2)
    _rows(True, dy2, x2, w, 0.0, np.ascontiguousarray(rstd, dtype=x2.dtype).reshape(-1), dx)
    return dx.reshape(x.shape)
