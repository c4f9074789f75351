/* http.c - the daemon, routing, auth, request bodies and the endpoints that
 * need no generation (http.h). It calls down into gen.c (the generation
 * endpoints) and reply.c (answers, request log, metrics); neither calls back. */
#include "coordinator/serve/http.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/progress.h"
#include "common/clock.h"
#include "coordinator/serve/gen.h"
#include "coordinator/serve/reply.h"

#define NM_HTTP_MAX_BODY (16u << 20) /* request bodies above this get 413 */

enum { ST_LOADING, ST_READY, ST_STOPPING };

struct nm_http {
    nm_http_opts o;
    char *model_name, *api_key, *host, *cors;
    int cors_any;                    /* every origin may call (Access-Control-Allow-Origin: *) */
    nm_conn_guard *guard;
    int port;
    struct MHD_Daemon *d;
    int listen_fd;
    int quiesced;
    atomic_int state;                /* ST_* */
    int64_t created;                 /* unix time the model came up: /v1/models "created" */
    nm_http_metrics met;
    nm_gen gen;                      /* the generation endpoints and the model they use */
};





static nm_route route_of(const char *url) {
    for (int r = 0; r < R_OTHER; r++)
        if (!strcmp(url, nm_route_path((nm_route)r))) return (nm_route)r;
    return R_OTHER;
}

static int is_post_route(nm_route r) {
    return r == R_V1_CHAT || r == R_V1_COMPLETIONS || r == R_API_CHAT || r == R_API_GENERATE;
}

static enum MHD_Result reply_str(nm_http *h, struct MHD_Connection *c, nm_http_req *r, int status, const char *ctype,
                                 const char *s) {
    char *b = strdup(s);
    return nm_http_reply(&h->met, c, r, status, ctype, b, b ? strlen(b) : 0);
}

static int render_metrics(nm_http *h, nm_text *o) {
    int bad = 0;
    char why[400];
    bad |= nm_text_printf(o,
                          "# HELP numoe_up Whether the model is loaded and the server takes requests (0 while loading, "
                          "shutting down, or while its expert workers are down).\n# TYPE numoe_up gauge\nnumoe_up %d\n",
                          atomic_load(&h->state) == ST_READY && !nm_gen_unhealthy(&h->gen, why, sizeof why));
    bad |= nm_conn_metrics(h->guard, o);
    bad |= nm_http_metrics_render(&h->met, o);
    bad |= nm_gen_metrics(&h->gen, o);
    return bad ? -1 : 0;
}

/* ---- the small endpoints ---- */

static enum MHD_Result get_endpoint(nm_http *h, struct MHD_Connection *c, nm_http_req *r) {
    int st = atomic_load(&h->state);
    switch (r->route) {
    case R_ROOT: return reply_str(h, c, r, 200, "text/plain; charset=utf-8", "numoe is running\n");
    case R_HEALTH: {
        char why[400];
        if (st == ST_READY && nm_gen_unhealthy(&h->gen, why, sizeof why)) {
            /* loaded, but the engine cannot serve now (expert workers down):
             * a balancer must take us out until it recovers by itself */
            char *js = nm_api_health_json("unavailable", why);
            return nm_http_reply(&h->met, c, r, 503, "application/json", js, js ? strlen(js) : 0);
        }
        if (st == ST_READY) return reply_str(h, c, r, 200, "application/json", "{\"status\":\"ok\"}");
        if (st == ST_LOADING) { /* how far the start-up is (common/progress.h's load meter: bytes read or loaded) */
            char js[96];
            snprintf(js, sizeof js, "{\"status\":\"loading\",\"progress\":%.3f}", nm_load_fraction());
            return reply_str(h, c, r, 503, "application/json", js);
        }
        return reply_str(h, c, r, 503, "application/json", "{\"status\":\"shutting down\"}");
    }
    case R_API_VERSION: return reply_str(h, c, r, 200, "application/json", "{\"version\":\"0.1.0\"}");
    case R_METRICS: {
        nm_text t = {0};
        if (render_metrics(h, &t)) {
            free(t.buf);
            return nm_http_reply(&h->met, c, r, 500, "", NULL, 0);
        }
        return nm_http_reply(&h->met, c, r, 200, "text/plain; version=0.0.4; charset=utf-8", t.buf, t.len);
    }
    default: break;
    }
    if (st == ST_LOADING) return nm_http_fail(&h->met, c, r, 503, "server_error", "the model is still loading");
    char *js = NULL;
    if (r->route == R_V1_MODELS) {
        js = nm_api_models_json(h->model_name, h->created);
    } else if (r->route == R_API_TAGS) {
        char params[32];
        nm_serve_params_str(h->gen.m.facts.n_params, params, sizeof params);
        js = nm_api_tags_json(h->model_name, h->gen.m.facts.size_bytes, h->gen.m.facts.family, h->gen.m.facts.quant, params,
                              h->gen.m.modified);
    }
    return nm_http_reply(&h->met, c, r, 200, "application/json", js, js ? strlen(js) : 0);
}

