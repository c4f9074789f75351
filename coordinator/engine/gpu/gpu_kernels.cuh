/* gpu_kernels.cuh - the element-wise, normalisation, RoPE, attention and
 * routing kernels of the GPU forward pass (coordinator/engine/gpu/gpu_forward.cu),
 * each launched on the caller's stream. Not a public header (CUDA C++ only).
 *
 * They reproduce the CPU path's float operations where it matters for
 * agreement (coordinator/forward.c, rope.c, router.c): products and sums are
 * written as __fmul_rn / __fadd_rn where the CPU rounds each one on its own
 * (so nvcc cannot fuse them into an FMA), RMSNorm sums squares in double as
 * forward.c does, and cosf / sinf / expf / sqrtf are the IEEE-accurate
 * versions (no fast-math intrinsics). Reductions run in a different order
 * from the CPU's, so results agree to float rounding, not bit for bit.
 *
 * Launch errors are reported through the return value (cudaGetLastError
 * after the launch); a fault inside a kernel shows at the next sync. */
#ifndef NUMOE_COORDINATOR_GPU_KERNELS_CUH
#define NUMOE_COORDINATOR_GPU_KERNELS_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#ifndef __cplusplus
#error "CUDA C++ only"
#endif

namespace numoe_gpu {

/* Where one token of a pass goes: its sequence's latent cache (layer 0,
 * position 0; [n_layer][n_ctx][kv_lora + d_rope] floats) and its position. */
struct tok_info {
    float *kv;
    int32_t n_ctx;
    int32_t pos;
};

/* out[r][i] = x[src][i] * inv * w[i], inv = 1 / sqrt(mean(x[src]^2) + eps),
 * src = rows ? rows[r] : r. Rows of dim floats, x_stride / o_stride apart.
 * out may equal x (same stride). */
cudaError_t rmsnorm(cudaStream_t s, float *out, int64_t o_stride, const float *x, int64_t x_stride, const int32_t *rows,
                    const float *w, int64_t n_rows, int64_t dim, float eps);

/* The residual add and the RMSNorm after it, and the norm's 8-bit copy for
 * the integer GEMV that reads it, in one launch (decode is bound by launches,
 * not bytes: docs/GPU.md). Per row r < n_rows:
 *   with a:   x[r] = (x[r] + a[r]) (+ b[r]), as add();
 *   out[r] = RMSNorm(x[r]) * w, as rmsnorm() (bit for bit); also into out2[r]
 *            when not NULL (e.g. mapped host memory);
 *   with xq:  the q8 row of out[r] at xq + r * numoe_q8::row_bytes(dim)
 *            (kernels/cuda/q8_row.cuh: the bytes nm_cuda_quantize_q8 writes).
 * Rows dim floats apart in every array (out may equal x when a is NULL);
 * add_norm_fits says whether a call can take it (dim % 4, and % 32 with
 * xq; dim <= 8192; 16-byte aligned pointers), else cudaErrorInvalidValue. */
bool add_norm_fits(const void *x, const void *a, const void *b, const void *out, const void *out2, int64_t dim,
                   bool q8);
cudaError_t add_norm(cudaStream_t s, float *x, const float *a, const float *b, float *out, float *out2, const float *w,
                     int64_t n_rows, int64_t dim, float eps, uint8_t *xq);

/* One thread on s spins until *flag (mapped host memory) is non-zero, then
 * sets it to 0 (gpu_handoff.cu: a queued decode segment waiting for the
 * host's routed experts). */
cudaError_t wait_flag(cudaStream_t s, uint32_t *flag);

/* g[i] = silu(g[i]) * u[i] for i < n, silu(v) = v / (1 + exp(-v)). */
cudaError_t silu_mul(cudaStream_t s, float *g, const float *u, int64_t n);
/* x[i] += a[i]; with b: x[i] = (x[i] + a[i]) + b[i] (the CPU's order). */
cudaError_t add(cudaStream_t s, float *x, const float *a, const float *b, int64_t n);

/* The MLA inputs of n tokens, per token t (ti[t]):
 *   cache row (layer, pos) = [RMSNorm(kvn[t][0..kr)) * kv_norm | RoPE(kvn[t][kr..kr+dr), pos)],
 *   q[t][h][dn..dn+dr) = RoPE(itself, pos) for every head h,
 *   qabs[t][h][kr..kr+dr) = that rotated q_pe (the rope half of the absorbed query).
 * kvn rows are kr + dr wide, q rows nh * (dn + dr), qabs rows nh * (kr + dr).
 * inv_freq: dr / 2 pair frequencies (nm_rope). */
cudaError_t mla_prep(cudaStream_t s, const float *kvn, float *q, float *qabs, const tok_info *ti, int layer,
                     const float *kv_norm, const float *inv_freq, int kr, int dr, int nh, int dn, float eps, int64_t n);

/* Absorbed MLA attention of n tokens x nh heads over each token's cache
 * (positions 0..ti[t].pos of layer `layer`, causal):
 *   oc[t][h] = sum_p softmax_p(scale * qabs[t][h] . row_p) * row_p[0..kr),
 * qabs rows and cache rows kr + dr wide, oc rows kr. kr <= 1024.
 * n_split > 1 (at most ATTN_SPLIT_MAX, for n <= ATTN_SPLIT_MAX_TOK) cuts
 * each token's positions into that many runs computed in parallel and
 * merged by the last to finish (gpu_attention.cu); part then holds
 * attention_part_floats(n, nh, kr, n_split) floats of scratch, zeroed once
 * before its first use (its counters are back at 0 after every call; a
 * buffer sized for the largest pass serves every smaller one).
 * attention_splits picks the count for a pass of n tokens: enough CTAs for
 * n_sm SMs, no more runs than n_ctx has chunks of 32 positions, 1 for
 * passes longer than ATTN_SPLIT_MAX_TOK. */
constexpr int ATTN_SPLIT_MAX = 16, ATTN_SPLIT_MAX_TOK = 8;
int attention_splits(int64_t n, int nh, int64_t n_ctx, int n_sm);
size_t attention_part_floats(int64_t n, int nh, int kr, int n_split);
cudaError_t attention(cudaStream_t s, const float *qabs, float *oc, const tok_info *ti, int layer, int nh, int kr,
                      int dr, float scale, int64_t n, float *part, int n_split);

/* Per head h < nh and token t < n (decode passes, gpu_heads.cu):
 *   C[h*strideC + t*ldc + r] = A_h[r] . B[h*strideB + t*ldb + 0..k)  for r < m,
 * A_h the float32 m x k row-major matrix at A + h*m*k (k_b or v_b of a
 * head). heads_gemv_fits says whether a call can take it: 1 <= n <=
 * HEADS_MAX_TOK, k % 4 == 0 and k <= 1024, ldb and strideB multiples of 4,
 * A and B 16-byte aligned; else cudaErrorInvalidValue (the caller uses a
 * batched GEMM). */
constexpr int HEADS_MAX_TOK = 8;
bool heads_gemv_fits(const float *A, int64_t k, const float *B, int64_t ldb, int64_t strideB, int64_t n, int64_t nh);
cudaError_t heads_gemv(cudaStream_t s, const float *A, int64_t m, int64_t k, const float *B, int64_t ldb,
                       int64_t strideB, float *C, int64_t ldc, int64_t strideC, int64_t n, int64_t nh);

/* The softmax of a long run's scores (the GEMM form of attention,
 * gpu_forward.cu): S holds rows x Lb floats, row r the scaled scores of
 * token r / nh of a run at consecutive positions from pos0 (head r % nh)
 * against positions 0..Lb; each row becomes its weights over positions
 * 0..pos0 + r / nh (the causal limit), zeros after. */
cudaError_t attn_softmax(cudaStream_t s, float *S, int64_t rows, int64_t Lb, int nh, int pos0);

/* Router of n tokens: logits [n][E] -> ids / weights [n][k], exactly the
 * selection rules of coordinator/router.c (softmax or sigmoid + bias,
 * group-limited top-k with the same tie rule, weight normalisation and
 * scale), and the same into ids2 / w2 when not NULL (device pointers of
 * mapped host memory: the expert backend's input region). bias: E floats
 * or NULL. E <= 1024, G <= 256. */
cudaError_t route(cudaStream_t s, const float *logits, const float *bias, int32_t *ids, float *w, int32_t *ids2,
                  float *w2, int64_t n, int E, int k, int G, int G_used, int sigmoid, int norm_topk, float scale);

/* The m largest of row[0..V) (NaN as -inf, ties to the lower id: the host
 * sampler's order), as an unordered set: ids[0..m) with their raw values
 * vals[0..m) (gpu_sample.cu). 1 <= m <= V. */
cudaError_t top_m(cudaStream_t s, const float *row, int64_t V, int m, int32_t *ids, float *vals);
/* out[i] = row[ids[i]] for i < n. */
cudaError_t pick(cudaStream_t s, const float *row, const int32_t *ids, int n, float *out);

} /* namespace numoe_gpu */

#endif
