/* conn.h - the connection guard of `numoe serve`: how many connections
 * are served at once (in all and per client address) and how long one may
 * take to send its request. libmicrohttpd runs a thread per connection and,
 * left alone, lets an idle socket hold its slot for ever; this module keeps
 * a table of the open connections and a watchdog thread that closes the
 * ones past their deadline.
 *
 * A connection's life, as http.c reports it:
 *   nm_conn_open       accepted (MHD_CONNECTION_NOTIFY_STARTED): counted; its
 *                      idle deadline runs (idle_s, or 2 s for one that is
 *                      over a limit and will only get a 503);
 *   nm_conn_reading    the request line came (MHD's URI log callback): the
 *                      header/body deadline (request_s) replaces it;
 *   nm_conn_answering  the whole request is in: no deadline while it is
 *                      answered (a generation may take many minutes);
 *   nm_conn_idle       its answer is done (keep-alive): idle deadline again;
 *   nm_conn_close      closed (MHD_CONNECTION_NOTIFY_CLOSED): forgotten.
 * A connection past its deadline gets shutdown(2) on its socket, which ends
 * the daemon's read and closes it the ordinary way (the table entry goes
 * before the daemon closes the descriptor, so a reused one is never hit).
 *
 * Over a limit: nm_conn_refusal says why, and http.c answers the request
 * with 503 and closes; the daemon's own hard limits sit a little above ours
 * (nm_conn_hard_limits), so a flood beyond those is closed at accept, at
 * once, instead of waiting in the listen queue.
 *
 * Threads: every function may be called from any thread. */
#ifndef NUMOE_COORDINATOR_SERVE_CONN_H
#define NUMOE_COORDINATOR_SERVE_CONN_H

#include <stdint.h>
#include <sys/socket.h>

#include "common/error.h"
#include "coordinator/text/text.h"

typedef struct {
    int max_conns;      /* connections served at once (--max-connections) */
    int max_per_client; /* of them from one client address (--max-connections-per-client) */
    double idle_s;      /* open or answered, no request line yet (--idle-timeout); 0: no limit */
    double request_s;   /* request line to the end of the body (--request-timeout); 0: no limit */
} nm_conn_limits;

typedef struct nm_conn nm_conn;
typedef struct nm_conn_guard nm_conn_guard;

/* Starts the watchdog. 0, or -1 with err. */
int nm_conn_guard_create(nm_conn_guard **out, const nm_conn_limits *l, nm_err *err);
/* Stops the watchdog; call after the daemon has closed every connection. */
void nm_conn_guard_destroy(nm_conn_guard *g);
/* The daemon's own limits: a little above ours, so that ours answer 503. */
void nm_conn_hard_limits(const nm_conn_limits *l, unsigned *total, unsigned *per_ip);

/* A new connection on socket fd from addr (may be NULL). NULL when out of
 * memory: the caller treats that as a refusal. */
nm_conn *nm_conn_open(nm_conn_guard *g, int fd, const struct sockaddr *addr, socklen_t addrlen);
void nm_conn_close(nm_conn_guard *g, nm_conn *c);
/* NULL when C is served; else why it is refused ("the server has 256
 * connections open (--max-connections)"). */
const char *nm_conn_refusal(const nm_conn *c);
void nm_conn_reading(nm_conn_guard *g, nm_conn *c);
void nm_conn_answering(nm_conn_guard *g, nm_conn *c);
void nm_conn_idle(nm_conn_guard *g, nm_conn *c);

/* Prometheus text: open connections, refusals and timeouts. 0, or -1. */
int nm_conn_metrics(nm_conn_guard *g, nm_text *o);

#endif
