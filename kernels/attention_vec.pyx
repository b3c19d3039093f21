# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Causal GQA attention forward and backward in f32 (the math is in attention_util.h), built for x86 as
attention_avx2 and attention_avx512 (vectors of 8 or 16 floats).

ggtrain.kernels.attention uses the widest this CPU runs for f32 input (f64, the tests' finite
differences, stays in Numba). Work: K is transposed once per call
(one prange over kv heads × 16-key blocks); then tasks of AT_ROWS query rows of one head, the heaviest
(latest rows, most keys) first, handed out dynamically; every task writes its own rows of o and lse.
Backward: K and V transposed the same way and dsum = do·o per row in one region; then, in one more,
tasks of 16 keys of one kv head (dk, dv rows) and tasks of AB_ROWS query rows of one head (dq rows),
handed out dynamically: every task owns what it writes, so the result does not depend on which thread
runs which task (training is reproducible) and no thread waits for a descheduled one's share.
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
    void gg_ab_dsum(const float *dout, const float *o, int64_t T, int64_t Hq, int64_t Dv, int64_t i,
                    float *dsum)
    void gg_ab_keys(const float *q, const float *kt, const float *vt, const float *dout, const float *lse,
                    const float *dsum, const int32_t *lo, const int32_t *hi, int64_t T, int64_t Tp,
                    int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t g, int64_t j0, float scale,
                    float softcap, float *dkt, float *dvt, float *dk, float *dv)
    void gg_ab_queries(const float *q, const float *k, const float *kt, const float *vt, const float *dout,
                       const float *lse, const float *dsum, const int32_t *lo, int64_t T, int64_t Tp,
                       int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t h, int64_t g, int64_t i0,
                       int64_t i1, float scale, float softcap, float *dq)
    int AB_ROWS
    int GG_W

VECTOR_FLOATS = GG_W  # floats a vector holds at the width this module was built for (8: AVX2, 16: AVX512)


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


def attention_backward(const float[:, :, ::1] dout, const float[:, :, ::1] q, const float[:, :, ::1] k,
                       const float[:, :, ::1] v, const float[:, :, ::1] o, const float[:, ::1] lse,
                       const int32_t[::1] lo, const int32_t[::1] hi, float scale, float softcap,
                       float[:, :, ::1] dq, float[:, :, ::1] dk, float[:, :, ::1] dv, int nth):
    """dout (T, Hq, Dv) and the forward's q, k, v, o, lse; lo, hi (T,) from visible_range ->
    dq (T, Hq, D), dk (T, Hkv, D), dv (T, Hkv, Dv), on nth threads."""
    cdef Py_ssize_t T = q.shape[0], Hq = q.shape[1], D = q.shape[2], Hkv = k.shape[1], Dv = v.shape[2]
    if T == 0:
        return
    cdef Py_ssize_t Tp = (T + 15) // 16 * 16, nb = Tp // 16, G = Hq // Hkv, nq = (T + AB_ROWS - 1) // AB_ROWS
    cdef float *kt = <float *>malloc(Hkv * D * Tp * sizeof(float))
    cdef float *vt = <float *>malloc(Hkv * Dv * Tp * sizeof(float))
    cdef float *dsum = <float *>malloc(Hq * T * sizeof(float))
    cdef float *scratch = <float *>malloc(nth * (D + Dv) * 16 * sizeof(float))
    if kt == NULL or vt == NULL or dsum == NULL or scratch == NULL:
        free(kt)
        free(vt)
        free(dsum)
        free(scratch)
        raise MemoryError("attention backward: cannot allocate its buffers")
    cdef Py_ssize_t r, task, g, h, i0
    cdef float *sc
    with nogil:
        # one region: K and V transposed (Hkv·nb items) and dsum (T rows) as items of one loop
        for r in prange(Hkv * nb + T, num_threads=nth, schedule="static"):
            if r < Hkv * nb:
                gg_at_transpose_keys(&k[0, 0, 0], T, Hkv, D, r // nb, (r % nb) * 16, Tp, kt + (r // nb) * D * Tp)
                gg_at_transpose_keys(&v[0, 0, 0], T, Hkv, Dv, r // nb, (r % nb) * 16, Tp,
                                     vt + (r // nb) * Dv * Tp)
            else:
                gg_ab_dsum(&dout[0, 0, 0], &o[0, 0, 0], T, Hq, Dv, r - Hkv * nb, dsum)
        # one region for both passes: key tasks (earliest keys, the most queries, first), then query
        # tasks (latest rows first); each owns the rows it writes, so any thread may run any task
        with parallel(num_threads=nth):
            sc = scratch + threadid() * (D + Dv) * 16
            for task in prange(Hkv * nb + Hq * nq, schedule="dynamic", chunksize=1):
                if task < Hkv * nb:
                    g = task % Hkv
                    gg_ab_keys(&q[0, 0, 0], kt + g * D * Tp, vt + g * Dv * Tp, &dout[0, 0, 0], &lse[0, 0], dsum,
                               &lo[0], &hi[0], T, Tp, Hq, Hkv, D, Dv, g, (task // Hkv) * 16, scale, softcap,
                               sc, sc + D * 16, &dk[0, 0, 0], &dv[0, 0, 0])
                else:
                    h = (task - Hkv * nb) % Hq
                    i0 = (nq - 1 - (task - Hkv * nb) // Hq) * AB_ROWS
                    g = h // G
                    gg_ab_queries(&q[0, 0, 0], &k[0, 0, 0], kt + g * D * Tp, vt + g * Dv * Tp, &dout[0, 0, 0],
                                  &lse[0, 0], dsum, &lo[0], T, Tp, Hq, Hkv, D, Dv, h, g, i0, min(i0 + AB_ROWS, T),
                                  scale, softcap, &dq[0, 0, 0])
    free(kt)
    free(vt)
    free(dsum)
    free(scratch)
