/* Causal GQA attention forward in f32 with AVX512 (compiled only into attention_avx512).

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

#include "avx512_math.h"

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
                z = _mm512_mul_ps(cap, gg_tanh512(_mm512_div_ps(z, cap)));
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
            const __m512 p = _mm512_maskz_mov_ps(vis, gg_exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + c), vm)));
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

#endif
