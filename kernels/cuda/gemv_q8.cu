/* gemv_q8.cu - y = W x with x quantised to 8 bits: integer dot products.
 *
 * Why a second GEMV (gemv.cu keeps x in fp32): decode reads every weight
 * once, so a GEMV should run at the memory's speed, and the fp32 kernel
 * does not (H200: Q4_K ~1.3 TB/s, Q8_0 ~2.1 of ~4.8). Two costs stand
 * between it and the memory:
 *  1. per weight a byte splice, a subtraction and an FMA;
 *  2. L1 wavefronts: a lane reads its own block with 2- or 4-byte loads,
 *     so one warp load touches ~9 cache lines for 64-128 useful bytes
 *     (blocks are 18..210 bytes, mostly only 2-byte aligned); at about one
 *     wavefront per clock per SM that caps 2-byte-aligned types near 2 TB/s.
 * Here
 *  1. x is quantised once per row of activations (nm_cuda_quantize_q8:
 *     per 32 elements int8 q, a scale d = max|x| / 127 and s = d * sum q),
 *     and 4 weights meet 4 activations in one dp4a, block scales applied to
 *     whole integer sums -- the scheme ggml's MMVQ and numoe's CPU dots use
 *     (docs/MODEL.md §4: y = sum_b d_w,b * d_x,b * sum_i q_w,i q_x,i, the
 *     zero points and mins through s);
 *  2. every weight load is 16 aligned bytes: Q4_K / Q5_K blocks (144 / 176
 *     bytes) stay 16-aligned in a 16-aligned row, so a lane reads its 16
 *     quant bytes and the block header straight from global memory; the
 *     2-byte-aligned types (Q4_0, Q5_0, Q8_0, Q6_K) are staged by the warp:
 *     the contiguous bytes of its next blocks copied into shared memory
 *     with cp.async (double-buffered, behind the current step's math), each
 *     lane then picking its block's fields out of shared memory, where
 *     narrow unaligned reads cost nothing extra;
 *  3. a warp holds R weight rows (4 for the direct types, 2 for the staged
 *     ones) that share each load of x: x's bytes per unit exceed the
 *     weights' (Q4_K: 48 weight bytes, 80 of x), so with one row per warp
 *     the x loads bound the kernel.
 * Measured on an H200 (docs/BENCHMARKS.md, session 8): Q4_K 3.47 TB/s,
 * Q8_0 3.59, Q6_K 2.72 on a 16384 x 14336 matrix.
 *
 * Work split: a CTA of 4 warps; a row group (R rows) gets 1, 2 or 4 warps
 * (split-K, fewer for short rows so that no warp idles). A warp step covers
 * 32 units: UPB units per block (1 for the 32-element types, 4 for Q6_K, 8
 * for the direct K-quants), so a step is 32 / UPB blocks. Up to 8
 * activation rows share one read of W (batched decode): per unit the
 * weights are unpacked once and dotted with each activation row.
 *
 * Numerics: integer sums are exact; per unit the float steps are fixed, so
 * a row's y does not depend on how many activation rows a call has or on
 * the pairs form (tests/cuda/test_cuda_quant.cu checks both bit for bit),
 * and y agrees with a double dot of the dequantised W and the dequantised
 * q8 x to fp32 rounding. Against fp32 x the difference is x's quantisation
 * (|x - q d| <= d / 2 per element), as on the CPU path. */
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/q8_row.cuh"
#include "kernels/cuda/quant_dev.cuh"

