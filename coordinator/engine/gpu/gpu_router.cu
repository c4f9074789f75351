/* gpu_router.cu - MoE expert selection on the GPU (gpu_kernels.cuh route),
 * one warp per token, following coordinator/router.c step by step:
 *   p = softmax(logits) (V2) or sigmoid(logits) (V3); s = p + bias;
 *   with groups: a group scores its best s (softmax) or the sum of its two
 *   best (sigmoid); the best G_used groups stay, the others' s become -inf;
 *   k times the largest s not yet taken (ties to the lower index, -inf ones
 *   too: an untaken -inf entry still beats "none", as argmax_free does);
 *   weights = p of the chosen, times scale / (sum + 1e-20) when normalised.
 * The argmax is exact (max and index compare only), so the selection equals
 * the CPU's whenever p and s do; p's softmax sum is a warp tree (the CPU
 * adds sequentially), which can move p by an ulp. */
#include "coordinator/engine/gpu/gpu_kernels.cuh"

#include <math.h>

namespace numoe_gpu {
namespace {

/* (v, i) beats (w, j): i is a candidate and j is none, or v > w, or a tie
 * with the lower index. */
__device__ __forceinline__ bool beats(float v, int i, float w, int j) {
    if (i < 0) return false;
    if (j < 0) return true;
    return v > w || (v == w && i < j);
}

__device__ __forceinline__ void warp_best(float *v, int *i) {
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, *v, o);
        const int j = __shfl_xor_sync(0xffffffffu, *i, o);
        if (beats(w, j, *v, *i)) *v = w, *i = j;
    }
}

__global__ void __launch_bounds__(32) k_route(const float *logits, const float *bias, int32_t *ids, float *wout,
                                              int32_t *ids2, float *w2, int E, int k, int G, int G_used, int sigmoid,
                                              int norm_topk, float scale) {
    extern __shared__ float sm[];
    float *p = sm, *s = sm + E, *gscore = s + E;
    int *taken = (int *)(gscore + G + 1), *keep = taken + E;
    const int64_t t = blockIdx.x;
    const int lane = threadIdx.x;
    const float *lg = logits + t * E;
    if (!sigmoid) {
        float mx = -INFINITY;
        for (int i = lane; i < E; i += 32) mx = fmaxf(mx, lg[i]);
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.0f;
        for (int i = lane; i < E; i += 32) sum += p[i] = expf(lg[i] - mx);
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        for (int i = lane; i < E; i += 32) p[i] = __fdiv_rn(p[i], sum);
    } else {
        for (int i = lane; i < E; i += 32) p[i] = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-lg[i])));
    }
    for (int i = lane; i < E; i += 32) {
        s[i] = bias ? __fadd_rn(p[i], bias[i]) : p[i];
        taken[i] = 0;
    }
    __syncwarp();
    if (G > 1 && G_used < G) {
        const int per = E / G;
        for (int g = lane; g < G; g += 32) {
            const float *x = s + g * per;
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int i = 0; i < per; i++) {
                if (x[i] > b1) b2 = b1, b1 = x[i];
                else if (x[i] > b2) b2 = x[i];
            }
            gscore[g] = sigmoid ? __fadd_rn(b1, per > 1 ? b2 : 0.0f) : b1;
            keep[g] = 0;
        }
        __syncwarp();
        for (int j = 0; j < G_used; j++) {
            float bv = -INFINITY;
            int bi = -1;
            for (int g = lane; g < G; g += 32)
                if (!keep[g] && beats(gscore[g], g, bv, bi)) bv = gscore[g], bi = g;
            warp_best(&bv, &bi);
            if (lane == 0) keep[bi] = 1;
            __syncwarp();
        }
        for (int i = lane; i < E; i += 32)
            if (!keep[i / per]) s[i] = -INFINITY;
        __syncwarp();
    }
    float sum = 0.0f;
    for (int j = 0; j < k; j++) {
        float bv = -INFINITY;
        int bi = -1;
        for (int i = lane; i < E; i += 32)
            if (!taken[i] && beats(s[i], i, bv, bi)) bv = s[i], bi = i;
        warp_best(&bv, &bi);
        if (lane == 0) {
            taken[bi] = 1;
            ids[t * k + j] = bi;
            wout[t * k + j] = p[bi];
            sum = __fadd_rn(sum, p[bi]);
        }
        __syncwarp();
    }
    if (lane == 0) {
        float sc = scale;
        if (norm_topk) sc = __fdiv_rn(sc, __fadd_rn(sum, 1e-20f));
        for (int j = 0; j < k; j++) wout[t * k + j] = __fmul_rn(wout[t * k + j], sc);
        /* the copies (the expert backend's input region in host memory):
         * written here, the hand-off needs no copy nodes */
        for (int j = 0; j < k; j++) {
            if (ids2) ids2[t * k + j] = ids[t * k + j];
            if (w2) w2[t * k + j] = wout[t * k + j];
        }
    }
}

} /* namespace */

cudaError_t route(cudaStream_t s, const float *logits, const float *bias, int32_t *ids, float *w, int32_t *ids2,
                  float *w2, int64_t n, int E, int k, int G, int G_used, int sigmoid, int norm_topk, float scale) {
    if (n < 1) return cudaSuccess;
    if (E < 1 || E > 1024 || G < 1 || G > 256 || k < 1 || k > E) return cudaErrorInvalidValue;
    const size_t smem = (size_t)(2 * E + G + 1) * sizeof(float) + (size_t)(E + G) * sizeof(int);
    k_route<<<(unsigned)n, 32, smem, s>>>(logits, bias, ids, w, ids2, w2, E, k, G, G_used, sigmoid, norm_topk,
                                                  scale);
    return cudaGetLastError();
}

} /* namespace numoe_gpu */
