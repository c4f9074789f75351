/* gpu_router.cu - MoE expert selection on the GPU (gpu_kernels.cuh route),
 * one CTA per token, following coordinator/router.c step by step:
 *   p = softmax(logits) (V2) or sigmoid(logits) (V3); s = p + bias;
 *   with groups: a group scores its best s (softmax) or the sum of its two
 *   best (sigmoid); the best G_used groups stay, the others' s become -inf;
 *   k times the largest s not yet taken (ties to the lower index, -inf ones
 *   too: an untaken -inf entry still beats "none", as argmax_free does);
 *   weights = p of the chosen, times scale / (sum + 1e-20) when normalised.
 * The selection is exact (value and index compares only), so it equals the
 * CPU's whenever p and s do; p's softmax sum is a warp tree (the CPU adds
 * sequentially), which can move p by an ulp. The CPU's k rounds are done as
 * one ranking (k_route below): the same picks in the same order, so ids and
 * weights have the bits of the one-warp, k-round kernel this replaced.
 * A NaN s ranks as -inf here (the CPU's argmax keeps a NaN it meets first). */
#include "coordinator/engine/gpu/gpu_kernels.cuh"
#include "kernels/cuda/pdl.cuh"

#include <math.h>

#include <algorithm>

namespace numoe_gpu {
namespace {

/* (v, i) beats (w, j): i is a candidate and j is none, or v > w, or a tie
 * with the lower index. Over NaN-free values with distinct indices this is
 * a strict total order, so "k times the best untaken" picks exactly the
 * entries of rank 0..k-1 in it, in rank order. */
__device__ __forceinline__ bool beats(float v, int i, float w, int j) {
    if (i < 0) return false;
    if (j < 0) return true;
    return v > w || (v == w && i < j);
}

constexpr int RT_THREADS = 256; /* the most per CTA; fewer when E is small */
constexpr int RT_SEG = 32;      /* entries per segment of the first ranking pass */

/* One CTA per token, blockDim.x a multiple of 32, at most RT_THREADS; the
 * steps are separated by __syncthreads:
 *   1. p and s. The softmax runs on warp 0 alone, lanes striding by 32, with
 *      the xor tree of the one-warp kernel: the sum, so p, keeps its bits.
 *   2. groups (G > 1 and G_used < G): a team of T lanes (a power of two,
 *      T * G <= blockDim.x where possible) per group takes the two best s
 *      of its lanes' entries and merges them by an xor tree. Max and second
 *      max of a multiset are order-free, so gscore equals the sequential
 *      loop's (b1 + b2 to the sign of a zero sum, which no compare sees).
 *      A group is kept iff fewer than G_used groups beat it (rank order over
 *      gscore, index ascending: the CPU's G_used rounds of argmax).
 *   3. the top k by rank, in two passes so that no thread scans all E:
 *      a. each entry's rank within its segment of RT_SEG consecutive
 *         entries (one warp reads one segment: broadcast loads); the
 *         kk = min(k, RT_SEG) best of each segment become candidates, at
 *         slot seg * kk + rank (the ranks are a permutation, so each slot
 *         is written once; slots past a short last segment stay empty).
 *      b. each candidate's rank among the candidates. Every entry of global
 *         rank r < k has segment rank <= r, so is a candidate, as is every
 *         entry beating it: its candidate rank is r. A candidate of global
 *         rank >= k has all k of those above it. So rank r < k among the
 *         candidates is pick r: V3 (E 256, k 8) ranks 64 candidates over 64
 *         rather than 256 entries over 256.
 *   4. warp 0: the weights, summed in pick order (the CPU's order), scaled,
 *      and written with the copies into ids2 / w2. */
__global__ void __launch_bounds__(RT_THREADS) k_route(const float *logits, const float *bias, int32_t *ids, float *wout,
                                                      int32_t *ids2, float *w2, int E, int k, int G, int G_used,
                                                      int sigmoid, int norm_topk, float scale) {
    numoe_pdl::pdl_trigger();
    numoe_pdl::pdl_wait(); /* pdl.cuh: everything here follows the kernel before */
    extern __shared__ float sm[];
    const int kk = k < RT_SEG ? k : RT_SEG, nslot = (E + RT_SEG - 1) / RT_SEG * kk;
    float *p = sm, *s = p + E, *gscore = s + E, *cv = gscore + G;
    int *keep = (int *)(cv + nslot), *ci = keep + G, *pick = ci + nslot;
    const int64_t t = blockIdx.x;
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31;
    const float *lg = logits + t * E;

    /* 1. p, s (a NaN s as -inf: the ranks below must be a permutation) */
    if (!sigmoid) {
        if (tid < 32) {
            float mx = -INFINITY;
            for (int i = lane; i < E; i += 32) mx = fmaxf(mx, lg[i]);
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float sum = 0.0f;
            for (int i = lane; i < E; i += 32) sum += p[i] = expf(lg[i] - mx);
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            for (int i = lane; i < E; i += 32) {
                p[i] = __fdiv_rn(p[i], sum);
                const float v = bias ? __fadd_rn(p[i], bias[i]) : p[i];
                s[i] = isnan(v) ? -INFINITY : v;
            }
        }
    } else {
        for (int i = tid; i < E; i += nt) {
            p[i] = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-lg[i])));
            const float v = bias ? __fadd_rn(p[i], bias[i]) : p[i];
            s[i] = isnan(v) ? -INFINITY : v;
        }
    }
    for (int c = tid; c < nslot; c += nt) ci[c] = -1;
    __syncthreads();

    /* 2. group limiting */
    if (G > 1 && G_used < G) {
        const int per = E / G;
        int T = 32;
        while (T > 1 && T * G > nt) T >>= 1;
        const int tl = tid & (T - 1);
        /* the trip count is the same for every thread: all lanes shuffle */
        for (int g0 = 0; g0 < G; g0 += nt / T) {
            const int g = g0 + tid / T;
            float b1 = -INFINITY, b2 = -INFINITY;
            if (g < G)
                for (int i = tl; i < per; i += T) {
                    const float x = s[g * per + i];
                    if (x > b1) b2 = b1, b1 = x;
                    else if (x > b2) b2 = x;
                }
            for (int o = T >> 1; o > 0; o >>= 1) {
                const float c1 = __shfl_xor_sync(0xffffffffu, b1, o), c2 = __shfl_xor_sync(0xffffffffu, b2, o);
                const float lo = fminf(b1, c1);
                b1 = fmaxf(b1, c1);
                b2 = fmaxf(lo, fmaxf(b2, c2));
            }
            if (g < G && tl == 0) {
                /* +inf + -inf is the one NaN left: rank it as -inf */
                const float v = sigmoid ? __fadd_rn(b1, per > 1 ? b2 : 0.0f) : b1;
                gscore[g] = isnan(v) ? -INFINITY : v;
            }
        }
        __syncthreads();
        for (int g = tid; g < G; g += nt) {
            const float v = gscore[g];
            int r = 0;
            for (int h = 0; h < G; h++) r += beats(gscore[h], h, v, g);
            keep[g] = r < G_used;
        }
        __syncthreads();
        /* entries past G * per (E % G != 0) belong to no group and stay, as
         * on the CPU */
        if (per > 0)
            for (int i = tid; i < E; i += nt)
                if (i / per < G && !keep[i / per]) s[i] = -INFINITY;
        __syncthreads();
    }

    /* 3a. the kk best of each segment. nt is a multiple of RT_SEG, so the
     * lanes of a warp share a segment and read s[j] as a broadcast. */
    for (int i = tid; i < E; i += nt) {
        const int seg = i / RT_SEG, j0 = seg * RT_SEG, j1 = min(j0 + RT_SEG, E);
        const float v = s[i];
        int r = 0;
        for (int j = j0; j < j1; j++) r += beats(s[j], j, v, i);
        if (r < kk) {
            cv[seg * kk + r] = v;
            ci[seg * kk + r] = i;
        }
    }
    __syncthreads();
    /* 3b. rank among the candidates (empty slots: index -1, never beat) */
    for (int c = tid; c < nslot; c += nt) {
        const int i = ci[c];
        if (i < 0) continue;
        const float v = cv[c];
        int r = 0;
        for (int d = 0; d < nslot; d++) r += beats(cv[d], ci[d], v, i);
        if (r < k) pick[r] = i;
    }
    __syncthreads();

    /* 4. weights: warp 0, every lane summing in pick order (the CPU's order,
     * and the same bits in each lane), then lane j writes pick j. The values
     * stay on chip: writing them out and reading them back was a chain of
     * L2 round trips on one thread. */
    if (tid < 32) {
        float sum = 0.0f;
        for (int j = 0; j < k; j++) sum = __fadd_rn(sum, p[pick[j]]);
        float sc = scale;
        if (norm_topk) sc = __fdiv_rn(sc, __fadd_rn(sum, 1e-20f));
        for (int j = lane; j < k; j += 32) {
            const int bi = pick[j];
            const float wj = __fmul_rn(p[bi], sc);
            ids[t * k + j] = bi;
            wout[t * k + j] = wj;
            /* the copies (the expert backend's input region in host memory):
             * written here, the hand-off needs no copy nodes */
            if (ids2) ids2[t * k + j] = bi;
            if (w2) w2[t * k + j] = wj;
        }
    }
}

} /* namespace */

