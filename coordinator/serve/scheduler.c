/* scheduler.c - continuous batching (see scheduler.h for the contract).
 *
 * Locks: the scheduler's mutex guards the queue, the active list and the
 * statistics; each request's own mutex guards what its client reads (text,
 * state, the cancel flag). The engine may take a request's lock while holding
 * the scheduler's, never the other way round, and the client side only ever
 * takes one of them, so there is no lock-order cycle. Model work runs with no
 * lock held. */
#include "coordinator/serve/scheduler.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"

#define MAX_STOPS 16

static void deadline_in(struct timespec *ts, int ms) {
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) ts->tv_sec++, ts->tv_nsec -= 1000000000L;
}

static void cond_init_monotonic(pthread_cond_t *cv) {
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(cv, &ca);
    pthread_condattr_destroy(&ca);
}

/* ---- latency histograms (Prometheus cumulative buckets) ---- */

static const double BOUNDS[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
#define N_BOUNDS (sizeof BOUNDS / sizeof *BOUNDS)

typedef struct {
    const char *name, *help;
    uint64_t bucket[N_BOUNDS + 1]; /* non-cumulative; the last is +Inf */
    double sum;
    uint64_t count;
} hist;

static void hist_observe(hist *h, double v) {
    size_t i = 0;
    while (i < N_BOUNDS && v > BOUNDS[i]) i++;
    h->bucket[i]++, h->sum += v, h->count++;
}

static int hist_render(const hist *h, nm_text *o) {
    int r = nm_text_printf(o, "# HELP %s %s\n# TYPE %s histogram\n", h->name, h->help, h->name);
    uint64_t cum = 0;
    for (size_t i = 0; i < N_BOUNDS && !r; i++) {
        cum += h->bucket[i];
        r = nm_text_printf(o, "%s_bucket{le=\"%g\"} %llu\n", h->name, BOUNDS[i], (unsigned long long)cum);
    }
    cum += h->bucket[N_BOUNDS];
    if (!r) r = nm_text_printf(o, "%s_bucket{le=\"+Inf\"} %llu\n", h->name, (unsigned long long)cum);
    if (!r) r = nm_text_printf(o, "%s_sum %.9g\n%s_count %llu\n", h->name, h->sum, h->name, (unsigned long long)h->count);
    return r;
}

/* ---- requests ---- */

struct nm_req {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs; /* the engine's and the client's */
    /* fixed at submit */
    int32_t *prompt;
    int64_t n_prompt, max_tokens, reserve;
    nm_sampler sampler;
    /* the engine thread's alone */
    nm_engine_seq *seq; /* the request's KV cache, from admission to the end */
    int64_t n_fed;      /* prompt tokens in the cache */
    int32_t sampled;    /* the step's token */
    int32_t next_tok;   /* the token to feed at the next step */
    nm_req *next;       /* queue link (scheduler lock) */
    /* shared with the client (request lock): dec.n_gen and the text so far,
     * cut at a stop string (dec.text.released: what the client may see) */
    nm_decode dec;
    size_t delivered;  /* bytes it has seen */
    int cancelled;
    int admitted; /* holds its reserve of the cache budget */
    nm_req_state st;
};

/* The sequence is gone by now: every admitted request is finished by the
 * engine thread, which frees it (the engine may be gone when the client lets
 * go last). */
static void req_free(nm_req *r) {
    free(r->prompt);
    nm_decode_free(&r->dec);
    nm_sampler_free(&r->sampler);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
}

static void req_unref(nm_req *r) {
    pthread_mutex_lock(&r->mu);
    int left = --r->refs;
    pthread_mutex_unlock(&r->mu);
    if (!left) req_free(r);
}

/* ---- the scheduler ---- */

struct nm_sched {
    nm_engine *e;
    const nm_tokenizer *tk;
    nm_sched_opts o;
    int64_t n_vocab;
    pthread_t thread;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stopping;
    nm_req *qhead, *qtail; /* waiting, in arrival order */
    int64_t n_queued;
    nm_req **active;       /* in flight, in admission order (prefill goes oldest first) */
    int64_t n_active, cache_used;
    nm_engine_segment *segs; /* the step's batch, one segment per request */
    nm_req **seg_req;
    nm_finish *seg_fin;
    int *seg_first;
    nm_sched_stats stats;
    nm_sched_health health;
    hist h_queue, h_ttft, h_step, h_tpot, h_e2e;
};

/* Ends R with reason F (engine side): final text released, client woken, its
 * cache handed back. The caller holds the scheduler lock and removes R from
 * the active list / queue itself. */
static void finish(nm_sched *s, nm_req *r, nm_finish f, const char *error) {
    double t = nm_now_s();
    pthread_mutex_lock(&r->mu);
    if (r->st.finish == NM_FINISH_NONE) {
        r->st.finish = f;
        r->st.t_end = t;
        r->st.queued = 0;
        if (error) snprintf(r->st.error, sizeof r->st.error, "%.*s", (int)sizeof r->st.error - 1, error);
    }
    nm_stop_text_release(&r->dec.text, 1);
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    if (r->admitted) s->cache_used -= r->reserve, r->admitted = 0;
    nm_engine_seq_free(s->e, r->seq);
    r->seq = NULL;
    if (f == NM_FINISH_CANCELLED) s->stats.requests_cancelled++;
    else if (f == NM_FINISH_ERROR) s->stats.requests_failed++;
    else s->stats.requests_done++;
    hist_observe(&s->h_e2e, t - r->st.t_submit);
    if (r->dec.n_gen > 1 && r->st.t_first > 0) hist_observe(&s->h_tpot, (t - r->st.t_first) / (double)(r->dec.n_gen - 1));
}

static void remove_active(nm_sched *s, int64_t i) {
    memmove(s->active + i, s->active + i + 1, (size_t)(s->n_active - i - 1) * sizeof *s->active);
    s->n_active--;
}

static int is_cancelled(nm_req *r) {
    pthread_mutex_lock(&r->mu);
    int c = r->cancelled;
    pthread_mutex_unlock(&r->mu);
    return c;
}

/* Under the scheduler lock: drops cancelled requests from the queue and the
 * active list, then moves queued requests in while there is a slot and
 * cache for the one at the head (strict order: a big request at the head is
 * not overtaken, so it cannot starve). Returns requests to set up. */
static int64_t admit(nm_sched *s, nm_req **fresh) {
    for (nm_req **pp = &s->qhead; *pp;) {
        nm_req *r = *pp;
        if (!is_cancelled(r)) {
            pp = &r->next;
            continue;
        }
        *pp = r->next;
        s->n_queued--;
        finish(s, r, NM_FINISH_CANCELLED, NULL);
        req_unref(r);
    }
    s->qtail = NULL;
    for (nm_req *r = s->qhead; r; r = r->next) s->qtail = r;
    for (int64_t i = 0; i < s->n_active;) {
        nm_req *r = s->active[i];
        if (!is_cancelled(r)) {
            i++;
            continue;
        }
        finish(s, r, NM_FINISH_CANCELLED, NULL);
        remove_active(s, i);
        req_unref(r);
    }
    int64_t n = 0;
    while (s->qhead && s->n_active < s->o.max_batch && s->cache_used + s->qhead->reserve <= s->o.cache_lens) {
        nm_req *r = s->qhead;
        s->qhead = r->next;
        if (!s->qhead) s->qtail = NULL;
        s->n_queued--;
        r->next = NULL;
        s->cache_used += r->reserve;
        r->admitted = 1;
        s->active[s->n_active++] = r;
        fresh[n++] = r;
    }
    return n;
}

/* Reserves an admitted request's sequence (engine thread, no lock: mapping
 * memory can take a moment). */
static int setup(nm_sched *s, nm_req *r, nm_err *err) {
    if (!(r->seq = nm_engine_seq_new(s->e, r->reserve, err))) return -1;
    double t = nm_now_s();
    pthread_mutex_lock(&r->mu);
    r->st.queued = 0;
    r->st.t_admit = t;
    pthread_mutex_unlock(&r->mu);
    return 0;
}

/* The token the step sampled for R through the decode step (text/decode.h:
 * text out under the request's lock, end conditions checked). Returns the
 * finish reason, or NM_FINISH_NONE to go on with r->next_tok. Engine
 * thread, without the scheduler lock. */
static nm_finish on_token(nm_req *r, double t, int *first) {
    if (r->sampled < 0) return NM_FINISH_ERROR;
    pthread_mutex_lock(&r->mu);
    *first = r->st.t_first == 0;
    if (*first) r->st.t_first = t;
    pthread_mutex_unlock(&r->mu);
    nm_finish f = nm_decode_token(&r->dec, r->sampled);
    if (f == NM_FINISH_NONE) r->next_tok = r->sampled;
    return f;
}

/* One step over the active requests: decode tokens first (latency of
 * running requests), then prompt chunks oldest first with what is left of
 * the chunk budget. Engine thread, no lock held. Returns tokens run. */
static int64_t build_batch(nm_sched *s, nm_req *const *active, int64_t n_active, int *n_segs) {
    int64_t budget = s->o.chunk, used = 0;
    int n = 0;
    for (int64_t i = 0; i < n_active; i++) {
        nm_req *r = active[i];
        if (r->n_fed < r->n_prompt || budget == 0) continue;
        s->segs[n] = (nm_engine_segment){.seq = r->seq, .tokens = &r->next_tok, .n = 1, .sampler = &r->sampler,
                                         .token = &r->sampled};
        s->seg_req[n++] = r;
        budget--, used++;
    }
    for (int64_t i = 0; i < n_active && budget > 0; i++) {
        nm_req *r = active[i];
        if (r->n_fed >= r->n_prompt) continue;
        int64_t take = r->n_prompt - r->n_fed < budget ? r->n_prompt - r->n_fed : budget;
        int done = r->n_fed + take == r->n_prompt;
        s->segs[n] = (nm_engine_segment){.seq = r->seq, .tokens = r->prompt + r->n_fed, .n = take,
                                         .sampler = done ? &r->sampler : NULL, .token = &r->sampled};
        s->seg_req[n++] = r;
        budget -= take, used += take;
    }
    *n_segs = n;
    return used;
}

static void *engine(void *arg) {
    nm_sched *s = arg;
    nm_req **fresh = calloc((size_t)s->o.max_batch, sizeof *fresh);
    nm_req **snap = calloc((size_t)s->o.max_batch, sizeof *snap);
    pthread_mutex_lock(&s->mu);
    while (!s->stopping) {
        if (s->o.probe) {
            nm_sched_health h = {.ok = 1};
            pthread_mutex_unlock(&s->mu);
            s->o.probe(s->o.probe_ctx, &h);
            pthread_mutex_lock(&s->mu);
            s->health = h;
            if (!h.ok) {
                /* nothing can run: end what waits, with the reason, rather
                 * than fail each in a step; then wait for the probe to say
                 * the engine is back */
                char msg[sizeof h.why + 64];
                snprintf(msg, sizeof msg, "the engine cannot serve now: %s", h.why);
                while (s->n_active) {
                    nm_req *r = s->active[--s->n_active];
                    finish(s, r, NM_FINISH_ERROR, msg);
                    req_unref(r);
                }
                while (s->qhead) {
                    nm_req *r = s->qhead;
                    s->qhead = r->next;
                    s->n_queued--;
                    finish(s, r, NM_FINISH_ERROR, msg);
                    req_unref(r);
                }
                s->qtail = NULL;
                struct timespec ts;
                deadline_in(&ts, 100);
                pthread_cond_timedwait(&s->cv, &s->mu, &ts);
                continue;
            }
        }
        int64_t n_fresh = admit(s, fresh);
        if (s->n_active == 0) {
            /* idle: a timed wait also notices cancellations of queued requests */
            struct timespec ts;
            deadline_in(&ts, 100);
            pthread_cond_timedwait(&s->cv, &s->mu, &ts);
            continue;
        }
        int64_t n_active = s->n_active;
        memcpy(snap, s->active, (size_t)n_active * sizeof *snap);
        pthread_mutex_unlock(&s->mu);

        nm_err err = {{0}};
        nm_req *failed_setup[n_fresh > 0 ? n_fresh : 1];
        int n_failed = 0;
        for (int64_t i = 0; i < n_fresh; i++)
            if (setup(s, fresh[i], &err)) failed_setup[n_failed++] = fresh[i];
        int n_segs = 0, rc = 0;
        double t0 = nm_now_s(), t1 = t0;
        if (!n_failed) {
            build_batch(s, snap, n_active, &n_segs);
            rc = nm_engine_step(s->e, s->segs, n_segs, &err);
            t1 = nm_now_s();
            /* prompt progress and sampling, still without the lock */
            for (int i = 0; i < n_segs; i++) {
                nm_req *r = s->seg_req[i];
                s->seg_fin[i] = NM_FINISH_NONE, s->seg_first[i] = 0;
                if (rc) {
                    s->seg_fin[i] = NM_FINISH_ERROR;
                    continue;
                }
                if (r->n_fed < r->n_prompt) r->n_fed += s->segs[i].n;
                if (s->segs[i].sampler) s->seg_fin[i] = on_token(r, t1, &s->seg_first[i]);
            }
        }

        pthread_mutex_lock(&s->mu);
        for (int64_t i = 0; i < n_fresh; i++)
            if (fresh[i]->seq) hist_observe(&s->h_queue, fresh[i]->st.t_admit - fresh[i]->st.t_submit);
        if (n_failed) {
            /* a cache that cannot be had fails its request; the rest go on next round */
            for (int i = 0; i < n_failed; i++)
                for (int64_t k = 0; k < s->n_active; k++)
                    if (s->active[k] == failed_setup[i]) {
                        finish(s, failed_setup[i], NM_FINISH_ERROR, err.msg);
                        remove_active(s, k);
                        req_unref(failed_setup[i]);
                        break;
                    }
            continue;
        }
        s->stats.steps++;
        hist_observe(&s->h_step, t1 - t0);
        for (int i = 0; i < n_segs; i++) {
            nm_req *r = s->seg_req[i];
            if (!rc && s->segs[i].tokens != &r->next_tok) s->stats.prompt_tokens += (uint64_t)s->segs[i].n;
            if (!rc && s->segs[i].sampler) s->stats.gen_tokens++;
            if (s->seg_first[i]) hist_observe(&s->h_ttft, t1 - r->st.t_submit);
            nm_finish f = s->seg_fin[i];
            if (f == NM_FINISH_NONE) continue;
            finish(s, r, f, rc ? err.msg : f == NM_FINISH_ERROR ? "sampling or detokenizing failed (out of memory)" : NULL);
            for (int64_t k = 0; k < s->n_active; k++)
                if (s->active[k] == r) {
                    remove_active(s, k);
                    break;
                }
            req_unref(r);
        }
    }
    /* shutting down: everything still here ends as cancelled */
    while (s->n_active) {
        nm_req *r = s->active[s->n_active - 1];
        finish(s, r, NM_FINISH_CANCELLED, "the server is shutting down");
        s->n_active--;
        req_unref(r);
    }
    while (s->qhead) {
        nm_req *r = s->qhead;
        s->qhead = r->next;
        s->n_queued--;
        finish(s, r, NM_FINISH_CANCELLED, "the server is shutting down");
        req_unref(r);
    }
    s->qtail = NULL;
    pthread_mutex_unlock(&s->mu);
    free(fresh);
    free(snap);
    return NULL;
}

int nm_sched_create(nm_sched **out, nm_engine *e, const nm_tokenizer *tk, const nm_sched_opts *o, nm_err *err) {
    *out = NULL;
    nm_sched *s = calloc(1, sizeof *s);
    if (!s) return nm_errf(err, "out of memory");
    const nm_engine_info *in = nm_engine_info_of(e);
    s->e = e, s->tk = tk, s->o = *o;
    s->n_vocab = in->n_vocab;
    if (s->o.max_batch <= 0) s->o.max_batch = 4;
    if (s->o.chunk <= 0) s->o.chunk = 256;
    if (s->o.n_ctx <= 0 || s->o.n_ctx > in->n_ctx) s->o.n_ctx = in->n_ctx;
    if (s->o.cache_lens <= 0) s->o.cache_lens = s->o.n_ctx * s->o.max_batch;
    int bad = 0;
    if (s->o.chunk > in->n_batch)
        bad = nm_errf(err, "--chunk-size %lld exceeds the batch the forward state was made for (%lld: raise -b/--batch)",
                      (long long)s->o.chunk, (long long)in->n_batch);
    else if (s->o.chunk < s->o.max_batch)
        bad = nm_errf(err, "--chunk-size %lld is smaller than --max-batch-size %lld: every running request needs its "
                      "decode token in each step", (long long)s->o.chunk, (long long)s->o.max_batch);
    else if (s->o.cache_lens < 2)
        bad = nm_errf(err, "--cache-lens %lld is too small", (long long)s->o.cache_lens);
    if (bad) return free(s), -1;
    s->stats.cache_total = s->o.cache_lens;
    s->health.ok = 1;
    s->h_queue = (hist){.name = "numoe_queue_wait_seconds", .help = "Time from arrival to admission into the batch."};
    s->h_ttft = (hist){.name = "numoe_time_to_first_token_seconds", .help = "Time from arrival to the first generated token."};
    s->h_step = (hist){.name = "numoe_step_seconds", .help = "Time of one batched forward step (decode tokens + prefill chunk)."};
    s->h_tpot = (hist){.name = "numoe_time_per_output_token_seconds", .help = "Mean time between generated tokens of a request."};
    s->h_e2e = (hist){.name = "numoe_request_seconds", .help = "Time from arrival to the end of a request."};
    pthread_mutex_init(&s->mu, NULL);
    cond_init_monotonic(&s->cv);
    size_t mb = (size_t)s->o.max_batch;
    s->active = calloc(mb, sizeof *s->active);
    s->segs = calloc(mb, sizeof *s->segs);
    s->seg_req = calloc(mb, sizeof *s->seg_req);
    s->seg_fin = calloc(mb, sizeof *s->seg_fin);
    s->seg_first = calloc(mb, sizeof *s->seg_first);
    if (!s->active || !s->segs || !s->seg_req || !s->seg_fin || !s->seg_first || pthread_create(&s->thread, NULL, engine, s)) {
        nm_sched_destroy(s);
        return nm_errf(err, "cannot start the scheduler thread");
    }
    s->started = 1;
    *out = s;
    return 0;
}

void nm_sched_destroy(nm_sched *s) {
    if (!s) return;
    if (s->started) {
        pthread_mutex_lock(&s->mu);
        s->stopping = 1;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->thread, NULL);
    }
    free(s->active);
    free(s->segs);
    free(s->seg_req);
    free(s->seg_fin);
    free(s->seg_first);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}

