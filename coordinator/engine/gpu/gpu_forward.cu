/* gpu_forward.cu - the forward pass of gpu_forward.h: state, upload, the
 * per-layer steps and the API. The math and its order are the CPU engine's
 * (coordinator/engine/cpu/forward.c, docs/MODEL.md §5; see
 * the formulas there); this file only moves it onto the GPU:
 *
 *   x      = embedding rows (nm_cuda_dequantize of each token's row)
 *   a      = RMSNorm(x)
 *   q      = W_q a  or  W_qb RMSNorm(W_qa a);  kvn = W_kva a
 *   cache  = [RMSNorm(kvn_c) | RoPE(kvn_pe)],  q_pe = RoPE(q_pe)      (mla_prep)
 *   qabs   = [k_b[h] q_nope[h] | q_pe[h]]     (strided-batched GEMM over heads)
 *   oc     = softmax(scale * qabs . cache) cache_c                    (attention)
 *   x     += W_o (v_b[h] oc[h])
 *   a      = RMSNorm(x);  x += FFN(a)  or  x += shared(a) + routed(a)
 *
 * The routed experts: the router runs on the GPU, then a (the normed
 * hidden states), ids and weights are copied into the expert backend's
 * input region (pinned at create) and an event is recorded; the shared
 * experts are queued behind it, so the GPU computes them while the host
 * waits for the event and runs the backend's submit and wait;
 * the result goes back host-to-device on the same stream and is added as
 * (x + shared) + routed, the CPU's order. Everything runs on one stream;
 * the host blocks only at that event, at the end of a pass and for logits. */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <new>
#include <unordered_map>
#include <vector>

#include "common/clock.h"
#include "coordinator/engine/gpu/gpu_experts.cuh"
#include "coordinator/engine/gpu/gpu_forward.h"
#include "coordinator/engine/gpu/gpu_hot.cuh"
#include "coordinator/engine/gpu/gpu_kernels.cuh"
#include "kernels/cuda/cuda_quant.h"
#include "kernels/quant.h"
extern "C" {
#include "coordinator/engine/rope.h"
}

using numoe_gpu::tok_info;

namespace {

enum part { P_EMBED, P_ATTN, P_ABSORB, P_DENSE, P_SHARED, P_ROUTER, P_VECTORS, P_SCRATCH, P_NPARTS };

/* A matrix in VRAM, bytes as in the file (row r at d + r * row_bytes). */
struct dmat {
    const uint8_t *d = nullptr;
    int type = 0;
    int64_t rows = 0, cols = 0;
    size_t row_bytes = 0;
    const char *name = "";
};

struct dlayer {
    const float *attn_norm = nullptr, *q_a_norm = nullptr, *kv_a_norm = nullptr, *ffn_norm = nullptr,
                *probs_b = nullptr;
    dmat q, q_a, q_b, kv_a, out, gate, up, down, gate_inp, gate_sh, up_sh, down_sh;
    const float *kb = nullptr, *vb = nullptr; /* [n_head][kv_lora][d_nope], [n_head][d_v][kv_lora] float32 */
    int is_moe = 0;
};

/* The largest dequantisation tile for the prefill GEMM (floats): 256 MiB. */
constexpr size_t WTILE_MAX = (size_t)1 << 26;
/* Rows of logits computed per head pass (pinned + device buffers). */
constexpr int64_t LOGIT_ROWS_MAX = 64;
/* Tokens the auto threshold times the host's experts on, and its floor. */
constexpr int64_t CAL_TOK = 64;
constexpr int64_t NM_STREAM_MIN_TOKENS = 32;

} /* namespace */

struct nm_gpu_kv {
    nm_gpu_forward *f;
    float *d;
    int64_t n_ctx, n_pos;
    size_t bytes;
};

struct nm_gpu_forward {
    const nm_model *m = nullptr;
    nm_expert_backend *experts = nullptr;
    int device = 0, k = 0, gemv_max = 4, q8_gemv = 0;
    int64_t n_ctx = 0, n_batch = 0, logit_rows = 0;
    nm_gpu_gemm_mode gemm = NM_GPU_GEMM_F32;
    cudaStream_t st = nullptr;
    cublasHandle_t cb = nullptr;
    cudaEvent_t ev_handoff = nullptr;
    std::vector<void *> dev;  /* device allocations owned */
    std::vector<void *> host; /* pinned allocations owned */
    std::unordered_map<const void *, const uint8_t *> uploaded; /* host tensor bytes -> VRAM copy */
    size_t vram[P_NPARTS] = {};
    dmat tok_embd, output;
    const float *out_norm = nullptr, *inv_freq = nullptr;
    std::vector<dlayer> layers;
    /* device scratch, rows of a batch of n_batch tokens */
    float *x = nullptr, *a = nullptr, *q = nullptr, *qa = nullptr, *kvn = nullptr, *qabs = nullptr, *oc = nullptr,
          *o = nullptr, *tmp = nullptr, *hg = nullptr, *hu = nullptr, *rlog = nullptr, *rw = nullptr, *moe = nullptr,
          *sh = nullptr, *logits = nullptr, *wtile = nullptr;
    size_t wtile_elems = 0;
    float *attn_part = nullptr; /* decode attention's split runs (numoe_gpu::attention) */
    int n_sm = 0;
    /* the integer GEMV's quantised activations: gemv_max rows of the widest
     * GEMV input, and which activation they hold (mm_again) */
    uint8_t *xq = nullptr;
    int64_t xq_cols_max = 0;
    struct act_key {
        const float *x;
        int64_t ldx, n, cols;
        bool is(const float *x_, int64_t ldx_, int64_t n_, int64_t cols_) const {
            return x == x_ && ldx == ldx_ && n == n_ && cols == cols_;
        }
    } xq_of = {};
    /* the bf16 GEMMs' activations (opts.gemm bf16): n_batch rows of the
     * widest input, and which activation they hold (mm_again) */
    uint16_t *xh = nullptr;
    int64_t xh_cols_max = 0;
    act_key xh_of = {};
    int64_t attn_block = 0; /* opts.attn_block */
    int64_t gemm_min = 32;  /* opts.gemm_min: passes from which opts.gemm applies */
    int32_t *rid = nullptr, *rows = nullptr;
    tok_info *tinfo = nullptr;
    /* the hand-off goes straight into the expert backend's input region
     * (experts->in), pinned here for the copies; pinned host mirrors for the
     * routed sum, the per-token table and logits */
    void *pinned_in = nullptr; /* experts->in's block while it is registered with CUDA */
    /* fused decode kernels (!opts.unfused): the residual add waits for the
     * next norm of x, which does it (add_norm): x += pend_a (+ pend_b) is
     * pending while pend_a is set. The kernels write the hand-off into the
     * backend's region and read the routed sum out of h_moe through these
     * device pointers of the mapped host memory (no copy nodes). */
    int fuse = 0;
    const float *pend_a = nullptr, *pend_b = nullptr;
    float *d_in_x = nullptr, *d_in_w = nullptr;
    int32_t *d_in_ids = nullptr;
    const float *d_h_moe = nullptr;
    /* the next segment queued while the host computes (opts.ahead, graphs
     * and fused): it waits on this mapped word (numoe_gpu::wait_flag), which
     * the host sets once the routed sum is in h_moe */
    int ahead = 0;
    uint32_t *h_flag = nullptr, *d_flag = nullptr;
    float *h_moe = nullptr, *h_logits = nullptr;
    int32_t *h_rows = nullptr;
    tok_info *h_tinfo = nullptr;
    std::vector<int64_t> rowlist;
    std::vector<float *> rowdst;
    std::vector<const nm_gpu_forward_seq *> rowtop; /* a row whose top entries, not the row, are wanted */
    /* device and pinned room for logit_rows rows of top entries and extra ids */
    int32_t *d_top_ids = nullptr, *d_extra_ids = nullptr, *h_top_ids = nullptr, *h_extra_ids = nullptr;
    float *d_top_vals = nullptr, *d_extra_vals = nullptr, *h_top_vals = nullptr, *h_extra_vals = nullptr;
    nm_gpu_kv own = {};
    /* routed experts on the GPU for passes of >= stream_min tokens */
    numoe_gpu::moe_stream *ms = nullptr;
    int64_t stream_min = -1;
    int stream_pass = 0;       /* the pass in progress computes its routed experts here */
    int capturing = 0;         /* a segment is being captured into a CUDA graph (run_segment) */
    void (*on_upload)(void *, uint64_t, uint64_t) = nullptr; /* opts.on_upload */
    void *upload_ctx = nullptr;
    uint64_t up_done = 0, up_total = 0;
    char stream_why[160] = ""; /* how the auto threshold was found */
    /* split passes (auto with opts.split_auto): the host's experts cost
     * split_a + split_b * n seconds a layer for n tokens, streaming a whole
     * layer split_copy; a pass computes experts 0..pass_e here and hands the
     * others to the backend at the same time (split_experts) */
    int split_on = 0, split_half = 0, pass_e = 0;
    double split_a = 0, split_b = 0, split_copy = 0;
    float *moe_cpu = nullptr; /* the backend's share of a split layer, on the device */
    /* routed experts resident in VRAM, and the ids handed to the host then
     * (-1 - e for a resident pick) */
    numoe_gpu::hot_experts *hot = nullptr;
    int32_t *cid = nullptr;
    size_t hot_bytes = 0, routed_bytes = 0;
    int n_full_layers = 0; /* MoE layers wholly resident (long passes copy nothing for them) */
    /* per layer: every routed expert resident, so passes the hot experts
     * serve need no hand-off there at all (local_layer) */
    std::vector<char> full_local;
    int64_t cid_stride = 0; /* cid holds [n_layer][cid_stride] (max_tok * k) */
    int32_t *h_lids = nullptr; /* pinned [n_layer][n_batch * k]: a pass's ids, logged in layer order at its end */
    int32_t *h_sids = nullptr; /* pinned copies of the router's ids and weights for it */
    float *h_sw = nullptr;
    /* decode passes as CUDA graphs: the MoE layer ending each segment, and
     * per n in 1..GRAPH_MAX_TOKENS one executable graph per segment */
    int use_graphs = 0;
    std::vector<int> seg_moe;
    size_t n_segments = 0;
    std::vector<cudaGraphExec_t> graphs;
    int64_t n_graphs = 0;
    void *blas_ws = nullptr;
    char graph_off[256] = "";
    FILE *route_log = nullptr; /* nm_gpu_forward_route_log */
    nm_gpu_forward_stats stats = {};
    char desc[2048] = "";
};

/* ---- errors ---------------------------------------------------------------- */

#define fail_cuda(err, e, ...) numoe_gpu::cuda_errf(err, e, "GPU", __VA_ARGS__)

static int fail_blas(nm_err *err, cublasStatus_t s, const char *what, const char *name, int il) {
    return nm_errf(err, "GPU: layer %d: %s (%s): cuBLAS %s", il, what, name, cublasGetStatusString(s));
}

#define CUDA_OK(call, ...)                                                       \
    do {                                                                         \
        cudaError_t e_ = (call);                                                 \
        if (e_ != cudaSuccess) return fail_cuda(err, e_, __VA_ARGS__);           \
    } while (0)

/* ---- allocation and upload ---------------------------------------------------
 * Every copy and clear goes on the state's stream (non-blocking, so nothing
 * on the legacy default stream would order against it): a pageable upload
 * may return before its DMA lands, and the stream keeps later kernels behind
 * it. */

/* The bytes create copies to VRAM (every matrix but the routed experts),
 * for the upload's progress. */
static uint64_t upload_total(const nm_model *m) {
    uint64_t t = 0;
    auto add = [&t](const nm_mat &x) {
        if (x.data) t += (uint64_t)x.slab * (uint64_t)(x.n_mat > 0 ? x.n_mat : 1);
    };
    add(m->tok_embd);
    if (m->output.data != m->tok_embd.data) add(m->output);
    for (int il = 0; il < m->hp.n_layer; il++) {
        const nm_layer *S = &m->layers[il];
        for (const nm_mat *x : {&S->q, &S->q_a, &S->q_b, &S->kv_a, &S->out, &S->k_b, &S->v_b, &S->gate, &S->up,
                                &S->down, &S->gate_inp, &S->gate_sh, &S->up_sh, &S->down_sh})
            add(*x);
    }
    return t;
}

static void uploaded_some(nm_gpu_forward *f, size_t bytes) {
    f->up_done += bytes;
    if (f->on_upload) f->on_upload(f->upload_ctx, f->up_done, f->up_total);
}

static int dalloc(nm_gpu_forward *f, void **p, size_t bytes, int part, const char *what, nm_err *err) {
    *p = nullptr;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 16);
    if (e != cudaSuccess) {
        *p = nullptr;
        return fail_cuda(err, e, "allocating %zu MiB of VRAM for %s", bytes >> 20, what);
    }
    f->dev.push_back(*p);
    f->vram[part] += bytes;
    return 0;
}

template <class T>
static int dalloc_n(nm_gpu_forward *f, T **p, size_t n, const char *what, nm_err *err) {
    void *v;
    if (dalloc(f, &v, n * sizeof(T), P_SCRATCH, what, err)) return -1;
    *p = static_cast<T *>(v);
    return 0;
}

template <class T>
static int halloc_n(nm_gpu_forward *f, T **p, size_t n, const char *what, nm_err *err,
                    unsigned flags = cudaHostAllocDefault) {
    void *v = nullptr;
    cudaError_t e = cudaHostAlloc(&v, (n ? n : 1) * sizeof(T), flags);
    if (e != cudaSuccess) return fail_cuda(err, e, "allocating %zu KiB of pinned host memory for %s", n * sizeof(T) >> 10, what);
    f->host.push_back(v);
    *p = static_cast<T *>(v);
    return 0;
}

/* The bytes of src (every matrix of a stack) in VRAM, once per host address
 * (a tied output head shares the embedding's copy). */
