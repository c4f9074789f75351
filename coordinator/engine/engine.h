/* engine.h - where the forward pass runs: the one interface the scheduler
 * (coordinator/serve/), the CLI commands and the benchmarks (coordinator/cli/)
 * drive the model through. They hold sequences and ask for steps; how the
 * model is computed, where its weights, scratch and KV caches live, is the
 * engine's alone.
 *
 * Implementations: the CPU forward pass (engine/cpu/cpu_engine.h) and the
 * CUDA engine (engine/gpu/gpu_engine.h: attention, dense and shared FFNs,
 * router and head on the GPU; routed experts still through nm_expert_backend
 * on the CPU, in process or in workers). Nothing here assumes host memory
 * for anything but what a caller passes in or gets back.
 *
 * Contract
 *
 * Sequences. nm_engine_seq_new reserves a KV cache of n_ctx positions for
 * one sequence (a conversation, a request) in the engine's memory - host
 * memory for the CPU engine, VRAM for a GPU one; callers never see it. A
 * sequence starts empty; every token a step feeds it takes its next
 * position. seq_len is how many positions are filled, seq_rewind keeps only
 * the first n (a chat turn re-evaluates only what follows the common prefix;
 * rewind(0) starts over). A sequence is freed with seq_free before the
 * engine is destroyed.
 *
 * Steps. nm_engine_step runs segments of several distinct sequences as one
 * batch of at most info.n_batch tokens (all segments together): each
 * segment's tokens go to the next positions of its sequence. A segment's
 * results are those of running its sequence alone (the CPU engine gives the
 * same bits whatever else is in the batch); everything but attention is
 * position-independent, so an implementation reads each weight - every
 * routed expert included - once per step for the whole batch. What a
 * segment gets back, either or both:
 *   logits   host floats, n_vocab per row: the last token's row, or one row
 *            per token with all_logits (prompt scoring, --dump-logits);
 *   a token  with a sampler: the next id drawn from the last token's logits
 *            with that host-side sampler (its penalty window and generator
 *            advance as nm_sampler_sample says). A GPU engine may compute
 *            what it can on the device (greedy argmax with no penalties) but
 *            must draw exactly the id nm_sampler_sample would; *token is -1
 *            when the sampler could not get memory (that segment's failure:
 *            the step itself succeeded and every sequence advanced).
 * On an error (a bad token, a segment that does not fit its sequence, an
 * expert worker lost for good) the step returns -1 with err and no sequence
 * has advanced.
 *
 * Routing log. After nm_engine_route_log(e, f), every routing decision of
 * every later step is appended to f as int32 records {position, layer, k
 * expert ids} (k = info.n_expert_used), in step order, tokens in segment
 * order - what `numoe generate --dump-routing` writes and `numoe placement
 * --profile` reads. NULL stops it; f stays the caller's to close.
 *
 * Threads. One thread at a time drives an engine and its sequences (the
 * scheduler's engine thread, or a CLI command's main thread).
 *
 * Ownership. nm_engine_destroy frees the engine's scratch; the model, thread
 * pool and expert backend an implementation was created with are borrowed
 * and outlive it. */
#ifndef NUMOE_COORDINATOR_ENGINE_ENGINE_H
#define NUMOE_COORDINATOR_ENGINE_ENGINE_H

#include <stdint.h>
#include <stdio.h>

#include "common/error.h"
#include "coordinator/text/sampler.h"

typedef struct nm_engine nm_engine;
typedef struct nm_engine_seq nm_engine_seq; /* opaque: defined by each implementation */

typedef struct {
    const char *name;   /* "cpu" */
    int64_t n_vocab;    /* length of a logits row */
    int64_t n_ctx;      /* the longest context a sequence may reserve */
    int64_t n_batch;    /* tokens one step may hold, all segments together */
    int64_t n_layer;
    int n_expert_used;  /* routed experts per token in force (--experts-used) */
} nm_engine_info;

/* Counters since the engine was made (for benchmarks). */
typedef struct {
    uint64_t steps;       /* steps run */
    uint64_t tokens;      /* tokens they held */
    double expert_wait_s; /* time a step sat waiting for routed experts after its own work was done */
    /* GPU engine only (0 elsewhere): where a step's time goes */
    double step_s;        /* time inside steps */
    double device_wait_s; /* the host waiting for the GPU's work before each hand-off (attention,
                             router, the copy of the hand-off to the host) */
    uint64_t stream_layers;  /* MoE layers whose routed experts ran on the GPU, streamed */
    double stream_bytes;  /* expert bytes streamed to the GPU */
    double stream_copy_s; /* time the copies took (the copy engine's busy time) */
    uint64_t picks;       /* (token, routed expert) picks of the passes whose experts the host side takes
                             (a layer wholly in VRAM counts its picks without handing them over) */
    uint64_t hot_picks;   /* of them computed by experts resident in VRAM (--gpu-experts) */
    uint64_t handoffs;    /* MoE layers handed to the host's experts (submit + wait) */
    double hot_bytes;     /* bytes of those resident experts, */
    double routed_bytes;  /* of all routed experts */
} nm_engine_stats;

