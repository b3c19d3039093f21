/* int8 matrix-vector products over GGUF weights with AVX512-VNNI (compiled only into int8mv_avx512):
   the few-token case of int8_util.h (decoding: one token a step), where its 16-token tiles would be
   15/16 padding.

   Same numbers as int8_util.h's: each token quantized per group of G (xs = max|x|/127, q = rint(x/xs)),
   each weight row rewritten exactly as w = s·q + o per group (gg_i8_weight_row), then
       y = Σ_g s[g]·xs[g]·Σ q·xq + o[g]·xs[g]·Σ xq
   Only the integer dot differs in form: signed × signed through vpdpbusd as |xq| × (q with x's sign),
   64 products per instruction, and the per-group scales applied per int32 lane (lane l of a 64-byte
   chunk belongs to group l / (G/4)), so a row is one pass over its bytes with no horizontal sums
   until the end. A row is converted once (into L1) and used for every token; its scale buffers must
   be zero past n/G (the caller clears them once).
   (q = -128 would not negate; no GGUF quantizer writes it: Q8_0 quants are rint(x·127/max|x|).)
*/
#ifndef GG_INT8MV_UTIL_H
#define GG_INT8MV_UTIL_H

#include "int8_util.h"

/* gg_i8_weight_row with the conversions of the common decoding types in AVX512 (the bytes it writes
   are the same): Q4_0, Q5_0, Q8_0, Q4_K and Q6_K, a block's 32 quants a ymm at a time; the other types
   take gg_i8_weight_row's loops. */
static inline __m256i mv_nibbles(const uint8_t *qs) {  /* 16 bytes -> [low nibbles, high nibbles] */
    const __m128i v = _mm_loadu_si128((const __m128i *)qs), m = _mm_set1_epi8(15);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(v, m)),
                                   _mm_and_si128(_mm_srli_epi16(v, 4), m), 1);
}

static int gg_mv_weight_row(int qtype, const uint8_t *b, int64_t nb, int8_t *q, float *s, float *o) {
    int64_t i;
    const __m256i m4 = _mm256_set1_epi8(15);
    switch (qtype) {
    case GG_TYPE_Q4_0:
        for (i = 0; i < nb; i++, b += GG_Q4_0_BYTES, q += GG_QK) {
            s[i] = gg_load_f16(b + GG_Q4_0_D);
            _mm256_storeu_si256((__m256i *)q, _mm256_sub_epi8(mv_nibbles(b + GG_Q4_0_QS), _mm256_set1_epi8(8)));
        }
        return 0;
    case GG_TYPE_Q5_0:
        for (i = 0; i < nb; i++, b += GG_Q5_0_BYTES, q += GG_QK) {
            s[i] = gg_load_f16(b + GG_Q5_0_D);
            const __m256i hb = _mm256_maskz_mov_epi8((__mmask32)gg_load_u32(b + GG_Q5_0_QH), _mm256_set1_epi8(16));
            _mm256_storeu_si256((__m256i *)q, _mm256_sub_epi8(_mm256_or_si256(mv_nibbles(b + GG_Q5_0_QS), hb),
                                                              _mm256_set1_epi8(16)));
        }
        return 0;
    case GG_TYPE_Q8_0:
        for (i = 0; i < nb; i++, b += GG_Q8_0_BYTES, q += GG_QK) {
            s[i] = gg_load_f16(b + GG_Q8_0_D);
            _mm256_storeu_si256((__m256i *)q, _mm256_loadu_si256((const __m256i *)(b + GG_Q8_0_QS)));
        }
        return 0;
    case GG_TYPE_Q4_K:
        for (i = 0; i < nb; i++, b += GG_Q4_K_BYTES, q += GG_QK_K, s += 8, o += 8) {
            const float d = gg_load_f16(b + GG_Q4_K_D), dmin = gg_load_f16(b + GG_Q4_K_DMIN);
            for (int j = 0; j < 8; j++) {
                int scale, mn;
                gg_k_scale_min(b + GG_Q4_K_SCALES, j, &scale, &mn);
                s[j] = d * (float)scale;
                o[j] = -(dmin * (float)mn);
            }
            for (int jj = 0; jj < 4; jj++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(b + GG_Q4_K_QS + jj * 32));
                _mm256_storeu_si256((__m256i *)(q + 64 * jj), _mm256_and_si256(v, m4));
                _mm256_storeu_si256((__m256i *)(q + 64 * jj + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
            }
        }
        return 0;
    case GG_TYPE_Q6_K:
        for (i = 0; i < nb; i++, b += GG_Q6_K_BYTES, q += GG_QK_K, s += 16) {
            const float d = gg_load_f16(b + GG_Q6_K_D);
            const int8_t *sc = (const int8_t *)(b + GG_Q6_K_SCALES);
            _mm512_storeu_ps(s, _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)sc)))));
            const __m256i m2 = _mm256_set1_epi8(3), m32 = _mm256_set1_epi8(32);
            for (int h = 0; h < 2; h++) {
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + GG_Q6_K_QH + h * 32));
                const __m256i l0 = _mm256_loadu_si256((const __m256i *)(b + GG_Q6_K_QL + h * 64));
                const __m256i l1 = _mm256_loadu_si256((const __m256i *)(b + GG_Q6_K_QL + h * 64 + 32));
                const __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                                       _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                       _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
                const __m256i hi[4] = {_mm256_and_si256(qh, m2), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2),
                                       _mm256_and_si256(_mm256_srli_epi16(qh, 4), m2),
                                       _mm256_and_si256(_mm256_srli_epi16(qh, 6), m2)};
                for (int sh = 0; sh < 4; sh++)
                    _mm256_storeu_si256((__m256i *)(q + h * 128 + sh * 32),
                                        _mm256_sub_epi8(_mm256_or_si256(lo[sh], _mm256_slli_epi16(hi[sh], 4)), m32));
            }
        }
        return 0;
    default:
        return gg_i8_weight_row(qtype, b, nb, q, s, o);
    }
}

