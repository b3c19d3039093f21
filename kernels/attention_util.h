/* Causal GQA attention forward and backward in f32, one vector of GG_W floats at a time (compiled into
   attention_avx2 and attention_avx512 from attention_vec.pyx; simd_math.h picks the width).

   The same function as attention.py's _attn_fwd (see its docstring for the masking rules), with
   our own register-blocked products instead of BLAS calls: one task is AT_ROWS query rows of one
   head; keys are GG_W to a vector, from a transposed copy of K (D, Tp) per kv head (Tp a multiple
   of 16). AT_ROWS rows × 2 vectors of accumulators fit the registers: 16 on AVX2, 32 on AVX512.

     S[r, j] = scale · q_r·k_j  (softcap: softcap · tanh(S / softcap)), j in [jlo, i1)
     p = exp(S - max) on the visible keys, 0 elsewhere;  o_r = Σ_j p_rj v_j / Σ_j p_rj
     lse[h, i] = max + log Σ p
*/
#ifndef GG_ATTENTION_UTIL_H
#define GG_ATTENTION_UTIL_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "simd_math.h"

#define AT_ROWS (GG_W == 16 ? 8 : 6)

/* Columns j0..j0+15 of kt (D, Tp) = k[j, g, :] for kv head g; k (T, Hkv, D); columns >= T zero.
   16 keys at a time: their 16 rows of k stay in L1 while all D rows of kt get them. */
static void gg_at_transpose_keys(const float *k, int64_t T, int64_t Hkv, int64_t D, int64_t g, int64_t j0,
                                 int64_t Tp, float *kt) {
    for (int64_t d = 0; d < D; d++)
        for (int64_t j = j0; j < j0 + 16; j++) kt[d * Tp + j] = j < T ? k[(j * Hkv + g) * D + d] : 0.0f;
}

/* One task: query rows i0..i1-1 (i1 - i0 <= AT_ROWS) of head h. q (T, Hq, D), kt (D, Tp) of kv
   head g, v (T, Hkv, Dv), lo (T,) first visible key; o (T, Hq, Dv), lse (Hq, T).
   s: scratch of AT_ROWS · (Tp + 32) floats. */
