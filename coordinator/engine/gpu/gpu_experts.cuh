/* gpu_experts.cuh - routed experts of a long chunk on the GPU, their
 * weights streamed from host memory over PCIe for each pass.
 *
 * Why: in prefill every expert of a layer is hit (512 tokens x 6 of 64
 * experts leaves almost none idle), so the CPU reads every expert byte once
 * per chunk and then multiplies it with tens of tokens: it is bound by its
 * GEMM rate, while the GPU multiplies the same bytes hundreds of times
 * faster once they are in VRAM. Copying a layer's experts over PCIe
 * (311 MiB for V2-Lite Q4_K, 50 GB/s pinned: ~6 ms) costs less than the
 * CPU needs for a few dozen tokens of that layer, so long chunks go to the
 * GPU - what llama.cpp-family engines do for batches of >= 32 tokens with
 * `-ot exps=CPU` (ggml-cuda's offload of big batches). Decode and short
 * chunks stay on the CPU workers, where the bytes already are.
 *
 * Pipeline of one pass (moe_stream_begin, then per MoE layer
 * moe_stream_layer): the three stacks (gate, up, down) of a layer are
 * copied on a copy stream into one of two VRAM staging buffers, the next
 * MoE layer's into the other, so the copy of layer l+1 overlaps the
 * compute of layer l; a buffer is refilled only after the compute stream
 * has finished with it (event). A copier thread issues the copies, so the
 * host's share of a copy overlaps the compute thread's work. The host side
 * (NUMOE_STREAM_COPY): bounce (default) - a ring of pinned 32 MiB chunks that
 * a pool of memcpy threads fills from the model's mapping, each DMA'd while
 * the next is filled; pageable - cudaMemcpyAsync straight from the mapping
 * (the driver stages it: 6.5 GB/s on the H200 box against 20-24 GB/s for
 * bounce, measured); register - the mapping registered with CUDA
 * (cudaHostRegisterReadOnly) when it fits in half of the available RAM,
 * then plain DMA (it hung the box's sandboxed driver for a multi-GB mapping,
 * measured twice, so it is never the default).
 *
 * The math per layer (the CPU's, kernels/moe.c): pairs (token t, slot j)
 * grouped by expert in ascending expert id, tokens ascending inside;
 *   Xp[p] = a[t_p];  H_p = silu(G_e Xp[p]) * (U_e Xp[p]);  Y_p = D_e H_p;
 *   out[t] = sum over t's pairs in ascending expert order of w_p * Y_p
 * (each product and sum rounded on its own, as the CPU adds them). The
 * weights are dequantised one expert matrix at a time into a float32 tile
 * and multiplied by cuBLAS (the compute type of the caller's GEMM mode), so
 * on float models this agrees with the CPU to fp32 GEMM rounding and on
 * quantised ones as far as the CPU's Q8 activation rounding allows.
 *
 * Ownership: moe_stream_create borrows the model and the cuBLAS handle and
 * owns its streams, events, VRAM, pinned buffers, copier thread and memcpy
 * threads. One calling thread at a time.
 * Errors: 0, or -1 with err naming the layer and the CUDA / cuBLAS error. */
#ifndef NUMOE_COORDINATOR_GPU_EXPERTS_CUH
#define NUMOE_COORDINATOR_GPU_EXPERTS_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#ifndef __cplusplus
#error "CUDA C++ only"
#endif

extern "C" {
#include "common/error.h"
#include "model/model.h"
}
#include "coordinator/engine/gpu/gpu_error.cuh"

namespace numoe_gpu {

struct moe_stream;

struct moe_stream_stats {
    int64_t n_layers;      /* layers computed here */
    double bytes_copied;   /* expert bytes streamed host-to-device */
    double t_copy;         /* seconds the copy stream was busy (events) */
    int pinned;            /* the host source is registered (DMA) */
    size_t vram;           /* staging buffers, tiles, activations */
};

/* n_batch: most tokens of a pass; k: experts per token. */
int moe_stream_create(moe_stream **out, const nm_model *m, int64_t n_batch, int k, cudaStream_t compute,
                      cublasHandle_t cb, cublasComputeType_t ct, nm_err *err);
void moe_stream_free(moe_stream *s);

/* Queues the copies of the first two MoE layers: call at the start of a
 * pass that computes its routed experts here. e_here (1..n_expert): the
 * pass computes experts 0..e_here of each layer here, so only that prefix
 * of each stack is copied (a split pass: the CPU takes the others at the
 * same time); n_expert for every expert. */
int moe_stream_begin(moe_stream *s, int e_here, nm_err *err);

/* Routed experts of layer il for n tokens: a [n][n_embd] on the device,
 * ids / w [n * k] on the host (the router's, copied back), out [n][n_embd]
 * on the device, written on the compute stream: per token the sum over its
 * picks here. An id < 0 (-1 - e, backend.h's mark) is a pick computed
 * elsewhere and skipped; the others must be below the pass's e_here (any
 * expert of a resident layer). Then queues the copy of the MoE layer after
 * the next into the buffer this layer used. */
int moe_stream_layer(moe_stream *s, int il, const float *a, int64_t n, const int32_t *ids, const float *w,
                     float *out, nm_err *err);

/* Seconds one MoE layer's copy takes through the stream's copy path (the
 * largest layer, into staging buffer 0, waited for): the cost of streaming
 * a layer, measured for the choice of CPU or GPU per pass. Leaves nothing
 * staged. */
int moe_stream_time_copy(moe_stream *s, double *seconds, nm_err *err);

void moe_stream_get_stats(moe_stream *s, moe_stream_stats *st);
/* Zeroes the counters (not vram, pinned). */
void moe_stream_reset_stats(moe_stream *s);

/* Layer il's experts are all in VRAM already (gpu_hot.cuh), each stack in
 * the file's layout (expert e at its base + e * slab): its passes read
 * them there and copy nothing. Call between passes, after
 * moe_stream_time_copy's measurement. 0, or -1 for a layer that is not a
 * MoE layer. */
int moe_stream_set_resident(moe_stream *s, int il, const uint8_t *gate, const uint8_t *up, const uint8_t *down);

/* Bytes of the routed experts of one MoE layer (the largest). */
size_t moe_stream_layer_bytes(const moe_stream *s);

/* One line for the load message: the staging VRAM and the copy mode. */
const char *moe_stream_describe(const moe_stream *s);

} /* namespace numoe_gpu */

#endif
