/* experts_remote.c - the expert backend of `--workers N`: routed experts live
 * in N numoe-worker processes (worker/), each holding its placement's share
 * exactly once, reached through a shared-memory slot per worker
 * (proto/shm_slot.h) and a ZeroMQ ROUTER socket for the control messages
 * (proto/numoe.proto).
 *
 * Per MoE layer: copy x / ids / w into every worker's slot and ring its
 * doorbell right away (so worker 0 computes while worker 1's slot is being
 * filled), wait for all of them, then sum the partial outputs in worker
 * order 0, 1, ..., N-1 (fixed, so results are deterministic). A worker that
 * reports an error fails the call with a message naming it; the backend then
 * refuses further calls.
 *
 * The workers are started, bound and restarted by the launcher (the `numoe`
 * process, launch/launcher.h), which names the endpoint to bind and the
 * worker count in NUMOE_LAUNCH_ENDPOINT / NUMOE_LAUNCH_WORKERS. Each worker
 * registers; the coordinator checks protocol version, model identity and
 * placement, creates the worker's slot (/dev/shm/numoe-<launcher pid>-w<id>-
 * <random>) and names it in RegisterReply; the worker maps it, unlinks the
 * name and confirms with a Heartbeat. destroy sends Shutdown; the launcher
 * reaps the processes and removes what is left in /dev/shm.
 *
 * Failures (doorbell hand-off): the coordinator watches each registered
 * worker through a pidfd. A worker that dies while it owes an answer, or
 * does not answer within the timeout (the coordinator kills it), is
 * restarted by the launcher; the layer in flight waits here. Once the new
 * process has registered and mapped its new slot, the inputs (still in the
 * caller's buffers) are copied in again and its doorbell rung; the other
 * workers' answers stay in their slots. So no request fails and the sums are
 * the same. "worker I restarted in X ms (attempt k, pid P)" goes to stderr.
 * If the launcher gives up on the worker it says so with an Error
 * (from_launcher) on the control socket, and the layer fails with that
 * reason. A restart is quick because the shard outlives the worker
 * (worker/shard.h): the new process re-maps it read-only.
 *
 * Workers started by hand (--worker-endpoints tcp://h1:p1,...; worker i is
 * the i-th endpoint, started as `numoe-worker --worker-id i --listen ...`):
 * nothing is launched. Each endpoint gets its own DEALER socket (connected;
 * the worker binds a ROUTER) and a socket monitor; the coordinator sends a
 * Heartbeat as hello, the worker answers with its Register, which is checked
 * as above (plus: its worker id is the endpoint's position). Per layer the
 * MoeRequest carries x / ids / weights and the MoeReply the partial output
 * (HANDOFF_INLINE); the sum is again in worker order. No shm, and no
 * supervision: a worker whose connection drops (monitor: DISCONNECTED) or
 * that does not answer in time fails the call with its endpoint named. An
 * endpoint nothing accepts a connection on within
 * NUMOE_WORKER_CONNECT_TIMEOUT_S (default 10 s) is an error.
 *
 * Later (not here yet): restarts in the ZeroMQ hand-off mode (there a dead
 * worker still fails the call), one shared input region instead of a copy
 * per worker, and a submit/wait split so the shared experts overlap the
 * routed ones. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "common/clock.h"
#include "coordinator/experts/remote.h"
#include "model/identity.h"
#include "proto/shm_slot.h"
#include "proto/wire.h"
#include "proto/wire_key.h"
#include "model/placement.h"

#define SPIN_US_DEFAULT 250
#define START_TIMEOUT_S 600.0 /* copying a shard of a big model out of the page cache takes a while */

typedef struct {
    int id;
    pid_t pid;             /* as registered */
    int pidfd;             /* readable once that process has ended; -1: none */
    int gone;
    nm_routing_id rid;
    int registered, attached;
    char shm_name[96];
    nm_slot slot;
    uint64_t shard_bytes;
    int node, threads, cpus;
    unsigned req;
    unsigned attempt;      /* its restarts before this start (Register.attempt) */
    double t_posted;       /* when its current request was handed to it */
    /* --worker-endpoints */
    char ep[256];
    void *dsock, *mon;
    int connected, lost;
    int handshake_failed;  /* the ZMQ_EVENT_HANDSHAKE_FAILED_* seen, 0: none */
    unsigned generation;   /* sockets opened so far (names each one's monitor) */
    char host[64];
    uint64_t rpid;
} rworker;

typedef struct {
    uint64_t file_bytes, header_hash, placement_hash;
    int placement;
} expect_t;

typedef struct {
    nm_expert_backend base;
    const nm_model *m;
    int n;
    rworker *w;
    void *zctx, *sock;
    int run_id;            /* the launcher's pid: prefix of every shm name of the run */
    int handoff, spin_us;
    double timeout_s;
    int64_t max_tok, n_embd;
    int max_k;
    int broken;
    char broken_msg[sizeof(nm_err)];
    uint64_t seq;
    expect_t ex;
    int tcp;               /* --worker-endpoints */
    int keyed;             /* --worker-key: CURVE */
    nm_wire_key key;
} remote_backend;

static double start_limit(void) {
    const char *tmo = getenv("NUMOE_WORKER_START_TIMEOUT_S");
    return tmo && atof(tmo) > 0 ? atof(tmo) : START_TIMEOUT_S;
}

/* Whether w's registered process has ended (not our child: a pidfd tells). */
static int check_gone(rworker *w) {
    if (!w->registered || w->gone) return w->gone;
    if (w->pidfd >= 0) {
        struct pollfd p = {w->pidfd, POLLIN, 0};
        w->gone = poll(&p, 1, 0) > 0;
    } else {
        w->gone = kill(w->pid, 0) && errno == ESRCH;
    }
    return w->gone;
}

/* Drops what we know of w's process (it died; a new one will register). */
static void forget(rworker *w) {
    nm_slot_unmap(&w->slot);
    if (w->shm_name[0]) shm_unlink(w->shm_name); /* normally gone already (the worker unlinks it) */
    w->shm_name[0] = 0;
    if (w->pidfd >= 0) close(w->pidfd);
    w->pidfd = -1;
    w->registered = w->attached = w->gone = 0;
    w->req = 0;
}