static int upload_bytes(nm_gpu_forward *f, const nm_mat *src, int part, const uint8_t **out, nm_err *err) {
    auto it = f->uploaded.find(src->data);
    if (it != f->uploaded.end()) {
        *out = it->second;
        return 0;
    }
    const size_t bytes = src->slab * (size_t)(src->n_mat > 0 ? src->n_mat : 1);
    void *d;
    if (dalloc(f, &d, bytes, part, src->name, err)) return -1;
    CUDA_OK(cudaMemcpyAsync(d, src->data, bytes, cudaMemcpyHostToDevice, f->st), "uploading %s (%zu bytes)", src->name,
            bytes);
    f->uploaded[src->data] = static_cast<const uint8_t *>(d);
    *out = static_cast<const uint8_t *>(d);
    uploaded_some(f, bytes);
    return 0;
}

static int upload_mat(nm_gpu_forward *f, const nm_mat *src, dmat *dst, int part, nm_err *err) {
    *dst = dmat();
    if (!src->data) return 0;
    if (!nm_cuda_supports_gemv(src->type) || !nm_cuda_supports_dequantize(src->type))
        return nm_errf(err, "GPU: tensor %s has type %s, which the CUDA kernels cannot compute with", src->name,
                       nm_type_name(src->type));
    if (upload_bytes(f, src, part, &dst->d, err)) return -1;
    dst->type = src->type;
    dst->rows = src->rows;
    dst->cols = src->cols;
    dst->row_bytes = src->row_bytes;
    dst->name = src->name;
    return 0;
}

static int upload_vec(nm_gpu_forward *f, const float *v, int64_t n, const float **out, const char *what, nm_err *err) {
    *out = nullptr;
    if (!v) return 0;
    void *d;
    if (dalloc(f, &d, (size_t)n * sizeof(float), P_VECTORS, what, err)) return -1;
    CUDA_OK(cudaMemcpyAsync(d, v, (size_t)n * sizeof(float), cudaMemcpyHostToDevice, f->st), "uploading %s", what);
    *out = static_cast<const float *>(d);
    return 0;
}

/* k_b / v_b stacks as float32 in VRAM: the file's (or the derived) bytes
 * uploaded and dequantised on the GPU (bit-exact with the CPU's
 * nm_dequantize_row), the quantised copy dropped again. */
static int upload_absorb(nm_gpu_forward *f, const nm_mat *src, const float **out, nm_err *err) {
    const size_t n = (size_t)src->rows * (size_t)src->cols * (size_t)src->n_mat;
    const size_t bytes = src->slab * (size_t)src->n_mat;
    if (!nm_cuda_supports_dequantize(src->type))
        return nm_errf(err, "GPU: tensor %s has type %s, which the CUDA kernels cannot dequantise", src->name,
                       nm_type_name(src->type));
    void *d32;
    if (dalloc(f, &d32, n * sizeof(float), P_ABSORB, src->name, err)) return -1;
    if (src->type == NM_TYPE_F32) {
        CUDA_OK(cudaMemcpyAsync(d32, src->data, bytes, cudaMemcpyHostToDevice, f->st), "uploading %s", src->name);
    } else {
        void *raw = nullptr;
        CUDA_OK(cudaMalloc(&raw, bytes), "allocating %zu bytes to convert %s", bytes, src->name);
        cudaError_t e = cudaMemcpyAsync(raw, src->data, bytes, cudaMemcpyHostToDevice, f->st);
        int rc = e == cudaSuccess ? nm_cuda_dequantize(src->type, raw, static_cast<float *>(d32), (int64_t)n, f->st)
                                  : NM_CUDA_OK;
        if (e == cudaSuccess && rc == NM_CUDA_OK) e = cudaStreamSynchronize(f->st);
        cudaFree(raw);
        if (e != cudaSuccess) return fail_cuda(err, e, "converting %s to float32", src->name);
        if (rc != NM_CUDA_OK) return nm_errf(err, "GPU: converting %s to float32: %s", src->name, nm_cuda_last_error());
    }
    *out = static_cast<const float *>(d32);
    uploaded_some(f, bytes);
    return 0;
}

/* ---- matrix products --------------------------------------------------------- */

static cublasComputeType_t compute_of(const nm_gpu_forward *f, int64_t n) {
    /* passes shorter than gemm_min stay in full fp32 whatever the mode: their
     * GEMMs are small, so the tensor cores gain little there */
    if (n < f->gemm_min) return CUBLAS_COMPUTE_32F;
    switch (f->gemm) {
    case NM_GPU_GEMM_TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    case NM_GPU_GEMM_BF16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    default: return CUBLAS_COMPUTE_32F;
    }
}

/* The compute type of the routed experts' grouped GEMMs: cuBLAS's grouped
 * GEMM takes fp32 operands with fp32 or TF32 compute but refuses the bf16
 * one (measured on the H200 box: "the requested functionality is not
 * supported"), so in bf16 mode they run on TF32. */
static cublasComputeType_t experts_compute(const nm_gpu_forward *f, int64_t n) {
    const cublasComputeType_t ct = compute_of(f, n);
    return ct == CUBLAS_COMPUTE_32F_FAST_16BF ? CUBLAS_COMPUTE_32F_FAST_TF32 : ct;
}

/* Y[t][0..rows) = A X[t] for t < n, A float32 row-major rows x cols. */
static int gemm_f32(nm_gpu_forward *f, const float *A, int64_t rows, int64_t cols, const float *X, int64_t ldx,
                    int64_t n, float *Y, int64_t ldy, const char *name, int il, nm_err *err) {
    const float one = 1.0f, zero = 0.0f;
    /* column-major view: A is cols x rows (lda = cols), op(A) = A^T */
    cublasStatus_t s = cublasGemmEx(f->cb, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)n, (int)cols, &one, A, CUDA_R_32F,
                                    (int)cols, X, CUDA_R_32F, (int)ldx, &zero, Y, CUDA_R_32F, (int)ldy,
                                    compute_of(f, n), CUBLAS_GEMM_DEFAULT);
    return s == CUBLAS_STATUS_SUCCESS ? 0 : fail_blas(err, s, "GEMM", name, il);
}

/* Whether Y = W X for n tokens goes to the integer GEMV (mm_q8): few tokens,
 * 16-byte-aligned X rows, a type with a kernel, 16-byte-aligned bytes; not
 * in a pass whose experts stream (below). */
static bool takes_q8(const nm_gpu_forward *f, const dmat *W, const float *X, int64_t ldx, int64_t n) {
    const bool x_aligned = (uintptr_t)X % 16 == 0 && (ldx * sizeof(float)) % 16 == 0;
    return n <= f->gemv_max && x_aligned && !f->stream_pass && f->q8_gemv && W->d && nm_cuda_supports_gemv_q8(W->type) &&
           (uintptr_t)W->d % 16 == 0 && W->cols <= f->xq_cols_max && W->cols % 32 == 0;
}

/* The integer GEMV for W (a type with a kernel, 16-byte-aligned bytes,
 * opts.q8_gemv): Y = W X for n <= gemv_max tokens, X quantised into f->xq
 * unless `again` and f->xq already holds this X (the caller's promise that
 * nothing wrote X since: mm_again). 1 when done, 0 when W does not take it,
 * -1 on error. */
static int mm_q8(nm_gpu_forward *f, const dmat *W, const float *X, int64_t ldx, int64_t n, float *Y, int64_t ldy,
                 int again, int il, nm_err *err) {
    /* Passes whose routed experts stream to the GPU (long passes; every pass
     * with --prefill-experts gpu) keep fp32 activations: on the Q8_0 V3
     * fixture, decode passes forced to stream diverged from the CPU engine
     * at the 5th step with the integer GEMVs (a whole layer's expert set
     * different, logits 0.92 apart) while the same GEMVs with the host's
     * experts, and fp32 with the streamed experts, agree; deterministic
     * (CUDA_LAUNCH_BLOCKING=1 and pageable copies alike), cause not found
     * (docs/STATUS.md). Long passes use the GEMM anyway. */
    if (!takes_q8(f, W, X, ldx, n)) return 0;
    if (!(again && f->xq_of.is(X, ldx, n, W->cols))) {
        if (nm_cuda_quantize_q8(X, ldx, n, W->cols, f->xq, f->st) != NM_CUDA_OK)
            return nm_errf(err, "GPU: layer %d: quantising the input of %s: %s", il, W->name, nm_cuda_last_error());
        f->xq_of = {X, ldx, n, W->cols};
    }
    const size_t xrb = nm_cuda_q8_row_bytes(W->cols);
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
        const int64_t c = n - t0 < 8 ? n - t0 : 8;
        if (nm_cuda_gemv_q8(W->type, W->d, W->rows, W->cols, f->xq + (size_t)t0 * xrb, c, Y + t0 * ldy, ldy, f->st) !=
            NM_CUDA_OK)
            return nm_errf(err, "GPU: layer %d: GEMV %s: %s", il, W->name, nm_cuda_last_error());
    }
    return 1;
}

/* The GEMM on the tensor cores with bf16 operands (opts.gemm bf16): X
 * rounded to bf16 once (f->xh, reused by mm_again: X is the key), row tiles
 * of W dequantised straight to bf16 (half the tile bytes of float32, so
 * twice the rows per tile), fp32 accumulation and output. */
static int mm_bf16(nm_gpu_forward *f, const dmat *W, const float *X, int64_t ldx, int64_t n, float *Y, int64_t ldy,
                   int il, nm_err *err) {
    if (!f->xh_of.is(X, ldx, n, W->cols)) {
        if (nm_cuda_rows_to_bf16(X, ldx, n, W->cols, f->xh, f->st) != NM_CUDA_OK)
            return nm_errf(err, "GPU: layer %d: the input of %s to bf16: %s", il, W->name, nm_cuda_last_error());
        f->xh_of = {X, ldx, n, W->cols};
    }
    const int64_t tile = (int64_t)(2 * f->wtile_elems / (size_t)W->cols);
    if (tile < 1) return nm_errf(err, "GPU: layer %d: %s: no dequantisation tile for %lld columns", il, W->name,
                                 (long long)W->cols);
    const float one = 1.0f, zero = 0.0f;
    for (int64_t r0 = 0; r0 < W->rows; r0 += tile) {
        const int64_t r = W->rows - r0 < tile ? W->rows - r0 : tile;
        if (nm_cuda_dequantize_bf16(W->type, W->d + (size_t)r0 * W->row_bytes, f->wtile, r * W->cols, f->st) !=
            NM_CUDA_OK)
            return nm_errf(err, "GPU: layer %d: dequantising %s to bf16: %s", il, W->name, nm_cuda_last_error());
        cublasStatus_t s = cublasGemmEx(f->cb, CUBLAS_OP_T, CUBLAS_OP_N, (int)r, (int)n, (int)W->cols, &one, f->wtile,
                                        CUDA_R_16BF, (int)W->cols, f->xh, CUDA_R_16BF, (int)W->cols, &zero, Y + r0,
                                        CUDA_R_32F, (int)ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        if (s != CUBLAS_STATUS_SUCCESS) return fail_blas(err, s, "bf16 GEMM", W->name, il);
    }
    return 0;
}

/* Y[t][0..W->rows) = W X[t] for t < n (X rows W->cols wide, ldx apart; Y
 * rows ldy apart). */
static int mm_x(nm_gpu_forward *f, const dmat *W, const float *X, int64_t ldx, int64_t n, float *Y, int64_t ldy,
                int again, int il, nm_err *err) {
    /* a fresh X: whatever f->xq holds is not its copy (the same buffer holds
     * another layer's activation by now) */
    if (!again) f->xq_of = {}, f->xh_of = {};
    const int x_aligned = (uintptr_t)X % 16 == 0 && (ldx * sizeof(float)) % 16 == 0;
    if (n <= f->gemv_max && x_aligned) {
        const int q8 = mm_q8(f, W, X, ldx, n, Y, ldy, again, il, err);
        if (q8) return q8 < 0 ? -1 : 0;
        for (int64_t t = 0; t < n; t++) {
            int rc = nm_cuda_gemv(W->type, W->d, W->rows, W->cols, X + t * ldx, Y + t * ldy, f->st);
            if (rc != NM_CUDA_OK) return nm_errf(err, "GPU: layer %d: GEMV %s: %s", il, W->name, nm_cuda_last_error());
        }
        return 0;
    }
    if (W->type == NM_TYPE_F32)
        return gemm_f32(f, reinterpret_cast<const float *>(W->d), W->rows, W->cols, X, ldx, n, Y, ldy, W->name, il,
                        err);
    if (f->gemm == NM_GPU_GEMM_BF16 && n >= f->gemm_min && f->xh && W->cols <= f->xh_cols_max)
        return mm_bf16(f, W, X, ldx, n, Y, ldy, il, err);
    /* dequantise row tiles of W into float32 and multiply each */
    int64_t tile = (int64_t)(f->wtile_elems / (size_t)W->cols);
    if (tile < 1) return nm_errf(err, "GPU: layer %d: %s: no dequantisation tile for %lld columns", il, W->name,
                                 (long long)W->cols);
    for (int64_t r0 = 0; r0 < W->rows; r0 += tile) {
        const int64_t r = W->rows - r0 < tile ? W->rows - r0 : tile;
        int rc = nm_cuda_dequantize(W->type, W->d + (size_t)r0 * W->row_bytes, f->wtile, r * W->cols, f->st);
        if (rc != NM_CUDA_OK) return nm_errf(err, "GPU: layer %d: dequantising %s: %s", il, W->name, nm_cuda_last_error());
        if (gemm_f32(f, f->wtile, r, W->cols, X, ldx, n, Y + r0, ldy, W->name, il, err)) return -1;
    }
    return 0;
}

static int mm(nm_gpu_forward *f, const dmat *W, const float *X, int64_t ldx, int64_t n, float *Y, int64_t ldy, int il,
              nm_err *err) {
    return mm_x(f, W, X, ldx, n, Y, ldy, 0, il, err);
}

/* mm for a second matrix over the X of the call just before (nothing wrote X
 * in between): its quantised copy is reused. */
static int mm_again(nm_gpu_forward *f, const dmat *W, const float *X, int64_t ldx, int64_t n, float *Y, int64_t ldy,
                    int il, nm_err *err) {
    return mm_x(f, W, X, ldx, n, Y, ldy, 1, il, err);
}

#define KERNEL_OK(call, what)                                                                      \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return fail_cuda(err, e_, "layer %d: %s", il, what);               \
    } while (0)

