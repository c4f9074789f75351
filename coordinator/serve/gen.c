/* gen.c - one generation request over HTTP (gen.h): the JSON body parsed
 * (serve/api.h), the prompt rendered and tokenized, the request submitted to
 * the scheduler, and the answer sent whole or streamed (SSE for OpenAI,
 * NDJSON for Ollama).
 *
 * Ownership of the scheduler request: a non-streamed request is waited for,
 * cancelled if need be and released inside the request handler. A streamed
 * one is handed to the response: its reader callback waits for text and its
 * free callback (libmicrohttpd calls it exactly once, when the response is
 * destroyed: stream end, client gone or daemon stop) cancels and releases
 * it, and writes the request's log line. */
#include "coordinator/serve/gen.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"

#define WAIT_MS 50            /* nm_req_wait slice: how soon a vanished client is noticed */
#define KEEPALIVE_S 5.0       /* SSE comment after this long with nothing sent */
#define STREAM_BLOCK (16 << 10)

static uint64_t mix64(uint64_t x) { /* splitmix64's finaliser */
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Wall-clock "created" of a response: unix seconds, and nanoseconds for
 * Ollama's created_at. */
static void wall_now(int64_t *sec, int32_t *nsec) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    *sec = (int64_t)ts.tv_sec, *nsec = (int32_t)ts.tv_nsec;
}

static int is_chat(nm_api_kind k) { return k == NM_API_OPENAI_CHAT || k == NM_API_OLLAMA_CHAT; }
static int is_ollama(nm_api_kind k) { return k == NM_API_OLLAMA_CHAT || k == NM_API_OLLAMA_GENERATE; }

/* The prompt as token ids: chat kinds (and Ollama generate without raw)
 * through the chat template, which already starts with BOS, so no special
 * tokens are added (as `numoe chat` does); completions as text with BOS as
 * the vocabulary says. Special-token text is matched in both. */
/* A prompt of len bytes is at least len / (longest token piece) tokens:
 * refuse before tokenizing one that cannot fit, whatever its size. */
static int too_long(nm_gen *g, size_t len, const char *param, nm_api_error *e) {
    if (!g->max_prompt_bytes || len <= g->max_prompt_bytes) return 0;
    nm_sched_stats st;
    pthread_rwlock_rdlock(&g->lock);
    int have = g->m.sched != NULL;
    if (have) nm_sched_get_stats(g->m.sched, &st);
    pthread_rwlock_unlock(&g->lock);
    if (!have) return 0; /* shutting down: the submit says so */
    return nm_api_errorf(e, 400, "invalid_request_error", param,
                         "the prompt is %zu bytes; at most %zu bytes can fit the context of %lld tokens (-c)", len,
                         g->max_prompt_bytes, (long long)st.n_ctx);
}

/* nm_tokenize, at most NM_GEN_TOKENIZE_AT_ONCE at a time. */
static int tokenize_bounded(nm_gen *g, const char *text, size_t len, int add_special, int32_t **ids, size_t *n,
                            nm_err *err) {
    pthread_mutex_lock(&g->tok_mu);
    while (g->tok_running >= NM_GEN_TOKENIZE_AT_ONCE) pthread_cond_wait(&g->tok_cv, &g->tok_mu);
    g->tok_running++;
    pthread_mutex_unlock(&g->tok_mu);
    int rc = nm_tokenize(g->m.tk, text, len, add_special, 1, ids, n, err);
    pthread_mutex_lock(&g->tok_mu);
    g->tok_running--;
    pthread_cond_signal(&g->tok_cv);
    pthread_mutex_unlock(&g->tok_mu);
    return rc;
}

