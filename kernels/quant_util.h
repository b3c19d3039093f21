/* C helpers for the quant kernels: exact f16 -> f32, unaligned little-endian loads, an OpenMP barrier.
 *
 * Built twice (see setup.py): with -mf16c the conversion is one instruction (vcvtph2ps), without it
 * a bit-level conversion that is exact for every finite value, infinities and subnormals, so both
 * builds give the same floats as numpy's float16 -> float32 cast.
 */
#ifndef GGTRAIN_QUANT_UTIL_H
#define GGTRAIN_QUANT_UTIL_H

#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

static inline uint16_t gg_load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t gg_load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

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

/* Cython's prange inside a `with parallel()` block is an `omp for nowait`: this is the barrier
 * that separates its phases (an orphaned directive, bound to the enclosing parallel region). */
static inline void gg_omp_barrier(void) {
#pragma omp barrier
}

#endif
