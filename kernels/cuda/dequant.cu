/* dequant.cu - GPU dequantisation of ggml-layout tensors to float32, plus
 * the error/availability half of the cuda_quant.h API.
 *
 * Bit-exact with the CPU reference (kernels/dequant.c) and ggml's
 * dequantize_row_*: every output is the same binary32 operations in the same
 * order,
 *   y = d * q                 Q4_0, Q5_0, Q8_0
 *   y = d * q + m             Q4_1, Q5_1
 *   y = (d * sc) * q - (dmin * m)   Q2_K, Q4_K, Q5_K
 *   y = (d * sc) * q          Q3_K, Q6_K
 * with integers q, sc, m converted to float exactly. nvcc contracts a*b - c
 * into one FMA by default (-fmad=true), which rounds once instead of twice
 * and would differ from the CPU by up to an ulp of a*b -- arbitrarily many
 * ulps of y when d*sc*q and dmin*m nearly cancel. So every product and sum
 * here is an explicit __fmul_rn / __fadd_rn / __fsub_rn, which the compiler
 * never fuses: exactness holds whatever -fmad says, and no special flag is
 * needed.
 *
 * Work split: one thread per "lane unit" of a block (4 units for 32-element
 * blocks, 16 for 256-element K-quant blocks; each unit 8 or 16 outputs), the
 * same split the GEMV kernels use, in a grid-stride loop so n may exceed
 * 2^31 elements. */
#include "kernels/cuda/quant_dev.cuh"

#include <cuda_bf16.h>

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

namespace numoe_cuda {

/* ---- errors ------------------------------------------------------------- */

static thread_local char g_msg[512];

int fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, sizeof g_msg, fmt, ap);
    va_end(ap);
    return code;
}

int launch_check(const char *what, int type) {
    const cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return NM_CUDA_OK;
    const int code = (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction ||
                      e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
                         ? NM_CUDA_ENODEV
                         : NM_CUDA_ERUNTIME;
    return fail(code, "%s (type %s): %s (%s)", what, type_name(type), cudaGetErrorString(e),
                cudaGetErrorName(e));
}

/* ---- helpers -------------------------------------------------------------- */

/* Four outputs; V4: y is 16-byte aligned (one vector store). */
template <bool V4>
__device__ __forceinline__ void st4(float *y, float4 v) {
    if (V4) {
        *reinterpret_cast<float4 *>(y) = v;
        return;
    }
    y[0] = v.x;
    y[1] = v.y;
    y[2] = v.z;
    y[3] = v.w;
}

/* The same four as bf16, each rounded to nearest even from the exact
 * float (nm_cuda_dequantize_bf16); V4: y is 8-byte aligned. */
template <bool V4>
__device__ __forceinline__ void st4(__nv_bfloat16 *y, float4 v) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    if (V4) {
        uint2 u;
        u.x = *reinterpret_cast<const uint32_t *>(&a);
        u.y = *reinterpret_cast<const uint32_t *>(&b);
        *reinterpret_cast<uint2 *>(y) = u;
        return;
    }
    y[0] = a.x;
    y[1] = a.y;
    y[2] = b.x;
    y[3] = b.y;
}

/* d * q, elementwise, each product rounded on its own. */
__device__ __forceinline__ float4 mul4(float4 q, float d) {
    return make_float4(__fmul_rn(d, q.x), __fmul_rn(d, q.y), __fmul_rn(d, q.z), __fmul_rn(d, q.w));
}

/* d * q + m (Q4_1, Q5_1): the product rounded, then the sum. */
__device__ __forceinline__ float4 mul_add4(float4 q, float d, float m) {
    return make_float4(__fadd_rn(__fmul_rn(d, q.x), m), __fadd_rn(__fmul_rn(d, q.y), m),
                       __fadd_rn(__fmul_rn(d, q.z), m), __fadd_rn(__fmul_rn(d, q.w), m));
}

/* dl * q - ml (K-quants with mins). */
__device__ __forceinline__ float4 mul_sub4(float4 q, float dl, float ml) {
    return make_float4(__fsub_rn(__fmul_rn(dl, q.x), ml), __fsub_rn(__fmul_rn(dl, q.y), ml),
                       __fsub_rn(__fmul_rn(dl, q.z), ml), __fsub_rn(__fmul_rn(dl, q.w), ml));
}

