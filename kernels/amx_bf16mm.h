/* bf16 matmul over GGUF weights on AMX-BF16 tiles (tdpbf16ps): the micro-kernel, the tile
   configuration and the activations' padded layout. Compiled into bf16mm_amx (the "amx" variant's
   flags) and, with GG_AMX_EMULATE defined, into bf16mm_amxemu_avx512bf16 against amx_emulate.h's C
   tile instructions: one kernel text, run for real on an AMX CPU and emulated everywhere else.

   The weights are packed by bf16mm_util.h's packers into the K-pair-interleaved layout the
   vdpbf16ps kernel reads (u32 bp[p][j] = (B[2p][j], B[2p+1][j]), GG_BF_NR columns a row, 256-byte
   row stride): a tdpbf16ps B tile of 16 pairs × 16 columns is 16 rows of 64 bytes at
   bp + p0 · GG_BF_NR + j0, stride 256 bytes, as packed. The activations are rounded by
   bf16mm_util.h's gg_bf16_round_row into row-major bf16 with the pads tdpbf16ps needs: an A tile is
   16 token rows × 32 bf16 (a + t · lda + k0, stride lda · 2 bytes).

   Tails are zeros in memory, never another tile shape (a new configuration would cost a
   ldtilecfg, which also zeroes the accumulators): the activations' k tiles are GG_AMX_TM-row
   blocks with T rounded up to GG_AMX_TM (rows past T are zeros) and each row padded to
   GG_AMX_KB values of k (columns past K are zeros; gg_amx_lda); each packed weight panel holds its pairs
   rounded up to GG_AMX_KP with zero pairs after. So every tile load reads in-bounds memory and a
   tail adds exact zeros (0 · 0; rows and columns past the output are computed, never stored).

   The micro-kernel: a 2 × 2 block of C tiles (tmm0..3) = GG_AMX_TM tokens × GG_AMX_TN columns;
   per 16 pairs of k, 2 A tiles (tmm4, 5) and 2 B tiles (tmm6, 7) are loaded for 4 tdpbf16ps.
   The C tiles start at zero and are stored to a per-thread f32 block, then added to (or written
   into) the output: so each output element is out + (this k tile's sum), the order the vdpbf16ps
   kernel adds tiles in. Tile order inside a k tile differs from vdpbf16ps (tdpbf16ps sums the even
   and the odd halves of 16 pairs apart, then adds them): results agree within the f32 summation
   bound, not bit for bit.
   The tiles are configured per thread: gg_amx_configure() in each OpenMP thread before its first
   tile instruction, gg_amx_release() after its last. Linux hands out the tile state only to a
   process that asked for it: gg_amx_request_tiles() once per process before any of this runs. */
#ifndef GG_AMX_BF16MM_H
#define GG_AMX_BF16MM_H

#include <errno.h>
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "bf16mm_util.h"

#ifdef GG_AMX_EMULATE
#include "amx_emulate.h"
#define GG_AMX_EMULATED 1
#else
#define GG_AMX_EMULATED 0
#endif

enum {
    GG_AMX_TM = 32,  /* tokens per micro-kernel: 2 C tiles of 16 rows */
    GG_AMX_TN = 32,  /* output columns per micro-kernel: 2 C tiles of 16 f32 */
    GG_AMX_KP = 16,  /* pairs of k per tile step (a B tile's rows, an A tile's 64 bytes) */
    GG_AMX_KB = 2 * GG_AMX_KP,  /* values of k per tile step */
};

/* 0 when Linux grants this process the AMX tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for
   XFEATURE_XTILEDATA, then read back with ARCH_GET_XCOMP_PERM), else the errno it refused with
   (EOPNOTSUPP on a CPU without AMX, EINVAL on a kernel before 5.16; ENOSYS off Linux). */
static inline int gg_amx_request_tiles(void) {
#if defined(__linux__) && defined(SYS_arch_prctl)
    enum { ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return errno ? errno : EINVAL;
    unsigned long granted = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &granted) != 0) return errno ? errno : EINVAL;
    return (granted >> XFEATURE_XTILEDATA) & 1 ? 0 : EPERM;