namespace numoe_cuda {
namespace {

constexpr int WARPS = 4; /* per CTA */
constexpr int MAXN = 8;  /* activation rows per call */
constexpr uint32_t M4 = 0x0F0F0F0Fu;

/* ---- the q8 activation row (q8_row.cuh) ---------------------------------- */
__host__ __device__ constexpr int64_t q8_row_bytes(int64_t cols) { return numoe_q8::row_bytes(cols); }

struct xrow {
    const int8_t *q;  /* cols quants */
    const float2 *ds; /* per 32-element block */
};
__device__ __forceinline__ xrow xrow_at(const uint8_t *base, int64_t cols) {
    return {reinterpret_cast<const int8_t *>(base), reinterpret_cast<const float2 *>(base + cols)};
}
__device__ __forceinline__ int4 xld16(const int8_t *p) { return __ldg(reinterpret_cast<const int4 *>(p)); }
/* DIRECT units read W from global memory themselves; the others from the
 * warp's staged copy */
template <class T, class = void> struct is_direct { static constexpr bool v = false; };
template <class T> struct is_direct<T, decltype((void)T::DIRECT)> { static constexpr bool v = T::DIRECT; };

/* ---- reads out of the staged bytes (shared memory) ------------------------- */
/* 4 bytes at a 2-byte-aligned address */
__device__ __forceinline__ uint32_t s32(const uint8_t *p) {
    const uint16_t *h = reinterpret_cast<const uint16_t *>(p);
    return (uint32_t)h[0] | ((uint32_t)h[1] << 16);
}
__device__ __forceinline__ uint16_t s16(const uint8_t *p) { return *reinterpret_cast<const uint16_t *>(p); }

__device__ __forceinline__ int dp4(uint32_t a, int b, int c) { return __dp4a((int)a, b, c); }

/* ---- per-type units ---------------------------------------------------------
 * QK elements and BYTES per block, UPB units per block; W = the unit's weight
 * words, read from the staged block; X = the unit's activations, read once
 * and used for every row a warp holds (xload(x, ib, unit), ib = block index
 * in the row); dot(W, unit, X) = the unit's share of the row's dot. */

/* Q8_0: unit = block; y_b = d_w d_x sum q_w q_x */
struct U_Q8_0 {
    static constexpr int QK = 32, BYTES = 34, UPB = 1;
    struct W { uint32_t q[8]; uint16_t d; };
    struct X { int4 a, c; float d; };
    __device__ static W load(const uint8_t *b, int) {
        W w;
#pragma unroll
        for (int k = 0; k < 8; k++) w.q[k] = s32(b + 2 + 4 * k);
        w.d = s16(b);
        return w;
    }
    __device__ static X xload(const xrow &x, int ib, int) {
        return {xld16(x.q + 32 * ib), xld16(x.q + 32 * ib + 16), __ldg(&x.ds[ib].x)};
    }
    __device__ static float dot(const W &w, int, const X &x) {
        int s = dp4(w.q[0], x.a.x, 0);
        s = dp4(w.q[1], x.a.y, s);
        s = dp4(w.q[2], x.a.z, s);
        s = dp4(w.q[3], x.a.w, s);
        s = dp4(w.q[4], x.c.x, s);
        s = dp4(w.q[5], x.c.y, s);
        s = dp4(w.q[6], x.c.z, s);
        s = dp4(w.q[7], x.c.w, s);
        return h2f(w.d) * (x.d * (float)s);
    }
};

/* Q4_0 / Q5_0: element j < 16 is the low nibble of qs[j], j + 16 the high
 * one (Q5_0: bit j of qh on top); y_b = d_w (d_x sum q_w q_x - Z s_x),
 * Z = 8 / 16 the zero point. */
template <bool Q5>
struct U_Q45_0 {
    static constexpr int QK = 32, BYTES = Q5 ? 22 : 18, UPB = 1, QS = Q5 ? 6 : 2;
    struct W { uint32_t q[4], qh; uint16_t d; };
    struct X { int4 a, c; float2 ds; };
    __device__ static W load(const uint8_t *b, int) {
        W w;
#pragma unroll
        for (int k = 0; k < 4; k++) w.q[k] = s32(b + QS + 4 * k);
        w.qh = Q5 ? s32(b + 2) : 0;
        w.d = s16(b);
        return w;
    }
    __device__ static X xload(const xrow &x, int ib, int) {
        return {xld16(x.q + 32 * ib), xld16(x.q + 32 * ib + 16), __ldg(&x.ds[ib])};
    }
    __device__ static float dot(const W &w, int, const X &x) {
        const int xa[4] = {x.a.x, x.a.y, x.a.z, x.a.w}, xc[4] = {x.c.x, x.c.y, x.c.z, x.c.w};
        int s = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            uint32_t lo = w.q[k] & M4, hi = (w.q[k] >> 4) & M4;
            if (Q5) {
                lo |= spread4((w.qh >> (4 * k)) & 0xFu) << 4;
                hi |= spread4((w.qh >> (16 + 4 * k)) & 0xFu) << 4;
            }
            s = dp4(lo, xa[k], s);
            s = dp4(hi, xc[k], s);
        }
        return h2f(w.d) * fmaf(x.ds.x, (float)s, -(Q5 ? 16.0f : 8.0f) * x.ds.y);
    }
};

/* Q4_K / Q5_K read straight from global memory (no staging; both block
 * sizes, 144 and 176, keep a 16-aligned row's blocks 16-aligned): unit k
 * (0..7) = the 16 qs bytes at QS + 16k, i.e. chunk c = k / 2, half h = k % 2:
 * elements 64c + 16h + i (low nibbles, sub-block 2c) and 64c + 32 + 16h + i
 * (high, 2c+1), i < 16; Q5_K adds bits 2c / 2c+1 of qh[16h + i]. Every load
 * is 16 aligned bytes (the block header read by the unit's 8 lanes at once).
 * Each unit takes half of its sub-blocks' min terms (0.5 s_x: exact). */
template <bool Q5>
struct U_Q45_K_D {
    static constexpr int QK = 256, BYTES = Q5 ? 176 : 144, UPB = 8, QS = Q5 ? 48 : 16;
    static constexpr bool DIRECT = true;
    struct W { uint4 hdr, q, h; };
    struct X { int4 lo, hi; float4 ds; };
    __device__ static W load(const uint8_t *b, int k) {
        return {__ldg(reinterpret_cast<const uint4 *>(b)), wld128(b + QS + 16 * k),
                Q5 ? wld128(b + 16 + 16 * (k & 1)) : make_uint4(0, 0, 0, 0)};
    }
    __device__ static X xload(const xrow &x, int ib, int k) {
        const int c = k >> 1, h = k & 1;
        const int8_t *xq = x.q + 256 * ib + 64 * c + 16 * h;
        return {xld16(xq), xld16(xq + 32), __ldg(reinterpret_cast<const float4 *>(x.ds + 8 * ib + 2 * c))};
    }
    __device__ static float dot(const W &w, int k, const X &x) {
        const int c = k >> 1;
        const uint32_t q[4] = {w.q.x, w.q.y, w.q.z, w.q.w}, qh[4] = {w.h.x, w.h.y, w.h.z, w.h.w};
        const int xl[4] = {x.lo.x, x.lo.y, x.lo.z, x.lo.w}, xh[4] = {x.hi.x, x.hi.y, x.hi.z, x.hi.w};
        int s0 = 0, s1 = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            uint32_t lo = q[j] & M4, hi = (q[j] >> 4) & M4;
            if (Q5) {
                lo |= ((qh[j] >> (2 * c)) & 0x01010101u) << 4;
                hi |= ((qh[j] >> (2 * c + 1)) & 0x01010101u) << 4;
            }
            s0 = dp4(lo, xl[j], s0);
            s1 = dp4(hi, xh[j], s1);
        }
        uint32_t sc, mn;
        k4_scale_min(w.hdr.y, w.hdr.z, w.hdr.w, c, sc, mn);
        const float sq = fmaf((float)(sc & 0xffu) * x.ds.x, (float)s0, (float)((sc >> 8) & 0xffu) * x.ds.z * (float)s1);
        const float sm = fmaf((float)(mn & 0xffu), x.ds.y, (float)((mn >> 8) & 0xffu) * x.ds.w);
        return h2f((uint16_t)(w.hdr.x & 0xffffu)) * sq - h2f((uint16_t)(w.hdr.x >> 16)) * (0.5f * sm);
    }
};

