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
 * prefill (the layer's cache stays in L2) and short decode contexts.
 *
 * Split positions (decode): one CTA per head walks its chunks one after the
 * other, so a decode step's attention took time in proportion to the
 * context with only nh CTAs busy (16 of the H200's 132 SMs for V2-Lite).
 * With n_split > 1 the chunks 0..pos/32 are cut into n_split equal runs,
 * one CTA each (blockIdx.z); each writes its unnormalised accumulator with
 * its running max m_s and sum l_s, and the last of the n_split CTAs to
 * finish (a counter per (token, head) at the start of the scratch, back to
 * 0 when it is done) merges them as flash-decoding does: M = max m_s,
 * oc = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, in run order, so
 * the result does not depend on which CTA came last (and no second kernel
 * sits on a decode step's serial path). The grid depends only on n, nh and the split
 * count, not on the positions (read from the token table on the device),
 * so a captured CUDA graph replays it at every context length; a run past
 * the last chunk is empty (m = -inf, weight 0). n_split == 1 is the
 * unsplit kernel, bit for bit. */
#include "coordinator/engine/gpu/gpu_kernels.cuh"
#include "kernels/cuda/pdl.cuh"

#include <math.h>

namespace numoe_gpu {
namespace {

constexpr int AT_WARPS = 4, AT_THREADS = AT_WARPS * 32, AT_PPW = 8, AT_CHUNK = AT_WARPS * AT_PPW;
constexpr int AT_MAXC = 8; /* accumulators per thread: kv_lora <= AT_MAXC * AT_THREADS = 1024 */

/* The scratch of split runs starts with one int counter per (token, head)
 * of the largest split pass, rounded to 16 bytes, at a fixed offset so a
 * buffer sized for one pass size serves every smaller one. */
__host__ __device__ constexpr int64_t counters_floats(int nh) { return ((int64_t)ATTN_SPLIT_MAX_TOK * nh + 3) / 4 * 4; }

/* The n_split runs at pp ([acc 0..kr) | m | l] each) of one (token, head)
 * merged into out, in run order (deterministic), by one CTA. Run 0 always
 * holds position 0, so M is finite. The runs were written by other CTAs:
 * read through L2 (__ldcg), after the counter said they are all there. */
__device__ void merge_runs(const float *pp, float *out, int kr, int ns) {
    __shared__ float wt[ATTN_SPLIT_MAX]; /* e^(m_s - M) */
    __shared__ float inv_l;
    if (threadIdx.x == 0) {
        float M = -INFINITY;
        for (int s = 0; s < ns; s++) M = fmaxf(M, __ldcg(pp + s * (kr + 2) + kr));
        float l = 0.0f;
        for (int s = 0; s < ns; s++) {
            const float ms = __ldcg(pp + s * (kr + 2) + kr);
            wt[s] = ms == -INFINITY ? 0.0f : expf(ms - M);
            l = fmaf(wt[s], __ldcg(pp + s * (kr + 2) + kr + 1), l);
        }
        inv_l = 1.0f / l;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < kr; c += AT_THREADS) {
        float v = 0.0f;
        for (int s = 0; s < ns; s++)
            if (wt[s] != 0.0f) v = fmaf(wt[s], __ldcg(pp + s * (kr + 2) + c), v);
        out[c] = v * inv_l;
    }
}

__global__ void __launch_bounds__(AT_THREADS) k_attention(const float *qabs, float *oc, float *part,
                                                          const tok_info *ti, int layer, int nh, int kr, int dr,
                                                          float scale) {
    numoe_pdl::pdl_trigger();
    numoe_pdl::pdl_wait(); /* pdl.cuh: everything here follows the kernel before */
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
    /* this CTA's run of chunks: all of them unless split */
    const int ns = gridDim.z, n_chunk = last / AT_CHUNK + 1, per = (n_chunk + ns - 1) / ns;
    const int c_begin = blockIdx.z * per, c_end = c_begin + per < n_chunk ? c_begin + per : n_chunk;
    float acc[AT_MAXC];
#pragma unroll
    for (int k = 0; k < AT_MAXC; k++) acc[k] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    __syncthreads();
    for (int p0 = c_begin * AT_CHUNK; p0 < c_end * AT_CHUNK; p0 += AT_CHUNK) {
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
    if (ns > 1) { /* a run's share: [acc 0..kr) | m | l], m = -inf when empty; the last run merges */
        int *cnt = reinterpret_cast<int *>(part);
        float *runs = part + counters_floats(nh) + (t * nh + h) * ns * (kr + 2);
        float *pp = runs + blockIdx.z * (kr + 2);
#pragma unroll
        for (int k = 0; k < AT_MAXC; k++) {
            const int c = tid + k * AT_THREADS;
            if (c < kr) pp[c] = acc[k];
        }
        if (tid == 0) pp[kr] = m, pp[kr + 1] = l;
        __threadfence(); /* this run's share is visible before the counter says so */
        __syncthreads();
        __shared__ int last_run;
        if (tid == 0) last_run = atomicAdd(cnt + t * nh + h, 1) == ns - 1;
        __syncthreads();
        if (!last_run) return;
        __threadfence();
        merge_runs(runs, oc + (t * nh + h) * kr, kr, ns);
        if (tid == 0) cnt[t * nh + h] = 0; /* ready for the next call (the next kernel starts after this one) */
        return;
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

int attention_splits(int64_t n, int nh, int64_t n_ctx, int n_sm) {
    if (n < 1 || nh < 1 || n > ATTN_SPLIT_MAX_TOK) return 1;
    const int64_t ctas = n * nh, want = (2 * (int64_t)n_sm + ctas - 1) / ctas; /* about two CTAs per SM */
    const int64_t chunks = (n_ctx + AT_CHUNK - 1) / AT_CHUNK;
    int64_t ns = want < ATTN_SPLIT_MAX ? want : ATTN_SPLIT_MAX;
    if (ns > chunks) ns = chunks;
    return ns < 1 ? 1 : (int)ns;
}

size_t attention_part_floats(int64_t n, int nh, int kr, int n_split) {
    return n_split > 1 ? (size_t)counters_floats(nh) + (size_t)n * (size_t)nh * (size_t)n_split * (size_t)(kr + 2) : 0;
}

cudaError_t attention(cudaStream_t s, const float *qabs, float *oc, const tok_info *ti, int layer, int nh, int kr,
                      int dr, float scale, int64_t n, float *part, int n_split) {
    if (n < 1) return cudaSuccess;
    if (kr > AT_MAXC * AT_THREADS || nh > 65535 || n_split < 1 || n_split > ATTN_SPLIT_MAX ||
        (n_split > 1 && (!part || n > ATTN_SPLIT_MAX_TOK)))
        return cudaErrorInvalidValue;
    const size_t smem = (size_t)(kr + dr + AT_CHUNK) * sizeof(float);
    (void)numoe_pdl::launch(k_attention, dim3((unsigned)n, (unsigned)nh, (unsigned)n_split), dim3(AT_THREADS), smem, s,
                            qabs, oc, part, ti, layer, nh, kr, dr, scale);
    return cudaGetLastError();
}

} /* namespace numoe_gpu */
