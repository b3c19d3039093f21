/* A C emulation of the AMX tile instructions amx_bf16mm.h uses, for the emulated build of the AMX
   kernel (GG_AMX_EMULATE defined: bf16mm_amxemu_avx512bf16). It lets the one kernel text run, and
   be tested, on a CPU without AMX; it is slow (scalar C), so it is for proofs, not for training.

   Included after <immintrin.h>: the intrinsics' names (GCC defines them whatever the flags) are
   redefined as macros onto the functions below, so the kernel's source is the same in both builds.
   State per thread, as the hardware keeps it per logical CPU: the tile configuration and 8 tiles of
   16 rows × 64 bytes. Semantics from the Intel SDM (vol. 2, LDTILECFG, TILELOADD, TILESTORED,
   TILEZERO, TDPBF16PS, TILERELEASE); what the hardware faults on (#UD: a tile instruction without a
   valid configuration, shapes that do not match; #GP: a bad configuration) traps here too (SIGILL),
   so a thread that forgot ldtilecfg dies in the tests as it would on an AMX CPU.

   The palette 1 configuration, 64 bytes: palette_id (byte 0), start_row (byte 1), 14 reserved
   bytes, colsb[16] (u16, bytes 16..47: bytes per row of tile i), rows[16] (u8, bytes 48..63).
   Palette 1 has 8 tiles of at most 16 rows × 64 bytes; the entries of tiles 8..15 must be zero.

   TDPBF16PS (per the SDM pseudocode): for each row m of dst, two f32 partial sums per output column
   n, one over the even and one over the odd bf16 of the pairs, each an FMA per pair k in order;
   then dst[m][n] += (even + odd). DAZ on the inputs (a bf16 denormal is a signed zero), FTZ on every
   result, round to nearest even; MXCSR neither read nor written. (The Intrinsics Guide writes the
   older form: both FMAs of a pair straight into dst[m][n], pair after pair. The two differ only in
   rounding; the kernel's tests against float64 hold for either, and for whatever order a CPU's
   adders really use; only the emulated kernel is held to the bit.) */
#ifndef GG_AMX_EMULATE_H
#define GG_AMX_EMULATE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

enum { GG_EMU_TILES = 8, GG_EMU_ROWS = 16, GG_EMU_COLSB = 64 };

typedef struct {
    int configured;
    uint16_t colsb[GG_EMU_TILES];
    uint8_t rows[GG_EMU_TILES];
    uint8_t data[GG_EMU_TILES][GG_EMU_ROWS][GG_EMU_COLSB];
} gg_emu_state;

static __thread gg_emu_state gg_emu;

static inline void gg_emu_fault(void) { __builtin_trap(); }

static inline void gg_emu_check_tile(int t) {
    if (!gg_emu.configured || t < 0 || t >= GG_EMU_TILES) gg_emu_fault();
}

/* ldtilecfg: palette 0 returns to the init state; palette 1 checked as the hardware checks it
   (start_row 0 here: the kernel never restarts an interrupted load). Loading a configuration
   zeroes every tile. */
static inline void gg_emu_tile_loadconfig(const void *config) {
    const uint8_t *c = (const uint8_t *)config;
    memset(&gg_emu, 0, sizeof gg_emu);
    if (c[0] == 0) return;
    if (c[0] != 1 || c[1] != 0) gg_emu_fault();
    for (int i = 2; i < 16; i++)
        if (c[i]) gg_emu_fault();
    for (int t = 0; t < 16; t++) {
        const uint16_t colsb = (uint16_t)(c[16 + 2 * t] | (c[17 + 2 * t] << 8));
        const uint8_t rows = c[48 + t];
        if (t >= GG_EMU_TILES) {
            if (colsb || rows) gg_emu_fault();
            continue;
        }
        if (colsb > GG_EMU_COLSB || rows > GG_EMU_ROWS || (!colsb) != (!rows)) gg_emu_fault();
        gg_emu.colsb[t] = colsb;
        gg_emu.rows[t] = rows;
    }
    gg_emu.configured = 1;
}