/* Q6_K unit t: half n = t / 2, l0 = 16 (t % 2); its elements are
 * 128n + 32j + l0 + i (j = 0..3, i = 0..15), q6 from ql[64n + l0 + i]
 * (j = 0, 2: low / high nibble) or ql[64n + 32 + l0 + i] (j = 1, 3) and 2
 * bits of qh[32n + l0 + i] (bits 2j, 2j+1), scale sc[8n + 2j + t % 2].
 * y = d sum_j sc_j d_x,(4n+j) sum_i (q6 - 32) q_x. */
struct U_Q6_K {
    static constexpr int QK = 256, BYTES = 210, UPB = 4;
    struct W { uint32_t a[4], b[4], h[4], sc; uint16_t d; };
    struct X { int4 v[4]; float d[4]; };
    __device__ static W load(const uint8_t *blk, int t) {
        const int n = t >> 1, l0 = 16 * (t & 1);
        W w;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            w.a[k] = s32(blk + 64 * n + l0 + 4 * k);
            w.b[k] = s32(blk + 64 * n + 32 + l0 + 4 * k);
            w.h[k] = s32(blk + 128 + 32 * n + l0 + 4 * k);
        }
        /* int8 scales 8n + (t % 2) + 2j, j = 0..3 */
        w.sc = __byte_perm(s32(blk + 192 + 8 * n), s32(blk + 196 + 8 * n), (t & 1) ? 0x7531u : 0x6420u);
        w.d = s16(blk + 208);
        return w;
    }
    __device__ static X xload(const xrow &x, int ib, int t) {
        const int n = t >> 1, l0 = 16 * (t & 1);
        const int8_t *xq = x.q + 256 * ib + 128 * n + l0;
        const float4 d01 = __ldg(reinterpret_cast<const float4 *>(x.ds + 8 * ib + 4 * n));
        const float4 d23 = __ldg(reinterpret_cast<const float4 *>(x.ds + 8 * ib + 4 * n + 2));
        return {{xld16(xq), xld16(xq + 32), xld16(xq + 64), xld16(xq + 96)}, {d01.x, d01.z, d23.x, d23.z}};
    }
    /* q6 (0..63 per byte) - 32 as int8: flip bit 5 (offset binary -> two's
     * complement of 6 bits), then copy the new bit 5 into bits 6, 7 */
    __device__ static uint32_t centre(uint32_t q) {
        const uint32_t t = q ^ 0x20202020u, m = t & 0x20202020u;
        return t | (m << 1) | (m << 2);
    }
    __device__ static float dot(const W &w, int, const X &x) {
        float y = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int xs[4] = {x.v[j].x, x.v[j].y, x.v[j].z, x.v[j].w};
            int s = 0;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const uint32_t lq = j & 1 ? w.b[k] : w.a[k];
                const uint32_t q = ((j & 2 ? lq >> 4 : lq) & M4) | (((w.h[k] >> (2 * j)) & 0x03030303u) << 4);
                s = dp4(centre(q), xs[k], s);
            }
            const float sc = (float)(int8_t)((w.sc >> (8 * j)) & 0xffu);
            y = fmaf(sc * x.d[j], (float)s, y);
        }
        return h2f(w.d) * y;
    }
};

