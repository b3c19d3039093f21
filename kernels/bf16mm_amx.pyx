# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""bf16 matmul over GGUF weights on AMX-BF16 tiles (tdpbf16ps): the micro-kernel and the padded
layouts are in amx_bf16mm.h, the packing and rounding in bf16mm_util.h (shared with the vdpbf16ps
kernel, bf16mm_avx512bf16.pyx, whose work split this follows).

Built twice from this one text: as bf16mm_amx with the "amx" variant's flags (run only on a CPU
with AMX-BF16 whose kernel granted the tile state: ggtrain.kernels decides), and by setup.py as
bf16mm_amxemu_avx512bf16 with GG_AMX_EMULATE, against amx_emulate.h's C tile instructions (EMULATED
is then True): slow, for the tests on any AVX512-BF16 CPU.

One call: the activations are rounded to bf16 once (a prange over tokens) into k tiles padded for
the tiles (T rounded up to 32 rows, each row to 32 values of k, zeros in the pads); then each work
item is a disjoint block of the output, handed out dynamically, no barriers: a thread packs one
weight tile at a time into its own buffer (each panel's pairs rounded up to 16 with zero pairs) and
runs the micro-kernel over it for every token of the item. Every thread configures its tiles at
the start of the parallel region and releases them at its end.
  forward items:  tile_rows weight rows (panels of GG_BF_NR), walked tile_cols columns at a time
  backward items: (tile_cols output columns, one of token_parts token ranges of whole 32-token
                  blocks), walked down W tile_rows rows at a time
"""

import numpy as np

from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free
from libc.string cimport memmove, memset

cimport openmp

cdef extern from "bf16mm_util.h" nogil:
    enum:
        GG_BF_NR, GG_BF_KC
    int gg_bf_dequant(int qtype, const uint8_t *b, float *y, int64_t nb)
    int gg_bf16_pack_fwd(int qtype, int block, int type_size, const uint8_t *w, int64_t wstride, int nr,
                         int64_t k0, int kc, float *scratch, uint32_t *bp)
    int gg_bf16_pack_bwd(int qtype, int block, int type_size, const uint8_t *w, int64_t wstride, int kr,
                         int64_t c0, int nc, float *scratch, uint32_t *bp)

cdef extern from "amx_bf16mm.h" nogil:
    enum:
        GG_AMX_TM, GG_AMX_TN, GG_AMX_KP, GG_AMX_KB, GG_AMX_EMULATED
    int gg_amx_request_tiles()
    int64_t gg_amx_lda(int64_t kc)
    void gg_amx_configure()
    void gg_amx_release()
    void gg_amx_tile_row(const float *x, const uint16_t *xb, int64_t K, int64_t tk, int64_t Tp, int64_t t,
                         uint16_t *dst)
    void gg_amx_micro(int64_t kp, const uint16_t *a, int64_t lda, int mr, const uint32_t *bp, float *c,
                      int64_t ldc, int nc, int accumulate, float *cst, const float *u, int64_t ldu,
                      const float *v, int64_t ldv, int ur)
    void gg_amx_tile_dot(int M, int N, int K, float *c, const uint16_t *a, const uint16_t *b, int configure)
    void gg_amx_panel(int64_t kp, const uint16_t *a, int64_t lda, int64_t t0, int64_t t1, const uint32_t *bp,
                      float *c, int64_t ldc, int nc, int accumulate, float *cst, const float *u, int64_t ldu,
                      const float *v, int64_t ldv, int ur)

include "bf16mm_args.pxi"

MICRO_ROWS = GG_AMX_TM  # tokens per micro-kernel
MICRO_COLS = GG_BF_NR   # output columns per packed panel (and forward tile rows): the vdpbf16ps layout
TILE_K = GG_BF_KC       # k per packed tile: a multiple of this
EMULATED = bool(GG_AMX_EMULATED)  # the tile instructions are amx_emulate.h's C, not the CPU's
TAKES_ADDEND = True     # qmatmul's u, v: the micro-kernel adds a low-rank f32 product as it stores


def request_tile_state():
    """Asks Linux for the AMX tile data state for this process (arch_prctl ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA): 0 when granted, else the errno of the refusal. Needed once per process
    before the first tile instruction (ggtrain.kernels asks, once); executes none itself."""
    return gg_amx_request_tiles()


def tile_dot(float[:, ::1] c, const uint16_t[:, ::1] a, const uint16_t[:, ::1] b, bint configure=True):
    """One tdpbf16ps: c (M, N) += a (M, 2K bf16 bits: K pairs a row) · b (K, 2N: row k holds pair k of
    each column n at 2n, 2n + 1); M, K, N <= 16. configure=False skips ldtilecfg: the instruction
    then faults (SIGILL), on the CPU and in the emulation alike. The instruction alone, for tests;
    the real module's needs the tile state first (kernels.amx_available() asks for it)."""
    cdef int M = c.shape[0], N = c.shape[1], K = a.shape[1] // 2
    if not (0 < M <= 16 and 0 < N <= 16 and 0 < K <= 16 and a.shape[0] == M and a.shape[1] == 2 * K
            and b.shape[0] == K and b.shape[1] == 2 * N):
        raise ValueError(f"tile_dot: shapes c ({c.shape[0]}, {c.shape[1]}), a ({a.shape[0]}, {a.shape[1]}), "
                         f"b ({b.shape[0]}, {b.shape[1]}) do not fit one tile")
    with nogil:
        gg_amx_tile_dot(M, N, K, &c[0, 0], &a[0, 0], &b[0, 0], configure)


cdef inline Py_ssize_t pad_pairs(Py_ssize_t kp) noexcept nogil:
    return (kp + GG_AMX_KP - 1) // GG_AMX_KP * GG_AMX_KP


cdef inline Py_ssize_t split(Py_ssize_t n, Py_ssize_t parts, Py_ssize_t p) noexcept nogil:
    """Start of part p of [0, n) cut into `parts` near-equal pieces, on micro-kernel boundaries."""
    return min(n, (n // GG_AMX_TM * p // parts) * GG_AMX_TM) if p < parts else n


cdef int amx_forward(int qtype, int block, int type_size, const uint8_t *w, Py_ssize_t wstride,
                     Py_ssize_t R, Py_ssize_t K, const ATiles *A, Py_ssize_t T,
                     float *y, Py_ssize_t ldy, Py_ssize_t tile_rows, Py_ssize_t tile_k, const Addend *L,
                     int nth) noexcept nogil:
    """y (T, R) = a (T, K) · Wᵀ. An item is tile_rows (a multiple of GG_BF_NR) weight rows: per tile
    of tile_k values of k its panels are packed (kp16 pairs each, zeros after kp), then each panel
    meets every token. Returns -1 if out of memory."""
    cdef Py_ssize_t n_panels = tile_rows // GG_BF_NR
    cdef Py_ssize_t bp_bytes = (tile_k // 2) * tile_rows * 4
    cdef Py_ssize_t per_thread = bp_bytes + 16 * GG_BF_KC * 4 + GG_AMX_TM * GG_AMX_TN * 4  # bp, scratch, cst
    cdef uint8_t *bufs = <uint8_t *>alloc64(nth * per_thread)
    if bufs == NULL:
        return -1
    cdef Py_ssize_t n_items = (R + tile_rows - 1) // tile_rows, item, r0, k0, s, kp, kp16, lda
    cdef int nr, kc
    cdef const uint16_t *a
    cdef uint32_t *bp
    cdef float *scratch
    cdef float *cst
    with parallel(num_threads=nth):
        bp = <uint32_t *>(bufs + threadid() * per_thread)
        scratch = <float *>(<uint8_t *>bp + bp_bytes)
        cst = scratch + 16 * GG_BF_KC
        gg_amx_configure()
        for item in prange(n_items, schedule="dynamic", chunksize=1):
            k0 = 0
            while k0 < K:
                kc = <int>min(tile_k, K - k0)
                kp = (kc + 1) // 2
                kp16 = pad_pairs(kp)
                a = A.a + (k0 // tile_k) * A.tstride  # (assigned here, so private to the thread)
                lda = a_ld(A, k0 // tile_k)
                s = 0
                while s < n_panels and item * tile_rows + s * GG_BF_NR < R:
                    r0 = item * tile_rows + s * GG_BF_NR
                    nr = <int>min(<Py_ssize_t>GG_BF_NR, R - r0)
                    gg_bf16_pack_fwd(qtype, block, type_size, w + r0 * wstride, wstride, nr, k0, kc, scratch,
                                     bp + s * kp16 * GG_BF_NR)
                    memset(bp + (s * kp16 + kp) * GG_BF_NR, 0, (kp16 - kp) * GG_BF_NR * 4)
                    s = s + 1
                s = 0
                while s < n_panels and item * tile_rows + s * GG_BF_NR < R:
                    r0 = item * tile_rows + s * GG_BF_NR
                    nr = <int>min(<Py_ssize_t>GG_BF_NR, R - r0)
                    gg_amx_panel(kp16, a, lda, 0, T, bp + s * kp16 * GG_BF_NR, y + r0, ldy, nr, k0 > 0, cst,
                                 L.u, L.ldu, L.v + r0, L.ldv, L.ur if k0 + kc >= K else 0)
                    s = s + 1
                k0 = k0 + kc
        gg_amx_release()
    free(bufs)
    return 0


cdef int amx_backward(int qtype, int block, int type_size, const uint8_t *w, Py_ssize_t wstride,
                      Py_ssize_t R, Py_ssize_t n, const ATiles *A, Py_ssize_t T,
                      float *dx, Py_ssize_t lddx, bint accumulate, Py_ssize_t tile_k, Py_ssize_t tile_cols,
                      Py_ssize_t token_parts, const Addend *L, int nth) noexcept nogil:
    """dx (T, n) (+)= a (T, R) · W. The packer lays a tile's panels kp pairs apart; a tile whose kp
    is not a multiple of 16 (the last one of an R that is not a multiple of 32) has its panels moved
    kp16 apart, zero pairs between. Returns -1 if out of memory."""
    cdef Py_ssize_t n_panels = (tile_cols + GG_BF_NR - 1) // GG_BF_NR
    cdef Py_ssize_t bp_bytes = (tile_k // 2) * n_panels * GG_BF_NR * 4
    cdef Py_ssize_t scratch_bytes = (2 * (tile_cols + GG_BF_NR) * 4 + 63) // 64 * 64
    cdef Py_ssize_t per_thread = bp_bytes + scratch_bytes + GG_AMX_TM * GG_AMX_TN * 4  # bp, scratch, cst
    cdef uint8_t *bufs = <uint8_t *>alloc64(nth * per_thread)
    if bufs == NULL:
        return -1
    cdef Py_ssize_t n_col = (n + tile_cols - 1) // tile_cols, item, r0, c0, t0, t1, s, kp, kp16, lda
    cdef int nc, kr
    cdef const uint16_t *a
    cdef uint32_t *bp
    cdef float *scratch
    cdef float *cst
    with parallel(num_threads=nth):
        bp = <uint32_t *>(bufs + threadid() * per_thread)
        scratch = <float *>(<uint8_t *>bp + bp_bytes)
        cst = <float *>(<uint8_t *>scratch + scratch_bytes)
        gg_amx_configure()
        for item in prange(n_col * token_parts, schedule="dynamic", chunksize=1):
            c0 = (item // token_parts) * tile_cols
            nc = <int>min(tile_cols, n - c0)
            t0 = split(T, token_parts, item % token_parts)
            t1 = split(T, token_parts, item % token_parts + 1)
            r0 = 0
            while r0 < R and t1 > t0:
                kr = <int>min(tile_k, R - r0)
                kp = (kr + 1) // 2
                kp16 = pad_pairs(kp)
                a = A.a + (r0 // tile_k) * A.tstride
                lda = a_ld(A, r0 // tile_k)
                gg_bf16_pack_bwd(qtype, block, type_size, w + r0 * wstride, wstride, kr, c0, nc, scratch, bp)
                if kp16 != kp:
                    s = (nc + GG_BF_NR - 1) // GG_BF_NR - 1
                    while s >= 0:  # last panel first: each moves up, over space no panel below needs
                        memmove(bp + s * kp16 * GG_BF_NR, bp + s * kp * GG_BF_NR, kp * GG_BF_NR * 4)
                        memset(bp + (s * kp16 + kp) * GG_BF_NR, 0, (kp16 - kp) * GG_BF_NR * 4)
                        s = s - 1
                s = 0
                while s * GG_BF_NR < nc:
                    gg_amx_panel(kp16, a, lda, t0, t1, bp + s * kp16 * GG_BF_NR, dx + c0 + s * GG_BF_NR, lddx,
                                 <int>min(<Py_ssize_t>GG_BF_NR, nc - s * GG_BF_NR), accumulate or r0 > 0, cst,
                                 L.u, L.ldu, L.v + c0 + s * GG_BF_NR, L.ldv, L.ur if r0 + kr >= R else 0)
                    s = s + 1
                r0 = r0 + kr
        gg_amx_release()
    free(bufs)
    return 0


def qmatmul(bint backward, int qtype, int block, int type_size, const uint8_t[:, :] w, a_f32, a_bf16,
            float[:, :] c, bint accumulate, Py_ssize_t tile_rows, Py_ssize_t tile_cols, Py_ssize_t token_parts,
            int nth, int round_nth, u=None, v=None):
    """Forward c = a·Wᵀ or backward c (+)= a·W in bf16 with f32 accumulation, on AMX tiles: the
    same arguments and tiles as bf16mm_avx512bf16.qmatmul (the plan of ggtrain.kernels), the
    addend u (T, r) · v (r, columns of c) too (f32, added as each micro-kernel stores). The
    activations are always copied into the padded tiles (bf16 input too: the tiles read 32 rows
    and 32 values of k at a time, past the caller's array at a tail)."""
    check_call(backward, qtype, block, tile_rows, tile_cols)
    cdef Py_ssize_t tile_k = tile_rows if backward else tile_cols
    cdef Py_ssize_t R = w.shape[0], n = w.shape[1] // type_size * block, t, T, kb
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
    cdef ATiles A
    cdef Py_ssize_t Tp = (T + GG_AMX_TM - 1) // GG_AMX_TM * GG_AMX_TM
    A.n_tiles = (K + tile_k - 1) // tile_k
    cdef Py_ssize_t k_last = K - (A.n_tiles - 1) * tile_k
    A.ld = gg_amx_lda(tile_k)
    A.ld_last = gg_amx_lda(k_last)
    A.tstride = Tp * A.ld
    cdef uint16_t *abuf = <uint16_t *>alloc64(Tp * ((A.n_tiles - 1) * A.ld + A.ld_last) * 2)
    if abuf == NULL:
        raise MemoryError(f"cannot allocate the bf16 activations ({T}x{K})")
    A.a = abuf
    cdef const float *src = NULL
    cdef const uint16_t *srcb = NULL
    cdef Py_ssize_t lds
    if a_f32 is not None:
        src = &af[0, 0]
        lds = af.strides[0] // 4
    else:
        srcb = &ab[0, 0]
        lds = ab.strides[0] // 2
    with nogil:
        for t in prange(T, num_threads=round_nth, schedule="static"):
            gg_amx_tile_row(src + t * lds if src != NULL else NULL, srcb + t * lds if srcb != NULL else NULL,
                            K, tile_k, Tp, t, abuf)
        for kb in range(A.n_tiles):  # the rows past T: zeros
            memset(abuf + kb * A.tstride + T * a_ld(&A, kb), 0, (Tp - T) * a_ld(&A, kb) * 2)
    cdef Py_ssize_t ldc = c.strides[0] // 4 if T > 1 else c.shape[1]
    cdef int rc
    with nogil:
        if backward:
            rc = amx_backward(qtype, block, type_size, &w[0, 0], w.strides[0], R, n, &A, T, &c[0, 0], ldc,
                              accumulate, tile_k, tile_cols, token_parts, &L, nth)
        else:
            rc = amx_forward(qtype, block, type_size, &w[0, 0], w.strides[0], R, n, &A, T, &c[0, 0], ldc,
                             tile_rows, tile_k, &L, nth)
    free(abuf)
    if rc != 0:
        raise MemoryError(f"cannot allocate {nth} bf16 weight tiles")


def micro_peak(int nth, Py_ssize_t reps):
    """GFLOPS of the micro-kernel alone on nth threads: each thread multiplies its own in-cache A
    (GG_AMX_TM × GG_BF_KC) by a packed panel's GG_AMX_TN columns (GG_BF_KC × GG_AMX_TN) `reps`
    times, no packing, no dequantization: the ceiling the full kernels are measured against."""
    cdef Py_ssize_t per_thread = ((GG_BF_KC // 2) * GG_BF_NR * 4 + GG_AMX_TM * GG_BF_KC * 2
                                  + 2 * GG_AMX_TM * GG_AMX_TN * 4)
    cdef uint8_t *bufs = <uint8_t *>alloc64(nth * per_thread)
    if bufs == NULL:
        raise MemoryError("micro_peak buffers")
    cdef Py_ssize_t i, r, tid
    for i in range(nth * per_thread):
        bufs[i] = 0x3c if i % 2 else 0  # bf16 1/64-ish values: no denormals, no overflow over the reps
    cdef double t0
    cdef uint32_t *bp
    cdef uint16_t *a
    cdef float *c
    cdef double[::1] seconds = np.zeros(nth)
    with nogil, parallel(num_threads=nth):
        tid = threadid()
        bp = <uint32_t *>(bufs + tid * per_thread)
        a = <uint16_t *>(bp + (GG_BF_KC // 2) * GG_BF_NR)
        c = <float *>(a + GG_AMX_TM * GG_BF_KC)
        gg_amx_configure()
        gg_amx_micro(GG_BF_KC // 2, a, GG_BF_KC, GG_AMX_TM, bp, c, GG_AMX_TN, GG_AMX_TN, 0,
                     c + GG_AMX_TM * GG_AMX_TN, NULL, 0, NULL, 0, 0)  # warm up
        t0 = openmp.omp_get_wtime()
        for r in range(reps):
            gg_amx_micro(GG_BF_KC // 2, a, GG_BF_KC, GG_AMX_TM, bp, c, GG_AMX_TN, GG_AMX_TN, 1,
                         c + GG_AMX_TM * GG_AMX_TN, NULL, 0, NULL, 0, 0)
        seconds[tid] = openmp.omp_get_wtime() - t0
        gg_amx_release()
    free(bufs)
    return 2.0 * GG_AMX_TM * GG_AMX_TN * GG_BF_KC * reps * nth / max(seconds) / 1e9
