/* A LoRA term's two products with its output gradient in one pass over it (compiled into lowrank_avx2
   and lowrank_avx512 from lowrank_vec.pyx; simd_math.h picks the width).

   dy (T, n) is the widest array of a LoRA backward and these products are thin (rank r columns): as
   two BLAS calls, dy·B and dyᵀ·h, each reads dy once from memory at a few FLOPs a byte. Here one
   read of each row pair of dy feeds both:
     dhp (T, r)  += dy · B      B given transposed, Bt (r, n)
     dBt (r, n)  += hᵀ · dy     h (T, r); dB's transpose, so a row of it is contiguous in columns
   over the columns c0 .. c1 of dy only (a thread's share: dBt's columns are the thread's own, dhp is
   the thread's partial sums over its columns). Accumulation is f32. */
#ifndef GG_LOWRANK_UTIL_H
#define GG_LOWRANK_UTIL_H

#include <stdint.h>

#include "simd_math.h"

enum { GG_LR_J = 4 };  /* rank columns a pass (r is a multiple of it): 2 rows × 4 sums and the 2 × 4
                          broadcast h values stay in registers, no load but dy's, B's and dBt's */
enum { GG_LR_CC = 512 };  /* columns a block: 4 rows of dBt, 8 KiB, stay in L1 over all the rows */

/* rank column j of the pass: the dh sums of both rows, and dBt's row j updated in place (LD, ST: the
   whole-vector or the masked tail's load and store) */
#define GG_LR_COL(j, LD, ST)                                                                             \
    do {                                                                                                 \
        const gg_vf b = LD(bt + (j) * ldb + c);                                                          \
        a0##j = gg_fmadd(v0, b, a0##j);                                                                  \
        a1##j = gg_fmadd(v1, b, a1##j);                                                                  \
        float *d = dbt + (j) * ldbt + c;                                                                 \
        ST(d, gg_fmadd(v1, g1##j, gg_fmadd(v0, g0##j, LD(d))));                                           \
    } while (0)
#define GG_LR_STEP(LD, ST)                                                                               \
    do {                                                                                                 \
        const gg_vf v0 = LD(y0 + c), v1 = LD(y1 + c);                                                    \
        GG_LR_COL(0, LD, ST); GG_LR_COL(1, LD, ST); GG_LR_COL(2, LD, ST); GG_LR_COL(3, LD, ST);          \
    } while (0)
#define GG_LR_LDK(p) gg_maskz_loadu(k, (p))
#define GG_LR_STK(p, v) gg_mask_storeu((p), k, (v))

static void gg_lowrank_dy(const float *dy, int64_t ldy, int64_t T, const float *Bt, int64_t ldb, const float *h,
                          int64_t ldh, int r, float *dhp, int64_t ldp, float *dBt, int64_t ldbt, int64_t c0,
                          int64_t c1) {
    for (int64_t cb = c0; cb < c1; cb += GG_LR_CC)
    for (int jb = 0; jb < r; jb += GG_LR_J) {  /* dy's block of 2 rows is read again from L1 each pass */
        const float *bt = Bt + (int64_t)jb * ldb;
        float *dbt = dBt + (int64_t)jb * ldbt;
        const int64_t ce = cb + GG_LR_CC < c1 ? cb + GG_LR_CC : c1;
        for (int64_t t = 0; t < T; t += 2) {
            const int two = t + 1 < T;
            const float *y0 = dy + t * ldy, *y1 = dy + (t + two) * ldy;  /* row t again without a t + 1 */
            const float *h0 = h + t * ldh + jb, *h1 = h + (t + two) * ldh + jb;  /* ... at h 0 */
            const gg_vf g00 = gg_set1(h0[0]), g01 = gg_set1(h0[1]), g02 = gg_set1(h0[2]), g03 = gg_set1(h0[3]);
            const gg_vf g10 = two ? gg_set1(h1[0]) : gg_zero(), g11 = two ? gg_set1(h1[1]) : gg_zero(),
                        g12 = two ? gg_set1(h1[2]) : gg_zero(), g13 = two ? gg_set1(h1[3]) : gg_zero();
            gg_vf a00 = gg_zero(), a01 = gg_zero(), a02 = gg_zero(), a03 = gg_zero();
            gg_vf a10 = gg_zero(), a11 = gg_zero(), a12 = gg_zero(), a13 = gg_zero();
            int64_t c = cb;
            for (; c + GG_W <= ce; c += GG_W) GG_LR_STEP(gg_loadu, gg_storeu);
            if (c < ce) {
                const gg_mask k = gg_first(ce - c);
                GG_LR_STEP(GG_LR_LDK, GG_LR_STK);
            }
            const gg_vf s0[GG_LR_J] = {a00, a01, a02, a03};
            const gg_vf s1[GG_LR_J] = {a10, a11, a12, a13};
            for (int j = 0; j < GG_LR_J; j++) {
                dhp[t * ldp + jb + j] += gg_reduce_add(s0[j]);
                if (two) dhp[(t + 1) * ldp + jb + j] += gg_reduce_add(s1[j]);
            }
        }
    }
}

#undef GG_LR_COL
#undef GG_LR_STEP
#undef GG_LR_LDK
#undef GG_LR_STK

#endif
