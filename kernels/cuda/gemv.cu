/* gemv.cu - y = W x over weight rows in ggml block layout, x and y float32.
 *
 * Design (batch-1 decode, where reading W once is the whole cost):
 *  - a CTA owns one row (NM_GEMV_ROWS); its warps (up to NM_GEMV_WARPS = 4)
 *    split the row's blocks (split-K), and the 32 lanes of a warp split each
 *    block into LANES units (4 per 32-element block, 16 per 256-element
 *    K-quant block, so a warp covers 8 legacy or 2 K-quant blocks per step);
 *    neighbouring lanes read neighbouring 4-byte words, so a warp's weight
 *    loads are contiguous. Split-K matters because decode shapes have few
 *    rows (576 .. 7168 in DeepSeek's dense part): one warp per row left the
 *    GPU with too few warps in flight (F16 4096 x 14336: 2.2 -> 4.0 TB/s);
 *  - each lane loads the activations of its unit (float4, read-only path)
 *    next to the weights;
 *  - quants become floats without I2F (quarter rate on sm_90): the byte is
 *    spliced under the exponent of 2^23 and 2^23 (plus the format's zero
 *    point) subtracted (quant_dev.cuh bytef), both exact;
 *  - block scales are factored out of the inner sums: a sub-block adds
 *    (d*sc) * sum(q*x) - (dmin*m) * sum(x), so a weight costs one splice,
 *    one subtraction and one FMA;
 *  - fp32 accumulation throughout; lanes meet through a shuffle tree, warps
 *    through shared memory.
 * The result agrees with a double dot over the dequantised row to fp32
 * rounding (the test's bound: 2e-5 * sum|w x| + 2e-6 * max|w| * sum|x|);
 * it is not bit-equal to any CPU path (different summation order), and x is
 * NOT quantised (ggml and numoe's CPU dot quantise x to Q8; this path keeps
 * x in fp32 and is therefore more accurate than either).
 *
 * Performance (H200, 4096 x 14336, DRAM-resident weights): float rows run at
 * ~3.8-4.2 TB/s (near the 4.8 TB/s peak); quantised rows at ~0.7-2.1 TB/s
 * (Q4_K ~1.3, Q6_K ~1.8, Q8_0 ~2.1). The quant kernels are bound by integer
 * issue (unpacking, one PRMT per weight, address math), not by memory:
 * their time tracks the number of weights, not bytes. Batching U steps of
 * loads ahead of the math (NM_GEMV_U) or raising occupancy did not help.
 * kernels/cuda/gemv_q8.cu goes past this for the common quant types: x
 * quantised once to int8 and dp4a, and wide loads (the per-lane 2- and
 * 4-byte loads here also spend L1 wavefronts: ~9 cache lines per warp load
 * for 64-128 useful bytes).
 *
 * No scratch memory is used: every supported type has a direct kernel.
 *
 * Tunables (compile-time, for experiments; defaults measured best):
 * NM_GEMV_ROWS (rows per CTA, 1), NM_GEMV_WARPS (max warps per row, 4),
 * NM_GEMV_U (steps of loads issued before computing, 1), NM_GEMV_MINB
 * (__launch_bounds__ min blocks per SM, 1). */
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/quant_dev.cuh"

#ifndef NM_GEMV_ROWS
#define NM_GEMV_ROWS 1
#endif
#ifndef NM_GEMV_WARPS
#define NM_GEMV_WARPS 4
#endif
#ifndef NM_GEMV_U
#define NM_GEMV_U 1
#endif
#ifndef NM_GEMV_MINB
#define NM_GEMV_MINB 1
#endif

