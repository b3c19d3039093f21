# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""A LoRA term's products with its output gradient, dy·B and hᵀ·dy, in one pass over dy (lowrank.py;
the math is in lowrank_util.h), built as lowrank_avx2 and lowrank_avx512. The columns of dy are cut
into one range a thread."""

from cython.parallel cimport prange
from libc.stdint cimport int64_t

cdef extern from "lowrank_util.h" nogil:
    void gg_lowrank_dy(const float *dy, int64_t ldy, int64_t T, const float *Bt, int64_t ldb, const float *h,
                       int64_t ldh, int r, float *dhp, int64_t ldp, float *dBt, int64_t ldbt, int64_t c0,
                       int64_t c1)


def dy_products(const float[:, ::1] dy, const float[:, :] Bt, const float[:, ::1] h, float[:, :, ::1] dhp,
                float[:, :] dBt, int nth):
    """dhp[p] += dy[:, part p] · Bt[:, part p]ᵀ (T, r), dBt (r, n) += hᵀ · dy, part p of nth column
    ranges on thread p (dhp: nth zeroed (T, r) partial sums; r a multiple of 4; Bt and dBt rows may be
    padded, their columns contiguous; shapes checked by the caller)."""
    cdef Py_ssize_t T = dy.shape[0], n = dy.shape[1], r = h.shape[1], p, c0, c1, step
    if T == 0 or n == 0 or r == 0:
        return
    step = ((n + nth - 1) // nth + 15) // 16 * 16  # column ranges on whole vectors
    for p in prange(nth, nogil=True, num_threads=nth, schedule="static"):
        c0 = min(n, p * step)
        c1 = min(n, c0 + step)
        if c0 < c1:
            gg_lowrank_dy(&dy[0, 0], dy.shape[1], T, &Bt[0, 0], Bt.strides[0] // 4, &h[0, 0], h.shape[1], <int>r,
                          &dhp[p, 0, 0], dhp.shape[2], &dBt[0, 0], dBt.strides[0] // 4, c0, c1)
