/* Gated FFN activations' forward on AVX512 (compiled only into activation_avx512). */
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

#endif