static void gg_at_task(const float *q, const float *kt, const float *v, const int32_t *lo, int64_t T,
                       int64_t Tp, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t h, int64_t g,
                       int64_t i0, int64_t i1, float scale, float softcap, float *s, float *o, float *lse) {
    const int64_t rows = i1 - i0;
    const int64_t jlo = (lo[i0] / 16) * 16;          /* first key column, vector aligned */
    const int64_t nk = ((i1 - jlo + 2 * GG_W - 1) / (2 * GG_W)) * (2 * GG_W);  /* key columns, whole pairs of vectors */
    const int64_t ls = Tp + 32;                      /* row stride of s */
    const float *qr[AT_ROWS];
    for (int r = 0; r < AT_ROWS; r++) qr[r] = q + ((i0 + (r < rows ? r : rows - 1)) * Hq + h) * D;

    /* S = scale · Q Kᵀ, AT_ROWS rows × 2 vectors of keys at a time */
    for (int64_t c = 0; c < nk; c += 2 * GG_W) {
        gg_vf acc[AT_ROWS][2];
        for (int r = 0; r < AT_ROWS; r++) acc[r][0] = acc[r][1] = gg_zero();
        const float *kc = kt + jlo + c;
        const int two = jlo + c + GG_W < Tp;  /* the second vector lies inside kt's padded rows */
        for (int64_t d = 0; d < D; d++) {
            const gg_vf k0 = gg_loadu(kc + d * Tp);
            const gg_vf k1 = two ? gg_loadu(kc + d * Tp + GG_W) : gg_zero();
            for (int r = 0; r < AT_ROWS; r++) {
                const gg_vf qb = gg_set1(qr[r][d]);
                acc[r][0] = gg_fmadd(qb, k0, acc[r][0]);
                acc[r][1] = gg_fmadd(qb, k1, acc[r][1]);
            }
        }
        const gg_vf sc = gg_set1(scale);
        for (int r = 0; r < AT_ROWS; r++) {
            gg_storeu(s + r * ls + c, gg_mul(acc[r][0], sc));
            gg_storeu(s + r * ls + c + GG_W, gg_mul(acc[r][1], sc));
        }
    }

    /* masked softmax per row (unnormalized p; 1/den applied to o) */
    float inv_den[AT_ROWS];
    const gg_vi iota = gg_iota();
    for (int r = 0; r < AT_ROWS; r++) {
        float *sr = s + r * ls;
        if (r >= rows) {
            for (int64_t c = 0; c < nk; c += GG_W) gg_storeu(sr + c, gg_zero());
            inv_den[r] = 0.0f;
            continue;
        }
        const int64_t i = i0 + r;
        const gg_vi vlo = gg_seti1((int)lo[i]), vhi = gg_seti1((int)i);
        gg_vf vmax = gg_set1(-INFINITY);
        for (int64_t c = 0; c < nk; c += GG_W) {
            const gg_mask vis = gg_between(gg_addi(gg_seti1((int)(jlo + c)), iota), vlo, vhi);
            gg_vf z = gg_loadu(sr + c);
            if (softcap > 0.0f) {
                const gg_vf cap = gg_set1(softcap);
                z = gg_mul(cap, gg_tanh(gg_div(z, cap)));
                gg_storeu(sr + c, z);
            }
            vmax = gg_mask_max(vmax, vis, z);
        }
        const float m = gg_reduce_max(vmax);
        const gg_vf vm = gg_set1(m);
        gg_vf vsum = gg_zero();
        for (int64_t c = 0; c < nk; c += GG_W) {
            const gg_mask vis = gg_between(gg_addi(gg_seti1((int)(jlo + c)), iota), vlo, vhi);
            const gg_vf p = gg_maskz_mov(vis, gg_exp(gg_sub(gg_loadu(sr + c), vm)));
            gg_storeu(sr + c, p);
            vsum = gg_add(vsum, p);
        }
        const float den = gg_reduce_add(vsum);
        inv_den[r] = 1.0f / den;
        lse[h * T + i] = m + logf(den);
    }

    /* O = P V / den, AT_ROWS rows × 2 vectors of output columns at a time; keys past i1 - 1 carry p = 0 */
    const int64_t jend = i1;
    for (int64_t dc = 0; dc < Dv; dc += 2 * GG_W) {
        const int two = dc + GG_W < Dv;
        gg_vf acc[AT_ROWS][2];
        for (int r = 0; r < AT_ROWS; r++) acc[r][0] = acc[r][1] = gg_zero();
        for (int64_t j = jlo; j < jend; j++) {
            const float *vj = v + (j * Hkv + g) * Dv + dc;
            const gg_vf v0 = gg_loadu(vj);
            const gg_vf v1 = two ? gg_loadu(vj + GG_W) : gg_zero();
            for (int r = 0; r < AT_ROWS; r++) {
                const gg_vf pb = gg_set1(s[r * ls + (j - jlo)]);
                acc[r][0] = gg_fmadd(pb, v0, acc[r][0]);
                acc[r][1] = gg_fmadd(pb, v1, acc[r][1]);
            }
        }
        for (int r = 0; r < rows; r++) {
            float *orow = o + ((i0 + r) * Hq + h) * Dv + dc;
            const gg_vf inv = gg_set1(inv_den[r]);
            gg_storeu(orow, gg_mul(acc[r][0], inv));
            if (two) gg_storeu(orow + GG_W, gg_mul(acc[r][1], inv));
        }
    }
}

/* ---- backward (attention.py's _attn_bwd, FlashAttention-2's recomputation from lse) ----------------

   Blocks of AB_ROWS query rows × GG_W keys (one per vector lane, from transposed copies kt (D, Tp) and
   vt (Dv, Tp) of the kv head):
     z = scale · q_i·k_j (softcap: cap · tanh(z / cap), dz = 1 - tanh²),  p = exp(z - lse_i) visible, else 0
     dp = do_i·v_j,  ds = p (dp - dsum_i) dz scale
   Two passes, each task owning the rows it writes (no per-thread buffers, the same result whatever
   thread runs a task, so the tasks can be handed out dynamically):
     keys:    a task is 16 keys of one kv head (16 / GG_W blocks of keys) and every query row seeing
              them: dv_j += Σ_i p do_i, dk_j += Σ_i ds q_i (accumulated transposed, in dkt and dvt);
     queries: a task is AB_ROWS rows of one head and every key they see: dq_i = Σ_j ds k_j
   (the scores and dp are computed twice: 7 products instead of 5). p and ds of a block live in
   registers: 2 × AB_ROWS vectors (of 16 on AVX2, 32 on AVX512). */
#define AB_ROWS (GG_W == 16 ? 8 : 6)

