/* One vector of floats for the NAME_vec kernels, at the width the compiler's flags give: 16 lanes
   (AVX512, NAME_avx512) or 8 (AVX2 + FMA, NAME_avx2). The kernels are written once against these
   names; on AVX512 each name is the one instruction the kernels used before they were generic.
   Vector exp, tanh and sigmoid at either width. */
#ifndef GG_SIMD_MATH_H
#define GG_SIMD_MATH_H

#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define GG_W 16
typedef __m512 gg_vf;
typedef __m512i gg_vi;
typedef __mmask16 gg_mask;  /* lanes on/off */
#define gg_loadu _mm512_loadu_ps
#define gg_storeu _mm512_storeu_ps
#define gg_set1 _mm512_set1_ps
#define gg_zero _mm512_setzero_ps
#define gg_add _mm512_add_ps
#define gg_sub _mm512_sub_ps
#define gg_mul _mm512_mul_ps
#define gg_div _mm512_div_ps
#define gg_max _mm512_max_ps
#define gg_min _mm512_min_ps
#define gg_and _mm512_and_ps
#define gg_or _mm512_or_ps
#define gg_andnot _mm512_andnot_ps
#define gg_fmadd _mm512_fmadd_ps
#define gg_fnmadd _mm512_fnmadd_ps
#define gg_reduce_add _mm512_reduce_add_ps
#define gg_reduce_max _mm512_reduce_max_ps
#define gg_seti1 _mm512_set1_epi32
#define gg_addi _mm512_add_epi32
#define gg_iota() _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#define gg_castsi_ps _mm512_castsi512_ps
/* the first n lanes (all when n >= GG_W) */
static inline gg_mask gg_first(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }
static inline gg_vf gg_maskz_loadu(gg_mask k, const float *p) { return _mm512_maskz_loadu_ps(k, p); }
static inline void gg_mask_storeu(float *p, gg_mask k, gg_vf v) { _mm512_mask_storeu_ps(p, k, v); }
static inline gg_vf gg_maskz_mov(gg_mask k, gg_vf v) { return _mm512_maskz_mov_ps(k, v); }
/* a where k is off, max(a, b) where on */
static inline gg_vf gg_mask_max(gg_vf a, gg_mask k, gg_vf b) { return _mm512_mask_max_ps(a, k, a, b); }
/* a where k is off, b · c where on */
static inline gg_vf gg_mask_mul(gg_vf a, gg_mask k, gg_vf b, gg_vf c) { return _mm512_mask_mul_ps(a, k, b, c); }
static inline gg_mask gg_lt(gg_vf a, gg_vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline gg_mask gg_mask_and(gg_mask a, gg_mask b) { return a & b; }
/* lanes with lo <= j <= hi (int32) */
static inline gg_mask gg_between(gg_vi j, gg_vi lo, gg_vi hi) {
    return _mm512_cmpge_epi32_mask(j, lo) & _mm512_cmple_epi32_mask(j, hi);
}
static inline gg_vf gg_round(gg_vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p · 2^n, n integral and exp()'s clamp keeps 2^n a normal float */
static inline gg_vf gg_scale2(gg_vf p, gg_vf n) { return _mm512_scalef_ps(p, n); }

#elif defined(__AVX2__) && defined(__FMA__)
#define GG_W 8
typedef __m256 gg_vf;
typedef __m256i gg_vi;
typedef __m256 gg_mask;  /* all ones in a lane that is on */
#define gg_loadu _mm256_loadu_ps
#define gg_storeu _mm256_storeu_ps
#define gg_set1 _mm256_set1_ps
#define gg_zero _mm256_setzero_ps
#define gg_add _mm256_add_ps
#define gg_sub _mm256_sub_ps
#define gg_mul _mm256_mul_ps
#define gg_div _mm256_div_ps
#define gg_max _mm256_max_ps
#define gg_min _mm256_min_ps
#define gg_and _mm256_and_ps
#define gg_or _mm256_or_ps
#define gg_andnot _mm256_andnot_ps
#define gg_fmadd _mm256_fmadd_ps
#define gg_fnmadd _mm256_fnmadd_ps
#define gg_seti1 _mm256_set1_epi32
#define gg_addi _mm256_add_epi32
#define gg_iota() _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
#define gg_castsi_ps _mm256_castsi256_ps
static inline gg_mask gg_first(int64_t n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n >= 8 ? 8 : n)), lanes));
}
static inline gg_vf gg_maskz_loadu(gg_mask k, const float *p) { return _mm256_maskload_ps(p, _mm256_castps_si256(k)); }
static inline void gg_mask_storeu(float *p, gg_mask k, gg_vf v) { _mm256_maskstore_ps(p, _mm256_castps_si256(k), v); }
static inline gg_vf gg_maskz_mov(gg_mask k, gg_vf v) { return _mm256_and_ps(k, v); }
static inline gg_vf gg_mask_max(gg_vf a, gg_mask k, gg_vf b) { return _mm256_blendv_ps(a, _mm256_max_ps(a, b), k); }
static inline gg_vf gg_mask_mul(gg_vf a, gg_mask k, gg_vf b, gg_vf c) { return _mm256_blendv_ps(a, _mm256_mul_ps(b, c), k); }
static inline gg_mask gg_lt(gg_vf a, gg_vf b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
static inline gg_mask gg_mask_and(gg_mask a, gg_mask b) { return _mm256_and_ps(a, b); }
static inline gg_mask gg_between(gg_vi j, gg_vi lo, gg_vi hi) {  /* !(lo > j) && !(j > hi) */
    return _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_or_si256(_mm256_cmpgt_epi32(lo, j), _mm256_cmpgt_epi32(j, hi)),
                                                   _mm256_set1_epi32(-1)));
}
static inline gg_vf gg_round(gg_vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline gg_vf gg_scale2(gg_vf p, gg_vf n) {  /* 2^n built in the exponent field */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline float gg_reduce_add(gg_vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float gg_reduce_max(gg_vf v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#else
#error "simd_math.h: build with the avx2 or avx512 flags of kernels/variants.py"
#endif

/* exp(x) for x in [-87, 88], ~1 ulp (Cephes-style: 2^n · poly(r), r = x - n ln2). */
static inline gg_vf gg_exp(gg_vf x) {
    x = gg_max(x, gg_set1(-87.0f));
    x = gg_min(x, gg_set1(88.0f));
    const gg_vf n = gg_round(gg_mul(x, gg_set1(1.44269504088896341f)));
    gg_vf r = gg_fnmadd(n, gg_set1(0.693359375f), x);
    r = gg_fnmadd(n, gg_set1(-2.12194440e-4f), r);
    gg_vf p = gg_set1(1.9875691500e-4f);
    p = gg_fmadd(p, r, gg_set1(1.3981999507e-3f));
    p = gg_fmadd(p, r, gg_set1(8.3334519073e-3f));
    p = gg_fmadd(p, r, gg_set1(4.1665795894e-2f));
    p = gg_fmadd(p, r, gg_set1(1.6666665459e-1f));
    p = gg_fmadd(p, r, gg_set1(5.0000001201e-1f));
    p = gg_fmadd(p, gg_mul(r, r), gg_add(r, gg_set1(1.0f)));
    return gg_scale2(p, n);
}

/* tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2|y|) <= 1: no overflow. */
static inline gg_vf gg_tanh(gg_vf y) {
    const gg_vf absmask = gg_castsi_ps(gg_seti1(0x7fffffff));
    const gg_vf a = gg_and(y, absmask);
    const gg_vf e = gg_exp(gg_mul(a, gg_set1(-2.0f)));
    const gg_vf t = gg_div(gg_sub(gg_set1(1.0f), e), gg_add(gg_set1(1.0f), e));
    return gg_or(t, gg_andnot(absmask, y));  /* sign of y */
}

/* sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) below, e = exp(-|x|) <= 1: no overflow. */
static inline gg_vf gg_sigmoid(gg_vf x) {
    const gg_vf absmask = gg_castsi_ps(gg_seti1(0x7fffffff));
    const gg_vf e = gg_exp(gg_sub(gg_zero(), gg_and(x, absmask)));
    const gg_vf s = gg_div(gg_set1(1.0f), gg_add(gg_set1(1.0f), e));
    return gg_mask_mul(s, gg_lt(x, gg_zero()), e, s);
}

#endif
