/* Causal GQA attention forward and backward in f32 with AVX512 (compiled only into attention_avx512).

   The same function as attention.py's _attn_fwd (see its docstring for the masking rules), with
   our own register-blocked products instead of BLAS calls: one task is AT_ROWS query rows of one
   head; keys are 16 to a vector, from a transposed copy of K (D, Tp) per kv head.

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

#define AT_ROWS 8

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
    const int64_t nk = ((i1 - jlo + 31) / 32) * 32;  /* key columns, whole pairs of vectors */
    const int64_t ls = Tp + 32;                      /* row stride of s */
    const float *qr[AT_ROWS];
    for (int r = 0; r < AT_ROWS; r++) qr[r] = q + ((i0 + (r < rows ? r : rows - 1)) * Hq + h) * D;

    /* S = scale · Q Kᵀ, 8 rows × 32 keys at a time */
    for (int64_t c = 0; c < nk; c += 32) {
        __m512 acc[AT_ROWS][2];
        for (int r = 0; r < AT_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        const float *kc = kt + jlo + c;
        const int two = jlo + c + 16 < Tp;  /* the second vector lies inside kt's padded rows */
        for (int64_t d = 0; d < D; d++) {
            const __m512 k0 = _mm512_loadu_ps(kc + d * Tp);
            const __m512 k1 = two ? _mm512_loadu_ps(kc + d * Tp + 16) : _mm512_setzero_ps();
            for (int r = 0; r < AT_ROWS; r++) {
                const __m512 qb = _mm512_set1_ps(qr[r][d]);
                acc[r][0] = _mm512_fmadd_ps(qb, k0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(qb, k1, acc[r][1]);
            }
        }
        const __m512 sc = _mm512_set1_ps(scale);
        for (int r = 0; r < AT_ROWS; r++) {
            _mm512_storeu_ps(s + r * ls + c, _mm512_mul_ps(acc[r][0], sc));
            _mm512_storeu_ps(s + r * ls + c + 16, _mm512_mul_ps(acc[r][1], sc));
        }
    }

    /* masked softmax per row (unnormalized p; 1/den applied to o) */
    float inv_den[AT_ROWS];
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int r = 0; r < AT_ROWS; r++) {
        float *sr = s + r * ls;
        if (r >= rows) {
            for (int64_t c = 0; c < nk; c += 16) _mm512_storeu_ps(sr + c, _mm512_setzero_ps());
            inv_den[r] = 0.0f;
            continue;
        }
        const int64_t i = i0 + r;
        const __m512i vlo = _mm512_set1_epi32((int)lo[i]), vhi = _mm512_set1_epi32((int)i);
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t c = 0; c < nk; c += 16) {
            const __m512i j = _mm512_add_epi32(_mm512_set1_epi32((int)(jlo + c)), iota);
            const __mmask16 vis = _mm512_cmpge_epi32_mask(j, vlo) & _mm512_cmple_epi32_mask(j, vhi);
            __m512 z = _mm512_loadu_ps(sr + c);
            if (softcap > 0.0f) {
                const __m512 cap = _mm512_set1_ps(softcap);
                z = _mm512_mul_ps(cap, gg_tanh(_mm512_div_ps(z, cap)));
                _mm512_storeu_ps(sr + c, z);
            }
            vmax = _mm512_mask_max_ps(vmax, vis, vmax, z);
        }
        const float m = _mm512_reduce_max_ps(vmax);
        const __m512 vm = _mm512_set1_ps(m);
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t c = 0; c < nk; c += 16) {
            const __m512i j = _mm512_add_epi32(_mm512_set1_epi32((int)(jlo + c)), iota);
            const __mmask16 vis = _mm512_cmpge_epi32_mask(j, vlo) & _mm512_cmple_epi32_mask(j, vhi);
            const __m512 p = _mm512_maskz_mov_ps(vis, gg_exp(_mm512_sub_ps(_mm512_loadu_ps(sr + c), vm)));
            _mm512_storeu_ps(sr + c, p);
            vsum = _mm512_add_ps(vsum, p);
        }
        const float den = _mm512_reduce_add_ps(vsum);
        inv_den[r] = 1.0f / den;
        lse[h * T + i] = m + logf(den);
    }

    /* O = P V / den, 8 rows × 32 output columns at a time; keys past i1 - 1 carry p = 0 */
    const int64_t jend = i1;
    for (int64_t dc = 0; dc < Dv; dc += 32) {
        const int two = dc + 16 < Dv;
        __m512 acc[AT_ROWS][2];
        for (int r = 0; r < AT_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t j = jlo; j < jend; j++) {
            const float *vj = v + (j * Hkv + g) * Dv + dc;
            const __m512 v0 = _mm512_loadu_ps(vj);
            const __m512 v1 = two ? _mm512_loadu_ps(vj + 16) : _mm512_setzero_ps();
            for (int r = 0; r < AT_ROWS; r++) {
                const __m512 pb = _mm512_set1_ps(s[r * ls + (j - jlo)]);
                acc[r][0] = _mm512_fmadd_ps(pb, v0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(pb, v1, acc[r][1]);
            }
        }
        for (int r = 0; r < rows; r++) {
            float *orow = o + ((i0 + r) * Hq + h) * Dv + dc;
            const __m512 inv = _mm512_set1_ps(inv_den[r]);
            _mm512_storeu_ps(orow, _mm512_mul_ps(acc[r][0], inv));
            if (two) _mm512_storeu_ps(orow + 16, _mm512_mul_ps(acc[r][1], inv));
        }
    }
}