/* Per head h < nh: C_h[t][0..m) = A_h B_h[t] for t < n; A_h float32 m x k
 * row-major at A + h*m*k, B_h[t] at B + h*strideB + t*ldb, C_h[t] at
 * C + h*strideC + t*ldc. Decode passes (n <= HEADS_MAX_TOK) take the
 * per-head GEMV (gpu_heads.cu: cuBLAS's batched GEMM ran these at a
 * fraction of the HBM's rate); longer passes the batched GEMM. */
static int gemm_heads(nm_gpu_forward *f, const float *A, int64_t m, int64_t k, const float *B, int64_t ldb,
                      int64_t strideB, float *C, int64_t ldc, int64_t strideC, int64_t n, int64_t nh, const char *name,
                      int il, nm_err *err) {
    if (numoe_gpu::heads_gemv_fits(A, k, B, ldb, strideB, n, nh)) {
        KERNEL_OK(numoe_gpu::heads_gemv(f->st, A, m, k, B, ldb, strideB, C, ldc, strideC, n, nh), name);
        return 0;
    }
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t s = cublasGemmStridedBatchedEx(
        f->cb, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)n, (int)k, &one, A, CUDA_R_32F, (int)k, (long long)(m * k), B,
        CUDA_R_32F, (int)ldb, (long long)strideB, &zero, C, CUDA_R_32F, (int)ldc, (long long)strideC, (int)nh,
        compute_of(f, n), CUBLAS_GEMM_DEFAULT);
    return s == CUBLAS_STATUS_SUCCESS ? 0 : fail_blas(err, s, "per-head GEMM", name, il);
}

/* ---- the residual stream ----------------------------------------------------------
 * x += a (+ b) after each sublayer (docs/MODEL.md §5). Fused (f->fuse), the
 * add waits for the next norm of x, which does it in its own launch; a
 * decode step is bound by its ~20 launches a layer, not by their bytes. */

/* x += a (+ b) now (a pending one, or one the caller needs done) */
static int flush_residual(nm_gpu_forward *f, int64_t n, int il, nm_err *err) {
    if (!f->pend_a) return 0;
    KERNEL_OK(numoe_gpu::add(f->st, f->x, f->pend_a, f->pend_b, n * f->m->hp.n_embd), "residual");
    f->pend_a = f->pend_b = nullptr;
    return 0;
}

/* x += a (+ b), in the CPU's order ((x + a) + b): pending when fused */
static int residual(nm_gpu_forward *f, const float *a, const float *b, int64_t n, int il, nm_err *err) {
    if (flush_residual(f, n, il, err)) return -1;
    f->pend_a = a, f->pend_b = b;
    return f->fuse ? 0 : flush_residual(f, n, il, err);
}

/* out = RMSNorm(X) * w for n rows of dim floats (X rows dim apart; out may
 * be X), X being x with the pending residual added first. Fused, one
 * launch also writes the q8 copy of out when the GEMV of `next` (NULL:
 * none) will read it (then mm_again over out reuses it), and out into
 * host_out (a device pointer of mapped memory) when not NULL: 1 when it
 * did that, 0 when the caller must copy. */
static int norm_of(nm_gpu_forward *f, float *X, const float *w, float *out, int64_t dim, const dmat *next,
                   float *host_out, int64_t n, int il, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const bool is_x = X == f->x;
    const bool q8 = next && f->xq && takes_q8(f, next, out, dim, n) && next->cols == dim;
    f->xq_of = {}, f->xh_of = {}; /* out gets new contents */
    if (f->fuse && numoe_gpu::add_norm_fits(X, is_x ? f->pend_a : nullptr, is_x ? f->pend_b : nullptr, out, host_out,
                                            dim, q8)) {
        KERNEL_OK(numoe_gpu::add_norm(f->st, X, is_x ? f->pend_a : nullptr, is_x ? f->pend_b : nullptr, out, host_out,
                                      w, n, dim, hp->rms_eps, q8 ? f->xq : nullptr),
                  "residual + norm");
        if (is_x) f->pend_a = f->pend_b = nullptr;
        if (q8) f->xq_of = {out, dim, n, dim};
        return host_out ? 1 : 0;
    }
    if (is_x && flush_residual(f, n, il, err)) return -1;
    KERNEL_OK(numoe_gpu::rmsnorm(f->st, out, dim, X, dim, nullptr, w, n, dim, hp->rms_eps), "norm");
    return 0;
}

/* ---- one layer ------------------------------------------------------------------ */

/* Runs of at least this many tokens of one sequence (prefill chunks) take
 * the GEMM form of attention; shorter ones (decode) the kernel. */
constexpr int64_t ATT_GEMM_MIN = 32;

/* oc = softmax(scale * qabs . cache) cache_c for the pass's n tokens (the
 * absorbed MLA of docs/MODEL.md §5). Absorbed, every head of a token scores
 * the same latent cache rows, so a run of tokens of one sequence at
 * consecutive positions is one GEMM against its cache, like multi-query
 * attention with one kv head of kv_lora + d_rope:
 *   S  = scale * Q C^T      (token-head rows x positions 0..Lb)
 *   P  = causal softmax(S)  (numoe_gpu::attn_softmax: exact max, then normalised)
 *   oc = P C[:, 0..kv_lora)
 * where Q is the run's qabs rows and C the cache. The kernel
 * (numoe_gpu::attention) reads the cache once per token and head from L2;
 * for a 2048-token chunk that is ~1000 rows of 576 floats per query, the
 * GEMMs read each cache tile once per block of queries. S lives in the
 * dequantisation tile (same stream, so no overlap with a GEMM's use of it),
 * as many tokens at a time as fit. Shorter runs (decode: every pass that
 * can be a CUDA graph, n <= 8 < ATT_GEMM_MIN) go to the kernel in one
 * launch per stretch between long runs. */
static int attention_core(nm_gpu_forward *f, int il, int64_t n, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const int64_t nh = hp->n_head, kr = hp->kv_lora, dr = hp->d_rope, W = kr + dr;
    const float scale = hp->kq_scale, one = 1.0f, zero = 0.0f;
    int64_t k0 = 0; /* first token not yet computed */
    auto flush = [&](int64_t end) -> int {
        if (end <= k0) return 0;
        const int ns = f->attn_part ? numoe_gpu::attention_splits(end - k0, (int)nh, f->n_ctx, f->n_sm) : 1;
        KERNEL_OK(numoe_gpu::attention(f->st, f->qabs + k0 * nh * W, f->oc + k0 * nh * kr, f->tinfo + k0, il, (int)nh,
                                       (int)kr, (int)dr, scale, end - k0, f->attn_part, ns),
                  "attention");
        k0 = end;
        return 0;
    };
    for (int64_t t = 0; t < n;) {
        const numoe_gpu::tok_info &ti = f->h_tinfo[t];
        int64_t e = t + 1;
        while (e < n && f->h_tinfo[e].kv == ti.kv && f->h_tinfo[e].pos == f->h_tinfo[e - 1].pos + 1) e++;
        const int64_t len = e - t, Lmax = (int64_t)ti.pos + len;
        int64_t B = (int64_t)(f->wtile_elems / (size_t)(nh * Lmax)); /* tokens per S block */
        if (f->attn_block > 0 && B > f->attn_block) B = f->attn_block;
        if (len < ATT_GEMM_MIN || B < 1 || !f->wtile) {
            t = e;
            continue;
        }
        if (flush(t)) return -1;
        const float *C = ti.kv + (size_t)il * (size_t)ti.n_ctx * (size_t)W;
        for (int64_t b0 = t; b0 < e; b0 += B) {
            const int64_t bn = e - b0 < B ? e - b0 : B, nq = bn * nh;
            const int pos0 = ti.pos + (int)(b0 - t);
            const int64_t Lb = (int64_t)pos0 + bn; /* positions 0..Lb of the block's last token */
            /* column-major: S^T (Lb x nq) = C (Lb x W) Q^T (W x nq); C^T and Q^T are the row-major buffers */
            cublasStatus_t bs = cublasGemmEx(f->cb, CUBLAS_OP_T, CUBLAS_OP_N, (int)Lb, (int)nq, (int)W, &scale, C,
                                             CUDA_R_32F, (int)W, f->qabs + b0 * nh * W, CUDA_R_32F, (int)W, &zero,
                                             f->wtile, CUDA_R_32F, (int)Lb, compute_of(f, len), CUBLAS_GEMM_DEFAULT);
            if (bs != CUBLAS_STATUS_SUCCESS) return fail_blas(err, bs, "attention scores GEMM", "cache", il);
            KERNEL_OK(numoe_gpu::attn_softmax(f->st, f->wtile, nq, Lb, (int)nh, pos0), "attention softmax");
            /* oc^T (kr x nq) = C[:, 0..kr)^T (kr x Lb) P^T (Lb x nq) */
            bs = cublasGemmEx(f->cb, CUBLAS_OP_N, CUBLAS_OP_N, (int)kr, (int)nq, (int)Lb, &one, C, CUDA_R_32F, (int)W,
                              f->wtile, CUDA_R_32F, (int)Lb, &zero, f->oc + b0 * nh * kr, CUDA_R_32F, (int)kr,
                              compute_of(f, len), CUBLAS_GEMM_DEFAULT);
            if (bs != CUBLAS_STATUS_SUCCESS) return fail_blas(err, bs, "attention values GEMM", "cache", il);
        }
        k0 = t = e;
    }
    return flush(n);
}

static int attention(nm_gpu_forward *f, int il, int64_t n, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const dlayer *L = &f->layers[(size_t)il];
    const int64_t H = hp->n_embd, nh = hp->n_head, dn = hp->d_nope, dr = hp->d_rope, dk = dn + dr, kr = hp->kv_lora;
    const int64_t W = kr + dr, dv = hp->d_v;
    /* attn_norm; q (or q_a) and kv_a both read a: one quantised copy */
    const dmat *q_in = L->q.d ? &L->q : &L->q_a;
    if (norm_of(f, f->x, L->attn_norm, f->a, H, q_in, nullptr, n, il, err) < 0 ||
        mm_again(f, q_in, f->a, H, n, L->q.d ? f->q : f->qa, L->q.d ? nh * dk : hp->q_lora, il, err) ||
        mm_again(f, &L->kv_a, f->a, H, n, f->kvn, W, il, err))
        return -1;
    if (!L->q.d && (norm_of(f, f->qa, L->q_a_norm, f->qa, hp->q_lora, &L->q_b, nullptr, n, il, err) < 0 ||
                    mm_again(f, &L->q_b, f->qa, hp->q_lora, n, f->q, nh * dk, il, err)))
        return -1;
    KERNEL_OK(numoe_gpu::mla_prep(f->st, f->kvn, f->q, f->qabs, f->tinfo, il, L->kv_a_norm, f->inv_freq, (int)kr,
                                  (int)dr, (int)nh, (int)dn, hp->rms_eps, n),
              "kv_a_norm / RoPE");
    /* qabs[t][h][0..kr) = k_b[h] q_nope[t][h] */
    if (gemm_heads(f, L->kb, kr, dn, f->q, nh * dk, dk, f->qabs, nh * W, W, n, nh, "k_b", il, err)) return -1;
    if (attention_core(f, il, n, err)) return -1;
    /* o[t][h] = v_b[h] oc[t][h] */
    if (gemm_heads(f, L->vb, dv, kr, f->oc, nh * kr, kr, f->o, nh * dv, dv, n, nh, "v_b", il, err)) return -1;
    if (mm(f, &L->out, f->o, nh * dv, n, f->tmp, H, il, err)) return -1;
    return residual(f, f->tmp, nullptr, n, il, err);
}

/* out = down(silu(gate a) * up a); nothing wrote a since the norm that
 * made it (its q8 copy is reused) */
static int ffn(nm_gpu_forward *f, const dmat *g, const dmat *u, const dmat *d, int64_t n, float *out, int il,
               nm_err *err) {
    const int64_t H = f->m->hp.n_embd, ff = g->rows;
    if (mm_again(f, g, f->a, H, n, f->hg, ff, il, err) || mm_again(f, u, f->a, H, n, f->hu, ff, il, err)) return -1;
    KERNEL_OK(numoe_gpu::silu_mul(f->st, f->hg, f->hu, n * ff), "silu");
    return mm(f, d, f->hg, ff, n, out, H, il, err);
}

/* Appends layer il's routing of the pass (ids on the host as handed to the
 * backend, -1 - e for a pick resident in VRAM, written as e; the positions
 * in the pinned token table) to the routing log, when one is set. */
static int log_routes(nm_gpu_forward *f, int il, int64_t n, const int32_t *ids, nm_err *err) {
    const int k = f->k;
    if (!f->route_log) return 0;
    for (int64_t t = 0; t < n; t++) {
        int32_t rec[2 + 64] = {f->h_tinfo[t].pos, il};
        for (int j = 0; j < k && j < 64; j++) {
            const int32_t e = ids[t * k + j];
            rec[2 + j] = e < 0 ? -1 - e : e;
        }
        if (fwrite(rec, sizeof(int32_t), (size_t)(2 + k), f->route_log) != (size_t)(2 + k))
            return nm_errf(err, "writing the routing log failed");
    }
    return 0;
}

/* Whether layer il of a pass of n tokens computes its resident experts
 * here (the same answer for every replay of a captured segment). */
static bool hot_on(const nm_gpu_forward *f, int il, int64_t n) {
    return f->hot && !f->stream_pass && n <= numoe_gpu::hot_max_tok(f->hot) && numoe_gpu::hot_count(f->hot, il) > 0;
}

/* ... and every pick of it is resident: the layer stays on the GPU, no
 * hand-off (no copies, no backend call, no wait: with workers that was a
 * round trip per layer that computed nothing). */
static bool local_layer(const nm_gpu_forward *f, int il, int64_t n) {
    return hot_on(f, il, n) && f->full_local[(size_t)il];
}