static rworker *by_rid(remote_backend *rb, const nm_routing_id *rid) {
    for (int i = 0; i < rb->n; i++)
        if (rb->w[i].registered && rb->w[i].rid.len == rid->len && !memcmp(rb->w[i].rid.id, rid->id, rid->len))
            return &rb->w[i];
    return NULL;
}

static int send_to(remote_backend *rb, const nm_routing_id *rid, Numoe__Envelope *env, nm_err *err) {
    return nm_wire_send(rb->sock, rid, env, err);
}

static void remote_destroy(nm_expert_backend *b) {
    remote_backend *rb = (remote_backend *)b;
    /* Shutdown on the socket, and the doorbell so a sleeping worker reads it
     * now; the launcher reaps them (and kills what does not follow) */
    for (int i = 0; i < rb->n && !rb->tcp; i++) {
        rworker *w = &rb->w[i];
        if (w->registered && !check_gone(w)) {
            Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
            Numoe__Shutdown sd = NUMOE__SHUTDOWN__INIT;
            sd.reason = "coordinator exiting";
            env.msg_case = NUMOE__ENVELOPE__MSG_SHUTDOWN, env.shutdown = &sd;
            send_to(rb, &w->rid, &env, NULL);
            if (w->attached && atomic_load(&w->slot.h->done.seq) == w->req) {
                w->slot.h->op = NM_SLOT_OP_CONTROL;
                nm_doorbell_ring(&w->slot.h->req, ++w->req);
            } else if (w->attached) {
                kill(w->pid, SIGTERM); /* stuck in a request we gave up on */
            }
        }
        forget(w);
    }
    for (int i = 0; rb->tcp && i < rb->n; i++) {
        rworker *w = &rb->w[i];
        if (w->dsock && w->registered && !w->lost) {
            int linger = 500; /* let the Shutdown go out */
            zmq_setsockopt(w->dsock, ZMQ_LINGER, &linger, sizeof linger);
            Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
            Numoe__Shutdown sd = NUMOE__SHUTDOWN__INIT;
            sd.reason = "coordinator exiting";
            env.msg_case = NUMOE__ENVELOPE__MSG_SHUTDOWN, env.shutdown = &sd;
            nm_wire_send(w->dsock, NULL, &env, NULL);
        }
        if (w->mon) zmq_close(w->mon);
        if (w->dsock) zmq_close(w->dsock);
    }
    memset(&rb->key, 0, sizeof rb->key);
    if (rb->sock) {
        int linger = 500; /* the Shutdowns */
        zmq_setsockopt(rb->sock, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(rb->sock);
    }
    if (rb->zctx) zmq_ctx_term(rb->zctx);
    free(rb->w);
    free(rb);
}

static int refuse(remote_backend *rb, const nm_routing_id *rid, const char *reason) {
    Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
    Numoe__RegisterReply rr = NUMOE__REGISTER_REPLY__INIT;
    rr.accepted = 0;
    rr.reason = (char *)reason;
    rr.protocol_version = NM_PROTOCOL_VERSION;
    env.msg_case = NUMOE__ENVELOPE__MSG_REGISTER_REPLY, env.register_reply = &rr;
    return send_to(rb, rid, &env, NULL);
}

/* Why a Register does not fit (reason[0] == 0: it does). */
static void register_reason(remote_backend *rb, const Numoe__Register *r, const expect_t *ex, char *reason,
                            size_t rlen) {
    reason[0] = 0;
    const Numoe__ModelIdentity *mi = r->model;
    if (r->protocol_version != NM_PROTOCOL_VERSION)
        snprintf(reason, rlen,
                 "worker %u speaks numoe protocol version %u, this coordinator speaks version %u; run a numoe and "
                 "numoe-worker built from the same tree (worker build: %s)",
                 r->worker_id, r->protocol_version, NM_PROTOCOL_VERSION, r->build_id);
    else if (r->worker_id >= (uint32_t)rb->n || r->n_workers != (uint32_t)rb->n)
        snprintf(reason, rlen, "worker %u of %u does not fit this coordinator's %d workers", r->worker_id,
                 r->n_workers, rb->n);
    else if (rb->w[r->worker_id].registered && !check_gone(&rb->w[r->worker_id]))
        snprintf(reason, rlen, "worker id %u registered twice (pid %d holds it)", r->worker_id,
                 rb->w[r->worker_id].pid);
    else if (!mi || mi->file_bytes != ex->file_bytes || mi->header_hash != ex->header_hash)
        snprintf(reason, rlen,
                 "worker %u opened a different model (%llu bytes, identity %016llx) than the coordinator (%llu bytes, "
                 "identity %016llx)",
                 r->worker_id, mi ? (unsigned long long)mi->file_bytes : 0ull,
                 mi ? (unsigned long long)mi->header_hash : 0ull, (unsigned long long)ex->file_bytes,
                 (unsigned long long)ex->header_hash);
    else if ((int)r->placement != ex->placement)
        snprintf(reason, rlen, "worker %u uses placement kind %d, the coordinator asked for %d", r->worker_id,
                 (int)r->placement, ex->placement);
    else if (r->placement_hash != ex->placement_hash)
        snprintf(reason, rlen,
                 "worker %u computed a different placement map (hash %016llx, coordinator %016llx)", r->worker_id,
                 (unsigned long long)r->placement_hash, (unsigned long long)ex->placement_hash);
}

/* Checks one Register; on success creates the worker's slot and accepts it.
 * A Register whose sender has died since (a queued leftover of a process the
 * launcher already replaced) is dropped. */
static int on_register(remote_backend *rb, const nm_routing_id *rid, const Numoe__Register *r, nm_err *err) {
    char reason[700];
    register_reason(rb, r, &rb->ex, reason, sizeof reason);
    if (reason[0]) {
        refuse(rb, rid, reason);
        return nm_errf(err, "%s", reason);
    }
    int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)r->pid, 0);
    if (pidfd < 0 && errno == ESRCH) return 0;
    if (strcmp(r->build_id, nm_build_id()))
        fprintf(stderr, "numoe: note: worker %u was built differently (%s; coordinator: %s)\n", r->worker_id,
                r->build_id, nm_build_id());
    rworker *w = &rb->w[r->worker_id];
    if (w->registered) forget(w); /* the process before it, dead (register_reason checked) */
    w->rid = *rid;
    w->registered = 1;
    w->pid = (pid_t)r->pid, w->pidfd = pidfd, w->attempt = r->attempt;
    w->shard_bytes = r->shard_bytes;
    w->node = r->node, w->threads = (int)r->threads, w->cpus = (int)r->cores;
    uint32_t rnd = 0;
    if (getrandom(&rnd, sizeof rnd, GRND_NONBLOCK) != sizeof rnd) rnd = (uint32_t)nm_now_ns();
    snprintf(w->shm_name, sizeof w->shm_name, "/numoe-%d-w%d-%08x", rb->run_id, w->id, rnd);
    if (nm_slot_create(&w->slot, w->shm_name, (uint32_t)w->id, rb->n_embd, rb->max_tok, rb->max_k, err)) {
        w->shm_name[0] = 0;
        refuse(rb, rid, err->msg);
        forget(w);
        return nm_err_prefix(err, "worker %d", w->id);
    }
    Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
    Numoe__RegisterReply rr = NUMOE__REGISTER_REPLY__INIT;
    rr.accepted = 1;
    rr.reason = "";
    rr.protocol_version = NM_PROTOCOL_VERSION;
    rr.slot_name = w->shm_name;
    rr.slot_bytes = w->slot.bytes;
    rr.handoff = (Numoe__Handoff)rb->handoff;
    rr.spin_us = (uint32_t)rb->spin_us;
    env.msg_case = NUMOE__ENVELOPE__MSG_REGISTER_REPLY, env.register_reply = &rr;
    if (send_to(rb, rid, &env, NULL)) forget(w); /* it is gone already: its successor will register */
    return 0;
}