/* One token: x (n floats) -> ax (|xq| as bytes, n rounded up to 64, zero-padded), neg (sign bits of
   xq, one mask per 64 bytes), xs[g] (4 zeros past the last group), xsum[g] = xs·Σxq. */
static void gg_mv_quantize(const float *x, int64_t n, int G, uint8_t *ax, __mmask64 *neg, float *xs,
                           float *xsum) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const int64_t nc = (n + 63) / 64;
    memset(ax + (nc - 1) * 64, 0, 64);
    for (int64_t g = 0; g < n / G; g++) {
        const float *xg = x + g * G;
        __m512 v0 = _mm512_loadu_ps(xg), v1 = G == 32 ? _mm512_loadu_ps(xg + 16) : _mm512_setzero_ps();
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, absmask), _mm512_and_ps(v1, absmask)));
        float d = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));  /* MXCSR default: nearest-even */
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
        _mm_storeu_si128((__m128i *)(ax + g * G), _mm512_cvtepi32_epi8(q0));
        if (G == 32) _mm_storeu_si128((__m128i *)(ax + g * G + 16), _mm512_cvtepi32_epi8(q1));
        int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        xs[g] = d;
        xsum[g] = d * (float)sum;
    }
    for (int64_t g = n / G; g < n / G + 4; g++) xs[g] = 0.0f;  /* the last chunk's missing groups */
    for (int64_t c = 0; c < nc; c++) {  /* signed bytes -> magnitudes and sign masks */
        const __m512i v = _mm512_loadu_si512((const void *)(ax + c * 64));
        neg[c] = _mm512_movepi8_mask(v);
        _mm512_storeu_si512((void *)(ax + c * 64), _mm512_abs_epi8(v));
    }
}

/* y[t] for one converted row (q: n bytes, padded to 64; s, o per group, zero past n/G) and token t's
   quantized form. The row was just written in 32-byte stores and scalar scales: it is read back the
   same way (two 32-byte loads a chunk, scalar scales broadcast), so every load is forwarded from its
   store instead of waiting for wider loads to see several stores retire. */
static inline float gg_mv_dot(int G, int has_off, int64_t n, const int8_t *q, const float *s, const float *o,
                              const uint8_t *ax, const __mmask64 *neg, const float *xs, const float *xsum) {
    const int64_t ng = n / G, nc = (n + 63) / 64;
    const __m512i idx16 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; c++) {
        __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(q + c * 64))),
                                       _mm256_loadu_si256((const __m256i *)(q + c * 64 + 32)), 1);
        w = _mm512_mask_sub_epi8(w, neg[c], zero, w);
        const __m512i d = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512((const void *)(ax + c * 64)), w);
        __m512 lsc;
        if (G == 32)  /* lanes 0-7: group 2c, 8-15: group 2c+1 */
            lsc = _mm512_insertf32x8(_mm512_set1_ps(s[2 * c] * xs[2 * c]),
                                     _mm256_set1_ps(s[2 * c + 1] * xs[2 * c + 1]), 1);
        else  /* four lanes a group */
            lsc = _mm512_permutexvar_ps(idx16, _mm512_castps128_ps512(
                _mm_mul_ps(_mm_loadu_ps(s + 4 * c), _mm_loadu_ps(xs + 4 * c))));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), lsc, acc);
    }
    float r = _mm512_reduce_add_ps(acc);
    if (has_off) {
        __m512 oacc = _mm512_setzero_ps();
        int64_t g = 0;
        for (; g + 16 <= ng; g += 16)
            oacc = _mm512_fmadd_ps(_mm512_loadu_ps(o + g), _mm512_loadu_ps(xsum + g), oacc);
        r += _mm512_reduce_add_ps(oacc);
        for (; g < ng; g++) r += o[g] * xsum[g];
    }
    return r;
}

#endif
