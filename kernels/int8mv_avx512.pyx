# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""int8 Y = X·Wᵀ for a few tokens (decoding) over GGUF weights on AVX512-VNNI (math in int8mv_util.h).

The tokens are quantized once; then a prange over blocks of weight rows: each thread converts a
row to its int8 form in an L1-sized buffer and takes its dot product with every token. Memory-bound
on the weights, as a matrix-vector product should be; int8mm_avx512 (16-token tiles) takes over
for more tokens (ggtrain.kernels.qmatmul_int8 chooses).
"""

from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int8_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memset

cdef extern from "stdlib.h" nogil:
    void *aligned_alloc(size_t alignment, size_t size)

cdef extern from "int8mv_util.h" nogil:
    ctypedef uint64_t __mmask64
    int gg_mv_weight_row(int qtype, const uint8_t *b, int64_t nb, int8_t *q, float *s, float *o)
    void gg_mv_quantize(const float *x, int64_t n, int G, uint8_t *ax, __mmask64 *neg, float *xs, float *xsum)
    float gg_mv_dot(int G, int has_off, int64_t n, const int8_t *q, const float *s, const float *o,
                    const uint8_t *ax, const __mmask64 *neg, const float *xs, const float *xsum)

DEF ROWS_PER_TASK = 16  # rows a thread takes at a time: a few KiB of weights, enough to hide the hand-out
MAX_TOKENS = 8  # beyond this the tiled kernel (int8mm_avx512) is faster


def qmatmul_int8_mv(int qtype, int G, bint has_off, int block, int type_size, const uint8_t[:, :] w,
                    const float[:, :] x, float[:, :] y, int nth):
    """y (T, R) = x (T, n) · Wᵀ through the int8 form, T <= MAX_TOKENS (inner strides 1, checked by
    the caller; G and has_off as int8mm_avx512.group_size / has_offset say)."""
    cdef Py_ssize_t R = w.shape[0], nb = w.shape[1] // type_size, n = nb * block, T = x.shape[0]
    if T == 0 or R == 0:
        return
    if T > MAX_TOKENS:
        raise ValueError(f"qmatmul_int8_mv: {T} tokens, at most {MAX_TOKENS}")
    cdef Py_ssize_t nc = (n + 63) // 64, ng = n // G, gpad = ng + 32
    cdef Py_ssize_t tok_bytes = (nc * 64 + nc * 8 + 2 * gpad * 4 + 63) // 64 * 64
    cdef Py_ssize_t thr_bytes = (nc * 64 + 2 * gpad * 4 + 63) // 64 * 64
    cdef uint8_t *tb = <uint8_t *>aligned_alloc(64, T * tok_bytes)
    cdef uint8_t *wb = <uint8_t *>aligned_alloc(64, nth * thr_bytes)
    if tb == NULL or wb == NULL:
        free(tb)
        free(wb)
        raise MemoryError("cannot allocate the int8 matrix-vector buffers")
    memset(wb, 0, nth * thr_bytes)  # scales past the last group stay 0 (the kernel reads a chunk's worth)
    cdef Py_ssize_t t, task, r, r0, n_tasks = (R + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    cdef uint8_t *tt
    cdef uint8_t *mine
    cdef int8_t *q
    cdef float *s
    cdef float *o
    with nogil:
        for t in range(T):
            tt = tb + t * tok_bytes
            gg_mv_quantize(&x[t, 0], n, G, tt, <__mmask64 *>(tt + nc * 64), <float *>(tt + nc * 72),
                           <float *>(tt + nc * 72) + gpad)
        with parallel(num_threads=nth):
            mine = wb + threadid() * thr_bytes
            q = <int8_t *>mine
            s = <float *>(mine + nc * 64)
            o = s + gpad
            for task in prange(n_tasks, schedule="static"):
                r0 = task * ROWS_PER_TASK
                for r in range(r0, min(r0 + ROWS_PER_TASK, R)):
                    gg_mv_weight_row(qtype, &w[r, 0], nb, q, s, o)
                    for t in range(T):
                        tt = tb + t * tok_bytes
                        y[t, r] = gg_mv_dot(G, has_off, n, q, s, o, tt, <__mmask64 *>(tt + nc * 64),
                                            <float *>(tt + nc * 72), <float *>(tt + nc * 72) + gpad)
    free(tb)
    free(wb)
