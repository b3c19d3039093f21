/* One row of a cross-entropy vocabulary chunk, one vector of GG_W floats at a time (compiled into
   loss_avx2 and loss_avx512 from loss_vec.pyx; simd_math.h picks the width). */
#ifndef GG_LOSS_UTIL_H
#define GG_LOSS_UTIL_H

#include <math.h>
#include <stdint.h>

#include "simd_math.h"
#if GG_W == 16
#include "bf16_round.h"  /* the bf16 products (and so a bf16 gradient for them) exist on AVX512 only */
#endif

/* row (c floats) capped in place when softcap > 0 (so the target logit reads the capped value);
   returns its max. */
static float gg_ce_cap_max(float *row, int64_t c, float softcap) {
    const gg_vf cap = gg_set1(softcap);
    gg_vf vmax = gg_set1(-INFINITY);
    for (int64_t v = 0; v < c; v += GG_W) {
        const gg_mask k = gg_first(c - v);
        gg_vf z = gg_maskz_loadu(k, row + v);
        if (softcap > 0.0f) {
            z = gg_mul(cap, gg_tanh(gg_div(z, cap)));
            gg_mask_storeu(row + v, k, z);
        }
        vmax = gg_mask_max(vmax, k, z);
    }
    return gg_reduce_max(vmax);
}

/* row (c floats): capped in place when softcap > 0; *m = max, *s = Σ exp(row - max). */
static void gg_ce_row(float *row, int64_t c, float softcap, double *m, double *s) {
    const float mx = gg_ce_cap_max(row, c, softcap);
    const gg_vf vm = gg_set1(mx);
    gg_vf acc = gg_zero();
    for (int64_t v = 0; v < c; v += GG_W) {
        const gg_mask k = gg_first(c - v);
        const gg_vf e = gg_exp(gg_sub(gg_maskz_loadu(k, row + v), vm));
        acc = gg_add(acc, gg_maskz_mov(k, e));
    }
    *m = mx;
    *s = gg_reduce_add(acc);
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
   with out16 (AVX512 builds only), to out16 as bf16 (rounded as the bf16 products round their
   inputs: the head's backward then reads it as given). *tgt = z[j] when 0 <= j < c; *run_sum,
   *run_max updated; *rescale = exp(M_old - M) for the caller's gradient accumulator. Σ e: f32 sums
   of 64 vectors at a time, added in f64. */
static void gg_ce_fused_row(float *row, int64_t c, float softcap, int64_t j, double *run_max, double *run_sum,
                            double *tgt, double *rescale, uint16_t *out16) {
    const gg_vf cap = gg_set1(softcap), one = gg_set1(1.0f);
    const double m = gg_ce_cap_max(row, c, softcap), mo = *run_max, M = m > mo ? m : mo;
    if (0 <= j && j < c) *tgt = row[j];
    const gg_vf vm = gg_set1((float)M);
    double s = 0.0;
    for (int64_t b = 0; b < c; b += 64 * GG_W) {
        const int64_t be = c - b < 64 * GG_W ? c : b + 64 * GG_W;
        gg_vf acc = gg_zero();
        for (int64_t v = b; v < be; v += GG_W) {
            const gg_mask k = gg_first(c - v);
            const gg_vf z = gg_maskz_loadu(k, row + v);
            gg_vf e = gg_maskz_mov(k, gg_exp(gg_sub(z, vm)));
            acc = gg_add(acc, e);
            if (softcap > 0.0f) {
                const gg_vf r = gg_div(z, cap);
                e = gg_mul(e, gg_fnmadd(r, r, one));
            }
#if GG_W == 16
            if (out16) {
                _mm256_mask_storeu_epi16(out16 + v, k, gg_bf16_round16(e));
                continue;
            }
#endif
            gg_mask_storeu(row + v, k, e);
        }
        s += gg_reduce_add(acc);
    }
    const double sc = exp(mo - M);  /* 0 on the first chunk (mo = -inf) */
    *run_sum = *run_sum * sc + s;
    *run_max = M;
    *rescale = sc;
}

#endif