/* Reads control messages for up to timeout_ms and handles Register /
 * Heartbeat; a worker that died before it attached is forgotten (the
 * launcher starts another). Errors: the launcher giving a worker up always;
 * a worker's own Error only when fatal_worker_errors (at start-up: a
 * configuration error fails fast; during a restart the launcher decides). */
static int control_step(remote_backend *rb, int timeout_ms, int fatal_worker_errors, nm_err *err) {
    for (int i = 0; i < rb->n; i++)
        if (rb->w[i].registered && !rb->w[i].attached && check_gone(&rb->w[i])) forget(&rb->w[i]);
    Numoe__Envelope *env;
    nm_routing_id rid;
    int r = nm_wire_recv(rb->sock, timeout_ms, &rid, &env, err);
    if (r) return r < 0 ? -1 : 0;
    int rc = 0;
    switch (env->msg_case) {
    case NUMOE__ENVELOPE__MSG_REGISTER: rc = on_register(rb, &rid, env->register_, err); break;
    case NUMOE__ENVELOPE__MSG_ERROR:
        if (env->error->from_launcher) rc = nm_errf(err, "%s", env->error->message);
        else if (fatal_worker_errors) rc = nm_errf(err, "worker %u: %s", env->error->worker_id, env->error->message);
        else fprintf(stderr, "numoe: worker %u: %s\n", env->error->worker_id, env->error->message);
        break;
    case NUMOE__ENVELOPE__MSG_HEARTBEAT: {
        rworker *w = by_rid(rb, &rid);
        if (w && env->heartbeat->slot_bytes == w->slot.bytes) w->attached = 1;
        break;
    }
    default: break; /* a leftover of a worker that died */
    }
    numoe__envelope__free_unpacked(env, NULL);
    return rc;
}

/* Waits until every worker registered and mapped its slot. */
static int await_workers(remote_backend *rb, nm_err *err) {
    double t0 = nm_now_s(), limit = start_limit();
    for (;;) {
        int ready = 0;
        for (int i = 0; i < rb->n; i++) ready += rb->w[i].attached;
        if (ready == rb->n) return 0;
        if (control_step(rb, 100, 1, err)) return -1;
        if (nm_now_s() - t0 > limit)
            return nm_errf(err, "workers did not all register within %.0f s (set NUMOE_WORKER_START_TIMEOUT_S)", limit);
    }
}

static int fail_backend(remote_backend *rb, nm_err *err) {
    rb->broken = 1;
    snprintf(rb->broken_msg, sizeof rb->broken_msg, "%s", err->msg);
    return -1;
}

/* Worker w failed (why): waits for the launcher's new process to register
 * and map its slot. t0: when w was handed the request it did not answer, so
 * the time printed is what the failure cost that request (noticing it,
 * back-off, restart, re-mapping the shard). */
static int await_restart(remote_backend *rb, rworker *w, const nm_err *why, double t0, nm_err *err) {
    if (!check_gone(w)) kill(w->pid, SIGKILL); /* hung: the launcher restarts what dies */
    forget(w);
    double limit = start_limit();
    while (!w->attached) {
        nm_err e;
        if (control_step(rb, 10, 0, &e)) return nm_errf(err, "%s; %s", why->msg, e.msg);
        if (nm_now_s() - t0 > limit)
            return nm_errf(err, "%s; no new worker %d registered within %.0f s (NUMOE_WORKER_START_TIMEOUT_S)",
                           why->msg, w->id, limit);
    }
    fprintf(stderr, "numoe: worker %d restarted in %.1f ms (attempt %u, pid %d)\n", w->id, (nm_now_s() - t0) * 1e3,
            w->attempt, (int)w->pid);
    return 0;
}

/* What is in flight: enough to hand the request to a restarted worker again. */
typedef struct {
    int layer, k;
    int64_t n_tok;
    const float *x, *wt;
    const int32_t *ids;
    uint64_t seq;
} inflight;

/* Copies the request into w's slot and rings its doorbell. */
static void post(remote_backend *rb, rworker *w, const inflight *q) {
    nm_slot_header *h = w->slot.h;
    if (q->n_tok) {
        size_t xb = (size_t)(q->n_tok * rb->n_embd) * sizeof(float), kb = (size_t)(q->n_tok * q->k) * sizeof(int32_t);
        memcpy(w->slot.x, q->x, xb);
        memcpy(w->slot.ids, q->ids, kb);
        memcpy(w->slot.w, q->wt, kb);
    }
    h->op = q->layer < 0 ? NM_SLOT_OP_PING : NM_SLOT_OP_MOE;
    h->layer = (uint32_t)q->layer, h->n_tok = q->n_tok, h->k = q->k, h->seq = q->seq;
    w->t_posted = nm_now_s();
    nm_doorbell_ring(&h->req, ++w->req);
}