/* The host-side ids of layer il for this pass (-1 - e: computed on the GPU)
 * and the device ones of hot_split. */
static int32_t *pass_ids(nm_gpu_forward *f, int il) {
    return f->h_lids + (size_t)il * (size_t)(f->n_batch * f->k);
}
static int32_t *cid_of(nm_gpu_forward *f, int il) { return f->cid + (size_t)il * (size_t)f->cid_stride; }

/* The routed experts of layer il on the GPU (gpu_experts.cuh): the router's
 * ids and weights come to the host (the grouping by expert is done there),
 * the shared experts are queued meanwhile, then the grouped expert GEMMs run
 * on the streamed weights and the sum is added as (x + shared) + routed.
 * A split pass (pass_e < n_expert, not for a resident layer) hands the
 * picks of experts pass_e.. to the host's backend first (a and the ids
 * marked -1 - e for the GPU's picks, backend.h), computes the GPU's while
 * the host computes its own, and adds both: routed = GPU's + host's. */
static int routed_on_gpu(nm_gpu_forward *f, int il, int64_t n, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const dlayer *L = &f->layers[(size_t)il];
    const int k = f->k;
    const int64_t H = hp->n_embd, NK = n * k;
    const bool split = f->pass_e < (int)hp->n_expert && !f->full_local[(size_t)il];
    const nm_expert_input *in = &f->experts->in;
    CUDA_OK(cudaMemcpyAsync(f->h_sids, f->rid, (size_t)NK * sizeof(int32_t), cudaMemcpyDeviceToHost, f->st),
            "layer %d: expert ids to the host", il);
    CUDA_OK(cudaMemcpyAsync(f->h_sw, f->rw, (size_t)NK * sizeof(float), cudaMemcpyDeviceToHost, f->st),
            "layer %d: expert weights to the host", il);
    if (split)
        CUDA_OK(cudaMemcpyAsync(in->x, f->a, (size_t)(n * H) * sizeof(float), cudaMemcpyDeviceToHost, f->st),
                "layer %d: hidden states to the host", il);
    CUDA_OK(cudaEventRecord(f->ev_handoff, f->st), "layer %d: routing event", il);
    if (hp->n_shared > 0 && ffn(f, &L->gate_sh, &L->up_sh, &L->down_sh, n, f->sh, il, err)) return -1;
    double t0 = nm_now_s();
    CUDA_OK(cudaEventSynchronize(f->ev_handoff), "layer %d: waiting for the routing", il);
    f->stats.t_wait += nm_now_s() - t0;
    if (log_routes(f, il, n, f->h_sids, err)) return -1;
    if (split) {
        const int32_t eg = f->pass_e;
        for (int64_t p = 0; p < NK; p++) {
            const int32_t e = f->h_sids[p];
            in->ids[p] = e >= eg ? e : -1 - e;
            in->w[p] = f->h_sw[p];
            f->h_sids[p] = e < eg ? e : -1 - e;
        }
        if (nm_experts_submit(f->experts, il, n, k, err)) return -1;
    }
    if (numoe_gpu::moe_stream_layer(f->ms, il, f->a, n, f->h_sids, f->h_sw, f->moe, err)) return -1;
    if (split) {
        const double t1 = nm_now_s();
        if (nm_experts_wait(f->experts, f->h_moe, err)) return -1;
        f->stats.t_moe += nm_now_s() - t1;
        f->stats.n_moe_calls++;
        CUDA_OK(cudaMemcpyAsync(f->moe_cpu, f->h_moe, (size_t)(n * H) * sizeof(float), cudaMemcpyHostToDevice, f->st),
                "layer %d: the host's experts to the GPU", il);
        KERNEL_OK(numoe_gpu::add(f->st, f->moe, f->moe_cpu, nullptr, n * H), "routed sum");
    }
    return residual(f, hp->n_shared > 0 ? f->sh : f->moe, hp->n_shared > 0 ? f->moe : nullptr, n, il, err);
}

/* The FFN half of layer il, split where the host takes part, so that a
 * decode pass can replay the GPU parts as CUDA graphs (run_pass):
 *   ffn_pre   the GPU's work up to the hand-off: ffn_norm, then the dense FFN
 *             and its residual, or router + the copies of a, ids and weights
 *             into the backend's region + the hand-off event + the shared
 *             experts queued behind it;
 *   moe_host  the host's: wait for the event, submit, wait for the sum;
 *   moe_post  the sum host-to-device and the residual (x + shared) + routed.
 * Run in turn they are the one FFN step (feed_forward). */
static int ffn_pre(nm_gpu_forward *f, int il, int64_t n, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const dlayer *L = &f->layers[(size_t)il];
    const int64_t H = hp->n_embd, E = hp->n_expert;
    const int k = f->k;
    if (!L->is_moe) {
        if (norm_of(f, f->x, L->ffn_norm, f->a, H, &L->gate, nullptr, n, il, err) < 0 ||
            ffn(f, &L->gate, &L->up, &L->down, n, f->tmp, il, err))
            return -1;
        return residual(f, f->tmp, nullptr, n, il, err);
    }
    /* what the host will compute: nothing when the experts stream here or
     * every pick is resident; else a, ids and weights go to the backend's
     * region, written there by the norm and router kernels when fused */
    const bool hot = hot_on(f, il, n);
    const bool to_host = !f->stream_pass && !(hot && f->full_local[(size_t)il]);
    const bool direct = to_host && f->fuse && f->d_in_x;
    const int a_sent = norm_of(f, f->x, L->ffn_norm, f->a, H, hp->n_shared > 0 ? &L->gate_sh : nullptr,
                               direct ? f->d_in_x : nullptr, n, il, err);
    if (a_sent < 0) return -1;
    /* the router reads a in fp32: the q8 copy stays for the shared experts */
    if (mm_again(f, &L->gate_inp, f->a, H, n, f->rlog, E, il, err)) return -1;
    KERNEL_OK(numoe_gpu::route(f->st, f->rlog, L->probs_b, f->rid, f->rw, direct && !hot ? f->d_in_ids : nullptr,
                               direct ? f->d_in_w : nullptr, n, (int)E, k, (int)hp->n_group, (int)hp->n_group_used,
                               hp->gating == NM_GATE_SIGMOID, hp->norm_topk, hp->routed_scale),
              "router");
    if (f->stream_pass) return 0; /* routed_on_gpu takes it from here */
    if (hot && numoe_gpu::hot_split(f->hot, il, f->rid, n, cid_of(f, il), err)) return -1;
    if (!to_host) {
        /* nothing for the host: x += shared + resident routed */
        if (hp->n_shared > 0) {
            if (ffn(f, &L->gate_sh, &L->up_sh, &L->down_sh, n, f->sh, il, err)) return -1;
        } else {
            CUDA_OK(cudaMemsetAsync(f->sh, 0, (size_t)(n * H) * sizeof(float), f->st), "layer %d: clearing", il);
        }
        if (numoe_gpu::hot_compute(f->hot, il, f->a, n, f->rw, f->sh, err)) return -1;
        return residual(f, f->sh, nullptr, n, il, err);
    }
    /* once, device to host, into the region the backend reads from (the
     * workers' shared input, or the in-process backend's own), unless the
     * kernels above wrote it there */
    const nm_expert_input *in = &f->experts->in;
    if (!a_sent)
        CUDA_OK(cudaMemcpyAsync(in->x, f->a, (size_t)(n * H) * sizeof(float), cudaMemcpyDeviceToHost, f->st),
                "layer %d: hidden states to the host", il);
    if (!direct || hot)
        CUDA_OK(cudaMemcpyAsync(in->ids, hot ? cid_of(f, il) : f->rid, (size_t)n * k * sizeof(int32_t),
                                cudaMemcpyDeviceToHost, f->st),
                "layer %d: expert ids to the host", il);
    if (!direct)
        CUDA_OK(cudaMemcpyAsync(in->w, f->rw, (size_t)n * k * sizeof(float), cudaMemcpyDeviceToHost, f->st),
                "layer %d: expert weights to the host", il);
    /* inside a capture the record must become an event record node
     * (cudaEventRecordExternal): a plain record is folded into the graph's
     * internal dependencies and the host cannot wait for it (measured: the
     * wait then fails with cudaErrorInvalidValue); the flag is invalid
     * outside a capture */
    CUDA_OK(f->capturing ? cudaEventRecordWithFlags(f->ev_handoff, f->st, cudaEventRecordExternal)
                         : cudaEventRecord(f->ev_handoff, f->st),
            "layer %d: hand-off event", il);
    /* queued behind the copies: the GPU computes the shared experts while the
     * host computes the routed ones, then adds the resident routed ones */
    if (hp->n_shared > 0 && ffn(f, &L->gate_sh, &L->up_sh, &L->down_sh, n, f->sh, il, err)) return -1;
    if (hot) {
        if (hp->n_shared == 0)
            CUDA_OK(cudaMemsetAsync(f->sh, 0, (size_t)(n * H) * sizeof(float), f->st), "layer %d: clearing", il);
        if (numoe_gpu::hot_compute(f->hot, il, f->a, n, f->rw, f->sh, err)) return -1;
    }
    return 0;
}

/* The host's part of MoE layer il in two halves, so that the next decode
 * segment can be launched between them (run_layers_graphs, opts.ahead):
 * moe_submit waits for the hand-off event and submits the layer (*t_sub:
 * when the wait ended), moe_collect waits for the routed sum in h_moe. */
static int moe_submit(nm_gpu_forward *f, int il, int64_t n, double *t_sub, nm_err *err) {
    const nm_expert_input *in = &f->experts->in;
    const double t0 = nm_now_s();
    CUDA_OK(cudaEventSynchronize(f->ev_handoff), "layer %d: waiting for the hand-off", il);
    *t_sub = nm_now_s();
    f->stats.t_wait += *t_sub - t0;
    /* the ids are on the host now: kept for the log at the pass's end (in
     * layer order with the layers that stayed on the GPU) */
    if (f->route_log) memcpy(pass_ids(f, il), in->ids, (size_t)(n * f->k) * sizeof(int32_t));
    f->stats.n_picks += n * f->k;
    if (hot_on(f, il, n))
        for (int64_t p = 0; p < n * f->k; p++) f->stats.n_hot_picks += in->ids[p] < 0;
    return nm_experts_submit(f->experts, il, n, f->k, err);
}

static int moe_collect(nm_gpu_forward *f, double t_sub, nm_err *err) {
    const int rc = nm_experts_wait(f->experts, f->h_moe, err);
    f->stats.t_moe += nm_now_s() - t_sub;
    f->stats.n_moe_calls++;
    return rc;
}

static int moe_host(nm_gpu_forward *f, int il, int64_t n, nm_err *err) {
    double t_sub = 0;
    return moe_submit(f, il, n, &t_sub, err) || moe_collect(f, t_sub, err) ? -1 : 0;
}

static int moe_post(nm_gpu_forward *f, int il, int64_t n, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const int64_t H = hp->n_embd;
    /* fused, the next norm reads the sum straight out of the pinned h_moe */
    const float *moe = f->fuse ? f->d_h_moe : f->moe;
    if (!f->fuse)
        CUDA_OK(cudaMemcpyAsync(f->moe, f->h_moe, (size_t)(n * H) * sizeof(float), cudaMemcpyHostToDevice, f->st),
                "layer %d: routed experts' sum to the GPU", il);
    /* sh holds the shared experts and / or the resident routed ones */
    const bool sh = hp->n_shared > 0 || hot_on(f, il, n);
    return residual(f, sh ? f->sh : moe, sh ? moe : nullptr, n, il, err);
}

static int feed_forward(nm_gpu_forward *f, int il, int64_t n, nm_err *err) {
    if (ffn_pre(f, il, n, err)) return -1;
    if (!f->layers[(size_t)il].is_moe || (!f->stream_pass && local_layer(f, il, n))) return 0;
    if (f->stream_pass) return routed_on_gpu(f, il, n, err);
    return moe_host(f, il, n, err) || moe_post(f, il, n, err) ? -1 : 0;
}

static int split_experts(const nm_gpu_forward *f, int64_t n); /* below, with the measurement it uses */

/* ---- decode passes as CUDA graphs (opts.graphs) ---------------------------------
 * A pass of n <= GRAPH_MAX_TOKENS tokens is cut at its hand-offs into
 * segments: segment j is moe_post of the MoE layer before it (none for the
 * first), then the layers up to and including the ffn_pre of the next MoE
 * layer (the last runs to the end). Each segment's kernels and copies are
 * the same every step - pointers into fixed scratch, positions and caches
 * read from the token table on the device - so each is captured once per n
 * and replayed: one launch per segment instead of ~20 per layer. The token
 * table upload and the embedding (its rows depend on the token ids) stay
 * outside. The hand-off event is recorded inside the graph (an event record
 * node: cudaEventRecordExternal in ffn_pre), so the host waits for it as
 * before. */
constexpr int GRAPH_MAX_TOKENS = 8;

static int enqueue_segment(nm_gpu_forward *f, int j, int64_t n, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const int first = j == 0 ? 0 : f->seg_moe[(size_t)j - 1] + 1;
    const int last = j < (int)f->seg_moe.size() ? f->seg_moe[(size_t)j] : (int)hp->n_layer - 1;
    /* no residual is pending between segments (each ends with its last norm
     * or the flush below), so a replay leaves the host's bookkeeping as the
     * capture did; after a failed capture nothing of it is left either */
    f->pend_a = f->pend_b = nullptr;
    if (j > 0 && f->ahead)
        CUDA_OK(numoe_gpu::wait_flag(f->st, f->d_flag), "segment %d: waiting for the host's experts", j);
    if (j > 0 && moe_post(f, f->seg_moe[(size_t)j - 1], n, err)) return -1;
    for (int l = first; l <= last; l++)
        if (attention(f, l, n, err) || ffn_pre(f, l, n, err)) return -1;
    return j + 1 == (int)f->n_segments ? flush_residual(f, n, last, err) : 0;
}

/* Captures segment j for n tokens into its slot: 0, or -1 with the reason
 * in graph_off (graphs then stay off for good). Capturing runs nothing. */
