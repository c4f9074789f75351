/* gpu_engine.h - the CUDA implementation of coordinator/engine/engine.h: the
 * forward pass of gpu_forward.h (embedding, MLA attention over a latent KV
 * cache in VRAM, dense FFNs, router, shared experts, final norm and head on
 * one GPU) with the routed experts still on the host, behind the same
 * nm_expert_backend the CPU engine uses (in process with --workers 0, else
 * the workers).
 *
 * Each sequence's latent cache is its own VRAM allocation; a step runs all
 * its segments as one batched pass (nm_gpu_forward_batch), so every weight
 * is read once per step for the whole batch.
 *
 * Sampling: the GPU selects, the host draws. For a sampler with top-k (or
 * greedy) the GPU finds the top (k + W) logits of the row plus the raw
 * logits of the W ids in the penalty window (gpu_forward.h's top), only
 * those cross PCIe, and nm_sampler_sample runs on a row that holds them
 * and -inf elsewhere: the same candidates survive top-k, so the ids are
 * exactly the CPU engine's given the same logits (greedy without penalties
 * takes the GPU's argmax directly). Top-k off (top-p or plain softmax over
 * the whole vocabulary) copies the whole row as before.
 *
 * Stats: expert_wait_s is the host time inside the backend's submit and
 * wait per MoE layer, while the GPU computes the shared experts behind the
 * hand-off.
 *
 * Without CUDA at build time (no nvcc, or the sanitizer tree: the CUDA
 * runtime and AddressSanitizer do not mix) the same functions exist and
 * say so: nm_engine_gpu_create fails naming the fix, nm_gpu_usable returns
 * 0 with the reason. */
#ifndef NUMOE_COORDINATOR_ENGINE_GPU_GPU_ENGINE_H
#define NUMOE_COORDINATOR_ENGINE_GPU_GPU_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "coordinator/engine/engine.h"
#include "coordinator/engine/gpu/gpu_forward.h"
#include "coordinator/experts/backend.h"
#include "model/model.h"

typedef struct {
    int device;        /* CUDA device ordinal */
    int64_t n_ctx;     /* the longest context a sequence may reserve (>= 1) */
    int64_t n_batch;   /* tokens per step (<= 0: 512) */
    int n_expert_used; /* <= 0: the model's expert_used_count; lower values are allowed */
    int prefill_experts; /* where routed experts of a pass run: NM_PREFILL_EXPERTS_* */
    /* routed experts kept in VRAM (gpu_forward.h's hot_experts): 0 none, N of every MoE layer, or
     * NM_GPU_HOT_AUTO (-1) as many as fit; counts: NULL or [n_layer][n_expert] picks of a profile;
     * kv_positions: positions of the caches the caller will create at once (kept free) */
    int64_t gpu_experts;
    const uint32_t *gpu_expert_counts;
    int64_t kv_positions;
} nm_engine_gpu_opts;

/* Routed experts of a pass: AUTO (0) = on the GPU, their weights streamed
 * over PCIe, for passes long enough that streaming a layer costs less than
 * the host's experts for them - both measured at load, never below 32
 * tokens (gpu_forward.h's stream_auto) - else on the host backend; CPU =
 * always the host backend; GPU = always the GPU. */
enum { NM_PREFILL_EXPERTS_AUTO = 0, NM_PREFILL_EXPERTS_CPU = 1, NM_PREFILL_EXPERTS_GPU = 2, NM_PREFILL_EXPERTS_SPLIT = 3 };

/* Borrows m and experts (they outlive the engine; the backend's input
 * region is pinned with CUDA while the engine lives). NULL with err. */
nm_engine *nm_engine_gpu_create(const nm_model *m, nm_expert_backend *experts, const nm_engine_gpu_opts *o,
                                nm_err *err);

/* The number of usable CUDA devices, or 0 with the reason in why (no
 * driver, no device, this numoe built without CUDA). */
int nm_gpu_usable(char *why, size_t n);

/* "NAME, N GiB" of device dev into out: 0, or -1 with err. */
int nm_gpu_describe_device(int dev, char *out, size_t n, nm_err *err);

/* One line: the device and the VRAM per part (after create). */
const char *nm_engine_gpu_describe(const nm_engine *e);

/* A GPU as `numoe topology` lists it: what the CUDA runtime reports
 * (gpu_forward.h's query), and where the GPU sits from the PCI device's
 * sysfs folder (its NUMA node and PCIe link; a platform that does not say
 * leaves -1 / 0). 0, or -1 with err (also in a build without CUDA, naming
 * the fix). */
typedef struct {
    nm_gpu_query dev;
    int numa_node;            /* -1: not reported */
    int pcie_gen, pcie_width; /* the link's current speed as a PCIe generation, and lanes; 0: not reported */
} nm_gpu_info;
int nm_gpu_info_of(int dev, nm_gpu_info *g, nm_err *err);

/* Between GPUs a and b: gpu_forward.h's peer query (0, or -1 with err;
 * in a build without CUDA, naming the fix). */
int nm_gpu_link_of(int a, int b, nm_gpu_peer *l, nm_err *err);

/* The PCIe generation of a sysfs current_link_speed ("32.0 GT/s PCIe" -> 5),
 * 0 when not one (exposed for tests). */
int nm_pcie_gen_of(const char *speed);

#endif