/* ---- request dispatch ---- */

/* Constant-time comparison, so response timing does not reveal how much of a
 * guessed key was right. */
static int key_ok(const char *want, const char *header) {
    static const char bearer[] = "Bearer ";
    if (!header || strncasecmp(header, bearer, sizeof bearer - 1)) return 0;
    const char *got = header + sizeof bearer - 1;
    while (*got == ' ') got++;
    size_t lw = strlen(want), lg = strlen(got);
    unsigned char diff = (unsigned char)(lw != lg);
    for (size_t i = 0; i < lw; i++) diff |= (unsigned char)(want[i] ^ got[i < lg ? i : 0]);
    return diff == 0;
}

static int needs_key(nm_route r) {
    /* health and metrics stay open for probes and scrapers; the version and
     * root answers say nothing about the model */
    return r != R_HEALTH && r != R_METRICS && r != R_API_VERSION && r != R_ROOT;
}

/* Answers on the first call, before any body is read: preflight, unknown
 * path, wrong method, missing key, declared body too large. 1 when answered. */
static int early_answer(nm_http *h, struct MHD_Connection *c, nm_http_req *r, enum MHD_Result *res) {
    const char *m = r->method;
    if (!strcmp(m, "OPTIONS")) {
        struct MHD_Response *resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
        if (!resp) return *res = MHD_NO, 1;
        MHD_add_response_header(resp, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
        const char *want = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Access-Control-Request-Headers");
        MHD_add_response_header(resp, "Access-Control-Allow-Headers", want ? want : "Authorization, Content-Type");
        MHD_add_response_header(resp, "Access-Control-Max-Age", "86400");
        *res = nm_http_queue(&h->met, c, r, 204, resp);
        return 1;
    }
    if (r->route == R_OTHER) {
        *res = nm_http_fail(&h->met, c, r, 404, "not_found_error", "no endpoint %s %s", m, r->url);
        return 1;
    }
    int post = is_post_route(r->route);
    if (post ? strcmp(m, "POST") : strcmp(m, "GET") && strcmp(m, "HEAD")) {
        nm_api_error e = {.status = 405};
        snprintf(e.type, sizeof e.type, "invalid_request_error");
        snprintf(e.message, sizeof e.message, "%s takes %s, not %s", r->url, post ? "POST" : "GET", m);
        char *js = nm_api_error_json(&e, nm_http_ollama_style(r));
        struct MHD_Response *resp =
            js ? MHD_create_response_from_buffer(strlen(js), js, MHD_RESPMEM_MUST_FREE) : NULL;
        if (!resp) return free(js), *res = MHD_NO, 1;
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, post ? "POST, OPTIONS" : "GET, HEAD, OPTIONS");
        *res = nm_http_queue(&h->met, c, r, 405, resp);
        return 1;
    }
    if (h->api_key && needs_key(r->route) &&
        !key_ok(h->api_key, MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION))) {
        nm_api_error e = {.status = 401};
        snprintf(e.type, sizeof e.type, "invalid_request_error");
        snprintf(e.message, sizeof e.message, "missing or wrong API key: send 'Authorization: Bearer KEY'");
        char *js = nm_api_error_json(&e, nm_http_ollama_style(r));
        struct MHD_Response *resp =
            js ? MHD_create_response_from_buffer(strlen(js), js, MHD_RESPMEM_MUST_FREE) : NULL;
        if (!resp) return free(js), *res = MHD_NO, 1;
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
        *res = nm_http_queue(&h->met, c, r, 401, resp);
        return 1;
    }
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    size_t max_body = nm_gen_max_body(&h->gen, NM_HTTP_MAX_BODY);
    if (post && cl && strtoull(cl, NULL, 10) > max_body) {
        r->close = 1; /* the body is not read: nothing after it can be framed */
        *res = nm_http_fail(&h->met, c, r, 413, "invalid_request_error",
                            "the request body (%s bytes) exceeds the limit of %zu bytes%s", cl, max_body,
                            max_body < NM_HTTP_MAX_BODY ? " (what a prompt that fits the context can take)" : "");
        return 1;
    }
    return 0;
}

