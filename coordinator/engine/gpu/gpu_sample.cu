/* gpu_sample.cu - the sampler's heavy part on the GPU: the m largest logits
 * of a row (gpu_kernels.cuh), so that only m (id, logit) pairs cross PCIe
 * instead of the whole vocabulary row.
 *
 * Order and ties are the host sampler's (coordinator/text/sampler.h): NaN
 * counts as -inf, logits descending, ties to the lower id. The selection is
 * a radix select over an order-preserving 32-bit key (four 8-bit digits from
 * the top, one histogram each), which finds the m-th largest key K and how
 * many of the elements equal to K belong in; a last pass collects every
 * element above K and the lowest-id ones equal to K, in id order (block
 * scans over contiguous chunks), so the output is deterministic. */
#include "coordinator/engine/gpu/gpu_kernels.cuh"

namespace numoe_gpu {
namespace {

constexpr int TOP_THREADS = 1024;

/* Larger key = larger logit; NaN as -inf, -0 as +0 (equal under the
 * sampler's comparisons, so they must tie here too). */
__device__ __forceinline__ uint32_t order_key(float x) {
    if (isnan(x)) x = -INFINITY;
    if (x == 0.0f) x = 0.0f;
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* Exclusive prefix sum of v over the block; returns this thread's offset
 * and the total in *total. */
__device__ int block_scan(int v, int *sh, int *total) {
    const int t = threadIdx.x, n = blockDim.x;
    sh[t] = v;
    __syncthreads();
    for (int o = 1; o < n; o <<= 1) {
        const int add = t >= o ? sh[t - o] : 0;
        __syncthreads();
        sh[t] += add;
        __syncthreads();
    }
    const int incl = sh[t];
    *total = sh[n - 1];
    __syncthreads();
    return incl - v;
}

__global__ void __launch_bounds__(TOP_THREADS) k_top_m(const float *row, int64_t V, int m, int32_t *ids, float *vals) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t s_prefix, s_mask;
    __shared__ int s_rem;
    __shared__ int sh[TOP_THREADS];
    const int tid = threadIdx.x, nt = blockDim.x;
    if (tid == 0) s_prefix = 0, s_mask = 0, s_rem = m;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += nt) hist[i] = 0;
        __syncthreads();
        const uint32_t prefix = s_prefix, mask = s_mask;
        for (int64_t i = tid; i < V; i += nt) {
            const uint32_t k = order_key(row[i]);
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            int rem = s_rem, b = 255;
            for (; b > 0; b--) {
                if ((int)hist[b] >= rem) break;
                rem -= (int)hist[b];
            }
            s_prefix = prefix | ((uint32_t)b << shift);
            s_mask = mask | (255u << shift);
            s_rem = rem;
        }
        __syncthreads();
    }
    const uint32_t K = s_prefix;
    const int take_eq = s_rem; /* elements equal to K that belong in, lowest ids first */
    const int64_t chunk = (V + nt - 1) / nt, lo = tid * chunk, hi = lo + chunk < V ? lo + chunk : V;
    int gt = 0, eq = 0;
    for (int64_t i = lo; i < hi; i++) {
        const uint32_t k = order_key(row[i]);
        gt += k > K;
        eq += k == K;
    }
    int n_gt, n_eq;
    int off_gt = block_scan(gt, sh, &n_gt);
    int off_eq = block_scan(eq, sh, &n_eq);
    (void)n_eq;
    for (int64_t i = lo; i < hi; i++) {
        const float x = row[i];
        const uint32_t k = order_key(x);
        if (k > K) {
            ids[off_gt] = (int32_t)i, vals[off_gt] = x;
            off_gt++;
        } else if (k == K) {
            if (off_eq < take_eq) ids[n_gt + off_eq] = (int32_t)i, vals[n_gt + off_eq] = x;
            off_eq++;
        }
    }
}

__global__ void k_pick(const float *row, const int32_t *ids, int n, float *out) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = row[ids[i]];
}

} /* namespace */

cudaError_t top_m(cudaStream_t s, const float *row, int64_t V, int m, int32_t *ids, float *vals) {
    if (m < 1 || V < 1 || m > V) return cudaErrorInvalidValue;
    k_top_m<<<1, TOP_THREADS, 0, s>>>(row, V, m, ids, vals);
    return cudaGetLastError();
}

cudaError_t pick(cudaStream_t s, const float *row, const int32_t *ids, int n, float *out) {
    if (n < 1) return cudaSuccess;
    k_pick<<<(n + 255) / 256, 256, 0, s>>>(row, ids, n, out);
    return cudaGetLastError();
}

} /* namespace numoe_gpu */