static int capture_segment(nm_gpu_forward *f, int j, int64_t n, nm_err *err) {
    cudaGraphExec_t &ex = f->graphs[(size_t)(n - 1) * f->n_segments + (size_t)j];
    cudaGraph_t g = nullptr;
    cudaError_t e = cudaStreamBeginCapture(f->st, cudaStreamCaptureModeThreadLocal);
    int rc = 0;
    if (e == cudaSuccess) {
        f->capturing = 1;
        rc = enqueue_segment(f, j, n, err);
        f->capturing = 0;
        e = cudaStreamEndCapture(f->st, &g);
    }
    if (rc == 0 && e == cudaSuccess) e = cudaGraphInstantiate(&ex, g, 0);
    if (g) cudaGraphDestroy(g);
    if (rc == 0 && e == cudaSuccess) {
        f->n_graphs++;
        return 0;
    }
    ex = nullptr;
    (void)cudaGetLastError();
    snprintf(f->graph_off, sizeof f->graph_off, "capture of segment %d for %lld tokens failed: %.200s", j,
             (long long)n, rc ? err->msg : cudaGetErrorString(e));
    f->use_graphs = 0;
    return -1;
}

/* Segment j for n tokens: replayed when captured before. The first time a
 * segment is needed it is captured for every pass size 1..GRAPH_MAX_TOKENS
 * (within a batch) at once, so the VRAM the executable graphs take is all
 * taken at the first decode step, not whenever a server's traffic first
 * brings a new batch size (and no later step pays a capture). A capture
 * that fails turns graphs off for good, with the reason kept for the
 * describe line, and the segment runs directly. */
static int run_segment(nm_gpu_forward *f, int j, int64_t n, nm_err *err) {
    const int il = j;
    cudaGraphExec_t &ex = f->graphs[(size_t)(n - 1) * f->n_segments + (size_t)j];
    if (!ex) {
        const int64_t top = f->n_batch < GRAPH_MAX_TOKENS ? f->n_batch : GRAPH_MAX_TOKENS;
        for (int64_t m = 1; m <= top; m++)
            if (!f->graphs[(size_t)(m - 1) * f->n_segments + (size_t)j] && capture_segment(f, j, m, err))
                return enqueue_segment(f, j, n, err);
    }
    CUDA_OK(cudaGraphLaunch(ex, f->st), "segment %d: graph launch", il);
    return 0;
}

static int run_or_enqueue(nm_gpu_forward *f, int j, int64_t n, nm_err *err) {
    return f->use_graphs ? run_segment(f, j, n, err) : enqueue_segment(f, j, n, err);
}

/* The host lets the queued segment go on: the routed sum is in h_moe (or
 * the layer failed, and the GPU must not wait for ever either way). */
static void release_segment(nm_gpu_forward *f) { __atomic_store_n(f->h_flag, 1u, __ATOMIC_RELEASE); }

static int run_layers_graphs(nm_gpu_forward *f, int64_t n, nm_err *err) {
    if (!f->ahead) {
        for (int j = 0; j < (int)f->n_segments; j++) {
            if (run_or_enqueue(f, j, n, err)) return -1;
            if (j < (int)f->seg_moe.size() && moe_host(f, f->seg_moe[(size_t)j], n, err)) return -1;
        }
        return 0;
    }
    /* ahead: segment j+1 is queued between the submit of layer j's experts
     * and the wait for them, and starts when release_segment says so */
    if (run_or_enqueue(f, 0, n, err)) return -1;
    for (int j = 0; j < (int)f->seg_moe.size(); j++) {
        double t_sub = 0;
        if (moe_submit(f, f->seg_moe[(size_t)j], n, &t_sub, err)) return -1;
        if (run_or_enqueue(f, j + 1, n, err)) {
            nm_err ignored;
            (void)moe_collect(f, t_sub, &ignored); /* the backend is idle again before the error returns */
            release_segment(f);
            return -1;
        }
        const int rc = moe_collect(f, t_sub, err);
        release_segment(f); /* also after a failed layer: the queued segment must not wait for ever */
        if (rc) return -1;
    }
    return 0;
}

/* n tokens whose caches and positions are in h_tinfo[0..n), through every
 * layer; x then holds their final hidden states. Caches are not advanced. */
static int run_pass(nm_gpu_forward *f, const int32_t *tok, int64_t n, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const int64_t H = hp->n_embd;
    const int il = -1;
    CUDA_OK(cudaMemcpyAsync(f->tinfo, f->h_tinfo, (size_t)n * sizeof(tok_info), cudaMemcpyHostToDevice, f->st),
            "token table to the GPU");
    for (int64_t t = 0; t < n; t++) {
        int rc = nm_cuda_dequantize(f->tok_embd.type, f->tok_embd.d + (size_t)tok[t] * f->tok_embd.row_bytes,
                                    f->x + t * H, H, f->st);
        if (rc != NM_CUDA_OK) return nm_errf(err, "GPU: embedding of token %d: %s", tok[t], nm_cuda_last_error());
    }
    f->stream_pass = f->ms && f->stream_min > 0 && n >= f->stream_min;
    f->pass_e = f->stream_pass ? split_experts(f, n) : (int)hp->n_expert;
    if (f->stream_pass && numoe_gpu::moe_stream_begin(f->ms, f->pass_e, err)) return -1;
    f->pend_a = f->pend_b = nullptr;
    if (f->use_graphs && !f->stream_pass && n <= GRAPH_MAX_TOKENS) {
        if (run_layers_graphs(f, n, err)) return -1;
    } else {
        for (int l = 0; l < hp->n_layer; l++)
            if (attention(f, l, n, err) || feed_forward(f, l, n, err)) return -1;
        if (flush_residual(f, n, (int)hp->n_layer - 1, err)) return -1;
    }
    /* the pinned token table is rewritten by the next pass */
    CUDA_OK(cudaStreamSynchronize(f->st), "layer %d: end of the pass", il);
    f->stats.n_passes++;
    if (f->stream_pass) return 0; /* routed_on_gpu logged its layers */
    /* the layers that stayed on the GPU: their picks (all resident) in the
     * stats, and the pass's routing into the log in layer order */
    for (int l = 0; l < hp->n_layer; l++) {
        if (!f->layers[(size_t)l].is_moe) continue;
        if (local_layer(f, l, n)) {
            f->stats.n_picks += n * f->k;
            f->stats.n_hot_picks += n * f->k;
            if (f->route_log)
                CUDA_OK(cudaMemcpy(pass_ids(f, l), cid_of(f, l), (size_t)(n * f->k) * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost),
                        "layer %d: expert ids for the routing log", l);
        }
        if (f->route_log && log_routes(f, l, n, pass_ids(f, l), err)) return -1;
    }
    return 0;
}

/* Final norm and output head of rows rowlist[0..n) of x into rowdst[i]
 * (n_vocab floats each), logit_rows rows at a time. */
static int head(nm_gpu_forward *f, int64_t n, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const int64_t H = hp->n_embd, V = hp->n_vocab;
    const int il = (int)hp->n_layer;
    for (int64_t r0 = 0; r0 < n; r0 += f->logit_rows) {
        const int64_t c = n - r0 < f->logit_rows ? n - r0 : f->logit_rows;
        for (int64_t i = 0; i < c; i++) f->h_rows[i] = (int32_t)f->rowlist[(size_t)(r0 + i)];
        CUDA_OK(cudaMemcpyAsync(f->rows, f->h_rows, (size_t)c * sizeof(int32_t), cudaMemcpyHostToDevice, f->st),
                "output rows to the GPU");
        KERNEL_OK(numoe_gpu::rmsnorm(f->st, f->a, H, f->x, H, f->rows, f->out_norm, c, H, hp->rms_eps), "output_norm");
        if (mm(f, &f->output, f->a, H, c, f->logits, V, il, err)) return -1;
        for (int64_t i = 0; i < c; i++) {
            const nm_gpu_forward_seq *q = f->rowtop[(size_t)(r0 + i)];
            const float *drow = f->logits + (size_t)(i * V);
            if (!q) {
                CUDA_OK(cudaMemcpyAsync(f->h_logits + (size_t)(i * V), drow, (size_t)V * sizeof(float),
                                        cudaMemcpyDeviceToHost, f->st),
                        "logits to the host");
                continue;
            }
            /* only the sampler's candidates cross PCIe */
            const size_t o = (size_t)i * NM_GPU_TOP_MAX;
            KERNEL_OK(numoe_gpu::top_m(f->st, drow, V, q->top, f->d_top_ids + o, f->d_top_vals + o), "top logits");
            CUDA_OK(cudaMemcpyAsync(f->h_top_ids + o, f->d_top_ids + o, (size_t)q->top * sizeof(int32_t),
                                    cudaMemcpyDeviceToHost, f->st), "top ids to the host");
            CUDA_OK(cudaMemcpyAsync(f->h_top_vals + o, f->d_top_vals + o, (size_t)q->top * sizeof(float),
                                    cudaMemcpyDeviceToHost, f->st), "top logits to the host");
            if (q->n_extra > 0) {
                memcpy(f->h_extra_ids + o, q->extra_ids, (size_t)q->n_extra * sizeof(int32_t));
                CUDA_OK(cudaMemcpyAsync(f->d_extra_ids + o, f->h_extra_ids + o, (size_t)q->n_extra * sizeof(int32_t),
                                        cudaMemcpyHostToDevice, f->st), "extra ids to the GPU");
                KERNEL_OK(numoe_gpu::pick(f->st, drow, f->d_extra_ids + o, q->n_extra, f->d_extra_vals + o),
                          "extra logits");
                CUDA_OK(cudaMemcpyAsync(f->h_extra_vals + o, f->d_extra_vals + o, (size_t)q->n_extra * sizeof(float),
                                        cudaMemcpyDeviceToHost, f->st), "extra logits to the host");
            }
        }
        CUDA_OK(cudaStreamSynchronize(f->st), "output head");
        for (int64_t i = 0; i < c; i++) {
            const nm_gpu_forward_seq *q = f->rowtop[(size_t)(r0 + i)];
            if (!q) {
                memcpy(f->rowdst[(size_t)(r0 + i)], f->h_logits + (size_t)(i * V), (size_t)V * sizeof(float));
                continue;
            }
            const size_t o = (size_t)i * NM_GPU_TOP_MAX;
            memcpy(q->top_ids, f->h_top_ids + o, (size_t)q->top * sizeof(int32_t));
            memcpy(q->top_logits, f->h_top_vals + o, (size_t)q->top * sizeof(float));
            if (q->n_extra > 0) memcpy(q->extra_logits, f->h_extra_vals + o, (size_t)q->n_extra * sizeof(float));
        }
    }
    return 0;
}

/* The auto threshold (opts.stream_auto): a pass of n tokens streams its
 * experts when n * (host seconds per token and layer) > (seconds to stream
 * a layer). Both sides are measured here, on this machine and its backend:
 * one layer's copy timed through the copy path, and the backend's submit +
 * wait for CAL_TOK tokens of the first MoE layer (zero inputs, each token on
 * k distinct experts spread over all of them), best of two. The host's cost
 * per token shrinks with more tokens (weights read once per pass), so the
 * per-token figure at CAL_TOK slightly overstates it for longer passes: the
 * threshold errs towards the GPU there. At least 32 (ggml-cuda's own
 * offload threshold), at most never (n_batch + 1). With opts.split_auto the
 * backend is also timed on 4 x CAL_TOK tokens, for split_experts' line. */
static int calibrate_stream(nm_gpu_forward *f, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const int il = -1;
    double t_copy = 0;
    if (numoe_gpu::moe_stream_time_copy(f->ms, &t_copy, err)) return -1;
    nm_expert_input *in = &f->experts->in;
    int64_t n = CAL_TOK < in->max_tok ? CAL_TOK : in->max_tok;
    if (n > f->n_batch) n = f->n_batch; /* h_moe holds a batch */
    const int k = f->k;
    int moe = 0;
    while (moe < hp->n_layer && !f->m->layers[moe].is_moe) moe++;
    /* best of two at n tokens, and (splitting) at n2 = 4n for the line a + b n */
    auto host_time = [&](int64_t nt, double *best) -> int {
        memset(in->x, 0, (size_t)(nt * hp->n_embd) * sizeof(float));
        for (int64_t t = 0; t < nt; t++)
            for (int j = 0; j < k; j++) {
                in->ids[t * k + j] = (int32_t)((t * k + j) % hp->n_expert);
                in->w[t * k + j] = 0.0f;
            }
        *best = 1e30;
        for (int r = 0; r < 2; r++) {
            const double t0 = nm_now_s();
            if (nm_experts_submit(f->experts, moe, nt, k, err) || nm_experts_wait(f->experts, f->h_moe, err)) return -1;
            const double t = nm_now_s() - t0;
            *best = t < *best ? t : *best;
        }
        return 0;
    };
    double best = 0, best2 = 0;
    const int64_t n2 = f->split_on && 4 * n <= in->max_tok && 4 * n <= f->n_batch ? 4 * n : n;
    if (host_time(n, &best) || (n2 > n && host_time(n2, &best2))) return -1;
    const double per_tok = best / (double)n;
    if (f->split_on && n2 > n && best2 > best) {
        f->split_b = (best2 - best) / (double)(n2 - n);
        f->split_a = best - f->split_b * (double)n;
        if (f->split_a < 0) f->split_a = 0;
        f->split_copy = t_copy;
    } else {
        f->split_on = 0; /* no line to split by (the host did not take longer for more tokens) */
    }
    int64_t thr = per_tok > 0 ? (int64_t)ceil(t_copy / per_tok) : f->n_batch + 1;
    if (thr < NM_STREAM_MIN_TOKENS) thr = NM_STREAM_MIN_TOKENS;
    if (thr > f->n_batch) thr = f->n_batch + 1;
    f->stream_min = thr;
    snprintf(f->stream_why, sizeof f->stream_why, "measured: a layer streams in %.1f ms, the host's experts take "
             "%.3f ms per token and layer", t_copy * 1e3, per_tok * 1e3);
    (void)il;
    return 0;
}

