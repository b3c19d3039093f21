/* Gated FFN activations' forward and backward on AVX512 (compiled only into activation_avx512). */
#ifndef GG_ACTIVATION_UTIL_H
#define GG_ACTIVATION_UTIL_H

#include <stdint.h>

#include "avx512_math.h"

/* y = gelu_tanh(g) · u = ½ g (1 + tanh(√(2/π) (g + 0.044715 g³))) · u, n elements. */
static void gg_geglu_fwd(const float *g, const float *u, float *y, int64_t n) {
    const __m512 c = _mm512_set1_ps(0.79788456080286535588f), a = _mm512_set1_ps(0.044715f);
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 z = _mm512_mul_ps(c, _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_mul_ps(a, x), x, one)));
        const __m512 t = gg_tanh512(z);
        const __m512 r = _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, t));
        _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(r, _mm512_maskz_loadu_ps(k, u + i)));
    }
}

/* y = silu(g) · u = g · sigmoid(g) · u, n elements. */
static void gg_swiglu_fwd(const float *g, const float *u, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 r = _mm512_mul_ps(x, gg_sigmoid512(x));
        _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(r, _mm512_maskz_loadu_ps(k, u + i)));
    }
}

/* GeGLU backward: dg = dy · u · gelu'(g), du = dy · gelu(g), n elements, with t = tanh(z),
   z = √(2/π) (g + 0.044715 g³): gelu'(g) = ½ (1 + t) + ½ g (1 - t²) √(2/π) (1 + 3·0.044715 g²). */
static void gg_geglu_bwd(const float *dy, const float *g, const float *u, float *dg, float *du, int64_t n) {
    const __m512 c = _mm512_set1_ps(0.79788456080286535588f), a = _mm512_set1_ps(0.044715f);
    const __m512 a3 = _mm512_set1_ps(3.0f * 0.044715f);
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 x2 = _mm512_mul_ps(x, x);
        const __m512 t = gg_tanh512(_mm512_mul_ps(c, _mm512_mul_ps(x, _mm512_fmadd_ps(a, x2, one))));
        const __m512 hx = _mm512_mul_ps(half, x);
        const __m512 opt = _mm512_add_ps(one, t);
        const __m512 dgelu = _mm512_fmadd_ps(half, opt, _mm512_mul_ps(_mm512_mul_ps(hx, _mm512_fnmadd_ps(t, t, one)),
                                                                   _mm512_mul_ps(c, _mm512_fmadd_ps(a3, x2, one))));
        const __m512 d = _mm512_maskz_loadu_ps(k, dy + i);
        _mm512_mask_storeu_ps(dg + i, k, _mm512_mul_ps(_mm512_mul_ps(d, _mm512_maskz_loadu_ps(k, u + i)), dgelu));
        _mm512_mask_storeu_ps(du + i, k, _mm512_mul_ps(d, _mm512_mul_ps(hx, opt)));
    }
}

/* SwiGLU backward: s = sigmoid(g): dg = dy · u · s (1 + g (1 - s)), du = dy · g · s, n elements. */
static void gg_swiglu_bwd(const float *dy, const float *g, const float *u, float *dg, float *du, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 s = gg_sigmoid512(x);
        const __m512 d = _mm512_maskz_loadu_ps(k, dy + i);
        const __m512 ds = _mm512_mul_ps(s, _mm512_fmadd_ps(x, _mm512_sub_ps(one, s), one));
        _mm512_mask_storeu_ps(dg + i, k, _mm512_mul_ps(_mm512_mul_ps(d, _mm512_maskz_loadu_ps(k, u + i)), ds));
        _mm512_mask_storeu_ps(du + i, k, _mm512_mul_ps(d, _mm512_mul_ps(x, s)));
    }
}

#endif
