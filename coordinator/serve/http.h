/* http.h - the HTTP server of `numoe serve` (libmicrohttpd): the
 * OpenAI and Ollama endpoints, health, metrics, auth and CORS over one
 * continuous-batching scheduler.
 *
 * Life cycle, as coordinator/cli/serve.c drives it:
 *   nm_http_start       binds and listens at once, so /health can answer 503
 *                       {"status":"loading"} while the model loads (which may
 *                       take minutes) and a port in use fails before any of it;
 *   nm_http_set_model   hands over the loaded model side; /health turns 200;
 *   nm_http_close_gate  stops accepting connections and new work and gives
 *                       the scheduler back for the caller to destroy, which
 *                       ends every request so blocked handlers return;
 *   nm_http_stop        waits for the connection threads and frees it all.
 *
 * Threads: libmicrohttpd runs one thread per connection, so a handler may
 * block in nm_req_wait (non-streamed answers wait in the request handler,
 * streamed ones in the response's reader callback).
 *
 * What a request must get past before anything is read or parsed, in order:
 * the connection limits (conn.h: 503 and close), strict framing (RFC 9112:
 * Content-Length and Transfer-Encoding together, Content-Length values that
 * differ or are not a number: 400; any Transfer-Encoding but a single
 * "chunked": 501; each closes the connection, since what follows can no
 * longer be framed), the browser origin (403 unless --cors-origin, or an API
 * key, allows it), the route (paths are matched byte for byte: no percent
 * decoding), the method, the API key, and the declared body size. */
#ifndef NUMOE_COORDINATOR_SERVE_HTTP_H
#define NUMOE_COORDINATOR_SERVE_HTTP_H

#include <stdint.h>

#include "common/error.h"
#include "coordinator/serve/conn.h"
#include "coordinator/serve/gen.h"
#include "coordinator/serve/scheduler.h"

typedef struct nm_http nm_http;

typedef struct {
    const char *host;       /* address or name to bind */
    int port;               /* 0: any free port (nm_http_port says which) */
    const char *api_key;    /* NULL: no authentication */
    const char *cors_origin;/* --cors-origin: "*", or origins separated by commas that browsers may call
                               from; NULL: "*" with an API key (a page cannot know the key), none
                               without one (any page a local user opens could drive the server) */
    nm_conn_limits conns;   /* connection limits and timeouts (conn.h) */
    const char *model_name; /* the served name (copied) */
    int log_requests;       /* one stderr line per request */
} nm_http_opts;

/* nm_http_model, what the generation endpoints need: coordinator/serve/gen.h;
 * borrowed until nm_http_stop. */

/* Binds host:port and starts the daemon. 0, or -1 with err ("cannot listen
 * on 127.0.0.1:10002: Address already in use"). */
int nm_http_start(nm_http **out, const nm_http_opts *o, nm_err *err);
/* The port actually bound. */
int nm_http_port(const nm_http *h);
/* The model is loaded: generation endpoints open, /health says ok. */
void nm_http_set_model(nm_http *h, const nm_http_model *m);
/* The request body limit in force (413 above it) and the prompt bound (400
 * above it before tokenizing; 0: none), both derived from the context once
 * the model is set (gen.h). */
void nm_http_limits(nm_http *h, size_t *max_body, size_t *max_prompt_bytes);
/* Stops accepting connections; requests that have not submitted yet get 503.
 * Returns the scheduler (NULL if none was set) for the caller to destroy. */
nm_sched *nm_http_close_gate(nm_http *h);
/* Ends the daemon (waits for every connection thread) and frees H. Call
 * after the scheduler is destroyed so no handler still waits on it. */
void nm_http_stop(nm_http *h);

#endif
