/* forward.h - the DeepSeek forward pass on the CPU (reference §5): token
 * embedding, per layer MLA attention in its absorbed form over the latent KV
 * cache, a dense FFN or routed MoE + shared experts, final norm and head.
 *
 * Two ways in: nm_forward_tokens runs one sequence over the state's own
 * cache (generate, chat, bench); nm_forward_batch runs tokens of several
 * sequences, each with its own cache, in one pass (the server's continuous
 * batching): everything but attention is position-independent, so the
 * matrices - and every routed expert - are read once for the whole batch.
 *
 * Ownership: nm_forward_init allocates scratch for batches of up to n_batch
 * tokens (and, on first use of nm_forward_tokens, the state's own KV cache of
 * n_ctx positions); nm_forward_free releases them. The model, the pool, the
 * expert backend and the caches passed to nm_forward_batch are borrowed. */
#ifndef NUMOE_COORDINATOR_ENGINE_CPU_FORWARD_H
#define NUMOE_COORDINATOR_ENGINE_CPU_FORWARD_H

#include <stdint.h>
#include <stdio.h>

#include "common/error.h"
#include "coordinator/experts/backend.h"
#include "coordinator/engine/cpu/kv_cache.h"
#include "model/model.h"
#include "coordinator/engine/rope.h"
#include "kernels/matmul.h"
#include "kernels/threadpool.h"

typedef struct {
    const nm_model *m;
    nm_pool *pool;
    nm_expert_backend *experts;
    nm_kv_cache kv;  /* the single-sequence cache; data allocated on first use */
    int64_t n_ctx;   /* the longest context any cache may have */
    nm_rope rope;
    int n_expert_used;
    int64_t n_batch;
    nm_matmul_ctx mm;
    float *buf; /* one allocation carved into the scratch below */
    float *x, *a, *q, *qa, *kv_new, *gath, *qabs, *oc, *ov, *o, *tmp, *hg, *hu, *rlog, *rw, *moe, *att;
    int32_t *rid;
    /* per token of the batch: its sequence's cache and its position there */
    nm_kv_cache **tkv;
    int64_t *tpos;
    int32_t *tok;
    float *lbuf; /* logits of a multi-sequence batch before they go to each sequence */
    size_t lbuf_rows;
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

/* One sequence's share of a batch: n tokens go to the next positions of kv
 * (kv->n_pos advances by n). logits: NULL, or n_vocab floats that receive the
 * logits of the segment's last token. */
typedef struct {
    nm_kv_cache *kv;
    const int32_t *tokens;
    int64_t n;
    float *logits;
} nm_forward_seq;

/* Runs the segments of n_seqs sequences (distinct caches, n_ctx at most the
 * state's) as one batch of at most n_batch tokens. A segment's results equal
 * what nm_forward_tokens gives for the same sequence alone. 0, or -1 with err
 * (nothing is advanced then). */
int nm_forward_batch(nm_forward *f, nm_forward_seq *seqs, int n_seqs, nm_err *err);

/* Forgets the cache (a new sequence starts at position 0). */
void nm_forward_reset(nm_forward *f);
/* Keeps only the first n cached positions (n <= cached), so a conversation
 * re-evaluates just what changed after its common prefix. */
void nm_forward_rewind(nm_forward *f, int64_t n);

#endif