/* Byte J of w as an exact float. */
template <int J>
__device__ __forceinline__ float ubyte(uint32_t w) {
    return smallf((w >> (8 * J)) & 0xffu, NM_MAGIC(0));
}

/* ---- per-type lane units ---------------------------------------------------
 * run<A4, V4>(b, s, y): block at b, unit s (0 .. LANES-1), block output at
 * y; A4: 4-byte loads allowed, V4: y is 16-byte aligned. */

struct DQ_Q4_0 {
    static constexpr int QK = 32, BYTES = 18, LANES = 4;
    /* unit s: qs bytes 4s..4s+3 -> elements 4s.. (low nibbles), 16+4s.. (high) */
    template <bool A4, bool V4, class O>
    __device__ static void run(const uint8_t *b, int s, O *y) {
        const float d = h2f_exact(ld16(b));
        const uint32_t w = ld32<A4>(b + 2 + 4 * s);
        st4<V4>(y + 4 * s, mul4(bytes4(w & 0x0F0F0F0Fu, NM_MAGIC(8)), d));
        st4<V4>(y + 16 + 4 * s, mul4(bytes4((w >> 4) & 0x0F0F0F0Fu, NM_MAGIC(8)), d));
    }
};

struct DQ_Q4_1 {
    static constexpr int QK = 32, BYTES = 20, LANES = 4;
    template <bool A4, bool V4, class O>
    __device__ static void run(const uint8_t *b, int s, O *y) {
        const float d = h2f_exact(ld16(b)), m = h2f_exact(ld16(b + 2));
        const uint32_t w = ld32<A4>(b + 4 + 4 * s);
        st4<V4>(y + 4 * s, mul_add4(bytes4(w & 0x0F0F0F0Fu, NM_MAGIC(0)), d, m));
        st4<V4>(y + 16 + 4 * s, mul_add4(bytes4((w >> 4) & 0x0F0F0F0Fu, NM_MAGIC(0)), d, m));
    }
};

/* Fifth bits of elements 4s..4s+3 (qh bits 4s..) and 16+4s.. (bits 16+4s..),
 * moved to bit 4 of each byte. */
__device__ __forceinline__ void q5_high(uint32_t qh, int s, uint32_t &lo, uint32_t &hi) {
    lo = spread4((qh >> (4 * s)) & 0xFu) << 4;
    hi = spread4((qh >> (16 + 4 * s)) & 0xFu) << 4;
}

struct DQ_Q5_0 {
    static constexpr int QK = 32, BYTES = 22, LANES = 4;
    template <bool A4, bool V4, class O>
    __device__ static void run(const uint8_t *b, int s, O *y) {
        const float d = h2f_exact(ld16(b));
        const uint32_t qh = ld32<A4>(b + 2), w = ld32<A4>(b + 6 + 4 * s);
        uint32_t hl, hh;
        q5_high(qh, s, hl, hh);
        st4<V4>(y + 4 * s, mul4(bytes4((w & 0x0F0F0F0Fu) | hl, NM_MAGIC(16)), d));
        st4<V4>(y + 16 + 4 * s, mul4(bytes4(((w >> 4) & 0x0F0F0F0Fu) | hh, NM_MAGIC(16)), d));
    }
};

struct DQ_Q5_1 {
    static constexpr int QK = 32, BYTES = 24, LANES = 4;
    template <bool A4, bool V4, class O>
    __device__ static void run(const uint8_t *b, int s, O *y) {
        const float d = h2f_exact(ld16(b)), m = h2f_exact(ld16(b + 2));
        const uint32_t qh = ld32<A4>(b + 4), w = ld32<A4>(b + 8 + 4 * s);
        uint32_t hl, hh;
        q5_high(qh, s, hl, hh);
        st4<V4>(y + 4 * s, mul_add4(bytes4((w & 0x0F0F0F0Fu) | hl, NM_MAGIC(0)), d, m));
        st4<V4>(y + 16 + 4 * s, mul_add4(bytes4(((w >> 4) & 0x0F0F0F0Fu) | hh, NM_MAGIC(0)), d, m));
    }
};