/* dsum[h, i] = do_i·o_i of row i for every head: do, o (T, Hq, Dv), dsum (Hq, T). */
static void gg_ab_dsum(const float *dout, const float *o, int64_t T, int64_t Hq, int64_t Dv, int64_t i,
                       float *dsum) {
    for (int64_t h = 0; h < Hq; h++) {
        const float *a = dout + (i * Hq + h) * Dv, *b = o + (i * Hq + h) * Dv;
        gg_vf acc = gg_zero();
        for (int64_t d = 0; d < Dv; d += GG_W) {
            const gg_mask m = gg_first(Dv - d);
            acc = gg_fmadd(gg_maskz_loadu(m, a + d), gg_maskz_loadu(m, b + d), acc);
        }
        dsum[h * T + i] = gg_reduce_add(acc);
    }
}

/* p and ds of query rows i0..i0+rows-1 of head h against keys j0..j0+GG_W-1: qr, dr the rows of q and
   do (clamped to valid rows past `rows`); rows past `rows` get p = ds = 0. */
static inline void gg_ab_block(const float *const *qr, const float *const *dr, const float *kt,
                               const float *vt, const float *lse, const float *dsum, const int32_t *lo,
                               int64_t T, int64_t Tp, int64_t D, int64_t Dv, int64_t h, int64_t i0, int rows,
                               int64_t j0, float scale, float softcap, gg_vf *p, gg_vf *ds) {
    const gg_vi vj = gg_addi(gg_seti1((int)j0), gg_iota());
    const gg_vf vscale = gg_set1(scale), one = gg_set1(1.0f);
    for (int r = 0; r < AB_ROWS; r++) p[r] = ds[r] = gg_zero();
    for (int64_t d = 0; d < D; d++) {  /* scores */
        const gg_vf kv = gg_loadu(kt + d * Tp + j0);
        for (int r = 0; r < AB_ROWS; r++) p[r] = gg_fmadd(gg_set1(qr[r][d]), kv, p[r]);
    }
    for (int64_t d = 0; d < Dv; d++) {  /* dp = do·v */
        const gg_vf vv = gg_loadu(vt + d * Tp + j0);
        for (int r = 0; r < AB_ROWS; r++) ds[r] = gg_fmadd(gg_set1(dr[r][d]), vv, ds[r]);
    }
    for (int r = 0; r < AB_ROWS; r++) {
        if (r >= rows) {
            p[r] = ds[r] = gg_zero();
            continue;
        }
        const int64_t i = i0 + r;
        const gg_mask vis = gg_between(vj, gg_seti1((int)lo[i]), gg_seti1((int)i));
        gg_vf z = gg_mul(p[r], vscale), dz = one;
        if (softcap > 0.0f) {
            const gg_vf cap = gg_set1(softcap);
            const gg_vf t = gg_tanh(gg_div(z, cap));
            z = gg_mul(cap, t);
            dz = gg_fnmadd(t, t, one);
        }
        p[r] = gg_maskz_mov(vis, gg_exp(gg_sub(z, gg_set1(lse[h * T + i]))));
        ds[r] = gg_mul(gg_mul(p[r], gg_sub(ds[r], gg_set1(dsum[h * T + i]))), gg_mul(dz, vscale));
    }
    (void)T;
}

static inline void gg_ab_rows(const float *q, const float *dout, int64_t Hq, int64_t D, int64_t Dv, int64_t h,
                              int64_t i0, int rows, const float **qr, const float **dr) {
    for (int r = 0; r < AB_ROWS; r++) {
        const int64_t i = i0 + (r < rows ? r : rows - 1);
        qr[r] = q + (i * Hq + h) * D;
        dr[r] = dout + (i * Hq + h) * Dv;
    }
}

/* Keys pass, one task: keys j0..j1-1 (16 at most) of kv head g. q (T, Hq, D), kt (D, Tp) and vt (Dv, Tp)
   of head g, dout (T, Hq, Dv), lse and dsum (Hq, T), lo, hi (T,); dkt (D·16), dvt (Dv·16) scratch;
   writes rows j0..j1-1 of kv head g of dk (T, Hkv, D) and dv (T, Hkv, Dv). */