namespace numoe_cuda {
namespace {

constexpr int ROWS = NM_GEMV_ROWS;
constexpr int MAXW = NM_GEMV_WARPS; /* warps per row (split-K), power of 2, <= 32 */
constexpr uint32_t M4 = 0x0F0F0F0Fu;

/* ---- weight loads ----------------------------------------------------------
 * 32- and 16-bit loads are plain (read-only) loads: the compiler folds the
 * constant field offsets into the address, while inline-asm loads each cost
 * a 64-bit address add, and integer issue is the bottleneck here (measured:
 * Q8_0 1.47 -> 2.10 TB/s on an H200 without the asm). The 16-byte loads of
 * float rows bypass L1 allocation (quant_dev.cuh wld128): weights are read
 * once, and this keeps L1 for x (F16 3.78 -> 3.95 TB/s). */
template <bool A4>
__device__ __forceinline__ uint32_t wld32(const uint8_t *p) {
    return ld32<A4>(p);
}

__device__ __forceinline__ uint16_t wld16(const uint8_t *p) { return ld16(p); }


/* ---- activation loads ------------------------------------------------------ */
__device__ __forceinline__ float4 xld4(const float *p) { return __ldg(reinterpret_cast<const float4 *>(p)); }
__device__ __forceinline__ float hsum(float4 v) { return (v.x + v.y) + (v.z + v.w); }

/* acc + sum_j (byte_j(w) - off) * x_j */
__device__ __forceinline__ float dot4(uint32_t w, float magic, float4 x, float acc) {
    acc = fmaf(bytef<0>(w, magic), x.x, acc);
    acc = fmaf(bytef<1>(w, magic), x.y, acc);
    acc = fmaf(bytef<2>(w, magic), x.z, acc);
    acc = fmaf(bytef<3>(w, magic), x.w, acc);
    return acc;
}

__device__ __forceinline__ float bytefs(uint32_t w, int j, float magic) {
    return smallf((w >> (8 * j)) & 0xffu, magic);
}

__device__ __forceinline__ float h2f_lo(uint32_t w) { return h2f((uint16_t)(w & 0xffffu)); }
__device__ __forceinline__ float h2f_hi(uint32_t w) { return h2f((uint16_t)(w >> 16)); }
__device__ __forceinline__ float bf_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

/* ---- per-type units ---------------------------------------------------------
 * Each type: QK (elements per block), BYTES, LANES (units per block), W (the
 * raw words a unit needs from one block), load<A4>(block, unit) -> W, X (the
 * unit's activations + sums), load_x(xb, unit, X) with xb = x + block*QK,
 * and dot(W, unit, X) = the unit's share of the row's dot. The unit split
 * matches dequant.cu's (see there for the element maps). */

struct GV_Q4_0 {
    static constexpr int QK = 32, BYTES = 18, LANES = 4;
    struct W { uint32_t q; uint16_t d; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int s) { return {wld32<A4>(b + 2 + 4 * s), wld16(b)}; }
    struct X { float4 v[2]; };
    __device__ static void load_x(const float *xb, int s, X &x) {
        x.v[0] = xld4(xb + 4 * s);
        x.v[1] = xld4(xb + 16 + 4 * s);
    }
    __device__ static float dot(const W &w, int, const X &x) {
        float a = dot4(w.q & M4, NM_MAGIC(8), x.v[0], 0.0f);
        a = dot4((w.q >> 4) & M4, NM_MAGIC(8), x.v[1], a);
        return h2f(w.d) * a;
    }
};

struct GV_Q4_1 {
    static constexpr int QK = 32, BYTES = 20, LANES = 4;
    struct W { uint32_t q, dm; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int s) { return {wld32<A4>(b + 4 + 4 * s), wld32<A4>(b)}; }
    struct X { float4 v[2]; float sx; };
    __device__ static void load_x(const float *xb, int s, X &x) {
        x.v[0] = xld4(xb + 4 * s);
        x.v[1] = xld4(xb + 16 + 4 * s);
        x.sx = hsum(x.v[0]) + hsum(x.v[1]);
    }
    __device__ static float dot(const W &w, int, const X &x) {
        float a = dot4(w.q & M4, NM_MAGIC(0), x.v[0], 0.0f);
        a = dot4((w.q >> 4) & M4, NM_MAGIC(0), x.v[1], a);
        return h2f_lo(w.dm) * a + h2f_hi(w.dm) * x.sx;
    }
};

struct GV_Q5_0 {
    static constexpr int QK = 32, BYTES = 22, LANES = 4;
    struct W { uint32_t q, qh; uint16_t d; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int s) {
        return {wld32<A4>(b + 6 + 4 * s), wld32<A4>(b + 2), wld16(b)};
    }
    using X = GV_Q4_0::X;
    __device__ static void load_x(const float *xb, int s, X &x) { GV_Q4_0::load_x(xb, s, x); }
    __device__ static float dot(const W &w, int s, const X &x) {
        const uint32_t lo = (w.q & M4) | (spread4((w.qh >> (4 * s)) & 0xFu) << 4);
        const uint32_t hi = ((w.q >> 4) & M4) | (spread4((w.qh >> (16 + 4 * s)) & 0xFu) << 4);
        float a = dot4(lo, NM_MAGIC(16), x.v[0], 0.0f);
        a = dot4(hi, NM_MAGIC(16), x.v[1], a);
        return h2f(w.d) * a;
    }
};

struct GV_Q5_1 {
    static constexpr int QK = 32, BYTES = 24, LANES = 4;
    struct W { uint32_t q, qh, dm; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int s) {
        return {wld32<A4>(b + 8 + 4 * s), wld32<A4>(b + 4), wld32<A4>(b)};
    }
    using X = GV_Q4_1::X;
    __device__ static void load_x(const float *xb, int s, X &x) { GV_Q4_1::load_x(xb, s, x); }
    __device__ static float dot(const W &w, int s, const X &x) {
        const uint32_t lo = (w.q & M4) | (spread4((w.qh >> (4 * s)) & 0xFu) << 4);
        const uint32_t hi = ((w.q >> 4) & M4) | (spread4((w.qh >> (16 + 4 * s)) & 0xFu) << 4);
        float a = dot4(lo, NM_MAGIC(0), x.v[0], 0.0f);
        a = dot4(hi, NM_MAGIC(0), x.v[1], a);
        return h2f_lo(w.dm) * a + h2f_hi(w.dm) * x.sx;
    }
};

struct GV_Q8_0 {
    static constexpr int QK = 32, BYTES = 34, LANES = 4;
    struct W { uint32_t q0, q1; uint16_t d; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int s) {
        return {wld32<A4>(b + 2 + 8 * s), wld32<A4>(b + 6 + 8 * s), wld16(b)};
    }
    struct X { float4 v[2]; };
    __device__ static void load_x(const float *xb, int s, X &x) {
        x.v[0] = xld4(xb + 8 * s);
        x.v[1] = xld4(xb + 8 * s + 4);
    }
    __device__ static float dot(const W &w, int, const X &x) {
        /* int8 q as byte (q ^ 0x80) = q + 128, the 128 folded into magic */
        float a = dot4(w.q0 ^ 0x80808080u, NM_MAGIC(128), x.v[0], 0.0f);
        a = dot4(w.q1 ^ 0x80808080u, NM_MAGIC(128), x.v[1], a);
        return h2f(w.d) * a;
    }
};

/* Q2_K/Q3_K/Q6_K unit t: half n = t/8, l0 = 4(t%8); its elements are
 * 128n + 32j + l0 + i (j = 0..3, i = 0..3). */
struct X256x16 {
    float4 v[4];
    float sx[4];
};
__device__ __forceinline__ void load_x_halves(const float *xb, int t, X256x16 &x, bool sums) {
    const float *p = xb + 128 * (t >> 3) + 4 * (t & 7);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        x.v[j] = xld4(p + 32 * j);
        x.sx[j] = sums ? hsum(x.v[j]) : 0.0f;
    }
}

struct GV_Q2_K {
    static constexpr int QK = 256, BYTES = 84, LANES = 16;
    struct W { uint32_t q, sc, dm; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int t) {
        const int n = t >> 3, l0 = 4 * (t & 7), h = (t & 7) >= 4;
        /* scales[8n + h + 2j], j = 0..3 */
        const uint32_t sc = __byte_perm(wld32<A4>(b + 8 * n), wld32<A4>(b + 8 * n + 4), h ? 0x7531u : 0x6420u);
        return {wld32<A4>(b + 16 + 32 * n + l0), sc, wld32<A4>(b + 80)};
    }
    using X = X256x16;
    __device__ static void load_x(const float *xb, int t, X &x) { load_x_halves(xb, t, x, true); }
    __device__ static float dot(const W &w, int, const X &x) {
        float sq = 0.0f, sm = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float a = dot4((w.q >> (2 * j)) & 0x03030303u, NM_MAGIC(0), x.v[j], 0.0f);
            sq = fmaf(smallf((w.sc >> (8 * j)) & 0xFu, NM_MAGIC(0)), a, sq);
            sm = fmaf(smallf((w.sc >> (8 * j + 4)) & 0xFu, NM_MAGIC(0)), x.sx[j], sm);
        }
        return h2f_lo(w.dm) * sq - h2f_hi(w.dm) * sm;
    }
};