/* Waits for worker w's answer to request number w->req (doorbell); a worker
 * that dies or times out is restarted (by the launcher) and given the
 * request again. */
static int await_doorbell(remote_backend *rb, rworker *w, const inflight *q, nm_err *err) {
    int layer = q->layer;
    for (;;) {
        nm_slot_header *h = w->slot.h;
        unsigned old = w->req - 1;
        double t0 = nm_now_s();
        int64_t spin = (int64_t)rb->spin_us * 1000;
        nm_err why;
        int failed = 0;
        /* after the spin, wake every 10 ms to see whether it is still alive */
        while (nm_doorbell_wait(&h->done, old, spin, 10 * 1000000LL)) {
            spin = 0;
            if (check_gone(w)) {
                nm_errf(&why, "worker %d (pid %d) died while computing layer %d", w->id, (int)w->pid, layer);
                failed = 1;
                break;
            }
            if (nm_now_s() - t0 > rb->timeout_s) {
                nm_errf(&why, "worker %d (pid %d) did not answer layer %d within %.0f s (--worker-timeout)", w->id,
                        (int)w->pid, layer, rb->timeout_s);
                failed = 1;
                break;
            }
        }
        if (!failed) break;
        if (await_restart(rb, w, &why, w->t_posted, err)) return -1;
        post(rb, w, q);
    }
    if (atomic_load_explicit(&w->slot.h->done.seq, memory_order_acquire) != w->req)
        return nm_errf(err, "worker %d (pid %d) answered request %u while %u was expected", w->id, (int)w->pid,
                       atomic_load(&w->slot.h->done.seq), w->req);
    nm_slot_header *h = w->slot.h;
    if (h->status) {
        char msg[NM_SLOT_ERROR_LEN + 1];
        memcpy(msg, h->error, NM_SLOT_ERROR_LEN);
        msg[NM_SLOT_ERROR_LEN] = 0;
        return nm_errf(err, "worker %d (pid %d) failed layer %d: %s", w->id, (int)w->pid, layer, msg);
    }
    return 0;
}

/* Sends a MoeRequest to every worker and collects the replies (ZeroMQ hand-off). */
static int zmq_round(remote_backend *rb, int layer, int64_t n_tok, int k, nm_err *err) {
    uint64_t seq = ++rb->seq;
    for (int i = 0; i < rb->n; i++) {
        Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
        Numoe__MoeRequest rq = NUMOE__MOE_REQUEST__INIT;
        rq.seq = seq, rq.layer = (uint32_t)layer, rq.n_tok = (uint32_t)n_tok, rq.k = (uint32_t)k;
        env.msg_case = NUMOE__ENVELOPE__MSG_MOE_REQUEST, env.moe_request = &rq;
        if (send_to(rb, &rb->w[i].rid, &env, err)) return nm_err_prefix(err, "worker %d", i);
    }
    int got = 0;
    uint8_t *seen = calloc((size_t)rb->n, 1);
    if (!seen) return nm_errf(err, "out of memory");
    double t0 = nm_now_s();
    int rc = 0;
    while (got < rb->n && !rc) {
        Numoe__Envelope *env;
        nm_routing_id rid;
        int r = nm_wire_recv(rb->sock, 50, &rid, &env, err);
        if (r < 0) {
            rc = -1;
            break;
        }
        if (r == 1) {
            for (int i = 0; i < rb->n && !rc; i++)
                if (!seen[i] && check_gone(&rb->w[i]))
                    rc = nm_errf(err, "worker %d (pid %d) died while computing layer %d (the ZeroMQ hand-off does "
                                 "not restart workers)", i, (int)rb->w[i].pid, layer);
            if (!rc && nm_now_s() - t0 > rb->timeout_s)
                for (int i = 0; i < rb->n && !rc; i++)
                    if (!seen[i])
                        rc = nm_errf(err, "worker %d (pid %d) did not answer layer %d within %.0f s (--worker-timeout)",
                                     i, (int)rb->w[i].pid, layer, rb->timeout_s);
            continue;
        }
        rworker *w = by_rid(rb, &rid);
        if (w && env->msg_case == NUMOE__ENVELOPE__MSG_MOE_REPLY && env->moe_reply->seq == seq && !seen[w->id]) {
            seen[w->id] = 1, got++;
            if (env->moe_reply->status != NUMOE__STATUS__STATUS_OK)
                rc = nm_errf(err, "worker %d (pid %d) failed layer %d: %s", w->id, (int)w->pid, layer,
                             env->moe_reply->error);
        } else if (env->msg_case == NUMOE__ENVELOPE__MSG_ERROR) {
            rc = env->error->from_launcher ? nm_errf(err, "%s", env->error->message)
                                           : nm_errf(err, "worker %u: %s", env->error->worker_id, env->error->message);
        }
        numoe__envelope__free_unpacked(env, NULL);
    }
    free(seen);
    return rc;
}

/* --- workers started by hand (--worker-endpoints): inline data over tcp --- */

/* Reads what w's socket monitor saw (connected / disconnected). */
static void drain_monitor(rworker *w) {
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, w->mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        uint16_t ev = 0;
        if (zmq_msg_size(&m) >= 2) memcpy(&ev, zmq_msg_data(&m), 2);
        int more = zmq_msg_more(&m);
        zmq_msg_close(&m);
        if (more) { /* the endpoint frame */
            zmq_msg_init(&m);
            zmq_msg_recv(&m, w->mon, 0);
            zmq_msg_close(&m);
        }
        if (ev == ZMQ_EVENT_CONNECTED) w->connected = 1;
        if (ev == ZMQ_EVENT_DISCONNECTED) w->lost = 1;
        if (ev & (ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                  ZMQ_EVENT_HANDSHAKE_FAILED_AUTH))
            w->handshake_failed = ev;
    }
}

