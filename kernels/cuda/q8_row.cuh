/* q8_row.cuh - the 8-bit activation row the integer GEMV reads
 * (kernels/cuda/gemv_q8.cu, cuda_quant.h: nm_cuda_quantize_q8), as device
 * code, so that a kernel which produces an activation (the GPU forward
 * pass's RMSNorm, coordinator/engine/gpu/gpu_norm.cu) can write its q8 copy
 * in the same launch instead of a quantising kernel after it, with the same
 * bytes nm_cuda_quantize_q8 writes.
 *
 * A row of cols elements (cols a multiple of 32):
 *   [cols int8 q][cols / 32 float2 (d, s)], padded to 16 bytes,
 * per 32-element block d = max|x| / 127, q = round-to-nearest-even(x / d)
 * (|q| <= 127, q = 0 when d = 0), s = d * sum q (the sum of the quantised
 * block, so the zero-point and min terms of the weights meet the integer
 * sums: docs/MODEL.md §4). CUDA C++ only. */
#ifndef NUMOE_KERNELS_CUDA_Q8_ROW_CUH
#define NUMOE_KERNELS_CUDA_Q8_ROW_CUH

#include <cuda_runtime.h>
#include <stdint.h>

namespace numoe_q8 {

__host__ __device__ constexpr int64_t row_bytes(int64_t cols) { return (cols + cols / 4 + 15) & ~(int64_t)15; }

/* Quantises 4 consecutive elements v of 32-element block b of a row: the
 * block's 8 threads are 8 consecutive lanes of one warp (lanes 8g..8g+7,
 * part = lane % 8 holding elements 4 part .. 4 part + 3). Every lane of the
 * warp must call it (the reductions are warp shuffles); a lane with !live
 * passes zeros and writes nothing. */
__device__ __forceinline__ void quantize4(float4 v, bool live, uint8_t *row, int64_t cols, int64_t b, int part) {
    float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
    for (int off = 4; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off, 8));
    const float d = amax / 127.0f;
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
    const int q0 = __float2int_rn(v.x * id), q1 = __float2int_rn(v.y * id), q2 = __float2int_rn(v.z * id),
              q3 = __float2int_rn(v.w * id);
    int s = q0 + q1 + q2 + q3;
#pragma unroll
    for (int off = 4; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off, 8);
    if (!live) return;
    const uint32_t packed =
        (uint32_t)(q0 & 0xff) | ((uint32_t)(q1 & 0xff) << 8) | ((uint32_t)(q2 & 0xff) << 16) | ((uint32_t)q3 << 24);
    reinterpret_cast<uint32_t *>(row + 32 * b)[part] = packed;
    if (part == 0) reinterpret_cast<float2 *>(row + cols)[b] = make_float2(d, d * (float)s);
}

} /* namespace numoe_q8 */

#endif
