/* bf16 matmul over GGUF weights with AVX512-BF16 (compiled only into bf16mm_avx512bf16).

   C (M, N) (+)= A (M, K) · B (K, N) with A and B rounded to bf16 (round to nearest even), products
   and sums in f32 (vdpbf16ps: per f32 lane, acc += a[2i]·b[2i] + a[2i+1]·b[2i+1]).
     forward   Y (T, R) = X (T, n) · Wᵀ:  A = X, K = n, B[k][r] = W[r][k]
     backward  dX (T, n) = dY (T, R) · W: A = dY, K = R, B[k][c] = W[k][c]
   A stays row-major bf16 (T, K even, a zero in the pad column of an odd K): the micro-kernel
   broadcasts a pair A[t][2p:2p+2] as one 32-bit lane. B is packed per thread, one tile at a time,
   into the K-pair-interleaved layout vdpbf16ps reads: u32 bp[p][j] = (B[2p][j], B[2p+1][j]) for
   GG_BF_NR columns j, one zmm per 16 columns. A tile holds kc values of k (a multiple of GG_BF_KC):
     forward   panels of GG_BF_NR weight rows × kc columns: the pairs of a row are already
               adjacent, so the pack is a 32-bit transpose;
     backward  kc weight rows × a range of columns: two consecutive rows interleaved.
   Weights are dequantized a row segment at a time by the dequantizers that quant_layout.h's
   layouts serve (quant_util.h's AVX2 twins, bit-identical to gguf-py) into an L1-sized f32
   scratch, rounded and packed: there is never an f32 copy of more than one tile row.

   The micro-kernel: GG_BF_MR rows of A × GG_BF_NR columns = 24 zmm accumulators (vdpbf16ps has a
   latency of several cycles at two per cycle: 24 independent sums keep both pipes busy), 4 loads
   of B and 6 broadcasts of A per pair of k. An AMX tile kernel would read the same packed B
   (tdpbf16ps' B tile is this layout, 16 pairs × 16 columns, at a row stride of GG_BF_NR · 4 bytes)
   and the same row-major A: one more micro-kernel, not another packing.
*/
#ifndef GG_BF16MM_UTIL_H
#define GG_BF16MM_UTIL_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16_round.h"
#include "quant_layout.h"
#include "quant_util.h"

enum {
    GG_BF_MR = 6,    /* rows of A (tokens) per micro-tile */
    GG_BF_NR = 64,   /* columns of C per micro-tile: 4 zmm of f32 */
    GG_BF_KC = 256,  /* values of k per packed tile are a multiple of this: of every block size */
};

/* The activations' k-tiled layout: tile kb (values k0 = kb·tk .. k0 + kc, kc = tk but for the last
   tile) is a row-major (T, kc rounded up to even) block at kb·T·tk, so a micro-tile's rows are one
   contiguous stretch (sequential for the prefetchers). Row t of x (f32, or bf16 bits) into it: */
static inline void gg_bf16_tile_row(const float *x, const uint16_t *xb, int64_t K, int64_t tk, int64_t T,
                                    int64_t t, uint16_t *dst) {
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += tk, kb++) {
        const int64_t kc = K - k0 < tk ? K - k0 : tk;
        uint16_t *row = dst + kb * T * tk + t * (kc + (kc & 1));
        if (x) {
            gg_bf16_round_row(x + k0, row, kc, (int)(kc & 1));
        } else {
            memcpy(row, xb + k0, (size_t)kc * 2);
            if (kc & 1) row[kc] = 0;
        }
    }
}

/* ---- weights: a row segment of GGUF blocks -> f32 (the dequantizers of quant_util.h) ---------------- */

