# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Dequantization and quantized matmul over raw GGUF blocks (built as quant_base and quant_avx2).

One small function per quant type, each the C twin of its gguf-py class (gguf/quants.py): same
bit layout and the same float operations in the same order, so the results are bit-identical
(setup.py compiles with -ffp-contract=off: no fused multiply-add unless we write one). In the
avx2 build each first hands its blocks to an AVX2 twin in quant_util.h (same operations, 4-6x
faster than what the compiler makes of these loops); the base build runs the loops here.

qmatmul: W is never expanded. Each thread owns one f32 tile buffer (its size is planned by
ggtrain.kernels, bounded whatever W's size); it takes work items from a dynamic queue, dequantizes
the item's part of W into its buffer and runs a single-threaded sgemm on it. Every item writes a
disjoint block of the output: no locks, no races, no barriers.
"""

from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport sgemm, sgemv

cimport openmp

cdef extern from "quant_layout.h" nogil:
    # ggml type ids, block sizes and field offsets, the IQ4_NL levels, the loads (all defined there)
    enum:
        GG_TYPE_F32, GG_TYPE_F16, GG_TYPE_BF16, GG_TYPE_Q4_0, GG_TYPE_Q4_1, GG_TYPE_Q5_0, GG_TYPE_Q5_1
        GG_TYPE_Q8_0, GG_TYPE_Q2_K, GG_TYPE_Q3_K, GG_TYPE_Q4_K, GG_TYPE_Q5_K, GG_TYPE_Q6_K
        GG_TYPE_IQ4_NL, GG_TYPE_IQ4_XS
        GG_QK, GG_QK_K
        GG_Q4_0_D, GG_Q4_0_QS, GG_Q4_0_BYTES
        GG_Q4_1_D, GG_Q4_1_M, GG_Q4_1_QS, GG_Q4_1_BYTES
        GG_Q5_0_D, GG_Q5_0_QH, GG_Q5_0_QS, GG_Q5_0_BYTES
        GG_Q5_1_D, GG_Q5_1_M, GG_Q5_1_QH, GG_Q5_1_QS, GG_Q5_1_BYTES
        GG_Q8_0_D, GG_Q8_0_QS, GG_Q8_0_BYTES
        GG_Q2_K_SCALES, GG_Q2_K_QS, GG_Q2_K_D, GG_Q2_K_DMIN, GG_Q2_K_BYTES
        GG_Q3_K_HMASK, GG_Q3_K_QS, GG_Q3_K_SCALES, GG_Q3_K_D, GG_Q3_K_BYTES
        GG_Q4_K_D, GG_Q4_K_DMIN, GG_Q4_K_SCALES, GG_Q4_K_QS, GG_Q4_K_BYTES
        GG_Q5_K_D, GG_Q5_K_DMIN, GG_Q5_K_SCALES, GG_Q5_K_QH, GG_Q5_K_QS, GG_Q5_K_BYTES
        GG_Q6_K_QL, GG_Q6_K_QH, GG_Q6_K_SCALES, GG_Q6_K_D, GG_Q6_K_BYTES
        GG_IQ4_NL_D, GG_IQ4_NL_QS, GG_IQ4_NL_BYTES
        GG_IQ4_XS_D, GG_IQ4_XS_SCALES_H, GG_IQ4_XS_SCALES_L, GG_IQ4_XS_QS, GG_IQ4_XS_BYTES
        GG_N_TYPES
    const int8_t GG_KVALUES_IQ4NL[16]
    const int32_t GG_TYPE_TABLE[][3]

    uint16_t gg_load_u16(const uint8_t *p)
    uint32_t gg_load_u32(const uint8_t *p)
    float gg_load_f16(const uint8_t *p)
    void gg_f16_row(const uint8_t *src, float *dst, int64_t n)
    void gg_k_scale_min(const uint8_t *s, int j, int *sc, int *mn)
    int gg_q3_k_scale(const uint8_t *s, int i)
    int gg_iq4_xs_scale(const uint8_t *b, uint16_t sh, int ib)

cdef extern from "quant_util.h" nogil:
    # AVX2 twins of the dq_* loops below (return 0 in the base build)
    int gg_dq_q4_0_simd(const uint8_t *b, float *y, int64_t nb)
    int gg_dq_q4_1_simd(const uint8_t *b, float *y, int64_t nb)
    int gg_dq_q5_0_simd(const uint8_t *b, float *y, int64_t nb)
    int gg_dq_q5_1_simd(const uint8_t *b, float *y, int64_t nb)
    int gg_dq_q8_0_simd(const uint8_t *b, float *y, int64_t nb)
    int gg_dq_q2_k_simd(const uint8_t *b, float *y, int64_t nb)
    int gg_dq_q3_k_simd(const uint8_t *b, float *y, int64_t nb)
    int gg_dq_q4_k_simd(const uint8_t *b, float *y, int64_t nb)
    int gg_dq_q5_k_simd(const uint8_t *b, float *y, int64_t nb)
    int gg_dq_q6_k_simd(const uint8_t *b, float *y, int64_t nb)
    int gg_dq_iq4_nl_simd(const uint8_t *b, float *y, int64_t nb)
    int gg_dq_iq4_xs_simd(const uint8_t *b, float *y, int64_t nb)

cdef extern from *:
    # float * restrict: the quant bytes (uint8, which may alias anything) never overlap the output,
    # and telling the compiler so is what lets it vectorize the per-block loops.
    ctypedef float *float_out "float *__restrict__"

# The IQ4_NL levels as floats, for the scalar loops' lookups
cdef float KVALUES_IQ4NL[16]
for _i in range(16):
    KVALUES_IQ4NL[_i] = GG_KVALUES_IQ4NL[_i]


def type_table():
    """{ggml type id: (elements per block, bytes per block)} of every type quant_layout.h lays out."""
    return {GG_TYPE_TABLE[i][0]: (GG_TYPE_TABLE[i][1], GG_TYPE_TABLE[i][2]) for i in range(GG_N_TYPES)}


cdef int _num_threads = openmp.omp_get_max_threads()


def set_num_threads(int n):
    """The kernels' thread count (ggtrain.kernels hands it to every parallel loop), also given to
    omp_set_num_threads for OpenMP code that does not name its own."""
    global _num_threads
    _num_threads = max(1, n)
    openmp.omp_set_num_threads(_num_threads)


def get_num_threads():
    return _num_threads


# ---- one function per type: nb consecutive blocks at b -> nb * block_size floats at y --------------

cdef inline void dq_bf16(const uint8_t *b, float_out y, Py_ssize_t n) noexcept nogil:
    # bf16 is the top half of an f32: shift the bits up
    cdef Py_ssize_t i
    cdef uint32_t bits
    for i in range(n):
        bits = (<uint32_t>gg_load_u16(b + 2 * i)) << 16
        memcpy(&y[i], &bits, 4)


cdef inline void dq_q4_0(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # x = d * (q - 8), q the nibbles in the Q4_0 order (block layouts: quant_layout.h)
    cdef Py_ssize_t i
    cdef int j
    cdef float d
    cdef const uint8_t *qs
    if gg_dq_q4_0_simd(b, y, nb):
        return
    for i in range(nb):
        d = gg_load_f16(b + GG_Q4_0_D)
        qs = b + GG_Q4_0_QS
        for j in range(16):
            y[j] = d * <float>(<int>(qs[j] & 0x0F) - 8)
        for j in range(16):
            y[j + 16] = d * <float>(<int>(qs[j] >> 4) - 8)
        b += GG_Q4_0_BYTES
        y += GG_QK


cdef inline void dq_q4_1(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # x = d * q + m
    cdef Py_ssize_t i
    cdef int j
    cdef float d, m
    cdef const uint8_t *qs
    if gg_dq_q4_1_simd(b, y, nb):
        return
    for i in range(nb):
        d = gg_load_f16(b + GG_Q4_1_D)
        m = gg_load_f16(b + GG_Q4_1_M)
        qs = b + GG_Q4_1_QS
        for j in range(16):
            y[j] = d * <float>(qs[j] & 0x0F) + m
        for j in range(16):
            y[j + 16] = d * <float>(qs[j] >> 4) + m
        b += GG_Q4_1_BYTES
        y += GG_QK


cdef inline void dq_q5_0(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # x = d * (q - 16), bit j of qh the 5th bit of element j
    cdef Py_ssize_t i
    cdef int j
    cdef float d
    cdef uint32_t qh
    cdef const uint8_t *qs
    if gg_dq_q5_0_simd(b, y, nb):
        return
    for i in range(nb):
        d = gg_load_f16(b + GG_Q5_0_D)
        qh = gg_load_u32(b + GG_Q5_0_QH)
        qs = b + GG_Q5_0_QS
        for j in range(16):
            y[j] = d * <float>(<int>((qs[j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16)
            y[j + 16] = d * <float>(<int>((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16)
        b += GG_Q5_0_BYTES
        y += GG_QK


cdef inline void dq_q5_1(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # x = d * q + m, q with its 5th bit from qh
    cdef Py_ssize_t i
    cdef int j
    cdef float d, m
    cdef uint32_t qh
    cdef const uint8_t *qs
    if gg_dq_q5_1_simd(b, y, nb):
        return
    for i in range(nb):
        d = gg_load_f16(b + GG_Q5_1_D)
        m = gg_load_f16(b + GG_Q5_1_M)
        qh = gg_load_u32(b + GG_Q5_1_QH)
        qs = b + GG_Q5_1_QS
        for j in range(16):
            y[j] = d * <float>((qs[j] & 0x0F) | (((qh >> j) & 1) << 4)) + m
            y[j + 16] = d * <float>((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m
        b += GG_Q5_1_BYTES
        y += GG_QK


cdef inline void dq_q8_0(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # x = q * d
    cdef Py_ssize_t i
    cdef int j
    cdef float d
    cdef const int8_t *qs
    if gg_dq_q8_0_simd(b, y, nb):
        return
    for i in range(nb):
        d = gg_load_f16(b + GG_Q8_0_D)
        qs = <const int8_t *>(b + GG_Q8_0_QS)
        for j in range(32):
            y[j] = <float>qs[j] * d
        b += GG_Q8_0_BYTES
        y += GG_QK


cdef inline void dq_q2_k(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # element e = h*128 + s*32 + l: (qs[h*32 + l] >> 2s) & 3, sub-block e // 16; x = dl * q - ml
    cdef Py_ssize_t i
    cdef int h, s, l, sub
    cdef float d, dmin, dl, ml
    cdef const uint8_t *sc
    cdef const uint8_t *qs
    if gg_dq_q2_k_simd(b, y, nb):
        return
    for i in range(nb):
        sc = b + GG_Q2_K_SCALES
        qs = b + GG_Q2_K_QS
        d = gg_load_f16(b + GG_Q2_K_D)
        dmin = gg_load_f16(b + GG_Q2_K_DMIN)
        for h in range(2):
            for s in range(4):
                for sub in range(2):
                    dl = d * <float>(sc[h * 8 + s * 2 + sub] & 0x0F)
                    ml = dmin * <float>(sc[h * 8 + s * 2 + sub] >> 4)
                    for l in range(16):
                        y[h * 128 + s * 32 + sub * 16 + l] = (
                            dl * <float>((qs[h * 32 + sub * 16 + l] >> (2 * s)) & 3) - ml)
        b += GG_Q2_K_BYTES
        y += GG_QK_K


cdef inline void dq_q3_k(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # q = low2 - 4 * (hmask bit clear); x = d * scale * q
    cdef Py_ssize_t i
    cdef int h, s, l, sub
    cdef float d, dl
    cdef const uint8_t *hm
    cdef const uint8_t *qs
    cdef const uint8_t *scales
    if gg_dq_q3_k_simd(b, y, nb):
        return
    for i in range(nb):
        hm = b + GG_Q3_K_HMASK
        qs = b + GG_Q3_K_QS
        scales = b + GG_Q3_K_SCALES
        d = gg_load_f16(b + GG_Q3_K_D)
        for h in range(2):
            for s in range(4):
                for sub in range(2):
                    dl = d * <float>gg_q3_k_scale(scales, h * 8 + s * 2 + sub)
                    for l in range(16):
                        y[h * 128 + s * 32 + sub * 16 + l] = dl * <float>(
                            <int>((qs[h * 32 + sub * 16 + l] >> (2 * s)) & 3)
                            - ((((hm[sub * 16 + l] >> (h * 4 + s)) & 1) ^ 1) << 2))
        b += GG_Q3_K_BYTES
        y += GG_QK_K


cdef inline void dq_q4_k(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # sub-block j (32 elements) = nibble j % 2 of qs[(j // 2) * 32 + l]; x = (d * sc) * q - (dmin * m)
    cdef Py_ssize_t i
    cdef int j, l, sc, mn
    cdef float d, dmin, dd, dm
    cdef const uint8_t *qs
    if gg_dq_q4_k_simd(b, y, nb):
        return
    for i in range(nb):
        d = gg_load_f16(b + GG_Q4_K_D)
        dmin = gg_load_f16(b + GG_Q4_K_DMIN)
        qs = b + GG_Q4_K_QS
        for j in range(8):
            gg_k_scale_min(b + GG_Q4_K_SCALES, j, &sc, &mn)
            dd = d * <float>sc
            dm = dmin * <float>mn
            for l in range(32):
                y[j * 32 + l] = dd * <float>((qs[(j // 2) * 32 + l] >> (4 * (j % 2))) & 0x0F) - dm
        b += GG_Q4_K_BYTES
        y += GG_QK_K


cdef inline void dq_q5_k(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # as Q4_K, with bit j of qh[l] the 5th bit of sub-block j
    cdef Py_ssize_t i
    cdef int j, l, sc, mn
    cdef float d, dmin, dd, dm
    cdef const uint8_t *qh
    cdef const uint8_t *qs
    if gg_dq_q5_k_simd(b, y, nb):
        return
    for i in range(nb):
        d = gg_load_f16(b + GG_Q5_K_D)
        dmin = gg_load_f16(b + GG_Q5_K_DMIN)
        qh = b + GG_Q5_K_QH
        qs = b + GG_Q5_K_QS
        for j in range(8):
            gg_k_scale_min(b + GG_Q5_K_SCALES, j, &sc, &mn)
            dd = d * <float>sc
            dm = dmin * <float>mn
            for l in range(32):
                y[j * 32 + l] = dd * <float>(((qs[(j // 2) * 32 + l] >> (4 * (j % 2))) & 0x0F)
                                             | (((qh[l] >> j) & 1) << 4)) - dm
        b += GG_Q5_K_BYTES
        y += GG_QK_K


cdef inline void dq_q6_k(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # element e = h*128 + s*32 + l: low = (ql[h*64 + (s%2)*32 + l] >> 4*(s//2)) & 15,
    # high = (qh[h*32 + l] >> 2s) & 3; x = (d * scale[e // 16]) * (q - 32)
    cdef Py_ssize_t i
    cdef int h, s, l, sub
    cdef float d, dl
    cdef const uint8_t *ql
    cdef const uint8_t *qh
    cdef const int8_t *scales
    if gg_dq_q6_k_simd(b, y, nb):
        return
    for i in range(nb):
        ql = b + GG_Q6_K_QL
        qh = b + GG_Q6_K_QH
        scales = <const int8_t *>(b + GG_Q6_K_SCALES)
        d = gg_load_f16(b + GG_Q6_K_D)
        for h in range(2):
            for s in range(4):
                for sub in range(2):
                    dl = d * <float>scales[h * 8 + s * 2 + sub]
                    for l in range(16):
                        y[h * 128 + s * 32 + sub * 16 + l] = dl * <float>(<int8_t>(
                            ((ql[h * 64 + (s % 2) * 32 + sub * 16 + l] >> (4 * (s // 2))) & 0x0F)
                            | (((qh[h * 32 + sub * 16 + l] >> (2 * s)) & 3) << 4)) - 32)
        b += GG_Q6_K_BYTES
        y += GG_QK_K


cdef inline void dq_iq4_nl(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # x = d * kvalue, the nibbles (Q4_0 order) indexing the IQ4_NL levels
    cdef Py_ssize_t i
    cdef int j
    cdef float d
    cdef const uint8_t *qs
    if gg_dq_iq4_nl_simd(b, y, nb):
        return
    for i in range(nb):
        d = gg_load_f16(b + GG_IQ4_NL_D)
        qs = b + GG_IQ4_NL_QS
        for j in range(16):
            y[j] = d * KVALUES_IQ4NL[qs[j] & 0x0F]
            y[j + 16] = d * KVALUES_IQ4NL[qs[j] >> 4]
        b += GG_IQ4_NL_BYTES
        y += GG_QK


cdef inline void dq_iq4_xs(const uint8_t *b, float_out y, Py_ssize_t nb) noexcept nogil:
    # sub-block ib (32 elements): scale = (l | h << 4) - 32; nibbles of qs[ib*16 + j] as in IQ4_NL
    cdef Py_ssize_t i
    cdef int ib, j
    cdef float d, dl
    cdef uint16_t sh
    cdef const uint8_t *qs
    if gg_dq_iq4_xs_simd(b, y, nb):
        return
    for i in range(nb):
        d = gg_load_f16(b + GG_IQ4_XS_D)
        sh = gg_load_u16(b + GG_IQ4_XS_SCALES_H)
        qs = b + GG_IQ4_XS_QS
        for ib in range(8):
            dl = d * <float>gg_iq4_xs_scale(b, sh, ib)
            for j in range(16):
                y[ib * 32 + j] = dl * KVALUES_IQ4NL[qs[ib * 16 + j] & 0x0F]
                y[ib * 32 + j + 16] = dl * KVALUES_IQ4NL[qs[ib * 16 + j] >> 4]
        b += GG_IQ4_XS_BYTES
        y += GG_QK_K


cdef int dequant_blocks(int qtype, const uint8_t *b, float *y, Py_ssize_t nb) noexcept nogil:
    """nb blocks of qtype at b -> floats at y (for F32/F16/BF16 a block is one element). -1: unknown type."""
    if qtype == GG_TYPE_F32:
        memcpy(y, b, nb * 4)
    elif qtype == GG_TYPE_F16:
        gg_f16_row(b, y, nb)
    elif qtype == GG_TYPE_BF16:
        dq_bf16(b, y, nb)
    elif qtype == GG_TYPE_Q4_0:
        dq_q4_0(b, y, nb)
    elif qtype == GG_TYPE_Q4_1:
        dq_q4_1(b, y, nb)
    elif qtype == GG_TYPE_Q5_0:
        dq_q5_0(b, y, nb)
    elif qtype == GG_TYPE_Q5_1:
        dq_q5_1(b, y, nb)
    elif qtype == GG_TYPE_Q8_0:
        dq_q8_0(b, y, nb)
    elif qtype == GG_TYPE_Q2_K:
        dq_q2_k(b, y, nb)
    elif qtype == GG_TYPE_Q3_K:
        dq_q3_k(b, y, nb)
    elif qtype == GG_TYPE_Q4_K:
        dq_q4_k(b, y, nb)
    elif qtype == GG_TYPE_Q5_K:
        dq_q5_k(b, y, nb)
    elif qtype == GG_TYPE_Q6_K:
        dq_q6_k(b, y, nb)
    elif qtype == GG_TYPE_IQ4_NL:
        dq_iq4_nl(b, y, nb)
    elif qtype == GG_TYPE_IQ4_XS:
        dq_iq4_xs(b, y, nb)
    else:
        return -1
    return 0


# ---- Python entry points (argument checks live in ggtrain.kernels) ----------------------------------

def dequantize_rows(const uint8_t[:, :] data, int qtype, int block, int type_size, float[:, ::1] out,
                    int nth):
    """data uint8 (rows, row_bytes), inner stride 1 -> out f32 (rows, n): rows on nth threads."""
    cdef Py_ssize_t rows = data.shape[0], nb = data.shape[1] // type_size, r
    if rows == 0 or nb == 0:
        return
    cdef const uint8_t *src = &data[0, 0]
    cdef Py_ssize_t stride = data.strides[0], n = out.shape[1]
    cdef float *dst = &out[0, 0]
    if rows == 1 and nb > 1:
        # one long row (a 1-D tensor): split it into block ranges instead
        with nogil:
            for r in prange(nth, num_threads=nth, schedule="static"):
                dequant_blocks(qtype, src + (r * nb // nth) * type_size, dst + (r * nb // nth) * block,
                               (r + 1) * nb // nth - r * nb // nth)
        return
    with nogil:
        for r in prange(rows, num_threads=nth, schedule="static"):
            dequant_blocks(qtype, src + r * stride, dst + r * n, nb)


def get_rows(const uint8_t[:, :] w, int qtype, int block, int type_size, const int64_t[::1] ids,
             float[:, ::1] out, int nth):
    """out[i] = dequantized row ids[i] of w (ids already range-checked), on nth threads."""
    cdef Py_ssize_t k = ids.shape[0], nb = w.shape[1] // type_size, i
    if k == 0 or nb == 0:
        return
    cdef const uint8_t *src = &w[0, 0]
    cdef Py_ssize_t stride = w.strides[0], n = out.shape[1]
    cdef float *dst = &out[0, 0]
    with nogil:
        for i in prange(k, num_threads=nth, schedule="static"):
            dequant_blocks(qtype, src + ids[i] * stride, dst + i * n, nb)


# Up to this many tokens, one sgemv per token beats sgemm, which copies (packs) the whole tile
# before using it (measured on a 2048x1024 weight, one thread: 1 token 4x, 4 tokens 2x faster).
cdef enum:
    GEMV_MAX_TOKENS = 4


cdef inline Py_ssize_t split(Py_ssize_t n, Py_ssize_t parts, Py_ssize_t p) noexcept nogil:
    """Start of part p of [0, n) cut into `parts` near-equal pieces."""
    return n * p // parts


cdef int qmm_forward(int qtype, int block, int type_size, const uint8_t *w, Py_ssize_t wstride,
                     Py_ssize_t R, Py_ssize_t n, const float *x, Py_ssize_t ldx, Py_ssize_t T,
                     float *y, Py_ssize_t ldy, Py_ssize_t tile_rows, Py_ssize_t tile_cols,
                     int nth) noexcept nogil:
    """y (T, R) = x (T, n) · Wᵀ. Work item = tile_rows rows of W (all tokens): its thread dequantizes
    them tile_cols columns at a time into its own buffer and runs sgemm on each piece, adding up
    (beta 1) after the first. Items are handed out dynamically, no barriers: a thread that the OS
    stalls does not hold the others up. Returns -1 if the buffers cannot be allocated."""
    cdef float *bufs = <float *>malloc(nth * tile_rows * tile_cols * sizeof(float))
    if bufs == NULL:
        return -1
    cdef Py_ssize_t n_items = (R + tile_rows - 1) // tile_rows, item, r0, c0, rows, cols, i, t
    cdef float *buf
    cdef float one = 1.0, beta
    cdef char tr = b'T', nt = b'N'
    cdef int m_, n_, k_, lda_, ldb_, ldc_, inc1 = 1
    with parallel(num_threads=nth):
        buf = bufs + threadid() * tile_rows * tile_cols
        for item in prange(n_items, schedule="dynamic", chunksize=1):
            r0 = item * tile_rows
            rows = min(tile_rows, R - r0)
            c0 = 0
            while c0 < n:
                cols = min(tile_cols, n - c0)
                for i in range(rows):  # buf (rows, cols) = W[r0:r0+rows, c0:c0+cols]
                    dequant_blocks(qtype, w + (r0 + i) * wstride + (c0 // block) * type_size,
                                   buf + i * cols, cols // block)
                beta = 1.0 if c0 > 0 else 0.0
                if T <= GEMV_MAX_TOKENS:
                    # a few tokens: sgemv reads the tile in place (sgemm would first copy all of it)
                    m_, n_, lda_ = <int>cols, <int>rows, <int>cols
                    for t in range(T):
                        sgemv(&tr, &m_, &n_, &one, buf, &lda_, <float *>x + t * ldx + c0, &inc1, &beta,
                              y + t * ldy + r0, &inc1)
                else:
                    # column-major view: y_cm (R, T) [r0:, :] (+)= buf_cm (cols, rows)ᵀ · x_cm (n, T) [c0:, :]
                    m_, n_, k_ = <int>rows, <int>T, <int>cols
                    lda_, ldb_, ldc_ = <int>cols, <int>ldx, <int>ldy
                    sgemm(&tr, &nt, &m_, &n_, &k_, &one, buf, &lda_, <float *>x + c0, &ldb_, &beta,
                          y + r0, &ldc_)
                c0 = c0 + cols
    free(bufs)
    return 0


cdef int qmm_backward(int qtype, int block, int type_size, const uint8_t *w, Py_ssize_t wstride,
                      Py_ssize_t R, Py_ssize_t n, const float *dy, Py_ssize_t lddy, Py_ssize_t T,
                      float *dx, Py_ssize_t lddx, bint accumulate, Py_ssize_t tile_rows,
                      Py_ssize_t tile_cols, Py_ssize_t token_parts, int nth) noexcept nogil:
    """dx (T, n) (+)= dy (T, R) · W. Work item = (tile_cols columns of W, one of token_parts token
    ranges): a disjoint block of dx, so no two threads ever write the same floats. Its thread walks
    down all rows of W tile_rows at a time, dequantizing into its own buffer and adding
    dy[:, rows] · tile with sgemm. Dynamic hand-out, no barriers. Returns -1 if out of memory."""
    cdef float *bufs = <float *>malloc(nth * tile_rows * tile_cols * sizeof(float))
    if bufs == NULL:
        return -1
    cdef Py_ssize_t n_col = (n + tile_cols - 1) // tile_cols, item, r0, c0, t0, t1, rows, cols, i, t
    cdef float *buf
    cdef float one = 1.0, beta
    cdef char nt = b'N'
    cdef int m_, n_, k_, lda_, ldb_, ldc_, inc1 = 1
    with parallel(num_threads=nth):
        buf = bufs + threadid() * tile_rows * tile_cols
        for item in prange(n_col * token_parts, schedule="dynamic", chunksize=1):
            c0 = (item // token_parts) * tile_cols
            cols = min(tile_cols, n - c0)
            t0 = split(T, token_parts, item % token_parts)
            t1 = split(T, token_parts, item % token_parts + 1)
            r0 = 0
            while r0 < R and t1 > t0:
                rows = min(tile_rows, R - r0)
                for i in range(rows):  # buf (rows, cols) = W[r0:r0+rows, c0:c0+cols]
                    dequant_blocks(qtype, w + (r0 + i) * wstride + (c0 // block) * type_size,
                                   buf + i * cols, cols // block)
                beta = 1.0 if (accumulate or r0 > 0) else 0.0
                if t1 - t0 <= GEMV_MAX_TOKENS:
                    m_, n_, lda_ = <int>cols, <int>rows, <int>cols
                    for t in range(t0, t1):
                        sgemv(&nt, &m_, &n_, &one, buf, &lda_, <float *>dy + t * lddy + r0, &inc1, &beta,
                              dx + t * lddx + c0, &inc1)
                else:
                    # column-major view: dx_cm (n, T) [c0:, t0:] (+)= buf_cm (cols, rows) · dy_cm (R, T) [r0:, t0:]
                    m_, n_, k_ = <int>cols, <int>(t1 - t0), <int>rows
                    lda_, ldb_, ldc_ = <int>cols, <int>lddy, <int>lddx
                    sgemm(&nt, &nt, &m_, &n_, &k_, &one, buf, &lda_, <float *>dy + t0 * lddy + r0, &ldb_,
                          &beta, dx + t0 * lddx + c0, &ldc_)
                r0 = r0 + rows
    free(bufs)
    return 0


def qmatmul(bint backward, int qtype, int block, int type_size, const uint8_t[:, :] w,
            const float[:, :] a, float[:, :] c, bint accumulate, Py_ssize_t tile_rows,
            Py_ssize_t tile_cols, Py_ssize_t token_parts, int nth):
    """Forward c = a·Wᵀ or backward c (+)= a·W, with the tiling ggtrain.kernels planned (tile_cols a
    multiple of block). Inner strides of w, a, c are 1 (checked by the caller)."""
    cdef Py_ssize_t R = w.shape[0], n = w.shape[1] // type_size * block, T = a.shape[0], i, j
    if T == 0:
        return
    if R == 0 or n == 0:
        if not accumulate:
            with nogil:
                for i in range(T):
                    for j in range(c.shape[1]):
                        c[i, j] = 0
        return
    # leading dims for BLAS (>= a row's length); with one token the row stride is never used
    cdef Py_ssize_t lda = a.strides[0] // 4 if T > 1 else a.shape[1]
    cdef Py_ssize_t ldc = c.strides[0] // 4 if T > 1 else c.shape[1]
    cdef int rc
    with nogil:
        if backward:
            rc = qmm_backward(qtype, block, type_size, &w[0, 0], w.strides[0], R, n, &a[0, 0], lda, T,
                              &c[0, 0], ldc, accumulate, tile_rows, tile_cols, token_parts, nth)
        else:
            rc = qmm_forward(qtype, block, type_size, &w[0, 0], w.strides[0], R, n, &a[0, 0], lda, T,
                             &c[0, 0], ldc, tile_rows, tile_cols, nth)
    if rc != 0:
        raise MemoryError(f"cannot allocate {nth} dequantization tiles of {tile_rows}x{tile_cols} floats")