struct DQ_Q8_0 {
    static constexpr int QK = 32, BYTES = 34, LANES = 4;
    /* unit s: elements 8s..8s+7; int8 via the byte xor 0x80 = q + 128 */
    template <bool A4, bool V4, class O>
    __device__ static void run(const uint8_t *b, int s, O *y) {
        const float d = h2f_exact(ld16(b));
        const uint32_t w0 = ld32<A4>(b + 2 + 8 * s) ^ 0x80808080u;
        const uint32_t w1 = ld32<A4>(b + 6 + 8 * s) ^ 0x80808080u;
        st4<V4>(y + 8 * s, mul4(bytes4(w0, NM_MAGIC(128)), d));
        st4<V4>(y + 8 * s + 4, mul4(bytes4(w1, NM_MAGIC(128)), d));
    }
};

/* Q2_K / Q3_K unit t (0..15): half n = t/8, qs bytes l0 = 4(t%8) .. l0+3 of
 * that half; bit pair 2j of qs byte l is element 128n + 32j + l, in
 * sub-block 8n + 2j + (l >= 16). So the unit's sub-blocks are 8n + 2j + h,
 * h = (t%8 >= 4), j = 0..3. */
struct DQ_Q2_K {
    static constexpr int QK = 256, BYTES = 84, LANES = 16;
    template <bool A4, bool V4, class O>
    __device__ static void run(const uint8_t *b, int t, O *y) {
        const int n = t >> 3, l0 = 4 * (t & 7), h = (t & 7) >= 4;
        const float d = h2f_exact(ld16(b + 80)), dmin = h2f_exact(ld16(b + 82));
        const uint32_t w = ld32<A4>(b + 16 + 32 * n + l0);
        /* scales[8n + h + 2j], j = 0..3, into bytes 0..3 */
        const uint32_t sc = __byte_perm(ld32<A4>(b + 8 * n), ld32<A4>(b + 8 * n + 4), h ? 0x7531u : 0x6420u);
        O *yy = y + 128 * n + l0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t sj = (sc >> (8 * j)) & 0xffu;
            const float dl = __fmul_rn(d, smallf(sj & 0xFu, NM_MAGIC(0)));
            const float ml = __fmul_rn(dmin, smallf(sj >> 4, NM_MAGIC(0)));
            st4<V4>(yy + 32 * j, mul_sub4(bytes4((w >> (2 * j)) & 0x03030303u, NM_MAGIC(0)), dl, ml));
        }
    }
};

/* Q3_K 6-bit scales (minus 32) of sub-blocks 8n + h + 2j, j = 0..3, as bytes
 * 0..3 of the result. Scale s: low 4 bits = nibble (s >= 8 ? high : low) of
 * scales[s % 8], high 2 bits = bits 2(s/4).. of scales[8 + s%4]. Here s%8 =
 * h + 2j, s%4 = h + 2(j&1), s/4 = 2n + (j>>1). */
template <bool A4>
__device__ __forceinline__ uint32_t q3k_scales(const uint8_t *b, int n, int h) {
    const uint32_t s0 = ld32<A4>(b + 96), s1 = ld32<A4>(b + 100), s2 = ld32<A4>(b + 104);
    const uint32_t lo = (__byte_perm(s0, s1, h ? 0x7531u : 0x6420u) >> (4 * n)) & 0x0F0F0F0Fu;
    const uint32_t hb = __byte_perm(s2, 0, h ? 0x3131u : 0x2020u);
    const uint32_t hi = (((hb >> (4 * n)) & 0x0303u) | ((hb >> (4 * n + 2)) & 0x03030000u));
    return lo | (hi << 4);
}