static inline void gg_emu_tile_release(void) { memset(&gg_emu, 0, sizeof gg_emu); }

/* tileloadd: rows × colsb bytes, row r from base + r · stride; the rest of the tile is zero */
static inline void gg_emu_tile_loadd(int t, const void *base, long stride) {
    gg_emu_check_tile(t);
    if (!gg_emu.rows[t]) gg_emu_fault();
    memset(gg_emu.data[t], 0, sizeof gg_emu.data[t]);
    for (int r = 0; r < gg_emu.rows[t]; r++)
        memcpy(gg_emu.data[t][r], (const uint8_t *)base + (int64_t)r * stride, gg_emu.colsb[t]);
}

static inline void gg_emu_tile_stored(int t, void *base, long stride) {
    gg_emu_check_tile(t);
    if (!gg_emu.rows[t]) gg_emu_fault();
    for (int r = 0; r < gg_emu.rows[t]; r++)
        memcpy((uint8_t *)base + (int64_t)r * stride, gg_emu.data[t][r], gg_emu.colsb[t]);
}

static inline void gg_emu_tile_zero(int t) {
    gg_emu_check_tile(t);
    memset(gg_emu.data[t], 0, sizeof gg_emu.data[t]);
}

static inline float gg_emu_ftz(float x) {  /* a denormal (input or result) -> a zero of its sign */
    return fabsf(x) < 1.17549435e-38f ? copysignf(0.0f, x) : x;
}

static inline float gg_emu_bf16(const uint8_t *p) {  /* make_fp32, with DAZ */
    const uint32_t u = (uint32_t)(p[0] | (p[1] << 8)) << 16;
    float f;
    memcpy(&f, &u, 4);
    return gg_emu_ftz(f);
}

static inline void gg_emu_tile_dpbf16ps(int dst, int a, int b) {
    gg_emu_check_tile(dst);
    gg_emu_check_tile(a);
    gg_emu_check_tile(b);
    const int M = gg_emu.rows[dst], N = gg_emu.colsb[dst] / 4, K = gg_emu.colsb[a] / 4;
    if (!M || dst == a || dst == b || a == b || gg_emu.rows[a] != M || gg_emu.rows[b] != K
        || gg_emu.colsb[b] != gg_emu.colsb[dst] || gg_emu.colsb[dst] % 4 || gg_emu.colsb[a] % 4)
        gg_emu_fault();
    for (int m = 0; m < M; m++) {
        float even[16] = {0}, odd[16] = {0};
        for (int k = 0; k < K; k++) {
            const float a0 = gg_emu_bf16(&gg_emu.data[a][m][4 * k]);
            const float a1 = gg_emu_bf16(&gg_emu.data[a][m][4 * k + 2]);
            for (int n = 0; n < N; n++) {
                even[n] = gg_emu_ftz(fmaf(a0, gg_emu_bf16(&gg_emu.data[b][k][4 * n]), even[n]));
                odd[n] = gg_emu_ftz(fmaf(a1, gg_emu_bf16(&gg_emu.data[b][k][4 * n + 2]), odd[n]));
            }
        }
        float *row = (float *)gg_emu.data[dst][m];
        for (int n = 0; n < N; n++) {
            float c;
            memcpy(&c, row + n, 4);
            c = gg_emu_ftz(gg_emu_ftz(c) + gg_emu_ftz(even[n] + odd[n]));
            memcpy(row + n, &c, 4);
        }
    }
}

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig(config) gg_emu_tile_loadconfig(config)
#define _tile_release() gg_emu_tile_release()
#define _tile_loadd(t, base, stride) gg_emu_tile_loadd((t), (base), (long)(stride))
#define _tile_stored(t, base, stride) gg_emu_tile_stored((t), (base), (long)(stride))
#define _tile_zero(t) gg_emu_tile_zero(t)
#define _tile_dpbf16ps(dst, a, b) gg_emu_tile_dpbf16ps((dst), (a), (b))

#endif