/* ---- framing (RFC 9112 section 6) ---- */

typedef struct {
    int n_cl, n_te, cl_bad, cl_differ;
    char cl[32], te[64];
} framing;

static enum MHD_Result framing_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    framing *f = cls;
    (void)kind;
    if (!value) value = "";
    if (!strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH)) {
        size_t n = strlen(value);
        if (!n || n >= sizeof f->cl || strspn(value, "0123456789") != n) f->cl_bad = 1;
        else if (f->n_cl && strcmp(f->cl, value)) f->cl_differ = 1;
        if (!f->n_cl) snprintf(f->cl, sizeof f->cl, "%s", value);
        f->n_cl++;
    } else if (!strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING)) {
        if (!f->n_te) snprintf(f->te, sizeof f->te, "%s", value);
        f->n_te++;
    }
    return MHD_YES;
}

/* A request whose body cannot be framed without doubt. Such a request is
 * answered and its connection closed: a proxy in front may have framed it
 * otherwise, and whatever bytes follow would be read as another request
 * (request smuggling). 1 when answered. */
static int bad_framing(nm_http *h, struct MHD_Connection *c, nm_http_req *r, enum MHD_Result *res) {
    framing f = {0};
    MHD_get_connection_values(c, MHD_HEADER_KIND, framing_header, &f);
    int status = 0;
    char msg[200];
    if (f.n_te && f.n_cl)
        status = 400, snprintf(msg, sizeof msg, "a request may not have both Content-Length and Transfer-Encoding");
    else if (f.n_te > 1 || (f.n_te && strcasecmp(f.te, "chunked")))
        status = 501, snprintf(msg, sizeof msg, "Transfer-Encoding \"%.60s\" is not supported (only \"chunked\")",
                               f.n_te > 1 ? "given twice" : f.te);
    else if (f.cl_bad)
        status = 400, snprintf(msg, sizeof msg, "Content-Length must be a decimal number of bytes");
    else if (f.cl_differ)
        status = 400, snprintf(msg, sizeof msg, "conflicting Content-Length headers");
    if (!status) return 0;
    r->close = 1;
    *res = nm_http_fail(&h->met, c, r, status, "invalid_request_error", "%s", msg);
    return 1;
}

/* ---- browser origins ---- */

/* Fills r->cors; 0 when the request may go on, -1 for an Origin not allowed. */
static int check_origin(nm_http *h, struct MHD_Connection *c, nm_http_req *r) {
    const char *origin = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin");
    r->cors[0] = 0;
    if (h->cors_any) {
        snprintf(r->cors, sizeof r->cors, "*");
        return 0;
    }
    if (!origin) return 0; /* not a browser's cross-origin request */
    size_t lo = strlen(origin);
    for (const char *p = h->cors; p && *p;) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n == lo && !strncmp(p, origin, n) && n < sizeof r->cors) {
            snprintf(r->cors, sizeof r->cors, "%s", origin);
            return 0;
        }
        p = e ? e + 1 : p + n;
    }
    return -1;
}

