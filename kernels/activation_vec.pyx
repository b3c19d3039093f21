# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Gated FFN activations' forward and backward in f32 (activation.py's GeGLU and SwiGLU; the math is in
activation_util.h), built as activation_avx2 and activation_avx512. Blocks of BLOCK elements run in
parallel."""

from cython.parallel cimport prange
from libc.stdint cimport int64_t

cdef extern from "activation_util.h" nogil:
    void gg_geglu_fwd(const float *g, const float *u, float *y, int64_t n)
    void gg_swiglu_fwd(const float *g, const float *u, float *y, int64_t n)
    void gg_geglu_bwd(const float *dy, const float *g, const float *u, float *dg, float *du, int64_t n)
    void gg_swiglu_bwd(const float *dy, const float *g, const float *u, float *dg, float *du, int64_t n)

DEF BLOCK = 16384


def gated_forward(bint geglu, const float[::1] g, const float[::1] u, float[::1] y, int nth):
    """y = act(g) · u elementwise (act gelu_tanh if geglu else silu); 1-D, equal lengths; on nth
    threads (activation.py gives 1 below ggtrain.kernels.PARALLEL_MIN elements)."""
    cdef Py_ssize_t n = g.shape[0], nb = (n + BLOCK - 1) // BLOCK, b, i0
    if n == 0:
        return
    for b in prange(nb, nogil=True, num_threads=nth, schedule="static"):
        i0 = b * BLOCK
        if geglu:
            gg_geglu_fwd(&g[i0], &u[i0], &y[i0], min(BLOCK, n - i0))
        else:
            gg_swiglu_fwd(&g[i0], &u[i0], &y[i0], min(BLOCK, n - i0))


def gated_backward(bint geglu, const float[::1] dy, const float[::1] g, const float[::1] u, float[::1] dg,
                   float[::1] du, int nth):
    """dg, du of y = act(g) · u given dy (1-D, equal lengths); threads as gated_forward."""
    cdef Py_ssize_t n = g.shape[0], nb = (n + BLOCK - 1) // BLOCK, b, i0
    if n == 0:
        return
    for b in prange(nb, nogil=True, num_threads=nth, schedule="static"):
        i0 = b * BLOCK
        if geglu:
            gg_geglu_bwd(&dy[i0], &g[i0], &u[i0], &dg[i0], &du[i0], min(BLOCK, n - i0))
        else:
            gg_swiglu_bwd(&dy[i0], &g[i0], &u[i0], &dg[i0], &du[i0], min(BLOCK, n - i0))