/* Experts per layer a streamed pass of n tokens computes here, the rest
 * going to the host's backend at the same time: the share g of experts
 * (the first g * E ids) such that streaming them takes as long as the host
 * needs for the others, g * t_copy = (1 - g) * (a + b n) under balanced
 * routing (every expert hit, the host's cost in proportion to its share),
 * so g = (a + b n) / (a + b n + t_copy). All of them when the host's share
 * would be under 1/16 (the split's extra copies of a and the sum cost more)
 * or splitting is off. */
static int split_experts(const nm_gpu_forward *f, int64_t n) {
    const int E = (int)f->m->hp.n_expert;
    if (f->split_half) return E / 2 > 0 ? E / 2 : 1;
    if (!f->split_on) return E;
    const double host = f->split_a + f->split_b * (double)n, g = host / (host + f->split_copy);
    int e = (int)lround(g * E);
    if (e < 1) e = 1;
    return e > E - E / 16 ? E : e;
}

/* ---- caches --------------------------------------------------------------------- */

/* VRAM of a latent cache of n positions: per layer and position kv_lora +
 * d_rope floats (docs/MODEL.md §5, the absorbed MLA cache) */
static size_t kv_bytes(const nm_hparams *hp, int64_t n) {
    return (size_t)hp->n_layer * (size_t)(n > 0 ? n : 0) * (size_t)(hp->kv_lora + hp->d_rope) * sizeof(float);
}

static int kv_alloc(nm_gpu_forward *f, nm_gpu_kv *kv, int64_t n_ctx, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    *kv = nm_gpu_kv{f, nullptr, n_ctx, 0, 0};
    if (n_ctx < 1 || n_ctx > f->n_ctx)
        return nm_errf(err, "GPU: a cache of %lld positions (this state allows 1..%lld)", (long long)n_ctx,
                       (long long)f->n_ctx);
    kv->bytes = kv_bytes(hp, n_ctx);
    void *d = nullptr;
    CUDA_OK(cudaMalloc(&d, kv->bytes), "allocating the KV cache: %lld positions x %lld layers (%zu MiB)",
            (long long)n_ctx, (long long)hp->n_layer, kv->bytes >> 20);
    /* never read before written (attention reads positions <= its own); cleared
     * anyway so that a bug shows as zeros rather than stale data */
    cudaError_t e = cudaMemsetAsync(d, 0, kv->bytes, f->st);
    if (e != cudaSuccess) {
        cudaFree(d);
        return fail_cuda(err, e, "clearing the KV cache");
    }
    kv->d = static_cast<float *>(d);
    f->stats.vram_kv += kv->bytes;
    return 0;
}

static void kv_release(nm_gpu_kv *kv) {
    if (kv->d) {
        cudaFree(kv->d);
        kv->f->stats.vram_kv -= kv->bytes;
    }
    kv->d = nullptr;
    kv->n_pos = 0;
}

/* ---- API ------------------------------------------------------------------------ */

extern "C" void nm_gpu_forward_free(nm_gpu_forward *f) {
    if (!f) return;
    cudaSetDevice(f->device);
    if (f->st) cudaStreamSynchronize(f->st);
    kv_release(&f->own);
    numoe_gpu::moe_stream_free(f->ms);
    numoe_gpu::hot_free(f->hot);
    for (cudaGraphExec_t g : f->graphs)
        if (g) cudaGraphExecDestroy(g);
    for (void *p : f->dev) cudaFree(p);
    for (void *p : f->host) cudaFreeHost(p);
    if (f->pinned_in) cudaHostUnregister(f->pinned_in);
    if (f->ev_handoff) cudaEventDestroy(f->ev_handoff);
    if (f->cb) cublasDestroy(f->cb);
    if (f->st) cudaStreamDestroy(f->st);
    delete f;
}

static void hot_uploaded(void *ctx, size_t bytes) { uploaded_some(static_cast<nm_gpu_forward *>(ctx), bytes); }

/* Routed experts in VRAM (opts.hot_experts): chosen against what is left
 * once every other buffer exists, less the caller's reserve, this state's
 * own cache and a margin for the CUDA context's growth (graphs, cuBLAS). */
static int setup_hot(nm_gpu_forward *f, const nm_model *m, const nm_gpu_forward_opts *o, nm_err *err) {
    const nm_hparams *hp = &m->hp;
    for (int il = 0; il < hp->n_layer; il++)
        f->routed_bytes += numoe_gpu::hot_expert_bytes(m, il) * (size_t)hp->n_expert;
    size_t free_b = 0, total_b = 0;
    CUDA_OK(cudaMemGetInfo(&free_b, &total_b), "asking for free VRAM");
    const size_t caches = kv_bytes(hp, f->n_ctx) + kv_bytes(hp, o->hot_reserve_positions); /* own + the caller's */
    const size_t margin = ((size_t)1 << 30) + total_b / 50;
    const size_t want = caches + margin;
    const size_t budget = free_b > want ? free_b - want : 0;
    std::vector<uint8_t> keep;
    const size_t bytes = numoe_gpu::hot_choose(m, o->hot_experts > 0 ? o->hot_experts : -1, o->hot_counts, budget, keep);
    if (o->hot_experts > 0 && bytes > budget)
        return nm_errf(err, "GPU: --gpu-experts %lld needs %.2f GiB of VRAM, %.2f GiB are left after the weights, "
                       "%.2f GiB of caches and a %.2f GiB margin; lower it or use auto", (long long)o->hot_experts,
                       bytes / 1073741824.0, budget / 1073741824.0, caches / 1073741824.0,
                       margin / 1073741824.0);
    if (bytes == 0) return 0;
    f->hot_bytes = bytes;
    f->up_total += bytes;
    const int64_t max_tok = f->n_batch < NM_GPU_HOT_MAX_TOKENS ? f->n_batch : NM_GPU_HOT_MAX_TOKENS;
    if (numoe_gpu::hot_create(&f->hot, m, keep, f->k, max_tok, f->q8_gemv != 0, f->st, hot_uploaded, f, err)) return -1;
    /* a wholly resident layer: decode passes keep it on the GPU (no
     * hand-off), long passes read it where it is instead of streaming it */
    for (int il = 0; il < hp->n_layer; il++) {
        const uint8_t *g, *u, *d;
        if (!numoe_gpu::hot_full_layer(f->hot, il, &g, &u, &d)) continue;
        f->full_local[(size_t)il] = 1;
        f->n_full_layers++;
        if (f->ms) numoe_gpu::moe_stream_set_resident(f->ms, il, g, u, d);
    }
    f->cid_stride = max_tok * f->k;
    return dalloc_n(f, &f->cid, (size_t)(hp->n_layer * f->cid_stride), "host expert ids", err);
}

