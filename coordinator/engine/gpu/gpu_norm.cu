/* gpu_norm.cu - RMSNorm and the element-wise steps of the GPU forward pass
 * (see gpu_kernels.cuh for the contract). RMSNorm follows forward.c's
 * rmsnorm: the sum of squares in double, then inv = 1 / sqrtf((float)(ss / n)
 * + eps) and out = (x * inv) * w, each product rounded on its own. */
#include "coordinator/engine/gpu/gpu_kernels.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/q8_row.cuh"

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

/* forward.c's steps once the sum of squares is known */
__device__ __forceinline__ float norm_inv(double ss, int64_t dim, float eps) {
    return 1.0f / sqrtf(__fadd_rn((float)(ss / (double)dim), eps));
}
__device__ __forceinline__ float norm_elem(float x, float inv, float w) { return __fmul_rn(__fmul_rn(x, inv), w); }
__device__ __forceinline__ float4 add4(float4 v, float4 u) {
    return make_float4(__fadd_rn(v.x, u.x), __fadd_rn(v.y, u.y), __fadd_rn(v.z, u.z), __fadd_rn(v.w, u.w));
}

__global__ void __launch_bounds__(NORM_THREADS) k_rmsnorm(float *out, int64_t o_stride, const float *x,
                                                          int64_t x_stride, const int32_t *rows, const float *w,
                                                          int64_t dim, float eps) {
    numoe_pdl::pdl_trigger();
    numoe_pdl::pdl_wait(); /* pdl.cuh: everything here follows the kernel before */
    __shared__ double red[NORM_THREADS / 32];
    const int64_t r = blockIdx.x;
    const float *xr = x + (rows ? (int64_t)rows[r] : r) * x_stride;
    float *orow = out + r * o_stride;
    /* squares summed per thread over groups of 4 (group g = threadIdx.x + k * blockDim.x), as
     * k_add_norm does: the same double sum, so the fused and separate kernels agree bit for bit */
    double ss = 0;
    for (int64_t g = threadIdx.x; 4 * g < dim; g += blockDim.x)
        for (int64_t i = 4 * g; i < 4 * g + 4 && i < dim; i++) ss += (double)xr[i] * (double)xr[i];
    ss = block_sum(ss, red);
    const float inv = norm_inv(ss, dim, eps);
    /* each thread reads and writes only its own elements: in place is safe */
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) orow[i] = norm_elem(xr[i], inv, w[i]);
}

/* add_norm: one CTA per row, each thread holding up to NORM_VEC float4
 * groups of it in registers (group i = threadIdx.x + k * NORM_THREADS), so
 * every load of x, a and b is issued before the first is used: when a or
 * b is mapped host memory (the routed sum) the row costs one PCIe round
 * trip, not one per group. Group i is part i % 8 of 32-element block i / 8,
 * and the 8 threads of a block are 8 consecutive lanes, as
 * numoe_q8::quantize4 needs; every warp runs every k (the q8 reductions are
 * warp shuffles). */
constexpr int NORM_VEC = 8; /* rows up to 8 * 4 * 256 = 8192 floats (DeepSeek-V3: 7168) */