static double env_seconds(const char *name, double dflt) {
    const char *v = getenv(name);
    return v && atof(v) > 0 ? atof(v) : dflt;
}

/* A fresh DEALER for w (nothing of an earlier connection stays queued in
 * it), with a monitor, connected, and the hello sent. */
static int tcp_open(remote_backend *rb, rworker *w, nm_err *err) {
    if (w->mon) zmq_close(w->mon);
    if (w->dsock) zmq_close(w->dsock);
    w->mon = w->dsock = NULL;
    w->connected = w->lost = w->registered = w->attached = w->handshake_failed = 0;
    char mon[64];
    snprintf(mon, sizeof mon, "inproc://numoe-monitor-%d-%u", w->id, w->generation++);
    int zero = 0, sndtimeo = 5000;
    if (!(w->dsock = zmq_socket(rb->zctx, ZMQ_DEALER)) || zmq_setsockopt(w->dsock, ZMQ_LINGER, &zero, sizeof zero) ||
        zmq_setsockopt(w->dsock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo) ||
        zmq_socket_monitor(w->dsock, mon, ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED |
                                               ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                                               ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) ||
        !(w->mon = zmq_socket(rb->zctx, ZMQ_PAIR)) || zmq_connect(w->mon, mon))
        return nm_errf(err, "worker %d: cannot connect to %s: %s", w->id, w->ep, zmq_strerror(zmq_errno()));
    if (rb->keyed && nm_wire_key_client(w->dsock, &rb->key, err)) return nm_err_prefix(err, "worker %d", w->id);
    if (zmq_connect(w->dsock, w->ep))
        return nm_errf(err, "worker %d: cannot connect to %s: %s", w->id, w->ep, zmq_strerror(zmq_errno()));
    Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
    Numoe__Heartbeat hb = NUMOE__HEARTBEAT__INIT;
    hb.time_ns = (uint64_t)nm_now_ns();
    env.msg_case = NUMOE__ENVELOPE__MSG_HEARTBEAT, env.heartbeat = &hb;
    if (nm_wire_send(w->dsock, NULL, &env, err)) return nm_err_prefix(err, "worker %d at %s", w->id, w->ep);
    return 0;
}

/* Checks w's Register (its answer to the hello) and replies. */
static int tcp_on_register(remote_backend *rb, rworker *w, const Numoe__Register *r, nm_err *err) {
    char reason[800];
    if (r->protocol_version == NM_PROTOCOL_VERSION && r->n_workers == (uint32_t)rb->n && r->worker_id != (uint32_t)w->id)
        snprintf(reason, sizeof reason, "the worker at %s is worker %u of %u, but it is endpoint %d of "
                 "--worker-endpoints (worker i must be the i-th endpoint)", w->ep, r->worker_id, r->n_workers, w->id);
    else
        register_reason(rb, r, &rb->ex, reason, sizeof reason);
    Numoe__Envelope out = NUMOE__ENVELOPE__INIT;
    Numoe__RegisterReply rr = NUMOE__REGISTER_REPLY__INIT;
    rr.accepted = !reason[0];
    rr.reason = reason;
    rr.protocol_version = NM_PROTOCOL_VERSION;
    rr.handoff = NUMOE__HANDOFF__HANDOFF_INLINE;
    out.msg_case = NUMOE__ENVELOPE__MSG_REGISTER_REPLY, out.register_reply = &rr;
    nm_wire_send(w->dsock, NULL, &out, NULL);
    if (reason[0]) return nm_errf(err, "worker at %s refused: %s", w->ep, reason);
    if (strcmp(r->build_id, nm_build_id()))
        fprintf(stderr, "numoe: note: worker %d at %s was built differently (%s; coordinator: %s)\n", w->id, w->ep,
                r->build_id, nm_build_id());
    w->registered = w->attached = 1;
    w->shard_bytes = r->shard_bytes;
    w->node = r->node, w->threads = (int)r->threads, w->cpus = (int)r->cores;
    w->rpid = r->pid;
    snprintf(w->host, sizeof w->host, "%s", r->host);
    return 0;
}

/* Waits until worker `only` (or every worker: -1) has registered. climit:
 * how long an endpoint may go without accepting a connection; slimit: how
 * long registering may take in all. */
static int tcp_await(remote_backend *rb, int only, double climit, double slimit, nm_err *err) {
    double t0 = nm_now_s();
    int lo = only < 0 ? 0 : only, hi = only < 0 ? rb->n : only + 1, m = hi - lo;
    zmq_pollitem_t *it = calloc((size_t)m, sizeof *it);
    if (!it) return nm_errf(err, "out of memory");
    int rc = 0;
    for (;;) {
        int ready = 0;
        for (int i = lo; i < hi; i++) ready += rb->w[i].registered;
        if (ready == m) break;
        for (int i = lo; i < hi; i++) it[i - lo] = (zmq_pollitem_t){rb->w[i].dsock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(it, m, 50) < 0 && zmq_errno() != EINTR) {
            rc = nm_errf(err, "waiting for the workers: %s", zmq_strerror(zmq_errno()));
            break;
        }
        double t = nm_now_s() - t0;
        for (int i = lo; i < hi && !rc; i++) {
            rworker *w = &rb->w[i];
            drain_monitor(w);
            if (w->registered) continue;
            if (w->handshake_failed)
                rc = nm_errf(err, "worker %d at %s: the %s handshake failed (%s): both sides need the same key file "
                             "(--worker-key here, --key on the worker) or neither", i, w->ep,
                             rb->keyed ? "CURVE" : "ZeroMQ",
                             w->handshake_failed == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH ? "the worker refused our key"
                             : w->handshake_failed == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL ? "security mechanisms differ"
                                                                                          : "no detail");
            else if (!w->connected && t > climit)
                rc = nm_errf(err, "worker %d: nothing accepted a connection at %s within %.0f s; start `numoe-worker "
                             "--worker-id %d --workers %d ... --listen %s` there first (or set "
                             "NUMOE_WORKER_CONNECT_TIMEOUT_S)", i, w->ep, climit, i, rb->n, w->ep);
            else if (w->lost && only < 0)
                rc = nm_errf(err, "lost the connection to worker %d at %s before it registered", i, w->ep);
            else if (w->lost) /* came and went while restarting: a new socket, a new hello */
                rc = tcp_open(rb, w, err);
            else if (t > slimit)
                rc = nm_errf(err, "worker %d at %s did not register within %.0f s (set NUMOE_WORKER_START_TIMEOUT_S)",
                             i, w->ep, slimit);
            while (!rc && !w->registered) {
                Numoe__Envelope *env;
                if (nm_wire_recv(w->dsock, 0, NULL, &env, NULL)) break;
                if (env->msg_case == NUMOE__ENVELOPE__MSG_REGISTER) rc = tcp_on_register(rb, w, env->register_, err);
                else if (env->msg_case == NUMOE__ENVELOPE__MSG_ERROR)
                    rc = nm_errf(err, "worker %d at %s: %s", i, w->ep, env->error->message);
                numoe__envelope__free_unpacked(env, NULL);
            }
        }
        if (rc) break;
    }
    free(it);
    return rc;
}

