/* int8 matmul over GGUF weights with AVX512-VNNI (compiled only into int8mm_avx512).

   Y (T, R) = X (T, n) · Wᵀ, approximated as llama.cpp does: X is quantized to int8 in groups of G
   consecutive elements (G = 16 or 32, the weight type's scale granularity), and every quant type is
   rewritten, exactly, as  w = s·q + o  with q int8 and one scale s (and offset o) per group of G:

       Y[t, r] = Σ_groups  s[r,g]·xs[t,g]·Σ q·xq  +  o[r,g]·xs[t,g]·Σ xq

   The integer sums run on vpdpbusd, which multiplies unsigned by signed bytes: the activations are
   stored as u = xq + 128 (always in 1..255) and 128·Σq is subtracted per group.

   Layouts (all built per call; nothing is cached):
     weight panel: q int8 (rows, n); s, o float and c int32 = 128·Σq, each (rows, n/G)
     activations:  u uint8 [tg][n/4][16][4] for token groups of 16 (one zmm of int32 lanes is 16
                   tokens × 4 consecutive k); xs, xsum (= xs·Σxq) float [tg][n/G][16]
*/
#ifndef GG_INT8_UTIL_H
#define GG_INT8_UTIL_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "quant_layout.h"

/* ---- weights: one row of GGUF blocks -> q, s, o (o untouched for types without offset) ---- */

/* c[g] = 128 · Σ q over group g (G = 16 or 32). psadbw sums unsigned bytes 8 at a time, so the
   bytes are flipped to q + 128 and 128·G taken off again. */
static inline void i8_group_sums(const int8_t *q, int32_t *c, int64_t n, int G) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int per = 64 / G;       /* groups in 64 bytes */
    const int lanes = G / 8;      /* 64-bit psadbw lanes per group */
    const __mmask8 first = (__mmask8)((1u << lanes) - 1);
    int64_t g = 0;
    for (; (g + per) * G <= n; g += per) {
        const __m512i sad = _mm512_sad_epu8(_mm512_xor_si512(_mm512_loadu_si512((const void *)(q + g * G)), flip),
                                            _mm512_setzero_si512());
        for (int i = 0; i < per; i++)
            c[g + i] = 128 * ((int32_t)_mm512_mask_reduce_add_epi64((__mmask8)(first << (i * lanes)), sad) - 128 * G);
    }
    for (; g < n / G; g++) {
        int32_t sum = 0;
        for (int j = 0; j < G; j++) sum += q[g * G + j];
        c[g] = 128 * sum;
    }
}

/* Converts nb blocks of one row into q, s (and o for types with a min); returns 0, or -1 for a
   type without an int8 form. The sums c come from i8_group_sums. */