/* nb blocks of qtype at b -> y (nb · block floats); -1 for a type the kernels do not know */
static inline int gg_bf_dequant(int qtype, const uint8_t *b, float *y, int64_t nb) {
    switch (qtype) {
    case GG_TYPE_F32: memcpy(y, b, (size_t)nb * 4); return 0;
    case GG_TYPE_F16: gg_f16_row(b, y, nb); return 0;
    case GG_TYPE_BF16:  /* the top half of an f32 */
        for (int64_t i = 0; i < nb; i++) {
            uint32_t bits = (uint32_t)gg_load_u16(b + 2 * i) << 16;
            memcpy(y + i, &bits, 4);
        }
        return 0;
    case GG_TYPE_Q4_0: return gg_dq_q4_0_simd(b, y, nb) - 1;
    case GG_TYPE_Q4_1: return gg_dq_q4_1_simd(b, y, nb) - 1;
    case GG_TYPE_Q5_0: return gg_dq_q5_0_simd(b, y, nb) - 1;
    case GG_TYPE_Q5_1: return gg_dq_q5_1_simd(b, y, nb) - 1;
    case GG_TYPE_Q8_0: return gg_dq_q8_0_simd(b, y, nb) - 1;
    case GG_TYPE_Q2_K: return gg_dq_q2_k_simd(b, y, nb) - 1;
    case GG_TYPE_Q3_K: return gg_dq_q3_k_simd(b, y, nb) - 1;
    case GG_TYPE_Q4_K: return gg_dq_q4_k_simd(b, y, nb) - 1;
    case GG_TYPE_Q5_K: return gg_dq_q5_k_simd(b, y, nb) - 1;
    case GG_TYPE_Q6_K: return gg_dq_q6_k_simd(b, y, nb) - 1;
    case GG_TYPE_IQ4_NL: return gg_dq_iq4_nl_simd(b, y, nb) - 1;
    case GG_TYPE_IQ4_XS: return gg_dq_iq4_xs_simd(b, y, nb) - 1;
    default: return -1;
    }
}

/* prefetch (into L1) `bytes` bytes of each of `rows` rows at w, row stride wstride */
static inline void gg_prefetch_rows(const uint8_t *w, int64_t wstride, int rows, int64_t bytes) {
    for (int i = 0; i < rows; i++)
        for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(w + i * wstride + o), _MM_HINT_T0);
}

/* Whether a weight type's dequantized values can be f32 denormals: only F32 and BF16 weights can (every
   quantized type is a product or difference of values from 2^-24 up, F16 included). The others are
   rounded by vcvtne(2)ps2bf16, one instruction for 16 or 32 values and the same round to nearest even
   as gg_bf16_round16 on normal numbers and NaN; it flushes denormals to zero, so F32 and BF16 weights
   keep the integer rounding. */
static inline int gg_bf_may_denormal(int qtype) { return qtype == GG_TYPE_F32 || qtype == GG_TYPE_BF16; }

/* 16 floats -> 16 bf16: exact, the integer arithmetic (denormals kept); else the instruction */
static inline __m256i gg_bf_round16w(__m512 v, int exact) {
    return exact ? gg_bf16_round16(v) : (__m256i)_mm512_cvtneps_pbh(v);
}

/* 32 floats (the first `valid`, zeros after) -> 16 bf16 pairs */
static inline __m512i gg_bf16_pairs16(const float *s, int valid, int exact) {
    const __mmask16 m0 = valid >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (valid > 0 ? valid : 0)) - 1);
    const int v1 = valid - 16;
    const __mmask16 m1 = v1 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (v1 > 0 ? v1 : 0)) - 1);
    const __m512 lo = _mm512_maskz_loadu_ps(m0, s), hi = _mm512_maskz_loadu_ps(m1, s + 16);
    if (!exact) return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  /* lo in the low half */
    return _mm512_inserti64x4(_mm512_castsi256_si512(gg_bf16_round16(lo)), gg_bf16_round16(hi), 1);
}

/* 16 × 16 u32 transpose in registers: r[i] lane j <-> r[j] lane i */
static inline void gg_transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* r[i] now holds, per 128-bit lane L, the 4 × 4 block (rows 4(i/4).., lane L's columns); the
       128-bit lanes are then transposed across groups of four registers */
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);       /* lanes 0,2 of each */
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);   /* lanes 1,3 */
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

/* Forward tile: bp[p][j] = pair p of row j of the nr (<= GG_BF_NR) weight rows at w (row stride
   wstride), columns k0 .. k0 + kc (kc a multiple of the block); rows past nr and the pad half of an
   odd kc are zeros. scratch: 16 · GG_BF_KC floats. */