/* ---- staging ------------------------------------------------------------------
 * The bytes [s0, s1) a warp step needs, as the 16-byte-aligned chunks that
 * cover them, copied into the warp's stage with cp.async (the copy runs
 * while the warp computes the step before: double buffering). A chunk
 * reaching past hi (the end of the matrix: the caller guarantees the
 * matrix starts 16-aligned, so only the end can be ragged) is read 2 bytes
 * at a time, so no byte outside the matrix is read. */
template <int CH>
__device__ __forceinline__ void stage_span(uint4 *stage, const uint8_t *s0, const uint8_t *s1, const uint8_t *hi,
                                           int lane) {
    const uint8_t *a0 = reinterpret_cast<const uint8_t *>((uintptr_t)s0 & ~(uintptr_t)15);
    const int nch = (int)((s1 - a0 + 15) >> 4);
#pragma unroll
    for (int i0 = 0; i0 < CH; i0 += 32) {
        const int i = i0 + lane;
        if (i < nch) {
            const uint8_t *c = a0 + 16 * i;
            if (c + 16 <= hi) {
                const unsigned dst = (unsigned)__cvta_generic_to_shared(stage + i);
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(c));
            } else {
                /* the ragged end: 2 bytes at a time (compute-sanitizer counts a
                 * zero-filling cp.async as a 16-byte read), stored directly */
                uint32_t u[4] = {0, 0, 0, 0};
#pragma unroll
                for (int k = 0; k < 8; k++)
                    if (c + 2 * k < hi)
                        u[k >> 1] |= (uint32_t)reinterpret_cast<const uint16_t *>(c)[k] << (16 * (k & 1));
                stage[i] = make_uint4(u[0], u[1], u[2], u[3]);
            }
        }
    }
}
__device__ __forceinline__ void async_commit() { asm volatile("cp.async.commit_group;"); }
/* all but the newest group landed (the previous step's copies) */
__device__ __forceinline__ void async_wait_prev() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

/* ---- the kernel -------------------------------------------------------------
 * A warp holds R consecutive rows and NX activation rows: per unit the
 * activations are loaded once and meet each of the R rows (why R: a Q4_K
 * unit's activations are 80 bytes against its 48 weight bytes, and every
 * warp load of them touches 16 cache lines, so with one row per warp the L1
 * wavefronts of x, not the weights, bound the kernel; measured on the H200:
 * 1.65 TB/s with R = 1). Row group g of the CTA: warp / wpr; its wpr warps
 * take warp steps sub, sub + wpr, ... of the rows (split-K). A launch covers
 * gridDim.y products (pairs, as nm_cuda_gemv_pairs: matrix mat[p] of the
 * stack, x row p / x_div, y row p; mat NULL: one product). */
