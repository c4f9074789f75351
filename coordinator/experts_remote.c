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
 * Supervision (doorbell hand-off): a worker that dies (seen by waitpid while
 * waiting for its doorbell) or does not answer within the timeout (it is
 * killed) is restarted with back-off (10, 50, 250, 1000, 2000 ms; at most
 * NUMOE_WORKER_RESTARTS attempts per failure, default 4, 0 = never). The
 * layer in flight waits: once the new process has registered and mapped its
 * new slot, the inputs (still in the caller's buffers) are copied in again
 * and its doorbell rung; the other workers' answers stay in their slots. So
 * no request fails and the sums are the same. "worker I restarted in X ms
 * (attempt k, pid P)" goes to stderr. A restart is quick because the shard
 * outlives the worker: each worker keeps it in /dev/shm/numoe-<our pid>-
 * shard-<id> (worker/shard.h) and a restarted one re-maps it read-only. Those
 * names are removed in destroy; if this process is killed, the workers get
 * SIGTERM (PR_SET_PDEATHSIG) and remove their own; and a later coordinator
 * sweeps names whose pid is dead (nm_slot_sweep_stale).
 *
 * Start-up and shutdown: the workers are forked/exec'ed here (the binary
 * next to /proc/self/exe), in their own process group (a terminal's Ctrl-C
 * reaches only the coordinator) and with PR_SET_PDEATHSIG = SIGTERM (they
 * end when this process does, however it ends). Each registers; the
 * coordinator checks protocol version, model identity and placement, creates
 * the worker's slot and names it in RegisterReply; the worker maps it,
 * unlinks the name and confirms with a Heartbeat. destroy sends Shutdown,
 * reaps every worker (SIGTERM, then SIGKILL after a grace period) and unlinks
 * whatever slot name is left. Slot names carry this process's pid, so a
 * later coordinator removes the names of one that was killed mid-start.
 *
 * Workers started by hand (--worker-endpoints tcp://h1:p1,...; worker i is
 * the i-th endpoint, started as `numoe-worker --worker-id i --listen ...`):
 * nothing is spawned. Each endpoint gets its own DEALER socket (connected;
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
 * Later (not here yet): connecting to workers started by the launcher,
 * restarts in the ZeroMQ hand-off mode
 * (there a dead worker still fails the call), one shared input region
 * instead of a copy per worker, and a submit/wait split so the shared
 * experts overlap the routed ones. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <numa.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "coordinator/cli_workers.h"
#include "proto/shm_slot.h"
#include "proto/wire.h"
#include "worker/placement.h"

#define SPIN_US_DEFAULT 250
#define START_TIMEOUT_S 600.0 /* copying a shard of a big model out of the page cache takes a while */
#define RESTART_TIMEOUT_S 60.0 /* a restart re-maps the shard: seconds at most */
#define RESTARTS_DEFAULT 4

typedef struct {
    int id;
    pid_t pid;
    int reaped, wstatus;
    nm_routing_id rid;
    int registered, attached;
    char shm_name[96];
    nm_slot slot;
    uint64_t shard_bytes;
    int node, threads, cpus;
    unsigned req;
    char shard_name[96];   /* its persistent shard segment (worker/shard.h) */
    int attempt_arg;       /* index in argv_buf of the --attempt value */
    int restarts;          /* restarts so far */
    char *argv_buf[28];
    /* --worker-endpoints */
    char ep[256];
    void *dsock, *mon;
    int connected, lost;
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
    char endpoint[128];
    int handoff, spin_us;
    double timeout_s;
    int64_t max_tok, n_embd;
    int max_k;
    int broken;
    char broken_msg[sizeof(nm_err)];
    uint64_t seq;
    expect_t ex;
    int max_restarts;
    int tcp;               /* --worker-endpoints */
} remote_backend;

static double now_s(void) { return (double)nm_wire_now_ns() * 1e-9; }

static void describe_exit(int st, char *buf, size_t len) {
    if (WIFSIGNALED(st)) snprintf(buf, len, "killed by signal %d (%s)", WTERMSIG(st), strsignal(WTERMSIG(st)));
    else if (WIFEXITED(st)) snprintf(buf, len, "exited with status %d", WEXITSTATUS(st));
    else snprintf(buf, len, "ended (wait status %#x)", st);
}

/* Reaps w if it has ended; returns 1 if it is gone. */
static int check_gone(rworker *w) {
    if (w->reaped) return 1;
    if (w->pid <= 0) return 0;
    int st;
    pid_t r = waitpid(w->pid, &st, WNOHANG);
    if (r == w->pid || (r < 0 && errno == ECHILD)) {
        w->reaped = 1;
        w->wstatus = r == w->pid ? st : 0;
        return 1;
    }
    return 0;
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

static void send_shutdown(remote_backend *rb, rworker *w) {
    Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
    Numoe__Shutdown sd = NUMOE__SHUTDOWN__INIT;
    sd.reason = "coordinator exiting";
    env.msg_case = NUMOE__ENVELOPE__MSG_SHUTDOWN, env.shutdown = &sd;
    send_to(rb, &w->rid, &env, NULL);
}

static void remote_destroy(nm_expert_backend *b) {
    remote_backend *rb = (remote_backend *)b;
    /* ask politely: Shutdown on the socket, and the doorbell so a sleeping worker reads it now */
    for (int i = 0; i < rb->n; i++) {
        rworker *w = &rb->w[i];
        if (w->reaped || w->pid <= 0) continue;
        if (w->registered) send_shutdown(rb, w);
        if (w->attached && atomic_load(&w->slot.h->done.seq) == w->req) {
            w->slot.h->op = NM_SLOT_OP_CONTROL;
            nm_doorbell_ring(&w->slot.h->req, ++w->req);
        } else if (!w->registered || w->attached) {
            kill(w->pid, SIGTERM); /* still starting, or stuck in a request we gave up on */
        }
    }
    double t0 = now_s();
    for (int phase = 0; phase < 3; phase++) {
        double grace = phase == 0 ? 5.0 : 2.0;
        for (;;) {
            int left = 0;
            for (int i = 0; i < rb->n; i++) left += rb->w[i].pid > 0 && !check_gone(&rb->w[i]);
            if (!left || now_s() - t0 > grace) break;
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        for (int i = 0; i < rb->n; i++) {
            rworker *w = &rb->w[i];
            if (w->pid <= 0 || w->reaped) continue;
            if (phase == 0) fprintf(stderr, "numoe: worker %d (pid %d) did not shut down; sending SIGTERM\n", i, w->pid);
            kill(w->pid, phase == 0 ? SIGTERM : SIGKILL);
            if (phase == 1) {
                int st;
                if (waitpid(w->pid, &st, 0) == w->pid) w->wstatus = st;
                w->reaped = 1;
            }
        }
        t0 = now_s();
    }
    for (int i = 0; i < rb->n; i++) {
        rworker *w = &rb->w[i];
        if (w->reaped && w->registered && !rb->broken && (!WIFEXITED(w->wstatus) || WEXITSTATUS(w->wstatus))) {
            char how[96];
            describe_exit(w->wstatus, how, sizeof how);
            fprintf(stderr, "numoe: worker %d (pid %d) %s at shutdown\n", i, w->pid, how);
        }
        if (w->shm_name[0]) shm_unlink(w->shm_name); /* normally already gone (the worker unlinks it) */
        if (w->shard_name[0]) {
            char tmp[128];
            shm_unlink(w->shard_name);
            snprintf(tmp, sizeof tmp, "%s.tmp", w->shard_name);
            shm_unlink(tmp);
        }
        nm_slot_unmap(&w->slot);
        for (int j = 0; w->argv_buf[j]; j++) free(w->argv_buf[j]);
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
    if (rb->sock) zmq_close(rb->sock);
    if (rb->zctx) zmq_ctx_term(rb->zctx);
    free(rb->w);
    free(rb);
}

/* Path of numoe-worker: $NUMOE_WORKER, else next to this executable. */
static int find_worker_exe(char *out, size_t len, nm_err *err) {
    const char *env = getenv("NUMOE_WORKER");
    if (env && *env) {
        snprintf(out, len, "%s", env);
    } else {
        char self[PATH_MAX];
        ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
        if (n <= 0) return nm_errf(err, "cannot read /proc/self/exe to find numoe-worker: %s", strerror(errno));
        self[n] = 0;
        char *slash = strrchr(self, '/');
        if (slash) *slash = 0;
        size_t n_self = strlen(self);
        if (n_self + sizeof "/numoe-worker" > len) return nm_errf(err, "path of this executable too long");
        memcpy(out, self, n_self);
        memcpy(out + n_self, "/numoe-worker", sizeof "/numoe-worker");
    }
    if (access(out, X_OK))
        return nm_errf(err, "cannot run the worker binary %s: %s (build it with `make`, or set NUMOE_WORKER)", out,
                       strerror(errno));
    return 0;
}

static char *xstrdup_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xstrdup_printf(const char *fmt, ...) {
    char buf[PATH_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return strdup(buf);
}

static int fork_exec(rworker *w, nm_err *err);

static int spawn(remote_backend *rb, rworker *w, const char *exe, const nm_remote_opts *o, nm_err *err) {
    int a = 0;
    char **v = w->argv_buf;
    snprintf(w->shard_name, sizeof w->shard_name, "/numoe-%d-shard-%d", (int)getpid(), w->id);
    v[a++] = strdup(exe);
    v[a++] = strdup("--model"), v[a++] = strdup(o->model_path);
    v[a++] = strdup("--worker-id"), v[a++] = xstrdup_printf("%d", w->id);
    v[a++] = strdup("--workers"), v[a++] = xstrdup_printf("%d", rb->n);
    v[a++] = strdup("--placement"), v[a++] = strdup(o->placement);
    v[a++] = strdup("--endpoint"), v[a++] = strdup(rb->endpoint);
    v[a++] = strdup("--threads"), v[a++] = xstrdup_printf("%d", w->threads);
    if (w->node >= 0) v[a++] = strdup("--node"), v[a++] = xstrdup_printf("%d", w->node);
    v[a++] = strdup("--shard-shm"), v[a++] = strdup(w->shard_name);
    v[a++] = strdup("--attempt"), w->attempt_arg = a, v[a++] = strdup("0");
    v[a++] = strdup("--quiet"); /* its errors come here as Error messages, and we print them */
    v[a] = NULL;
    for (int i = 0; i < a; i++)
        if (!v[i]) return nm_errf(err, "out of memory");
    /* the command a user would type to start this worker by hand, binding included */
    if (o->verbose) {
        fprintf(stderr, "numoe: worker %d:", w->id);
        if (w->node >= 0) fprintf(stderr, " numactl --cpunodebind=%d --membind=%d", w->node, w->node);
        for (int i = 0; i < a; i++) fprintf(stderr, " %s", v[i]);
        fputc('\n', stderr);
    }
    (void)rb;
    return fork_exec(w, err);
}

static int fork_exec(rworker *w, nm_err *err) {
    char **v = w->argv_buf;
    const char *exe = v[0];
    pid_t parent = getpid();
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) return nm_errf(err, "cannot start worker %d: fork: %s", w->id, strerror(errno));
    if (pid == 0) {
        /* child: async-signal-safe calls only until exec */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent) _exit(1); /* the coordinator is already gone */
        execv(exe, v);
        static const char msg[] = "numoe: cannot exec the worker binary\n";
        ssize_t r = write(2, msg, sizeof msg - 1);
        (void)r;
        _exit(127);
    }
    w->pid = pid;
    return 0;
}

/* One line on why a worker is unusable, its own Error message when it sent one. */
static int worker_gone_error(remote_backend *rb, rworker *w, const char *when, int layer, nm_err *err) {
    char how[96];
    describe_exit(w->wstatus, how, sizeof how);
    (void)rb;
    if (layer >= 0) return nm_errf(err, "worker %d (pid %d) %s %s %d", w->id, w->pid, how, when, layer);
    return nm_errf(err, "worker %d (pid %d) %s %s", w->id, w->pid, how, when);
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
    else if (rb->w[r->worker_id].registered)
        snprintf(reason, rlen, "worker id %u registered twice", r->worker_id);
    else if (rb->w[r->worker_id].pid > 0 && r->pid != (uint64_t)rb->w[r->worker_id].pid)
        snprintf(reason, rlen, "worker %u reports pid %llu, but this coordinator started pid %d for it",
                 r->worker_id, (unsigned long long)r->pid, rb->w[r->worker_id].pid);
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

/* Checks one Register; on success creates the worker's slot and accepts it. */
static int on_register(remote_backend *rb, const nm_routing_id *rid, const Numoe__Register *r, expect_t *ex,
                       nm_err *err) {
    char reason[700];
    register_reason(rb, r, ex, reason, sizeof reason);
    if (reason[0]) {
        refuse(rb, rid, reason);
        return nm_errf(err, "%s", reason);
    }
    if (strcmp(r->build_id, nm_build_id()))
        fprintf(stderr, "numoe: note: worker %u was built differently (%s; coordinator: %s)\n", r->worker_id,
                r->build_id, nm_build_id());
    rworker *w = &rb->w[r->worker_id];
    w->rid = *rid;
    w->registered = 1;
    w->shard_bytes = r->shard_bytes;
    w->node = r->node, w->threads = (int)r->threads, w->cpus = (int)r->cores;
    /* its slot: /dev/shm/numoe-<our pid>-w<id>-<random> */
    uint32_t rnd = 0;
    if (getrandom(&rnd, sizeof rnd, GRND_NONBLOCK) != sizeof rnd) rnd = (uint32_t)nm_wire_now_ns();
    snprintf(w->shm_name, sizeof w->shm_name, "/numoe-%d-w%d-%08x", (int)getpid(), w->id, rnd);
    if (nm_slot_create(&w->slot, w->shm_name, (uint32_t)w->id, rb->n_embd, rb->max_tok, rb->max_k, err)) {
        w->shm_name[0] = 0;
        refuse(rb, rid, err->msg);
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
    if (send_to(rb, rid, &env, err)) return nm_err_prefix(err, "worker %d", w->id);
    return 0;
}

/* Waits until every worker registered and mapped its slot. */
static int await_workers(remote_backend *rb, int kind, uint64_t placement_hash, nm_err *err) {
    expect_t ex = {0};
    nm_model_identity(rb->m->gguf, &ex.file_bytes, &ex.header_hash);
    ex.placement = kind, ex.placement_hash = placement_hash;
    rb->ex = ex;
    double t0 = now_s();
    const char *tmo = getenv("NUMOE_WORKER_START_TIMEOUT_S");
    double limit = tmo && atof(tmo) > 0 ? atof(tmo) : START_TIMEOUT_S;
    for (;;) {
        int ready = 0;
        for (int i = 0; i < rb->n; i++) ready += rb->w[i].attached;
        if (ready == rb->n) return 0;
        Numoe__Envelope *env;
        nm_routing_id rid;
        int r = nm_wire_recv(rb->sock, 100, &rid, &env, err);
        if (r < 0) return -1;
        if (r == 1) {
            for (int i = 0; i < rb->n; i++) {
                rworker *w = &rb->w[i];
                if (!w->attached && check_gone(w)) {
                    /* its Error message, if any, may still be queued */
                    while (nm_wire_recv(rb->sock, 50, &rid, &env, NULL) == 0) {
                        int is_err = env->msg_case == NUMOE__ENVELOPE__MSG_ERROR;
                        if (is_err) nm_errf(err, "worker %u: %s", env->error->worker_id, env->error->message);
                        numoe__envelope__free_unpacked(env, NULL);
                        if (is_err) return -1;
                    }
                    return worker_gone_error(rb, w, w->registered ? "before mapping its slot" : "before registering",
                                             -1, err);
                }
            }
            if (now_s() - t0 > limit)
                return nm_errf(err, "workers did not all register within %.0f s (set NUMOE_WORKER_START_TIMEOUT_S)",
                               limit);
            continue;
        }
        int rc = 0;
        switch (env->msg_case) {
        case NUMOE__ENVELOPE__MSG_REGISTER: rc = on_register(rb, &rid, env->register_, &ex, err); break;
        case NUMOE__ENVELOPE__MSG_ERROR:
            rc = nm_errf(err, "worker %u: %s", env->error->worker_id, env->error->message);
            break;
        case NUMOE__ENVELOPE__MSG_HEARTBEAT: {
            rworker *w = by_rid(rb, &rid);
            if (w && env->heartbeat->slot_bytes == w->slot.bytes) w->attached = 1;
            break;
        }
        default: fprintf(stderr, "numoe: ignoring an unexpected %s from a worker\n", nm_wire_msg_name(env));
        }
        numoe__envelope__free_unpacked(env, NULL);
        if (rc) return -1;
    }
}

static int fail_backend(remote_backend *rb, nm_err *err) {
    rb->broken = 1;
    snprintf(rb->broken_msg, sizeof rb->broken_msg, "%s", err->msg);
    return -1;
}

/* Kills (if needed) and reaps a worker we gave up on. */
static void put_down(rworker *w) {
    if (w->pid <= 0 || w->reaped) return;
    kill(w->pid, SIGKILL);
    int st;
    if (waitpid(w->pid, &st, 0) == w->pid) w->wstatus = st;
    w->reaped = 1;
}

/* One restart of worker w (restart number `attempt`, 1-based): back-off,
 * a new process with the same arguments, its registration and a new slot.
 * t0: when the failure was seen (for the recovery time printed). */
static int restart_worker(remote_backend *rb, rworker *w, int attempt, double t0, nm_err *err) {
    static const int backoff_ms[] = {10, 50, 250, 1000, 2000};
    int nb = (int)(sizeof backoff_ms / sizeof *backoff_ms);
    put_down(w);
    int ms = backoff_ms[attempt - 1 < nb ? attempt - 1 : nb - 1];
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) && errno == EINTR) {}
    nm_slot_unmap(&w->slot);
    if (w->shm_name[0]) shm_unlink(w->shm_name); /* normally gone already */
    w->shm_name[0] = 0;
    w->registered = w->attached = 0, w->req = 0, w->reaped = 0, w->wstatus = 0;
    w->restarts++;
    free(w->argv_buf[w->attempt_arg]);
    if (!(w->argv_buf[w->attempt_arg] = xstrdup_printf("%d", w->restarts))) return nm_errf(err, "out of memory");
    if (fork_exec(w, err)) return -1;
    const char *tmo = getenv("NUMOE_WORKER_START_TIMEOUT_S");
    double limit = tmo && atof(tmo) > 0 ? atof(tmo) : RESTART_TIMEOUT_S, t_start = now_s();
    while (!w->attached) {
        Numoe__Envelope *env;
        nm_routing_id rid;
        int r = nm_wire_recv(rb->sock, 10, &rid, &env, err);
        if (r < 0) return -1;
        if (r == 1) {
            if (check_gone(w)) return worker_gone_error(rb, w, w->registered ? "before mapping its slot" : "before registering", -1, err);
            if (now_s() - t_start > limit) return nm_errf(err, "worker %d (pid %d) did not register within %.0f s", w->id, w->pid, limit);
            continue;
        }
        int rc = 0;
        switch (env->msg_case) {
        case NUMOE__ENVELOPE__MSG_REGISTER:
            if (env->register_->worker_id == (uint32_t)w->id) rc = on_register(rb, &rid, env->register_, &rb->ex, err);
            else refuse(rb, &rid, "this worker id is registered already");
            break;
        case NUMOE__ENVELOPE__MSG_ERROR:
            if (env->error->worker_id == (uint32_t)w->id)
                rc = nm_errf(err, "worker %u: %s", env->error->worker_id, env->error->message);
            break;
        case NUMOE__ENVELOPE__MSG_HEARTBEAT: {
            rworker *x = by_rid(rb, &rid);
            if (x == w && env->heartbeat->slot_bytes == w->slot.bytes) w->attached = 1;
            break;
        }
        default: break; /* left over from the worker that died */
        }
        numoe__envelope__free_unpacked(env, NULL);
        if (rc) return -1;
    }
    fprintf(stderr, "numoe: worker %d restarted in %.1f ms (attempt %d, pid %d)\n", w->id, (now_s() - t0) * 1e3,
            attempt, w->pid);
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
    nm_doorbell_ring(&h->req, ++w->req);
}

/* Waits for worker w's answer to request number w->req (doorbell); a worker
 * that dies or times out is restarted and given the request again. */
static int await_doorbell(remote_backend *rb, rworker *w, const inflight *q, nm_err *err) {
    int layer = q->layer, attempt = 0;
    for (;;) {
        nm_slot_header *h = w->slot.h;
        unsigned old = w->req - 1;
        double t0 = now_s();
        int64_t spin = (int64_t)rb->spin_us * 1000;
        nm_err why;
        int failed = 0;
        while (nm_doorbell_wait(&h->done, old, spin, 50 * 1000000LL)) {
            spin = 0;
            if (check_gone(w)) {
                worker_gone_error(rb, w, "while computing layer", layer, &why);
                failed = 1;
                break;
            }
            if (now_s() - t0 > rb->timeout_s) {
                nm_errf(&why, "worker %d (pid %d) did not answer layer %d within %.0f s (--worker-timeout)", w->id,
                        w->pid, layer, rb->timeout_s);
                failed = 1;
                break;
            }
        }
        if (!failed) break;
        /* restart it (the failed attempts count) until it answers or we run out */
        double t_fail = now_s();
        for (;;) {
            if (attempt >= rb->max_restarts) {
                if (!attempt) {
                    *err = why;
                    return -1;
                }
                return nm_errf(err, "%s; gave up after %d restart attempt%s", why.msg, attempt, attempt > 1 ? "s" : "");
            }
            attempt++;
            if (!restart_worker(rb, w, attempt, t_fail, &why)) break;
            fprintf(stderr, "numoe: restart %d of worker %d failed: %s\n", attempt, w->id, why.msg);
            nm_err_prefix(&why, "restart %d of worker %d", attempt, w->id);
        }
        post(rb, w, q);
    }
    if (atomic_load_explicit(&w->slot.h->done.seq, memory_order_acquire) != w->req)
        return nm_errf(err, "worker %d (pid %d) answered request %u while %u was expected", w->id, w->pid,
                       atomic_load(&w->slot.h->done.seq), w->req);
    nm_slot_header *h = w->slot.h;
    if (h->status) {
        char msg[NM_SLOT_ERROR_LEN + 1];
        memcpy(msg, h->error, NM_SLOT_ERROR_LEN);
        msg[NM_SLOT_ERROR_LEN] = 0;
        return nm_errf(err, "worker %d (pid %d) failed layer %d: %s", w->id, w->pid, layer, msg);
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
    double t0 = now_s();
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
                    rc = worker_gone_error(rb, &rb->w[i], "while computing layer", layer, err);
            if (!rc && now_s() - t0 > rb->timeout_s)
                for (int i = 0; i < rb->n && !rc; i++)
                    if (!seen[i])
                        rc = nm_errf(err, "worker %d (pid %d) did not answer layer %d within %.0f s (--worker-timeout)",
                                     i, rb->w[i].pid, layer, rb->timeout_s);
            continue;
        }
        rworker *w = by_rid(rb, &rid);
        if (w && env->msg_case == NUMOE__ENVELOPE__MSG_MOE_REPLY && env->moe_reply->seq == seq && !seen[w->id]) {
            seen[w->id] = 1, got++;
            if (env->moe_reply->status != NUMOE__STATUS__STATUS_OK)
                rc = nm_errf(err, "worker %d (pid %d) failed layer %d: %s", w->id, w->pid, layer,
                             env->moe_reply->error);
        } else if (w && env->msg_case == NUMOE__ENVELOPE__MSG_ERROR) {
            rc = nm_errf(err, "worker %d (pid %d): %s", w->id, w->pid, env->error->message);
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
    }
}

static int tcp_lost_error(rworker *w, const char *when, int layer, nm_err *err) {
    char at[48] = "";
    if (layer >= 0) snprintf(at, sizeof at, " %d", layer);
    return nm_errf(err, "lost the connection to worker %d at %s %s%s (workers given with --worker-endpoints are "
                   "not restarted; start it again and rerun)", w->id, w->ep, when, at);
}

/* Connects to every endpoint, says hello, checks the Registers. */
static int tcp_connect_all(remote_backend *rb, const expect_t *ex, nm_err *err) {
    const char *ct = getenv("NUMOE_WORKER_CONNECT_TIMEOUT_S");
    const char *st = getenv("NUMOE_WORKER_START_TIMEOUT_S");
    double climit = ct && atof(ct) > 0 ? atof(ct) : 10.0, slimit = st && atof(st) > 0 ? atof(st) : START_TIMEOUT_S;
    for (int i = 0; i < rb->n; i++) {
        rworker *w = &rb->w[i];
        char mon[64];
        snprintf(mon, sizeof mon, "inproc://numoe-monitor-%d", i);
        int zero = 0, sndtimeo = 5000;
        if (!(w->dsock = zmq_socket(rb->zctx, ZMQ_DEALER)) ||
            zmq_setsockopt(w->dsock, ZMQ_LINGER, &zero, sizeof zero) ||
            zmq_setsockopt(w->dsock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo) ||
            zmq_socket_monitor(w->dsock, mon, ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED) ||
            !(w->mon = zmq_socket(rb->zctx, ZMQ_PAIR)) || zmq_connect(w->mon, mon) ||
            zmq_connect(w->dsock, w->ep))
            return nm_errf(err, "worker %d: cannot connect to %s: %s", i, w->ep, zmq_strerror(zmq_errno()));
        Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
        Numoe__Heartbeat hb = NUMOE__HEARTBEAT__INIT;
        hb.time_ns = (uint64_t)nm_wire_now_ns();
        env.msg_case = NUMOE__ENVELOPE__MSG_HEARTBEAT, env.heartbeat = &hb;
        if (nm_wire_send(w->dsock, NULL, &env, err)) return nm_err_prefix(err, "worker %d at %s", i, w->ep);
    }
    double t0 = now_s();
    zmq_pollitem_t *it = calloc((size_t)rb->n, sizeof *it);
    if (!it) return nm_errf(err, "out of memory");
    int rc = 0;
    for (;;) {
        int ready = 0;
        for (int i = 0; i < rb->n; i++) ready += rb->w[i].registered;
        if (ready == rb->n) break;
        for (int i = 0; i < rb->n; i++) it[i] = (zmq_pollitem_t){rb->w[i].dsock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(it, rb->n, 50) < 0 && zmq_errno() != EINTR) {
            rc = nm_errf(err, "waiting for the workers: %s", zmq_strerror(zmq_errno()));
            break;
        }
        double t = now_s() - t0;
        for (int i = 0; i < rb->n && !rc; i++) {
            rworker *w = &rb->w[i];
            drain_monitor(w);
            if (w->registered) continue;
            if (!w->connected && t > climit)
                rc = nm_errf(err, "worker %d: nothing accepted a connection at %s within %.0f s; start `numoe-worker "
                             "--worker-id %d --workers %d ... --listen %s` there first (or set "
                             "NUMOE_WORKER_CONNECT_TIMEOUT_S)", i, w->ep, climit, i, rb->n, w->ep);
            else if (w->lost)
                rc = tcp_lost_error(w, "before it registered", -1, err);
            else if (t > slimit)
                rc = nm_errf(err, "worker %d at %s did not register within %.0f s (set NUMOE_WORKER_START_TIMEOUT_S)",
                             i, w->ep, slimit);
            while (!rc && !w->registered) {
                Numoe__Envelope *env;
                if (nm_wire_recv(w->dsock, 0, NULL, &env, NULL)) break;
                if (env->msg_case == NUMOE__ENVELOPE__MSG_REGISTER) {
                    const Numoe__Register *r = env->register_;
                    char reason[800];
                    if (r->protocol_version == NM_PROTOCOL_VERSION && r->n_workers == (uint32_t)rb->n &&
                        r->worker_id != (uint32_t)i)
                        snprintf(reason, sizeof reason, "the worker at %s is worker %u of %u, but it is endpoint %d of "
                                 "--worker-endpoints (worker i must be the i-th endpoint)", w->ep, r->worker_id,
                                 r->n_workers, i);
                    else
                        register_reason(rb, r, ex, reason, sizeof reason);
                    Numoe__Envelope out = NUMOE__ENVELOPE__INIT;
                    Numoe__RegisterReply rr = NUMOE__REGISTER_REPLY__INIT;
                    rr.accepted = !reason[0];
                    rr.reason = reason;
                    rr.protocol_version = NM_PROTOCOL_VERSION;
                    rr.handoff = NUMOE__HANDOFF__HANDOFF_INLINE;
                    out.msg_case = NUMOE__ENVELOPE__MSG_REGISTER_REPLY, out.register_reply = &rr;
                    nm_wire_send(w->dsock, NULL, &out, NULL);
                    if (reason[0]) {
                        rc = nm_errf(err, "worker at %s refused: %s", w->ep, reason);
                    } else {
                        if (strcmp(r->build_id, nm_build_id()))
                            fprintf(stderr, "numoe: note: worker %d at %s was built differently (%s; coordinator: %s)\n",
                                    i, w->ep, r->build_id, nm_build_id());
                        w->registered = w->attached = 1;
                        w->shard_bytes = r->shard_bytes;
                        w->node = r->node, w->threads = (int)r->threads, w->cpus = (int)r->cores;
                        w->rpid = r->pid;
                        snprintf(w->host, sizeof w->host, "%s", r->host);
                    }
                } else if (env->msg_case == NUMOE__ENVELOPE__MSG_ERROR) {
                    rc = nm_errf(err, "worker %d at %s: %s", i, w->ep, env->error->message);
                }
                numoe__envelope__free_unpacked(env, NULL);
            }
        }
        if (rc) break;
    }
    free(it);
    return rc;
}

/* One chunk over tcp: the data goes out in every MoeRequest, the partial
 * sums come back in the MoeReplies and are added in worker order. */
static int inline_round(remote_backend *rb, int layer, int64_t n_tok, const float *x, int k, const int32_t *ids,
                        const float *wt, float *out, nm_err *err) {
    const int64_t H = rb->n_embd;
    uint64_t seq = ++rb->seq;
    size_t xb = (size_t)(n_tok * H) * sizeof(float), kb = (size_t)(n_tok * k) * sizeof(int32_t);
    for (int i = 0; i < rb->n; i++) {
        rworker *w = &rb->w[i];
        drain_monitor(w);
        if (w->lost) return tcp_lost_error(w, "before layer", layer, err);
        Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
        Numoe__MoeRequest rq = NUMOE__MOE_REQUEST__INIT;
        rq.seq = seq, rq.layer = layer < 0 ? UINT32_MAX : (uint32_t)layer, rq.n_tok = (uint32_t)n_tok,
        rq.k = (uint32_t)k;
        rq.x.data = (uint8_t *)x, rq.x.len = xb;
        rq.ids.data = (uint8_t *)ids, rq.ids.len = kb;
        rq.weights.data = (uint8_t *)wt, rq.weights.len = kb;
        env.msg_case = NUMOE__ENVELOPE__MSG_MOE_REQUEST, env.moe_request = &rq;
        if (nm_wire_send(w->dsock, NULL, &env, err)) return nm_err_prefix(err, "worker %d at %s", i, w->ep);
    }
    Numoe__Envelope **rep = calloc((size_t)rb->n, sizeof *rep);
    zmq_pollitem_t *it = calloc((size_t)rb->n, sizeof *it);
    if (!rep || !it) {
        free(rep), free(it);
        return nm_errf(err, "out of memory");
    }
    int got = 0, rc = 0;
    double t0 = now_s();
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
                if (env->msg_case == NUMOE__ENVELOPE__MSG_MOE_REPLY && r->seq == seq) {
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
            if (w->lost) rc = tcp_lost_error(w, "while it computed layer", layer, err);
            else if (now_s() - t0 > rb->timeout_s)
                rc = nm_errf(err, "worker %d at %s did not answer layer %d within %.0f s (--worker-timeout)", i, w->ep,
                             layer, rb->timeout_s);
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
    free(rep), free(it);
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

static int machine_nodes(void) {
    if (numa_available() < 0) return 1;
    int n = numa_num_configured_nodes();
    return n > 0 ? n : 1;
}

static int cpus_of_node(int node) {
    if (node < 0 || numa_available() < 0) {
        cpu_set_t cs;
        return sched_getaffinity(0, sizeof cs, &cs) ? 1 : CPU_COUNT(&cs);
    }
    struct bitmask *bm = numa_allocate_cpumask();
    int n = 0;
    if (bm && numa_node_to_cpus(node, bm) == 0) n = (int)numa_bitmask_weight(bm);
    if (bm) numa_free_cpumask(bm);
    return n > 0 ? n : 1;
}

nm_expert_backend *nm_experts_remote_create(const nm_model *m, const nm_remote_opts *o, nm_err *err) {
    int n_workers = o->n_workers;
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
    }
    if (n_workers < 1 || n_workers > NM_MAX_WORKERS) {
        nm_errf(err, "--workers %d: between 1 and %d", n_workers, NM_MAX_WORKERS);
        return NULL;
    }
    if (!o->model_path || !o->placement) {
        nm_errf(err, "expert workers need the model path and a placement");
        return NULL;
    }
    /* the same map every worker builds (a family name or a map file): fails here,
     * once, if it cannot be made */
    nm_placement pl;
    if (nm_placement_for_model_spec(&pl, m, o->placement, n_workers, err)) return NULL;
    int kind = pl.kind;
    uint64_t placement_hash = nm_placement_hash(&pl);
    nm_placement_free(&pl);
    char exe[PATH_MAX];
    if (!o->endpoints && find_worker_exe(exe, sizeof exe, err)) return NULL;
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
    rb->handoff = o->handoff;
    if (o->endpoints) rb->tcp = 1, rb->handoff = NUMOE__HANDOFF__HANDOFF_INLINE;
    rb->timeout_s = o->timeout_s > 0 ? o->timeout_s : 300;
    rb->n_embd = m->hp.n_embd;
    rb->max_tok = o->max_tok > 0 ? o->max_tok : 512;
    rb->max_k = o->max_k > 0 ? o->max_k : (int)m->hp.n_expert_used;
    const char *spin = getenv("NUMOE_WORKER_SPIN_US");
    rb->spin_us = spin ? atoi(spin) : SPIN_US_DEFAULT;
    if (rb->spin_us < 0) rb->spin_us = 0;
    const char *rs = getenv("NUMOE_WORKER_RESTARTS");
    rb->max_restarts = rs && *rs ? atoi(rs) : RESTARTS_DEFAULT;
    if (rb->max_restarts < 0 || rb->handoff != NUMOE__HANDOFF__HANDOFF_DOORBELL) rb->max_restarts = 0;
    nm_slot_sweep_stale();

    /* nodes and threads per worker */
    int n_nodes = machine_nodes();
    for (int i = 0; i < rb->n; i++) {
        rworker *w = &rb->w[i];
        w->id = i;
        w->node = o->nodes && o->n_nodes > 0 ? o->nodes[i % o->n_nodes] : n_nodes > 1 ? i % n_nodes : -1;
    }
    for (int i = 0; i < rb->n; i++) {
        rworker *w = &rb->w[i];
        int sharing = 0;
        for (int j = 0; j < rb->n; j++) sharing += rb->w[j].node == w->node;
        int t = o->threads > 0 ? o->threads : cpus_of_node(w->node) / sharing;
        w->threads = t > 0 ? t : 1;
    }

    if (rb->tcp) {
        const char *c = o->endpoints;
        for (int i = 0; i < rb->n; i++) {
            const char *e = strchr(c, ',');
            int len = e ? (int)(e - c) : (int)strlen(c);
            snprintf(rb->w[i].ep, sizeof rb->w[i].ep, "%.*s", len, c);
            c = e ? e + 1 : c + len;
        }
        nm_model_identity(m->gguf, &rb->ex.file_bytes, &rb->ex.header_hash);
        rb->ex.placement = kind, rb->ex.placement_hash = placement_hash;
        if (!(rb->zctx = zmq_ctx_new())) {
            nm_errf(err, "ZeroMQ: %s", zmq_strerror(zmq_errno()));
            remote_destroy(&rb->base);
            return NULL;
        }
        if (tcp_connect_all(rb, &rb->ex, err)) {
            rb->broken = 1;
            remote_destroy(&rb->base);
            return NULL;
        }
    }
    uint32_t rnd = 0;
    if (getrandom(&rnd, sizeof rnd, GRND_NONBLOCK) != sizeof rnd) rnd = (uint32_t)nm_wire_now_ns();
    snprintf(rb->endpoint, sizeof rb->endpoint, "ipc://@numoe-%d-%08x", (int)getpid(), rnd); /* abstract: no file */
    int one = 1, zero = 0, sndtimeo = 5000;
    if (rb->tcp) {
    } else if (!(rb->zctx = zmq_ctx_new()) || !(rb->sock = zmq_socket(rb->zctx, ZMQ_ROUTER)) ||
        zmq_setsockopt(rb->sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one) ||
        zmq_setsockopt(rb->sock, ZMQ_LINGER, &zero, sizeof zero) ||
        zmq_setsockopt(rb->sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo) || zmq_bind(rb->sock, rb->endpoint)) {
        nm_errf(err, "ZeroMQ: cannot listen on %s: %s", rb->endpoint, zmq_strerror(zmq_errno()));
        remote_destroy(&rb->base);
        return NULL;
    }
    for (int i = 0; i < rb->n && !rb->tcp; i++)
        if (spawn(rb, &rb->w[i], exe, o, err)) {
            remote_destroy(&rb->base);
            return NULL;
        }
    if (!rb->tcp && await_workers(rb, kind, placement_hash, err)) {
        rb->broken = 1; /* no "exited at shutdown" notes on top of the error */
        remote_destroy(&rb->base);
        return NULL;
    }
    uint64_t total = 0, routed = nm_routed_expert_bytes(m->gguf);
    for (int i = 0; i < rb->n; i++) {
        rworker *w = &rb->w[i];
        total += w->shard_bytes;
        if (o->verbose && rb->tcp) {
            char node[16] = "-";
            if (w->node >= 0) snprintf(node, sizeof node, "%d", w->node);
            fprintf(stderr, "numoe: worker %d: %s (host %s, pid %llu), node %s, %d threads, shard %llu bytes\n", i,
                    w->ep, w->host, (unsigned long long)w->rpid, node, w->threads, (unsigned long long)w->shard_bytes);
        } else if (o->verbose) {
            char node[16] = "-";
            if (w->node >= 0) snprintf(node, sizeof node, "%d", w->node);
            fprintf(stderr, "numoe: worker %d: pid %d, node %s, %d threads, shard %llu bytes, slot %zu bytes\n", i,
                    w->pid, node, w->threads, (unsigned long long)w->shard_bytes, w->slot.bytes);
        }
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
