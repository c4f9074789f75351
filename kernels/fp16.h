/* fp16.h - IEEE half and bfloat16 <-> float conversions in portable C.
 *
 * The quant formats store their scales as IEEE binary16 (ggml_half) and BF16
 * tensors as the upper half of a binary32, so every (de)quantiser goes through
 * these. They are bit-exact with ggml (ggml-impl.h) and with numpy:
 *   - half -> float is exact for every input (subnormals, inf, NaN payloads
 *     are kept; a binary16 value always fits in a binary32);
 *   - float -> half rounds to nearest, ties to even, overflows to inf, builds
 *     subnormals, and quiets NaNs (keeping the top payload bits), as F16C's
 *     vcvtps2ph does;
 *   - float -> bf16 follows ggml_compute_fp32_to_bf16: NaN -> (u >> 16) | 64
 *     (forced quiet), else round to nearest even on the upper 16 bits. No
 *     flush of subnormals (current ggml and gguf-py do not flush either).
 * No intrinsics: the SIMD files use F16C themselves where they need speed. */
#ifndef NUMOE_KERNELS_FP16_H
#define NUMOE_KERNELS_FP16_H

#include <stdint.h>
#include <string.h>

static inline uint32_t nm_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float nm_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float nm_fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f) /* inf / NaN: same payload, widened */
        return nm_f32_from_bits(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) { /* zero / subnormal: mant * 2^-24, exact in binary32 */
        const float mag = (float)mant * 0x1p-24f;
        return sign ? -mag : mag;
    }
    /* normal: rebias the exponent from 15 to 127 */
    return nm_f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

/* Round-to-nearest-even of m >> shift (shift 1..31). */
static inline uint32_t nm_rne_shift_(uint32_t m, int shift) {
    const uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    return q + (rem > half || (rem == half && (q & 1u)));
}

static inline uint16_t nm_fp32_to_fp16(float f) {
    const uint32_t u = nm_f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN: keep the top payload bits, force quiet */
        return (uint16_t)(sign | 0x7e00u | ((a & 0x7fffffu) >> 13));
    if (a >= 0x47800000u) /* >= 65536 (or inf): beyond any rounding */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below 2^-14: half subnormal or zero */
        const int e = (int)(a >> 23);
        if (e < 102) /* below 2^-25, half the smallest subnormal: 0 */
            return sign;
        /* value = m * 2^(e-150), in units of 2^-24 that is m >> (126 - e);
         * rounding up to 0x400 yields the smallest normal, as it should */
        const uint32_t m = (a & 0x7fffffu) | 0x800000u;
        return (uint16_t)(sign | nm_rne_shift_(m, 126 - e));
    }
    /* normal: rebias exponent, round the 13 dropped mantissa bits; a carry
     * runs into the exponent, and 65520.. rounds up to inf (0x7c00) */
    const uint32_t h = (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu);
    const uint32_t rem = a & 0x1fffu;
    return (uint16_t)(sign | (h + (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))));
}

static inline float nm_bf16_to_fp32(uint16_t b) {
    return nm_f32_from_bits((uint32_t)b << 16);
}

static inline uint16_t nm_fp32_to_bf16(float f) {
    const uint32_t u = nm_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 64u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#endif