struct DQ_Q3_K {
    static constexpr int QK = 256, BYTES = 110, LANES = 16;
    template <bool A4, bool V4, class O>
    __device__ static void run(const uint8_t *b, int t, O *y) {
        const int n = t >> 3, l0 = 4 * (t & 7), h = (t & 7) >= 4;
        const float d = h2f_exact(ld16(b + 108));
        const uint32_t w = ld32<A4>(b + 32 + 32 * n + l0);
        const uint32_t hm = ld32<A4>(b + l0); /* hmask[l0..l0+3] */
        const uint32_t sc = q3k_scales<A4>(b, n, h);
        O *yy = y + 128 * n + l0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            /* q + 4 = low 2 bits | (hmask bit 4n+j) << 2, in 0..7 */
            const uint32_t q = ((w >> (2 * j)) & 0x03030303u) | (((hm >> (4 * n + j)) & 0x01010101u) << 2);
            const float dl = __fmul_rn(d, smallf((sc >> (8 * j)) & 0xffu, NM_MAGIC(32)));
            st4<V4>(yy + 32 * j, mul4(bytes4(q, NM_MAGIC(4)), dl));
        }
    }
};

/* Q4_K/Q5_K 6-bit scales and mins, ggml's get_scale_min_k4 for all 8
 * sub-blocks at once: sc[0..7] in bytes of (sc_lo, sc_hi), m[0..7] in
 * (m_lo, m_hi). */
template <bool A4>
__device__ __forceinline__ void k4_scales(const uint8_t *b, uint32_t &sc_lo, uint32_t &sc_hi, uint32_t &m_lo,
                                          uint32_t &m_hi) {
    const uint32_t u0 = ld32<A4>(b + 4), u1 = ld32<A4>(b + 8), u2 = ld32<A4>(b + 12);
    sc_lo = u0 & 0x3f3f3f3fu;                                          /* sc 0-3: low 6 bits of bytes 0-3 */
    m_lo = u1 & 0x3f3f3f3fu;                                           /* m 0-3: low 6 bits of bytes 4-7 */
    sc_hi = (u2 & 0x0f0f0f0fu) | (((u0 >> 6) & 0x03030303u) << 4);     /* sc 4-7 */
    m_hi = ((u2 >> 4) & 0x0f0f0f0fu) | (((u1 >> 6) & 0x03030303u) << 4); /* m 4-7 */
}

/* Q4_K/Q5_K unit t (0..15): chunk c = t/4 (64 elements, sub-blocks 2c and
 * 2c+1), qs bytes 32c + 8k .. +8 (k = t%4): low nibbles are elements
 * 64c + 8k + i, high nibbles 64c + 32 + 8k + i. */
struct DQ_Q4_K {
    static constexpr int QK = 256, BYTES = 144, LANES = 16;
    template <bool A4, bool V4, class O>
    __device__ static void run(const uint8_t *b, int t, O *y) {
        const int c = t >> 2, k = t & 3;
        const float d = h2f_exact(ld16(b)), dmin = h2f_exact(ld16(b + 2));
        uint32_t sl, sh, ml, mh;
        k4_scales<A4>(b, sl, sh, ml, mh);
        const uint32_t sel = (uint32_t)(2 * c) | ((uint32_t)(2 * c + 1) << 4);
        const uint32_t sc = __byte_perm(sl, sh, sel), mn = __byte_perm(ml, mh, sel);
        const float d1 = __fmul_rn(d, smallf(sc & 0xffu, NM_MAGIC(0)));
        const float m1 = __fmul_rn(dmin, smallf(mn & 0xffu, NM_MAGIC(0)));
        const float d2 = __fmul_rn(d, smallf((sc >> 8) & 0xffu, NM_MAGIC(0)));
        const float m2 = __fmul_rn(dmin, smallf((mn >> 8) & 0xffu, NM_MAGIC(0)));
        const uint32_t w0 = ld32<A4>(b + 16 + 32 * c + 8 * k), w1 = ld32<A4>(b + 20 + 32 * c + 8 * k);
        O *yy = y + 64 * c + 8 * k;
        st4<V4>(yy, mul_sub4(bytes4(w0 & 0x0F0F0F0Fu, NM_MAGIC(0)), d1, m1));
        st4<V4>(yy + 4, mul_sub4(bytes4(w1 & 0x0F0F0F0Fu, NM_MAGIC(0)), d1, m1));
        st4<V4>(yy + 32, mul_sub4(bytes4((w0 >> 4) & 0x0F0F0F0Fu, NM_MAGIC(0)), d2, m2));
        st4<V4>(yy + 36, mul_sub4(bytes4((w1 >> 4) & 0x0F0F0F0Fu, NM_MAGIC(0)), d2, m2));
    }
};

