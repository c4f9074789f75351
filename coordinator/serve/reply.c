/* reply.c - the HTTP plumbing the endpoints share (reply.h). */
#include "coordinator/serve/reply.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "common/clock.h"

static const char *const route_path[R_COUNT] = {
    [R_ROOT] = "/",
    [R_HEALTH] = "/health",
    [R_METRICS] = "/metrics",
    [R_V1_MODELS] = "/v1/models",
    [R_V1_CHAT] = "/v1/chat/completions",
    [R_V1_COMPLETIONS] = "/v1/completions",
    [R_API_TAGS] = "/api/tags",
    [R_API_CHAT] = "/api/chat",
    [R_API_GENERATE] = "/api/generate",
    [R_API_VERSION] = "/api/version",
    [R_OTHER] = "other",
};

static const double buckets[NM_HTTP_N_BUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                   2.5,   5,    10,    30,   60,  120,  300, 600};

const char *nm_route_path(nm_route r) { return (unsigned)r < R_COUNT ? route_path[r] : route_path[R_OTHER]; }

void nm_http_metrics_init(nm_http_metrics *m, int log_requests) {
    memset(m, 0, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
    atomic_init(&m->reqs_in_flight, 0);
    m->log_requests = log_requests;
}

void nm_http_metrics_destroy(nm_http_metrics *m) { pthread_mutex_destroy(&m->mu); }

void nm_http_arrived(nm_http_metrics *m) { atomic_fetch_add(&m->reqs_in_flight, 1); }

int nm_http_ollama_style(const nm_http_req *r) {
    return !strncmp(r->url, "/api/", 5); /* unknown /api/ paths too: Ollama clients read {"error": "..."} */
}

/* ---- responses ---- */

void nm_http_add_cors(struct MHD_Response *resp, const nm_http_req *r) {
    if (!r->cors[0]) return;
    MHD_add_response_header(resp, "Access-Control-Allow-Origin", r->cors);
    if (strcmp(r->cors, "*")) MHD_add_response_header(resp, "Vary", "Origin");
}

void nm_http_log_escape(const char *s, char *out, size_t cap) {
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    if (!cap) return;
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        if (*p >= 0x20 && *p < 0x7f && *p != '\\') {
            if (o + 1 >= cap) break;
            out[o++] = (char)*p;
        } else {
            if (o + 4 >= cap) break;
            out[o++] = '\\', out[o++] = 'x', out[o++] = hex[*p >> 4], out[o++] = hex[*p & 15];
        }
    }
    out[o] = 0;
}

/* Logs and counts R once. Done when the answer is queued rather than when
 * the daemon reports it complete, so a client that reads the answer and then
 * scrapes /metrics always finds its request counted. */
void nm_http_record_req(nm_http_metrics *m, nm_http_req *r, int status, int gone, const char *note) {
    if (r->recorded) return;
    r->recorded = 1;
    nm_http_record(m, r->method, r->url, r->route, status, r->n_prompt, r->n_gen, nm_now_s() - r->t0, gone, note);
}

enum MHD_Result nm_http_queue(nm_http_metrics *m, struct MHD_Connection *c, nm_http_req *r, int status,
                              struct MHD_Response *resp) {
    nm_http_add_cors(resp, r);
    if (r->close) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    r->status = status;
    if (ok == MHD_YES) nm_http_record_req(m, r, status, r->gone, r->error);
    return ok;
}