struct GV_Q3_K {
    static constexpr int QK = 256, BYTES = 110, LANES = 16;
    struct W { uint32_t q, hm, s0, s1, s2; uint16_t d; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int t) {
        const int n = t >> 3, l0 = 4 * (t & 7);
        return {wld32<A4>(b + 32 + 32 * n + l0), wld32<A4>(b + l0), wld32<A4>(b + 96), wld32<A4>(b + 100),
                wld32<A4>(b + 104), wld16(b + 108)};
    }
    using X = X256x16;
    __device__ static void load_x(const float *xb, int t, X &x) { load_x_halves(xb, t, x, false); }
    __device__ static float dot(const W &w, int t, const X &x) {
        const int n = t >> 3, h = (t & 7) >= 4;
        /* 6-bit scales of sub-blocks 8n + h + 2j (see dequant.cu q3k_scales) */
        const uint32_t lo = (__byte_perm(w.s0, w.s1, h ? 0x7531u : 0x6420u) >> (4 * n)) & M4;
        const uint32_t hb = __byte_perm(w.s2, 0, h ? 0x3131u : 0x2020u);
        const uint32_t sc = lo | ((((hb >> (4 * n)) & 0x0303u) | ((hb >> (4 * n + 2)) & 0x03030000u)) << 4);
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t q = ((w.q >> (2 * j)) & 0x03030303u) | (((w.hm >> (4 * n + j)) & 0x01010101u) << 2);
            const float a = dot4(q, NM_MAGIC(4), x.v[j], 0.0f);
            s = fmaf(bytefs(sc, j, NM_MAGIC(32)), a, s);
        }
        return h2f(w.d) * s;
    }
};

