/* conn.c - the connection table and its watchdog (conn.h). */
#include "coordinator/serve/conn.h"

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"

#define REFUSED_IDLE_S 2.0 /* a refused connection gets its 503 on its first request: wait no longer for one */

struct nm_conn {
    int fd;
    unsigned char addr[16]; /* the client address (IPv4 as v4-mapped IPv6), for the per-client count */
    int has_addr;
    double deadline;        /* monotonic seconds; 0: none */
    int killed;             /* the watchdog shut it */
    char phase;             /* 'i' idle deadline, 'r' request deadline */
    const char *refusal;    /* NULL: served */
    char why[128];
    nm_conn *prev, *next;
};

struct nm_conn_guard {
    nm_conn_limits l;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    int stop;
    nm_conn *head;
    int64_t n_open, n_served; /* all open / those not refused */
    uint64_t refused_total, refused_client, timeouts_idle, timeouts_request;
};

static void deadline_in(struct timespec *ts, double s) {
    clock_gettime(CLOCK_MONOTONIC, ts);
    double whole = (double)(long)s;
    ts->tv_sec += (time_t)whole;
    ts->tv_nsec += (long)((s - whole) * 1e9);
    if (ts->tv_nsec >= 1000000000L) ts->tv_sec++, ts->tv_nsec -= 1000000000L;
}

static void *watchdog(void *arg) {
    nm_conn_guard *g = arg;
    pthread_mutex_lock(&g->mu);
    while (!g->stop) {
        double now = nm_now_s(), next = now + 1.0;
        for (nm_conn *c = g->head; c; c = c->next) {
            if (c->deadline <= 0 || c->killed) continue;
            if (c->deadline <= now) {
                /* shutdown, not close: the daemon still owns the descriptor
                 * and closes it once its read returns end of file */
                shutdown(c->fd, SHUT_RDWR);
                c->killed = 1;
                if (c->phase == 'r') g->timeouts_request++;
                else g->timeouts_idle++;
            } else if (c->deadline < next) {
                next = c->deadline;
            }
        }
        struct timespec ts;
        deadline_in(&ts, next - now + 0.001);
        pthread_cond_timedwait(&g->cv, &g->mu, &ts);
    }
    pthread_mutex_unlock(&g->mu);
    return NULL;
}

int nm_conn_guard_create(nm_conn_guard **out, const nm_conn_limits *l, nm_err *err) {
    *out = NULL;
    nm_conn_guard *g = calloc(1, sizeof *g);
    if (!g) return nm_errf(err, "out of memory");
    g->l = *l;
    pthread_mutex_init(&g->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&g->thread, NULL, watchdog, g)) {
        pthread_mutex_destroy(&g->mu);
        pthread_cond_destroy(&g->cv);
        free(g);
        return nm_errf(err, "cannot start the connection watchdog thread");
    }
    *out = g;
    return 0;
}

void nm_conn_guard_destroy(nm_conn_guard *g) {
    if (!g) return;
    pthread_mutex_lock(&g->mu);
    g->stop = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
    pthread_join(g->thread, NULL);
    while (g->head) {
        nm_conn *c = g->head;
        g->head = c->next;
        free(c);
    }
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
    free(g);
}

void nm_conn_hard_limits(const nm_conn_limits *l, unsigned *total, unsigned *per_ip) {
    int room = l->max_conns / 4 > 16 ? l->max_conns / 4 : 16;
    *total = (unsigned)(l->max_conns + room);
    *per_ip = (unsigned)(l->max_per_client + (room < 32 ? room : 32));
}

static void set_deadline(nm_conn_guard *g, nm_conn *c, double s, char kind) {
    c->deadline = s > 0 ? nm_now_s() + s : 0;
    c->phase = kind;
    pthread_cond_broadcast(&g->cv);
}

