"""RMSNorm forward/backward (llama.cpp's ggml_rms_norm followed by ggml_mul with the weight).

    y = x / sqrt(mean(x²) + eps) * w        over the last dimension

Used on the residual stream (T, d) and per head on q/k (T, H, hd) for the q/k norms of Qwen3 and
Gemma 3. Gemma's "1 + w" is already folded into the stored weights by the GGUF converter, so the
weight is applied as is. The weight is frozen: the backward returns dx only.

Dtype-generic: f32 in -> f32 out, f64 in -> f64 out (tests run the kernels in f64). The sum of
squares and the backward's dot product are accumulated in f64 whatever the dtype (ggml does the
same: its sum is a ggml_float).
"""

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath=True)
def _rmsnorm_fwd(x, w, eps, y, rstd):
    # x, y: (N, d); w: (d,); rstd: (N,) f32/f64
    n, d = x.shape
    for r in prange(n):
        ss = 0.0  # f64 accumulator
        for i in range(d):
            v = np.float64(x[r, i])
            ss += v * v
        s = 1.0 / np.sqrt(ss / d + eps)
        rstd[r] = s
        for i in range(d):
            y[r, i] = x[r, i] * s * w[i]


@njit(cache=True, parallel=True, fastmath=True)
def _rmsnorm_bwd(dy, x, w, rstd, dx):
    # dy, x, dx: (N, d); w: (d,); rstd: (N,)
    # y_i = x_i r w_i, r = (mean(x²)+eps)^-1/2  =>  dx_i = r (dy_i w_i) - x_i r³/d Σ_j dy_j w_j x_j
    n, d = x.shape
    for r in prange(n):
        dot = 0.0  # f64 accumulator
        for i in range(d):
            dot += np.float64(dy[r, i]) * w[i] * x[r, i]
        s = np.float64(rstd[r])
        c = dot * s * s * s / d
        for i in range(d):
            dx[r, i] = s * dy[r, i] * w[i] - c * x[r, i]


def rmsnorm_forward(x: np.ndarray, w: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """x (..., d), w (d,) -> y (..., d) same dtype as x, rstd (...,) the 1/rms kept for the backward."""
    d = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, d)
    w = np.ascontiguousarray(w, dtype=x2.dtype)
    y = np.empty_like(x2)
    rstd = np.empty(x2.shape[0], dtype=x2.dtype)
    _rmsnorm_fwd(x2, w, float(eps), y, rstd)
    return y.reshape(x.shape), rstd.reshape(x.shape[:-1])


def rmsnorm_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, rstd: np.ndarray) -> np.ndarray:
    """dy (..., d), x (..., d) the forward input, w (d,), rstd (...,) from the forward -> dx (..., d)."""
    d = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, d)
    dy2 = np.ascontiguousarray(dy, dtype=x2.dtype).reshape(-1, d)
    w = np.ascontiguousarray(w, dtype=x2.dtype)
    dx = np.empty_like(x2)
    _rmsnorm_bwd(dy2, x2, w, np.ascontiguousarray(rstd).reshape(-1), dx)
    return dx.reshape(x.shape)