int nm_sched_submit(nm_sched *s, const nm_req_params *p, nm_req **out, int *server_fault, nm_err *err) {
    *out = NULL;
    *server_fault = 0;
    int64_t n_ctx = s->o.n_ctx;
    if (p->n_prompt < 1) return nm_errf(err, "the prompt is empty");
    if (p->n_prompt >= n_ctx)
        return nm_errf(err, "the prompt has %lld tokens; the context holds %lld (prompt + at least one new token)",
                       (long long)p->n_prompt, (long long)n_ctx);
    int64_t max_tokens = p->max_tokens > 0 ? p->max_tokens : n_ctx - p->n_prompt;
    if (p->n_prompt + max_tokens > n_ctx)
        return nm_errf(err, "max_tokens %lld plus the prompt's %lld tokens exceed the context of %lld tokens",
                       (long long)max_tokens, (long long)p->n_prompt, (long long)n_ctx);
    if (p->n_prompt + max_tokens > s->o.cache_lens)
        return nm_errf(err, "the prompt's %lld tokens plus max_tokens %lld exceed the whole KV cache (--cache-lens %lld)",
                       (long long)p->n_prompt, (long long)max_tokens, (long long)s->o.cache_lens);
    if (p->n_stops > MAX_STOPS) return nm_errf(err, "at most %d stop strings", MAX_STOPS);
    for (int64_t i = 0; i < p->n_prompt; i++)
        if (p->prompt[i] < 0 || p->prompt[i] >= s->n_vocab)
            return nm_errf(err, "prompt token %d at position %lld is outside the vocabulary", p->prompt[i], (long long)i);
    nm_req *r = calloc(1, sizeof *r);
    if (!r) return *server_fault = 1, nm_errf(err, "out of memory");
    pthread_mutex_init(&r->mu, NULL);
    cond_init_monotonic(&r->cv);
    r->refs = 2;
    r->n_prompt = p->n_prompt, r->max_tokens = max_tokens, r->reserve = p->n_prompt + max_tokens;
    r->prompt = malloc((size_t)p->n_prompt * sizeof *r->prompt);
    if (!r->prompt || nm_decode_init(&r->dec, s->tk, 1, p->stops, p->n_stops, max_tokens, p->ignore_eos, err)) {
        req_free(r);
        *server_fault = 1;
        return nm_errf(err, "out of memory");
    }
    r->dec.lock = &r->mu, r->dec.cv = &r->cv;
    memcpy(r->prompt, p->prompt, (size_t)p->n_prompt * sizeof *r->prompt);
    if (nm_sampler_init_params(&r->sampler, &p->sampling, s->n_vocab, err)) {
        req_free(r);
        return -1;
    }
    /* the penalties see the prompt too, as llama.cpp's server does */
    for (int64_t i = 0; i < p->n_prompt; i++) nm_sampler_accept(&r->sampler, p->prompt[i]);
    r->st.n_prompt = p->n_prompt;
    r->st.queued = 1;
    r->st.t_submit = nm_now_s();
    pthread_mutex_lock(&s->mu);
    if (s->stopping || !s->health.ok) {
        if (s->stopping) nm_errf(err, "the server is shutting down");
        else nm_errf(err, "the engine cannot serve now: %s", s->health.why);
        pthread_mutex_unlock(&s->mu);
        req_free(r);
        *server_fault = 1;
        return -1;
    }
    if (s->qtail) s->qtail->next = r;
    else s->qhead = r;
    s->qtail = r;
    s->n_queued++;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    *out = r;
    return 0;
}