static int gg_i8_weight_row(int qtype, const uint8_t *b, int64_t nb, int8_t *q, float *s, float *o) {
    int64_t i;
    int j, l, h, sh, sub;
    switch (qtype) {
    case GG_TYPE_Q4_0: /* w = d (q - 8) */
        for (i = 0; i < nb; i++, b += GG_Q4_0_BYTES, q += GG_QK) {
            const uint8_t *qs = b + GG_Q4_0_QS;
            s[i] = gg_load_f16(b + GG_Q4_0_D);
            for (j = 0; j < 16; j++) {
                q[j] = (int8_t)((qs[j] & 15) - 8);
                q[j + 16] = (int8_t)((qs[j] >> 4) - 8);
            }
        }
        break;
    case GG_TYPE_Q4_1: /* w = d q + m */
        for (i = 0; i < nb; i++, b += GG_Q4_1_BYTES, q += GG_QK) {
            const uint8_t *qs = b + GG_Q4_1_QS;
            s[i] = gg_load_f16(b + GG_Q4_1_D);
            o[i] = gg_load_f16(b + GG_Q4_1_M);
            for (j = 0; j < 16; j++) {
                q[j] = (int8_t)(qs[j] & 15);
                q[j + 16] = (int8_t)(qs[j] >> 4);
            }
        }
        break;
    case GG_TYPE_Q5_0: /* w = d (q - 16) */
        for (i = 0; i < nb; i++, b += GG_Q5_0_BYTES, q += GG_QK) {
            const uint8_t *qs = b + GG_Q5_0_QS;
            const uint32_t qh = gg_load_u32(b + GG_Q5_0_QH);
            s[i] = gg_load_f16(b + GG_Q5_0_D);
            for (j = 0; j < 16; j++) {
                q[j] = (int8_t)(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - 16);
                q[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
            }
        }
        break;
    case GG_TYPE_Q5_1: /* w = d q + m */
        for (i = 0; i < nb; i++, b += GG_Q5_1_BYTES, q += GG_QK) {
            const uint8_t *qs = b + GG_Q5_1_QS;
            const uint32_t qh = gg_load_u32(b + GG_Q5_1_QH);
            s[i] = gg_load_f16(b + GG_Q5_1_D);
            o[i] = gg_load_f16(b + GG_Q5_1_M);
            for (j = 0; j < 16; j++) {
                q[j] = (int8_t)((qs[j] & 15) | (((qh >> j) & 1) << 4));
                q[j + 16] = (int8_t)((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
            }
        }
        break;
    case GG_TYPE_Q8_0: /* w = d q */
        for (i = 0; i < nb; i++, b += GG_Q8_0_BYTES, q += GG_QK) {
            s[i] = gg_load_f16(b + GG_Q8_0_D);
            memcpy(q, b + GG_Q8_0_QS, 32);
        }
        break;
    case GG_TYPE_Q2_K: /* groups of 16: w = d·sc q - dmin·m */
        for (i = 0; i < nb; i++, b += GG_Q2_K_BYTES, q += GG_QK_K, s += 16, o += 16) {
            const uint8_t *sc = b + GG_Q2_K_SCALES, *qs = b + GG_Q2_K_QS;
            float d = gg_load_f16(b + GG_Q2_K_D), dmin = gg_load_f16(b + GG_Q2_K_DMIN);
            for (j = 0; j < 16; j++) {
                s[j] = d * (float)(sc[j] & 15);
                o[j] = -(dmin * (float)(sc[j] >> 4));
            }
            for (h = 0; h < 2; h++)
                for (sh = 0; sh < 4; sh++)
                    for (l = 0; l < 32; l++)
                        q[h * 128 + sh * 32 + l] = (int8_t)((qs[h * 32 + l] >> (2 * sh)) & 3);
        }
        break;
    case GG_TYPE_Q3_K: /* groups of 16: w = d (sc - 32) q3 */
        for (i = 0; i < nb; i++, b += GG_Q3_K_BYTES, q += GG_QK_K, s += 16) {
            const uint8_t *hm = b + GG_Q3_K_HMASK, *qs = b + GG_Q3_K_QS, *sc = b + GG_Q3_K_SCALES;
            float d = gg_load_f16(b + GG_Q3_K_D);
            for (j = 0; j < 16; j++) s[j] = d * (float)gg_q3_k_scale(sc, j);
            for (h = 0; h < 2; h++)
                for (sh = 0; sh < 4; sh++)
                    for (l = 0; l < 32; l++)
                        q[h * 128 + sh * 32 + l] = (int8_t)(((qs[h * 32 + l] >> (2 * sh)) & 3)
                                                            - ((((hm[l] >> (h * 4 + sh)) & 1) ^ 1) << 2));
        }
        break;
    case GG_TYPE_Q4_K: /* groups of 32: w = d·sc q - dmin·m */
    case GG_TYPE_Q5_K: /* the same with a 5th bit from qh */
        for (i = 0; i < nb; i++, q += GG_QK_K, s += 8, o += 8) {
            const int k5 = qtype == GG_TYPE_Q5_K;
            float d = gg_load_f16(b + (k5 ? GG_Q5_K_D : GG_Q4_K_D));
            float dmin = gg_load_f16(b + (k5 ? GG_Q5_K_DMIN : GG_Q4_K_DMIN));
            const uint8_t *sc = b + (k5 ? GG_Q5_K_SCALES : GG_Q4_K_SCALES), *qh = b + GG_Q5_K_QH;
            const uint8_t *qs = b + (k5 ? GG_Q5_K_QS : GG_Q4_K_QS);
            for (j = 0; j < 8; j++) {
                int scale, mn;
                gg_k_scale_min(sc, j, &scale, &mn);
                s[j] = d * (float)scale;
                o[j] = -(dmin * (float)mn);
                for (l = 0; l < 32; l++) {
                    int v = (qs[(j / 2) * 32 + l] >> (4 * (j % 2))) & 15;
                    if (k5) v |= ((qh[l] >> j) & 1) << 4;
                    q[j * 32 + l] = (int8_t)v;
                }
            }
            b += k5 ? GG_Q5_K_BYTES : GG_Q4_K_BYTES;
        }
        break;
    case GG_TYPE_Q6_K: /* groups of 16: w = d·sc (q - 32) */
        for (i = 0; i < nb; i++, b += GG_Q6_K_BYTES, q += GG_QK_K, s += 16) {
            const uint8_t *ql = b + GG_Q6_K_QL, *qh = b + GG_Q6_K_QH;
            const int8_t *sc = (const int8_t *)(b + GG_Q6_K_SCALES);
            float d = gg_load_f16(b + GG_Q6_K_D);
            for (j = 0; j < 16; j++) s[j] = d * (float)sc[j];
            for (h = 0; h < 2; h++)
                for (sh = 0; sh < 4; sh++)
                    for (l = 0; l < 32; l++)
                        q[h * 128 + sh * 32 + l] = (int8_t)(
                            (((ql[h * 64 + (sh % 2) * 32 + l] >> (4 * (sh / 2))) & 15)
                             | (((qh[h * 32 + l] >> (2 * sh)) & 3) << 4)) - 32);
        }
        break;
    case GG_TYPE_IQ4_NL: /* w = d kvalue */
        for (i = 0; i < nb; i++, b += GG_IQ4_NL_BYTES, q += GG_QK) {
            const uint8_t *qs = b + GG_IQ4_NL_QS;
            s[i] = gg_load_f16(b + GG_IQ4_NL_D);
            for (j = 0; j < 16; j++) {
                q[j] = GG_KVALUES_IQ4NL[qs[j] & 15];
                q[j + 16] = GG_KVALUES_IQ4NL[qs[j] >> 4];
            }
        }
        break;
    case GG_TYPE_IQ4_XS: /* groups of 32: w = d (ls - 32) kvalue */
        for (i = 0; i < nb; i++, b += GG_IQ4_XS_BYTES, q += GG_QK_K, s += 8) {
            const uint8_t *qs = b + GG_IQ4_XS_QS;
            float d = gg_load_f16(b + GG_IQ4_XS_D);
            const uint16_t shi = gg_load_u16(b + GG_IQ4_XS_SCALES_H);
            for (sub = 0; sub < 8; sub++) {
                s[sub] = d * (float)gg_iq4_xs_scale(b, shi, sub);
                for (j = 0; j < 16; j++) {
                    q[sub * 32 + j] = GG_KVALUES_IQ4NL[qs[sub * 16 + j] & 15];
                    q[sub * 32 + j + 16] = GG_KVALUES_IQ4NL[qs[sub * 16 + j] >> 4];
                }
            }
        }
        break;
    default:
        return -1;
    }
    return 0;
}

/* ---- activations: T rows of n floats -> u, xs, xsum in token groups of 16 ---- */

/* One token into lane `lane` of its group: x (n floats) -> u (the group's [n/4][16][4] bytes, each
   q + 128) and xs/xsum (xs[g*16], xsum[g*16]). xs = max|x|/127 per group; q = rint(x / xs) in
   f32 (round half to even, as numpy's rint). Each 4 consecutive k go to their dword of the lane. */
static void gg_i8_quantize_token(const float *x, int64_t n, int G, int lane, uint8_t *u, float *xs,
                                 float *xsum) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m128i flip = _mm_set1_epi8((char)0x80);
    uint8_t *ul = u + lane * 4;
    for (int64_t g = 0; g < n / G; g++) {
        const float *xg = x + g * G;
        __m512 v0 = _mm512_loadu_ps(xg), v1 = G == 32 ? _mm512_loadu_ps(xg + 16) : _mm512_setzero_ps();
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, absmask), _mm512_and_ps(v1, absmask)));
        float d = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));  /* MXCSR default: nearest-even */
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
        const __m128i b0 = _mm_xor_si128(_mm512_cvtepi32_epi8(q0), flip);
        uint8_t *dst = ul + (g * G / 4) * 64;
        uint32_t w;
        w = (uint32_t)_mm_extract_epi32(b0, 0); memcpy(dst + 0 * 64, &w, 4);
        w = (uint32_t)_mm_extract_epi32(b0, 1); memcpy(dst + 1 * 64, &w, 4);
        w = (uint32_t)_mm_extract_epi32(b0, 2); memcpy(dst + 2 * 64, &w, 4);
        w = (uint32_t)_mm_extract_epi32(b0, 3); memcpy(dst + 3 * 64, &w, 4);
        if (G == 32) {
            const __m128i b1 = _mm_xor_si128(_mm512_cvtepi32_epi8(q1), flip);
            w = (uint32_t)_mm_extract_epi32(b1, 0); memcpy(dst + 4 * 64, &w, 4);
            w = (uint32_t)_mm_extract_epi32(b1, 1); memcpy(dst + 5 * 64, &w, 4);
            w = (uint32_t)_mm_extract_epi32(b1, 2); memcpy(dst + 6 * 64, &w, 4);
            w = (uint32_t)_mm_extract_epi32(b1, 3); memcpy(dst + 7 * 64, &w, 4);
        }
        int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        xs[g * 16] = d;
        xsum[g * 16] = d * (float)sum;
    }
}