/* Connects to every endpoint, says hello, checks the Registers. */
static int tcp_connect_all(remote_backend *rb, nm_err *err) {
    for (int i = 0; i < rb->n; i++)
        if (tcp_open(rb, &rb->w[i], err)) return -1;
    return tcp_await(rb, -1, env_seconds("NUMOE_WORKER_CONNECT_TIMEOUT_S", 10.0),
                     env_seconds("NUMOE_WORKER_START_TIMEOUT_S", START_TIMEOUT_S), err);
}

/* Worker w's connection dropped or it did not answer (why): nobody here can
 * restart it, but whoever runs it (systemd, a user) may. A new connection
 * is opened and, once a worker at that endpoint has registered and passed
 * the same checks, the caller sends it the layer again. Up to
 * NUMOE_WORKER_RECONNECT_S (default 60 s; 0 = fail at once). */
static int tcp_reconnect(remote_backend *rb, rworker *w, const char *why, nm_err *err) {
    const char *v = getenv("NUMOE_WORKER_RECONNECT_S");
    double limit = v && *v ? atof(v) : 60.0;
    if (limit <= 0) return nm_errf(err, "%s (NUMOE_WORKER_RECONNECT_S=0: not waiting for it)", why);
    fprintf(stderr, "numoe: %s; waiting up to %.0f s for a worker at %s to come back (NUMOE_WORKER_RECONNECT_S)\n",
            why, limit, w->ep);
    double t0 = nm_now_s();
    nm_err e;
    if (tcp_open(rb, w, &e) || tcp_await(rb, w->id, limit, limit, &e))
        return nm_errf(err, "%s; it did not come back: %s", why, e.msg);
    fprintf(stderr, "numoe: worker %d at %s is back after %.1f ms (host %s, pid %llu)\n", w->id, w->ep,
            (nm_now_s() - t0) * 1e3, w->host, (unsigned long long)w->rpid);
    return 0;
}

static int tcp_send_request(remote_backend *rb, rworker *w, const Numoe__MoeRequest *rq, nm_err *err) {
    (void)rb;
    Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
    env.msg_case = NUMOE__ENVELOPE__MSG_MOE_REQUEST, env.moe_request = (Numoe__MoeRequest *)rq;
    if (nm_wire_send(w->dsock, NULL, &env, err)) return nm_err_prefix(err, "worker %d at %s", w->id, w->ep);
    return 0;
}

/* One chunk over tcp: the data goes out in every MoeRequest, the partial
 * sums come back in the MoeReplies and are added in worker order. A worker
 * lost on the way is waited for (tcp_reconnect) and sent the chunk again. */
static int inline_round(remote_backend *rb, int layer, int64_t n_tok, const float *x, int k, const int32_t *ids,
                        const float *wt, float *out, nm_err *err) {
    const int64_t H = rb->n_embd;
    size_t xb = (size_t)(n_tok * H) * sizeof(float), kb = (size_t)(n_tok * k) * sizeof(int32_t);
    Numoe__MoeRequest rq = NUMOE__MOE_REQUEST__INIT;
    rq.seq = ++rb->seq, rq.layer = layer < 0 ? UINT32_MAX : (uint32_t)layer, rq.n_tok = (uint32_t)n_tok,
    rq.k = (uint32_t)k;
    rq.x.data = (uint8_t *)x, rq.x.len = xb;
    rq.ids.data = (uint8_t *)ids, rq.ids.len = kb;
    rq.weights.data = (uint8_t *)wt, rq.weights.len = kb;
    char why[600];
    for (int i = 0; i < rb->n; i++) {
        rworker *w = &rb->w[i];
        drain_monitor(w);
        if (w->lost) {
            snprintf(why, sizeof why, "lost the connection to worker %d at %s before layer %d", i, w->ep, layer);
            if (tcp_reconnect(rb, w, why, err)) return -1;
        }
        if (tcp_send_request(rb, w, &rq, err)) return -1;
    }
    Numoe__Envelope **rep = calloc((size_t)rb->n, sizeof *rep);
    zmq_pollitem_t *it = calloc((size_t)rb->n, sizeof *it);
    double *t0 = calloc((size_t)rb->n, sizeof *t0);
    if (!rep || !it || !t0) {
        free(rep), free(it), free(t0);
        return nm_errf(err, "out of memory");
    }
    for (int i = 0; i < rb->n; i++) t0[i] = nm_now_s();
    int got = 0, rc = 0;
    while (got < rb->n && !rc) {
        for (int i = 0; i < rb->n; i++) it[i] = (zmq_pollitem_t){rb->w[i].dsock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(it, rb->n, 50) < 0 && zmq_errno() != EINTR) {
            rc = nm_errf(err, "waiting for the workers: %s", zmq_strerror(zmq_errno()));
            break;
        }
        for (int i = 0; i < rb->n && !rc; i++) {
            rworker *w = &rb->w[i];
            Numoe__Envelope *env;
            while (!rep[i] && !rc && nm_wire_recv(w->dsock, 0, NULL, &env, NULL) == 0) {
                const Numoe__MoeReply *r = env->moe_reply;
                if (env->msg_case == NUMOE__ENVELOPE__MSG_MOE_REPLY && r->seq == rq.seq) {
                    if (r->status != NUMOE__STATUS__STATUS_OK)
                        rc = nm_errf(err, "worker %d at %s failed layer %d: %s", i, w->ep, layer, r->error);
                    else if (r->out.len != xb)
                        rc = nm_errf(err, "worker %d at %s answered layer %d with %zu bytes, %zu expected", i, w->ep,
                                     layer, r->out.len, xb);
                    else {
                        rep[i] = env, got++;
                        continue;
                    }
                } else if (env->msg_case == NUMOE__ENVELOPE__MSG_ERROR) {
                    rc = nm_errf(err, "worker %d at %s: %s", i, w->ep, env->error->message);
                }
                numoe__envelope__free_unpacked(env, NULL);
            }
            if (rc || rep[i]) continue;
            drain_monitor(w);
            why[0] = 0;
            if (w->lost)
                snprintf(why, sizeof why, "lost the connection to worker %d at %s while it computed layer %d", i, w->ep,
                         layer);
            else if (nm_now_s() - t0[i] > rb->timeout_s)
                snprintf(why, sizeof why, "worker %d at %s did not answer layer %d within %.0f s (--worker-timeout)", i,
                         w->ep, layer, rb->timeout_s);
            if (why[0] && !(rc = tcp_reconnect(rb, w, why, err))) {
                rc = tcp_send_request(rb, w, &rq, err);
                t0[i] = nm_now_s();
            }
        }
    }
    if (!rc && n_tok) {
        size_t n = (size_t)(n_tok * H);
        float *p = malloc(xb);
        if (!p) rc = nm_errf(err, "out of memory");
        for (int i = 0; i < rb->n && !rc; i++) {
            memcpy(p, rep[i]->moe_reply->out.data, xb); /* the message's bytes need not be aligned */
            if (i == 0) memcpy(out, p, xb);
            else
                for (size_t j = 0; j < n; j++) out[j] += p[j];
        }
        free(p);
    }
    for (int i = 0; i < rb->n; i++)
        if (rep[i]) numoe__envelope__free_unpacked(rep[i], NULL);
    free(rep), free(it), free(t0);
    return rc;
}