int nm_req_wait(nm_req *r, int timeout_ms, nm_text *out, nm_req_state *st) {
    pthread_mutex_lock(&r->mu);
    const nm_stop_text *text = &r->dec.text;
    if (timeout_ms > 0 && r->delivered == text->released && r->st.finish == NM_FINISH_NONE) {
        struct timespec ts;
        deadline_in(&ts, timeout_ms);
        while (r->delivered == text->released && r->st.finish == NM_FINISH_NONE)
            if (pthread_cond_timedwait(&r->cv, &r->mu, &ts) == ETIMEDOUT) break;
    }
    int ok = 1;
    if (text->released > r->delivered) {
        ok = nm_text_append(out, text->text.buf + r->delivered, text->released - r->delivered) == 0;
        if (ok) r->delivered = text->released;
    }
    if (st) *st = r->st, st->n_gen = r->dec.n_gen;
    int done = ok && r->st.finish != NM_FINISH_NONE && r->delivered == text->text.len;
    pthread_mutex_unlock(&r->mu);
    return done;
}

void nm_req_cancel(nm_req *r) {
    pthread_mutex_lock(&r->mu);
    r->cancelled = 1;
    pthread_mutex_unlock(&r->mu);
}

void nm_req_release(nm_req *r) {
    nm_req_cancel(r);
    req_unref(r);
}