/* ---- backward (attention.py's _attn_bwd, FlashAttention-2's recomputation from lse) ----------------

   Blocks of AB_ROWS query rows × 16 keys (one per vector lane, from transposed copies kt (D, Tp) and
   vt (Dv, Tp) of the kv head):
     z = scale · q_i·k_j (softcap: cap · tanh(z / cap), dz = 1 - tanh²),  p = exp(z - lse_i) visible, else 0
     dp = do_i·v_j,  ds = p (dp - dsum_i) dz scale
   Two passes, each task owning the rows it writes (no per-thread buffers, the same result whatever
   thread runs a task, so the tasks can be handed out dynamically):
     keys:    a task is 16 keys of one kv head and every query row seeing them: dv_j += Σ_i p do_i,
              dk_j += Σ_i ds q_i (accumulated transposed, in dkt and dvt);
     queries: a task is AB_ROWS rows of one head and every key they see: dq_i = Σ_j ds k_j
   (the scores and dp are computed twice: 7 products instead of 5). */
#define AB_ROWS 8

/* dsum[h, i] = do_i·o_i of row i for every head: do, o (T, Hq, Dv), dsum (Hq, T). */
static void gg_ab_dsum(const float *dout, const float *o, int64_t T, int64_t Hq, int64_t Dv, int64_t i,
                       float *dsum) {
    for (int64_t h = 0; h < Hq; h++) {
        const float *a = dout + (i * Hq + h) * Dv, *b = o + (i * Hq + h) * Dv;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < Dv; d += 16) {
            const __mmask16 m = Dv - d >= 16 ? 0xFFFF : (__mmask16)((1u << (Dv - d)) - 1);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), _mm512_maskz_loadu_ps(m, b + d), acc);
        }
        dsum[h * T + i] = _mm512_reduce_add_ps(acc);
    }
}

/* p and ds of query rows i0..i0+rows-1 of head h against keys j0..j0+15: qr, dr the rows of q and
   do (clamped to valid rows past `rows`); rows past `rows` get p = ds = 0. */