static int prompt_tokens(nm_gen *g, const nm_api_request *q, int32_t **ids, size_t *n, nm_api_error *e) {
    nm_err err;
    int templated = is_chat(q->kind) || (q->kind == NM_API_OLLAMA_GENERATE && !q->raw);
    if (!templated) {
        const char *p = q->prompt ? q->prompt : "";
        size_t len = strlen(p);
        if (too_long(g, len, "prompt", e)) return -1;
        if (tokenize_bounded(g, p, len, 1, ids, n, &err))
            return nm_api_errorf(e, 500, "server_error", "prompt", "cannot tokenize the prompt: %s", err.msg);
        return 0;
    }
    if (g->m.tmpl == NM_CHAT_TMPL_NONE)
        return nm_api_errorf(e, 400, "invalid_request_error", "",
                             "the model has no chat template numoe knows; use the completion endpoints, or restart "
                             "the server with --chat-template");
    nm_chat_msg two[2];
    const nm_chat_msg *msgs = q->msgs;
    size_t n_msgs = q->n_msgs;
    if (q->kind == NM_API_OLLAMA_GENERATE) {
        n_msgs = 0;
        if (q->system) two[n_msgs++] = (nm_chat_msg){"system", q->system};
        two[n_msgs++] = (nm_chat_msg){"user", q->prompt ? q->prompt : ""};
        msgs = two;
    }
    char *text = NULL;
    if (nm_chat_render(g->m.tmpl, msgs, n_msgs, 1, g->m.force_think, NULL, NULL, &text, &err))
        return nm_api_errorf(e, 400, "invalid_request_error", "messages", "%s", err.msg);
    size_t len = strlen(text);
    if (too_long(g, len, q->kind == NM_API_OLLAMA_GENERATE ? "prompt" : "messages", e)) return free(text), -1;
    int rc = tokenize_bounded(g, text, len, 0, ids, n, &err);
    free(text);
    if (rc) return nm_api_errorf(e, 500, "server_error", "messages", "cannot tokenize the prompt: %s", err.msg);
    return 0;
}

/* Splits new text into reasoning and answer deltas (or passes it through). */
typedef struct {
    int split;
    nm_reasoning_stream rs;
    size_t shown;
} deltas;

static void next_deltas(deltas *d, const nm_text *t, int final, const char **rz, size_t *rl, const char **an,
                        size_t *al) {
    const char *buf = t->buf ? t->buf : "";
    if (d->split) {
        nm_reasoning_stream_feed(&d->rs, buf, t->len, final, rz, rl, an, al);
        return;
    }
    *rz = NULL, *rl = 0;
    *an = buf + d->shown, *al = t->len - d->shown;
    d->shown = t->len;
}

static void fill_timings(nm_api_out *o, const nm_req_state *st, double t0, double now) {
    o->prompt_tokens = st->n_prompt;
    o->completion_tokens = st->n_gen;
    o->total_ns = (int64_t)((now - t0) * 1e9);
    if (st->t_first > 0 && st->t_admit > 0) o->prompt_ns = (int64_t)((st->t_first - st->t_admit) * 1e9);
    if (st->t_first > 0 && st->t_end >= st->t_first) o->eval_ns = (int64_t)((st->t_end - st->t_first) * 1e9);
}

/* ---- streamed answers ---- */

typedef struct {
    nm_gen *g;
    nm_req *req;
    nm_api_kind kind;
    int fd;                 /* the client's socket, polled while nothing is sent */
    int sse;                /* OpenAI: SSE; Ollama: NDJSON */
    int include_usage;
    char id[48];
    int64_t created;
    nm_text text;           /* everything generated so far */
    deltas d;
    nm_text out;            /* framed bytes not yet handed to the daemon */
    size_t out_pos;
    int ended, failed, gone, recorded;
    int live;               /* counted in gen_live */
    nm_req_state st;
    double t0, last_send;
    char method[16], url[192];
    nm_route route;
} stream;

/* Appends one framed event: "data: JSON\n\n" or "JSON\n". Takes js. */
static int emit(stream *s, char *js) {
    if (!js) return -1;
    int bad = s->sse ? nm_text_printf(&s->out, "data: %s\n\n", js) : nm_text_printf(&s->out, "%s\n", js);
    free(js);
    return bad;
}

static int emit_chunk(stream *s, const char *rz, size_t rl, const char *an, size_t al, const char *finish, int first) {
    nm_api_out o = {.id = s->id, .model = s->g->model_name, .created = s->created, .content = an ? an : "",
                    .content_len = al, .reasoning = rl ? rz : NULL, .reasoning_len = rl, .finish = finish,
                    .first = first};
    /* OpenAI chunks repeat the stream's creation time; Ollama stamps each line */
    if (is_ollama(s->kind)) wall_now(&o.created, &o.created_nsec);
    if (finish && is_ollama(s->kind)) fill_timings(&o, &s->st, s->t0, nm_now_s());
    return emit(s, nm_api_render(s->kind, 1, &o));
}

