# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The cross-entropy forward's per-chunk row work in f32 (loss.py's _ce_fwd_chunk, same contract; the
math is in loss_util.h), built as loss_avx2 and loss_avx512. Rows run in parallel, each on its own
entries."""

from cython.parallel cimport prange
from libc.stdint cimport int64_t

cdef extern from "loss_util.h" nogil:
    void gg_ce_row(float *row, int64_t c, float softcap, double *m, double *s)
    void gg_lse_merge(double *mx, double *sm, double m, double s)


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