cudaError_t route(cudaStream_t s, const float *logits, const float *bias, int32_t *ids, float *w, int32_t *ids2,
                  float *w2, int64_t n, int E, int k, int G, int G_used, int sigmoid, int norm_topk, float scale) {
    if (n < 1) return cudaSuccess;
    if (E < 1 || E > 1024 || G < 1 || G > 256 || k < 1 || k > E) return cudaErrorInvalidValue;
    /* E rounded up to a warp, at most RT_THREADS: E 64 (V2-Lite) runs two
     * warps, E 256 (V3) one thread per entry */
    const int nt = std::min((E + 31) / 32 * 32, RT_THREADS);
    const int nslot = (E + RT_SEG - 1) / RT_SEG * std::min(k, RT_SEG);
    /* p, s, gscore, candidate values; keep, candidate ids, picks: at most
     * 4 * (2048 + 256 + 1024 + 256 + 1024 + 1024) bytes, under the 48 KiB a
     * launch gets without opting in */
    const size_t smem = (size_t)(2 * E + G + nslot) * sizeof(float) + (size_t)(G + nslot + k) * sizeof(int);
    (void)numoe_pdl::launch(k_route, dim3((unsigned)n), dim3(nt), smem, s, logits, bias, ids, w, ids2, w2, E, k, G,
                            G_used, sigmoid, norm_topk, scale);
    return cudaGetLastError();
}

} /* namespace numoe_gpu */
