/* One row of a cross-entropy vocabulary chunk, one vector of GG_W floats at a time (compiled into
   loss_avx2 and loss_avx512 from loss_vec.pyx; simd_math.h picks the width). */
#ifndef GG_LOSS_UTIL_H
#define GG_LOSS_UTIL_H

#include <math.h>
#include <stdint.h>

#include "simd_math.h"

/* row (c floats): capped in place when softcap > 0 (so the target logit reads the capped value);
   *m = max, *s = Σ exp(row - max). */
static void gg_ce_row(float *row, int64_t c, float softcap, double *m, double *s) {
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
    const float mx = gg_reduce_max(vmax);
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

#endif