/* One sequence's share of a step. */
typedef struct {
    nm_engine_seq *seq;
    const int32_t *tokens; /* n ids fed at the sequence's next positions */
    int64_t n;             /* >= 1 */
    float *logits;         /* NULL, or n_vocab floats (n * n_vocab with all_logits) */
    int all_logits;
    nm_sampler *sampler;   /* NULL, or the sampler that draws the next token into *token */
    int32_t *token;
} nm_engine_segment;

/* An implementation fills these and embeds nm_engine as its first member. */
struct nm_engine {
    nm_engine_info info;
    nm_engine_seq *(*seq_new)(nm_engine *e, int64_t n_ctx, nm_err *err);
    void (*seq_free)(nm_engine *e, nm_engine_seq *s);
    int64_t (*seq_len)(const nm_engine *e, const nm_engine_seq *s);
    int64_t (*seq_ctx)(const nm_engine *e, const nm_engine_seq *s);
    void (*seq_rewind)(nm_engine *e, nm_engine_seq *s, int64_t n);
    int (*step)(nm_engine *e, nm_engine_segment *segs, int n_segs, nm_err *err);
    int (*route_log)(nm_engine *e, FILE *f, nm_err *err);
    void (*stats)(const nm_engine *e, nm_engine_stats *out);
    void (*destroy)(nm_engine *e);
};

static inline const nm_engine_info *nm_engine_info_of(const nm_engine *e) { return &e->info; }

/* A new empty sequence with room for n_ctx positions (1..info.n_ctx), or
 * NULL with err. */
static inline nm_engine_seq *nm_engine_seq_new(nm_engine *e, int64_t n_ctx, nm_err *err) {
    return e->seq_new(e, n_ctx, err);
}
/* NULL is a no-op. */
static inline void nm_engine_seq_free(nm_engine *e, nm_engine_seq *s) {
    if (s) e->seq_free(e, s);
}
/* Positions filled / reserved. */
static inline int64_t nm_engine_seq_len(const nm_engine *e, const nm_engine_seq *s) { return e->seq_len(e, s); }
static inline int64_t nm_engine_seq_ctx(const nm_engine *e, const nm_engine_seq *s) { return e->seq_ctx(e, s); }
/* Keeps the first n positions (n >= the filled count changes nothing). */
static inline void nm_engine_seq_rewind(nm_engine *e, nm_engine_seq *s, int64_t n) { e->seq_rewind(e, s, n); }

/* One batched step (see the contract above). 0, or -1 with err. */
static inline int nm_engine_step(nm_engine *e, nm_engine_segment *segs, int n_segs, nm_err *err) {
    return e->step(e, segs, n_segs, err);
}
static inline int nm_engine_route_log(nm_engine *e, FILE *f, nm_err *err) { return e->route_log(e, f, err); }
static inline void nm_engine_stats_of(const nm_engine *e, nm_engine_stats *out) { e->stats(e, out); }
/* NULL is a no-op. */
static inline void nm_engine_destroy(nm_engine *e) {
    if (e) e->destroy(e);
}

/* Any number of tokens of one sequence (the single-sequence path of
 * generate, chat and bench): n tokens in steps of at most info.n_batch.
 * logits: NULL, or the last token's row (n rows with all_logits); steps
 * before the last compute no logits unless all_logits. 0, or -1 with err:
 * "context full" when the sequence cannot hold n more tokens, or a token
 * outside the vocabulary (nothing is fed then); a step that fails leaves
 * the steps before it fed. */
int nm_engine_eval(nm_engine *e, nm_engine_seq *s, const int32_t *tokens, int64_t n, float *logits, int all_logits,
                   nm_err *err);
/* As nm_engine_eval without logits, with the last step drawing the next
 * token with sampler into *token (the engine samples: the GPU engine moves
 * only the sampler's candidates off the device). 0, or -1 with err. */
int nm_engine_eval_draw(nm_engine *e, nm_engine_seq *s, const int32_t *tokens, int64_t n, nm_sampler *sampler,
                        int32_t *token, nm_err *err);

#endif
