# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The cross-entropy's per-chunk row work in f32 (loss.py's _ce_fwd_chunk and _ce_fused_chunk, same
contracts; the math is in loss_util.h), built as loss_avx2 and loss_avx512. Rows run in parallel,
each on its own entries."""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint16_t

cdef extern from "loss_util.h" nogil:
    enum:
        GG_W
    void gg_ce_row(float *row, int64_t c, float softcap, double *m, double *s)
    void gg_lse_merge(double *mx, double *sm, double m, double s)
    void gg_ce_fused_row(float *row, int64_t c, float softcap, int64_t j, double *run_max, double *run_sum,
                         double *tgt, double *rescale, uint16_t *out16)


BF16_OUT = GG_W == 16  # ce_fused_chunk can write its output as bf16 (the AVX512 build)


def ce_forward_chunk(float[:, ::1] logits, int64_t r0, const int64_t[::1] targets, float softcap,
                     double[::1] run_max, double[::1] run_sum, double[::1] tgt_logit, int nth):
    """logits (T, c) raw, capped in place; merges each row's (max, Σexp) into run_max/run_sum and
    picks the target logit when the target falls in [r0, r0 + c)."""
    cdef Py_ssize_t T = logits.shape[0], c = logits.shape[1], t, j
    cdef double m, s
    if T == 0 or c == 0:
        return
    for t in prange(T, nogil=True, num_threads=nth, schedule="static"):
        m = 0  # assigned here so that prange makes m and s thread-private (gg_ce_row writes them)
        s = 0
        gg_ce_row(&logits[t, 0], c, softcap, &m, &s)
        j = targets[t] - r0
        if 0 <= j < c:
            tgt_logit[t] = logits[t, j]
        gg_lse_merge(&run_max[t], &run_sum[t], m, s)


def ce_fused_chunk(float[:, ::1] logits, int64_t r0, const int64_t[::1] targets, float softcap,
                   double[::1] run_max, double[::1] run_sum, double[::1] tgt_logit, double[::1] rescale,
                   uint16_t[:, ::1] out16, int nth):
    """logits (T, c) raw -> exp(z - M_new)·z', over logits in f32 or, given out16 (T, c) uint16, into
    it as bf16 bits; run_max, run_sum, tgt_logit updated, rescale (T,) = exp(M_old - M_new)."""
    cdef Py_ssize_t T = logits.shape[0], c = logits.shape[1], t
    if T == 0 or c == 0:
        return
    if out16 is not None and (out16.shape[0] != T or out16.shape[1] != c):
        raise ValueError(f"out16 is {out16.shape[0]}x{out16.shape[1]}, the logits {T}x{c}")
    if out16 is not None and not BF16_OUT:
        raise ValueError("a bf16 output needs the AVX512 build (the bf16 products run on AVX512 CPUs only)")
    cdef uint16_t *o = &out16[0, 0] if out16 is not None else NULL
    for t in prange(T, nogil=True, num_threads=nth, schedule="static"):
        gg_ce_fused_row(&logits[t, 0], c, softcap, targets[t] - r0, &run_max[t], &run_sum[t], &tgt_logit[t],
                        &rescale[t], o + t * c if o != NULL else NULL)