nm_conn *nm_conn_open(nm_conn_guard *g, int fd, const struct sockaddr *addr, socklen_t addrlen) {
    nm_conn *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->fd = fd;
    if (addr && addr->sa_family == AF_INET && addrlen >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)addr;
        c->addr[10] = c->addr[11] = 0xff;
        memcpy(c->addr + 12, &a->sin_addr, 4);
        c->has_addr = 1;
    } else if (addr && addr->sa_family == AF_INET6 && addrlen >= (socklen_t)sizeof(struct sockaddr_in6)) {
        memcpy(c->addr, &((const struct sockaddr_in6 *)addr)->sin6_addr, 16);
        c->has_addr = 1;
    }
    pthread_mutex_lock(&g->mu);
    int same = 0;
    for (nm_conn *o = g->head; o; o = o->next)
        if (!o->refusal && c->has_addr && o->has_addr && !memcmp(o->addr, c->addr, 16)) same++;
    if (g->n_served >= g->l.max_conns) {
        snprintf(c->why, sizeof c->why, "the server is serving its limit of %d connections (--max-connections)",
                 g->l.max_conns);
        c->refusal = c->why;
        g->refused_total++;
    } else if (same >= g->l.max_per_client) {
        snprintf(c->why, sizeof c->why, "this client has its limit of %d connections open (--max-connections-per-client)",
                 g->l.max_per_client);
        c->refusal = c->why;
        g->refused_client++;
    } else {
        g->n_served++;
    }
    g->n_open++;
    c->next = g->head;
    if (g->head) g->head->prev = c;
    g->head = c;
    set_deadline(g, c, c->refusal ? (g->l.idle_s > 0 && g->l.idle_s < REFUSED_IDLE_S ? g->l.idle_s : REFUSED_IDLE_S)
                                  : g->l.idle_s, 'i');
    pthread_mutex_unlock(&g->mu);
    return c;
}

void nm_conn_close(nm_conn_guard *g, nm_conn *c) {
    if (!c) return;
    pthread_mutex_lock(&g->mu);
    if (c->prev) c->prev->next = c->next;
    else g->head = c->next;
    if (c->next) c->next->prev = c->prev;
    g->n_open--;
    if (!c->refusal) g->n_served--;
    pthread_mutex_unlock(&g->mu);
    free(c);
}

const char *nm_conn_refusal(const nm_conn *c) { return c ? c->refusal : "out of memory"; }

void nm_conn_reading(nm_conn_guard *g, nm_conn *c) {
    if (!c) return;
    pthread_mutex_lock(&g->mu);
    if (!c->killed) set_deadline(g, c, c->refusal ? REFUSED_IDLE_S : g->l.request_s, 'r');
    pthread_mutex_unlock(&g->mu);
}

void nm_conn_answering(nm_conn_guard *g, nm_conn *c) {
    if (!c) return;
    pthread_mutex_lock(&g->mu);
    c->deadline = 0;
    pthread_mutex_unlock(&g->mu);
}

void nm_conn_idle(nm_conn_guard *g, nm_conn *c) {
    if (!c) return;
    pthread_mutex_lock(&g->mu);
    if (!c->killed) set_deadline(g, c, c->refusal ? REFUSED_IDLE_S : g->l.idle_s, 'i');
    pthread_mutex_unlock(&g->mu);
}

int nm_conn_metrics(nm_conn_guard *g, nm_text *o) {
    pthread_mutex_lock(&g->mu);
    int64_t open = g->n_open;
    uint64_t rt = g->refused_total, rc = g->refused_client, ti = g->timeouts_idle, tr = g->timeouts_request;
    pthread_mutex_unlock(&g->mu);
    return nm_text_printf(
               o,
               "# HELP numoe_http_connections_open HTTP connections currently open.\n"
               "# TYPE numoe_http_connections_open gauge\nnumoe_http_connections_open %lld\n"
               "# HELP numoe_http_connections_refused_total Connections answered 503 for a connection limit.\n"
               "# TYPE numoe_http_connections_refused_total counter\n"
               "numoe_http_connections_refused_total{limit=\"total\"} %llu\n"
               "numoe_http_connections_refused_total{limit=\"per_client\"} %llu\n"
               "# HELP numoe_http_connection_timeouts_total Connections closed for sending no request or too "
               "slow a one.\n"
               "# TYPE numoe_http_connection_timeouts_total counter\n"
               "numoe_http_connection_timeouts_total{phase=\"idle\"} %llu\n"
               "numoe_http_connection_timeouts_total{phase=\"request\"} %llu\n",
               (long long)open, (unsigned long long)rt, (unsigned long long)rc, (unsigned long long)ti,
               (unsigned long long)tr)
               ? -1
               : 0;
}
