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

} /* namespace */

cudaError_t attention(cudaStream_t s, const float *qabs, float *oc, const tok_info *ti, int layer, int nh, int kr,
                      int dr, float scale, int64_t n) {
    if (n < 1) return cudaSuccess;
    if (kr > AT_MAXC * AT_THREADS || nh > 65535) return cudaErrorInvalidValue;
    const size_t smem = (size_t)(kr + dr + AT_CHUNK) * sizeof(float);
    k_attention<<<dim3((unsigned)n, (unsigned)nh), AT_THREADS, smem, s>>>(qabs, oc, ti, layer, nh, kr, dr, scale);
    return cudaGetLastError();
}

} /* namespace numoe_gpu */