/* Q5_K: as Q4_K; the fifth bit of element 64c + l is bit 2c of qh[l], of
 * element 64c + 32 + l bit 2c + 1. */
struct DQ_Q5_K {
    static constexpr int QK = 256, BYTES = 176, LANES = 16;
    template <bool A4, bool V4, class O>
    __device__ static void run(const uint8_t *b, int t, O *y) {
        const int c = t >> 2, k = t & 3;
        const float d = h2f_exact(ld16(b)), dmin = h2f_exact(ld16(b + 2));
        uint32_t sl, sh, ml, mh;
        k4_scales<A4>(b, sl, sh, ml, mh);
        const uint32_t sel = (uint32_t)(2 * c) | ((uint32_t)(2 * c + 1) << 4);
        const uint32_t sc = __byte_perm(sl, sh, sel), mn = __byte_perm(ml, mh, sel);
        const float d1 = __fmul_rn(d, smallf(sc & 0xffu, NM_MAGIC(0)));
        const float m1 = __fmul_rn(dmin, smallf(mn & 0xffu, NM_MAGIC(0)));
        const float d2 = __fmul_rn(d, smallf((sc >> 8) & 0xffu, NM_MAGIC(0)));
        const float m2 = __fmul_rn(dmin, smallf((mn >> 8) & 0xffu, NM_MAGIC(0)));
        const uint32_t h0 = ld32<A4>(b + 16 + 8 * k), h1 = ld32<A4>(b + 20 + 8 * k);
        const uint32_t w0 = ld32<A4>(b + 48 + 32 * c + 8 * k), w1 = ld32<A4>(b + 52 + 32 * c + 8 * k);
        const uint32_t q0 = (w0 & 0x0F0F0F0Fu) | (((h0 >> (2 * c)) & 0x01010101u) << 4);
        const uint32_t q1 = (w1 & 0x0F0F0F0Fu) | (((h1 >> (2 * c)) & 0x01010101u) << 4);
        const uint32_t q2 = ((w0 >> 4) & 0x0F0F0F0Fu) | (((h0 >> (2 * c + 1)) & 0x01010101u) << 4);
        const uint32_t q3 = ((w1 >> 4) & 0x0F0F0F0Fu) | (((h1 >> (2 * c + 1)) & 0x01010101u) << 4);
        O *yy = y + 64 * c + 8 * k;
        st4<V4>(yy, mul_sub4(bytes4(q0, NM_MAGIC(0)), d1, m1));
        st4<V4>(yy + 4, mul_sub4(bytes4(q1, NM_MAGIC(0)), d1, m1));
        st4<V4>(yy + 32, mul_sub4(bytes4(q2, NM_MAGIC(0)), d2, m2));
        st4<V4>(yy + 36, mul_sub4(bytes4(q3, NM_MAGIC(0)), d2, m2));
    }
};

/* Q6_K unit t (0..15): half n = t/8, l0 = 4(t%8): ql[64n + l0..] (a),
 * ql[64n + 32 + l0..] (b), qh[32n + l0..]; elements 128n + 32k + l0 + i for
 * k = 0..3 (a low, b low, a high, b high nibbles; qh bit pairs 0,2,4,6), with
 * int8 scales[8n + l0/16 + 2k]. */