static nm_conn *conn_of(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

/* The checks of the first call (headers in, nothing of a body read yet):
 * connection limits, framing, origin. 1 when answered. */
static int gatekeep(nm_http *h, struct MHD_Connection *c, nm_http_req *r, enum MHD_Result *res) {
    const char *why = nm_conn_refusal(conn_of(c));
    if (why) {
        r->close = 1;
        *res = nm_http_fail(&h->met, c, r, 503, "server_error", "%s; try again later", why);
        return 1;
    }
    if (bad_framing(h, c, r, res)) return 1;
    if (check_origin(h, c, r)) {
        char o[96];
        nm_http_log_escape(MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin"), o, sizeof o);
        *res = nm_http_fail(&h->met, c, r, 403, "invalid_request_error",
                            "requests from web pages of origin %s are not allowed (start the server with "
                            "--cors-origin %s to allow them)", o, o);
        return 1;
    }
    return 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    nm_http *h = cls;
    nm_http_req *r = *con_cls;
    (void)version;
    if (!r) {
        if (!(r = calloc(1, sizeof *r))) return MHD_NO;
        r->t0 = nm_now_s();
        r->route = route_of(url);
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->url, sizeof r->url, "%s", url);
        *con_cls = r;
        nm_http_arrived(&h->met);
        enum MHD_Result res;
        if (gatekeep(h, c, r, &res)) return res;
        /* With a body on the way, refuse now rather than read megabytes we
         * would throw away (the daemon then closes the connection). Without
         * one, answer on the next call, which keeps the connection alive. */
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        int has_body = (cl && strtoull(cl, NULL, 10) > 0) ||
                       MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
        if (has_body && early_answer(h, c, r, &res)) return res;
        r->checked = has_body;
        return MHD_YES;
    }
    if (*upload_size) {
        /* the body arrives in pieces; keep it unless it is already answered or
         * too large (then it is read and dropped, and 413 goes at the end) */
        if (!r->status && !r->too_large) {
            if (r->body.len + *upload_size > nm_gen_max_body(&h->gen, NM_HTTP_MAX_BODY)) {
                r->too_large = 1;
                free(r->body.buf);
                r->body = (nm_text){0};
            } else if (nm_text_append(&r->body, upload, *upload_size)) {
                return MHD_NO;
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (r->status) return MHD_YES; /* answered on the first call */
    nm_conn_answering(h->guard, conn_of(c)); /* all of the request is in: no deadline while it is answered */
    if (!r->checked) {
        r->checked = 1;
        enum MHD_Result res;
        if (early_answer(h, c, r, &res)) return res;
    }
    if (r->too_large)
        return nm_http_fail(&h->met, c, r, 413, "invalid_request_error", "the request body exceeds the limit of %zu bytes",
                            nm_gen_max_body(&h->gen, NM_HTTP_MAX_BODY));
    if (!is_post_route(r->route)) return get_endpoint(h, c, r);
    int st = atomic_load(&h->state);
    if (st != ST_READY)
        return nm_http_fail(&h->met, c, r, 503, "server_error", "%s",
                            st == ST_LOADING ? "the model is still loading" : "the server is shutting down");
    nm_api_kind kind = r->route == R_V1_CHAT          ? NM_API_OPENAI_CHAT
                       : r->route == R_V1_COMPLETIONS ? NM_API_OPENAI_COMPLETION
                       : r->route == R_API_CHAT       ? NM_API_OLLAMA_CHAT
                                                      : NM_API_OLLAMA_GENERATE;
    return nm_gen_handle(&h->gen, c, r, kind);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    nm_http *h = cls;
    nm_http_req *r = *con_cls;
    nm_conn_idle(h->guard, conn_of(c)); /* keep-alive: the next request's idle deadline runs */
    if (!r) return;
    *con_cls = NULL;
    nm_gen_request_done(&h->gen, r);
    if (!r->handed_off && !r->recorded) {
        /* no answer was queued: the client left (or the connection broke)
         * before the request was complete */
        int gone = toe == MHD_REQUEST_TERMINATED_CLIENT_ABORT || toe == MHD_REQUEST_TERMINATED_READ_ERROR;
        nm_http_record_req(&h->met, r, r->status ? r->status : 499 /* nginx's "client closed request" */, gone,
                   gone ? "client went away" : "connection closed");
    }
    free(r->body.buf);
    free(r);
}

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_ctx, enum MHD_ConnectionNotificationCode code) {
    nm_http *h = cls;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *fd = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        const union MHD_ConnectionInfo *ad = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        const struct sockaddr *sa = ad ? ad->client_addr : NULL;
        socklen_t sl = !sa ? 0 : sa->sa_family == AF_INET6 ? (socklen_t)sizeof(struct sockaddr_in6)
                                                            : (socklen_t)sizeof(struct sockaddr_in);
        *socket_ctx = nm_conn_open(h->guard, fd ? fd->connect_fd : -1, sa, sl);
    } else {
        nm_conn_close(h->guard, *socket_ctx);
        *socket_ctx = NULL;
    }
}

/* The request line has come: the header/body deadline starts. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *c) {
    nm_http *h = cls;
    (void)uri;
    nm_conn_reading(h->guard, conn_of(c));
    return NULL;
}

/* Paths are matched as sent: with libmicrohttpd's percent-decoding
 * "/v1/completions%00" became "/v1/completions" followed by a NUL, which
 * the route table then matched. No endpoint has a reason for an escape. */
static size_t no_unescape(void *cls, struct MHD_Connection *c, char *s) {
    (void)cls, (void)c;
    return strlen(s);
}

static void mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = 0;
    /* A client that goes away mid-answer is routine, and the request's own
     * log line says so: drop the daemon's messages about it (our stream
     * callback ending with an error, a send to a closed socket). */
    if (strstr(msg, "application error generating response") || strstr(msg, "no longer available for sending"))
        return;
    fprintf(stderr, "numoe serve: http: %s\n", msg);
}

/* ---- sockets ---- */

/* Our own listening socket rather than the daemon's, for an error that names
 * the address and errno, and SOCK_CLOEXEC so the worker processes started
 * during loading do not inherit it (and keep the port after we exit). */
static int listen_on(const char *host, int port, int *fd_out, int *port_out, nm_err *err) {
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai, *a;
    int rc = getaddrinfo(host, ps, &hints, &ai);
    if (rc) return nm_errf(err, "cannot resolve --host %s: %s", host, gai_strerror(rc));
    int fd = -1, e = 0;
    for (a = ai; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            e = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one); /* restart right after a stop (TIME_WAIT) */
        if (!bind(fd, a->ai_addr, a->ai_addrlen) && !listen(fd, 128)) break;
        e = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    if (fd < 0) return nm_errf(err, "cannot listen on %s:%d: %s", host, port, strerror(e));
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    *port_out = port;
    if (!getsockname(fd, (struct sockaddr *)&ss, &sl))
        *port_out = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                   : ((struct sockaddr_in *)&ss)->sin_port);
    *fd_out = fd;
    return 0;
}

