/* gpu_heads.cu - the per-head products of absorbed MLA for decode passes
 * (gpu_kernels.cuh heads_gemv): q_abs[h] = k_b[h] q_nope[h] and
 * o[h] = v_b[h] oc[h], one small matrix per head applied to that head's
 * slice of each token's row (docs/MODEL.md §5).
 *
 * Why not cuBLAS: cublasGemmStridedBatchedEx picks a GEMM kernel even for
 * one token; measured with ncu on one V2-Lite-shaped decode step (16 heads,
 * 512 x 128 per head, H200) it took 12.2 us for k_b and 5.0 us for v_b,
 * about 4 MB each: ~0.3-0.8 TB/s, on the serial path of every layer. A
 * GEMV reads each weight row once for all n <= HEADS_MAX_TOK tokens and
 * runs at the HBM's rate.
 *
 * Layout: one CTA per (block of HG_ROWS rows, head). The CTA first stages
 * the head's n input slices (n x k floats) in shared memory, then each warp
 * takes HG_RPW rows: lanes stride the row in float4 loads (contiguous per
 * warp), issue all HG_RPW rows' loads before the FMAs (memory-level
 * parallelism on a latency-bound step), and a shuffle tree sums each
 * (row, token) dot. A token's results do not depend on n or on the other
 * tokens (same order of operations), so batching sequences does not change
 * their bits. The order differs from the CPU's dot products: results agree
 * to float rounding, as for the other GPU kernels. */
#include "coordinator/engine/gpu/gpu_kernels.cuh"
#include "kernels/cuda/pdl.cuh"

namespace numoe_gpu {
namespace {

constexpr int HG_THREADS = 256, HG_WARPS = HG_THREADS / 32, HG_RPW = 2, HG_ROWS = HG_WARPS * HG_RPW;
constexpr int HG_MAXK = 1024;

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
    return fmaf(a.w, b.w, fmaf(a.z, b.z, fmaf(a.y, b.y, fmaf(a.x, b.x, acc))));
}

template <int NT>
__global__ void __launch_bounds__(HG_THREADS)
    k_heads_gemv(const float *A, int m, int k, const float *B, int64_t ldb, int64_t strideB, float *C, int64_t ldc,
                 int64_t strideC) {
    numoe_pdl::pdl_trigger();
    numoe_pdl::pdl_wait();         /* pdl.cuh: everything here follows the kernel before */
    extern __shared__ float4 sb[]; /* [NT][k / 4]: the head's input slices */
    const int h = blockIdx.y, k4 = k >> 2;
    for (int i = threadIdx.x; i < NT * k4; i += HG_THREADS) {
        const int t = i / k4, c = i - t * k4;
        sb[i] = reinterpret_cast<const float4 *>(B + (int64_t)h * strideB + (int64_t)t * ldb)[c];
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = blockIdx.x * HG_ROWS + warp * HG_RPW;
    if (r0 >= m) return; /* no barrier after this point */
    const float4 *Ah = reinterpret_cast<const float4 *>(A + (int64_t)h * m * k);
    float acc[HG_RPW][NT];
#pragma unroll
    for (int j = 0; j < HG_RPW; j++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[j][t] = 0.0f;
    for (int c = lane; c < k4; c += 32) {
        float4 a[HG_RPW];
#pragma unroll
        for (int j = 0; j < HG_RPW; j++)
            a[j] = r0 + j < m ? __ldg(Ah + (int64_t)(r0 + j) * k4 + c) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float4 b = sb[t * k4 + c];
#pragma unroll
            for (int j = 0; j < HG_RPW; j++) acc[j][t] = dot4(a[j], b, acc[j][t]);
        }
    }
#pragma unroll
    for (int j = 0; j < HG_RPW; j++)
#pragma unroll
        for (int t = 0; t < NT; t++)
            for (int o = 16; o > 0; o >>= 1) acc[j][t] += __shfl_xor_sync(0xffffffffu, acc[j][t], o);
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < HG_RPW; j++)
            if (r0 + j < m)
#pragma unroll
                for (int t = 0; t < NT; t++) C[(int64_t)h * strideC + (int64_t)t * ldc + r0 + j] = acc[j][t];
    }
}

template <int NT>
cudaError_t launch(cudaStream_t s, const float *A, int64_t m, int64_t k, const float *B, int64_t ldb,
                   int64_t strideB, float *C, int64_t ldc, int64_t strideC, int64_t nh) {
    const dim3 grid((unsigned)((m + HG_ROWS - 1) / HG_ROWS), (unsigned)nh);
    const size_t smem = (size_t)NT * (size_t)k * sizeof(float);
    (void)numoe_pdl::launch(k_heads_gemv<NT>, dim3(grid), dim3(HG_THREADS), smem, s, A, (int)m, (int)k, B, ldb, strideB,
                            C, ldc, strideC);
    return cudaGetLastError();
}

bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

} /* namespace */

bool heads_gemv_fits(const float *A, int64_t k, const float *B, int64_t ldb, int64_t strideB, int64_t n,
                     int64_t nh) {
    return n >= 1 && n <= HEADS_MAX_TOK && k >= 4 && k <= HG_MAXK && k % 4 == 0 && ldb % 4 == 0 &&
           strideB % 4 == 0 && aligned16(A) && aligned16(B) && nh >= 1 && nh <= 65535;
}

cudaError_t heads_gemv(cudaStream_t s, const float *A, int64_t m, int64_t k, const float *B, int64_t ldb,
                       int64_t strideB, float *C, int64_t ldc, int64_t strideC, int64_t n, int64_t nh) {
    if (m < 1 || m > 0x7fffffff || !heads_gemv_fits(A, k, B, ldb, strideB, n, nh)) return cudaErrorInvalidValue;
    static_assert(HEADS_MAX_TOK == 8, "one instance per token count below");
    switch (n) {
    case 1: return launch<1>(s, A, m, k, B, ldb, strideB, C, ldc, strideC, nh);
    case 2: return launch<2>(s, A, m, k, B, ldb, strideB, C, ldc, strideC, nh);
    case 3: return launch<3>(s, A, m, k, B, ldb, strideB, C, ldc, strideC, nh);
    case 4: return launch<4>(s, A, m, k, B, ldb, strideB, C, ldc, strideC, nh);
    case 5: return launch<5>(s, A, m, k, B, ldb, strideB, C, ldc, strideC, nh);
    case 6: return launch<6>(s, A, m, k, B, ldb, strideB, C, ldc, strideC, nh);
    case 7: return launch<7>(s, A, m, k, B, ldb, strideB, C, ldc, strideC, nh);
    default: return launch<8>(s, A, m, k, B, ldb, strideB, C, ldc, strideC, nh);
    }
}

} /* namespace numoe_gpu */
