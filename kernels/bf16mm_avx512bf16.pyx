# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""bf16 matmul over GGUF weights on AVX512-BF16 (vdpbf16ps): the math and layouts are in bf16mm_util.h.

Built only for x86 with the avx512bf16 row's flags; ggtrain.kernels imports it only on a CPU that
has them. One call: the activations (X forward, dY backward) are rounded to bf16 once, row-major,
by a prange over tokens into k tiles (or used as given when the caller passes them rounded and K is
even); then each work item is a disjoint block of the output, handed out dynamically, no barriers: a thread packs one weight
tile at a time (dequantize, round, interleave) into its own 64-byte-aligned buffer and runs the
micro-kernel over it for every token of the item.
  forward items:  tile_rows weight rows (panels of GG_BF_NR), walked tile_cols columns at a time
  backward items: (tile_cols output columns, one of token_parts token ranges), walked down W
                  tile_rows rows at a time
Accumulation is f32 throughout: across k inside the micro-kernel, across tiles in the output.
"""

import numpy as np

from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free
from libc.string cimport memcpy

cimport openmp

cdef extern from "bf16mm_util.h" nogil:
    enum:
        GG_BF_MR, GG_BF_NR, GG_BF_KC
    void gg_bf16_round_row(const float *x, uint16_t *y, int64_t n, int pad)
    void gg_bf16_tile_row(const float *x, const uint16_t *xb, int64_t K, int64_t tk, int64_t T, int64_t t,
                          uint16_t *dst)
    int gg_bf_dequant(int qtype, const uint8_t *b, float *y, int64_t nb)
    int gg_bf16_pack_fwd(int qtype, int block, int type_size, const uint8_t *w, int64_t wstride, int nr,
                         int64_t k0, int kc, float *scratch, uint32_t *bp)
    int gg_bf16_pack_bwd(int qtype, int block, int type_size, const uint8_t *w, int64_t wstride, int kr,
                         int64_t c0, int nc, float *scratch, uint32_t *bp)
    void gg_bf16_micro(int64_t kp, const uint16_t *a, int64_t lda, int mr, const uint32_t *bp, float *c,
                       int64_t ldc, int nc, int accumulate, const float *u, int64_t ldu, const float *v,
                       int64_t ldv, int ur)
    void gg_bf16_panel(int64_t kp, const uint16_t *a, int64_t lda, int64_t t0, int64_t t1,
                       const uint32_t *bp, float *c, int64_t ldc, int nc, int accumulate, const float *u,
                       int64_t ldu, const float *v, int64_t ldv, int ur)

include "bf16mm_args.pxi"

MICRO_ROWS = GG_BF_MR   # tokens per micro-tile
MICRO_COLS = GG_BF_NR   # output columns per micro-tile (and forward tile rows)
TILE_K = GG_BF_KC       # k per packed tile: a multiple of this
TAKES_ADDEND = True     # qmatmul's u, v: the micro-kernel adds a low-rank f32 product as it stores


cdef inline Py_ssize_t split(Py_ssize_t n, Py_ssize_t parts, Py_ssize_t p) noexcept nogil:
    """Start of part p of [0, n) cut into `parts` near-equal pieces, on micro-tile boundaries."""
    return min(n, (n // GG_BF_MR * p // parts) * GG_BF_MR) if p < parts else n


def to_bf16_rows(const float[:, :] x, uint16_t[:, :] out, int nth):
    """out = x rounded to bf16 (inner strides 1, checked by the caller), rows on nth threads."""
    cdef Py_ssize_t T = x.shape[0], n = x.shape[1], t
    if T == 0 or n == 0:
        return
    cdef const float *src = &x[0, 0]
    cdef uint16_t *dst = &out[0, 0]
    cdef Py_ssize_t lds = x.strides[0] // 4, ldd = out.strides[0] // 2
    with nogil:
        for t in prange(T, num_threads=nth, schedule="static"):
            gg_bf16_round_row(src + t * lds, dst + t * ldd, n, 0)


cdef int bf_forward(int qtype, int block, int type_size, const uint8_t *w, Py_ssize_t wstride,
                    Py_ssize_t R, Py_ssize_t K, const ATiles *A, Py_ssize_t T,
                    float *y, Py_ssize_t ldy, Py_ssize_t tile_rows, Py_ssize_t tile_k, const Addend *L,
                    int nth) noexcept nogil:
    """y (T, R) = a (T, K) · Wᵀ (+ U·V, added with the last tile of k). An item is tile_rows (a multiple of GG_BF_NR) weight rows: per tile
    of tile_k values of k its panels are packed, then each panel meets every token (the tile's
    slice of a, T × tile_k, stays in L2 across the panels). Returns -1 if out of memory."""
    cdef Py_ssize_t n_panels = tile_rows // GG_BF_NR
    cdef Py_ssize_t per_thread = (tile_k // 2) * tile_rows * 4 + 16 * GG_BF_KC * 4  # bp, scratch
    cdef uint8_t *bufs = <uint8_t *>alloc64(nth * per_thread)
    if bufs == NULL:
        return -1
    cdef Py_ssize_t n_items = (R + tile_rows - 1) // tile_rows, item, r0, k0, s, kp, lda
    cdef int nr, kc
    cdef const uint16_t *a
    cdef uint32_t *bp
    cdef float *scratch
    with parallel(num_threads=nth):
        bp = <uint32_t *>(bufs + threadid() * per_thread)
        scratch = <float *>(bp + (tile_k // 2) * tile_rows)
        for item in prange(n_items, schedule="dynamic", chunksize=1):
            k0 = 0
            while k0 < K:
                kc = <int>min(tile_k, K - k0)
                kp = (kc + 1) // 2
                a = A.a + (k0 // tile_k) * A.tstride  # (assigned here, so private to the thread)
                lda = a_ld(A, k0 // tile_k)
                s = 0
                while s < n_panels and item * tile_rows + s * GG_BF_NR < R:
                    r0 = item * tile_rows + s * GG_BF_NR
                    nr = <int>min(<Py_ssize_t>GG_BF_NR, R - r0)
                    gg_bf16_pack_fwd(qtype, block, type_size, w + r0 * wstride, wstride, nr, k0, kc, scratch,
                                     bp + s * kp * GG_BF_NR)
                    s = s + 1
                s = 0
                while s < n_panels and item * tile_rows + s * GG_BF_NR < R:
                    r0 = item * tile_rows + s * GG_BF_NR
                    nr = <int>min(<Py_ssize_t>GG_BF_NR, R - r0)
                    gg_bf16_panel(kp, a, lda, 0, T, bp + s * kp * GG_BF_NR, y + r0, ldy, nr, k0 > 0,
                                  L.u, L.ldu, L.v + r0, L.ldv, L.ur if k0 + kc >= K else 0)
                    s = s + 1
                k0 = k0 + kc
    free(bufs)
    return 0


cdef int bf_backward(int qtype, int block, int type_size, const uint8_t *w, Py_ssize_t wstride,
                     Py_ssize_t R, Py_ssize_t n, const ATiles *A, Py_ssize_t T,
                     float *dx, Py_ssize_t lddx, bint accumulate, Py_ssize_t tile_k, Py_ssize_t tile_cols,
                     Py_ssize_t token_parts, const Addend *L, int nth) noexcept nogil:
    """dx (T, n) (+)= a (T, R) · W (+ U·V, added with the last tile of k). Returns -1 if out of memory."""
    cdef Py_ssize_t n_panels = (tile_cols + GG_BF_NR - 1) // GG_BF_NR
    cdef Py_ssize_t per_thread = ((tile_k // 2) * n_panels * GG_BF_NR * 4  # bp, scratch
                                  + (2 * (tile_cols + GG_BF_NR) * 4 + 63) // 64 * 64)
    cdef uint8_t *bufs = <uint8_t *>alloc64(nth * per_thread)
    if bufs == NULL:
        return -1
    cdef Py_ssize_t n_col = (n + tile_cols - 1) // tile_cols, item, r0, c0, t0, t1, s, kp, lda
    cdef int nc, kr
    cdef const uint16_t *a
    cdef uint32_t *bp
    cdef float *scratch
    with parallel(num_threads=nth):
        bp = <uint32_t *>(bufs + threadid() * per_thread)
        scratch = <float *>(bp + (tile_k // 2) * n_panels * GG_BF_NR)
        for item in prange(n_col * token_parts, schedule="dynamic", chunksize=1):
            c0 = (item // token_parts) * tile_cols
            nc = <int>min(tile_cols, n - c0)
            t0 = split(T, token_parts, item % token_parts)
            t1 = split(T, token_parts, item % token_parts + 1)
            r0 = 0
            while r0 < R and t1 > t0:
                kr = <int>min(tile_k, R - r0)
                kp = (kr + 1) // 2
                a = A.a + (r0 // tile_k) * A.tstride
                lda = a_ld(A, r0 // tile_k)
                gg_bf16_pack_bwd(qtype, block, type_size, w + r0 * wstride, wstride, kr, c0, nc, scratch, bp)
                s = 0
                while s * GG_BF_NR < nc:
                    gg_bf16_panel(kp, a, lda, t0, t1, bp + s * kp * GG_BF_NR, dx + c0 + s * GG_BF_NR, lddx,
                                  <int>min(<Py_ssize_t>GG_BF_NR, nc - s * GG_BF_NR), accumulate or r0 > 0,
                                  L.u, L.ldu, L.v + c0 + s * GG_BF_NR, L.ldv, L.ur if r0 + kr >= R else 0)
                    s = s + 1
                r0 = r0 + kr
    free(bufs)
    return 0


def qmatmul(bint backward, int qtype, int block, int type_size, const uint8_t[:, :] w, a_f32, a_bf16,
            float[:, :] c, bint accumulate, Py_ssize_t tile_rows, Py_ssize_t tile_cols, Py_ssize_t token_parts,
            int nth, int round_nth, u=None, v=None):
    """Forward c = a·Wᵀ or backward c (+)= a·W in bf16 with f32 accumulation. The activations a come
    as f32 (a_f32, rounded here) or already rounded (a_bf16, uint16 bits); the other is None. Inner
    strides of w, a, c are 1 (checked by the caller). The tiles ggtrain.kernels planned: forward,
    tile_rows weight rows an item (a multiple of GG_BF_NR) × tile_cols values of k; backward,
    tile_rows values of k × tile_cols columns an item (a multiple of GG_BF_NR and of block) in
    token_parts token ranges. Values of k per tile: a multiple of GG_BF_KC. round_nth: the threads
    that round f32 activations. u (T, r), v (r, columns of c), f32 with inner strides 1 (checked by
    the caller): c also gets u·v, in f32, in the same pass."""
    check_call(backward, qtype, block, tile_rows, tile_cols)
    cdef Py_ssize_t tile_k = tile_rows if backward else tile_cols
    cdef Py_ssize_t R = w.shape[0], n = w.shape[1] // type_size * block, t, T
    cdef Py_ssize_t K = n if not backward else R
    cdef const float[:, :] af
    cdef const uint16_t[:, :] ab
    if a_f32 is not None:
        af = a_f32
        T = af.shape[0]
    else:
        ab = a_bf16
        T = ab.shape[0]
    cdef Addend L
    addend_of(u, v, &L)
    if empty_call(T, R, n, &L, c, accumulate):
        return
    # the rounded activations in k tiles (ATiles): the caller's array as it is when it rounded them
    # and K is even (tile kb at column kb·tile_k of its rows), else a buffer this call fills once
    cdef ATiles A
    A.n_tiles = (K + tile_k - 1) // tile_k
    cdef Py_ssize_t k_last = K - (A.n_tiles - 1) * tile_k
    A.tstride = T * tile_k
    A.ld = tile_k
    A.ld_last = k_last + (k_last & 1)
    cdef uint16_t *abuf = NULL
    cdef const float *src = NULL
    cdef const uint16_t *srcb = NULL
    cdef Py_ssize_t lds
    if a_f32 is None and not (K & 1):
        A.a = &ab[0, 0]
        A.tstride = tile_k
        A.ld = A.ld_last = ab.strides[0] // 2 if T > 1 else K
    else:
        abuf = <uint16_t *>alloc64(T * ((A.n_tiles - 1) * tile_k + A.ld_last) * 2)
        if abuf == NULL:
            raise MemoryError(f"cannot allocate the bf16 activations ({T}x{K})")
        A.a = abuf
        if a_f32 is not None:
            src = &af[0, 0]
            lds = af.strides[0] // 4
        else:
            srcb = &ab[0, 0]
            lds = ab.strides[0] // 2
        with nogil:
            for t in prange(T, num_threads=round_nth, schedule="static"):
                gg_bf16_tile_row(src + t * lds if src != NULL else NULL, srcb + t * lds if srcb != NULL else NULL,
                                 K, tile_k, T, t, abuf)
    cdef Py_ssize_t ldc = c.strides[0] // 4 if T > 1 else c.shape[1]
    cdef int rc
    with nogil:
        if backward:
            rc = bf_backward(qtype, block, type_size, &w[0, 0], w.strides[0], R, n, &A, T, &c[0, 0], ldc,
                             accumulate, tile_k, tile_cols, token_parts, &L, nth)
        else:
            rc = bf_forward(qtype, block, type_size, &w[0, 0], w.strides[0], R, n, &A, T, &c[0, 0], ldc,
                            tile_rows, tile_k, &L, nth)
    free(abuf)
    if rc != 0:
        raise MemoryError(f"cannot allocate {nth} bf16 weight tiles")


def micro_peak(int nth, Py_ssize_t reps):
    """GFLOPS of the micro-kernel alone on nth threads: each thread multiplies its own in-cache
    A (GG_BF_MR × GG_BF_KC) by one packed panel (GG_BF_KC × GG_BF_NR) `reps` times, no packing, no
    dequantization: the ceiling the full kernels are measured against."""
    cdef Py_ssize_t per_thread = (GG_BF_KC // 2) * GG_BF_NR * 4 + GG_BF_MR * GG_BF_KC * 2 + GG_BF_MR * GG_BF_NR * 4
    cdef uint8_t *bufs = <uint8_t *>alloc64(nth * per_thread)
    if bufs == NULL:
        raise MemoryError("micro_peak buffers")
    cdef Py_ssize_t i, r, tid
    for i in range(nth * per_thread):
        bufs[i] = 0x3c if i % 2 else 0  # bf16 1/64-ish values: no denormals, no overflow over the reps
    cdef double t0, elapsed = 0
    cdef uint32_t *bp
    cdef uint16_t *a
    cdef float *c
    cdef double[::1] seconds = np.zeros(nth)
    with nogil, parallel(num_threads=nth):
        tid = threadid()
        bp = <uint32_t *>(bufs + tid * per_thread)
        a = <uint16_t *>(bp + (GG_BF_KC // 2) * GG_BF_NR)
        c = <float *>(a + GG_BF_MR * GG_BF_KC)
        gg_bf16_micro(GG_BF_KC // 2, a, GG_BF_KC, GG_BF_MR, bp, c, GG_BF_NR, GG_BF_NR, 0, NULL, 0, NULL, 0, 0)
        t0 = openmp.omp_get_wtime()
        for r in range(reps):
            gg_bf16_micro(GG_BF_KC // 2, a, GG_BF_KC, GG_BF_MR, bp, c, GG_BF_NR, GG_BF_NR, 1, NULL, 0, NULL, 0, 0)
        seconds[tid] = openmp.omp_get_wtime() - t0
    free(bufs)
    elapsed = max(seconds)
    return 2.0 * GG_BF_MR * GG_BF_NR * GG_BF_KC * reps * nth / elapsed / 1e9
