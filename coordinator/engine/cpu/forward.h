/* forward.h - the DeepSeek forward pass on the CPU (docs/MODEL.md §3): token
 * embedding, per layer MLA attention in its absorbed form over the latent KV
 * cache, a dense FFN or routed MoE + shared experts, final norm and head.
 * Private to the CPU engine (cpu_engine.c): everything else reaches it
 * through coordinator/engine/engine.h.
 *
 * nm_forward_batch runs tokens of several sequences, each with its own
 * cache, in one pass: everything but attention is position-independent, so
 * the matrices - and every routed expert - are read once for the whole
 * batch.
 *
 * Ownership: nm_forward_init allocates scratch for batches of up to n_batch
 * tokens; nm_forward_free releases it. The model, the pool, the expert
 * backend and the caches passed to nm_forward_batch are borrowed. */
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

enum { NM_ATTN_AUTO, NM_ATTN_ABSORBED, NM_ATTN_DECOMPRESSED };

typedef struct {
    const nm_model *m;
    nm_pool *pool;
    nm_expert_backend *experts;
    int64_t n_ctx;   /* the longest context any cache may have */
    nm_rope rope;
    int n_expert_used;
    int64_t n_batch;
    nm_matmul_ctx mm;
    float *buf; /* one allocation carved into the scratch below */
    float *x, *a, *q, *qa, *kv_new, *gath, *qabs, *oc, *o, *tmp, *hg, *hu, *rlog, *moe, *att;
    /* the decompressed attention of prefill runs (forward.c attention_run):
     * W_UK of every head as f32 [n_head][d_nope][kv_lora] (k_b transposed),
     * and per head of a chunk of dec_heads heads its K | V rows
     * [dec_heads][n_ctx][d_nope + d_rope + d_v]; abs_t lists the tokens that
     * take the absorbed form */
    float *kbt, *kvd;
    int64_t dec_heads;
    int64_t *abs_t;
    /* NM_ATTN_AUTO: per run of one sequence's tokens the form with fewer
     * multiply-adds; the others force one (NUMOE_CPU_ATTN, for tests) */
    int attn_mode;
    /* per token of the batch: its sequence's cache and its position there */
    nm_kv_cache **tkv;
    int64_t *tpos;
    int32_t *tok;
    float *lbuf; /* the batch's logits rows (nm_forward_seq.logits points here) */
    size_t lbuf_rows;
    /* When set, every routing decision is appended as int32 records
     * {position, layer, k expert ids} (tests compare routing with a reference;
     * later the expert-usage profile for placement is built from the same). */
    FILE *route_log;
    /* Wait for the routed experts before computing the shared ones (the
     * order before the submit/wait split; the same results): `numoe bench
     * --experts-sync` measures what the overlap gives. */
    int sync_experts;
    /* counters: batches run, their tokens, seconds spent in the expert
     * backend's wait */
    uint64_t n_steps, n_tokens;
    double expert_wait_s;
} nm_forward;

int nm_forward_init(nm_forward *f, const nm_model *m, nm_pool *pool, nm_expert_backend *experts, int64_t n_ctx,
                    int64_t n_batch, int n_expert_used, nm_err *err);
void nm_forward_free(nm_forward *f);

/* One sequence's share of a batch: n tokens go to the next positions of kv
 * (kv->n_pos advances by n). rows: 0 (no logits), 1 (the last token's) or n
 * (every token's); logits is set to those rows x n_vocab, in the state's
 * buffer, valid until the next call. */
typedef struct {
    nm_kv_cache *kv;
    const int32_t *tokens;
    int64_t n;
    int64_t rows;
    const float *logits;
} nm_forward_seq;

/* Runs the segments of n_seqs sequences (distinct caches, n_ctx at most the
 * state's) as one batch of at most n_batch tokens. A segment's results equal
 * those of its sequence alone, bit for bit. 0, or -1 with err (nothing is
 * advanced then). */
int nm_forward_batch(nm_forward *f, nm_forward_seq *seqs, int n_seqs, nm_err *err);

#endif