static inline int gg_bf16_pack_fwd(int qtype, int block, int type_size, const uint8_t *w, int64_t wstride,
                                   int nr, int64_t k0, int kc, float *scratch, uint32_t *bp) {
    const int kp = (kc + 1) / 2, exact = gg_bf_may_denormal(qtype);
    /* the weights come from DRAM (a model is far larger than the caches) and this walk reads them 16
       strided rows at a time, which the hardware prefetchers follow badly: ask for the next panel's
       rows (the tile the caller packs next) now, while this one is packed and multiplied */
    gg_prefetch_rows(w + (int64_t)nr * wstride + (k0 / block) * type_size, wstride, nr,
                     (int64_t)(kc / block) * type_size);
    for (int j0 = 0; j0 < GG_BF_NR; j0 += 16) {
        const int rows = nr - j0 < 16 ? (nr - j0 > 0 ? nr - j0 : 0) : 16;
        /* GG_BF_KC columns at a time (whole blocks of every type): 16 KiB of scratch stays in L1 */
        for (int c0 = 0; c0 < kc; c0 += GG_BF_KC) {
            const int cc = kc - c0 < GG_BF_KC ? kc - c0 : GG_BF_KC;
            for (int i = 0; i < rows; i++)
                if (gg_bf_dequant(qtype, w + (int64_t)(j0 + i) * wstride + ((k0 + c0) / block) * type_size,
                                  scratch + i * GG_BF_KC, cc / block))
                    return -1;
            for (int p0 = 0; 2 * p0 < cc; p0 += 16) {
                __m512i r[16];
                for (int i = 0; i < 16; i++)
                    r[i] = i < rows ? gg_bf16_pairs16(scratch + i * GG_BF_KC + 2 * p0, cc - 2 * p0, exact)
                                    : _mm512_setzero_si512();
                gg_transpose16(r);  /* r[q] = pair c0 / 2 + p0 + q of the 16 rows */
                for (int q = 0; q < 16 && c0 / 2 + p0 + q < kp; q++)
                    _mm512_store_si512((__m512i *)(bp + (int64_t)(c0 / 2 + p0 + q) * GG_BF_NR + j0), r[q]);
            }
        }
    }
    return 0;
}

/* Backward tile: for each of the ceil(nc / GG_BF_NR) column panels s, bp[s][p][j] = (W[2p][c],
   W[2p+1][c]), c = s · GG_BF_NR + j, over the kr weight rows at w (row stride wstride)
   and the nc columns starting at block c0 / block (nc a multiple of the block); a row past kr and
   columns past nc are zeros. Panels are kp · GG_BF_NR u32 apart. scratch: 2 · (nc + GG_BF_NR) floats. */
static inline int gg_bf16_pack_bwd(int qtype, int block, int type_size, const uint8_t *w, int64_t wstride,
                                   int kr, int64_t c0, int nc, float *scratch, uint32_t *bp) {
    const int kp = (kr + 1) / 2, n_panels = (nc + GG_BF_NR - 1) / GG_BF_NR, exact = gg_bf_may_denormal(qtype);
    const int64_t skip = (c0 / block) * type_size;
    float *s0 = scratch, *s1 = scratch + nc + GG_BF_NR;
    for (int p = 0; p < kp; p++) {
        gg_prefetch_rows(w + (int64_t)(2 * p + 4) * wstride + skip, wstride, 2 * p + 6 <= kr ? 2 : 0,
                         (int64_t)(nc / block) * type_size);  /* two pairs of rows ahead */
        if (gg_bf_dequant(qtype, w + (int64_t)(2 * p) * wstride + skip, s0, nc / block)) return -1;
        const int second = 2 * p + 1 < kr;
        if (second && gg_bf_dequant(qtype, w + (int64_t)(2 * p + 1) * wstride + skip, s1, nc / block))
            return -1;
        for (int c = 0; c < n_panels * GG_BF_NR; c += 16) {
            const int valid = nc - c;
            const __mmask16 m = valid >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (valid > 0 ? valid : 0)) - 1);
            const __m512i a = _mm512_cvtepu16_epi32(gg_bf_round16w(_mm512_maskz_loadu_ps(m, s0 + c), exact));
            const __m512i b = second ? _mm512_cvtepu16_epi32(gg_bf_round16w(_mm512_maskz_loadu_ps(m, s1 + c), exact))
                                     : _mm512_setzero_si512();
            _mm512_store_si512((__m512i *)(bp + ((int64_t)(c / GG_BF_NR) * kp + p) * GG_BF_NR + c % GG_BF_NR),
                               _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
        }
    }
    return 0;
}

/* ---- the micro-kernel ------------------------------------------------------------------------------ */

static inline __mmask16 gg_bf_cols_mask(int nc, int v) {
    const int left = nc - 16 * v;
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (left > 0 ? left : 0)) - 1);
}

