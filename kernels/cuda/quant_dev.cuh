/* quant_dev.cuh - internals shared by kernels/cuda/dequant.cu and gemv.cu:
 * block geometry, unaligned-safe loads, exact small-int -> float tricks, the
 * exact fp16 decode, and the error-reporting helpers behind cuda_quant.h.
 * Not a public header (C++/CUDA only). */
#ifndef NUMOE_KERNELS_CUDA_QUANT_DEV_CUH
#define NUMOE_KERNELS_CUDA_QUANT_DEV_CUH

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

/* Pulled in only to check below that the byte offsets the kernels hard-code
 * match the structs the CPU side uses. */
#ifndef __cplusplus
#error "C++ only"
#endif
#include "kernels/quant.h"

#include "kernels/cuda/cuda_quant.h"

namespace numoe_cuda {

/* Offsets (bytes) of the fields inside each block, as the kernels use them.
 * Every block is read with byte offsets rather than through the structs
 * because most block sizes (18, 22, 34, 110, 210 bytes) leave the fields only
 * 2-byte aligned in a packed row. */
static_assert(offsetof(block_q4_0, qs) == 2, "q4_0 layout");
static_assert(offsetof(block_q4_1, m) == 2 && offsetof(block_q4_1, qs) == 4, "q4_1 layout");
static_assert(offsetof(block_q5_0, qh) == 2 && offsetof(block_q5_0, qs) == 6, "q5_0 layout");
static_assert(offsetof(block_q5_1, qh) == 4 && offsetof(block_q5_1, qs) == 8, "q5_1 layout");
static_assert(offsetof(block_q8_0, qs) == 2, "q8_0 layout");
static_assert(offsetof(block_q2_K, qs) == 16 && offsetof(block_q2_K, d) == 80 &&
              offsetof(block_q2_K, dmin) == 82, "q2_K layout");
static_assert(offsetof(block_q3_K, qs) == 32 && offsetof(block_q3_K, scales) == 96 &&
              offsetof(block_q3_K, d) == 108, "q3_K layout");
static_assert(offsetof(block_q4_K, scales) == 4 && offsetof(block_q4_K, qs) == 16, "q4_K layout");
static_assert(offsetof(block_q5_K, scales) == 4 && offsetof(block_q5_K, qh) == 16 &&
              offsetof(block_q5_K, qs) == 48, "q5_K layout");
static_assert(offsetof(block_q6_K, qh) == 128 && offsetof(block_q6_K, scales) == 192 &&
              offsetof(block_q6_K, d) == 208, "q6_K layout");

/* ---- error reporting (defined in dequant.cu) ---------------------------- */

/* Record a message for nm_cuda_last_error() and return code. */
int fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* After a launch: NM_CUDA_OK, or the launch error recorded and mapped to a
 * code (ENODEV when there is no kernel image for the device). */
int launch_check(const char *what, int type);

/* ---- loads ----------------------------------------------------------------
 * Four bytes at p as a little-endian word. A4: p is 4-byte aligned (the
 * caller checked the base pointer and that the block size is a multiple of
 * 4); otherwise two 16-bit loads, which every block layout allows since all
 * blocks start with/contain fp16 fields at even offsets and have even sizes. */
template <bool A4>
__device__ __forceinline__ uint32_t ld32(const uint8_t *p) {
    if (A4) return *reinterpret_cast<const uint32_t *>(p);
    const uint16_t *q = reinterpret_cast<const uint16_t *>(p);
    return (uint32_t)q[0] | ((uint32_t)q[1] << 16);
}

__device__ __forceinline__ uint16_t ld16(const uint8_t *p) {
    return *reinterpret_cast<const uint16_t *>(p);
}

/* 16 bytes at a 16-byte-aligned p, read-only and without allocating in L1:
 * a GEMV reads each weight once, and L1 is better kept for the activations
 * (measured with the fp32-x F16 GEMV: 3.78 -> 3.95 TB/s on an H200). */
__device__ __forceinline__ uint4 wld128(const uint8_t *p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

/* ---- exact integer -> float ----------------------------------------------
 * The float with bits 0x4B000000 | v is 2^23 + v for 0 <= v < 2^23, so a
 * byte becomes a float with one PRMT (splice the byte under the exponent)
 * and one FADD, both exact. The plain int->float conversion (I2F) runs at a
 * quarter or less of the FP32 rate on sm_80/sm_90 and would dominate the
 * inner loops. `magic` folds in a constant offset: 2^23 + off gives v - off
 * (exact, since |v - off| < 2^22). */
#define NM_MAGIC(off) (8388608.0f + (float)(off))

template <int J>
__device__ __forceinline__ float bytef(uint32_t w, float magic) {
    return __int_as_float((int)__byte_perm(w, 0x4B000000u, 0x7650u | J)) - magic;
}

/* The four bytes of w (byte 0 first) as floats, each minus magic's offset. */
__device__ __forceinline__ float4 bytes4(uint32_t w, float magic) {
    return make_float4(bytef<0>(w, magic), bytef<1>(w, magic), bytef<2>(w, magic),
                       bytef<3>(w, magic));
}

/* v (0 <= v < 2^22) minus off as float, exact. */
__device__ __forceinline__ float smallf(uint32_t v, float magic) {
    return __int_as_float((int)(0x4B000000u | v)) - magic;
}

/* The four bits t (0..15) of a nibble spread to bit 0 of each byte:
 * t * 0x00204081 places bit k of t at bit 9k (no overlaps, no carries). */
__device__ __forceinline__ uint32_t spread4(uint32_t t) {
    return (t * 0x00204081u) & 0x01010101u;
}

/* Scale and min of Q4_K / Q5_K sub-blocks 2c, 2c+1 as bytes 0, 1 of sc /
 * mn, from the block's 12 scale bytes as words u0..u2 (ggml's
 * get_scale_min_k4 for all eight at once, then a byte select). */
__device__ __forceinline__ void k4_scale_min(uint32_t u0, uint32_t u1, uint32_t u2, int c, uint32_t &sc,
                                             uint32_t &mn) {
    const uint32_t sl = u0 & 0x3f3f3f3fu, ml = u1 & 0x3f3f3f3fu;
    const uint32_t sh = (u2 & 0x0F0F0F0Fu) | (((u0 >> 6) & 0x03030303u) << 4);
    const uint32_t mh = ((u2 >> 4) & 0x0F0F0F0Fu) | (((u1 >> 6) & 0x03030303u) << 4);
    const uint32_t sel = (uint32_t)(2 * c) | ((uint32_t)(2 * c + 1) << 4);
    sc = __byte_perm(sl, sh, sel);
    mn = __byte_perm(ml, mh, sel);
}

/* ---- fp16 ------------------------------------------------------------------
 * Exact IEEE half -> float, written out as integer operations so that NaN
 * payloads are kept exactly as kernels/fp16.h nm_fp16_to_fp32 keeps them
 * (the dequantisers promise bit-exactness for any bytes). */
__device__ __forceinline__ float h2f_exact(uint32_t h) {
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    if (e == 0x1f) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
    if (e == 0) {
        const float mag = __fmul_rn(smallf(mant, NM_MAGIC(0)), 0x1p-24f);
        return sign ? -mag : mag;
    }
    return __uint_as_float(sign | ((e + 112u) << 23) | (mant << 13));
}

/* Fast half -> float for the GEMV (hardware cvt: exact for every finite and
 * infinite value; only NaN payloads may differ, irrelevant to a dot). */
__device__ __forceinline__ float h2f(uint16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

/* ---- type geometry -------------------------------------------------------- */
struct geom {
    int block;    /* elements per block */
    int bytes;    /* bytes per block */
};

/* Geometry of the types these kernels handle; {0, 0} for the others. */
static inline geom geom_of(int type) {
    switch (type) {
    case NM_TYPE_F32: return {1, 4};
    case NM_TYPE_F16: return {1, 2};
    case NM_TYPE_BF16: return {1, 2};
    case NM_TYPE_Q4_0: return {32, 18};
    case NM_TYPE_Q4_1: return {32, 20};
    case NM_TYPE_Q5_0: return {32, 22};
    case NM_TYPE_Q5_1: return {32, 24};
    case NM_TYPE_Q8_0: return {32, 34};
    case NM_TYPE_Q2_K: return {256, 84};
    case NM_TYPE_Q3_K: return {256, 110};
    case NM_TYPE_Q4_K: return {256, 144};
    case NM_TYPE_Q5_K: return {256, 176};
    case NM_TYPE_Q6_K: return {256, 210};
    default: return {0, 0};
    }
}

/* Name for messages (kept here so libnumoe_cuda.a needs nothing from the
 * CPU kernel library). */
static inline const char *type_name(int type) {
    switch (type) {
    case NM_TYPE_F32: return "F32";
    case NM_TYPE_F16: return "F16";
    case NM_TYPE_BF16: return "BF16";
    case NM_TYPE_Q4_0: return "Q4_0";
    case NM_TYPE_Q4_1: return "Q4_1";
    case NM_TYPE_Q5_0: return "Q5_0";
    case NM_TYPE_Q5_1: return "Q5_1";
    case NM_TYPE_Q8_0: return "Q8_0";
    case NM_TYPE_Q2_K: return "Q2_K";
    case NM_TYPE_Q3_K: return "Q3_K";
    case NM_TYPE_Q4_K: return "Q4_K";
    case NM_TYPE_Q5_K: return "Q5_K";
    case NM_TYPE_Q6_K: return "Q6_K";
    default: return "unsupported";
    }
}

} /* namespace numoe_cuda */

#endif
