# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Causal GQA attention forward in f32 on AVX512 (the math is in attention_util.h).

Built only for x86 with AVX512 flags; ggtrain.kernels.attention uses it for f32 input on a CPU that
has them (f64, the tests' finite differences, stays in Numba). Work: K is transposed once per call
(one prange over kv heads × 16-key blocks); then tasks of AT_ROWS query rows of one head, the heaviest
(latest rows, most keys) first, handed out dynamically; every task writes its own rows of o and lse.
"""

from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport free, malloc

cdef extern from "attention_util.h" nogil:
    int AT_ROWS
    void gg_at_transpose_keys(const float *k, int64_t T, int64_t Hkv, int64_t D, int64_t g, int64_t j0,
                              int64_t Tp, float *kt)
    void gg_at_task(const float *q, const float *kt, const float *v, const int32_t *lo, int64_t T,
                    int64_t Tp, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t h, int64_t g,
                    int64_t i0, int64_t i1, float scale, float softcap, float *s, float *o, float *lse)


def attention_forward(const float[:, :, ::1] q, const float[:, :, ::1] k, const float[:, :, ::1] v,
                      const int32_t[::1] lo, float scale, float softcap, float[:, :, ::1] o,
                      float[:, ::1] lse, int nth):
    """q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv), lo (T,) -> o (T, Hq, Dv), lse (Hq, T).
    Dv must be a multiple of 16 (checked by the caller)."""
    cdef Py_ssize_t T = q.shape[0], Hq = q.shape[1], D = q.shape[2], Hkv = k.shape[1], Dv = v.shape[2]
    if T == 0:
        return
    cdef Py_ssize_t Tp = (T + 15) // 16 * 16, G = Hq // Hkv, nb = (T + AT_ROWS - 1) // AT_ROWS
    cdef Py_ssize_t ls = AT_ROWS * (Tp + 32)
    cdef float *kt = <float *>malloc(Hkv * D * Tp * sizeof(float))
    cdef float *scratch = <float *>malloc(nth * ls * sizeof(float))
    if kt == NULL or scratch == NULL:
        free(kt)
        free(scratch)
        raise MemoryError("attention: cannot allocate the transposed keys")
    cdef Py_ssize_t r, task, h, qb, i0
    cdef float *s
    with nogil:
        for r in prange(Hkv * (Tp // 16), num_threads=nth, schedule="static"):
            gg_at_transpose_keys(&k[0, 0, 0], T, Hkv, D, r // (Tp // 16), (r % (Tp // 16)) * 16, Tp,
                                 kt + (r // (Tp // 16)) * D * Tp)
        with parallel(num_threads=nth):
            s = scratch + threadid() * ls
            for task in prange(Hq * nb, schedule="dynamic", chunksize=1):
                qb = nb - 1 - task // Hq
                h = task % Hq
                i0 = qb * AT_ROWS
                gg_at_task(&q[0, 0, 0], kt + (h // G) * D * Tp, &v[0, 0, 0], &lo[0], T, Tp, Hq, Hkv, D, Dv,
                           h, h // G, i0, min(i0 + AT_ROWS, T), scale, softcap, s, &o[0, 0, 0], &lse[0, 0])
    free(kt)
    free(scratch)
