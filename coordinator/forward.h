/* forward.h - the DeepSeek forward pass on the CPU (reference §5): token
 * embedding, per layer MLA attention in its absorbed form over the latent KV
 * cache, a dense FFN or routed MoE + shared experts, final norm and head.
 *
 * Ownership: nm_forward_init allocates the KV cache and all scratch for
 * batches of up to n_batch tokens; nm_forward_free releases them. The model,
 * the pool and the expert backend are borrowed and must outlive it. */
#ifndef NUMOE_COORDINATOR_FORWARD_H
#define NUMOE_COORDINATOR_FORWARD_H

#include <stdint.h>
#include <stdio.h>

#include "common/error.h"
#include "coordinator/expert_backend.h"
#include "coordinator/kv_cache.h"
#include "coordinator/model.h"
#include "coordinator/rope.h"
#include "kernels/matmul.h"
#include "kernels/threadpool.h"

typedef struct {
    const nm_model *m;
    nm_pool *pool;
    nm_expert_backend *experts;
    nm_kv_cache kv;
    nm_rope rope;
    int n_expert_used;
    int64_t n_batch;
    nm_matmul_ctx mm;
    float *buf; /* one allocation carved into the scratch below */
    float *x, *a, *q, *qa, *kv_new, *gath, *qabs, *oc, *ov, *o, *tmp, *hg, *hu, *rlog, *rw, *moe, *att;
    int32_t *rid;
    /* When set, every routing decision is appended as int32 records
     * {position, layer, k expert ids} (tests compare routing with a reference;
     * later the expert-usage profile for placement is built from the same). */
    FILE *route_log;
} nm_forward;

int nm_forward_init(nm_forward *f, const nm_model *m, nm_pool *pool, nm_expert_backend *experts, int64_t n_ctx,
                    int64_t n_batch, int n_expert_used, nm_err *err);
void nm_forward_free(nm_forward *f);

/* Runs n tokens at the next positions of the cache (prefill when n > 1,
 * decode when n == 1; longer inputs go in chunks of n_batch). logits gets
 * n rows of n_vocab when all_logits, else the last token's row only. */
int nm_forward_tokens(nm_forward *f, const int32_t *tokens, int64_t n, float *logits, int all_logits, nm_err *err);

/* Forgets the cache (a new sequence starts at position 0). */
void nm_forward_reset(nm_forward *f);
/* Keeps only the first n cached positions (n <= cached), so a conversation
 * re-evaluates just what changed after its common prefix. */
void nm_forward_rewind(nm_forward *f, int64_t n);

#endif