/* A padding lane: q = 0 (u = 128) everywhere, scales 0. */
static void gg_i8_zero_token(int64_t n, int G, int lane, uint8_t *u, float *xs, float *xsum) {
    const uint32_t w = 0x80808080u;
    for (int64_t k4 = 0; k4 < n / 4; k4++) memcpy(u + k4 * 64 + lane * 4, &w, 4);
    for (int64_t g = 0; g < n / G; g++) {
        xs[g * 16] = 0.0f;
        xsum[g * 16] = 0.0f;
    }
}

/* 4 rows × 16 tokens (vectors a..d, lane = token) -> y[t][0..3] for the 16 tokens (row stride ldy). */
static inline void i8_store_4x16(__m512 a, __m512 b, __m512 c, __m512 d, float *y, int64_t ldy) {
    __m512 t0 = _mm512_unpacklo_ps(a, b), t1 = _mm512_unpackhi_ps(a, b);
    __m512 t2 = _mm512_unpacklo_ps(c, d), t3 = _mm512_unpackhi_ps(c, d);
    __m512 r0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    __m512 r1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    __m512 r2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    __m512 r3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
#define I8_ST(L)                                                            \
    _mm_storeu_ps(y + (4 * L + 0) * ldy, _mm512_extractf32x4_ps(r0, L));   \
    _mm_storeu_ps(y + (4 * L + 1) * ldy, _mm512_extractf32x4_ps(r1, L));   \
    _mm_storeu_ps(y + (4 * L + 2) * ldy, _mm512_extractf32x4_ps(r2, L));   \
    _mm_storeu_ps(y + (4 * L + 3) * ldy, _mm512_extractf32x4_ps(r3, L));
    I8_ST(0) I8_ST(1) I8_ST(2) I8_ST(3)
#undef I8_ST
}