/* ---- life cycle ---- */

int nm_http_start(nm_http **out, const nm_http_opts *o, nm_err *err) {
    *out = NULL;
    nm_http *h = calloc(1, sizeof *h);
    if (!h) return nm_errf(err, "out of memory");
    h->o = *o;
    h->listen_fd = -1;
    h->model_name = strdup(o->model_name);
    h->host = strdup(o->host);
    h->api_key = o->api_key ? strdup(o->api_key) : NULL;
    h->cors = o->cors_origin && strcmp(o->cors_origin, "*") ? strdup(o->cors_origin) : NULL;
    h->cors_any = o->cors_origin ? !strcmp(o->cors_origin, "*") : o->api_key != NULL;
    nm_http_metrics_init(&h->met, o->log_requests);
    atomic_init(&h->state, ST_LOADING);
    uint64_t salt;
    if (getrandom(&salt, sizeof salt, 0) != sizeof salt) salt = (uint64_t)time(NULL) ^ (uint64_t)getpid();
    nm_gen_init(&h->gen, &h->met, h->model_name, salt);
    if (!h->model_name || !h->host || (o->api_key && !h->api_key) || (o->cors_origin && !h->cors_any && !h->cors)) {
        nm_errf(err, "out of memory");
        goto fail;
    }
    if (nm_conn_guard_create(&h->guard, &o->conns, err)) goto fail;
    unsigned hard_total, hard_ip;
    nm_conn_hard_limits(&o->conns, &hard_total, &hard_ip);
    if (listen_on(o->host, o->port, &h->listen_fd, &h->port, err)) goto fail;
    if (!MHD_is_feature_supported(MHD_FEATURE_AUTOSUPPRESS_SIGPIPE)) signal(SIGPIPE, SIG_IGN);
    /* Thread per connection: handlers block in nm_req_wait. MHD_USE_AUTO picks
     * poll() over select(), whose FD_SETSIZE a busy process can pass. ITC is
     * what MHD_quiesce_daemon needs. No idle timeout of the daemon's: it
     * would also count the minutes a non-streamed answer takes with nothing
     * on the wire; the connection guard (conn.h) times only the phases in
     * which the client owes us bytes. The daemon's connection limits are the
     * hard ones above ours, which answer 503 (conn.h). Strict parsing
     * (level 1): no whitespace before a header's colon, no bare CR, and the
     * like, which proxies may read differently. */
    h->d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG |
                                MHD_USE_ITC | MHD_USE_AUTO,
                            0, NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, h,
                            MHD_OPTION_LISTEN_SOCKET, h->listen_fd, MHD_OPTION_CONNECTION_LIMIT, hard_total,
                            MHD_OPTION_PER_IP_CONNECTION_LIMIT, hard_ip, MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
                            MHD_OPTION_NOTIFY_CONNECTION, on_connection, h, MHD_OPTION_URI_LOG_CALLBACK, on_uri, h,
                            MHD_OPTION_UNESCAPE_CALLBACK, no_unescape, h, MHD_OPTION_STRICT_FOR_CLIENT, (int)1,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)0, MHD_OPTION_END);
    if (!h->d) {
        nm_errf(err, "cannot start the HTTP daemon on %s:%d (libmicrohttpd %s)", o->host, h->port, MHD_get_version());
        goto fail;
    }
    *out = h;
    return 0;