struct DQ_Q6_K {
    static constexpr int QK = 256, BYTES = 210, LANES = 16;
    template <bool A4, bool V4, class O>
    __device__ static void run(const uint8_t *b, int t, O *y) {
        const int n = t >> 3, l0 = 4 * (t & 7), is = (t & 7) >> 2;
        const float d = h2f_exact(ld16(b + 208));
        const uint32_t qa = ld32<A4>(b + 64 * n + l0), qb = ld32<A4>(b + 64 * n + 32 + l0);
        const uint32_t qh = ld32<A4>(b + 128 + 32 * n + l0);
        const uint32_t sc = __byte_perm(ld32<A4>(b + 192 + 8 * n), ld32<A4>(b + 196 + 8 * n), is ? 0x7531u : 0x6420u) ^
                            0x80808080u; /* signed bytes + 128 */
        const uint32_t q[4] = {
            (qa & 0x0F0F0F0Fu) | ((qh & 0x03030303u) << 4),
            (qb & 0x0F0F0F0Fu) | (((qh >> 2) & 0x03030303u) << 4),
            ((qa >> 4) & 0x0F0F0F0Fu) | (((qh >> 4) & 0x03030303u) << 4),
            ((qb >> 4) & 0x0F0F0F0Fu) | (((qh >> 6) & 0x03030303u) << 4),
        };
        O *yy = y + 128 * n + l0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float dl = __fmul_rn(d, smallf((sc >> (8 * k)) & 0xffu, NM_MAGIC(128)));
            st4<V4>(yy + 32 * k, mul4(bytes4(q[k], NM_MAGIC(32)), dl));
        }
    }
};

/* ---- kernels -------------------------------------------------------------- */

template <class T, bool A4, bool V4, class O>
__global__ void __launch_bounds__(256) k_dequant(const uint8_t *__restrict__ src, O *__restrict__ dst,
                                                 int64_t units) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += stride) {
        const int64_t blk = u / T::LANES;
        T::template run<A4, V4, O>(src + blk * T::BYTES, (int)(u % T::LANES), dst + blk * T::QK);
    }
}

/* float types to bf16 (F32, F16 exactly through float, BF16 copied) */
__global__ void __launch_bounds__(256) k_to_bf16(int type, const void *__restrict__ src, __nv_bfloat16 *__restrict__ dst,
                                                 int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        if (type == NM_TYPE_BF16) {
            dst[i] = reinterpret_cast<const __nv_bfloat16 *>(src)[i];
            continue;
        }
        const float v = type == NM_TYPE_F32 ? static_cast<const float *>(src)[i]
                                            : h2f_exact(static_cast<const uint16_t *>(src)[i]);
        dst[i] = __float2bfloat16_rn(v);
    }
}

/* rows of x (ldx apart) to dense bf16 rows of cols */
__global__ void __launch_bounds__(256) k_rows_bf16(const float *__restrict__ x, int64_t ldx, int64_t cols,
                                                   __nv_bfloat16 *__restrict__ dst, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int64_t r = i / cols, c = i % cols;
        dst[i] = __float2bfloat16_rn(x[r * ldx + c]);
    }
}

__global__ void __launch_bounds__(256) k_dequant_f16(const uint16_t *__restrict__ src, float *__restrict__ dst,
                                                     int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = h2f_exact(src[i]);
}

__global__ void __launch_bounds__(256) k_dequant_bf16(const uint16_t *__restrict__ src, float *__restrict__ dst,
                                                      int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = __uint_as_float((uint32_t)src[i] << 16);
}

/* Grid for a grid-stride loop over `work` items: enough blocks to fill any
 * current GPU many times over, capped so the count stays a small int. */
static unsigned grid_for(int64_t work) {
    const int64_t blocks = (work + 255) / 256;
    return (unsigned)(blocks < 65536 ? blocks : 65536);
}

template <class T, class O>
static int launch_dequant(int type, const void *src, O *dst, int64_t n, cudaStream_t st) {
    const int64_t units = n / T::QK * T::LANES;
    const uint8_t *s = static_cast<const uint8_t *>(src);
    const bool a4 = T::BYTES % 4 == 0 && (uintptr_t)src % 4 == 0, v4 = (uintptr_t)dst % (4 * sizeof(O)) == 0;
    const unsigned grid = grid_for(units);
    if (a4 && v4) k_dequant<T, true, true, O><<<grid, 256, 0, st>>>(s, dst, units);
    else if (a4) k_dequant<T, true, false, O><<<grid, 256, 0, st>>>(s, dst, units);
    else if (v4) k_dequant<T, false, true, O><<<grid, 256, 0, st>>>(s, dst, units);
    else k_dequant<T, false, false, O><<<grid, 256, 0, st>>>(s, dst, units);
    return launch_check("nm_cuda_dequantize", type);
}