/* tile [4][J*16] (rows × tokens) -> y (token-major, row stride ldy): `rows` rows (<= 4) and
   `tokens` tokens (<= J*16) are real, the rest padding. */
static void gg_i8_store_tile(const float *tile, int J, int rows, int64_t tokens, float *y, int64_t ldy) {
    for (int j = 0; j < J; j++) {
        if (rows == 4 && tokens >= (j + 1) * 16) {
            i8_store_4x16(_mm512_loadu_ps(tile + 0 * J * 16 + j * 16), _mm512_loadu_ps(tile + 1 * J * 16 + j * 16),
                          _mm512_loadu_ps(tile + 2 * J * 16 + j * 16), _mm512_loadu_ps(tile + 3 * J * 16 + j * 16),
                          y + j * 16 * ldy, ldy);
        } else {
            for (int64_t t = j * 16; t < (j + 1) * 16 && t < tokens; t++)
                for (int r = 0; r < rows; r++) y[t * ldy + r] = tile[r * J * 16 + t];
        }
    }
}

/* ---- micro-kernel: 4 weight rows × J token groups (16 tokens each) over nk columns ---- */

#define I8_R 4

/* out [I8_R][J*16] (=, or += with accumulate) Σ over the nk columns at q, s, o, c, u, xs, xsum
   (pointers already at the first column / group); rows of q are qstride bytes apart, rows of s, o,
   c gstride groups apart. */
