/* expert_backend.h - where routed experts are computed. The model code hands
 * over hidden states plus per-token expert ids and weights and gets back the
 * weighted per-token sums; it does not know whether the experts run in this
 * process (experts_local.c), in NUMA workers, or on other hosts.
 *
 * An implementation embeds nm_expert_backend as its first member. */
#ifndef NUMOE_COORDINATOR_EXPERTS_BACKEND_H
#define NUMOE_COORDINATOR_EXPERTS_BACKEND_H

#include <stdint.h>

#include "common/error.h"
#include "model/model.h"
#include "kernels/threadpool.h"

typedef struct nm_expert_backend nm_expert_backend;
struct nm_expert_backend {
    /* out[t][:] = sum_j w[t*k+j] * expert_{ids[t*k+j]}(x[t]) for layer `layer`;
     * x, out: [n_tok][n_embd]. */
    int (*moe)(nm_expert_backend *b, int layer, int64_t n_tok, const float *x, int k, const int32_t *ids,
               const float *w, float *out, nm_err *err);
    void (*destroy)(nm_expert_backend *b);
};

/* The in-process backend: every expert of every layer, straight from the
 * mapped model, computed on `pool` (owned by the caller). */
nm_expert_backend *nm_experts_local_create(const nm_model *m, nm_pool *pool, nm_err *err);

#endif