static int emit_error(stream *s, int status, const char *type, const char *msg) {
    nm_api_error e = {.status = status};
    snprintf(e.type, sizeof e.type, "%s", type);
    snprintf(e.message, sizeof e.message, "%s", msg);
    return emit(s, nm_api_error_json(&e, is_ollama(s->kind)));
}

/* The request's log line and metrics, once: as soon as its last event is
 * framed (before the client can see it, so a scrape right after the stream
 * counts it), else when the response is freed. */
static void stream_record(stream *s, const char *note) {
    if (s->recorded) return;
    s->recorded = 1;
    nm_http_record(s->g->met, s->method, s->url, s->route, 200, s->st.n_prompt, s->st.n_gen, nm_now_s() - s->t0,
                   s->gone, note);
}

/* Waits up to WAIT_MS for more of the answer and frames what came. -1: out
 * of memory. */
static int produce(stream *s) {
    size_t before = s->text.len;
    int fin = nm_req_wait(s->req, WAIT_MS, &s->text, &s->st);
    if (!fin && s->text.len == before) return 0;
    const char *rz, *an;
    size_t rl, al;
    next_deltas(&s->d, &s->text, fin, &rz, &rl, &an, &al);
    if (!fin) return rl || al ? emit_chunk(s, rz, rl, an, al, NULL, 0) : 0;
    s->ended = 1;
    nm_finish f = s->st.finish;
    stream_record(s, f == NM_FINISH_ERROR ? s->st.error : f == NM_FINISH_CANCELLED ? "cancelled at shutdown" : "");
    if (f == NM_FINISH_STOP || f == NM_FINISH_LENGTH) {
        const char *name = nm_finish_name(f);
        if (is_ollama(s->kind)) {
            /* the closing done:true object carries the counts; text goes before it */
            if ((rl || al) && emit_chunk(s, rz, rl, an, al, NULL, 0)) return -1;
            if (emit_chunk(s, NULL, 0, NULL, 0, name, 0)) return -1;
            return 0;
        }
        if (emit_chunk(s, rz, rl, an, al, name, 0)) return -1; /* the last content chunk carries finish_reason */
        if (s->include_usage) {
            nm_api_out o = {.id = s->id, .model = s->g->model_name, .created = s->created, .content = "",
                            .prompt_tokens = s->st.n_prompt, .completion_tokens = s->st.n_gen, .with_usage = 1};
            if (emit(s, nm_api_render(s->kind, 1, &o))) return -1;
        }
        return nm_text_printf(&s->out, "data: [DONE]\n\n");
    }
    /* the headers (200) are gone already: the error travels in the stream */
    if ((rl || al) && emit_chunk(s, rz, rl, an, al, NULL, 0)) return -1;
    s->failed = 1;
    if (f == NM_FINISH_ERROR) return emit_error(s, 500, "server_error", s->st.error);
    return emit_error(s, 503, "server_error", "the request was cancelled: the server is shutting down");
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    stream *s = cls;
    (void)pos;
    for (;;) {
        if (s->out_pos < s->out.len) {
            size_t n = s->out.len - s->out_pos;
            if (n > max) n = max;
            memcpy(buf, s->out.buf + s->out_pos, n);
            s->out_pos += n;
            s->last_send = nm_now_s();
            return (ssize_t)n;
        }
        s->out.len = s->out_pos = 0;
        if (s->ended) return MHD_CONTENT_READER_END_OF_STREAM;
        /* Blocking here is legal: this connection has its own thread. */
        if (produce(s)) {
            s->failed = s->ended = 1;
            return MHD_CONTENT_READER_END_WITH_ERROR; /* out of memory: drop the connection */
        }
        if (s->out.len) continue;
        if (nm_http_client_gone(s->fd)) {
            nm_req_cancel(s->req); /* frees its batch slot and cache at the next step */
            s->gone = s->ended = 1;
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        /* SSE comments keep proxies and clients from timing out while the
         * request waits for a slot or a long prompt is evaluated; NDJSON
         * has no comment syntax, so Ollama streams just wait */
        if (s->sse && nm_now_s() - s->last_send >= KEEPALIVE_S && nm_text_printf(&s->out, ": keep-alive\n\n")) {
            s->failed = s->ended = 1;
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
}

static void stream_free(void *cls) {
    stream *s = cls;
    /* the daemon is done with the response: stream end, client gone, or stop */
    if (!s->ended) s->gone = 1;
    nm_req_cancel(s->req); /* no-op when it has ended */
    if (!s->recorded) {
        nm_text rest = {0};
        nm_req_wait(s->req, 0, &rest, &s->st); /* the latest counts */
        free(rest.buf);
        stream_record(s, s->gone ? "client went away" : "out of memory");
    }
    nm_req_release(s->req);
    if (s->live) atomic_fetch_sub(&s->g->live, 1);
    free(s->text.buf);
    free(s->out.buf);
    free(s);
}

static enum MHD_Result start_stream(nm_gen *g, struct MHD_Connection *c, nm_http_req *r, const nm_api_request *q,
                                    nm_req *req, const char *id) {
    stream *s = calloc(1, sizeof *s);
    if (!s) {
        nm_req_cancel(req), nm_req_release(req);
        return nm_http_reply(g->met, c, r, 500, "", NULL, 0);
    }
    s->g = g, s->req = req, s->kind = q->kind, s->fd = nm_http_conn_fd(c);
    s->live = r->live, r->live = 0; /* the response's free callback ends it now */
    s->sse = !is_ollama(q->kind);
    s->include_usage = q->include_usage;
    snprintf(s->id, sizeof s->id, "%s", id);
    int32_t ns;
    wall_now(&s->created, &ns);
    s->d.split = g->m.reasoning && (is_chat(q->kind) || (q->kind == NM_API_OLLAMA_GENERATE && !q->raw));
    s->d.rs.started_in_think = g->m.force_think;
    s->t0 = r->t0;
    s->last_send = nm_now_s();
    snprintf(s->method, sizeof s->method, "%s", r->method);
    snprintf(s->url, sizeof s->url, "%s", r->url);
    s->route = r->route;
    /* OpenAI chat streams open with the assistant role at once, which also
     * puts the headers on the wire before the first token */
    if (q->kind == NM_API_OPENAI_CHAT) emit_chunk(s, NULL, 0, NULL, 0, NULL, 1);
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, STREAM_BLOCK, stream_read, s,
                                                                  stream_free);
    if (!resp) {
        stream_free(s);
        r->handed_off = 1; /* stream_free logged it */
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                            s->sse ? "text/event-stream; charset=utf-8" : "application/x-ndjson");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no"); /* nginx: do not buffer the stream */
    nm_http_add_cors(resp, r);
    r->handed_off = 1;
    r->status = 200;
    enum MHD_Result ok = MHD_queue_response(c, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp); /* the connection holds the last reference: stream_free runs when it lets go */
    return ok;
}

/* ---- whole answers ---- */

static enum MHD_Result finish_whole(nm_gen *g, struct MHD_Connection *c, nm_http_req *r, const nm_api_request *q,
                                    nm_req *req, const char *id) {
    nm_text text = {0};
    nm_req_state st;
    int fd = nm_http_conn_fd(c);
    while (!nm_req_wait(req, WAIT_MS, &text, &st)) {
        if (nm_http_client_gone(fd)) {
            nm_req_cancel(req);
            nm_req_release(req);
            free(text.buf);
            r->n_prompt = st.n_prompt, r->n_gen = st.n_gen;
            /* Nobody will read it, but a queued answer lets the daemon close
             * the connection quietly (MHD_NO would log an internal error).
             * 499 is nginx's "client closed request". */
            r->gone = 1;
            return nm_http_fail(g->met, c, r, 499, "client_gone", "client went away");
        }
    }
    nm_req_release(req);
    r->n_prompt = st.n_prompt, r->n_gen = st.n_gen;
    enum MHD_Result res;
    if (st.finish == NM_FINISH_ERROR) {
        res = nm_http_fail(g->met, c, r, 500, "server_error", "%s", st.error);
    } else if (st.finish != NM_FINISH_STOP && st.finish != NM_FINISH_LENGTH) {
        res = nm_http_fail(g->met, c, r, 503, "server_error", "the request was cancelled: the server is shutting down");
    } else {
        deltas d = {.split = g->m.reasoning && (is_chat(q->kind) || (q->kind == NM_API_OLLAMA_GENERATE && !q->raw))};
        d.rs.started_in_think = g->m.force_think;
        const char *rz, *an;
        size_t rl, al;
        next_deltas(&d, &text, 1, &rz, &rl, &an, &al);
        nm_api_out o = {.id = id, .model = g->model_name, .content = an, .content_len = al,
                        .reasoning = rl ? rz : NULL, .reasoning_len = rl, .finish = nm_finish_name(st.finish),
                        .with_usage = 1};
        wall_now(&o.created, &o.created_nsec);
        fill_timings(&o, &st, r->t0, nm_now_s());
        char *js = nm_api_render(q->kind, 0, &o);
        res = nm_http_reply(g->met, c, r, 200, "application/json", js, js ? strlen(js) : 0);
    }
    free(text.buf);
    return res;
}

enum MHD_Result nm_gen_handle(nm_gen *g, struct MHD_Connection *c, nm_http_req *r, nm_api_kind kind) {
    nm_api_request q;
    nm_api_error e;
    memset(&q, 0, sizeof q);
    if (nm_api_parse(kind, r->body.buf ? r->body.buf : "", r->body.len, &g->m.defaults, &q, &e)) {
        nm_api_request_free(&q);
        return nm_http_reply_error(g->met, c, r, &e);
    }
    if (q.load_only) {
        /* Ollama clients preload a model with an empty request: the model is
         * loaded already, so answer at once with the one closing object */
        nm_api_out o = {.model = g->model_name, .content = "", .finish = "load"};
        wall_now(&o.created, &o.created_nsec);
        char *js = nm_api_render(kind, 0, &o);
        nm_api_request_free(&q);
        return nm_http_reply(g->met, c, r, 200, "application/json", js, js ? strlen(js) : 0);
    }
    int32_t *ids = NULL;
    size_t n_ids = 0;
    if (prompt_tokens(g, &q, &ids, &n_ids, &e)) {
        nm_api_request_free(&q);
        return nm_http_reply_error(g->met, c, r, &e);
    }
    uint64_t seq = atomic_fetch_add(&g->seq, 1);
    nm_req_params p = {.prompt = ids, .n_prompt = (int64_t)n_ids, .max_tokens = q.max_tokens < 0 ? 0 : q.max_tokens,
                       .sampling = q.sampling, .stops = (const char *const *)q.stops, .n_stops = q.n_stops,
                       .ignore_eos = q.ignore_eos};
    /* Without a seed in the request, each request gets its own, derived from
     * --seed and the arrival order: answers differ between requests but a
     * restarted server given the same requests in order repeats them. */
    if (!q.has_seed) p.sampling.seed = mix64(g->m.defaults.seed ^ mix64(seq));
    r->n_prompt = (int64_t)n_ids;
    nm_req *req = NULL;
    int server_fault = 0;
    nm_err err;
    int rc;
    pthread_rwlock_rdlock(&g->lock);
    if (g->m.sched && (kind == NM_API_OLLAMA_CHAT || kind == NM_API_OLLAMA_GENERATE) && p.max_tokens > 0) {
        /* Ollama's num_predict is only a cap: beyond the context it means "up
         * to the context" there, where OpenAI's max_tokens is a 400 */
        nm_sched_stats st;
        nm_sched_get_stats(g->m.sched, &st);
        if (p.n_prompt + p.max_tokens > st.n_ctx) p.max_tokens = 0;
    }
    if (g->m.sched) rc = nm_sched_submit(g->m.sched, &p, &req, &server_fault, &err);
    else rc = -1, server_fault = 1, nm_errf(&err, "the server is shutting down");
    pthread_rwlock_unlock(&g->lock);
    free(ids);
    enum MHD_Result res;
    if (!rc) {
        atomic_fetch_add(&g->live, 1);
        r->live = 1;
    }
    if (rc) {
        res = nm_http_fail(g->met, c, r, server_fault ? 503 : 400, server_fault ? "server_error" : "invalid_request_error",
                           "%s", err.msg);
    } else {
        char id[48];
        snprintf(id, sizeof id, "%s%016llx%08llx", is_chat(kind) ? "chatcmpl-" : "cmpl-",
                 (unsigned long long)mix64(g->salt ^ seq), (unsigned long long)(seq & 0xffffffffu));
        res = q.stream ? start_stream(g, c, r, &q, req, id) : finish_whole(g, c, r, &q, req, id);
    }
    nm_api_request_free(&q);
    return res;
}

void nm_gen_init(nm_gen *g, nm_http_metrics *met, const char *model_name, uint64_t salt) {
    memset(g, 0, sizeof *g);
    g->met = met, g->model_name = model_name, g->salt = salt;
    atomic_init(&g->seq, 0);
    atomic_init(&g->live, 0);
    pthread_rwlock_init(&g->lock, NULL);
    pthread_mutex_init(&g->tok_mu, NULL);
    pthread_cond_init(&g->tok_cv, NULL);
}

void nm_gen_destroy(nm_gen *g) {
    pthread_rwlock_destroy(&g->lock);
    pthread_mutex_destroy(&g->tok_mu);
    pthread_cond_destroy(&g->tok_cv);
}

void nm_gen_set_model(nm_gen *g, const nm_http_model *m) {
    /* Every token stands for at most `longest` bytes of text (special-token
     * text included), so a prompt of more than n_ctx * longest bytes cannot
     * fit; a vocabulary that drops bytes it has no token for breaks that
     * bound, and then there is none. */
    size_t longest = 0, max_prompt = 0, max_body = 0;
    int32_t nv = nm_tokenizer_n_vocab(m->tk);
    for (int32_t id = 0; id < nv; id++) {
        size_t l = 0;
        if (nm_token_piece(m->tk, id, 1, &l) && l > longest) longest = l;
    }
    nm_sched_stats st;
    nm_sched_get_stats(m->sched, &st);
    if (longest && !nm_tokenizer_n_missing_bytes(m->tk) && (uint64_t)st.n_ctx < SIZE_MAX / 8 / longest) {
        max_prompt = (size_t)st.n_ctx * longest;
        max_body = max_prompt * 6 + (1u << 20); /* \u00XX per byte at worst, and room for the rest */
    }
    pthread_rwlock_wrlock(&g->lock);
    g->m = *m;
    g->max_prompt_bytes = max_prompt;
    g->max_body = max_body;
    pthread_rwlock_unlock(&g->lock);
}

size_t nm_gen_max_body(nm_gen *g, size_t cap) {
    pthread_rwlock_rdlock(&g->lock);
    size_t b = g->max_body;
    pthread_rwlock_unlock(&g->lock);
    return b && b < cap ? b : cap;
}

int nm_gen_unhealthy(nm_gen *g, char *why, size_t len) {
    int bad = 0;
    pthread_rwlock_rdlock(&g->lock);
    if (g->m.sched) {
        nm_sched_health hs;
        nm_sched_health_get(g->m.sched, &hs);
        if (!hs.ok) bad = 1, snprintf(why, len, "%s", hs.why);
    }
    pthread_rwlock_unlock(&g->lock);
    return bad;
}

nm_sched *nm_gen_close(nm_gen *g) {
    pthread_rwlock_wrlock(&g->lock);
    nm_sched *s = g->m.sched;
    g->m.sched = NULL;
    pthread_rwlock_unlock(&g->lock);
    return s;
}

int nm_gen_metrics(nm_gen *g, nm_text *o) {
    int bad = 0;
    pthread_rwlock_rdlock(&g->lock);
    if (g->m.sched) bad = nm_sched_metrics(g->m.sched, o);
    pthread_rwlock_unlock(&g->lock);
    return bad;
}

int64_t nm_gen_live(nm_gen *g) { return (int64_t)atomic_load(&g->live); }

void nm_gen_request_done(nm_gen *g, nm_http_req *r) {
    if (r->live) atomic_fetch_sub(&g->live, 1), r->live = 0;
}
