/* gpu_attention.cu - absorbed MLA attention over the latent cache
 * (gpu_kernels.cuh attention).
 *
 * One CTA per (token, head), 4 warps. The CTA walks the token's cache
 * positions 0..pos in chunks of 32: each warp scores 8 positions (a
 * kv_lora + d_rope wide dot of the cached row [c | k_pe] with the absorbed
 * query [q_abs | q_pe], lanes over the row, so a warp's loads are
 * contiguous), then every thread folds the chunk into its share of the
 * kv_lora-wide output with an online softmax (running max and sum, the
 * accumulator rescaled when the max grows), as flash attention does. The
 * CPU path takes the exact max first and normalises the weights before the
 * sum; the results agree to float rounding.
 *
 * The cache is read once for the scores and once for the values (the second
 * read hits L1/L2). Heads of one token re-read the same rows: fine for
 * prefill (the layer's cache stays in L2) and short decode contexts; a
 * FlashMLA-style kernel (all heads of a token per CTA, positions split
 * across CTAs) is the follow-up for long decode contexts. */
#include "coordinator/engine/gpu/gpu_kernels.cuh"

#include <math.h>

namespace numoe_gpu {
namespace {

constexpr int AT_WARPS = 4, AT_THREADS = AT_WARPS * 32, AT_PPW = 8, AT_CHUNK = AT_WARPS * AT_PPW;
constexpr int AT_MAXC = 8; /* accumulators per thread: kv_lora <= AT_MAXC * AT_THREADS = 1024 */

__global__ void __launch_bounds__(AT_THREADS) k_attention(const float *qabs, float *oc, const tok_info *ti, int layer,
                                                          int nh, int kr, int dr, float scale) {
    extern __shared__ float sm[];
    const int W = kr + dr;
    float *sq = sm, *sc = sm + W;
    const int64_t t = blockIdx.x;
    const int h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float *qry = qabs + (t * nh + h) * W;
    for (int i = tid; i < W; i += AT_THREADS) sq[i] = qry[i];
    const tok_info tk = ti[t];
    const float *cache = tk.kv + (int64_t)layer * tk.n_ctx * W;
    const int last = tk.pos;
    float acc[AT_MAXC];
#pragma unroll
    for (int k = 0; k < AT_MAXC; k++) acc[k] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    __syncthreads();
    for (int p0 = 0; p0 <= last; p0 += AT_CHUNK) {
#pragma unroll
        for (int j = 0; j < AT_PPW; j++) {
            const int p = p0 + warp * AT_PPW + j;
            float d = 0.0f;
            if (p <= last) {
                const float *row = cache + (int64_t)p * W;
                for (int c = lane; c < W; c += 32) d = fmaf(row[c], sq[c], d);
            }
            for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
            if (lane == 0) sc[warp * AT_PPW + j] = p <= last ? d * scale : -INFINITY;
        }
        __syncthreads();
        float cm = -INFINITY;
        for (int e = 0; e < AT_CHUNK; e++) cm = fmaxf(cm, sc[e]);
        const float mn = fmaxf(m, cm); /* finite: position p0 <= last is in the chunk */
        const float corr = m == -INFINITY ? 0.0f : expf(m - mn);
        l *= corr;
#pragma unroll
        for (int k = 0; k < AT_MAXC; k++) acc[k] *= corr;
        const int ne = last - p0 + 1 < AT_CHUNK ? last - p0 + 1 : AT_CHUNK;
        for (int e = 0; e < ne; e++) {
            const float pe = expf(sc[e] - mn);
            l += pe;
            const float *row = cache + (int64_t)(p0 + e) * W;
#pragma unroll
            for (int k = 0; k < AT_MAXC; k++) {
                const int c = tid + k * AT_THREADS;
                if (c < kr) acc[k] = fmaf(pe, row[c], acc[k]);
            }
        }
        m = mn;
        __syncthreads(); /* sc is rewritten by the next chunk */
    }
    const float inv = 1.0f / l;
    float *out = oc + (t * nh + h) * kr;
#pragma unroll
    for (int k = 0; k < AT_MAXC; k++) {
        const int c = tid + k * AT_THREADS;
        if (c < kr) out[c] = acc[k] * inv;
    }
}

/* One CTA per row of S (a token's head over positions 0..Lb): the weights
 * softmax(S[r][0..valid)) in place, zeros from valid to Lb, valid =
 * pos0 + r / nh + 1 (row r is token r / nh of a run at consecutive
 * positions from pos0). As the CPU path: the exact max first, then the
 * normalised weights. */
constexpr int SM_THREADS = 256;

__device__ __forceinline__ float block_reduce(float v, float *red, bool is_max) {
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads(); /* red is free (a previous reduction's readers are done) */
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = red[0];
    for (int w = 1; w < SM_THREADS / 32; w++) v = is_max ? fmaxf(v, red[w]) : v + red[w];
    return v;
}

__global__ void __launch_bounds__(SM_THREADS) k_attn_softmax(float *S, int64_t Lb, int nh, int pos0) {
    __shared__ float red[SM_THREADS / 32];
    const int64_t r = blockIdx.x;
    float *row = S + r * Lb;
    const int64_t valid = (int64_t)pos0 + r / nh + 1;
    float m = -INFINITY;
    for (int64_t p = threadIdx.x; p < valid; p += SM_THREADS) m = fmaxf(m, row[p]);
    m = block_reduce(m, red, true);
    float l = 0.0f;
    for (int64_t p = threadIdx.x; p < valid; p += SM_THREADS) {
        const float e = expf(row[p] - m);
        row[p] = e;
        l += e;
    }
    l = block_reduce(l, red, false);
    const float inv = 1.0f / l;
    for (int64_t p = threadIdx.x; p < Lb; p += SM_THREADS) row[p] = p < valid ? row[p] * inv : 0.0f;
}

} /* namespace */

cudaError_t attn_softmax(cudaStream_t s, float *S, int64_t rows, int64_t Lb, int nh, int pos0) {
    if (rows < 1) return cudaSuccess;
    if (rows > 0x7fffffff || (int64_t)pos0 + (rows - 1) / nh + 1 > Lb) return cudaErrorInvalidValue;
    k_attn_softmax<<<(unsigned)rows, SM_THREADS, 0, s>>>(S, Lb, nh, pos0);
    return cudaGetLastError();
}

cudaError_t attention(cudaStream_t s, const float *qabs, float *oc, const tok_info *ti, int layer, int nh, int kr,
                      int dr, float scale, int64_t n) {
    if (n < 1) return cudaSuccess;
    if (kr > AT_MAXC * AT_THREADS || nh > 65535) return cudaErrorInvalidValue;
    const size_t smem = (size_t)(kr + dr + AT_CHUNK) * sizeof(float);
    k_attention<<<dim3((unsigned)n, (unsigned)nh), AT_THREADS, smem, s>>>(qabs, oc, ti, layer, nh, kr, dr, scale);
    return cudaGetLastError();
}

} /* namespace numoe_gpu */