/* The quantised types' kernels, for either output type. */
template <class O>
static int dequant_quants(int type, const void *d_src, O *d_dst, int64_t n, cudaStream_t st) {
    switch (type) {
    case NM_TYPE_Q4_0: return launch_dequant<DQ_Q4_0>(type, d_src, d_dst, n, st);
    case NM_TYPE_Q4_1: return launch_dequant<DQ_Q4_1>(type, d_src, d_dst, n, st);
    case NM_TYPE_Q5_0: return launch_dequant<DQ_Q5_0>(type, d_src, d_dst, n, st);
    case NM_TYPE_Q5_1: return launch_dequant<DQ_Q5_1>(type, d_src, d_dst, n, st);
    case NM_TYPE_Q8_0: return launch_dequant<DQ_Q8_0>(type, d_src, d_dst, n, st);
    case NM_TYPE_Q2_K: return launch_dequant<DQ_Q2_K>(type, d_src, d_dst, n, st);
    case NM_TYPE_Q3_K: return launch_dequant<DQ_Q3_K>(type, d_src, d_dst, n, st);
    case NM_TYPE_Q4_K: return launch_dequant<DQ_Q4_K>(type, d_src, d_dst, n, st);
    case NM_TYPE_Q5_K: return launch_dequant<DQ_Q5_K>(type, d_src, d_dst, n, st);
    case NM_TYPE_Q6_K: return launch_dequant<DQ_Q6_K>(type, d_src, d_dst, n, st);
    default: return fail(NM_CUDA_ETYPE, "nm_cuda_dequantize: type %d not supported", type);
    }
}

/* The checks both dequantisers share: 1 (with the error code in *rc) when
 * the call must return at once: a bad argument, or nothing to do (n 0). */
static bool dequant_args_done(const char *fn, int type, const void *src, const void *dst, int64_t n, int dst_align,
                              int *rc) {
    const geom g = geom_of(type);
    *rc = NM_CUDA_OK;
    if (!g.block) *rc = fail(NM_CUDA_ETYPE, "%s: type %d (%s) not supported", fn, type, type_name(type));
    else if (n < 0 || n % g.block)
        *rc = fail(NM_CUDA_EINVAL, "%s: n=%lld is not a non-negative multiple of %s's block size %d", fn, (long long)n,
                   type_name(type), g.block);
    else if (n == 0) return true;
    else if (!src || !dst) *rc = fail(NM_CUDA_EINVAL, "%s: NULL pointer", fn);
    else if ((uintptr_t)src % (type == NM_TYPE_F32 ? 4 : 2) || (uintptr_t)dst % dst_align)
        *rc = fail(NM_CUDA_EALIGN, "%s: src %p or dst %p misaligned for %s", fn, src, dst, type_name(type));
    return *rc != NM_CUDA_OK;
}

extern "C" int nm_cuda_dequantize_bf16(int type, const void *d_src, void *d_dst, int64_t n, void *stream) {
    int rc;
    if (dequant_args_done("nm_cuda_dequantize_bf16", type, d_src, d_dst, n, 2, &rc)) return rc;
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    __nv_bfloat16 *dst = static_cast<__nv_bfloat16 *>(d_dst);
    if (type == NM_TYPE_F32 || type == NM_TYPE_F16 || type == NM_TYPE_BF16) {
        k_to_bf16<<<grid_for(n), 256, 0, st>>>(type, d_src, dst, n);
        return launch_check("nm_cuda_dequantize_bf16", type);
    }
    return dequant_quants(type, d_src, dst, n, st);
}

extern "C" int nm_cuda_rows_to_bf16(const float *d_x, int64_t ldx, int64_t n, int64_t cols, void *d_dst,
                                    void *stream) {
    if (n < 0 || cols < 0 || ldx < cols || (n && (!d_x || !d_dst)))
        return fail(NM_CUDA_EINVAL, "nm_cuda_rows_to_bf16: n=%lld cols=%lld ldx=%lld or a NULL pointer", (long long)n,
                    (long long)cols, (long long)ldx);
    if (!n || !cols) return NM_CUDA_OK;
    if ((uintptr_t)d_x % 4 || (uintptr_t)d_dst % 2)
        return fail(NM_CUDA_EALIGN, "nm_cuda_rows_to_bf16: x %p or dst %p misaligned", (const void *)d_x, d_dst);
    k_rows_bf16<<<grid_for(n * cols), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        d_x, ldx, cols, static_cast<__nv_bfloat16 *>(d_dst), n * cols);
    return launch_check("nm_cuda_rows_to_bf16", NM_TYPE_F32);
}

