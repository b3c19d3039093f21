/* Gated FFN activations' forward and backward, one vector of GG_W floats at a time (compiled into
   activation_avx2 and activation_avx512 from activation_vec.pyx; simd_math.h picks the width). */
#ifndef GG_ACTIVATION_UTIL_H
#define GG_ACTIVATION_UTIL_H

#include <stdint.h>

#include "simd_math.h"

/* y = gelu_tanh(g) · u = ½ g (1 + tanh(√(2/π) (g + 0.044715 g³))) · u, n elements. */
static void gg_geglu_fwd(const float *g, const float *u, float *y, int64_t n) {
    const gg_vf c = gg_set1(0.79788456080286535588f), a = gg_set1(0.044715f);
    const gg_vf half = gg_set1(0.5f), one = gg_set1(1.0f);
    for (int64_t i = 0; i < n; i += GG_W) {
        const gg_mask k = gg_first(n - i);
        const gg_vf x = gg_maskz_loadu(k, g + i);
        const gg_vf z = gg_mul(c, gg_mul(x, gg_fmadd(gg_mul(a, x), x, one)));
        const gg_vf t = gg_tanh(z);
        const gg_vf r = gg_mul(gg_mul(half, x), gg_add(one, t));
        gg_mask_storeu(y + i, k, gg_mul(r, gg_maskz_loadu(k, u + i)));
    }
}

/* y = silu(g) · u = g · sigmoid(g) · u, n elements. */
static void gg_swiglu_fwd(const float *g, const float *u, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += GG_W) {
        const gg_mask k = gg_first(n - i);
        const gg_vf x = gg_maskz_loadu(k, g + i);
        const gg_vf r = gg_mul(x, gg_sigmoid(x));
        gg_mask_storeu(y + i, k, gg_mul(r, gg_maskz_loadu(k, u + i)));
    }
}

/* GeGLU backward: dg = dy · u · gelu'(g), du = dy · gelu(g), n elements, with t = tanh(z),
   z = √(2/π) (g + 0.044715 g³): gelu'(g) = ½ (1 + t) + ½ g (1 - t²) √(2/π) (1 + 3·0.044715 g²). */
static void gg_geglu_bwd(const float *dy, const float *g, const float *u, float *dg, float *du, int64_t n) {
    const gg_vf c = gg_set1(0.79788456080286535588f), a = gg_set1(0.044715f);
    const gg_vf a3 = gg_set1(3.0f * 0.044715f);
    const gg_vf half = gg_set1(0.5f), one = gg_set1(1.0f);
    for (int64_t i = 0; i < n; i += GG_W) {
        const gg_mask k = gg_first(n - i);
        const gg_vf x = gg_maskz_loadu(k, g + i);
        const gg_vf x2 = gg_mul(x, x);
        const gg_vf t = gg_tanh(gg_mul(c, gg_mul(x, gg_fmadd(a, x2, one))));
        const gg_vf hx = gg_mul(half, x);
        const gg_vf opt = gg_add(one, t);
        const gg_vf dgelu = gg_fmadd(half, opt, gg_mul(gg_mul(hx, gg_fnmadd(t, t, one)),
                                                      gg_mul(c, gg_fmadd(a3, x2, one))));
        const gg_vf d = gg_maskz_loadu(k, dy + i);
        gg_mask_storeu(dg + i, k, gg_mul(gg_mul(d, gg_maskz_loadu(k, u + i)), dgelu));
        gg_mask_storeu(du + i, k, gg_mul(d, gg_mul(hx, opt)));
    }
}

/* SwiGLU backward: s = sigmoid(g): dg = dy · u · s (1 + g (1 - s)), du = dy · g · s, n elements. */
static void gg_swiglu_bwd(const float *dy, const float *g, const float *u, float *dg, float *du, int64_t n) {
    const gg_vf one = gg_set1(1.0f);
    for (int64_t i = 0; i < n; i += GG_W) {
        const gg_mask k = gg_first(n - i);
        const gg_vf x = gg_maskz_loadu(k, g + i);
        const gg_vf s = gg_sigmoid(x);
        const gg_vf d = gg_maskz_loadu(k, dy + i);
        const gg_vf ds = gg_mul(s, gg_fmadd(x, gg_sub(one, s), one));
        gg_mask_storeu(dg + i, k, gg_mul(gg_mul(d, gg_maskz_loadu(k, u + i)), ds));
        gg_mask_storeu(du + i, k, gg_mul(d, gg_mul(x, s)));
    }
}

#endif
