/* gpu_norm.cu - RMSNorm and the element-wise steps of the GPU forward pass
 * (see gpu_kernels.cuh for the contract). RMSNorm follows forward.c's
 * rmsnorm: the sum of squares in double, then inv = 1 / sqrtf((float)(ss / n)
 * + eps) and out = (x * inv) * w, each product rounded on its own. */
#include "coordinator/engine/gpu/gpu_kernels.cuh"

namespace numoe_gpu {
namespace {

constexpr int NORM_THREADS = 256;

__device__ double block_sum(double v, double *red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    return red[0];
}

__global__ void __launch_bounds__(NORM_THREADS) k_rmsnorm(float *out, int64_t o_stride, const float *x,
                                                          int64_t x_stride, const int32_t *rows, const float *w,
                                                          int64_t dim, float eps) {
    __shared__ double red[NORM_THREADS / 32];
    const int64_t r = blockIdx.x;
    const float *xr = x + (rows ? (int64_t)rows[r] : r) * x_stride;
    float *orow = out + r * o_stride;
    double ss = 0;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss += (double)xr[i] * (double)xr[i];
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(__fadd_rn((float)(ss / (double)dim), eps));
    /* each thread reads and writes only its own elements: in place is safe */
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) orow[i] = __fmul_rn(__fmul_rn(xr[i], inv), w[i]);
}

__global__ void k_silu_mul(float *g, const float *u, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float v = g[i];
        g[i] = __fmul_rn(__fdiv_rn(v, __fadd_rn(1.0f, expf(-v))), u[i]);
    }
}

__global__ void k_add(float *x, const float *a, const float *b, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v = __fadd_rn(x[i], a[i]);
        if (b) v = __fadd_rn(v, b[i]);
        x[i] = v;
    }
}

unsigned grid_of(int64_t n) {
    int64_t g = (n + 255) / 256;
    return (unsigned)(g < 1 ? 1 : g > 65535 ? 65535 : g);
}

} /* namespace */

cudaError_t rmsnorm(cudaStream_t s, float *out, int64_t o_stride, const float *x, int64_t x_stride, const int32_t *rows,
                    const float *w, int64_t n_rows, int64_t dim, float eps) {
    if (n_rows < 1) return cudaSuccess;
    k_rmsnorm<<<(unsigned)n_rows, NORM_THREADS, 0, s>>>(out, o_stride, x, x_stride, rows, w, dim, eps);
    return cudaGetLastError();
}

cudaError_t silu_mul(cudaStream_t s, float *g, const float *u, int64_t n) {
    if (n < 1) return cudaSuccess;
    k_silu_mul<<<grid_of(n), 256, 0, s>>>(g, u, n);
    return cudaGetLastError();
}

cudaError_t add(cudaStream_t s, float *x, const float *a, const float *b, int64_t n) {
    if (n < 1) return cudaSuccess;
    k_add<<<grid_of(n), 256, 0, s>>>(x, a, b, n);
    return cudaGetLastError();
}

} /* namespace numoe_gpu */