#else
    return ENOSYS;
#endif
}

/* Palette 1, every tile 16 rows × 64 bytes: C 16 × 16 f32, A 16 tokens × 16 pairs, B 16 pairs × 16
   columns (the layout: see amx_emulate.h) */
static inline void gg_amx_configure(void) {
    uint8_t cfg[64] __attribute__((aligned(64)));
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1;
    for (int t = 0; t < 8; t++) {
        cfg[16 + 2 * t] = 64;  /* colsb, little-endian u16 */
        cfg[48 + t] = 16;      /* rows */
    }
    _tile_loadconfig(cfg);
}

static inline void gg_amx_release(void) { _tile_release(); }

/* One tdpbf16ps on tiles of any valid shape, for the tests of the instruction itself: C (M × N f32,
   row-major) += A (M × K pairs of bf16) · B (K pairs × N), M, K, N <= 16; configures tiles 0 (C), 1
   (A), 2 (B) unless configure is 0 (a tile instruction without a configuration faults), releases. */
static inline void gg_amx_tile_dot(int M, int N, int K, float *c, const uint16_t *a, const uint16_t *b,
                                   int configure) {
    uint8_t cfg[64] __attribute__((aligned(64)));
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1;
    const int colsb[3] = {4 * N, 4 * K, 4 * N}, rows[3] = {M, M, K};
    for (int t = 0; t < 3; t++) {
        cfg[16 + 2 * t] = (uint8_t)colsb[t];
        cfg[48 + t] = (uint8_t)rows[t];
    }
    if (configure) _tile_loadconfig(cfg);
    __asm__ volatile("" ::: "memory");
    _tile_loadd(0, c, 4 * N);
    _tile_loadd(1, a, 4 * K);
    _tile_loadd(2, b, 4 * N);
    _tile_dpbf16ps(0, 1, 2);
    _tile_stored(0, c, 4 * N);
    _tile_release();
}

/* The row stride (in bf16) of a k tile of kc values: kc rounded up to GG_AMX_KB, plus GG_AMX_KB
   more where that is a multiple of 256 values (512 bytes; every full tile): an A tile's 16 rows at
   a stride of a power of two would all fall into the same L1 set. */
static inline int64_t gg_amx_lda(int64_t kc) {
    const int64_t ld = (kc + GG_AMX_KB - 1) / GG_AMX_KB * GG_AMX_KB;
    return ld % 256 ? ld : ld + GG_AMX_KB;
}

/* Row t of x (f32, rounded here; or bf16 bits xb) into the padded k-tiled layout: k tile kb
   (k0 = kb · tk .. k0 + kc) is a (Tp, gg_amx_lda(kc)) row-major block at kb · Tp · gg_amx_lda(tk),
   its pad columns zero. */
static inline void gg_amx_tile_row(const float *x, const uint16_t *xb, int64_t K, int64_t tk, int64_t Tp,
                                   int64_t t, uint16_t *dst) {
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += tk, kb++) {
        const int64_t kc = K - k0 < tk ? K - k0 : tk, ld = gg_amx_lda(kc);
        uint16_t *row = dst + kb * Tp * gg_amx_lda(tk) + t * ld;
        if (x) gg_bf16_round_row(x + k0, row, kc, 0);
        else memcpy(row, xb + k0, (size_t)kc * 2);
        memset(row + kc, 0, (size_t)(ld - kc) * 2);
    }
}

/* C tiles tmm0..3 = A · B over kp pairs (a multiple of GG_AMX_KP): the micro-kernel's k loop (A's
   GG_AMX_TM rows at a, row stride lda bf16; B one packed panel's GG_AMX_TN columns at bp) */
