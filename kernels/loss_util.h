/* One row of a cross-entropy vocabulary chunk on AVX512 (compiled only into loss_avx512). */
#ifndef GG_LOSS_UTIL_H
#define GG_LOSS_UTIL_H

#include <math.h>
#include <stdint.h>

#include "avx512_math.h"

/* row (c floats): capped in place when softcap > 0 (so the target logit reads the capped value);
   *m = max, *s = Σ exp(row - max). */
static void gg_ce_row(float *row, int64_t c, float softcap, double *m, double *s) {
    const __m512 cap = _mm512_set1_ps(softcap);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t v = 0; v < c; v += 16) {
        const __mmask16 k = c - v >= 16 ? 0xFFFF : (__mmask16)((1u << (c - v)) - 1);
        __m512 z = _mm512_maskz_loadu_ps(k, row + v);
        if (softcap > 0.0f) {
            z = _mm512_mul_ps(cap, gg_tanh512(_mm512_div_ps(z, cap)));
            _mm512_mask_storeu_ps(row + v, k, z);
        }
        vmax = _mm512_mask_max_ps(vmax, k, vmax, z);
    }
    const float mx = _mm512_reduce_max_ps(vmax);
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t v = 0; v < c; v += 16) {
        const __mmask16 k = c - v >= 16 ? 0xFFFF : (__mmask16)((1u << (c - v)) - 1);
        const __m512 e = gg_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + v), vm));
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
    }
    *m = mx;
    *s = _mm512_reduce_add_ps(acc);
}

/* (*mx, *sm) := the running (max, Σexp) with a part's (m, s) merged in (*mx may be -inf). */
static inline void gg_lse_merge(double *mx, double *sm, double m, double s) {
    if (m > *mx) {
        *sm = *sm * exp(*mx - m) + s;
        *mx = m;
    } else {
        *sm = *sm + s * exp(m - *mx);
    }
}

#endif
