/* remote_core.c - the remote expert backend's worker table and registration
 * (remote_core.h): the checks every worker passes, the launcher's workers'
 * control socket and slots, liveness, restarts. */
#include "coordinator/experts/remote_core.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/progress.h"
#include "common/clock.h"

double nm_remote_start_limit(void) {
    const char *tmo = getenv("NUMOE_WORKER_NM_REMOTE_START_TIMEOUT_S");
    return tmo && atof(tmo) > 0 ? atof(tmo) : NM_REMOTE_START_TIMEOUT_S;
}

/* Whether w's registered process has ended (not our child: a pidfd tells). */
int nm_remote_check_gone(nm_remote_worker *w) {
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
static void forget(nm_remote_worker *w) {
    nm_slot_unmap(&w->slot);
    if (w->shm_name[0]) shm_unlink(w->shm_name); /* normally gone already (the worker unlinks it) */
    w->shm_name[0] = 0;
    if (w->pidfd >= 0) close(w->pidfd);
    w->pidfd = -1;
    w->registered = w->attached = w->gone = 0;
    w->req = 0;
}

nm_remote_worker *nm_remote_by_rid(nm_remote *rb, const nm_routing_id *rid) {
    for (int i = 0; i < rb->n; i++)
        if (rb->w[i].registered && rb->w[i].rid.len == rid->len && !memcmp(rb->w[i].rid.id, rid->id, rid->len))
            return &rb->w[i];
    return NULL;
}

static int send_to(nm_remote *rb, const nm_routing_id *rid, Numoe__Envelope *env, nm_err *err) {
    return nm_wire_send(rb->sock, rid, env, err);
}

void nm_remote_close_launched(nm_remote *rb) {
    /* Shutdown on the socket, and the doorbell so a sleeping worker reads it
     * now; the launcher reaps them (and kills what does not follow) */
    for (int i = 0; i < rb->n && !rb->tcp; i++) {
        nm_remote_worker *w = &rb->w[i];
        if (w->registered && !nm_remote_check_gone(w)) {
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
}

static int refuse(nm_remote *rb, const nm_routing_id *rid, const char *reason) {
    Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
    Numoe__RegisterReply rr = NUMOE__REGISTER_REPLY__INIT;
    rr.accepted = 0;
    rr.reason = (char *)reason;
    rr.protocol_version = NM_PROTOCOL_VERSION;
    env.msg_case = NUMOE__ENVELOPE__MSG_REGISTER_REPLY, env.register_reply = &rr;
    return send_to(rb, rid, &env, NULL);
}

/* Why a Register does not fit (reason[0] == 0: it does). */
void nm_remote_register_reason(nm_remote *rb, const Numoe__Register *r, char *reason, size_t rlen) {
    const nm_remote_expect *ex = &rb->ex;
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
    else if (rb->w[r->worker_id].registered && !nm_remote_check_gone(&rb->w[r->worker_id]))
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
static int on_register(nm_remote *rb, const nm_routing_id *rid, const Numoe__Register *r, nm_err *err) {
    char reason[700];
    nm_remote_register_reason(rb, r, reason, sizeof reason);
    if (reason[0]) {
        refuse(rb, rid, reason);
        return nm_errf(err, "%s", reason);
    }
    int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)r->pid, 0);
    if (pidfd < 0 && errno == ESRCH) return 0;
    if (strcmp(r->build_id, nm_build_id()))
        fprintf(stderr, "numoe: note: worker %u was built differently (%s; coordinator: %s)\n", r->worker_id,
                r->build_id, nm_build_id());
    nm_remote_worker *w = &rb->w[r->worker_id];
    if (w->registered) forget(w); /* the process before it, dead (register_reason checked) */
    if (r->attempt > 0) rb->restarts++;
    w->rid = *rid;
    w->registered = 1;
    w->pid = (pid_t)r->pid, w->pidfd = pidfd, w->attempt = r->attempt;
    w->shard_bytes = r->shard_bytes;
    nm_load_add(r->shard_bytes); /* start-up progress (common/progress.h): this shard is loaded */
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
int nm_remote_control_step(nm_remote *rb, int timeout_ms, int fatal_worker_errors, nm_err *err) {
    for (int i = 0; i < rb->n; i++)
        if (rb->w[i].registered && !rb->w[i].attached && nm_remote_check_gone(&rb->w[i])) forget(&rb->w[i]);
    Numoe__Envelope *env;
    nm_routing_id rid;
    int r = nm_wire_recv(rb->sock, timeout_ms, &rid, &env, err);
    if (r) return r < 0 ? -1 : 0;
    int rc = 0;
    switch (env->msg_case) {
    case NUMOE__ENVELOPE__MSG_REGISTER: rc = on_register(rb, &rid, env->register_, err); break;
    case NUMOE__ENVELOPE__MSG_ERROR:
        if (env->error->from_launcher) rb->give_ups++, rc = nm_errf(err, "%s", env->error->message);
        else if (fatal_worker_errors) rc = nm_errf(err, "worker %u: %s", env->error->worker_id, env->error->message);
        else fprintf(stderr, "numoe: worker %u: %s\n", env->error->worker_id, env->error->message);
        break;
    case NUMOE__ENVELOPE__MSG_HEARTBEAT: {
        nm_remote_worker *w = nm_remote_by_rid(rb, &rid);
        if (w && env->heartbeat->slot_bytes == w->slot.bytes) w->attached = 1;
        break;
    }
    default: break; /* a leftover of a worker that died */
    }
    numoe__envelope__free_unpacked(env, NULL);
    return rc;
}

/* Waits until every worker registered and mapped its slot. */
int nm_remote_await_workers(nm_remote *rb, nm_err *err) {
    double t0 = nm_now_s(), limit = nm_remote_start_limit();
    for (;;) {
        int ready = 0;
        for (int i = 0; i < rb->n; i++) ready += rb->w[i].attached;
        if (ready == rb->n) return 0;
        if (nm_remote_control_step(rb, 100, 1, err)) return -1;
        if (nm_now_s() - t0 > limit)
            return nm_errf(err, "workers did not all register within %.0f s (set NUMOE_WORKER_NM_REMOTE_START_TIMEOUT_S)", limit);
    }
}

int nm_remote_fail(nm_remote *rb, nm_err *err) {
    rb->broken = 1;
    snprintf(rb->broken_msg, sizeof rb->broken_msg, "%s", err->msg);
    return -1;
}

int nm_remote_rearm(nm_remote *rb, char *why, size_t len) {
    if (!rb->broken) return 1;
    /* a few messages at a time (a restarted worker sends a Register, then a
     * Heartbeat once its slot is mapped); the caller comes back soon */
    for (int i = 0; i < 8; i++) {
        nm_err e;
        if (nm_remote_control_step(rb, 0, 0, &e)) snprintf(rb->broken_msg, sizeof rb->broken_msg, "%s", e.msg);
    }
    int missing = -1;
    for (int i = 0; i < rb->n; i++) {
        nm_remote_worker *w = &rb->w[i];
        if (w->attached && nm_remote_check_gone(w)) forget(w); /* died while idle: the launcher restarts it */
        int idle = w->attached && atomic_load_explicit(&w->slot.h->done.seq, memory_order_acquire) == w->req;
        if (!idle && missing < 0) missing = i;
    }
    if (missing >= 0) {
        snprintf(why, len, "expert worker %d is not back yet after: %.300s", missing, rb->broken_msg);
        return 0;
    }
    fprintf(stderr, "numoe: every expert worker is back; serving again (after: %s)\n", rb->broken_msg);
    rb->broken = 0;
    rb->broken_msg[0] = 0;
    return 1;
}

/* Worker w failed (why): waits for the launcher's new process to register
 * and map its slot. t0: when w was handed the request it did not answer, so
 * the time printed is what the failure cost that request (noticing it,
 * back-off, restart, re-mapping the shard). */
int nm_remote_await_restart(nm_remote *rb, nm_remote_worker *w, const nm_err *why, double t0, nm_err *err) {
    if (!nm_remote_check_gone(w)) kill(w->pid, SIGKILL); /* hung: the launcher restarts what dies */
    forget(w);
    double limit = nm_remote_start_limit();
    while (!w->attached) {
        nm_err e;
        if (nm_remote_control_step(rb, 10, 0, &e)) return nm_errf(err, "%s; %s", why->msg, e.msg);
        if (nm_now_s() - t0 > limit)
            return nm_errf(err, "%s; no new worker %d registered within %.0f s (NUMOE_WORKER_NM_REMOTE_START_TIMEOUT_S)",
                           why->msg, w->id, limit);
    }
    fprintf(stderr, "numoe: worker %d restarted in %.1f ms (attempt %u, pid %d)\n", w->id, (nm_now_s() - t0) * 1e3,
            w->attempt, (int)w->pid);
    return 0;
}

void nm_remote_sum_slots(nm_remote *rb, int64_t n_tok, float *out) {
    if (!n_tok) return;
    size_t n = (size_t)(n_tok * rb->n_embd);
    memcpy(out, rb->w[0].slot.out, n * sizeof *out);
    for (int i = 1; i < rb->n; i++) {
        const float *p = rb->w[i].slot.out;
        for (size_t j = 0; j < n; j++) out[j] += p[j];
    }
}