void nm_sched_get_stats(nm_sched *s, nm_sched_stats *st) {
    pthread_mutex_lock(&s->mu);
    *st = s->stats;
    st->queued = s->n_queued;
    st->active = s->n_active;
    st->cache_used = s->cache_used;
    st->cache_total = s->o.cache_lens;
    st->max_batch = s->o.max_batch, st->chunk = s->o.chunk, st->n_ctx = s->o.n_ctx;
    pthread_mutex_unlock(&s->mu);
}

void nm_sched_health_get(nm_sched *s, nm_sched_health *h) {
    pthread_mutex_lock(&s->mu);
    *h = s->health;
    pthread_mutex_unlock(&s->mu);
}

int nm_sched_metrics(nm_sched *s, nm_text *o) {
    nm_sched_stats st;
    nm_sched_get_stats(s, &st);
    nm_sched_health hs;
    nm_sched_health_get(s, &hs);
    struct { const char *name, *type, *help; double v; } m[] = {
        {"numoe_queue_depth", "gauge", "Requests waiting for a batch slot or KV cache.", (double)st.queued},
        {"numoe_active_requests", "gauge", "Requests in the running batch.", (double)st.active},
        {"numoe_kv_cache_used_tokens", "gauge", "KV positions reserved by admitted requests.", (double)st.cache_used},
        {"numoe_kv_cache_total_tokens", "gauge", "KV positions of the whole cache (--cache-lens).", (double)st.cache_total},
        {"numoe_max_batch_size", "gauge", "--max-batch-size.", (double)st.max_batch},
        {"numoe_requests_finished_total", "counter", "Requests that ended with stop or length.", (double)st.requests_done},
        {"numoe_requests_cancelled_total", "counter", "Requests cancelled (client gone, shutdown).", (double)st.requests_cancelled},
        {"numoe_requests_failed_total", "counter", "Requests the engine failed.", (double)st.requests_failed},
        {"numoe_prompt_tokens_total", "counter", "Prompt tokens evaluated.", (double)st.prompt_tokens},
        {"numoe_generation_tokens_total", "counter", "Tokens generated.", (double)st.gen_tokens},
        {"numoe_steps_total", "counter", "Batched forward steps run.", (double)st.steps},
        {"numoe_engine_healthy", "gauge", "1 while the engine can serve, 0 while its expert workers are down.",
         (double)hs.ok},
        {"numoe_expert_worker_restarts_total", "counter", "Expert workers that came back after a failure.",
         (double)hs.restarts},
        {"numoe_expert_worker_give_ups_total", "counter",
         "Times the launcher gave a failing worker up for a while (it goes on trying).", (double)hs.give_ups},
    };
    for (size_t i = 0; i < sizeof m / sizeof *m; i++)
        if (nm_text_printf(o, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", m[i].name, m[i].help, m[i].name, m[i].type,
                           m[i].name, m[i].v))
            return -1;
    pthread_mutex_lock(&s->mu);
    hist h[] = {s->h_queue, s->h_ttft, s->h_step, s->h_tpot, s->h_e2e};
    pthread_mutex_unlock(&s->mu);
    for (size_t i = 0; i < sizeof h / sizeof *h; i++)
        if (hist_render(&h[i], o)) return -1;
    return 0;
}