#ifndef NM_GEMV_Q8_MINB
#define NM_GEMV_Q8_MINB 1 /* __launch_bounds__ min blocks per SM (a register cap), for experiments */
#endif
template <class T, int NX, int R>
__global__ void __launch_bounds__(WARPS * 32, NM_GEMV_Q8_MINB)
    k_gemv_q8(const uint8_t *__restrict__ w, int64_t rows, int nb, int64_t row_bytes, const uint8_t *__restrict__ xq,
              int64_t cols, float *__restrict__ y, int64_t ldy, const int32_t *__restrict__ mat, int64_t mat_bytes,
              int x_div, int wpr_log2) {
    constexpr int BPS = 32 / T::UPB;                    /* blocks per warp step */
    constexpr int CH = (BPS * T::BYTES + 15 + 15) / 16; /* chunks per staged row */
    constexpr bool DIRECT = is_direct<T>::v;
    __shared__ uint4 stage_all[DIRECT ? 1 : 2][DIRECT ? 1 : WARPS][DIRECT ? 1 : R][CH];
    __shared__ float part[WARPS][R * NX];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wpr = 1 << wpr_log2, sub = warp & (wpr - 1);
    const int64_t row0 = ((int64_t)blockIdx.x * (WARPS >> wpr_log2) + (warp >> wpr_log2)) * R;
    const int64_t xrb = q8_row_bytes(cols);
    numoe_pdl::pdl_trigger();
    if (mat) {
        numoe_pdl::pdl_wait(); /* the expert ids are the kernel before's output */
        const int p = (int)blockIdx.y, s = mat[p];
        if (s < 0) return; /* the whole CTA, before any barrier */
        w += (int64_t)s * mat_bytes;
        xq += (int64_t)(p / x_div) * xrb;
        y += (int64_t)p * ldy;
    }
    const uint8_t *hi = w + rows * row_bytes;
    float acc[R][NX];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < NX; j++) acc[r][j] = 0.0f;

    if (row0 < rows) {
        /* rows past the end (last group) recompute the last row; not stored */
        const uint8_t *wr[R];
#pragma unroll
        for (int r = 0; r < R; r++) wr[r] = w + (row0 + r < rows ? row0 + r : rows - 1) * row_bytes;
        const int b = lane / T::UPB, u = lane % T::UPB;
        const int stride = wpr * BPS;
        /* the stage of the warp step starting at block i0, into buffer k */
        auto stage = [&](int i0, int k) {
            const int nblk = min(BPS, nb - i0);
#pragma unroll
            for (int r = 0; r < R; r++) {
                const uint8_t *s0 = wr[r] + (int64_t)i0 * T::BYTES;
                stage_span<CH>(stage_all[k][warp][r], s0, s0 + nblk * T::BYTES, hi, lane);
            }
        };
        /* the first step's weights are on their way before the wait for
         * the kernel that writes x (pdl.cuh: weights are nobody's output) */
        if constexpr (!DIRECT) {
            stage(sub * BPS, 0);
            async_commit();
        } else if (!mat && sub * BPS < nb) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                const uint8_t *s0 = wr[r] + (int64_t)(sub * BPS) * T::BYTES;
                const uint8_t *l = s0 + 128 * lane;
                if (l < s0 + (int64_t)min(BPS, nb - sub * BPS) * T::BYTES)
                    asm volatile("prefetch.global.L2 [%0];" ::"l"(l));
            }
        }
        numoe_pdl::pdl_wait();
        int it = 0;
        for (int ib0 = sub * BPS; ib0 < nb; ib0 += stride, it++) {
            const int nblk = min(BPS, nb - ib0);
            if constexpr (!DIRECT) {
                if (ib0 + stride < nb) stage(ib0 + stride, (it + 1) & 1);
                async_commit(); /* possibly empty: keeps "all but the newest" = this step */
                async_wait_prev();
                __syncwarp();
            }
            if (b < nblk) {
                typename T::X xs[NX];
#pragma unroll
                for (int j = 0; j < NX; j++) xs[j] = T::xload(xrow_at(xq + j * xrb, cols), ib0 + b, u);
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const uint8_t *sb =
                        DIRECT ? wr[r] + (int64_t)(ib0 + b) * T::BYTES
                               : reinterpret_cast<const uint8_t *>(stage_all[DIRECT ? 0 : (it & 1)][DIRECT ? 0 : warp]
                                                                            [DIRECT ? 0 : r]) +
                                     ((uintptr_t)(wr[r] + (int64_t)ib0 * T::BYTES) & 15) + b * T::BYTES;
                    const typename T::W wv = T::load(sb, u);
#pragma unroll
                    for (int j = 0; j < NX; j++) acc[r][j] += T::dot(wv, u, xs[j]);
                }
            }
            if constexpr (!DIRECT) __syncwarp(); /* the copy after next reuses this buffer */
        }
        if constexpr (!DIRECT) asm volatile("cp.async.wait_all;" ::: "memory");
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < NX; j++) {
            float a = acc[r][j];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
            acc[r][j] = a;
        }
    if (wpr == 1) {
        if (lane == 0)
#pragma unroll
            for (int r = 0; r < R; r++)
                if (row0 + r < rows)
#pragma unroll
                    for (int j = 0; j < NX; j++) y[j * ldy + row0 + r] = acc[r][j];
        return;
    }
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int j = 0; j < NX; j++) part[warp][r * NX + j] = acc[r][j];
    __syncthreads();
    if (sub == 0 && lane < R * NX) {
        const int r = lane / NX, j = lane % NX;
        float a = 0.0f;
        for (int k = 0; k < wpr; k++) a += part[warp + k][lane];
        if (row0 + r < rows) y[j * ldy + row0 + r] = a;
    }
}

