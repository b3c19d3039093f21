/* Where the AMX kernel's time goes, one thread, on the kernel's own headers (bench/amx_probe.py
   compiles this with the "amx" variant's flags and runs it; see there).

   1. tdpbf16ps alone (no loads) in 10 ms windows: the tile unit's rate over time. On a VM whose
      physical core is shared the rate halves whenever the other tenant uses its tiles.
   2. One forward chunk of the output head (Q8_0, 4096 rows × 640, 512 tokens), each way interleaved
      over many rounds so each gets the same stretches of the machine:
        micro loop   the micro-kernel's tile loads and tdpbf16ps over the packed panels, C tiles to a
                     scratch block only (no output stores)
        + stores     gg_amx_panel: the same with the output written (T, R) f32, as the kernel does
        + packing    gg_bf16_pack_fwd before each panel, as the kernel does
   3. The packers' rounding: 32 values to 16 bf16 pairs by the integer round to nearest even
      (gg_bf16_round16) and by vcvtne2ps2bf16 (what the quantized types use), and the whole forward
      and backward pack of the chunk. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "amx_bf16mm.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

enum { R = 4096, K = 640, T = 512, BLOCK = 32, TS = 34, KP = K / 2, ROUNDS = 40 };

/* gg_amx_micro without the output: its k loop (gg_amx_tiles), the C tiles stored to cst only */
static void micro_no_output(const uint16_t *a, int64_t lda, const uint32_t *bp, float *cst) {
    gg_amx_tiles(KP, a, lda, bp);
    _tile_stored(0, cst, 128); _tile_stored(1, cst + 16, 128);
    _tile_stored(2, cst + 512, 128); _tile_stored(3, cst + 528, 128);
}

