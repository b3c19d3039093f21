/* f32 -> bf16 rounding (round to nearest even), AVX512F integer arithmetic only: the one rounding
   of every bf16 product's inputs, shared by the bf16 kernels (bf16mm_util.h) and the cross-entropy
   kernel that hands the head's backward its already rounded gradient (loss_util.h). */
#ifndef GG_BF16_ROUND_H
#define GG_BF16_ROUND_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* One value: add 0x7fff plus the lowest kept bit, keep the top half (ties go to the even half; a
   finite value past the largest bf16 rounds to inf, as IEEE rounding does). NaN stays NaN: the
   top half with the quiet bit set (rounding could carry a NaN's payload into an infinity). */
static inline uint16_t gg_bf16_round1(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* 16 values, the same integer arithmetic (exact for denormals too, which vcvtneps2bf16 flushes) */
static inline __m256i gg_bf16_round16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* n floats -> n bf16; with pad, one more 0 after them (the pad column of an odd K) */
static inline void gg_bf16_round_row(const float *x, uint16_t *y, int64_t n, int pad) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(y + i), gg_bf16_round16(_mm512_loadu_ps(x + i)));
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(y + i, m, gg_bf16_round16(_mm512_maskz_loadu_ps(m, x + i)));
    }
    if (pad) y[n] = 0;
}

#endif
