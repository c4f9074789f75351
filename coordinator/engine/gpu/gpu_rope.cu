/* gpu_rope.cu - the per-token MLA inputs (gpu_kernels.cuh mla_prep): the
 * latent c_KV normalised into the cache, and YaRN RoPE of k_pe and of every
 * head's q_pe, as forward.c's attention() and rope.c do it.
 *
 * RoPE rotates adjacent pairs (x[2i], x[2i+1]) by pos * inv_freq[i]; the
 * frequencies come from nm_rope_init on the host (YaRN ramp included), so
 * only the rotation runs here, written with the CPU's rounding:
 * ang = (float)pos * f, y0 = x0*c - x1*s, y1 = x0*s + x1*c, each product and
 * sum rounded on its own (rope.c is built without FMA contraction).
 *
 * A token's work is spread over 1 + ceil(nh * dr/2 / PREP_THREADS) CTAs
 * (one CTA did all of it: 6.8 us for 16 heads, 14.4 for 128 on the H200,
 * on every layer's serial path): blockIdx.y == 0 the cache row (the norm
 * of the latent, then k_pe), the others a slice of the heads' q_pe pairs
 * each, rotated in place in q and copied into qabs. The parts touch
 * disjoint memory and q's rope reads only q, so they need no order. */
#include "coordinator/engine/gpu/gpu_kernels.cuh"
#include "kernels/cuda/pdl.cuh"

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
    numoe_pdl::pdl_trigger();
    numoe_pdl::pdl_wait(); /* pdl.cuh: everything here follows the kernel before */
    __shared__ double red[PREP_THREADS / 32];
    const int64_t t = blockIdx.x;
    const int W = kr + dr, dk = dn + dr, half = dr / 2;
    const float *src = kvn + t * W;
    const tok_info tk = ti[t];
    const float fpos = (float)tk.pos;
    if (blockIdx.y > 0) { /* a slice of the heads' q_pe: one pair per thread */
        const int u = (int)(blockIdx.y - 1) * PREP_THREADS + (int)threadIdx.x;
        if (u >= nh * half) return;
        const int h = u / half, i = u % half;
        float *qp = q + (t * nh + h) * dk + dn;
        float y0, y1;
        rot(qp[2 * i], qp[2 * i + 1], __fmul_rn(fpos, inv_freq[i]), &y0, &y1);
        qp[2 * i] = y0;
        qp[2 * i + 1] = y1;
        float *qa = qabs + (t * nh + h) * W + kr;
        qa[2 * i] = y0;
        qa[2 * i + 1] = y1;
        return;
    }
    /* y == 0: the latent's RMSNorm into the cache row (squares summed in
     * double over the whole CTA, as before the split), then k_pe's rope */
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

    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float y0, y1;
        rot(src[kr + 2 * i], src[kr + 2 * i + 1], __fmul_rn(fpos, inv_freq[i]), &y0, &y1);
        row[kr + 2 * i] = y0;
        row[kr + 2 * i + 1] = y1;
    }
}

} /* namespace */

cudaError_t mla_prep(cudaStream_t s, const float *kvn, float *q, float *qabs, const tok_info *ti, int layer,
                     const float *kv_norm, const float *inv_freq, int kr, int dr, int nh, int dn, float eps, int64_t n) {
    if (n < 1) return cudaSuccess;
    /* y = 0: the cache row; y >= 1: PREP_THREADS q_pe pairs each (V3: 128
     * heads x 32 pairs, 16 CTAs) */
    const unsigned qblocks = (unsigned)((nh * (dr / 2) + PREP_THREADS - 1) / PREP_THREADS);
    (void)numoe_pdl::launch(k_mla_prep, dim3((unsigned)n, 1 + qblocks), dim3(PREP_THREADS), 0, s, kvn, q, qabs, ti,
                            layer, kv_norm, inv_freq, kr, dr, nh, dn, eps);
    return cudaGetLastError();
}

} /* namespace numoe_gpu */
