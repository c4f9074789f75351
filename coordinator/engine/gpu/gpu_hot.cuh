/* gpu_hot.cuh - hot routed experts kept in VRAM and computed on the GPU
 * while the CPU computes the rest of each token's experts.
 *
 * Why: a decode step is bound by the expert bytes the CPU reads per token
 * (docs/BENCHMARKS.md: 8-layer V2-Lite, 18.3 MB per MoE layer at ~38 GB/s),
 * while VRAM left over after the dense weights, the caches and the scratch
 * sits idle. An expert kept there costs the CPU nothing when it is picked:
 * with a fraction f of the picks resident the CPU reads (1 - f) of the
 * bytes, and the GPU's share (quantised GEMV at ~1 TB/s) hides behind the
 * CPU's, queued on the GPU's stream behind the hand-off like the shared
 * experts. Real routing is skewed (a few experts per layer take most picks),
 * so a usage profile (`numoe generate --dump-routing`) picks the experts.
 *
 * The math per MoE layer (docs/MODEL.md §5, the routed sum) is split by
 * residence, not changed: for token t with picks (e_j, w_j),
 *   routed(t) = sum_{j: e_j on CPU} w_j E_{e_j}(a_t) + sum_{j: e_j in VRAM} w_j E_{e_j}(a_t),
 * the first sum by the expert backend (given id -1 - e for a resident pick:
 * "computed elsewhere", coordinator/experts/backend.h), the second here
 * (E_e(a) = D_e (silu(G_e a) * (U_e a)), activations in fp32 or quantised
 * to 8 bits as the GPU's other GEMVs), added into the shared experts' output. Different rounding
 * order from the CPU engine's one sum: agreement to float rounding.
 *
 * Layout: per MoE layer three compact stacks (gate, up, down) of the
 * resident experts in the file's types, slot s holding expert keep-order
 * s; a device table slot[il][e] (-1: not resident) lets one launch per
 * stack serve every (token, pick) pair (nm_cuda_gemv_pairs), so a decode
 * step captured as a CUDA graph replays it for whatever the router chose.
 *
 * Ownership: hot_create borrows the model (its mapping is read once) and
 * owns the VRAM. One calling thread at a time; everything is queued on the
 * caller's stream. Errors: 0, or -1 with err naming layer and CUDA error. */
#ifndef NUMOE_COORDINATOR_GPU_HOT_CUH
#define NUMOE_COORDINATOR_GPU_HOT_CUH

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include <vector>

#ifndef __cplusplus
#error "CUDA C++ only"
#endif

extern "C" {
#include "common/error.h"
#include "model/model.h"
}

namespace numoe_gpu {

struct hot_experts;

/* Bytes of one routed expert of layer il (its gate, up and down matrices). */
size_t hot_expert_bytes(const nm_model *m, int il);

/* Which experts go to VRAM, into keep[il * n_expert + e]:
 * per_layer >= 0: that many of every MoE layer (the most used by counts,
 * else the lowest ids); per_layer < 0: as many as budget bytes hold, the
 * most used (layer, expert) pairs first by counts (ties and no counts:
 * round robin over the layers, so every layer gets its share).
 * counts: NULL or n_layer * n_expert picks from a profile.
 * Returns the bytes chosen. */
size_t hot_choose(const nm_model *m, int64_t per_layer, const uint32_t *counts, size_t budget,
                  std::vector<uint8_t> &keep);

/* Copies the kept experts to VRAM (on st, waited for) and allocates the
 * scratch for passes of up to max_tok tokens of k picks. q8: stacks whose
 * type has an integer GEMV use it (activations quantised to 8 bits, as the
 * forward pass's opts.q8_gemv). uploaded (may be NULL) is told after each
 * expert's bytes. */
int hot_create(hot_experts **out, const nm_model *m, const std::vector<uint8_t> &keep, int k, int64_t max_tok, bool q8,
               cudaStream_t st, void (*uploaded)(void *ctx, size_t bytes), void *ctx, nm_err *err);
void hot_free(hot_experts *h);

int hot_count(const hot_experts *h, int il); /* experts of layer il in VRAM */
/* When every expert of layer il is resident: its three stacks, which then
 * have the file's layout (slot e = expert e), and true; else false. */
bool hot_full_layer(const hot_experts *h, int il, const uint8_t **gate, const uint8_t **up, const uint8_t **down);
int64_t hot_total(const hot_experts *h);     /* in all layers */
size_t hot_vram(const hot_experts *h);       /* the stacks, tables and scratch */
int64_t hot_max_tok(const hot_experts *h);

/* After the router of layer il: mat[p] = the VRAM slot of rid[p] or -1, and
 * cid[p] = rid[p] where the host computes the pick, -1 - rid[p] where this
 * does (p < n * k; cid in device memory, copied to the backend next). */
int hot_split(hot_experts *h, int il, const int32_t *rid, int64_t n, int32_t *cid, nm_err *err);

/* Queued on st after hot_split of the same layer: out[t] += sum over t's
 * resident picks j (ascending j) of w[t*k+j] * E_{e_j}(a[t]), a and out
 * [n][n_embd] on the device, w the router's weights. n <= max_tok. */
int hot_compute(hot_experts *h, int il, const float *a, int64_t n, const float *w, float *out, nm_err *err);

} /* namespace numoe_gpu */

#endif
