/* gen.h - the generation endpoints of `numoe serve` (POST /v1/chat/completions,
 * /v1/completions, /api/chat, /api/generate): the JSON body parsed
 * (serve/api.h), the prompt rendered and tokenized, the request submitted to
 * the scheduler, and the answer sent whole or streamed (SSE for OpenAI,
 * NDJSON for Ollama). http.c routes to nm_gen_handle; this module calls only
 * down (reply.h, the scheduler, the text modules).
 *
 * Threads: every function may be called from any connection thread. The
 * scheduler is read under the rwlock; nm_gen_close takes it away under the
 * write lock, so no submit can race with nm_sched_destroy. */
#ifndef NUMOE_COORDINATOR_SERVE_GEN_H
#define NUMOE_COORDINATOR_SERVE_GEN_H

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "coordinator/serve/api.h"
#include "coordinator/serve/info.h"
#include "coordinator/serve/reply.h"
#include "coordinator/serve/scheduler.h"
#include "coordinator/text/chat_template.h"
#include "coordinator/text/sampler.h"
#include "coordinator/text/tokenizer.h"

/* What the generation endpoints need; borrowed until the server stops. */
typedef struct {
    nm_sched *sched;
    const nm_tokenizer *tk;
    nm_chat_tmpl tmpl;          /* NM_CHAT_TMPL_NONE: chat endpoints refuse */
    int force_think;            /* prompts end inside "<think>\n" */
    int reasoning;              /* split <think> blocks into reasoning fields (--reasoning-format deepseek) */
    nm_sampler_params defaults; /* the server's sampler settings; requests override them */
    nm_serve_model_facts facts; /* for /api/tags */
    char modified[40];          /* model file mtime, ISO 8601 */
} nm_http_model;

typedef struct {
    nm_http_metrics *met;         /* where finished requests are logged and counted */
    const char *model_name;       /* the served name, in every answer */
    uint64_t salt;                /* random at start, so response ids differ between runs */
    atomic_uint_fast64_t seq;     /* response ids and per-request seeds */
    atomic_int_fast64_t live;     /* submitted requests whose answer is not fully sent */
    pthread_rwlock_t lock;        /* guards m.sched */
    nm_http_model m;              /* valid once nm_gen_set_model ran */
    /* work bounds, set with the model (0 until then) */
    size_t max_prompt_bytes;      /* a prompt (rendered) longer than this cannot fit the context: 400 before
                                     tokenizing (0: no such bound, the vocabulary can drop bytes) */
    size_t max_body;              /* a body longer than this cannot hold such a prompt: 413 before reading it */
    pthread_mutex_t tok_mu;       /* at most NM_GEN_TOKENIZE_AT_ONCE tokenizations run at once, so the */
    pthread_cond_t tok_cv;        /*   memory and CPU they take are bounded whatever the clients send */
    int tok_running;
} nm_gen;

#define NM_GEN_TOKENIZE_AT_ONCE 2

/* met and model_name are borrowed. */
void nm_gen_init(nm_gen *g, nm_http_metrics *met, const char *model_name, uint64_t salt);
void nm_gen_destroy(nm_gen *g);
void nm_gen_set_model(nm_gen *g, const nm_http_model *m);
/* Takes the scheduler away (NULL if none was set) for the caller to
 * destroy; later requests get 503. */
nm_sched *nm_gen_close(nm_gen *g);
/* Appends the scheduler's Prometheus text while there is one. 0, or -1. */
int nm_gen_metrics(nm_gen *g, nm_text *o);
/* cap, or less once the model is set: the largest request body worth
 * reading (JSON escapes make a prompt byte up to 6 body bytes). */
size_t nm_gen_max_body(nm_gen *g, size_t cap);
/* 1 with why filled while the engine cannot serve (expert workers down and
 * being restarted: scheduler.h nm_sched_health); 0 when it can, or when no
 * model is set. */
int nm_gen_unhealthy(nm_gen *g, char *why, size_t len);
/* Submitted requests whose answer is not fully sent yet. */
int64_t nm_gen_live(nm_gen *g);
/* The daemon is done with R: a live request stops counting. */
void nm_gen_request_done(nm_gen *g, nm_http_req *r);

/* POST /v1/chat/completions, /v1/completions, /api/chat, /api/generate with
 * the whole body in r->body. */
enum MHD_Result nm_gen_handle(nm_gen *g, struct MHD_Connection *c, nm_http_req *r, nm_api_kind kind);

#endif
