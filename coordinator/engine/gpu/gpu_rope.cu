/* gpu_rope.cu - the per-token MLA inputs (gpu_kernels.cuh mla_prep): the
 * latent c_KV normalised into the cache, and YaRN RoPE of k_pe and of every
 * head's q_pe, as forward.c's attention() and rope.c do it.
 *
 * RoPE rotates adjacent pairs (x[2i], x[2i+1]) by pos * inv_freq[i]; the
 * frequencies come from nm_rope_init on the host (YaRN ramp included), so
 * only the rotation runs here, written with the CPU's rounding:
 * ang = (float)pos * f, y0 = x0*c - x1*s, y1 = x0*s + x1*c, each product and
 * sum rounded on its own (rope.c is built without FMA contraction). */
#include "coordinator/engine/gpu/gpu_kernels.cuh"

namespace numoe_gpu {
namespace {

constexpr int PREP_THREADS = 256;

__device__ __forceinline__ void rot(float x0, float x1, float ang, float *y0, float *y1) {
    const float c = cosf(ang), s = sinf(ang);
    *y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    *y1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

__global__ void __launch_bounds__(PREP_THREADS) k_mla_prep(const float *kvn, float *q, float *qabs, const tok_info *ti,
                                                           int layer, const float *kv_norm, const float *inv_freq,
                                                           int kr, int dr, int nh, int dn, float eps) {
    __shared__ double red[PREP_THREADS / 32];
    const int64_t t = blockIdx.x;
    const int W = kr + dr, dk = dn + dr, half = dr / 2;
    const float *src = kvn + t * W;
    const tok_info tk = ti[t];
    float *row = tk.kv + ((int64_t)layer * tk.n_ctx + tk.pos) * W;

    double ss = 0;
    for (int i = threadIdx.x; i < kr; i += blockDim.x) ss += (double)src[i] * (double)src[i];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        ss = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) red[0] = ss;
    }
    __syncthreads();
    const float inv = 1.0f / sqrtf(__fadd_rn((float)(red[0] / (double)kr), eps));
    for (int i = threadIdx.x; i < kr; i += blockDim.x) row[i] = __fmul_rn(__fmul_rn(src[i], inv), kv_norm[i]);

    const float fpos = (float)tk.pos;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float y0, y1;
        rot(src[kr + 2 * i], src[kr + 2 * i + 1], __fmul_rn(fpos, inv_freq[i]), &y0, &y1);
        row[kr + 2 * i] = y0;
        row[kr + 2 * i + 1] = y1;
    }
    for (int u = threadIdx.x; u < nh * half; u += blockDim.x) {
        const int h = u / half, i = u % half;
        float *qp = q + (t * nh + h) * dk + dn;
        float y0, y1;
        rot(qp[2 * i], qp[2 * i + 1], __fmul_rn(fpos, inv_freq[i]), &y0, &y1);
        qp[2 * i] = y0;
        qp[2 * i + 1] = y1;
        float *qa = qabs + (t * nh + h) * W + kr;
        qa[2 * i] = y0;
        qa[2 * i + 1] = y1;
    }
}

} /* namespace */

cudaError_t mla_prep(cudaStream_t s, const float *kvn, float *q, float *qabs, const tok_info *ti, int layer,
                     const float *kv_norm, const float *inv_freq, int kr, int dr, int nh, int dn, float eps, int64_t n) {
    if (n < 1) return cudaSuccess;
    k_mla_prep<<<(unsigned)n, PREP_THREADS, 0, s>>>(kvn, q, qabs, ti, layer, kv_norm, inv_freq, kr, dr, nh, dn, eps);
    return cudaGetLastError();
}

} /* namespace numoe_gpu */