/* Q4_K/Q5_K unit t: chunk c = t/4, k = t%4: low-nibble elements
 * 64c + 8k + (0..7) (sub-block 2c), high-nibble 64c + 32 + 8k + (0..7)
 * (sub-block 2c+1). */
struct XK4 {
    float4 v[4];
    float sx[2];
};
__device__ __forceinline__ void load_x_k4(const float *xb, int t, XK4 &x) {
    const float *p = xb + 64 * (t >> 2) + 8 * (t & 3);
    x.v[0] = xld4(p);
    x.v[1] = xld4(p + 4);
    x.v[2] = xld4(p + 32);
    x.v[3] = xld4(p + 36);
    x.sx[0] = hsum(x.v[0]) + hsum(x.v[1]);
    x.sx[1] = hsum(x.v[2]) + hsum(x.v[3]);
}

struct GV_Q4_K {
    static constexpr int QK = 256, BYTES = 144, LANES = 16;
    struct W { uint32_t q0, q1, u0, u1, u2, dm; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int t) {
        const uint8_t *q = b + 16 + 32 * (t >> 2) + 8 * (t & 3);
        return {wld32<A4>(q), wld32<A4>(q + 4), wld32<A4>(b + 4), wld32<A4>(b + 8), wld32<A4>(b + 12), wld32<A4>(b)};
    }
    using X = XK4;
    __device__ static void load_x(const float *xb, int t, X &x) { load_x_k4(xb, t, x); }
    __device__ static float dot(const W &w, int t, const X &x) {
        uint32_t sc, mn;
        k4_scale_min(w.u0, w.u1, w.u2, t >> 2, sc, mn);
        float a0 = dot4(w.q0 & M4, NM_MAGIC(0), x.v[0], 0.0f);
        a0 = dot4(w.q1 & M4, NM_MAGIC(0), x.v[1], a0);
        float a1 = dot4((w.q0 >> 4) & M4, NM_MAGIC(0), x.v[2], 0.0f);
        a1 = dot4((w.q1 >> 4) & M4, NM_MAGIC(0), x.v[3], a1);
        const float sq = fmaf(bytefs(sc, 0, NM_MAGIC(0)), a0, bytefs(sc, 1, NM_MAGIC(0)) * a1);
        const float sm = fmaf(bytefs(mn, 0, NM_MAGIC(0)), x.sx[0], bytefs(mn, 1, NM_MAGIC(0)) * x.sx[1]);
        return h2f_lo(w.dm) * sq - h2f_hi(w.dm) * sm;
    }
};

