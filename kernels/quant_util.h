/* AVX2 twins of the per-type dequantization loops in quant_simd.pyx (compiled into quant_avx2).
 *
 * GCC does not vectorize those byte-unpacking loops well, so the avx2 build uses these. They do the
 * same float operations in the same order (int -> float is exact, then d * q, then + m or - m, each
 * rounded on its own), so both builds are bit-identical to gguf-py; tests check both.
 * Each returns 1 when it did the work, 0 in builds without AVX2 (the Cython loop then runs).
 * Block layouts, type ids, the f16 load and the packed-scale decoders: quant_layout.h.
 */
#ifndef GGTRAIN_QUANT_UTIL_H
#define GGTRAIN_QUANT_UTIL_H

#include <stdint.h>

#include "quant_layout.h"

#if defined(__AVX2__)
/* y[0:16] = d * q  (q: 16 int8) */
static inline void gg_st16_mul(__m128i q, float d, float *y) {
    __m256 vd = _mm256_set1_ps(d);
    _mm256_storeu_ps(y, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
    _mm256_storeu_ps(y + 8, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)))));
}
/* y[0:16] = d * q + m */
static inline void gg_st16_mul_add(__m128i q, float d, float m, float *y) {
    __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))), vm));
    _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_mul_ps(vd, _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)))), vm));
}
/* y[0:16] = d * q - m */
static inline void gg_st16_mul_sub(__m128i q, float d, float m, float *y) {
    __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    _mm256_storeu_ps(y, _mm256_sub_ps(_mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))), vm));
    _mm256_storeu_ps(y + 8, _mm256_sub_ps(_mm256_mul_ps(vd, _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)))), vm));
}
#define GG_LO(v) _mm256_castsi256_si128(v)
#define GG_HI(v) _mm256_extracti128_si256(v, 1)
static inline void gg_st32_mul(__m256i q, float d, float *y) { gg_st16_mul(GG_LO(q), d, y); gg_st16_mul(GG_HI(q), d, y + 16); }
static inline void gg_st32_mul_add(__m256i q, float d, float m, float *y) {
    gg_st16_mul_add(GG_LO(q), d, m, y); gg_st16_mul_add(GG_HI(q), d, m, y + 16);
}
static inline void gg_st32_mul_sub(__m256i q, float d, float m, float *y) {
    gg_st16_mul_sub(GG_LO(q), d, m, y); gg_st16_mul_sub(GG_HI(q), d, m, y + 16);
}
/* 16 bytes -> 32 nibbles: low nibbles of bytes 0..15, then their high nibbles (the Q4_0 order) */
static inline __m256i gg_nibbles32(const uint8_t *qs) {
    __m128i raw = _mm_loadu_si128((const __m128i *)qs), m4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_and_si128(raw, m4));
}
/* byte j = 0x10 if bit j of x is set, else 0 (the 5th bit of Q5_0 / Q5_1 elements) */
static inline __m256i gg_bit4_32(uint32_t x) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), spread);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), _mm256_set1_epi8(0x10));
}
static inline int gg_dq_q4_0_simd(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += GG_Q4_0_BYTES, y += GG_QK)
        gg_st32_mul(_mm256_sub_epi8(gg_nibbles32(b + GG_Q4_0_QS), _mm256_set1_epi8(8)), gg_load_f16(b + GG_Q4_0_D),
                    y);
    return 1;
}
static inline int gg_dq_q4_1_simd(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += GG_Q4_1_BYTES, y += GG_QK)
        gg_st32_mul_add(gg_nibbles32(b + GG_Q4_1_QS), gg_load_f16(b + GG_Q4_1_D), gg_load_f16(b + GG_Q4_1_M),
                        y);
    return 1;
}
static inline int gg_dq_q5_0_simd(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += GG_Q5_0_BYTES, y += GG_QK) {
        __m256i q = _mm256_or_si256(gg_nibbles32(b + GG_Q5_0_QS), gg_bit4_32(gg_load_u32(b + GG_Q5_0_QH)));
        gg_st32_mul(_mm256_sub_epi8(q, _mm256_set1_epi8(16)), gg_load_f16(b + GG_Q5_0_D), y);
    }
    return 1;
}
static inline int gg_dq_q5_1_simd(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += GG_Q5_1_BYTES, y += GG_QK) {
        __m256i q = _mm256_or_si256(gg_nibbles32(b + GG_Q5_1_QS), gg_bit4_32(gg_load_u32(b + GG_Q5_1_QH)));
        gg_st32_mul_add(q, gg_load_f16(b + GG_Q5_1_D), gg_load_f16(b + GG_Q5_1_M), y);
    }
    return 1;
}
static inline int gg_dq_q8_0_simd(const uint8_t *b, float *y, int64_t nb) {
    /* gguf-py computes q * d; IEEE multiplication commutes, so d * q is the same float */
    for (int64_t i = 0; i < nb; i++, b += GG_Q8_0_BYTES, y += GG_QK)
        gg_st32_mul(_mm256_loadu_si256((const __m256i *)(b + GG_Q8_0_QS)), gg_load_f16(b + GG_Q8_0_D), y);
    return 1;
}
static inline int gg_dq_iq4_nl_simd(const uint8_t *b, float *y, int64_t nb) {
    const __m256i kv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)GG_KVALUES_IQ4NL));
    for (int64_t i = 0; i < nb; i++, b += GG_IQ4_NL_BYTES, y += GG_QK)
        gg_st32_mul(_mm256_shuffle_epi8(kv, gg_nibbles32(b + GG_IQ4_NL_QS)), gg_load_f16(b + GG_IQ4_NL_D), y);
    return 1;
}
static inline int gg_dq_iq4_xs_simd(const uint8_t *b, float *y, int64_t nb) {
    const __m256i kv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)GG_KVALUES_IQ4NL));
    for (int64_t i = 0; i < nb; i++, b += GG_IQ4_XS_BYTES, y += GG_QK_K) {
        float d = gg_load_f16(b + GG_IQ4_XS_D);
        uint16_t sh = gg_load_u16(b + GG_IQ4_XS_SCALES_H);
        for (int ib = 0; ib < 8; ib++)
            gg_st32_mul(_mm256_shuffle_epi8(kv, gg_nibbles32(b + GG_IQ4_XS_QS + ib * 16)),
                        d * (float)gg_iq4_xs_scale(b, sh, ib), y + ib * 32);
    }
    return 1;
}
static inline int gg_dq_q4_k_simd(const uint8_t *b, float *y, int64_t nb) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t i = 0; i < nb; i++, b += GG_Q4_K_BYTES, y += GG_QK_K) {
        float d = gg_load_f16(b + GG_Q4_K_D), dmin = gg_load_f16(b + GG_Q4_K_DMIN);
        for (int c = 0; c < 4; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(b + GG_Q4_K_QS + 32 * c));
            int sc, mn;
            gg_k_scale_min(b + GG_Q4_K_SCALES, 2 * c, &sc, &mn);
            gg_st32_mul_sub(_mm256_and_si256(raw, m4), d * (float)sc, dmin * (float)mn, y + 64 * c);
            gg_k_scale_min(b + GG_Q4_K_SCALES, 2 * c + 1, &sc, &mn);
            gg_st32_mul_sub(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), d * (float)sc, dmin * (float)mn,
                            y + 64 * c + 32);
        }
    }
    return 1;
}
static inline int gg_dq_q5_k_simd(const uint8_t *b, float *y, int64_t nb) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    for (int64_t i = 0; i < nb; i++, b += GG_Q5_K_BYTES, y += GG_QK_K) {
        float d = gg_load_f16(b + GG_Q5_K_D), dmin = gg_load_f16(b + GG_Q5_K_DMIN);
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + GG_Q5_K_QH));
        for (int j = 0; j < 8; j++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(b + GG_Q5_K_QS + 32 * (j / 2)));
            __m256i lo = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(raw, 4) : raw, m4);
            __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j)), one), 4);
            int sc, mn;
            gg_k_scale_min(b + GG_Q5_K_SCALES, j, &sc, &mn);
            gg_st32_mul_sub(_mm256_or_si256(lo, hi), d * (float)sc, dmin * (float)mn, y + 32 * j);
        }
    }
    return 1;
}
/* 16 bytes at p, shifted right by `shift` bits within each byte, masked */
static inline __m128i gg_bits16(const uint8_t *p, int shift, int mask) {
    __m128i v = _mm_srl_epi16(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128(shift));
    return _mm_and_si128(v, _mm_set1_epi8((char)mask));
}
static inline int gg_dq_q6_k_simd(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += GG_Q6_K_BYTES, y += GG_QK_K) {
        const uint8_t *ql = b + GG_Q6_K_QL, *qh = b + GG_Q6_K_QH;
        const int8_t *sc = (const int8_t *)(b + GG_Q6_K_SCALES);
        float d = gg_load_f16(b + GG_Q6_K_D);
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int sub = 0; sub < 2; sub++) {
                    __m128i lo = gg_bits16(ql + h * 64 + (s % 2) * 32 + sub * 16, 4 * (s / 2), 0x0F);
                    __m128i hi = _mm_slli_epi16(gg_bits16(qh + h * 32 + sub * 16, 2 * s, 3), 4);
                    __m128i q = _mm_sub_epi8(_mm_or_si128(lo, hi), _mm_set1_epi8(32));
                    gg_st16_mul(q, d * (float)sc[h * 8 + s * 2 + sub], y + h * 128 + s * 32 + sub * 16);
                }
    }
    return 1;
}
static inline int gg_dq_q2_k_simd(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += GG_Q2_K_BYTES, y += GG_QK_K) {
        const uint8_t *scales = b + GG_Q2_K_SCALES, *qs = b + GG_Q2_K_QS;
        float d = gg_load_f16(b + GG_Q2_K_D), dmin = gg_load_f16(b + GG_Q2_K_DMIN);
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int sub = 0; sub < 2; sub++) {
                    uint8_t sc = scales[h * 8 + s * 2 + sub];
                    gg_st16_mul_sub(gg_bits16(qs + h * 32 + sub * 16, 2 * s, 3), d * (float)(sc & 0x0F),
                                    dmin * (float)(sc >> 4), y + h * 128 + s * 32 + sub * 16);
                }
    }
    return 1;
}
static inline int gg_dq_q3_k_simd(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += GG_Q3_K_BYTES, y += GG_QK_K) {
        const uint8_t *hm = b + GG_Q3_K_HMASK, *qs = b + GG_Q3_K_QS, *scales = b + GG_Q3_K_SCALES;
        float d = gg_load_f16(b + GG_Q3_K_D);
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int sub = 0; sub < 2; sub++) {
                    __m128i q2 = gg_bits16(qs + h * 32 + sub * 16, 2 * s, 3);
                    /* minus 4 where the hmask bit is clear */
                    __m128i hb = gg_bits16(hm + sub * 16, h * 4 + s, 1);
                    __m128i q = _mm_sub_epi8(q2, _mm_slli_epi16(_mm_xor_si128(hb, _mm_set1_epi8(1)), 2));
                    gg_st16_mul(q, d * (float)gg_q3_k_scale(scales, h * 8 + s * 2 + sub),
                                y + h * 128 + s * 32 + sub * 16);
                }
    }
    return 1;
}
#else
#define GG_NO_SIMD(name) static inline int name(const uint8_t *b, float *y, int64_t nb) { (void)b; (void)y; (void)nb; return 0; }
GG_NO_SIMD(gg_dq_q4_0_simd) GG_NO_SIMD(gg_dq_q4_1_simd) GG_NO_SIMD(gg_dq_q5_0_simd) GG_NO_SIMD(gg_dq_q5_1_simd)
GG_NO_SIMD(gg_dq_q8_0_simd) GG_NO_SIMD(gg_dq_iq4_nl_simd) GG_NO_SIMD(gg_dq_iq4_xs_simd) GG_NO_SIMD(gg_dq_q4_k_simd)
GG_NO_SIMD(gg_dq_q5_k_simd) GG_NO_SIMD(gg_dq_q6_k_simd) GG_NO_SIMD(gg_dq_q2_k_simd) GG_NO_SIMD(gg_dq_q3_k_simd)
#endif

#endif