/* ---- x quantisation -----------------------------------------------------------
 * 8 threads per 32-element block, 4 elements each (q8_row.cuh). */
__global__ void k_quantize_q8(const float *__restrict__ x, int64_t ldx, int64_t n, int64_t cols,
                              uint8_t *__restrict__ xq) {
    const int64_t nb = cols / 32;
    numoe_pdl::pdl_wait();                                            /* x is the kernel before's output */
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; /* thread over n * nb * 8 */
    const int64_t blk = g >> 3;
    const int part = (int)(g & 7);
    const bool live = blk < n * nb;
    const int64_t r = live ? blk / nb : 0, b = live ? blk % nb : 0;
    float4 v = make_float4(0, 0, 0, 0);
    if (live) v = *reinterpret_cast<const float4 *>(x + r * ldx + 32 * b + 4 * part);
    numoe_q8::quantize4(v, live, xq + r * q8_row_bytes(cols), cols, b, part);
}

struct pairs_arg {
    const int32_t *mat;
    int64_t n, mat_bytes, ldy;
    int x_div;
};

/* Rows per warp by activation rows: R x NX accumulators and NX activation
 * sets stay in registers (one activation row: 4 rows share it; 2: 2; more:
 * the weights are already read once for NX rows of x). */
/* measured (H200, 4096 x 14336, one activation row): direct Q4_K 1654 ->
 * 2361 GB/s going from 1 to 4 rows per warp; staged Q6_K 1193 at 4, 1673 at
 * 2 (the stages of 4 rows cut the CTAs per SM) */
#ifndef NM_GEMV_Q8_R_DIRECT
#define NM_GEMV_Q8_R_DIRECT 4
#endif
#ifndef NM_GEMV_Q8_R_STAGED
#define NM_GEMV_Q8_R_STAGED 2
#endif
template <class T, int NX> struct rows_for {
    static constexpr int R1 = is_direct<T>::v ? NM_GEMV_Q8_R_DIRECT : NM_GEMV_Q8_R_STAGED;
    static constexpr int R = NX == 1 ? R1 : NX == 2 ? (R1 > 1 ? 2 : 1) : 1;
};

template <class T, int NX>
void launch_nx(const uint8_t *w, int64_t rows, int nb, const uint8_t *xq, int64_t cols, float *y, int64_t ldy,
               const pairs_arg *pa, int wpr_log2, cudaStream_t st) {
    constexpr int R = rows_for<T, NX>::R;
    const int64_t rpc = (int64_t)(WARPS >> wpr_log2) * R;
    const dim3 g((unsigned)((rows + rpc - 1) / rpc), pa ? (unsigned)pa->n : 1u);
    /* a failed launch is the runtime's last error: launch_check reports it */
    (void)numoe_pdl::launch(k_gemv_q8<T, NX, R>, g, dim3(WARPS * 32), 0, st, w, rows, nb, (int64_t)nb * T::BYTES, xq,
                            cols, y, ldy, pa ? pa->mat : nullptr, pa ? pa->mat_bytes : (int64_t)0, pa ? pa->x_div : 1,
                            wpr_log2);
}