static int create(nm_gpu_forward *f, const nm_model *m, const nm_gpu_forward_opts *o, nm_err *err) {
    const nm_hparams *hp = &m->hp;
    CUDA_OK(cudaSetDevice(o->device), "selecting CUDA device %d", o->device);
    CUDA_OK(cudaStreamCreateWithFlags(&f->st, cudaStreamNonBlocking), "creating a stream");
    CUDA_OK(cudaEventCreateWithFlags(&f->ev_handoff, cudaEventDisableTiming), "creating an event");
    cublasStatus_t bs = cublasCreate(&f->cb);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        f->cb = nullptr;
        return nm_errf(err, "GPU: cuBLAS init: %s", cublasGetStatusString(bs));
    }
    if ((bs = cublasSetStream(f->cb, f->st)) != CUBLAS_STATUS_SUCCESS)
        return nm_errf(err, "GPU: cuBLAS stream: %s", cublasGetStatusString(bs));

    /* weights */
    if (upload_mat(f, &m->tok_embd, &f->tok_embd, P_EMBED, err) || upload_mat(f, &m->output, &f->output, P_EMBED, err) ||
        upload_vec(f, m->out_norm, hp->n_embd, &f->out_norm, "output_norm", err))
        return -1;
    nm_rope rope;
    if (nm_rope_init(&rope, (int)hp->d_rope, hp->rope_base, hp->rope_freq_scale, hp->yarn_ext_factor,
                     hp->rope_n_ctx_orig))
        return nm_errf(err, "out of memory");
    int rc = upload_vec(f, rope.inv_freq, hp->d_rope / 2, &f->inv_freq, "RoPE frequencies", err);
    nm_rope_free(&rope);
    if (rc) return -1;
    f->layers.resize((size_t)hp->n_layer);
    size_t wmax = 0;
    auto note = [&wmax, f](const dmat &d) {
        if (d.d && d.type != NM_TYPE_F32 && (size_t)(d.rows * d.cols) > wmax) wmax = (size_t)(d.rows * d.cols);
        if (d.d && nm_cuda_supports_gemv_q8(d.type) && d.cols > f->xq_cols_max) f->xq_cols_max = d.cols;
        if (d.d && d.type != NM_TYPE_F32 && d.cols > f->xh_cols_max) f->xh_cols_max = d.cols;
    };
    note(f->output);
    for (int il = 0; il < hp->n_layer; il++) {
        const nm_layer *S = &m->layers[il];
        dlayer *L = &f->layers[(size_t)il];
        char what[64];
        snprintf(what, sizeof what, "blk.%d norms", il);
        L->is_moe = S->is_moe;
        if (upload_vec(f, S->attn_norm, hp->n_embd, &L->attn_norm, what, err) ||
            upload_vec(f, S->q_a_norm, hp->q_lora, &L->q_a_norm, what, err) ||
            upload_vec(f, S->kv_a_norm, hp->kv_lora, &L->kv_a_norm, what, err) ||
            upload_vec(f, S->ffn_norm, hp->n_embd, &L->ffn_norm, what, err) ||
            upload_vec(f, S->probs_b, hp->n_expert, &L->probs_b, what, err) ||
            upload_mat(f, &S->q, &L->q, P_ATTN, err) || upload_mat(f, &S->q_a, &L->q_a, P_ATTN, err) ||
            upload_mat(f, &S->q_b, &L->q_b, P_ATTN, err) || upload_mat(f, &S->kv_a, &L->kv_a, P_ATTN, err) ||
            upload_mat(f, &S->out, &L->out, P_ATTN, err) || upload_absorb(f, &S->k_b, &L->kb, err) ||
            upload_absorb(f, &S->v_b, &L->vb, err) || upload_mat(f, &S->gate, &L->gate, P_DENSE, err) ||
            upload_mat(f, &S->up, &L->up, P_DENSE, err) || upload_mat(f, &S->down, &L->down, P_DENSE, err) ||
            upload_mat(f, &S->gate_inp, &L->gate_inp, P_ROUTER, err) ||
            upload_mat(f, &S->gate_sh, &L->gate_sh, P_SHARED, err) ||
            upload_mat(f, &S->up_sh, &L->up_sh, P_SHARED, err) || upload_mat(f, &S->down_sh, &L->down_sh, P_SHARED, err))
            return nm_err_prefix(err, "uploading layer %d", il);
        for (const dmat *d : {&L->q, &L->q_a, &L->q_b, &L->kv_a, &L->out, &L->gate, &L->up, &L->down, &L->gate_inp,
                              &L->gate_sh, &L->up_sh, &L->down_sh})
            note(*d);
    }

    /* scratch for batches of T tokens */
    const int64_t T = f->n_batch, H = hp->n_embd, nh = hp->n_head, dk = hp->d_nope + hp->d_rope;
    const int64_t W = hp->kv_lora + hp->d_rope;
    int64_t ffw = hp->n_ff_exp * hp->n_shared;
    if (hp->n_dense > 0 && hp->n_ff > ffw) ffw = hp->n_ff;
    f->logit_rows = T < LOGIT_ROWS_MAX ? T : LOGIT_ROWS_MAX;
    /* one scratch for the dequantised weight tiles and the attention scores
     * of long runs (attention_core: a block of tokens x heads x positions) */
    const size_t scores = (size_t)(T * nh) * (size_t)f->n_ctx;
    if (scores > wmax) wmax = scores;
    f->wtile_elems = wmax < WTILE_MAX ? wmax : WTILE_MAX;
    if (dalloc_n(f, &f->x, (size_t)(T * H), "x", err) || dalloc_n(f, &f->a, (size_t)(T * H), "a", err) ||
        dalloc_n(f, &f->q, (size_t)(T * nh * dk), "q", err) ||
        dalloc_n(f, &f->qa, (size_t)(T * (hp->q_lora > 0 ? hp->q_lora : 1)), "q_a", err) ||
        dalloc_n(f, &f->kvn, (size_t)(T * W), "kv_a", err) || dalloc_n(f, &f->qabs, (size_t)(T * nh * W), "q_abs", err) ||
        dalloc_n(f, &f->oc, (size_t)(T * nh * hp->kv_lora), "o_c", err) ||
        dalloc_n(f, &f->o, (size_t)(T * nh * hp->d_v), "o", err) || dalloc_n(f, &f->tmp, (size_t)(T * H), "tmp", err) ||
        dalloc_n(f, &f->hg, (size_t)(T * (ffw > 0 ? ffw : 1)), "ffn gate", err) ||
        dalloc_n(f, &f->hu, (size_t)(T * (ffw > 0 ? ffw : 1)), "ffn up", err) ||
        dalloc_n(f, &f->rlog, (size_t)(T * hp->n_expert), "router logits", err) ||
        dalloc_n(f, &f->rw, (size_t)(T * f->k), "expert weights", err) ||
        dalloc_n(f, &f->rid, (size_t)(T * f->k), "expert ids", err) ||
        dalloc_n(f, &f->moe, (size_t)(T * H), "routed sum", err) || dalloc_n(f, &f->sh, (size_t)(T * H), "shared", err) ||
        dalloc_n(f, &f->logits, (size_t)(f->logit_rows * hp->n_vocab), "logits", err) ||
        dalloc_n(f, &f->rows, (size_t)f->logit_rows, "output rows", err) ||
        dalloc_n(f, &f->tinfo, (size_t)T, "token table", err) ||
        (f->wtile_elems && dalloc_n(f, &f->wtile, f->wtile_elems, "dequantisation tile", err)))
        return -1;
    /* decode attention with its positions split over CTAs (gpu_attention.cu):
     * room for the runs' partial sums of the largest split pass */
    CUDA_OK(cudaDeviceGetAttribute(&f->n_sm, cudaDevAttrMultiProcessorCount, f->device), "SM count");
    size_t part = 0;
    for (int64_t n = 1; n <= T && n <= numoe_gpu::ATTN_SPLIT_MAX_TOK; n++) {
        const int ns = numoe_gpu::attention_splits(n, (int)nh, f->n_ctx, f->n_sm);
        const size_t p = numoe_gpu::attention_part_floats(n, (int)nh, (int)hp->kv_lora, ns);
        if (p > part) part = p;
    }
    if (part && dalloc_n(f, &f->attn_part, part, "attention runs", err)) return -1;
    if (part)
        CUDA_OK(cudaMemset(f->attn_part, 0, part * sizeof(float)), "clearing the attention runs' counters");
    if (f->gemm == NM_GPU_GEMM_BF16 && f->xh_cols_max > 0 &&
        dalloc_n(f, &f->xh, (size_t)(T * f->xh_cols_max), "bf16 activations", err))
        return -1;
    if (f->q8_gemv && f->xq_cols_max > 0 &&
        dalloc_n(f, &f->xq, nm_cuda_q8_row_bytes(f->xq_cols_max) * (size_t)(f->gemv_max < T ? f->gemv_max : T),
                 "quantised activations", err))
        return -1;
    if (halloc_n(f, &f->h_moe, (size_t)(T * H), "hand-off", err, cudaHostAllocMapped) ||
        halloc_n(f, &f->h_logits, (size_t)(f->logit_rows * hp->n_vocab), "logits", err) ||
        halloc_n(f, &f->h_rows, (size_t)f->logit_rows, "output rows", err) ||
        halloc_n(f, &f->h_tinfo, (size_t)T, "token table", err))
        return -1;
    /* the backend's input region is one block (backend.h); pinned, the
     * hand-off copies run as asynchronous DMA like into our own buffers */
    const nm_expert_input *in = &f->experts->in;
    size_t nx = (size_t)(in->max_tok * in->n_embd), nk = (size_t)(in->max_tok * in->max_k);
    size_t in_bytes = (nx + 2 * nk) * sizeof(float);
    if ((void *)in->ids != (void *)(in->x + nx) || in->w != (float *)in->ids + nk)
        return nm_errf(err, "GPU: the expert backend's input region is not one block (x, ids, w), so it cannot be "
                       "pinned at once");
    CUDA_OK(cudaHostRegister(in->x, in_bytes, cudaHostRegisterPortable | (f->fuse ? cudaHostRegisterMapped : 0)),
            "pinning the expert backend's %zu-KiB input region", in_bytes >> 10);
    f->pinned_in = in->x;
    if (f->fuse) {
        /* the kernels write the hand-off there and read the sum out of h_moe */
        void *dx = nullptr, *dm = nullptr;
        CUDA_OK(cudaHostGetDevicePointer(&dx, in->x, 0), "mapping the expert backend's input region for the kernels "
                "(NUMOE_GPU_FUSE=0 copies instead)");
        CUDA_OK(cudaHostGetDevicePointer(&dm, f->h_moe, 0), "mapping the routed sum's pinned buffer for the kernels "
                "(NUMOE_GPU_FUSE=0 copies instead)");
        f->d_in_x = static_cast<float *>(dx);
        f->d_in_ids = reinterpret_cast<int32_t *>(f->d_in_x + nx);
        f->d_in_w = reinterpret_cast<float *>(f->d_in_ids + nk);
        f->d_h_moe = static_cast<const float *>(dm);
    }
    f->rowlist.resize((size_t)T);
    f->rowdst.resize((size_t)T);
    f->rowtop.assign((size_t)T, nullptr);
    {
        const size_t nt = (size_t)f->logit_rows * NM_GPU_TOP_MAX;
        if (dalloc_n(f, &f->d_top_ids, nt, "top ids", err) || dalloc_n(f, &f->d_top_vals, nt, "top logits", err) ||
            dalloc_n(f, &f->d_extra_ids, nt, "extra ids", err) || dalloc_n(f, &f->d_extra_vals, nt, "extra logits", err) ||
            halloc_n(f, &f->h_top_ids, nt, "top ids", err) || halloc_n(f, &f->h_top_vals, nt, "top logits", err) ||
            halloc_n(f, &f->h_extra_ids, nt, "extra ids", err) || halloc_n(f, &f->h_extra_vals, nt, "extra logits", err))
            return -1;
    }
    if ((f->stream_min > 0 || o->stream_auto) && hp->n_layer > hp->n_dense) {
        f->split_on = o->stream_auto && o->split_auto;
        f->split_half = o->split_half && !o->stream_auto;
        if (halloc_n(f, &f->h_sids, (size_t)(T * f->k), "expert ids", err) ||
            halloc_n(f, &f->h_sw, (size_t)(T * f->k), "expert weights", err) ||
            ((f->split_on || f->split_half) &&
             dalloc_n(f, &f->moe_cpu, (size_t)(T * H), "the host's routed sum", err)) ||
            numoe_gpu::moe_stream_create(&f->ms, m, T, f->k, f->st, f->cb, experts_compute(f, T), err))
            return nm_err_prefix(err, "routed experts on the GPU (--prefill-experts cpu keeps them on the CPU)");
        if (o->stream_auto && calibrate_stream(f, err))
            return nm_err_prefix(err, "measuring where the routed experts of a pass run (--prefill-experts cpu|gpu "
                                 "skips it)");
    }
    f->full_local.assign((size_t)hp->n_layer, 0);
    if (halloc_n(f, &f->h_lids, (size_t)(hp->n_layer * T * f->k), "expert ids of a pass", err)) return -1;
    if (o->hot_experts != 0 && hp->n_layer > hp->n_dense && setup_hot(f, m, o, err))
        return nm_err_prefix(err, "routed experts in VRAM (--gpu-experts 0 keeps them all on the CPU)");
    /* decode passes as CUDA graphs, cut at the layers that hand off (not the
     * wholly resident ones: decode passes fit the hot experts' limit) */
    static_assert(GRAPH_MAX_TOKENS <= NM_GPU_HOT_MAX_TOKENS, "graph passes are served by the hot experts");
    if (o->graphs) {
        for (int il = 0; il < hp->n_layer; il++)
            if (m->layers[il].is_moe && !f->full_local[(size_t)il]) f->seg_moe.push_back(il);
        f->n_segments = f->seg_moe.size() + 1;
        f->graphs.assign((size_t)GRAPH_MAX_TOKENS * f->n_segments, nullptr);
        /* cuBLAS must not allocate while a stream is captured: its own workspace */
        const size_t ws = (size_t)32 << 20;
        if (dalloc(f, &f->blas_ws, ws, P_SCRATCH, "cuBLAS workspace", err)) return -1;
        bs = cublasSetWorkspace(f->cb, f->blas_ws, ws);
        if (bs != CUBLAS_STATUS_SUCCESS) return nm_errf(err, "GPU: cuBLAS workspace: %s", cublasGetStatusString(bs));
        f->use_graphs = 1;
    }
    if (f->fuse && f->use_graphs && o->ahead) {
        if (halloc_n(f, &f->h_flag, 4, "hand-off flag", err, cudaHostAllocMapped)) return -1;
        void *df = nullptr;
        CUDA_OK(cudaHostGetDevicePointer(&df, f->h_flag, 0), "mapping the hand-off flag (without NUMOE_GPU_AHEAD=1 "
                "each segment is launched after the host's experts)");
        f->d_flag = static_cast<uint32_t *>(df);
        *f->h_flag = 0;
        f->ahead = 1;
    }
    CUDA_OK(cudaDeviceSynchronize(), "after the upload");

    cudaDeviceProp prop;
    CUDA_OK(cudaGetDeviceProperties(&prop, o->device), "device properties");
    const double MiB = 1024.0 * 1024.0;
    snprintf(f->desc, sizeof f->desc,
             "GPU %d: %s (%.0f GiB), VRAM: embedding+head %.1f MiB, attention %.1f MiB, k_b/v_b f32 %.1f MiB, "
             "dense FFN %.1f MiB, shared experts %.1f MiB, router %.1f MiB, vectors %.2f MiB, scratch %.1f MiB "
             "(batch %lld, GEMM %s)",
             o->device, prop.name, (double)prop.totalGlobalMem / (MiB * 1024.0), f->vram[P_EMBED] / MiB,
             f->vram[P_ATTN] / MiB, f->vram[P_ABSORB] / MiB, f->vram[P_DENSE] / MiB, f->vram[P_SHARED] / MiB,
             f->vram[P_ROUTER] / MiB, f->vram[P_VECTORS] / MiB, f->vram[P_SCRATCH] / MiB, (long long)T,
             f->gemm == NM_GPU_GEMM_TF32 ? "tf32" : f->gemm == NM_GPU_GEMM_BF16 ? "bf16" : "f32");
    if (f->ms) {
        size_t used = strlen(f->desc);
        if (f->stream_min > f->n_batch)
            snprintf(f->desc + used, sizeof f->desc - used, "; routed experts: CPU (%s: streaming never pays "
                     "within a batch of %lld)", f->stream_why, (long long)f->n_batch);
        else if (f->stream_min > 1 && f->split_on)
            snprintf(f->desc + used, sizeof f->desc - used, "; routed experts: GPU and CPU together for passes of >= "
                     "%lld tokens (%s; the host %.2f + %.4f ms per token and layer: the GPU streams and computes "
                     "%d of %d experts a layer at %lld tokens, %d at %lld, the CPU the rest at the same time; %s), "
                     "else the CPU", (long long)f->stream_min, f->stream_why, f->split_a * 1e3, f->split_b * 1e3,
                     split_experts(f, f->stream_min), (int)hp->n_expert, (long long)f->stream_min,
                     split_experts(f, f->n_batch), (long long)f->n_batch, numoe_gpu::moe_stream_describe(f->ms));
        else if (f->stream_min > 1)
            snprintf(f->desc + used, sizeof f->desc - used, "; routed experts: GPU for passes of >= %lld tokens%s%s%s "
                     "(%s), else the CPU", (long long)f->stream_min, f->stream_why[0] ? " (" : "", f->stream_why,
                     f->stream_why[0] ? ")" : "", numoe_gpu::moe_stream_describe(f->ms));
        else if (f->split_half)
            snprintf(f->desc + used, sizeof f->desc - used, "; routed experts: every pass split, experts 0..%d of "
                     "a layer on the GPU (%s), the rest on the CPU at the same time", split_experts(f, 1) - 1,
                     numoe_gpu::moe_stream_describe(f->ms));
        else
            snprintf(f->desc + used, sizeof f->desc - used, "; routed experts: GPU for every pass (%s)",
                     numoe_gpu::moe_stream_describe(f->ms));
    } else {
        size_t used = strlen(f->desc);
        snprintf(f->desc + used, sizeof f->desc - used, "; routed experts: CPU");
    }
    {
        size_t used = strlen(f->desc);
        const double GiB = MiB * 1024.0;
        if (f->hot)
            snprintf(f->desc + used, sizeof f->desc - used, "; routed experts in VRAM: %lld (%.2f of %.2f GiB, "
                     "%.0f%%%s), computed there for passes of <= %d tokens; %d of %lld MoE layers wholly there "
                     "(longer passes stream nothing for them)", (long long)numoe_gpu::hot_total(f->hot),
                     f->hot_bytes / GiB, f->routed_bytes / GiB, 100.0 * (double)f->hot_bytes / (double)f->routed_bytes,
                     o->hot_counts ? ", the most used of the profile" : "", NM_GPU_HOT_MAX_TOKENS, f->n_full_layers,
                     (long long)(hp->n_layer - hp->n_dense));
        else if (o->hot_experts != 0)
            snprintf(f->desc + used, sizeof f->desc - used, "; routed experts in VRAM: none (no VRAM left)");
    }
    if (f->use_graphs) {
        size_t used = strlen(f->desc);
        snprintf(f->desc + used, sizeof f->desc - used, "; decode passes of <= %d tokens as CUDA graphs (%zu "
                 "segments%s)", GRAPH_MAX_TOKENS, f->n_segments,
                 f->ahead ? ", each queued while the host computes the experts before it" : "");
    }
    {
        size_t used = strlen(f->desc);
        snprintf(f->desc + used, sizeof f->desc - used, "; %s%s",
                 f->fuse ? "residual + norm + q8 fused, hand-off written by the kernels" : "unfused (NUMOE_GPU_FUSE=0)",
                 nm_cuda_pdl() ? "; kernels chained by programmatic dependent launch (NUMOE_GPU_PDL=1)" : "");
    }
    return 0;
}