/* One chunk of at most max_tok tokens. */
static int moe_chunk(remote_backend *rb, int layer, int64_t n_tok, const float *x, int k, const int32_t *ids,
                     const float *wt, float *out, nm_err *err) {
    if (rb->tcp) return inline_round(rb, layer, n_tok, x, k, ids, wt, out, err);
    const int64_t H = rb->n_embd;
    inflight q = {.layer = layer, .k = k, .n_tok = n_tok, .x = x, .wt = wt, .ids = ids, .seq = rb->seq + 1};
    for (int i = 0; i < rb->n; i++) {
        rworker *w = &rb->w[i];
        if (rb->handoff == NUMOE__HANDOFF__HANDOFF_DOORBELL) {
            post(rb, w, &q);
        } else if (n_tok) {
            size_t xb = (size_t)(n_tok * H) * sizeof(float), kb = (size_t)(n_tok * k) * sizeof(int32_t);
            memcpy(w->slot.x, x, xb);
            memcpy(w->slot.ids, ids, kb);
            memcpy(w->slot.w, wt, kb);
        }
    }
    rb->seq++;
    if (rb->handoff == NUMOE__HANDOFF__HANDOFF_ZMQ) {
        if (zmq_round(rb, layer < 0 ? -1 : layer, n_tok, k, err)) return -1;
    } else {
        /* wait for all before failing, so no worker is left computing into a slot */
        int rc = 0;
        nm_err first;
        for (int i = 0; i < rb->n; i++)
            if (await_doorbell(rb, &rb->w[i], &q, rc ? NULL : &first) && !rc) rc = -1;
        if (rc) {
            *err = first;
            return -1;
        }
    }
    if (!n_tok) return 0;
    size_t n = (size_t)(n_tok * H);
    memcpy(out, rb->w[0].slot.out, n * sizeof *out);
    for (int i = 1; i < rb->n; i++) {
        const float *p = rb->w[i].slot.out;
        for (size_t j = 0; j < n; j++) out[j] += p[j];
    }
    return 0;
}

static int remote_moe(nm_expert_backend *b, int layer, int64_t n_tok, const float *x, int k, const int32_t *ids,
                      const float *w, float *out, nm_err *err) {
    remote_backend *rb = (remote_backend *)b;
    if (rb->broken) return nm_errf(err, "expert workers unusable after an earlier failure: %s", rb->broken_msg);
    if (layer >= 0 && (layer >= rb->m->hp.n_layer || !rb->m->layers[layer].is_moe))
        return nm_errf(err, "expert backend: layer %d is not a MoE layer", layer);
    if (k < 1 || k > rb->max_k)
        return nm_errf(err, "expert backend: %d experts per token, the worker slots hold at most %d", k, rb->max_k);
    int64_t done = 0;
    do {
        int64_t c = n_tok - done < rb->max_tok ? n_tok - done : rb->max_tok;
        if (moe_chunk(rb, layer, c, x + done * rb->n_embd, k, ids + done * k, w + done * k, out + done * rb->n_embd,
                      err))
            return fail_backend(rb, err);
        done += c;
    } while (done < n_tok);
    return 0;
}