/* C (mr rows at c, row stride ldc; nc <= GG_BF_NR columns) (+)= A · B over kp pairs of k: A's mr
   (<= GG_BF_MR) rows at a (row stride lda, in bf16), bp one packed panel (kp × GG_BF_NR u32, 64-byte
   aligned). Missing rows of A repeat its last row (computed, never stored).
   With ur > 0 the f32 low-rank addend U · V joins the sums before they are stored: U's mr rows at u
   (row stride ldu, ur columns), V's ur rows at v (row stride ldv, this tile's nc columns), f32 FMAs
   (a LoRA branch's (x·Aᵀ)·s·Bᵀ: its (T, out) sum never makes a second pass over C). */
static inline void gg_bf16_micro(int64_t kp, const uint16_t *a, int64_t lda, int mr, const uint32_t *bp,
                                 float *c, int64_t ldc, int nc, int accumulate, const float *u, int64_t ldu,
                                 const float *v, int64_t ldv, int ur) {
    const uint8_t *ar[GG_BF_MR];
    for (int m = 0; m < GG_BF_MR; m++) ar[m] = (const uint8_t *)(a + (m < mr ? m : mr - 1) * lda);
    __m512 acc[GG_BF_MR][4];
    for (int m = 0; m < GG_BF_MR; m++)
        for (int v = 0; v < 4; v++) acc[m][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kp; p++) {
        const uint32_t *b = bp + p * GG_BF_NR;
        const __m512bh b0 = (__m512bh)_mm512_load_si512((const void *)b);
        const __m512bh b1 = (__m512bh)_mm512_load_si512((const void *)(b + 16));
        const __m512bh b2 = (__m512bh)_mm512_load_si512((const void *)(b + 32));
        const __m512bh b3 = (__m512bh)_mm512_load_si512((const void *)(b + 48));
#pragma GCC unroll 6
        for (int m = 0; m < GG_BF_MR; m++) {
            const __m512bh x = (__m512bh)_mm512_set1_epi32((int)gg_load_u32(ar[m] + 4 * p));
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], x, b0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], x, b1);
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], x, b2);
            acc[m][3] = _mm512_dpbf16_ps(acc[m][3], x, b3);
        }
    }
    for (int r = 0; r < ur; r++) {
        const float *vr = v + r * ldv;
        const __m512 v0 = _mm512_maskz_loadu_ps(gg_bf_cols_mask(nc, 0), vr);
        const __m512 v1 = _mm512_maskz_loadu_ps(gg_bf_cols_mask(nc, 1), vr + 16);
        const __m512 v2 = _mm512_maskz_loadu_ps(gg_bf_cols_mask(nc, 2), vr + 32);
        const __m512 v3 = _mm512_maskz_loadu_ps(gg_bf_cols_mask(nc, 3), vr + 48);
#pragma GCC unroll 6
        for (int m = 0; m < GG_BF_MR; m++) {  /* all rows (the accumulators stay in registers) */
            const __m512 x = _mm512_set1_ps(u[(m < mr ? m : mr - 1) * ldu + r]);
            acc[m][0] = _mm512_fmadd_ps(x, v0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(x, v1, acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(x, v2, acc[m][2]);
            acc[m][3] = _mm512_fmadd_ps(x, v3, acc[m][3]);
        }
    }
    for (int m = 0; m < mr; m++) {
        float *row = c + m * ldc;
        for (int v = 0; v < 4; v++) {
            const __mmask16 k = gg_bf_cols_mask(nc, v);
            if (!k) break;
            __m512 r = acc[m][v];
            if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(k, row + 16 * v));
            _mm512_mask_storeu_ps(row + 16 * v, k, r);
        }
    }
}

/* C rows t0 .. t1 (+)= A rows t0 .. t1 · one packed panel (+ U rows t0 .. t1 · V with ur > 0; v at
   the panel's first column): micro-tiles of GG_BF_MR rows */
static inline void gg_bf16_panel(int64_t kp, const uint16_t *a, int64_t lda, int64_t t0, int64_t t1,
                                 const uint32_t *bp, float *c, int64_t ldc, int nc, int accumulate,
                                 const float *u, int64_t ldu, const float *v, int64_t ldv, int ur) {
    for (int64_t t = t0; t < t1; t += GG_BF_MR) {
        const int mr = t1 - t < GG_BF_MR ? (int)(t1 - t) : GG_BF_MR;
        gg_bf16_micro(kp, a + t * lda, lda, mr, bp, c + t * ldc, ldc, nc, accumulate, ur ? u + t * ldu : u, ldu,
                      v, ldv, ur);
    }
}

#endif