fail:
    if (h->listen_fd >= 0) close(h->listen_fd);
    nm_conn_guard_destroy(h->guard);
    nm_http_metrics_destroy(&h->met);
    nm_gen_destroy(&h->gen);
    free(h->model_name), free(h->host), free(h->api_key), free(h->cors);
    free(h);
    return -1;
}

int nm_http_port(const nm_http *h) { return h->port; }

void nm_http_set_model(nm_http *h, const nm_http_model *m) {
    h->created = (int64_t)time(NULL);
    nm_gen_set_model(&h->gen, m);
    atomic_store(&h->state, ST_READY);
}

void nm_http_limits(nm_http *h, size_t *max_body, size_t *max_prompt_bytes) {
    *max_body = nm_gen_max_body(&h->gen, NM_HTTP_MAX_BODY);
    pthread_rwlock_rdlock(&h->gen.lock);
    *max_prompt_bytes = h->gen.max_prompt_bytes;
    pthread_rwlock_unlock(&h->gen.lock);
}

nm_sched *nm_http_close_gate(nm_http *h) {
    if (!h->quiesced) {
        MHD_quiesce_daemon(h->d); /* hands back our listening socket; closed in nm_http_stop */
        h->quiesced = 1;
    }
    atomic_store(&h->state, ST_STOPPING);
    return nm_gen_close(&h->gen);
}

void nm_http_stop(nm_http *h) {
    if (!h) return;
    if (!h->quiesced) MHD_quiesce_daemon(h->d), h->quiesced = 1;
    /* The scheduler is gone, so every submitted request has ended and its
     * handler is queueing or sending the last of its answer (a 503, the end
     * of a stream). Stopping the daemon shuts every socket at once, so let
     * those answers reach their clients first (bounded: a client that does
     * not read must not hold the exit up). */
    for (int i = 0; i < 1000 && nm_gen_live(&h->gen) > 0; i++) {
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    MHD_stop_daemon(h->d);
    if (h->listen_fd >= 0) close(h->listen_fd);
    nm_conn_guard_destroy(h->guard);
    nm_http_metrics_destroy(&h->met);
    nm_gen_destroy(&h->gen);
    free(h->model_name), free(h->host), free(h->api_key), free(h->cors);
    free(h);
}
