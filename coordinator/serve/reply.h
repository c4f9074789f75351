/* reply.h - the HTTP plumbing every endpoint of `numoe serve` shares: the
 * state of one HTTP request, queueing an answer (with CORS, as JSON errors
 * the OpenAI or the Ollama way), the one log line and the HTTP metrics of a
 * finished request, and whether a client is still there.
 *
 * Layering inside coordinator/serve/: http.c (daemon, routing, the small
 * endpoints) calls gen.c (the generation endpoints) and this file; gen.c
 * calls this file; this file calls neither. */
#ifndef NUMOE_COORDINATOR_SERVE_REPLY_H
#define NUMOE_COORDINATOR_SERVE_REPLY_H

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator/serve/api.h"
#include "coordinator/text/text.h"

/* Routes, also the path label of the metrics (R_OTHER for anything else, so
 * scanners cannot grow the label set without bound). */
typedef enum {
    R_ROOT,
    R_HEALTH,
    R_METRICS,
    R_V1_MODELS,
    R_V1_CHAT,
    R_V1_COMPLETIONS,
    R_API_TAGS,
    R_API_CHAT,
    R_API_GENERATE,
    R_API_VERSION,
    R_OTHER,
    R_COUNT
} nm_route;

/* The path of a route ("other" for R_OTHER). */
const char *nm_route_path(nm_route r);

/* Request duration histogram buckets, seconds: generation requests take from
 * milliseconds (an error) to many minutes (long answers on a big model). */
#define NM_HTTP_N_BUCKETS 16

/* The request log and the HTTP metrics (nm_http_metrics_init). */
typedef struct {
    pthread_mutex_t mu;
    struct {
        int route, status;
        uint64_t n;
    } by_status[128];
    int n_status;
    uint64_t bucket[R_COUNT][NM_HTTP_N_BUCKETS];
    uint64_t count[R_COUNT];
    double sum[R_COUNT];
    uint64_t prompt_tokens, gen_tokens, client_gone;
    atomic_int_fast64_t reqs_in_flight; /* requests between arrival and their log line */
    int log_requests;                   /* one stderr line per request */
} nm_http_metrics;

void nm_http_metrics_init(nm_http_metrics *m, int log_requests);
void nm_http_metrics_destroy(nm_http_metrics *m);
/* A request arrived: counted in flight until nm_http_record. */
void nm_http_arrived(nm_http_metrics *m);
/* The one log line and the metrics of a finished request. gone: the client
 * went away before the end; note: "" or what to add to the log line (why it
 * failed or ended early). method, url and note are escaped
 * (nm_http_log_escape). */
void nm_http_record(nm_http_metrics *m, const char *method, const char *url, nm_route route, int status,
                    int64_t n_prompt, int64_t n_gen, double seconds, int gone, const char *note);
/* Appends the HTTP metrics (requests in flight, by route and status,
 * durations, tokens, clients gone) as Prometheus text. 0, or -1 when out of
 * memory. */
int nm_http_metrics_render(nm_http_metrics *m, nm_text *o);

/* One HTTP request (libmicrohttpd's per-request con_cls). */
typedef struct {
    double t0;          /* arrival, monotonic seconds */
    nm_route route;
    char method[16];
    char url[192];      /* truncated, for the log */
    nm_text body;
    int too_large;
    int checked;        /* early_answer has run */
    int gone;           /* the client went away while we waited */
    int status;         /* the status queued; 0 none yet */
    int64_t n_prompt, n_gen;
    int handed_off;     /* a streamed response logs the request when it ends */
    int recorded;       /* logged and counted */
    int live;           /* counted as a live generation until the daemon reports the request complete (gen.h) */
    char error[160];    /* the message of an error answer, for the log */
    int close;          /* answer with Connection: close (framing errors, refusals) */
    char cors[160];     /* Access-Control-Allow-Origin to send ("" none, "*", or the request's Origin) */
} nm_http_req;

/* "/api/..." answers errors the Ollama way ({"error": "..."}). */
int nm_http_ollama_style(const nm_http_req *r);

/* Logs and counts R once (nm_http_record with R's fields). */
void nm_http_record_req(nm_http_metrics *m, nm_http_req *r, int status, int gone, const char *note);
/* Adds the CORS header (and Connection: close when r->close), queues RESP
 * with STATUS (and destroys our reference to it), records the status in R
 * and, once queued, logs R. */
enum MHD_Result nm_http_queue(nm_http_metrics *m, struct MHD_Connection *c, nm_http_req *r, int status,
                              struct MHD_Response *resp);
/* Queues BODY (malloc'd, taken; NULL means out of memory and sends a 500)
 * with STATUS, the content type and the CORS header. */
enum MHD_Result nm_http_reply(nm_http_metrics *m, struct MHD_Connection *c, nm_http_req *r, int status,
                              const char *ctype, char *body, size_t len);
/* Queues e as an OpenAI- or Ollama-style JSON error. */
enum MHD_Result nm_http_reply_error(nm_http_metrics *m, struct MHD_Connection *c, nm_http_req *r,
                                    const nm_api_error *e);
/* printf-style shortcut for nm_http_reply_error. */
enum MHD_Result nm_http_fail(nm_http_metrics *m, struct MHD_Connection *c, nm_http_req *r, int status,
                             const char *type, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Adds R's CORS header (r->cors; nothing when empty, Vary: Origin when it
 * names one origin). */
void nm_http_add_cors(struct MHD_Response *resp, const nm_http_req *r);
/* s as one log-safe line in out (cap bytes, NUL-terminated, truncated):
 * control bytes, backslash and non-ASCII bytes become \xNN, so what a
 * client sends can never start a line of its own or drive a terminal. */
void nm_http_log_escape(const char *s, char *out, size_t cap);

/* The socket of C, or -1. */
int nm_http_conn_fd(struct MHD_Connection *c);
/* True when the peer of FD has closed or reset the connection (polled, never
 * blocks). A client that half-closes its side counts as gone. */
int nm_http_client_gone(int fd);

#endif