struct GV_Q5_K {
    static constexpr int QK = 256, BYTES = 176, LANES = 16;
    struct W { uint32_t q0, q1, h0, h1, u0, u1, u2, dm; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int t) {
        const uint8_t *q = b + 48 + 32 * (t >> 2) + 8 * (t & 3), *h = b + 16 + 8 * (t & 3);
        return {wld32<A4>(q),     wld32<A4>(q + 4), wld32<A4>(h),      wld32<A4>(h + 4),
                wld32<A4>(b + 4), wld32<A4>(b + 8), wld32<A4>(b + 12), wld32<A4>(b)};
    }
    using X = XK4;
    __device__ static void load_x(const float *xb, int t, X &x) { load_x_k4(xb, t, x); }
    __device__ static float dot(const W &w, int t, const X &x) {
        const int c = t >> 2;
        uint32_t sc, mn;
        k4_scale_min(w.u0, w.u1, w.u2, c, sc, mn);
        const uint32_t q0 = (w.q0 & M4) | (((w.h0 >> (2 * c)) & 0x01010101u) << 4);
        const uint32_t q1 = (w.q1 & M4) | (((w.h1 >> (2 * c)) & 0x01010101u) << 4);
        const uint32_t q2 = ((w.q0 >> 4) & M4) | (((w.h0 >> (2 * c + 1)) & 0x01010101u) << 4);
        const uint32_t q3 = ((w.q1 >> 4) & M4) | (((w.h1 >> (2 * c + 1)) & 0x01010101u) << 4);
        float a0 = dot4(q0, NM_MAGIC(0), x.v[0], 0.0f);
        a0 = dot4(q1, NM_MAGIC(0), x.v[1], a0);
        float a1 = dot4(q2, NM_MAGIC(0), x.v[2], 0.0f);
        a1 = dot4(q3, NM_MAGIC(0), x.v[3], a1);
        const float sq = fmaf(bytefs(sc, 0, NM_MAGIC(0)), a0, bytefs(sc, 1, NM_MAGIC(0)) * a1);
        const float sm = fmaf(bytefs(mn, 0, NM_MAGIC(0)), x.sx[0], bytefs(mn, 1, NM_MAGIC(0)) * x.sx[1]);
        return h2f_lo(w.dm) * sq - h2f_hi(w.dm) * sm;
    }
};

struct GV_Q6_K {
    static constexpr int QK = 256, BYTES = 210, LANES = 16;
    struct W { uint32_t qa, qb, qh, sc; uint16_t d; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int t) {
        const int n = t >> 3, l0 = 4 * (t & 7), is = (t & 7) >> 2;
        /* int8 scales[8n + is + 2k], k = 0..3, each + 128 */
        const uint32_t sc =
            __byte_perm(wld32<A4>(b + 192 + 8 * n), wld32<A4>(b + 196 + 8 * n), is ? 0x7531u : 0x6420u) ^ 0x80808080u;
        return {wld32<A4>(b + 64 * n + l0), wld32<A4>(b + 64 * n + 32 + l0), wld32<A4>(b + 128 + 32 * n + l0), sc,
                wld16(b + 208)};
    }
    using X = X256x16;
    __device__ static void load_x(const float *xb, int t, X &x) { load_x_halves(xb, t, x, false); }
    __device__ static float dot(const W &w, int, const X &x) {
        const uint32_t q[4] = {
            (w.qa & M4) | ((w.qh & 0x03030303u) << 4),
            (w.qb & M4) | (((w.qh >> 2) & 0x03030303u) << 4),
            ((w.qa >> 4) & M4) | (((w.qh >> 4) & 0x03030303u) << 4),
            ((w.qb >> 4) & M4) | (((w.qh >> 6) & 0x03030303u) << 4),
        };
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; k++)
            s = fmaf(bytefs(w.sc, k, NM_MAGIC(128)), dot4(q[k], NM_MAGIC(32), x.v[k], 0.0f), s);
        return h2f(w.d) * s;
    }
};

/* Float rows, 8 elements per unit (one 16- or 32-byte load), used when the
 * rows are 16-byte aligned; the x1 forms take any (element-aligned) rows. */
struct XF8 { float4 v[2]; };
__device__ __forceinline__ void load_x_f8(const float *xb, XF8 &x) {
    x.v[0] = xld4(xb);
    x.v[1] = xld4(xb + 4);
}

struct GV_F32x8 {
    static constexpr int QK = 8, BYTES = 32, LANES = 1;
    struct W { uint4 a, b; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int) { return {wld128(b), wld128(b + 16)}; }
    using X = XF8;
    __device__ static void load_x(const float *xb, int, X &x) { load_x_f8(xb, x); }
    __device__ static float dot(const W &w, int, const X &x) {
        float a = __uint_as_float(w.a.x) * x.v[0].x;
        a = fmaf(__uint_as_float(w.a.y), x.v[0].y, a);
        a = fmaf(__uint_as_float(w.a.z), x.v[0].z, a);
        a = fmaf(__uint_as_float(w.a.w), x.v[0].w, a);
        a = fmaf(__uint_as_float(w.b.x), x.v[1].x, a);
        a = fmaf(__uint_as_float(w.b.y), x.v[1].y, a);
        a = fmaf(__uint_as_float(w.b.z), x.v[1].z, a);
        return fmaf(__uint_as_float(w.b.w), x.v[1].w, a);
    }
};