extern "C" int nm_gpu_forward_create(nm_gpu_forward **out, const nm_model *m, nm_expert_backend *experts,
                                     const nm_gpu_forward_opts *o, nm_err *err) {
    *out = nullptr;
    const nm_hparams *hp = &m->hp;
    if (!o || !experts) return nm_errf(err, "GPU: no options or no expert backend");
    if (experts->in.max_tok < (o->n_batch > 0 ? o->n_batch : 512) || experts->in.n_embd != hp->n_embd ||
        experts->in.max_k < (o->n_expert_used > 0 ? o->n_expert_used : (int)hp->n_expert_used))
        return nm_errf(err, "GPU: the expert backend takes %lld tokens of %d experts per layer, fewer than a batch",
                       (long long)experts->in.max_tok, experts->in.max_k);
    int k = o->n_expert_used > 0 ? o->n_expert_used : (int)hp->n_expert_used;
    if (k > 64) return nm_errf(err, "GPU: %d experts per token, more than the 64 the kernels take", k);
    if (k > hp->n_expert_used)
        return nm_errf(err, "--experts-used %d: the model routes to %lld experts per token; numoe can lower it, not raise it",
                       k, (long long)hp->n_expert_used);
    if (o->n_ctx < 1 || o->n_ctx > INT32_MAX / 2) return nm_errf(err, "GPU: context size %lld out of range", (long long)o->n_ctx);
    if (hp->kv_lora > 1024 || hp->n_expert > 1024 || hp->n_group > 256)
        return nm_errf(err, "GPU: kv_lora %lld / %lld experts / %lld groups exceed the kernels' limits (1024 / 1024 / 256)",
                       (long long)hp->kv_lora, (long long)hp->n_expert, (long long)hp->n_group);
    if ((o->gemm != NM_GPU_GEMM_F32 && o->gemm != NM_GPU_GEMM_TF32 && o->gemm != NM_GPU_GEMM_BF16) || o->gemv_max < 0)
        return nm_errf(err, "GPU: bad GEMM mode %d or gemv_max %d", (int)o->gemm, o->gemv_max);
    char msg[512];
    if (nm_cuda_available(msg, sizeof msg) < 1) return nm_errf(err, "GPU: no usable CUDA device: %s", msg);
    nm_gpu_forward *f = new (std::nothrow) nm_gpu_forward();
    if (!f) return nm_errf(err, "out of memory");
    f->m = m;
    f->experts = experts;
    f->device = o->device;
    f->k = k;
    f->n_ctx = o->n_ctx;
    f->n_batch = o->n_batch > 0 ? o->n_batch : 512;
    f->gemm = o->gemm;
    f->attn_block = o->attn_block;
    f->gemm_min = o->gemm_min > 0 ? o->gemm_min : 32;
    f->gemv_max = o->gemv_max > 0 ? o->gemv_max : 4;
    f->q8_gemv = o->q8_gemv != 0;
    f->fuse = !o->unfused;
    f->stream_min = o->stream_min;
    f->on_upload = o->on_upload;
    f->upload_ctx = o->upload_ctx;
    f->up_total = upload_total(m);
    f->own.f = f;
    if (create(f, m, o, err)) {
        nm_gpu_forward_free(f);
        return -1;
    }
    *out = f;
    return 0;
}

static int check_tokens(const nm_gpu_forward *f, const int32_t *tokens, int64_t n, nm_err *err) {
    for (int64_t t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= f->m->hp.n_vocab)
            return nm_errf(err, "token id %d at input position %lld is outside the vocabulary (0..%lld)", tokens[t],
                           (long long)t, (long long)f->m->hp.n_vocab - 1);
    return 0;
}

extern "C" int nm_gpu_forward_tokens(nm_gpu_forward *f, const int32_t *tokens, int64_t n, float *logits, int all_logits,
                                     nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const double t0 = nm_now_s();
    if (n < 1) return nm_errf(err, "no tokens to evaluate");
    CUDA_OK(cudaSetDevice(f->device), "selecting CUDA device %d", f->device);
    if (!f->own.d && kv_alloc(f, &f->own, f->n_ctx, err)) return -1;
    if (f->own.n_pos + n > f->own.n_ctx)
        return nm_errf(err, "context full: %lld cached + %lld new tokens exceed the context size %lld (raise --ctx-size)",
                       (long long)f->own.n_pos, (long long)n, (long long)f->own.n_ctx);
    if (check_tokens(f, tokens, n, err)) return -1;
    for (int64_t done = 0; done < n; done += f->n_batch) {
        const int64_t c = n - done < f->n_batch ? n - done : f->n_batch;
        const int last_chunk = done + c == n;
        for (int64_t t = 0; t < c; t++)
            f->h_tinfo[t] = tok_info{f->own.d, (int32_t)f->own.n_ctx, (int32_t)(f->own.n_pos + t)};
        if (run_pass(f, tokens + done, c, err)) return -1;
        f->own.n_pos += c;
        if (!logits || (!all_logits && !last_chunk)) continue;
        const int64_t first = all_logits ? 0 : c - 1;
        for (int64_t t = first; t < c; t++) {
            f->rowlist[(size_t)(t - first)] = t;
            f->rowdst[(size_t)(t - first)] = all_logits ? logits + (size_t)(done + t) * (size_t)hp->n_vocab : logits;
            f->rowtop[(size_t)(t - first)] = nullptr;
        }
        if (head(f, c - first, err)) return -1;
    }
    f->stats.t_total += nm_now_s() - t0;
    return 0;
}

extern "C" int nm_gpu_forward_batch(nm_gpu_forward *f, nm_gpu_forward_seq *seqs, int n_seqs, nm_err *err) {
    const double t0 = nm_now_s();
    int64_t n = 0;
    for (int i = 0; i < n_seqs; i++) {
        const nm_gpu_forward_seq *q = &seqs[i];
        if (q->n < 1) return nm_errf(err, "batch segment %d has no tokens", i);
        if (!q->kv || q->kv->f != f || !q->kv->d) return nm_errf(err, "batch segment %d: its cache is not one of this GPU state's", i);
        for (int j = 0; j < i; j++)
            if (seqs[j].kv == q->kv) return nm_errf(err, "batch segments %d and %d share one cache", j, i);
        if (q->kv->n_pos + q->n > q->kv->n_ctx)
            return nm_errf(err, "batch segment %d: %lld cached + %lld new tokens exceed its context %lld", i,
                           (long long)q->kv->n_pos, (long long)q->n, (long long)q->kv->n_ctx);
        if (check_tokens(f, q->tokens, q->n, err)) return nm_err_prefix(err, "batch segment %d", i);
        if (!q->logits && q->top > 0) {
            if (q->top > f->m->hp.n_vocab || q->n_extra < 0 || q->top + q->n_extra > NM_GPU_TOP_MAX ||
                !q->top_ids || !q->top_logits || (q->n_extra && (!q->extra_ids || !q->extra_logits)))
                return nm_errf(err, "batch segment %d: top %d + %d extra logits (at most %d together, top <= %lld)", i,
                               q->top, q->n_extra, NM_GPU_TOP_MAX, (long long)f->m->hp.n_vocab);
            for (int j = 0; j < q->n_extra; j++)
                if (q->extra_ids[j] < 0 || q->extra_ids[j] >= f->m->hp.n_vocab)
                    return nm_errf(err, "batch segment %d: extra logit id %d outside the vocabulary", i, q->extra_ids[j]);
        }
        n += q->n;
    }
    if (n < 1) return nm_errf(err, "no tokens to evaluate");
    if (n > f->n_batch)
        return nm_errf(err, "a batch of %lld tokens exceeds the %lld the state was made for", (long long)n,
                       (long long)f->n_batch);
    CUDA_OK(cudaSetDevice(f->device), "selecting CUDA device %d", f->device);
    std::vector<int32_t> tok((size_t)n);
    int64_t t = 0;
    for (int i = 0; i < n_seqs; i++)
        for (int64_t j = 0; j < seqs[i].n; j++, t++) {
            tok[(size_t)t] = seqs[i].tokens[j];
            f->h_tinfo[t] = tok_info{seqs[i].kv->d, (int32_t)seqs[i].kv->n_ctx, (int32_t)(seqs[i].kv->n_pos + j)};
        }
    if (run_pass(f, tok.data(), n, err)) return -1;
    int64_t r = 0;
    t = 0;
    for (int i = 0; i < n_seqs; i++) {
        t += seqs[i].n;
        seqs[i].kv->n_pos += seqs[i].n;
        if (seqs[i].logits && seqs[i].all_logits) {
            for (int64_t j = 0; j < seqs[i].n; j++, r++) {
                f->rowlist[(size_t)r] = t - seqs[i].n + j;
                f->rowdst[(size_t)r] = seqs[i].logits + (size_t)j * (size_t)f->m->hp.n_vocab;
                f->rowtop[(size_t)r] = nullptr;
            }
        } else if (seqs[i].logits) {
            f->rowlist[(size_t)r] = t - 1;
            f->rowdst[(size_t)r] = seqs[i].logits;
            f->rowtop[(size_t)r] = nullptr;
            r++;
        } else if (seqs[i].top > 0) {
            f->rowlist[(size_t)r] = t - 1;
            f->rowdst[(size_t)r] = nullptr;
            f->rowtop[(size_t)r] = &seqs[i];
            r++;
        }
    }
    if (r && head(f, r, err)) return -1;
    f->stats.t_total += nm_now_s() - t0;
    return 0;
}

extern "C" void nm_gpu_forward_reset(nm_gpu_forward *f) { f->own.n_pos = 0; }

extern "C" void nm_gpu_forward_rewind(nm_gpu_forward *f, int64_t n) {
    if (n >= 0 && n < f->own.n_pos) f->own.n_pos = n;
}

extern "C" int64_t nm_gpu_forward_pos(const nm_gpu_forward *f) { return f->own.n_pos; }

extern "C" int nm_gpu_kv_create(nm_gpu_forward *f, int64_t n_ctx, nm_gpu_kv **out, nm_err *err) {
    *out = nullptr;
    CUDA_OK(cudaSetDevice(f->device), "selecting CUDA device %d", f->device);
    nm_gpu_kv *kv = new (std::nothrow) nm_gpu_kv();
    if (!kv) return nm_errf(err, "out of memory");
    if (kv_alloc(f, kv, n_ctx, err)) {
        delete kv;
        return -1;
    }
    *out = kv;
    return 0;
}

extern "C" void nm_gpu_kv_free(nm_gpu_kv *kv) {
    if (!kv) return;
    cudaSetDevice(kv->f->device);
    /* a pass in flight may still read it */
    cudaStreamSynchronize(kv->f->st);
    kv_release(kv);
    delete kv;
}

extern "C" int64_t nm_gpu_kv_pos(const nm_gpu_kv *kv) { return kv->n_pos; }

extern "C" int64_t nm_gpu_kv_ctx(const nm_gpu_kv *kv) { return kv->n_ctx; }

extern "C" void nm_gpu_forward_route_log(nm_gpu_forward *f, FILE *log) { f->route_log = log; }

extern "C" int nm_gpu_device_count(char *why, size_t n) { return nm_cuda_available(why, n); }

extern "C" int nm_gpu_device_props(int dev, char *name, size_t n, size_t *vram, nm_err *err) {
    cudaDeviceProp p;
    CUDA_OK(cudaGetDeviceProperties(&p, dev), "properties of CUDA device %d", dev);
    snprintf(name, n, "%s", p.name);
    *vram = p.totalGlobalMem;
    return 0;
}

extern "C" int nm_gpu_device_query(int dev, nm_gpu_query *q, nm_err *err) {
    *q = {};
    cudaDeviceProp p;
    CUDA_OK(cudaGetDeviceProperties(&p, dev), "properties of CUDA device %d", dev);
    snprintf(q->name, sizeof q->name, "%s", p.name);
    /* lowercase hex as sysfs names the device's folder */
    snprintf(q->pci, sizeof q->pci, "%04x:%02x:%02x.0", (unsigned)p.pciDomainID, (unsigned)p.pciBusID,
             (unsigned)p.pciDeviceID);
    q->cc_major = p.major, q->cc_minor = p.minor, q->n_sm = p.multiProcessorCount;
    q->vram = p.totalGlobalMem;
    int cur = 0;
    CUDA_OK(cudaGetDevice(&cur), "the current CUDA device");
    CUDA_OK(cudaSetDevice(dev), "selecting CUDA device %d", dev);
    size_t fr = 0, tot = 0;
    const cudaError_t e = cudaMemGetInfo(&fr, &tot);
    (void)cudaSetDevice(cur);
    CUDA_OK(e, "free memory of CUDA device %d", dev);
    q->vram_free = fr;
    return 0;
}

extern "C" int nm_gpu_peer_query(int a, int b, nm_gpu_peer *p, nm_err *err) {
    *p = {};
    CUDA_OK(cudaDeviceGetP2PAttribute(&p->access, cudaDevP2PAttrAccessSupported, a, b), "peer access %d -> %d", a, b);
    CUDA_OK(cudaDeviceGetP2PAttribute(&p->atomics, cudaDevP2PAttrNativeAtomicSupported, a, b), "peer atomics %d -> %d",
            a, b);
    CUDA_OK(cudaDeviceGetP2PAttribute(&p->rank, cudaDevP2PAttrPerformanceRank, a, b), "peer rank %d -> %d", a, b);
    return 0;
}

extern "C" void nm_gpu_kv_rewind(nm_gpu_kv *kv, int64_t n) {
    if (n >= 0 && n < kv->n_pos) kv->n_pos = n;
}

extern "C" void nm_gpu_forward_get_stats(const nm_gpu_forward *f, nm_gpu_forward_stats *s) {
    *s = f->stats;
    s->vram_embed = f->vram[P_EMBED];
    s->vram_attn = f->vram[P_ATTN];
    s->vram_absorb = f->vram[P_ABSORB];
    s->vram_dense = f->vram[P_DENSE];
    s->vram_shared = f->vram[P_SHARED];
    s->vram_router = f->vram[P_ROUTER];
    s->vram_vectors = f->vram[P_VECTORS];
    s->vram_scratch = f->vram[P_SCRATCH];
    s->n_graphs = f->n_graphs;
    s->stream_min = f->ms && f->stream_min <= f->n_batch ? f->stream_min : 0;
    s->graphs_off = f->graph_off;
    s->vram_hot = numoe_gpu::hot_vram(f->hot);
    s->n_hot = numoe_gpu::hot_total(f->hot);
    s->hot_bytes = f->hot_bytes;
    s->routed_bytes = f->routed_bytes;
    if (f->ms) {
        numoe_gpu::moe_stream_stats ss;
        numoe_gpu::moe_stream_get_stats(f->ms, &ss);
        s->vram_stream = ss.vram;
        s->n_stream_layers = ss.n_layers;
        s->stream_bytes = ss.bytes_copied;
        s->t_stream_copy = ss.t_copy;
        s->stream_pinned = ss.pinned;
    }
}

extern "C" void nm_gpu_forward_reset_stats(nm_gpu_forward *f) {
    const size_t kv = f->stats.vram_kv;
    f->stats = nm_gpu_forward_stats{};
    f->stats.vram_kv = kv;
    f->stats.graphs_off = f->graph_off;
    if (f->ms) numoe_gpu::moe_stream_reset_stats(f->ms);
}

extern "C" const char *nm_gpu_forward_describe(const nm_gpu_forward *f) { return f->desc; }