template <class T>
int launch(int type, const void *d_w, int64_t rows, int64_t cols, const void *d_xq, int64_t n, float *d_y,
           int64_t ldy, cudaStream_t st, const pairs_arg *pa) {
    const int64_t nb = cols / T::QK;
    constexpr int BPS = 32 / T::UPB;
    const int64_t steps = (nb + BPS - 1) / BPS;
    const int wpr_log2 = steps >= 4 ? 2 : steps >= 2 ? 1 : 0;
    if (nb > 0x3fffffff || (rows + 3) / 4 > 0x7fffffff)
        return fail(NM_CUDA_EINVAL, "nm_cuda_gemv_q8: %lld x %lld is too large", (long long)rows, (long long)cols);
    const uint8_t *w = static_cast<const uint8_t *>(d_w);
    const uint8_t *x = static_cast<const uint8_t *>(d_xq);
    switch (n) {
    case 1: launch_nx<T, 1>(w, rows, (int)nb, x, cols, d_y, ldy, pa, wpr_log2, st); break;
    case 2: launch_nx<T, 2>(w, rows, (int)nb, x, cols, d_y, ldy, pa, wpr_log2, st); break;
    case 3: launch_nx<T, 3>(w, rows, (int)nb, x, cols, d_y, ldy, pa, wpr_log2, st); break;
    case 4: launch_nx<T, 4>(w, rows, (int)nb, x, cols, d_y, ldy, pa, wpr_log2, st); break;
    case 5: launch_nx<T, 5>(w, rows, (int)nb, x, cols, d_y, ldy, pa, wpr_log2, st); break;
    case 6: launch_nx<T, 6>(w, rows, (int)nb, x, cols, d_y, ldy, pa, wpr_log2, st); break;
    case 7: launch_nx<T, 7>(w, rows, (int)nb, x, cols, d_y, ldy, pa, wpr_log2, st); break;
    default: launch_nx<T, 8>(w, rows, (int)nb, x, cols, d_y, ldy, pa, wpr_log2, st); break;
    }
    return launch_check(pa ? "nm_cuda_gemv_q8_pairs" : "nm_cuda_gemv_q8", type);
}

int dispatch(int type, const void *d_w, int64_t rows, int64_t cols, const void *d_xq, int64_t n, float *d_y,
             int64_t ldy, cudaStream_t st, const pairs_arg *pa) {
    switch (type) {
    case NM_TYPE_Q4_0: return launch<U_Q45_0<false>>(type, d_w, rows, cols, d_xq, n, d_y, ldy, st, pa);
    case NM_TYPE_Q5_0: return launch<U_Q45_0<true>>(type, d_w, rows, cols, d_xq, n, d_y, ldy, st, pa);
    case NM_TYPE_Q8_0: return launch<U_Q8_0>(type, d_w, rows, cols, d_xq, n, d_y, ldy, st, pa);
    case NM_TYPE_Q4_K: return launch<U_Q45_K_D<false>>(type, d_w, rows, cols, d_xq, n, d_y, ldy, st, pa);
    case NM_TYPE_Q5_K: return launch<U_Q45_K_D<true>>(type, d_w, rows, cols, d_xq, n, d_y, ldy, st, pa);
    case NM_TYPE_Q6_K: return launch<U_Q6_K>(type, d_w, rows, cols, d_xq, n, d_y, ldy, st, pa);
    default: return fail(NM_CUDA_ETYPE, "nm_cuda_gemv_q8: type %d (%s) has no integer GEMV", type, type_name(type));
    }
}

/* Checks shared by both entry points; 0 or a failure code. */
int check_common(const char *fn, int type, const void *d_w, int64_t rows, int64_t cols, const void *d_xq,
                 const float *d_y) {
    if (!nm_cuda_supports_gemv_q8(type))
        return fail(NM_CUDA_ETYPE, "%s: type %d (%s) has no integer GEMV (nm_cuda_gemv takes it)", fn, type,
                    type_name(type));
    const geom g = geom_of(type);
    if (rows < 0 || cols < 0 || cols % g.block)
        return fail(NM_CUDA_EINVAL, "%s: %lld x %lld: sizes must be >= 0 and cols a multiple of %s's block size %d", fn,
                    (long long)rows, (long long)cols, type_name(type), g.block);
    if (rows > 0 && (!d_xq || !d_y || (!d_w && cols > 0))) return fail(NM_CUDA_EINVAL, "%s: NULL pointer", fn);
    if ((uintptr_t)d_w % 16 || (uintptr_t)d_xq % 16 || (uintptr_t)d_y % 4)
        return fail(NM_CUDA_EALIGN, "%s: W %p and xq %p need 16-byte alignment, y %p 4", fn, d_w, d_xq, (void *)d_y);
    return NM_CUDA_OK;
}

} /* namespace */
} /* namespace numoe_cuda */

using namespace numoe_cuda;

extern "C" size_t nm_cuda_q8_row_bytes(int64_t cols) { return cols > 0 ? (size_t)q8_row_bytes(cols) : 0; }

extern "C" int nm_cuda_supports_gemv_q8(int type) {
    switch (type) {
    case NM_TYPE_Q4_0: case NM_TYPE_Q5_0: case NM_TYPE_Q8_0: case NM_TYPE_Q4_K: case NM_TYPE_Q5_K: case NM_TYPE_Q6_K:
        return 1;
    default: return 0;
    }
}