/* 16-bit float rows: F (lo, hi) turns a word into its two elements. */
template <bool BF>
struct GV_H16x8 {
    static constexpr int QK = 8, BYTES = 16, LANES = 1;
    struct W { uint4 u; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int) { return {wld128(b)}; }
    using X = XF8;
    __device__ static void load_x(const float *xb, int, X &x) { load_x_f8(xb, x); }
    __device__ static float lo(uint32_t v) { return BF ? bf_lo(v) : h2f_lo(v); }
    __device__ static float hi(uint32_t v) { return BF ? bf_hi(v) : h2f_hi(v); }
    __device__ static float dot(const W &w, int, const X &x) {
        float a = lo(w.u.x) * x.v[0].x;
        a = fmaf(hi(w.u.x), x.v[0].y, a);
        a = fmaf(lo(w.u.y), x.v[0].z, a);
        a = fmaf(hi(w.u.y), x.v[0].w, a);
        a = fmaf(lo(w.u.z), x.v[1].x, a);
        a = fmaf(hi(w.u.z), x.v[1].y, a);
        a = fmaf(lo(w.u.w), x.v[1].z, a);
        return fmaf(hi(w.u.w), x.v[1].w, a);
    }
};

/* One element per unit: the fallback for rows that are not 16-byte aligned
 * or whose length is not a multiple of 8. */
template <int TYPE>
struct GV_Float1 {
    static constexpr int QK = 1, BYTES = TYPE == NM_TYPE_F32 ? 4 : 2, LANES = 1;
    struct W { uint32_t v; };
    template <bool A4>
    __device__ static W load(const uint8_t *b, int) {
        return {TYPE == NM_TYPE_F32 ? wld32<true>(b) : (uint32_t)wld16(b)};
    }
    struct X { float v; };
    __device__ static void load_x(const float *xb, int, X &x) { x.v = __ldg(xb); }
    __device__ static float dot(const W &w, int, const X &x) {
        const float f = TYPE == NM_TYPE_F32 ? __uint_as_float(w.v)
                        : TYPE == NM_TYPE_F16 ? h2f((uint16_t)w.v)
                                              : __uint_as_float(w.v << 16);
        return f * x.v;
    }
};

/* ---- the kernel ---------------------------------------------------------
 * A CTA owns ROWS consecutive rows; its nw warps (blockDim.x / 32, at most
 * MAXW) split the row's blocks between them: warp w's lanes take blocks
 * w*BPI + lane/LANES, then stride nw*BPI, so the CTA sweeps the row front to
 * back in contiguous chunks. Per pass a lane issues the weight loads of U
 * steps (unconditionally: a step past the row end re-reads the last block
 * and its result is dropped), then computes them. Partial sums meet through
 * a warp shuffle tree, then shared memory. */

/* A launch covers gridDim.y products (nm_cuda_gemv_pairs): product p reads
 * matrix mat[p] of the stack at w (mat_bytes apart; mat NULL: the one
 * matrix at w, p = 0), x + (p / x_div) * ldx, and writes y + p * ldy; a
 * product whose mat[p] < 0 is skipped by all its CTAs at once (before any
 * barrier). */
template <class T, bool A4>
__global__ void __launch_bounds__(MAXW * 32, NM_GEMV_MINB)
    k_gemv(const uint8_t *__restrict__ w, int64_t rows, int nb, int64_t row_bytes, const float *__restrict__ x,
           float *__restrict__ y, const int32_t *__restrict__ mat, int64_t mat_bytes, int x_div, int64_t ldx,
           int64_t ldy) {
    numoe_pdl::pdl_trigger();
    numoe_pdl::pdl_wait(); /* pdl.cuh: everything here follows the kernel before */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int64_t row0 = (int64_t)blockIdx.x * ROWS;
    if (mat) {
        const int p = (int)blockIdx.y, s = mat[p];
        if (s < 0) return;
        w += (int64_t)s * mat_bytes;
        x += (int64_t)(p / x_div) * ldx;
        y += (int64_t)p * ldy;
    }
    /* Rows past the end (last CTA) recompute the last row instead of
     * branching in the loop; their results are not stored. */
    const uint8_t *wr[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) wr[r] = w + (row0 + r < rows ? row0 + r : rows - 1) * row_bytes;

    constexpr int BPI = 32 / T::LANES; /* blocks per warp step */
    constexpr int U = NM_GEMV_U;
    const int unit = lane % T::LANES;
    const int step = nw * BPI;
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) acc[r] = 0.0f;

    for (int ib0 = warp * BPI + lane / T::LANES; ib0 < nb; ib0 += U * step) {
        typename T::W raw[U][ROWS];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int ib = min(ib0 + u * step, nb - 1);
#pragma unroll
            for (int r = 0; r < ROWS; r++) raw[u][r] = T::template load<A4>(wr[r] + (int64_t)ib * T::BYTES, unit);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int ib = min(ib0 + u * step, nb - 1);
            typename T::X xs;
            T::load_x(x + (int64_t)ib * T::QK, unit, xs);
            const bool valid = ib0 + u * step < nb;
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                const float d = T::dot(raw[u][r], unit, xs);
                acc[r] += valid ? d : 0.0f;
            }
        }
    }

    __shared__ float part[ROWS][MAXW];
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        float a = acc[r];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
        acc[r] = a;
        if (lane == 0) part[r][warp] = a;
    }
    if (nw > 1) {
        __syncthreads();
        if (warp != 0) return;
#pragma unroll
        for (int r = 0; r < ROWS; r++) {
            float a = lane < nw ? part[r][lane] : 0.0f;
#pragma unroll
            for (int off = MAXW / 2; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
            acc[r] = a;
        }
    }
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < ROWS; r++)
            if (row0 + r < rows) y[row0 + r] = acc[r];
}

