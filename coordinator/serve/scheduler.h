/* scheduler.h - continuous batching: many requests share one forward state.
 *
 * One engine thread owns the model. Each step it builds a batch of
 *   - one decode token for every request that is generating, and
 *   - a chunk of pending prompt tokens (oldest request first) filling the
 *     step up to chunk_size tokens,
 * runs it through the model in one pass (so every routed expert's weights are
 * read once per step, whatever the number of requests), samples the next
 * token of every request whose logits came out, and hands the new text to the
 * waiting clients. At most max_batch requests are in flight; the rest wait.
 *
 * KV cache budget: every request reserves prompt + max_tokens positions of a
 * pool of cache_lens positions when it is admitted (KTransformers'
 * balance_serve --cache_lens), and gives them back when it ends, is cancelled
 * or fails. A request that does not fit waits in the queue, in order, until
 * enough is free. Reserving up front means a running request never stalls or
 * is evicted for lack of cache.
 *
 * Threads: nm_sched_submit / nm_req_* are called from any thread (the HTTP
 * server's); the engine thread does all model work.
 *
 * Ownership: nm_sched_create borrows the engine (coordinator/engine/engine.h)
 * and the tokenizer, which must outlive the scheduler; each admitted request
 * gets an engine sequence of prompt + max_tokens positions, freed when it
 * ends; nm_sched_destroy cancels
 * what is left and joins the engine thread. A request is shared by the
 * engine and the client side: the client calls nm_req_release exactly once
 * when done with it (cancelling it first if it has not finished); the memory
 * goes when both sides are done. */
#ifndef NUMOE_COORDINATOR_SERVE_SCHEDULER_H
#define NUMOE_COORDINATOR_SERVE_SCHEDULER_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "coordinator/engine/engine.h"
#include "coordinator/text/decode.h"
#include "coordinator/text/sampler.h"
#include "coordinator/text/text.h"
#include "coordinator/text/tokenizer.h"

typedef struct nm_sched nm_sched;
typedef struct nm_req nm_req;

/* Whether the engine can serve, as a probe (below) reports it. */
typedef struct {
    int ok;             /* 0 while it cannot (expert workers down) */
    char why[400];      /* with ok 0: the reason, for /health and for the requests refused */
    uint64_t restarts;  /* expert workers that came back after a failure, so far */
    uint64_t give_ups;  /* times the launcher gave a worker up for a while (it goes on trying) */
} nm_sched_health;

/* Called on the engine thread, with no lock held, before every step and
 * about every 100 ms while idle; may take a moment (it is where a backend
 * that failed re-arms itself: coordinator/experts/backend.h health). Fills h
 * (zeroed, ok 1, before the call). */
typedef void (*nm_sched_probe)(void *ctx, nm_sched_health *h);

typedef struct {
    int64_t max_batch;  /* --max-batch-size: requests in flight together; default 4 */
    int64_t chunk;      /* --chunk-size: tokens per step (decode tokens + prefill chunk); default 256 */
    int64_t cache_lens; /* --cache-lens: KV positions shared by all requests; default n_ctx * max_batch */
    int64_t n_ctx;      /* per-request limit on prompt + generated tokens; default the engine's context */
    nm_sched_probe probe; /* NULL: the engine is always able to serve */
    void *probe_ctx;
} nm_sched_opts;

typedef struct {
    const int32_t *prompt; /* copied */
    int64_t n_prompt;      /* >= 1 */
    int64_t max_tokens;    /* tokens to generate at most; <= 0: up to n_ctx */
    nm_sampler_params sampling;
    const char *const *stops; /* copied; generation ends before the first occurrence of any of them */
    int n_stops;
    int ignore_eos;           /* keep generating past end-of-generation tokens */
} nm_req_params;

/* How a request ended: nm_finish (text/decode.h); NM_FINISH_CANCELLED after
 * nm_req_cancel or shutdown, NM_FINISH_ERROR when the engine failed (see
 * nm_req_state.error). */

typedef struct {
    int64_t n_prompt;    /* prompt tokens */
    int64_t n_gen;       /* tokens generated so far (the stop string's and EOS included) */
    nm_finish finish;    /* NM_FINISH_NONE until it ends */
    int queued;          /* still waiting for a slot or cache */
    /* monotonic seconds (CLOCK_MONOTONIC); 0 until reached */
    double t_submit, t_admit, t_first, t_end;
    char error[512];     /* with NM_FINISH_ERROR */
} nm_req_state;

/* Starts the engine thread. 0, or -1 with err (bad options, out of memory). */
int nm_sched_create(nm_sched **out, nm_engine *e, const nm_tokenizer *tk, const nm_sched_opts *o, nm_err *err);
/* Cancels every request, waits for the engine thread, frees the scheduler.
 * Requests not yet released stay valid until nm_req_release. */
void nm_sched_destroy(nm_sched *s);

/* Queues a request. -1 with err when it can never run: empty prompt, prompt
 * (plus max_tokens) longer than n_ctx or than cache_lens, a token outside the
 * vocabulary, bad sampler parameters, shutting down, or the engine unable to
 * serve now (the probe says why). These are the client's mistakes (HTTP 400)
 * except shutdown and an engine that cannot serve, reported as
 * *server_fault = 1.
 *
 * While the probe reports the engine unable to serve, no step runs: the
 * requests admitted or queued end with NM_FINISH_ERROR and the probe's
 * reason, and new ones are refused, until the probe reports it able again. */
int nm_sched_submit(nm_sched *s, const nm_req_params *p, nm_req **out, int *server_fault, nm_err *err);

/* Waits until the request has text the client has not seen, or has ended, or
 * timeout_ms passes (<= 0: do not wait). Appends the new text to *out (text
 * that may still turn out to start a stop string is held back until it is
 * known not to) and fills *st. Returns 1 when the request has ended and all
 * its text has been delivered, else 0. */
int nm_req_wait(nm_req *r, int timeout_ms, nm_text *out, nm_req_state *st);
/* Ends the request early (the client went away); its cache is freed at the
 * engine's next step. Safe to call after it ended. */
void nm_req_cancel(nm_req *r);
/* The client side is done with R (call once). */
void nm_req_release(nm_req *r);

typedef struct {
    int64_t queued, active;            /* requests waiting / in flight */
    int64_t cache_used, cache_total;   /* reserved KV positions / cache_lens */
    int64_t max_batch, chunk, n_ctx;   /* the options in force */
    uint64_t requests_done, requests_cancelled, requests_failed;
    uint64_t prompt_tokens, gen_tokens; /* totals evaluated / generated */
    uint64_t steps;
} nm_sched_stats;

void nm_sched_get_stats(nm_sched *s, nm_sched_stats *st);
/* The probe's latest report (ok 1 before the first one, and without a probe). */
void nm_sched_health_get(nm_sched *s, nm_sched_health *h);
/* Appends the scheduler's Prometheus text (counters, gauges and latency
 * histograms: queue wait, time to first token, per-step time, time per
 * output token; the health: numoe_engine_healthy,
 * numoe_expert_worker_restarts_total, numoe_expert_worker_give_ups_total) to
 * *out. 0, or -1 when out of memory. */
int nm_sched_metrics(nm_sched *s, nm_text *out);

#endif