enum MHD_Result nm_http_reply(nm_http_metrics *m, struct MHD_Connection *c, nm_http_req *r, int status,
                              const char *ctype, char *body, size_t len) {
    static const char oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\"}}";
    struct MHD_Response *resp;
    if (!body) {
        status = 500, ctype = "application/json";
        resp = MHD_create_response_from_buffer(sizeof oom - 1, (void *)oom, MHD_RESPMEM_PERSISTENT);
    } else {
        resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    }
    if (!resp) {
        free(body);
        return MHD_NO; /* the daemon closes the connection */
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    return nm_http_queue(m, c, r, status, resp);
}

enum MHD_Result nm_http_reply_error(nm_http_metrics *m, struct MHD_Connection *c, nm_http_req *r, const nm_api_error *e) {
    char *js = nm_api_error_json(e, nm_http_ollama_style(r));
    snprintf(r->error, sizeof r->error, "%.*s", (int)sizeof r->error - 1, e->message); /* truncated on purpose */
    return nm_http_reply(m, c, r, e->status, "application/json", js, js ? strlen(js) : 0);
}

enum MHD_Result nm_http_fail(nm_http_metrics *m, struct MHD_Connection *c, nm_http_req *r, int status, const char *type,
                             const char *fmt, ...) {
    nm_api_error e = {.status = status};
    snprintf(e.type, sizeof e.type, "%s", type);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    return nm_http_reply_error(m, c, r, &e);
}

/* ---- the request log and metrics ---- */

void nm_http_record(nm_http_metrics *m, const char *method, const char *url, nm_route route, int status,
                    int64_t n_prompt, int64_t n_gen, double seconds, int gone, const char *note) {
    pthread_mutex_lock(&m->mu);
    int i = 0;
    while (i < m->n_status && (m->by_status[i].route != (int)route || m->by_status[i].status != status)) i++;
    if (i == m->n_status && m->n_status < (int)(sizeof m->by_status / sizeof *m->by_status)) {
        m->by_status[i].route = (int)route, m->by_status[i].status = status, m->by_status[i].n = 0;
        m->n_status++;
    }
    if (i < m->n_status) m->by_status[i].n++;
    for (int b = 0; b < NM_HTTP_N_BUCKETS; b++)
        if (seconds <= buckets[b]) m->bucket[route][b]++;
    m->count[route]++;
    m->sum[route] += seconds;
    if (n_prompt > 0) m->prompt_tokens += (uint64_t)n_prompt;
    if (n_gen > 0) m->gen_tokens += (uint64_t)n_gen;
    if (gone) m->client_gone++;
    pthread_mutex_unlock(&m->mu);
    atomic_fetch_sub(&m->reqs_in_flight, 1);
    if (!m->log_requests) return;
    /* what the client sent (and error notes that quote it) escaped: a path
     * with a newline must not forge a log line */
    char em[64], eu[800], en[700];
    nm_http_log_escape(method, em, sizeof em);
    nm_http_log_escape(url, eu, sizeof eu);
    nm_http_log_escape(note, en, sizeof en);
    /* one fprintf per line: stdio locks the stream, so lines of concurrent
     * requests never interleave */
    if (n_prompt || n_gen)
        fprintf(stderr, "numoe serve: %s %s %d prompt %lld gen %lld tokens %.1f ms%s%s\n", em, eu, status,
                (long long)n_prompt, (long long)n_gen, seconds * 1e3, en[0] ? " - " : "", en);
    else
        fprintf(stderr, "numoe serve: %s %s %d %.1f ms%s%s\n", em, eu, status, seconds * 1e3, en[0] ? " - " : "", en);
}

int nm_http_metrics_render(nm_http_metrics *m, nm_text *o) {
    int bad = 0;
    bad |= nm_text_printf(o, "# HELP numoe_http_requests_in_flight HTTP requests being answered.\n"
                             "# TYPE numoe_http_requests_in_flight gauge\nnumoe_http_requests_in_flight %lld\n",
                          (long long)atomic_load(&m->reqs_in_flight));
    pthread_mutex_lock(&m->mu);
    bad |= nm_text_printf(o, "# HELP numoe_http_requests_total HTTP requests answered, by route and status.\n"
                             "# TYPE numoe_http_requests_total counter\n");
    for (int i = 0; i < m->n_status; i++)
        bad |= nm_text_printf(o, "numoe_http_requests_total{path=\"%s\",status=\"%d\"} %llu\n",
                              nm_route_path((nm_route)m->by_status[i].route), m->by_status[i].status,
                              (unsigned long long)m->by_status[i].n);
    bad |= nm_text_printf(o, "# HELP numoe_http_request_duration_seconds Time from a request's arrival to the end of "
                             "its response (streams included).\n"
                             "# TYPE numoe_http_request_duration_seconds histogram\n");
    for (int r = 0; r < R_COUNT; r++) {
        if (!m->count[r]) continue;
        for (int b = 0; b < NM_HTTP_N_BUCKETS; b++)
            bad |= nm_text_printf(o, "numoe_http_request_duration_seconds_bucket{path=\"%s\",le=\"%g\"} %llu\n",
                                  nm_route_path((nm_route)r), buckets[b], (unsigned long long)m->bucket[r][b]);
        bad |= nm_text_printf(o,
                              "numoe_http_request_duration_seconds_bucket{path=\"%s\",le=\"+Inf\"} %llu\n"
                              "numoe_http_request_duration_seconds_sum{path=\"%s\"} %.6f\n"
                              "numoe_http_request_duration_seconds_count{path=\"%s\"} %llu\n",
                              nm_route_path((nm_route)r), (unsigned long long)m->count[r], nm_route_path((nm_route)r), m->sum[r], nm_route_path((nm_route)r),
                              (unsigned long long)m->count[r]);
    }
    bad |= nm_text_printf(o,
                          "# HELP numoe_http_prompt_tokens_total Prompt tokens of answered HTTP requests.\n"
                          "# TYPE numoe_http_prompt_tokens_total counter\nnumoe_http_prompt_tokens_total %llu\n"
                          "# HELP numoe_http_generated_tokens_total Tokens generated for answered HTTP requests.\n"
                          "# TYPE numoe_http_generated_tokens_total counter\nnumoe_http_generated_tokens_total %llu\n"
                          "# HELP numoe_http_client_gone_total Requests whose client went away before the end.\n"
                          "# TYPE numoe_http_client_gone_total counter\nnumoe_http_client_gone_total %llu\n",
                          (unsigned long long)m->prompt_tokens, (unsigned long long)m->gen_tokens,
                          (unsigned long long)m->client_gone);
    pthread_mutex_unlock(&m->mu);
    return bad ? -1 : 0;
}

/* ---- sockets ---- */

int nm_http_conn_fd(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? ci->connect_fd : -1;
}

int nm_http_client_gone(int fd) {
    if (fd < 0) return 0;
    struct pollfd p = {.fd = fd, .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) <= 0) return 0;
    if (p.revents & (POLLHUP | POLLERR | POLLRDHUP | POLLNVAL)) return 1;
    if (p.revents & POLLIN) {
        /* readable: either more bytes (a pipelined request: still there) or EOF */
        char b;
        ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
    }
    return 0;
}
