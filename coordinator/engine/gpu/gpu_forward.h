/* gpu_forward.h - the DeepSeek forward pass on one CUDA GPU, with the routed
 * experts still computed on the host through an nm_expert_backend (the
 * in-process pool or the worker processes). Plain C API; the implementation
 * is CUDA C++ (coordinator/engine/gpu/gpu_forward.cu) and links against cuBLAS.
 *
 * It computes what the CPU engine (coordinator/engine/cpu/forward.c) computes,
 * in the same order:
 * embedding, per layer RMSNorm, absorbed MLA over a latent KV cache (in
 * VRAM), YaRN RoPE, dense FFN or router + shared experts + routed experts,
 * final norm and output head. At load every tensor but the routed experts is
 * copied to VRAM once in the file's type (the legacy attn_kv_b's derived
 * k_b / v_b as the model holds them); k_b and v_b are then kept as float32
 * (dequantised on the GPU), so each layer's per-head products run as one
 * strided-batched GEMM. Per MoE layer the normed hidden states, the expert
 * ids and weights go device-to-host once, straight into the expert backend's
 * input region (coordinator/experts/backend.h; pinned with cudaHostRegister
 * at create), the backend's submit and wait run on the host while the GPU
 * computes the shared experts, and the sum comes back host-to-device and is
 * added. The backend's region must hold a batch (n_batch tokens, k experts).
 * Passes of at least opts.stream_min tokens compute their routed experts on
 * the GPU instead, the weights streamed per pass (gpu_experts.cuh); the
 * backend is not called for them. With opts.graphs decode passes of up to
 * 8 tokens replay their GPU work between hand-offs as captured CUDA graphs
 * (gpu_forward.cu).
 *
 * Matrix products: a batch of at most gemv_max tokens goes through the
 * GEMV kernels (kernels/cuda/cuda_quant.h): with opts.q8_gemv, for the
 * types that have one, the integer GEMV (activations quantised to 8 bits
 * once per activation, all the batch's tokens in one read of W), otherwise
 * one fp32-activation GEMV per token;
 * larger batches (prefill) dequantise the weight into a float32 scratch (in
 * row tiles) and run one cuBLAS GEMM, in fp32 (NM_GPU_GEMM_F32, default) or
 * on the tensor cores with TF32 / BF16 operands (NM_GPU_GEMM_TF32 / _BF16).
 *
 * Numerics against the CPU path: without q8_gemv the GPU keeps activations
 * in fp32 for every weight type, while the CPU quantises them to Q8_0 /
 * Q8_K for quantised weights; with it the GPU's decode GEMVs quantise them
 * too (per 32 elements, float scale). On float models the two agree to fp32
 * rounding, on quantised models as far as the activation rounding allows;
 * tests/cuda/test_cuda_forward.cu measures both.
 *
 * Ownership and threads: nm_gpu_forward_create borrows the model, its
 * mapping and the backend (they must outlive the state) and owns every
 * device and pinned buffer; nm_gpu_forward_free releases them. A state
 * serves one thread at a time. Caches made by nm_gpu_kv_create belong to
 * the caller and must be freed (nm_gpu_kv_free) before the state.
 * Errors: every call that can fail returns 0 or -1 with err naming the
 * layer, tensor and the CUDA / cuBLAS error; nothing exits or prints. After
 * a CUDA fault inside a kernel the device context is lost and every later
 * call fails. */
#ifndef NUMOE_COORDINATOR_GPU_FORWARD_H
#define NUMOE_COORDINATOR_GPU_FORWARD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "common/error.h"
#include "coordinator/experts/backend.h"
#include "model/model.h"

typedef struct nm_gpu_forward nm_gpu_forward;
typedef struct nm_gpu_kv nm_gpu_kv;

typedef enum {
    NM_GPU_GEMM_F32 = 0,  /* fp32 FMA (no tensor cores): agrees with the GEMV path to rounding */
    NM_GPU_GEMM_TF32 = 1, /* tensor cores, operands rounded to TF32 (10-bit mantissa) */
    NM_GPU_GEMM_BF16 = 2  /* tensor cores on BF16 operands (8-bit significand): quantised weights are
                             dequantised straight to bf16 and the activations rounded once per call */
} nm_gpu_gemm_mode;