/* pairs: NULL for one product, else the stack's layout (nm_cuda_gemv_pairs) */
struct pairs_arg {
    const int32_t *mat;
    int64_t n, mat_bytes, ldx, ldy;
    int x_div;
};

template <class T>
int launch(int type, const void *d_w, int64_t rows, int64_t cols, const float *d_x, float *d_y, cudaStream_t st,
           const pairs_arg *pa = nullptr) {
    const int64_t nb = cols / T::QK;
    const int64_t row_bytes = nb * T::BYTES;
    const int64_t grid = (rows + ROWS - 1) / ROWS;
    if (nb > 0x3fffffff || grid > 0x7fffffff)
        return fail(NM_CUDA_EINVAL, "nm_cuda_gemv: %lld x %lld is too large", (long long)rows, (long long)cols);
    /* Warps per row: MAXW, unless the row has fewer warp-steps of blocks
     * (short rows: no idle warps). */
    constexpr int BPI = 32 / T::LANES;
    const int64_t steps = (nb + BPI - 1) / BPI;
    const int nw = (int)(steps < MAXW ? (steps > 0 ? steps : 1) : MAXW);
    const uint8_t *w = static_cast<const uint8_t *>(d_w);
    const pairs_arg one = {nullptr, 1, 0, 0, 0, 1};
    if (!pa) pa = &one;
    const dim3 g((unsigned)grid, (unsigned)pa->n);
    /* 4-byte weight loads need every matrix of the stack 4-aligned too */
    if (T::BYTES % 4 == 0 && (uintptr_t)d_w % 4 == 0 && pa->mat_bytes % 4 == 0)
        (void)numoe_pdl::launch(k_gemv<T, true>, dim3(g), dim3(nw * 32), 0, st, w, rows, (int)nb, row_bytes, d_x, d_y,
                                pa->mat, pa->mat_bytes, pa->x_div, pa->ldx, pa->ldy);
    else
        (void)numoe_pdl::launch(k_gemv<T, false>, dim3(g), dim3(nw * 32), 0, st, w, rows, (int)nb, row_bytes, d_x, d_y,
                                pa->mat, pa->mat_bytes, pa->x_div, pa->ldx, pa->ldy);
    return launch_check(pa->mat ? "nm_cuda_gemv_pairs" : "nm_cuda_gemv", type);
}

} /* namespace */
} /* namespace numoe_cuda */

using namespace numoe_cuda;

extern "C" int nm_cuda_supports_gemv(int type) { return geom_of(type).block != 0; }

/* The type switch of both entry points; the arguments are checked. */
static int dispatch(int type, const void *d_w, int64_t rows, int64_t cols, const float *d_x, float *d_y,
                    cudaStream_t st, const pairs_arg *pa) {
    /* float rows take 16-byte vector loads when every row start is 16-aligned */
    const bool vec = (uintptr_t)d_w % 16 == 0 && cols % 8 == 0 && (cols * (type == NM_TYPE_F32 ? 4 : 2)) % 16 == 0 &&
                     (!pa || pa->mat_bytes % 16 == 0);
    switch (type) {
    case NM_TYPE_F32:
        return vec ? launch<GV_F32x8>(type, d_w, rows, cols, d_x, d_y, st, pa)
                   : launch<GV_Float1<NM_TYPE_F32>>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_F16:
        return vec ? launch<GV_H16x8<false>>(type, d_w, rows, cols, d_x, d_y, st, pa)
                   : launch<GV_Float1<NM_TYPE_F16>>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_BF16:
        return vec ? launch<GV_H16x8<true>>(type, d_w, rows, cols, d_x, d_y, st, pa)
                   : launch<GV_Float1<NM_TYPE_BF16>>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_Q4_0: return launch<GV_Q4_0>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_Q4_1: return launch<GV_Q4_1>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_Q5_0: return launch<GV_Q5_0>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_Q5_1: return launch<GV_Q5_1>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_Q8_0: return launch<GV_Q8_0>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_Q2_K: return launch<GV_Q2_K>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_Q3_K: return launch<GV_Q3_K>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_Q4_K: return launch<GV_Q4_K>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_Q5_K: return launch<GV_Q5_K>(type, d_w, rows, cols, d_x, d_y, st, pa);
    case NM_TYPE_Q6_K: return launch<GV_Q6_K>(type, d_w, rows, cols, d_x, d_y, st, pa);
    default: return fail(NM_CUDA_ETYPE, "nm_cuda_gemv: type %d not supported", type);
    }
}