static inline void gg_amx_tiles(int64_t kp, const uint16_t *a, int64_t lda, const uint32_t *bp) {
    /* GCC's tile-load intrinsics do not tell the compiler that they read memory: the packing and
       rounding stores before them must not be moved past them */
    __asm__ volatile("" ::: "memory");
    const int64_t sa = lda * 2, sb = GG_BF_NR * 4;
    const uint16_t *a1 = a + 16 * lda;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t p = 0; p < kp; p += GG_AMX_KP) {
        _tile_loadd(4, a + 2 * p, sa);
        _tile_loadd(6, bp + p * GG_BF_NR, sb);
        _tile_loadd(7, bp + p * GG_BF_NR + 16, sb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a1 + 2 * p, sa);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
}

/* C (mr <= GG_AMX_TM rows at c, row stride ldc; nc <= GG_AMX_TN columns) (+)= A · B over kp pairs
   (a multiple of GG_AMX_KP): A's GG_AMX_TM rows at a (row stride lda bf16, zeros past mr), B the
   columns at bp of one packed panel (kp rows, GG_BF_NR u32 a row). cst: GG_AMX_TM × GG_AMX_TN
   floats, 64-byte aligned. Needs the tiles configured (gg_amx_configure) on this thread.
   With ur > 0 the f32 low-rank addend U · V joins each row before it is stored, as in gg_bf16_micro:
   U's mr rows at u (row stride ldu, ur columns), V's ur rows at v (row stride ldv, these nc columns). */
static inline void gg_amx_micro(int64_t kp, const uint16_t *a, int64_t lda, int mr, const uint32_t *bp,
                                float *c, int64_t ldc, int nc, int accumulate, float *cst, const float *u,
                                int64_t ldu, const float *v, int64_t ldv, int ur) {
    gg_amx_tiles(kp, a, lda, bp);
    _tile_stored(0, cst, GG_AMX_TN * 4);
    _tile_stored(1, cst + 16, GG_AMX_TN * 4);
    _tile_stored(2, cst + 16 * GG_AMX_TN, GG_AMX_TN * 4);
    _tile_stored(3, cst + 16 * GG_AMX_TN + 16, GG_AMX_TN * 4);
    for (int m = 0; m < mr; m++) {
        float *row = c + m * ldc;
        for (int h = 0; h < 2; h++) {  /* the two 16-column halves */
            const __mmask16 k = gg_bf_cols_mask(nc, h);
            if (!k) break;
            __m512 r = _mm512_load_ps(cst + m * GG_AMX_TN + 16 * h);
            for (int q = 0; q < ur; q++)
                r = _mm512_fmadd_ps(_mm512_set1_ps(u[m * ldu + q]), _mm512_maskz_loadu_ps(k, v + q * ldv + 16 * h), r);
            if (accumulate) r = _mm512_add_ps(_mm512_maskz_loadu_ps(k, row + 16 * h), r);
            _mm512_mask_storeu_ps(row + 16 * h, k, r);
        }
    }
}

/* C rows t0 .. t1 (+)= A rows t0 .. t1 · one packed panel (kp pairs, a multiple of GG_AMX_KP; nc
   <= GG_BF_NR columns; + U rows t0 .. t1 · V with ur > 0, v at the panel's first column):
   micro-kernels of GG_AMX_TM rows × GG_AMX_TN columns. t0 is a multiple of GG_AMX_TM; A has rows up
   to t1 rounded up to GG_AMX_TM (zeros past the tokens). */
static inline void gg_amx_panel(int64_t kp, const uint16_t *a, int64_t lda, int64_t t0, int64_t t1,
                                const uint32_t *bp, float *c, int64_t ldc, int nc, int accumulate, float *cst,
                                const float *u, int64_t ldu, const float *v, int64_t ldv, int ur) {
    for (int64_t t = t0; t < t1; t += GG_AMX_TM) {
        const int mr = t1 - t < GG_AMX_TM ? (int)(t1 - t) : GG_AMX_TM;
        for (int j = 0; j < nc; j += GG_AMX_TN)
            gg_amx_micro(kp, a + t * lda, lda, mr, bp + j, c + t * ldc + j, ldc,
                         nc - j < GG_AMX_TN ? nc - j : GG_AMX_TN, accumulate, cst,
                         ur ? u + t * ldu : u, ldu, ur ? v + j : v, ldv, ur);
    }
}

#endif