__global__ void k_probe() {}

} /* namespace numoe_cuda */

using namespace numoe_cuda;

extern "C" const char *nm_cuda_strerror(int code) {
    switch (code) {
    case NM_CUDA_OK: return "success";
    case NM_CUDA_EINVAL: return "invalid argument";
    case NM_CUDA_ETYPE: return "unsupported type";
    case NM_CUDA_EALIGN: return "misaligned pointer";
    case NM_CUDA_ENODEV: return "no usable CUDA device";
    case NM_CUDA_ERUNTIME: return "CUDA runtime error";
    default: return "unknown error code";
    }
}

extern "C" const char *nm_cuda_last_error(void) { return g_msg; }

extern "C" int nm_cuda_available(char *msg, size_t n) {
    char tmp[512];
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count <= 0) {
        if (e != cudaSuccess)
            snprintf(tmp, sizeof tmp, "no CUDA device (%.100s: %.200s)", cudaGetErrorName(e), cudaGetErrorString(e));
        else
            snprintf(tmp, sizeof tmp, "no CUDA device");
        cudaGetLastError(); /* do not leave the error for the caller's next check */
        count = 0;
    } else {
        int dev = 0;
        cudaDeviceProp p;
        memset(&p, 0, sizeof p);
        cudaGetDevice(&dev);
        e = cudaGetDeviceProperties(&p, dev);
        cudaFuncAttributes fa;
        const cudaError_t fe = e == cudaSuccess ? cudaFuncGetAttributes(&fa, k_probe) : e;
        if (e != cudaSuccess || fe != cudaSuccess) {
            snprintf(tmp, sizeof tmp, "device %d (%.100s, sm_%d%d) unusable: %.200s (this build targets sm_90)", dev,
                     e == cudaSuccess ? p.name : "?", p.major, p.minor, cudaGetErrorString(fe));
            cudaGetLastError();
            count = 0;
        } else {
            snprintf(tmp, sizeof tmp, "device %d of %d: %.200s, sm_%d%d, %d SMs, %.1f GiB, L2 %.0f MiB", dev, count,
                     p.name, p.major, p.minor, p.multiProcessorCount, (double)p.totalGlobalMem / (1 << 30),
                     (double)p.l2CacheSize / (1 << 20));
        }
    }
    if (msg && n) snprintf(msg, n, "%s", tmp);
    return count;
}

extern "C" int nm_cuda_supports_dequantize(int type) { return geom_of(type).block != 0; }

extern "C" int nm_cuda_dequantize(int type, const void *d_src, float *d_dst, int64_t n, void *stream) {
    int rc;
    if (dequant_args_done("nm_cuda_dequantize", type, d_src, d_dst, n, 4, &rc)) return rc;
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    switch (type) {
    case NM_TYPE_F32: {
        const cudaError_t e = cudaMemcpyAsync(d_dst, d_src, (size_t)n * 4, cudaMemcpyDeviceToDevice, st);
        if (e != cudaSuccess) {
            cudaGetLastError();
            return fail(NM_CUDA_ERUNTIME, "nm_cuda_dequantize (F32 copy): %s", cudaGetErrorString(e));
        }
        return NM_CUDA_OK;
    }
    case NM_TYPE_F16:
        k_dequant_f16<<<grid_for(n), 256, 0, st>>>(static_cast<const uint16_t *>(d_src), d_dst, n);
        return launch_check("nm_cuda_dequantize", type);
    case NM_TYPE_BF16:
        k_dequant_bf16<<<grid_for(n), 256, 0, st>>>(static_cast<const uint16_t *>(d_src), d_dst, n);
        return launch_check("nm_cuda_dequantize", type);
    default: return dequant_quants(type, d_src, d_dst, n, st);
    }
}
