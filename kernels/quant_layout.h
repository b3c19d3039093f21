/* GGUF tensor types as the kernels read them: ggml type ids, the byte layout of each type's block,
 * the IQ4_NL levels, exact loads of unaligned little-endian fields (f16 included), and the
 * decoders of the K-quants' and IQ4_XS's packed sub-block scales.
 *
 * The one place these are written down in C: quant_simd.pyx, quant_util.h (its AVX2 twins) and
 * int8_util.h (the int8 form) all include this header. ggtrain.kernels.SUPPORTED_TYPES is the
 * Python list of the same types; tests/test_kernels_layout.py checks both against gguf-py.
 *
 * Offsets are bytes from the start of a block. Element e of a 32-element block is the low nibble
 * of qs[e] for e < 16, the high nibble of qs[e - 16] above (the "Q4_0 order").
 */
#ifndef GG_QUANT_LAYOUT_H
#define GG_QUANT_LAYOUT_H

#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* ggml type ids (gguf.constants.GGMLQuantizationType) of the types the kernels compute with */
enum {
    GG_TYPE_F32 = 0,
    GG_TYPE_F16 = 1,
    GG_TYPE_Q4_0 = 2,
    GG_TYPE_Q4_1 = 3,
    GG_TYPE_Q5_0 = 6,
    GG_TYPE_Q5_1 = 7,
    GG_TYPE_Q8_0 = 8,
    GG_TYPE_Q2_K = 10,
    GG_TYPE_Q3_K = 11,
    GG_TYPE_Q4_K = 12,
    GG_TYPE_Q5_K = 13,
    GG_TYPE_Q6_K = 14,
    GG_TYPE_IQ4_NL = 20,
    GG_TYPE_IQ4_XS = 23,
    GG_TYPE_BF16 = 30,
};

/* elements per block: the 32-element types and the K-quants' super-blocks (and IQ4_XS) */
enum { GG_QK = 32, GG_QK_K = 256 };

/* Block layouts: NAME_BYTES is the block's size, the other names are field offsets.
 * f16 fields are 2 bytes, qh u32 is 4, arrays as noted. */
enum {
    /* F32, F16, BF16: a block is one element (bf16: the top half of an f32) */
    GG_F32_BYTES = 4, GG_F16_BYTES = 2, GG_BF16_BYTES = 2,
    /* Q4_0: d f16 | qs[16]; x = d (q - 8) */
    GG_Q4_0_D = 0, GG_Q4_0_QS = 2, GG_Q4_0_BYTES = 18,
    /* Q4_1: d f16 | m f16 | qs[16]; x = d q + m */
    GG_Q4_1_D = 0, GG_Q4_1_M = 2, GG_Q4_1_QS = 4, GG_Q4_1_BYTES = 20,
    /* Q5_0: d f16 | qh u32 (bit e = 5th bit of element e) | qs[16]; x = d (q - 16) */
    GG_Q5_0_D = 0, GG_Q5_0_QH = 2, GG_Q5_0_QS = 6, GG_Q5_0_BYTES = 22,
    /* Q5_1: d f16 | m f16 | qh u32 | qs[16]; x = d q + m */
    GG_Q5_1_D = 0, GG_Q5_1_M = 2, GG_Q5_1_QH = 4, GG_Q5_1_QS = 8, GG_Q5_1_BYTES = 24,
    /* Q8_0: d f16 | qs int8[32]; x = q d */
    GG_Q8_0_D = 0, GG_Q8_0_QS = 2, GG_Q8_0_BYTES = 34,
    /* Q2_K: scales[16] (low nibble scale, high nibble min, per 16 elements) | qs[64] (2 bits) |
     * d f16 | dmin f16; element h*128 + s*32 + l is (qs[h*32 + l] >> 2s) & 3 */
    GG_Q2_K_SCALES = 0, GG_Q2_K_QS = 16, GG_Q2_K_D = 80, GG_Q2_K_DMIN = 82, GG_Q2_K_BYTES = 84,
    /* Q3_K: hmask[32] | qs[64] (low 2 bits) | scales[12] (16 x 6 bits) | d f16 */
    GG_Q3_K_HMASK = 0, GG_Q3_K_QS = 32, GG_Q3_K_SCALES = 96, GG_Q3_K_D = 108, GG_Q3_K_BYTES = 110,
    /* Q4_K: d f16 | dmin f16 | scales[12] (8 pairs of 6-bit scale and min) | qs[128] */
    GG_Q4_K_D = 0, GG_Q4_K_DMIN = 2, GG_Q4_K_SCALES = 4, GG_Q4_K_QS = 16, GG_Q4_K_BYTES = 144,
    /* Q5_K: d f16 | dmin f16 | scales[12] | qh[32] (bit j = 5th bit of sub-block j) | qs[128] */
    GG_Q5_K_D = 0, GG_Q5_K_DMIN = 2, GG_Q5_K_SCALES = 4, GG_Q5_K_QH = 16, GG_Q5_K_QS = 48,
    GG_Q5_K_BYTES = 176,
    /* Q6_K: ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales int8[16] | d f16 */
    GG_Q6_K_QL = 0, GG_Q6_K_QH = 128, GG_Q6_K_SCALES = 192, GG_Q6_K_D = 208, GG_Q6_K_BYTES = 210,
    /* IQ4_NL: d f16 | qs[16] (nibbles index GG_KVALUES_IQ4NL); x = d kvalue */
    GG_IQ4_NL_D = 0, GG_IQ4_NL_QS = 2, GG_IQ4_NL_BYTES = 18,
    /* IQ4_XS: d f16 | scales_h u16 (2 bits per sub-block) | scales_l[4] (nibbles) | qs[128];
     * sub-block ib of 32: scale (l | h << 4) - 32, nibbles of qs[ib*16 ..] as in IQ4_NL */
    GG_IQ4_XS_D = 0, GG_IQ4_XS_SCALES_H = 2, GG_IQ4_XS_SCALES_L = 4, GG_IQ4_XS_QS = 8, GG_IQ4_XS_BYTES = 136,
};