int main(void) {
    int rc = gg_amx_request_tiles();
    if (rc) {
        printf("no AMX tile state (errno %d)\n", rc);
        return 2;
    }
    gg_amx_configure();
    /* 1 */
    {
        uint16_t *t = aligned_alloc(64, 4096);
        for (int i = 0; i < 2048; i++) t[i] = 0x3c00;
        _tile_loadd(4, t, 64); _tile_loadd(5, t, 64); _tile_loadd(6, t, 64); _tile_loadd(7, t, 64);
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        printf("tdpbf16ps alone, GFLOP/s in 10 ms windows:");
        double lo = 1e30, hi = 0;
        for (int s = 0; s < 30; s++) {
            double t0 = now(), dt;
            long n = 0;
            do {
                for (int i = 0; i < 64; i++) {
                    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
                }
                n += 64 * 4;
            } while ((dt = now() - t0) < 0.01);
            const double g = n * 16.0 * 16 * 32 * 2 / dt / 1e9;
            lo = g < lo ? g : lo;
            hi = g > hi ? g : hi;
            printf(" %.0f", g);
        }
        printf("\ntdpbf16ps alone: lowest window %.0f, highest %.0f GFLOP/s (%.2fx)\n", lo, hi, hi / lo);
        free(t);
    }
    /* 2, 3: a random Q8_0 chunk (scales 2^-15 .. 2^-14: no overflow, no denormal) */
    const int64_t wstride = (K / BLOCK) * TS;
    uint8_t *w = aligned_alloc(64, R * wstride);
    srand(1);
    for (int64_t i = 0; i < R * wstride; i++) w[i] = (uint8_t)rand();
    for (int r = 0; r < R; r++)
        for (int b = 0; b < K / BLOCK; b++) {
            const uint16_t d = 0x0400 + (rand() & 0x3ff);
            memcpy(w + r * wstride + b * TS, &d, 2);
        }
    const int64_t lda = gg_amx_lda(K), panel = (int64_t)KP * GG_BF_NR;
    uint16_t *a = aligned_alloc(64, T * lda * 2);
    for (int64_t i = 0; i < T * lda; i++) a[i] = (i % lda) < K ? (uint16_t)(0x3e00 + (rand() & 0x1ff)) : 0;
    uint32_t *bp = aligned_alloc(64, (R / GG_BF_NR) * panel * 4);
    float *scratch = aligned_alloc(64, 16 * GG_BF_KC * 4), *y = aligned_alloc(64, (int64_t)T * R * 4);
    float *cst = aligned_alloc(64, GG_AMX_TM * GG_AMX_TN * 4);
    memset(y, 0, (int64_t)T * R * 4);
    for (int s = 0; s < R / GG_BF_NR; s++)
        gg_bf16_pack_fwd(GG_TYPE_Q8_0, BLOCK, TS, w + s * GG_BF_NR * wstride, wstride, GG_BF_NR, 0, K, scratch,
                         bp + s * panel);
    const char *names[3] = {"micro loop (no output)", "+ output stores (gg_amx_panel)", "+ packing (gg_bf16_pack_fwd)"};
    double sec[3] = {0, 0, 0};
    for (int round = 0; round < ROUNDS; round++)
        for (int v = 0; v < 3; v++) {
            const double t0 = now();
            for (int s = 0; s < R / GG_BF_NR; s++) {
                uint32_t *b = bp + s * panel;
                if (v == 0) {
                    for (int t = 0; t < T; t += GG_AMX_TM)
                        for (int j = 0; j < GG_BF_NR; j += GG_AMX_TN) micro_no_output(a + t * lda, lda, b + j, cst);
                    continue;
                }
                if (v == 2)
                    gg_bf16_pack_fwd(GG_TYPE_Q8_0, BLOCK, TS, w + s * GG_BF_NR * wstride, wstride, GG_BF_NR, 0, K,
                                     scratch, b);
                gg_amx_panel(KP, a, lda, 0, T, b, y + s * GG_BF_NR, R, GG_BF_NR, 0, cst, NULL, 0, NULL, 0, 0);
            }
            sec[v] += now() - t0;
        }
    printf("head chunk forward (Q8_0 %d x %d, %d tokens), %d interleaved rounds:\n", R, K, T, ROUNDS);
    for (int v = 0; v < 3; v++)
        printf("  %-32s %6.0f GFLOP/s  %.2f ms\n", names[v], ROUNDS * 2.0 * T * R * K / sec[v] / 1e9,
               sec[v] / ROUNDS * 1e3);
    /* 3 */
    double rs[2] = {0, 0}, pk[2] = {0, 0};
    volatile int sink = 0;
    for (int round = 0; round < ROUNDS; round++) {
        for (int exact = 0; exact < 2; exact++) {
            double t0 = now();
            __m512i acc = _mm512_setzero_si512();
            for (int rep = 0; rep < 64; rep++)
                for (int i = 0; i < 16 * GG_BF_KC; i += 32) acc = _mm512_xor_si512(acc, gg_bf16_pairs16(scratch + i, 32, exact));
            sink += _mm512_reduce_add_epi32(acc);
            rs[exact] += now() - t0;
        }
        double t0 = now();
        for (int s = 0; s < R / GG_BF_NR; s++)
            gg_bf16_pack_fwd(GG_TYPE_Q8_0, BLOCK, TS, w + s * GG_BF_NR * wstride, wstride, GG_BF_NR, 0, K, scratch,
                             bp + s * panel);
        pk[0] += now() - t0;
        t0 = now();
        for (int s = 0; s < R / GG_BF_NR; s++)
            gg_bf16_pack_bwd(GG_TYPE_Q8_0, BLOCK, TS, w + s * GG_BF_NR * wstride, wstride, GG_BF_NR, 0, K, scratch,
                             bp);
        pk[1] += now() - t0;
    }
    const double vals = (double)ROUNDS * 64 * 16 * GG_BF_KC;
    printf("rounding to bf16: integer RNE %.2f ns / 32 values, vcvtne2ps2bf16 %.2f ns / 32 values (%.2fx)\n",
           rs[1] / vals * 32 * 1e9, rs[0] / vals * 32 * 1e9, rs[1] / rs[0]);
    printf("packing the chunk (vcvtne2ps2bf16): forward %.2f ms, backward %.2f ms\n", pk[0] / ROUNDS * 1e3,
           pk[1] / ROUNDS * 1e3);
    gg_amx_release();
    return sink == 12345 ? 1 : 0;
}
