# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Causal GQA attention forward and backward in f32 on AVX512 (the math is in attention_util.h).

Built only for x86 with AVX512 flags; ggtrain.kernels.attention uses it for f32 input on a CPU that
has them (f64, the tests' finite differences, stays in Numba). Work: K is transposed once per call
(one prange over kv heads × 16-key blocks); then tasks of AT_ROWS query rows of one head, the heaviest
(latest rows, most keys) first, handed out dynamically; every task writes its own rows of o and lse.
Backward: K and V transposed the same way and dsum = do·o per row; then tasks of 16 keys of one kv
head, the heaviest (earliest keys, most queries) first: each writes its rows of
dk and dv and adds into its thread's dq buffer (thread 0's is dq itself), summed at the end; tasks
go round-robin to the threads (the result does not depend on timing).
"""

from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport calloc, free, malloc

cdef extern from "attention_util.h" nogil:
    int AT_ROWS
    void gg_at_transpose_keys(const float *k, int64_t T, int64_t Hkv, int64_t D, int64_t g, int64_t j0,
                              int64_t Tp, float *kt)
    void gg_at_task(const float *q, const float *kt, const float *v, const int32_t *lo, int64_t T,
                    int64_t Tp, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t h, int64_t g,
                    int64_t i0, int64_t i1, float scale, float softcap, float *s, float *o, float *lse)
    void gg_ab_dsum(const float *dout, const float *o, int64_t T, int64_t Hq, int64_t Dv, int64_t i,
                    float *dsum)
    void gg_ab_task(const float *q, const float *k, const float *kt, const float *vt, const float *dout,
                    const float *lse, const float *dsum, const int32_t *lo, const int32_t *hi, int64_t T,
                    int64_t Tp, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t g, int64_t j0,
                    float scale, float softcap, float *dkt, float *dvt, float *dq, float *dk, float *dv)


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
    dq (T, Hq, D) (zeroed by the caller), dk (T, Hkv, D), dv (T, Hkv, Dv). nth threads, each with a
    (T, Hq, D) dq buffer (the caller caps nth for their memory)."""
    cdef Py_ssize_t T = q.shape[0], Hq = q.shape[1], D = q.shape[2], Hkv = k.shape[1], Dv = v.shape[2]
    if T == 0:
        return
    cdef Py_ssize_t Tp = (T + 15) // 16 * 16, nb = Tp // 16, n = T * Hq * D
    cdef float *kt = <float *>malloc(Hkv * D * Tp * sizeof(float))
    cdef float *vt = <float *>malloc(Hkv * Dv * Tp * sizeof(float))
    cdef float *dsum = <float *>malloc(Hq * T * sizeof(float))
    cdef float *scratch = <float *>malloc(nth * (D + Dv) * 16 * sizeof(float))
    cdef float *parts = <float *>calloc((nth - 1) * n if nth > 1 else 1, sizeof(float))
    if kt == NULL or vt == NULL or dsum == NULL or scratch == NULL or parts == NULL:
        free(kt)
        free(vt)
        free(dsum)
        free(scratch)
        free(parts)
        raise MemoryError("attention backward: cannot allocate its buffers")
    cdef Py_ssize_t r, task, g, t, e
    cdef float *sc
    cdef float *dqb
    cdef float acc
    cdef float *dqp = &dq[0, 0, 0]
    with nogil:
        for r in prange(Hkv * nb, num_threads=nth, schedule="static"):
            gg_at_transpose_keys(&k[0, 0, 0], T, Hkv, D, r // nb, (r % nb) * 16, Tp, kt + (r // nb) * D * Tp)
            gg_at_transpose_keys(&v[0, 0, 0], T, Hkv, Dv, r // nb, (r % nb) * 16, Tp, vt + (r // nb) * Dv * Tp)
        for r in prange(T, num_threads=nth, schedule="static"):
            gg_ab_dsum(&dout[0, 0, 0], &o[0, 0, 0], T, Hq, Dv, r, dsum)
        with parallel(num_threads=nth):
            t = threadid()
            sc = scratch + t * (D + Dv) * 16
            dqb = dqp if t == 0 else parts + (t - 1) * n
            # round-robin, not dynamic: which thread's dq buffer a task adds to is fixed, so the
            # sum of the buffers (and training) is the same from run to run
            for task in prange(Hkv * nb, schedule="static", chunksize=1):
                g = task % Hkv
                gg_ab_task(&q[0, 0, 0], &k[0, 0, 0], kt + g * D * Tp, vt + g * Dv * Tp, &dout[0, 0, 0],
                           &lse[0, 0], dsum, &lo[0], &hi[0], T, Tp, Hq, Hkv, D, Dv, g, (task // Hkv) * 16,
                           scale, softcap, sc, sc + D * 16, dqb, &dk[0, 0, 0], &dv[0, 0, 0])
        if nth > 1:
            for e in prange(n, num_threads=nth, schedule="static"):
                acc = dqp[e]
                for g in range(nth - 1):
                    acc = acc + parts[g * n + e]
                dqp[e] = acc
    free(kt)
    free(vt)
    free(dsum)
    free(scratch)
    free(parts)