typedef struct {
    int device;            /* CUDA device ordinal */
    int64_t n_ctx;         /* positions of the state's own cache and the most any cache may have (> 0) */
    int64_t n_batch;       /* most tokens per pass (<= 0: 512); longer inputs go in chunks */
    int n_expert_used;     /* 0: the model's expert_used_count; may be lower, never higher */
    nm_gpu_gemm_mode gemm; /* precision of the GEMMs of passes of >= gemm_min tokens (shorter: fp32) */
    int64_t gemm_min;      /* 0: 32 (the prefill chunks; tests lower it) */
    int gemv_max;          /* batches of up to this many tokens use per-token GEMV (0: 4) */
    int64_t stream_min;    /* passes of >= this many tokens compute the routed experts on the GPU,
                              streaming their weights (gpu_experts.cuh); < 0 or 0: never */
    /* NULL, or told after every weight copied to VRAM at create: bytes so far
     * and in all (the caller shows progress; this library prints nothing) */
    void (*on_upload)(void *ctx, uint64_t done, uint64_t total);
    void *upload_ctx;
    int stream_auto;       /* instead: the threshold where streaming a layer costs less than the host's
                              experts, measured at create (one layer's copy timed, the backend timed on
                              64 tokens of one layer), at least 32 */
    int graphs;            /* decode passes of <= 8 tokens as CUDA graphs (gpu_forward.cu) */
    int q8_gemv;           /* GEMVs of types with an integer kernel quantise the activation to 8 bits
                              (nm_cuda_gemv_q8: ~2x faster at decode, x rounded as on the CPU path);
                              0: fp32 activations everywhere */
    int unfused;           /* 1: every residual add, RMSNorm, activation quantisation and hand-off copy
                              as its own kernel or copy (for measuring); 0: fused (gpu_forward.cu) */
    int split_auto;        /* with stream_auto: 1 = a streamed pass streams only the share of its routed
                              experts that takes as long as the host's backend needs for the rest, and
                              the backend computes those at the same time (the split is measured at
                              create with the threshold); 0 = every routed expert of a streamed pass on
                              the GPU (the engine's default: on the H200 box the bounce copies and the
                              host's experts share the memory bus and the cores, and the split lost,
                              docs/BENCHMARKS.md session 13) */
    int ahead;             /* with graphs and fused kernels: 1 = each decode segment is launched while the
                              host computes the experts of the layer before it, its first node waiting
                              for a flag the host sets (gpu_handoff.cu; not yet run on a GPU, so off by
                              default); 0 = launched after them */
    int split_half;        /* with stream_min: every streamed pass computes experts 0..n_expert/2 of a
                              layer on the GPU and hands the others to the backend at the same time
                              (--prefill-experts split) */
    /* routed experts kept in VRAM and computed there for passes of up to
     * NM_GPU_HOT_MAX_TOKENS tokens (gpu_hot.cuh): 0 none; N > 0 that many of
     * every MoE layer; NM_GPU_HOT_AUTO as many as the VRAM left after
     * everything else holds, less the caches of hot_reserve_positions
     * positions the caller will make (nm_gpu_kv_create) and a margin.
     * hot_counts: NULL, or [n_layer][n_expert] picks of a usage profile: the
     * most used go first. */
    int64_t hot_experts;
    const uint32_t *hot_counts;
    int64_t hot_reserve_positions;
    int64_t attn_block;    /* > 0: at most this many tokens per scores block of the GEMM form of
                              attention (tests exercise the blocking with it); 0: as many as fit */
} nm_gpu_forward_opts;

#define NM_GPU_HOT_AUTO (-1)
#define NM_GPU_HOT_MAX_TOKENS 64

/* Uploads the model and allocates scratch for batches of n_batch tokens.
 * The state's own cache (for nm_gpu_forward_tokens) is allocated on first
 * use. 0 and *out, or -1 with err (no GPU, out of VRAM, a type the CUDA
 * kernels cannot handle, ...). */
int nm_gpu_forward_create(nm_gpu_forward **out, const nm_model *m, nm_expert_backend *experts,
                          const nm_gpu_forward_opts *o, nm_err *err);
void nm_gpu_forward_free(nm_gpu_forward *f);

/* As nm_forward_tokens: n tokens at the next positions of the state's own
 * cache (prefill when n > 1, decode when n == 1). logits: NULL, or n rows of
 * n_vocab floats when all_logits, else the last token's row. */
int nm_gpu_forward_tokens(nm_gpu_forward *f, const int32_t *tokens, int64_t n, float *logits, int all_logits,
                          nm_err *err);
/* Forgets the own cache / keeps only its first n positions. */
void nm_gpu_forward_reset(nm_gpu_forward *f);
void nm_gpu_forward_rewind(nm_gpu_forward *f, int64_t n);
/* Positions filled in the own cache. */
int64_t nm_gpu_forward_pos(const nm_gpu_forward *f);

/* A sequence's latent cache in VRAM (n_ctx <= the state's n_ctx). */
int nm_gpu_kv_create(nm_gpu_forward *f, int64_t n_ctx, nm_gpu_kv **out, nm_err *err);
void nm_gpu_kv_free(nm_gpu_kv *kv);
int64_t nm_gpu_kv_pos(const nm_gpu_kv *kv);
/* Keeps only the first n positions (n <= filled). */
void nm_gpu_kv_rewind(nm_gpu_kv *kv, int64_t n);

/* As nm_forward_seq: n tokens go to the next positions of kv (which
 * advances by n); logits: NULL, or n_vocab floats for the last token (n
 * rows, one per token, with all_logits). */