/* (type id, elements per block, bytes per block) of every type above: for the tests' check
 * against gguf-py (quant_simd.type_table) */
static const int32_t GG_TYPE_TABLE[][3] = {
    {GG_TYPE_F32, 1, GG_F32_BYTES},          {GG_TYPE_F16, 1, GG_F16_BYTES},
    {GG_TYPE_Q4_0, GG_QK, GG_Q4_0_BYTES},    {GG_TYPE_Q4_1, GG_QK, GG_Q4_1_BYTES},
    {GG_TYPE_Q5_0, GG_QK, GG_Q5_0_BYTES},    {GG_TYPE_Q5_1, GG_QK, GG_Q5_1_BYTES},
    {GG_TYPE_Q8_0, GG_QK, GG_Q8_0_BYTES},    {GG_TYPE_Q2_K, GG_QK_K, GG_Q2_K_BYTES},
    {GG_TYPE_Q3_K, GG_QK_K, GG_Q3_K_BYTES},  {GG_TYPE_Q4_K, GG_QK_K, GG_Q4_K_BYTES},
    {GG_TYPE_Q5_K, GG_QK_K, GG_Q5_K_BYTES},  {GG_TYPE_Q6_K, GG_QK_K, GG_Q6_K_BYTES},
    {GG_TYPE_IQ4_NL, GG_QK, GG_IQ4_NL_BYTES}, {GG_TYPE_IQ4_XS, GG_QK_K, GG_IQ4_XS_BYTES},
    {GG_TYPE_BF16, 1, GG_BF16_BYTES},
};
#define GG_N_TYPES ((int)(sizeof(GG_TYPE_TABLE) / sizeof(GG_TYPE_TABLE[0])))

/* IQ4_NL / IQ4_XS non-linear levels (gguf-py IQ4_NL.kvalues) */
static const int8_t GG_KVALUES_IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                            1,    13,   25,  38,  53,  69,  89,  113};

/* ---- loads of unaligned little-endian fields ---------------------------------------------------- */

static inline uint16_t gg_load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t gg_load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* Exact f16 -> f32. With -mf16c one instruction (vcvtph2ps); without it a bit-level conversion that
 * is exact for every finite value, infinities and subnormals: both give numpy's float16 -> float32. */
static inline float gg_f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exp == 0x1f) {                 /* inf / nan: keep the payload */
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {             /* normal: rebias 15 -> 127 */
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else {                           /* zero / subnormal: man * 2^-24 is exact in f32 */
        f = (float)man * 5.9604644775390625e-08f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float gg_load_f16(const uint8_t *p) { return gg_f16_to_f32(gg_load_u16(p)); }

/* n half floats at src (any alignment) -> dst. */
static inline void gg_f16_row(const uint8_t *src, float *dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
#endif
    for (; i < n; i++) dst[i] = gg_load_f16(src + 2 * i);
}

/* ---- packed sub-block scales ----------------------------------------------------------------- */

/* Q4_K / Q5_K: scale and min of sub-block j (0..7) from the 12 packed bytes at s (gguf-py
 * Q4_K.get_scale_min) */
static inline void gg_k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) { *sc = s[j] & 63; *mn = s[j + 4] & 63; }
    else { *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30); *mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30); }
}

/* Q3_K: the signed scale (6 bits, minus 32) of sub-block i (0..15) from the 12 packed bytes at s */
static inline int gg_q3_k_scale(const uint8_t *s, int i) {
    int low = i < 8 ? s[i] & 0x0F : s[i - 8] >> 4;
    return (low | (((s[8 + i % 4] >> (2 * (i / 4))) & 3) << 4)) - 32;
}

/* IQ4_XS: the signed scale (6 bits, minus 32) of sub-block ib (0..7) of the block at b, whose
 * scales_h field the caller has loaded (once per block) into sh */
static inline int gg_iq4_xs_scale(const uint8_t *b, uint16_t sh, int ib) {
    return (((b[GG_IQ4_XS_SCALES_L + ib / 2] >> (4 * (ib % 2))) & 0x0F) | (((sh >> (2 * ib)) & 3) << 4)) - 32;
}

#endif