extern "C" int nm_cuda_quantize_q8(const float *d_x, int64_t ldx, int64_t n, int64_t cols, void *d_xq, void *stream) {
    if (n < 0 || cols < 0 || cols % 32 || ldx < cols)
        return fail(NM_CUDA_EINVAL, "nm_cuda_quantize_q8: %lld rows of %lld (ldx %lld): cols must be a multiple of 32, "
                    "ldx >= cols", (long long)n, (long long)cols, (long long)ldx);
    if (n == 0 || cols == 0) return NM_CUDA_OK;
    if (!d_x || !d_xq) return fail(NM_CUDA_EINVAL, "nm_cuda_quantize_q8: NULL pointer");
    if ((uintptr_t)d_x % 16 || ldx % 4 || (uintptr_t)d_xq % 16)
        return fail(NM_CUDA_EALIGN, "nm_cuda_quantize_q8: x %p / ldx %lld (need 16 bytes) or xq %p misaligned",
                    (const void *)d_x, (long long)ldx, d_xq);
    const int64_t threads = n * (cols / 32) * 8;
    if ((threads + 255) / 256 > 0x7fffffff) return fail(NM_CUDA_EINVAL, "nm_cuda_quantize_q8: too large");
    (void)numoe_pdl::launch(k_quantize_q8, dim3((unsigned)((threads + 255) / 256)), dim3(256), 0,
                            static_cast<cudaStream_t>(stream), d_x, ldx, n, cols, static_cast<uint8_t *>(d_xq));
    return launch_check("nm_cuda_quantize_q8", NM_TYPE_F32);
}

extern "C" int nm_cuda_gemv_q8(int type, const void *d_w, int64_t rows, int64_t cols, const void *d_xq, int64_t n,
                               float *d_y, int64_t ldy, void *stream) {
    int rc = check_common("nm_cuda_gemv_q8", type, d_w, rows, cols, d_xq, d_y);
    if (rc) return rc;
    if (n < 1 || n > MAXN || (n > 1 && ldy < rows))
        return fail(NM_CUDA_EINVAL, "nm_cuda_gemv_q8: %lld activation rows (1..%d), ldy %lld (>= rows %lld)",
                    (long long)n, MAXN, (long long)ldy, (long long)rows);
    if (rows == 0) return NM_CUDA_OK;
    if (cols == 0) return cudaMemset2DAsync(d_y, (size_t)(n > 1 ? ldy : rows) * 4, 0, (size_t)rows * 4, (size_t)n,
                                            static_cast<cudaStream_t>(stream)) == cudaSuccess
                              ? NM_CUDA_OK
                              : fail(NM_CUDA_ERUNTIME, "nm_cuda_gemv_q8: clearing y failed");
    return dispatch(type, d_w, rows, cols, d_xq, n, d_y, n > 1 ? ldy : rows, static_cast<cudaStream_t>(stream),
                    nullptr);
}

extern "C" int nm_cuda_gemv_q8_pairs(int type, const void *d_w, size_t mat_bytes, int64_t rows, int64_t cols,
                                     const int32_t *d_mat, int64_t n_pairs, const void *d_xq, int x_div, float *d_y,
                                     int64_t ldy, void *stream) {
    int rc = check_common("nm_cuda_gemv_q8_pairs", type, d_w, rows, cols, d_xq, d_y);
    if (rc) return rc;
    if (n_pairs < 0 || n_pairs > 65535 || x_div < 1 || ldy < rows || mat_bytes % 16 || cols == 0)
        return fail(NM_CUDA_EINVAL, "nm_cuda_gemv_q8_pairs: %lld pairs (at most 65535), x_div %d, ldy %lld (>= rows "
                    "%lld), matrix bytes %zu (a multiple of 16), cols %lld (> 0)", (long long)n_pairs, x_div,
                    (long long)ldy, (long long)rows, mat_bytes, (long long)cols);
    if (rows == 0 || n_pairs == 0) return NM_CUDA_OK;
    if (!d_mat || (uintptr_t)d_mat % 4) return fail(NM_CUDA_EINVAL, "nm_cuda_gemv_q8_pairs: mat NULL or misaligned");
    const pairs_arg pa = {d_mat, n_pairs, (int64_t)mat_bytes, ldy, x_div};
    return dispatch(type, d_w, rows, cols, d_xq, 1, d_y, ldy, static_cast<cudaStream_t>(stream), &pa);
}
