/* One row of a cross-entropy vocabulary chunk on AVX512 (compiled only into loss_avx512). */
#ifndef GG_LOSS_UTIL_H
#define GG_LOSS_UTIL_H

#include <math.h>
#include <stdint.h>

#include "avx512_math.h"
#include "bf16_round.h"

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

/* One row of the training cross-entropy's fused chunk (loss.py's _ce_fused_chunk, same contract):
   z = softcap·tanh(row / softcap) (row itself without a cap), M = max(*run_max, max z); the row
   becomes e = exp(z - M)·z' (z' = 1 - (z / softcap)², 1 without a cap), written over row in f32 or,
   with out16, to out16 as bf16 (rounded as the bf16 products round their inputs: the head's
   backward then reads it as given). *tgt = z[j] when 0 <= j < c; *run_sum, *run_max updated;
   *rescale = exp(M_old - M) for the caller's gradient accumulator. Σ e is summed in f64. */
static void gg_ce_fused_row(float *row, int64_t c, float softcap, int64_t j, double *run_max, double *run_sum,
                            double *tgt, double *rescale, uint16_t *out16) {
    const __m512 cap = _mm512_set1_ps(softcap), one = _mm512_set1_ps(1.0f);
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
    if (0 <= j && j < c) *tgt = row[j];
    const double mo = *run_max, m = _mm512_reduce_max_ps(vmax), M = m > mo ? m : mo;
    const __m512 vm = _mm512_set1_ps((float)M);
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    for (int64_t v = 0; v < c; v += 16) {
        const __mmask16 k = c - v >= 16 ? 0xFFFF : (__mmask16)((1u << (c - v)) - 1);
        const __m512 z = _mm512_maskz_loadu_ps(k, row + v);
        __m512 e = _mm512_maskz_mov_ps(k, gg_exp512(_mm512_sub_ps(z, vm)));
        s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
        if (softcap > 0.0f) {
            const __m512 r = _mm512_div_ps(z, cap);
            e = _mm512_mul_ps(e, _mm512_fnmadd_ps(r, r, one));
        }
        if (out16)
            _mm256_mask_storeu_epi16(out16 + v, k, gg_bf16_round16(e));
        else
            _mm512_mask_storeu_ps(row + v, k, e);
    }
    const double sc = exp(mo - M);  /* 0 on the first chunk (mo = -inf) */
    *run_sum = *run_sum * sc + _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    *run_max = M;
    *rescale = sc;
}

#endif