static inline __attribute__((always_inline)) void i8_tile(
    int G, int J, int has_off, int64_t nk, int64_t qstride, int64_t gstride, const int8_t *q,
    const float *s, const float *o, const int32_t *c, const uint8_t *u, const float *xs,
    const float *xsum, int64_t ustride, int64_t fstride, int accumulate, float *out) {
    const int64_t ng = nk / G;
    __m512 facc[I8_R][2];
    for (int r = 0; r < I8_R; r++)
        for (int j = 0; j < J; j++)
            facc[r][j] = accumulate ? _mm512_loadu_ps(out + r * J * 16 + j * 16) : _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i acc[I8_R][2];
        for (int r = 0; r < I8_R; r++)
            for (int j = 0; j < J; j++) acc[r][j] = _mm512_setzero_si512();
        for (int k4 = 0; k4 < G / 4; k4++) {
            const int64_t kk = g * (G / 4) + k4;
            __m512i xv[2];
            for (int j = 0; j < J; j++) xv[j] = _mm512_load_si512((const void *)(u + j * ustride + kk * 64));
            for (int r = 0; r < I8_R; r++) {
                int32_t w4;
                memcpy(&w4, q + r * qstride + kk * 4, 4);
                const __m512i wb = _mm512_set1_epi32(w4);
                for (int j = 0; j < J; j++) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], xv[j], wb);
            }
        }
        for (int j = 0; j < J; j++) {
            const __m512 xsv = _mm512_load_ps(xs + j * fstride + g * 16);
            __m512 xsumv = _mm512_setzero_ps();
            if (has_off) xsumv = _mm512_load_ps(xsum + j * fstride + g * 16);
            for (int r = 0; r < I8_R; r++) {
                const __m512i t = _mm512_sub_epi32(acc[r][j], _mm512_set1_epi32(c[r * gstride + g]));
                const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(s[r * gstride + g]), xsv);
                facc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sc, facc[r][j]);
                if (has_off) facc[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(o[r * gstride + g]), xsumv, facc[r][j]);
            }
        }
    }
    for (int r = 0; r < I8_R; r++)
        for (int j = 0; j < J; j++) _mm512_storeu_ps(out + r * J * 16 + j * 16, facc[r][j]);
}

#define I8_TILE_ARGS                                                                                   \
    int64_t nk, int64_t qstride, int64_t gstride, const int8_t *q, const float *s, const float *o,     \
        const int32_t *c, const uint8_t *u, const float *xs, const float *xsum, int64_t ustride,       \
        int64_t fstride, int accumulate, float *out
#define I8_TILE_VARIANT(G, J, OFF)                                                                     \
    static void i8_tile_##G##_##J##_##OFF(I8_TILE_ARGS) {                                              \
        i8_tile(G, J, OFF, nk, qstride, gstride, q, s, o, c, u, xs, xsum, ustride, fstride, accumulate, \
                out);                                                                                  \
    }
I8_TILE_VARIANT(16, 1, 0)
I8_TILE_VARIANT(16, 1, 1)
I8_TILE_VARIANT(16, 2, 0)
I8_TILE_VARIANT(16, 2, 1)
I8_TILE_VARIANT(32, 1, 0)
I8_TILE_VARIANT(32, 1, 1)
I8_TILE_VARIANT(32, 2, 0)
I8_TILE_VARIANT(32, 2, 1)

/* i8_tile for run-time G (16/32) and J (1/2); o NULL when the type has no offset. */
static void gg_i8_tile(int G, int J, I8_TILE_ARGS) {
    int off = o != NULL;
#define I8_CALL(GG, JJ, OO) \
    i8_tile_##GG##_##JJ##_##OO(nk, qstride, gstride, q, s, o, c, u, xs, xsum, ustride, fstride, accumulate, out)
    if (G == 16) {
        if (J == 2) { if (off) I8_CALL(16, 2, 1); else I8_CALL(16, 2, 0); }
        else { if (off) I8_CALL(16, 1, 1); else I8_CALL(16, 1, 0); }
    } else {
        if (J == 2) { if (off) I8_CALL(32, 2, 1); else I8_CALL(32, 2, 0); }
        else { if (off) I8_CALL(32, 1, 1); else I8_CALL(32, 1, 0); }
    }
#undef I8_CALL
}

#endif