template <bool Q8>
__global__ void __launch_bounds__(NORM_THREADS) k_add_norm(float *x, const float *a, const float *b, float *out,
                                                           float *out2, const float *w, int64_t dim, float eps,
                                                           uint8_t *xq) {
    numoe_pdl::pdl_trigger();
    numoe_pdl::pdl_wait(); /* pdl.cuh: everything here follows the kernel before */
    __shared__ double red[NORM_THREADS / 32];
    const int64_t r = blockIdx.x, d4 = dim / 4;
    float4 *xr = reinterpret_cast<float4 *>(x + r * dim);
    const float4 *ar = a ? reinterpret_cast<const float4 *>(a + r * dim) : nullptr;
    const float4 *br = b ? reinterpret_cast<const float4 *>(b + r * dim) : nullptr;
    const float4 *w4 = reinterpret_cast<const float4 *>(w);
    float4 *o4 = reinterpret_cast<float4 *>(out + r * dim);
    float4 *p4 = out2 ? reinterpret_cast<float4 *>(out2 + r * dim) : nullptr;
    const float4 zero = make_float4(0, 0, 0, 0);
    float4 v[NORM_VEC], u[NORM_VEC], t[NORM_VEC];
#pragma unroll
    for (int k = 0; k < NORM_VEC; k++) {
        const int64_t i = threadIdx.x + (int64_t)k * NORM_THREADS;
        v[k] = i < d4 ? xr[i] : zero;
        u[k] = ar && i < d4 ? ar[i] : zero;
        t[k] = br && i < d4 ? br[i] : zero;
    }
    double ss = 0;
#pragma unroll
    for (int k = 0; k < NORM_VEC; k++) {
        const int64_t i = threadIdx.x + (int64_t)k * NORM_THREADS;
        if (i >= d4) continue;
        if (ar) {
            v[k] = add4(v[k], u[k]);
            if (br) v[k] = add4(v[k], t[k]);
            xr[i] = v[k];
        }
        ss += (double)v[k].x * (double)v[k].x;
        ss += (double)v[k].y * (double)v[k].y;
        ss += (double)v[k].z * (double)v[k].z;
        ss += (double)v[k].w * (double)v[k].w;
    }
    ss = block_sum(ss, red);
    const float inv = norm_inv(ss, dim, eps);
    uint8_t *row = Q8 ? xq + r * numoe_q8::row_bytes(dim) : nullptr;
#pragma unroll
    for (int k = 0; k < NORM_VEC; k++) {
        const int64_t i = threadIdx.x + (int64_t)k * NORM_THREADS;
        if ((int64_t)k * NORM_THREADS >= d4) break; /* the same for the whole CTA */
        const bool live = i < d4;
        float4 o = zero;
        if (live) {
            const float4 g = w4[i];
            o = make_float4(norm_elem(v[k].x, inv, g.x), norm_elem(v[k].y, inv, g.y), norm_elem(v[k].z, inv, g.z),
                            norm_elem(v[k].w, inv, g.w));
            o4[i] = o;
            if (p4) p4[i] = o;
        }
        if (Q8) numoe_q8::quantize4(o, live, row, dim, i / 8, (int)(i % 8));
    }
}

__global__ void k_silu_mul(float *g, const float *u, int64_t n) {
    numoe_pdl::pdl_trigger();
    numoe_pdl::pdl_wait(); /* pdl.cuh: everything here follows the kernel before */
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float v = g[i];
        g[i] = __fmul_rn(__fdiv_rn(v, __fadd_rn(1.0f, expf(-v))), u[i]);
    }
}

__global__ void k_add(float *x, const float *a, const float *b, int64_t n) {
    numoe_pdl::pdl_trigger();
    numoe_pdl::pdl_wait(); /* pdl.cuh: everything here follows the kernel before */
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
    (void)numoe_pdl::launch(k_rmsnorm, dim3((unsigned)n_rows), dim3(NORM_THREADS), 0, s, out, o_stride, x, x_stride,
                            rows, w, dim, eps);
    return cudaGetLastError();
}

bool add_norm_fits(const void *x, const void *a, const void *b, const void *out, const void *out2, int64_t dim,
                   bool q8) {
    const auto al = [](const void *p) { return (uintptr_t)p % 16 == 0; };
    return dim > 0 && dim % (q8 ? 32 : 4) == 0 && dim <= 4 * NORM_VEC * NORM_THREADS && x && out && al(x) && al(a) &&
           al(b) && al(out) && al(out2);
}

cudaError_t add_norm(cudaStream_t s, float *x, const float *a, const float *b, float *out, float *out2, const float *w,
                     int64_t n_rows, int64_t dim, float eps, uint8_t *xq) {
    if (n_rows < 1) return cudaSuccess;
    if (!add_norm_fits(x, a, b, out, out2, dim, xq != nullptr) || (uintptr_t)w % 16 || (uintptr_t)xq % 16 || (b && !a))
        return cudaErrorInvalidValue;
    if (xq)
        (void)numoe_pdl::launch(k_add_norm<true>, dim3((unsigned)n_rows), dim3(NORM_THREADS), 0, s, x, a, b, out, out2,
                                w, dim, eps, xq);
    else
        (void)numoe_pdl::launch(k_add_norm<false>, dim3((unsigned)n_rows), dim3(NORM_THREADS), 0, s, x, a, b, out, out2,
                                w, dim, eps, nullptr);
    return cudaGetLastError();
}

cudaError_t silu_mul(cudaStream_t s, float *g, const float *u, int64_t n) {
    if (n < 1) return cudaSuccess;
    (void)numoe_pdl::launch(k_silu_mul, dim3(grid_of(n)), dim3(256), 0, s, g, u, n);
    return cudaGetLastError();
}

cudaError_t add(cudaStream_t s, float *x, const float *a, const float *b, int64_t n) {
    if (n < 1) return cudaSuccess;
    (void)numoe_pdl::launch(k_add, dim3(grid_of(n)), dim3(256), 0, s, x, a, b, n);
    return cudaGetLastError();
}

} /* namespace numoe_gpu */