static void gg_ab_keys(const float *q, const float *kt, const float *vt, const float *dout, const float *lse,
                       const float *dsum, const int32_t *lo, const int32_t *hi, int64_t T, int64_t Tp,
                       int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t g, int64_t j0, float scale,
                       float softcap, float *dkt, float *dvt, float *dk, float *dv) {
    const int64_t j1 = j0 + 16 < T ? j0 + 16 : T, nj = j1 - j0;
    const int64_t G = Hq / Hkv;
    for (int64_t d = 0; d < D * 16; d += GG_W) gg_storeu(dkt + d, gg_zero());
    for (int64_t d = 0; d < Dv * 16; d += GG_W) gg_storeu(dvt + d, gg_zero());
    for (int64_t jb = j0; jb < j1; jb += GG_W) {  /* one vector of keys at a time */
        const int64_t last = (jb + GG_W < j1 ? jb + GG_W : j1) - 1, iend = hi[last] + 1, c = jb - j0;
        for (int64_t h = g * G; h < (g + 1) * G; h++) {
            for (int64_t i0 = jb; i0 < iend; i0 += AB_ROWS) {
                const int rows = (int)(iend - i0 < AB_ROWS ? iend - i0 : AB_ROWS);
                const float *qr[AB_ROWS], *dr[AB_ROWS];
                gg_vf p[AB_ROWS], ds[AB_ROWS];
                gg_ab_rows(q, dout, Hq, D, Dv, h, i0, rows, qr, dr);
                gg_ab_block(qr, dr, kt, vt, lse, dsum, lo, T, Tp, D, Dv, h, i0, rows, jb, scale, softcap, p, ds);
                for (int64_t d = 0; d < Dv; d++) {  /* dv_j += Σ_r p_rj do_r */
                    gg_vf acc = gg_loadu(dvt + d * 16 + c);
                    for (int r = 0; r < rows; r++) acc = gg_fmadd(gg_set1(dr[r][d]), p[r], acc);
                    gg_storeu(dvt + d * 16 + c, acc);
                }
                for (int64_t d = 0; d < D; d++) {  /* dk_j += Σ_r ds_rj q_r */
                    gg_vf acc = gg_loadu(dkt + d * 16 + c);
                    for (int r = 0; r < rows; r++) acc = gg_fmadd(gg_set1(qr[r][d]), ds[r], acc);
                    gg_storeu(dkt + d * 16 + c, acc);
                }
            }
        }
    }
    for (int64_t j = 0; j < nj; j++) {
        for (int64_t d = 0; d < D; d++) dk[((j0 + j) * Hkv + g) * D + d] = dkt[d * 16 + j];
        for (int64_t d = 0; d < Dv; d++) dv[((j0 + j) * Hkv + g) * Dv + d] = dvt[d * 16 + j];
    }
}

/* Queries pass, one task: rows i0..i1-1 (at most AB_ROWS) of head h against every key they see, GG_W
   at a time: k (T, Hkv, D) for the products with ds; writes those rows of head h of dq (T, Hq, D). */
static void gg_ab_queries(const float *q, const float *k, const float *kt, const float *vt, const float *dout,
                          const float *lse, const float *dsum, const int32_t *lo, int64_t T, int64_t Tp,
                          int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t h, int64_t g, int64_t i0,
                          int64_t i1, float scale, float softcap, float *dq) {
    const int rows = (int)(i1 - i0);
    const float *qr[AB_ROWS], *dr[AB_ROWS];
    float dsbuf[AB_ROWS][GG_W];
    gg_ab_rows(q, dout, Hq, D, Dv, h, i0, rows, qr, dr);
    for (int r = 0; r < rows; r++) {
        float *dqr = dq + ((i0 + r) * Hq + h) * D;
        for (int64_t d = 0; d < D; d++) dqr[d] = 0.0f;
    }
    for (int64_t j0 = (lo[i0] / GG_W) * GG_W; j0 < i1; j0 += GG_W) {
        const int64_t nj = (j0 + GG_W < i1 ? j0 + GG_W : i1) - j0;
        gg_vf p[AB_ROWS], ds[AB_ROWS];
        gg_ab_block(qr, dr, kt, vt, lse, dsum, lo, T, Tp, D, Dv, h, i0, rows, j0, scale, softcap, p, ds);
        for (int r = 0; r < rows; r++) gg_storeu(dsbuf[r], ds[r]);
        for (int r = 0; r < rows; r++) {  /* dq_r += Σ_j ds_rj k_j */
            float *dqr = dq + ((i0 + r) * Hq + h) * D;
            for (int64_t d = 0; d < D; d += GG_W) {
                const gg_mask m = gg_first(D - d);
                gg_vf acc = gg_maskz_loadu(m, dqr + d);
                for (int64_t j = 0; j < nj; j++)
                    acc = gg_fmadd(gg_set1(dsbuf[r][j]), gg_maskz_loadu(m, k + ((j0 + j) * Hkv + g) * D + d), acc);
                gg_mask_storeu(dqr + d, m, acc);
            }
        }
    }
}

#endif
