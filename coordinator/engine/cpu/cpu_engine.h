/* cpu_engine.h - the CPU implementation of coordinator/engine/engine.h: the
 * forward pass of forward.c on a thread pool, with each sequence's latent
 * KV cache (kv_cache.h) in host memory and routed experts behind an
 * nm_expert_backend (in this process or in workers). */
#ifndef NUMOE_COORDINATOR_ENGINE_CPU_CPU_ENGINE_H
#define NUMOE_COORDINATOR_ENGINE_CPU_CPU_ENGINE_H

#include <stdint.h>

#include "common/error.h"
#include "coordinator/engine/engine.h"
#include "coordinator/experts/backend.h"
#include "kernels/threadpool.h"
#include "model/model.h"

typedef struct {
    int64_t n_ctx;     /* the longest context a sequence may reserve (>= 1) */
    int64_t n_batch;   /* tokens per step (<= 0: 512) */
    int n_expert_used; /* <= 0: the model's expert_used_count; lower values are allowed */
    int sync_experts;  /* wait for the routed experts before computing the shared ones (measurements) */
} nm_engine_cpu_opts;

/* Borrows m, pool and experts (they outlive the engine). NULL with err. */
nm_engine *nm_engine_cpu_create(const nm_model *m, nm_pool *pool, nm_expert_backend *experts,
                                const nm_engine_cpu_opts *o, nm_err *err);

#endif
