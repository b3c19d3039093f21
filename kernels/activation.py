"""Gated FFN activations, forward/backward (ggml's swiglu and geglu).

    SwiGLU: y = silu(g) * u,        silu(g) = g / (1 + e^-g)
    GeGLU:  y = gelu_tanh(g) * u,   gelu_tanh(g) = ½ g (1 + tanh(√(2/π) (g + 0.044715 g³)))

g is the ffn_gate projection, u the ffn_up projection, both (T, n_ff). ggml's CPU geglu reads
gelu from an f16 lookup table (GGML_GELU_FP16); we compute the same tanh formula in full precision,
which is what the table approximates and what has a derivative.

Dtype-generic (f32 or f64 in, same out); the elementwise math runs in the input dtype.
"""

import math

import numpy as np
from numba import njit, prange

GELU_COEF_A = 0.044715
SQRT_2_OVER_PI = 0.79788456080286535587989211986876


@njit(cache=True, parallel=True, fastmath=True)
def _swiglu_fwd(g, u, y):
    # g, u, y: (N,) flat
    for i in prange(g.shape[0]):
        x = g[i]
        y[i] = x / (1.0 + math.exp(-x)) * u[i]


@njit(cache=True, parallel=True, fastmath=True)
def _swiglu_bwd(dy, g, u, dg, du):
    # d silu/dg = s (1 + g (1 - s)), s = sigmoid(g)
    for i in prange(g.shape[0]):
        x = g[i]
        s = 1.0 / (1.0 + math.exp(-x))
        du[i] = dy[i] * x * s
        dg[i] = dy[i] * u[i] * s * (1.0 + x * (1.0 - s))


@njit(cache=True, parallel=True, fastmath=True)
def _geglu_fwd(g, u, y):
    for i in prange(g.shape[0]):
        x = g[i]
        t = math.tanh(SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x))
        y[i] = 0.5 * x * (1.0 + t) * u[i]


@njit(cache=True, parallel=True, fastmath=True)
def _geglu_bwd(dy, g, u, dg, du):
    # d gelu/dg = ½ (1 + t) + ½ g (1 - t²) √(2/π) (1 + 3·0.044715 g²)
    for i in prange(g.shape[0]):
        x = g[i]
        t = math.tanh(SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x))
        du[i] = dy[i] * 0.5 * x * (1.0 + t)
        dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEF_A * x * x)
        dg[i] = dy[i] * u[i] * dgelu


def _flat(*arrays: np.ndarray) -> list[np.ndarray]:
    shape, dtype = arrays[0].shape, arrays[0].dtype
    for a in arrays[1:]:
        if a.shape != shape:
            raise ValueError(f"activation: shape mismatch {a.shape} vs {shape}")
    return [np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in arrays]


def swiglu_forward(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """g (T, n_ff), u (T, n_ff) -> y = silu(g) * u (T, n_ff)."""
    gf, uf = _flat(g, u)
    y = np.empty_like(gf)
    _swiglu_fwd(gf, uf, y)
    return y.reshape(g.shape)


def swiglu_backward(dy: np.ndarray, g: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dy, g, u (T, n_ff) -> dg, du (T, n_ff)."""
    gf, dyf, uf = _flat(g, dy, u)
    dg, du = np.empty_like(gf), np.empty_like(gf)
    _swiglu_bwd(dyf, gf, uf, dg, du)
    return dg.reshape(g.shape), du.reshape(g.shape)


def geglu_forward(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """g (T, n_ff), u (T, n_ff) -> y = gelu_tanh(g) * u (T, n_ff)."""
    gf, uf = _flat(g, u)
    y = np.empty_like(gf)
    _geglu_fwd(gf, uf, y)
    return y.reshape(g.shape)


def geglu_backward(dy: np.ndarray, g: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dy, g, u (T, n_ff) -> dg, du (T, n_ff)."""
    gf, dyf, uf = _flat(g, dy, u)
    dg, du = np.empty_like(gf), np.empty_like(gf)
    _geglu_bwd(dyf, gf, uf, dg, du)
    return dg.reshape(g.shape), du.reshape(g.shape)
