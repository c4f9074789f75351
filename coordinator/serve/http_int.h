/* serve_http_int.h - what the two halves of the HTTP server share:
 * serve_http.c (daemon, routing, auth, CORS, bodies, metrics, request log,
 * the small endpoints) and serve_gen.c (the generation endpoints: prompt,
 * submit, wait, stream). Not for other files. */
#ifndef NUMOE_COORDINATOR_SERVE_HTTP_INT_H
#define NUMOE_COORDINATOR_SERVE_HTTP_INT_H

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator/serve/api.h"
#include "coordinator/serve/http.h"

#define NM_HTTP_MAX_BODY (16u << 20) /* request bodies above this get 413 */

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

enum { ST_LOADING, ST_READY, ST_STOPPING };

/* Request duration histogram buckets, seconds: generation requests take from
 * milliseconds (an error) to many minutes (long answers on a big model). */
#define NM_HTTP_N_BUCKETS 16

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
} nm_http_metrics;

struct nm_http {
    nm_http_opts o;
    char *model_name, *api_key, *host;
    int port;
    struct MHD_Daemon *d;
    int listen_fd;
    int quiesced;
    atomic_int state;             /* ST_* */
    atomic_int_fast64_t conns_open;    /* connections the daemon holds */
    atomic_int_fast64_t reqs_in_flight; /* requests between arrival and their log line */
    atomic_int_fast64_t gen_live; /* submitted generation requests whose answer is not fully sent */
    atomic_uint_fast64_t seq;     /* response ids and per-request seeds */
    uint64_t salt;                /* random at start, so ids differ between runs */
    nm_http_model m;              /* valid once state != ST_LOADING */
    int64_t created;              /* unix time the model came up: /v1/models "created" */
    /* m.sched is read under the read lock; nm_http_close_gate takes it away
     * under the write lock, so no submit can race with nm_sched_destroy. */
    pthread_rwlock_t sched_lock;
    nm_http_metrics met;
};

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
    int live;           /* counted in gen_live until the daemon reports the request complete */
    char error[160];    /* the message of an error answer, for the log */
} nm_http_req;

/* "/api/..." answers errors the Ollama way ({"error": "..."}). */
int nm_http_ollama_style(const nm_http_req *r);

/* Queues BODY (malloc'd, taken; NULL means out of memory and sends a 500)
 * with STATUS, the content type and the CORS header; records the status in R. */
enum MHD_Result nm_http_reply(nm_http *h, struct MHD_Connection *c, nm_http_req *r, int status, const char *ctype,
                              char *body, size_t len);
/* Queues e as an OpenAI- or Ollama-style JSON error. */
enum MHD_Result nm_http_reply_error(nm_http *h, struct MHD_Connection *c, nm_http_req *r, const nm_api_error *e);
/* printf-style shortcut for nm_http_reply_error. */
enum MHD_Result nm_http_fail(nm_http *h, struct MHD_Connection *c, nm_http_req *r, int status, const char *type,
                             const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Adds the CORS header every response carries. */
void nm_http_add_cors(struct MHD_Response *resp);

/* The one log line and the metrics of a finished request. gone: the client
 * went away before the end; note: "" or what to add to the log line (why it
 * failed or ended early). */
void nm_http_record(nm_http *h, const char *method, const char *url, nm_route route, int status, int64_t n_prompt,
                    int64_t n_gen, double seconds, int gone, const char *note);

/* The socket of C, or -1. */
int nm_http_conn_fd(struct MHD_Connection *c);
/* True when the peer of FD has closed or reset the connection (polled, never
 * blocks). A client that half-closes its side counts as gone. */
int nm_http_client_gone(int fd);

/* POST /v1/chat/completions, /v1/completions, /api/chat, /api/generate with
 * the whole body in r->body. */
enum MHD_Result nm_gen_handle(nm_http *h, struct MHD_Connection *c, nm_http_req *r, nm_api_kind kind);

#endif