extern "C" int nm_cuda_gemv(int type, const void *d_w, int64_t rows, int64_t cols, const float *d_x, float *d_y,
                            void *stream) {
    const geom g = geom_of(type);
    if (!g.block) return fail(NM_CUDA_ETYPE, "nm_cuda_gemv: type %d (%s) not supported", type, type_name(type));
    if (rows < 0 || cols < 0 || cols % g.block)
        return fail(NM_CUDA_EINVAL, "nm_cuda_gemv: %lld x %lld: sizes must be >= 0 and cols a multiple of %s's block size %d",
                    (long long)rows, (long long)cols, type_name(type), g.block);
    if (rows == 0) return NM_CUDA_OK;
    if (!d_x || !d_y || (!d_w && cols > 0)) return fail(NM_CUDA_EINVAL, "nm_cuda_gemv: NULL pointer");
    if ((uintptr_t)d_w % (type == NM_TYPE_F32 ? 4 : 2) || (uintptr_t)d_x % 16 || (uintptr_t)d_y % 4)
        return fail(NM_CUDA_EALIGN, "nm_cuda_gemv: W %p (%s), x %p (needs 16) or y %p misaligned", d_w,
                    type_name(type), (const void *)d_x, (void *)d_y);
    return dispatch(type, d_w, rows, cols, d_x, d_y, static_cast<cudaStream_t>(stream), nullptr);
}

extern "C" int nm_cuda_gemv_pairs(int type, const void *d_w, size_t mat_bytes, int64_t rows, int64_t cols,
                                  const int32_t *d_mat, int64_t n_pairs, const float *d_x, int64_t ldx, int x_div,
                                  float *d_y, int64_t ldy, void *stream) {
    const geom g = geom_of(type);
    if (!g.block) return fail(NM_CUDA_ETYPE, "nm_cuda_gemv_pairs: type %d (%s) not supported", type, type_name(type));
    if (rows < 0 || cols < 0 || cols % g.block || n_pairs < 0 || n_pairs > 65535 || x_div < 1 || ldx < 0 ||
        ldy < rows)
        return fail(NM_CUDA_EINVAL, "nm_cuda_gemv_pairs: %lld x %lld, %lld pairs (at most 65535), x_div %d, ldx %lld, "
                    "ldy %lld: sizes must be >= 0, cols a multiple of %s's block size %d, ldy >= rows",
                    (long long)rows, (long long)cols, (long long)n_pairs, x_div, (long long)ldx, (long long)ldy,
                    type_name(type), g.block);
    if (rows == 0 || n_pairs == 0) return NM_CUDA_OK;
    if (!d_x || !d_y || !d_mat || (!d_w && cols > 0)) return fail(NM_CUDA_EINVAL, "nm_cuda_gemv_pairs: NULL pointer");
    if ((uintptr_t)d_w % (type == NM_TYPE_F32 ? 4 : 2) || mat_bytes % (type == NM_TYPE_F32 ? 4 : 2) ||
        (uintptr_t)d_x % 16 || ldx % 4 || (uintptr_t)d_y % 4 || (uintptr_t)d_mat % 4)
        return fail(NM_CUDA_EALIGN, "nm_cuda_gemv_pairs: W %p / matrix bytes %zu (%s), x %p / ldx %lld (need 16 "
                    "bytes), y %p or mat %p misaligned", d_w, mat_bytes, type_name(type), (const void *)d_x,
                    (long long)ldx, (void *)d_y, (const void *)d_mat);
    const pairs_arg pa = {d_mat, n_pairs, (int64_t)mat_bytes, ldx, ldy, x_div};
    return dispatch(type, d_w, rows, cols, d_x, d_y, static_cast<cudaStream_t>(stream), &pa);
}