nm_expert_backend *nm_experts_remote_create(const nm_model *m, const nm_remote_opts *o, nm_err *err) {
    int n_workers = o->n_workers;
    const char *launch_ep = getenv("NUMOE_LAUNCH_ENDPOINT"), *launch_n = getenv("NUMOE_LAUNCH_WORKERS");
    if (o->endpoints) {
        int n_ep = 1;
        for (const char *c = o->endpoints; *c; c++) n_ep += *c == ',';
        for (const char *c = o->endpoints; c;) {
            const char *e = strchr(c, ',');
            size_t len = e ? (size_t)(e - c) : strlen(c);
            if (len <= 6 || len >= sizeof ((rworker *)0)->ep || strncmp(c, "tcp://", 6)) {
                nm_errf(err, "--worker-endpoints: '%.*s' is not a tcp://HOST:PORT endpoint", (int)len, c);
                return NULL;
            }
            c = e ? e + 1 : NULL;
        }
        if (n_workers > 0 && n_workers != n_ep) {
            nm_errf(err, "--workers %d, but --worker-endpoints names %d worker%s", n_workers, n_ep, n_ep > 1 ? "s" : "");
            return NULL;
        }
        n_workers = n_ep;
    } else if (o->key_path) {
        nm_errf(err, "--worker-key is for --worker-endpoints (tcp) workers; the launcher's workers talk over "
                "local ipc and shared memory");
        return NULL;
    } else if (!launch_ep || !launch_n) {
        nm_errf(err, "routed experts in workers need the numoe launcher, which starts them: run `numoe <command> "
                "--workers N ...`, not numoe-coordinator directly");
        return NULL;
    } else {
        n_workers = atoi(launch_n);
    }
    if (n_workers < 1 || n_workers > NM_MAX_WORKERS) {
        nm_errf(err, "--workers %d: between 1 and %d", n_workers, NM_MAX_WORKERS);
        return NULL;
    }
    if (!o->placement) {
        nm_errf(err, "expert workers need a placement");
        return NULL;
    }
    /* the same map every worker builds (a family name or a map file): fails here,
     * once, if it cannot be made */
    nm_placement pl;
    if (nm_placement_for_model_spec(&pl, m, o->placement, n_workers, err)) return NULL;
    int kind = pl.kind;
    uint64_t placement_hash = nm_placement_hash(&pl);
    nm_placement_free(&pl);
    remote_backend *rb = calloc(1, sizeof *rb);
    if (!rb || !(rb->w = calloc((size_t)n_workers, sizeof *rb->w))) {
        free(rb);
        nm_errf(err, "out of memory");
        return NULL;
    }
    rb->base.moe = remote_moe;
    rb->base.destroy = remote_destroy;
    rb->m = m;
    rb->n = n_workers;
    for (int i = 0; i < rb->n; i++) rb->w[i].id = i, rb->w[i].pidfd = -1, rb->w[i].node = -1;
    rb->handoff = o->handoff;
    if (o->endpoints) rb->tcp = 1, rb->handoff = NUMOE__HANDOFF__HANDOFF_INLINE;
    rb->timeout_s = o->timeout_s > 0 ? o->timeout_s : 300;
    rb->n_embd = m->hp.n_embd;
    rb->max_tok = o->max_tok > 0 ? o->max_tok : 512;
    rb->max_k = o->max_k > 0 ? o->max_k : (int)m->hp.n_expert_used;
    const char *spin = getenv("NUMOE_WORKER_SPIN_US");
    rb->spin_us = spin ? atoi(spin) : SPIN_US_DEFAULT;
    if (rb->spin_us < 0) rb->spin_us = 0;
    rb->run_id = getppid(); /* the launcher */
    nm_model_identity(m->gguf, &rb->ex.file_bytes, &rb->ex.header_hash);
    rb->ex.placement = kind, rb->ex.placement_hash = placement_hash;
    if (!(rb->zctx = zmq_ctx_new())) {
        nm_errf(err, "ZeroMQ: %s", zmq_strerror(zmq_errno()));
        remote_destroy(&rb->base);
        return NULL;
    }

    if (rb->tcp) {
        const char *c = o->endpoints;
        for (int i = 0; i < rb->n; i++) {
            const char *e = strchr(c, ',');
            int len = e ? (int)(e - c) : (int)strlen(c);
            snprintf(rb->w[i].ep, sizeof rb->w[i].ep, "%.*s", len, c);
            c = e ? e + 1 : c + len;
        }
        if (o->key_path && nm_wire_key_load(o->key_path, &rb->key, err)) {
            remote_destroy(&rb->base);
            return NULL;
        }
        rb->keyed = o->key_path != NULL;
        if (tcp_connect_all(rb, err)) {
            rb->broken = 1;
            remote_destroy(&rb->base);
            return NULL;
        }
    } else {
        int one = 1, zero = 0, sndtimeo = 5000;
        if (!(rb->sock = zmq_socket(rb->zctx, ZMQ_ROUTER)) ||
            zmq_setsockopt(rb->sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one) ||
            zmq_setsockopt(rb->sock, ZMQ_LINGER, &zero, sizeof zero) ||
            zmq_setsockopt(rb->sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo) || zmq_bind(rb->sock, launch_ep)) {
            nm_errf(err, "ZeroMQ: cannot listen on %s: %s", launch_ep, zmq_strerror(zmq_errno()));
            remote_destroy(&rb->base);
            return NULL;
        }
        if (await_workers(rb, err)) {
            rb->broken = 1;
            remote_destroy(&rb->base);
            return NULL;
        }
    }
    uint64_t total = 0, routed = nm_routed_expert_bytes(m->gguf);
    for (int i = 0; i < rb->n; i++) {
        rworker *w = &rb->w[i];
        total += w->shard_bytes;
        char node[16] = "-";
        if (w->node >= 0) snprintf(node, sizeof node, "%d", w->node);
        if (o->verbose && rb->tcp)
            fprintf(stderr, "numoe: worker %d: %s (host %s, pid %llu), node %s, %d threads, shard %llu bytes\n", i,
                    w->ep, w->host, (unsigned long long)w->rpid, node, w->threads, (unsigned long long)w->shard_bytes);
        else if (o->verbose)
            fprintf(stderr, "numoe: worker %d: pid %d, node %s, %d threads, shard %llu bytes, slot %zu bytes\n", i,
                    (int)w->pid, node, w->threads, (unsigned long long)w->shard_bytes, w->slot.bytes);
    }
    if (o->verbose)
        fprintf(stderr, "numoe: %d workers (placement %s, %s hand-off) hold %llu bytes of routed experts; the model has %llu\n",
                rb->n, o->placement, rb->tcp ? "tcp inline" : rb->handoff == NUMOE__HANDOFF__HANDOFF_ZMQ ? "ZeroMQ" : "doorbell",
                (unsigned long long)total, (unsigned long long)routed);
    if (total != routed) {
        nm_errf(err, "the workers hold %llu bytes of routed experts, the model has %llu: the placement lost or "
                "duplicated weights", (unsigned long long)total, (unsigned long long)routed);
        rb->broken = 1;
        remote_destroy(&rb->base);
        return NULL;
    }
    return &rb->base;
}