static inline void gg_ab_block(const float *const *qr, const float *const *dr, const float *kt,
                               const float *vt, const float *lse, const float *dsum, const int32_t *lo,
                               int64_t T, int64_t Tp, int64_t D, int64_t Dv, int64_t h, int64_t i0, int rows,
                               int64_t j0, float scale, float softcap, __m512 *p, __m512 *ds) {
    const __m512i vj = _mm512_add_epi32(_mm512_set1_epi32((int)j0),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512 vscale = _mm512_set1_ps(scale), one = _mm512_set1_ps(1.0f);
    for (int r = 0; r < AB_ROWS; r++) p[r] = ds[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {  /* scores */
        const __m512 kv = _mm512_loadu_ps(kt + d * Tp + j0);
        for (int r = 0; r < AB_ROWS; r++) p[r] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][d]), kv, p[r]);
    }
    for (int64_t d = 0; d < Dv; d++) {  /* dp = do·v */
        const __m512 vv = _mm512_loadu_ps(vt + d * Tp + j0);
        for (int r = 0; r < AB_ROWS; r++) ds[r] = _mm512_fmadd_ps(_mm512_set1_ps(dr[r][d]), vv, ds[r]);
    }
    for (int r = 0; r < AB_ROWS; r++) {
        if (r >= rows) {
            p[r] = ds[r] = _mm512_setzero_ps();
            continue;
        }
        const int64_t i = i0 + r;
        const __mmask16 vis = _mm512_cmpge_epi32_mask(vj, _mm512_set1_epi32((int)lo[i])) &
                              _mm512_cmple_epi32_mask(vj, _mm512_set1_epi32((int)i));
        __m512 z = _mm512_mul_ps(p[r], vscale), dz = one;
        if (softcap > 0.0f) {
            const __m512 cap = _mm512_set1_ps(softcap);
            const __m512 t = gg_tanh(_mm512_div_ps(z, cap));
            z = _mm512_mul_ps(cap, t);
            dz = _mm512_fnmadd_ps(t, t, one);
        }
        p[r] = _mm512_maskz_mov_ps(vis, gg_exp(_mm512_sub_ps(z, _mm512_set1_ps(lse[h * T + i]))));
        ds[r] = _mm512_mul_ps(_mm512_mul_ps(p[r], _mm512_sub_ps(ds[r], _mm512_set1_ps(dsum[h * T + i]))),
                              _mm512_mul_ps(dz, vscale));
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

/* Keys pass, one task: keys j0..j1-1 of kv head g. q (T, Hq, D), kt (D, Tp) and vt (Dv, Tp) of head g,
   dout (T, Hq, Dv), lse and dsum (Hq, T), lo, hi (T,); dkt (D·16), dvt (Dv·16) scratch; writes rows
   j0..j1-1 of kv head g of dk (T, Hkv, D) and dv (T, Hkv, Dv). */
static void gg_ab_keys(const float *q, const float *kt, const float *vt, const float *dout, const float *lse,
                       const float *dsum, const int32_t *lo, const int32_t *hi, int64_t T, int64_t Tp,
                       int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t g, int64_t j0, float scale,
                       float softcap, float *dkt, float *dvt, float *dk, float *dv) {
    const int64_t j1 = j0 + 16 < T ? j0 + 16 : T, nj = j1 - j0;
    const int64_t G = Hq / Hkv, iend = hi[j1 - 1] + 1;
    for (int64_t d = 0; d < D * 16; d += 16) _mm512_storeu_ps(dkt + d, _mm512_setzero_ps());
    for (int64_t d = 0; d < Dv * 16; d += 16) _mm512_storeu_ps(dvt + d, _mm512_setzero_ps());
    for (int64_t h = g * G; h < (g + 1) * G; h++) {
        for (int64_t i0 = j0; i0 < iend; i0 += AB_ROWS) {
            const int rows = (int)(iend - i0 < AB_ROWS ? iend - i0 : AB_ROWS);
            const float *qr[AB_ROWS], *dr[AB_ROWS];
            __m512 p[AB_ROWS], ds[AB_ROWS];
            gg_ab_rows(q, dout, Hq, D, Dv, h, i0, rows, qr, dr);
            gg_ab_block(qr, dr, kt, vt, lse, dsum, lo, T, Tp, D, Dv, h, i0, rows, j0, scale, softcap, p, ds);
            for (int64_t d = 0; d < Dv; d++) {  /* dv_j += Σ_r p_rj do_r */
                __m512 acc = _mm512_loadu_ps(dvt + d * 16);
                for (int r = 0; r < rows; r++) acc = _mm512_fmadd_ps(_mm512_set1_ps(dr[r][d]), p[r], acc);
                _mm512_storeu_ps(dvt + d * 16, acc);
            }
            for (int64_t d = 0; d < D; d++) {  /* dk_j += Σ_r ds_rj q_r */
                __m512 acc = _mm512_loadu_ps(dkt + d * 16);
                for (int r = 0; r < rows; r++) acc = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][d]), ds[r], acc);
                _mm512_storeu_ps(dkt + d * 16, acc);
            }
        }
    }
    for (int64_t j = 0; j < nj; j++) {
        for (int64_t d = 0; d < D; d++) dk[((j0 + j) * Hkv + g) * D + d] = dkt[d * 16 + j];
        for (int64_t d = 0; d < Dv; d++) dv[((j0 + j) * Hkv + g) * Dv + d] = dvt[d * 16 + j];
    }
}

/* Queries pass, one task: rows i0..i1-1 (at most AB_ROWS) of head h against every key they see, 16 at
   a time: k (T, Hkv, D) for the products with ds; writes those rows of head h of dq (T, Hq, D). */
static void gg_ab_queries(const float *q, const float *k, const float *kt, const float *vt, const float *dout,
                          const float *lse, const float *dsum, const int32_t *lo, int64_t T, int64_t Tp,
                          int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t h, int64_t g, int64_t i0,
                          int64_t i1, float scale, float softcap, float *dq) {
    const int rows = (int)(i1 - i0);
    const float *qr[AB_ROWS], *dr[AB_ROWS];
    float dsbuf[AB_ROWS][16];
    gg_ab_rows(q, dout, Hq, D, Dv, h, i0, rows, qr, dr);
    for (int r = 0; r < rows; r++) {
        float *dqr = dq + ((i0 + r) * Hq + h) * D;
        for (int64_t d = 0; d < D; d++) dqr[d] = 0.0f;
    }
    for (int64_t j0 = (lo[i0] / 16) * 16; j0 < i1; j0 += 16) {
        const int64_t nj = (j0 + 16 < i1 ? j0 + 16 : i1) - j0;
        __m512 p[AB_ROWS], ds[AB_ROWS];
        gg_ab_block(qr, dr, kt, vt, lse, dsum, lo, T, Tp, D, Dv, h, i0, rows, j0, scale, softcap, p, ds);
        for (int r = 0; r < rows; r++) _mm512_storeu_ps(dsbuf[r], ds[r]);
        for (int r = 0; r < rows; r++) {  /* dq_r += Σ_j ds_rj k_j */
            float *dqr = dq + ((i0 + r) * Hq + h) * D;
            for (int64_t d = 0; d < D; d += 16) {
                const __mmask16 m = D - d >= 16 ? 0xFFFF : (__mmask16)((1u << (D - d)) - 1);
                __m512 acc = _mm512_maskz_loadu_ps(m, dqr + d);
                for (int64_t j = 0; j < nj; j++)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(dsbuf[r][j]),
                                          _mm512_maskz_loadu_ps(m, k + ((j0 + j) * Hkv + g) * D + d), acc);
                _mm512_mask_storeu_ps(dqr + d, m, acc);
            }
        }
    }
}

#endif