typedef struct {
    nm_gpu_kv *kv;
    const int32_t *tokens;
    int64_t n;
    float *logits;
    int all_logits;
    /* Instead of the last logits row (logits NULL): top > 0 asks for the top
     * `top` entries of that row, computed on the GPU (NaN as -inf, ties to
     * the lower id: the host sampler's order), as an unordered set into
     * top_ids / top_logits (raw values), plus the raw logits of n_extra
     * given ids into extra_logits. top + n_extra <= NM_GPU_TOP_MAX. */
    int top;
    int32_t *top_ids;
    float *top_logits;
    const int32_t *extra_ids;
    int n_extra;
    float *extra_logits;
} nm_gpu_forward_seq;

#define NM_GPU_TOP_MAX 1024

/* As nm_forward_batch: the segments of n_seqs sequences (distinct caches of
 * this state) as one pass of at most n_batch tokens; each segment's results
 * equal what the sequence gives alone (to the rounding of the GEMV/GEMM
 * choice, which depends on the batch size). 0, or -1 with err (no cache is
 * advanced then). */
int nm_gpu_forward_batch(nm_gpu_forward *f, nm_gpu_forward_seq *seqs, int n_seqs, nm_err *err);

/* Positions a cache was made for. */
int64_t nm_gpu_kv_ctx(const nm_gpu_kv *kv);

/* From now on every routing decision is appended to log (NULL: stop) as
 * int32 records {position, layer, k expert ids}, tokens in batch order -
 * the CPU engine's format (coordinator/engine/engine.h). */
void nm_gpu_forward_route_log(nm_gpu_forward *f, FILE *log);

/* Usable CUDA devices (> 0), or 0 with why in why (no driver, no device, no
 * kernel image for it). */
int nm_gpu_device_count(char *why, size_t n);
/* Name and total memory of device dev: 0, or -1 with err. */
int nm_gpu_device_props(int dev, char *name, size_t n, size_t *vram, nm_err *err);

/* What the CUDA runtime says about device dev (`numoe topology`): its PCI
 * address as sysfs spells it ("0000:65:00.0"), compute capability, SMs,
 * total and free VRAM (creating the device's context to ask). 0, or -1. */
typedef struct {
    char name[256];
    char pci[32];
    int cc_major, cc_minor, n_sm;
    size_t vram, vram_free;
} nm_gpu_query;
int nm_gpu_device_query(int dev, nm_gpu_query *q, nm_err *err);

/* Between devices a and b (a != b): whether a can map b's memory (peer
 * access, over NVLink or PCIe), with native atomics, and CUDA's relative
 * performance rank of the link (0 = the best this machine has). 0, or -1. */
typedef struct {
    int access, atomics, rank;
} nm_gpu_peer;
int nm_gpu_peer_query(int a, int b, nm_gpu_peer *p, nm_err *err);

/* Bytes of VRAM per part and where the host time went. */
typedef struct {
    size_t vram_embed;    /* token embedding + output head */
    size_t vram_attn;     /* attention projections (q / q_a / q_b, kv_a, output) */
    size_t vram_absorb;   /* float32 k_b / v_b */
    size_t vram_dense;    /* dense FFN layers */
    size_t vram_shared;   /* shared experts */
    size_t vram_router;   /* router matrices */
    size_t vram_vectors;  /* norms, router bias, RoPE frequencies */
    size_t vram_scratch;  /* activations and the GEMM dequantisation tile */
    size_t vram_kv;       /* caches allocated now */
    int64_t n_passes;     /* passes through the layers */
    int64_t n_moe_calls;  /* routed-expert hand-offs (submit + wait) */
    double t_moe;         /* seconds inside the backend's submit and wait */
    double t_wait;        /* seconds the host waited for the GPU before handing a layer over */
    double t_total;       /* seconds inside nm_gpu_forward_tokens / _batch */
    /* routed experts computed on the GPU (streamed; opts.stream_min) */
    size_t vram_stream;   /* its staging buffers and work space */
    int64_t n_stream_layers;  /* MoE layers computed there */
    double stream_bytes;  /* expert bytes copied host-to-device */
    double t_stream_copy; /* seconds the copy stream was busy */
    int stream_pinned;    /* the host source is registered (DMA at full speed) */
    int64_t stream_min;   /* the threshold in force (tokens; 0: never) */
    /* decode passes as CUDA graphs (opts.graphs) */
    int64_t n_graphs;     /* segments captured so far */
    const char *graphs_off; /* "" while on (or never asked for), else why a capture failed */
    /* routed experts resident in VRAM (opts.hot_experts) */
    size_t vram_hot;      /* their stacks and scratch */
    int64_t n_hot;        /* experts resident, all layers */
    size_t hot_bytes;     /* their weight bytes; of routed_bytes in all */
    size_t routed_bytes;
    int64_t n_picks;      /* (token, expert) picks handed over since the reset */
    int64_t n_hot_picks;  /* of them computed on the GPU */
} nm_gpu_forward_stats;

void nm_gpu_forward_get_stats(const nm_gpu_forward *f, nm_gpu_forward_stats *s);
void nm_gpu_forward_reset_stats(nm_gpu_forward *f);
/* One line: the device and the VRAM per part (for the load message). */
const char *nm_gpu_forward_describe(const nm_gpu_forward *f);

#ifdef __cplusplus
}
#endif

#endif
