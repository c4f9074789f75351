/* main.c - numoe-worker: holds one shard of the routed experts and computes
 * partial MoE outputs for the coordinator.
 *
 *   numoe-worker --model M.gguf --worker-id I --workers N --placement split|experts|experts-rr
 *                [--node N] [--threads T] [--shard-fd FD] [--shard-memory ram|file] [--attempt K]
 *                --endpoint ipc://...
 *   numoe-worker --model M.gguf --worker-id I --workers N --placement P --listen tcp://ADDR:PORT
 *
 * Start-up: connect to the coordinator's endpoint (ZeroMQ DEALER), bind to
 * the NUMA node, open the model, build and validate the whole placement,
 * copy this worker's pieces into its own memory (shard.c) and let go of the
 * mapping, then Register. Once accepted it maps the shm slot named in the
 * reply and serves: per layer the coordinator rings the slot's doorbell (or
 * sends MoeRequest in the ZeroMQ hand-off mode), the worker computes its
 * partial sums into the slot and answers. Shutdown ends it (exit 0); SIGTERM
 * or SIGINT end it cleanly too, with 128 + the signal (so the launcher knows
 * it was not the coordinator's doing). Any failure is sent to the
 * coordinator as an Error message (and printed) before the worker exits
 * NM_WORKER_EXIT_ERROR (3).
 *
 * --shard-fd FD: the shard lives in the memfd the launcher created and
 * passed down as file descriptor FD (worker/shard.h), which outlives this
 * process; a restarted worker (--attempt K > 0, the same fd) re-maps it
 * read-only and says so on stderr. Its memory goes with the last process
 * holding the fd: nothing is left to remove by name.
 * --shard-memory file: nothing is copied; the worker computes from the
 * model's read-only mapping (the page cache), which then stays open
 * (worker/shard.h NM_SHARD_FILE). The launcher picks it when the shards do
 * not fit the memory the workers may use (launch/memory.h).
 *
 * Test hooks (environment): NUMOE_FAKE_PROTOCOL_VERSION=V registers with
 * version V; NUMOE_TEST_FAULT=W:L:die|hang|error makes worker W fail at its
 * first request for layer L; W:L:die-once dies only in the first start
 * (--attempt 0), so a restarted worker computes the layer; W:L:die-until-K
 * dies in every start before --attempt K (a worker that fails until the
 * launcher has given it up, then comes back);
 * NUMOE_TEST_DELAY_US=U sleeps U us before each MoE request (so a test can
 * act in the middle of a generation); NUMOE_TEST_BUILD_HOLD=W:PATH (W a
 * worker id or "all") makes worker W wait before it builds its shard until PATH exists (a test sees
 * the server half loaded).
 *
 * --listen tcp://ADDR:PORT (a worker started by hand, maybe on another host;
 * `numoe generate --worker-endpoints`): the worker binds a ROUTER socket
 * there before it loads anything, so a coordinator can connect (and queue its
 * hello) while the shard is still being built. PORT * or 0 lets the system
 * pick a free port (no window in which another program takes a port chosen
 * beforehand); the "listening on tcp://ADDR:PORT" line, printed once the
 * shard is ready, names the endpoint actually bound. It serves any number of
 * coordinator sessions, one after the other or at once, until SIGTERM/SIGINT:
 *   coord  -> Heartbeat      (hello)
 *   worker -> Register       (as above; the coordinator checks it)
 *   coord  -> RegisterReply  (accepted with HANDOFF_INLINE, or the refusal, printed here)
 *   coord  -> MoeRequest     x / ids / weights inline; worker -> MoeReply with `out` inline
 *   coord  -> Shutdown       (end of that session; the worker keeps listening)
 * No shared memory is used; requests are independent of each other, so the
 * worker keeps no per-session state. Nobody restarts such a worker. */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "common/clock.h"
#include "common/gguf.h"
#include "common/opt.h"
#include "kernels/threadpool.h"
#include "model/identity.h"
#include "model/model.h"
#include "model/placement.h"
#include "proto/shm_slot.h"
#include "proto/wire.h"
#include "proto/wire_key.h"
#include "worker/numa_bind.h"
#include "worker/shard.h"

enum { FAULT_NONE, FAULT_DIE, FAULT_HANG, FAULT_ERROR };

typedef struct {
    const char *model, *endpoint, *placement, *listen, *key_path;
    char bound[256];          /* --listen: the endpoint bound (PORT * or 0 resolved) */
    nm_wire_key key;          /* --key: CURVE (proto/wire_key.h) */
    void *zap;                /* its ZAP handler socket, polled with sock */
    Numoe__Register *reg;     /* --listen: what we answer a hello with */
    float *ibuf;              /* --listen: x | ids | weights | out of one inline request */
    size_t ibuf_bytes;
    int id, n_workers, node, threads, quiet, pin;
    int kind;
    void *zctx, *sock;
    nm_pool *pool;
    nm_shard shard;
    int64_t n_layer;
    uint8_t *is_moe;
    nm_slot slot;
    int handoff;
    int64_t spin_ns;
    uint64_t requests;
    int fault_layer, fault_mode;
    int shard_fd;             /* --shard-fd, -1: none */
    char shard_label[160];    /* what the fd is, for messages ("memfd:numoe-<pid>-shard-<id>") */
    int shard_mode;           /* --shard-memory: NM_SHARD_RAM or NM_SHARD_FILE */
    nm_gguf *g;               /* FILE mode: the mapping the shard points into, kept open */
    nm_model m;
    int attempt;
    long delay_us;
} worker;

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) { g_stop = sig; }

static int usage(FILE *f) {
    fprintf(f,
            "usage: numoe-worker --model M.gguf --worker-id I --workers N --placement split|experts|experts-rr\n"
            "                    --endpoint ipc://... [--node N] [--threads T] [--quiet]\n"
            "       numoe-worker ... --listen tcp://ADDR:PORT\n"
            "\n"
            "Holds worker I's share of the routed experts of M.gguf (as the placement divides them\n"
            "between N workers) and computes partial MoE outputs for the coordinator listening at the\n"
            "endpoint. The numoe launcher (`numoe generate --workers N`, ...) starts these itself.\n"
            "\n"
            "  --key FILE    with --listen: encrypt and authenticate with this key file (ZeroMQ CURVE; make\n"
            "                one with `numoe keygen FILE` and give the coordinator the same --worker-key)\n"
            "  --listen tcp://ADDR:PORT  instead of --endpoint: wait for coordinators there (a worker on\n"
            "                another host, `numoe generate --worker-endpoints tcp://HOST:PORT,...`); the data\n"
            "                travels inline in the messages (no shared memory). Serves one coordinator\n"
            "                after another until SIGTERM/SIGINT; nobody restarts it if it dies. PORT * or 0:\n"
            "                the system picks a free port. Once the shard is loaded it prints\n"
            "                `numoe-worker I: listening on tcp://ADDR:PORT (...)` with the port it bound\n"
            "\n"
            "  --node N      bind threads and memory to NUMA node N (default: not bound)\n"
            "  --threads T   compute threads (default: every CPU it may run on)\n"
            "  --shard-fd FD keep the shard in the memfd (or shmem/hugetlbfs file) open as FD, re-map it\n"
            "                if it already holds it (the launcher holds it across restarts)\n"
            "  --shard-memory ram|file  ram (default): copy the shard into memory of its own; file: compute\n"
            "                from the model file's pages (models larger than the memory it may use)\n"
            "  --attempt K   this is restart K of this worker (0: first start)\n"            "  --progress bar|lines|off  how the shard build shows its progress (NUMOE_PROGRESS wins)\n"
            "  --pin-threads keep compute thread i on the i-th CPU it may use (the launcher asks for it\n"
            "                when the worker has its CPUs to itself)\n"
            "  --quiet       do not print start-up errors, only send them to the coordinator\n"
            "\n"
            "Exit status: 0 after the coordinator's Shutdown (and, with --listen, after SIGTERM/SIGINT),\n"
            "128 + N after signal N, 2 for a usage error, 3 after an error it reported to the coordinator\n"
            "(the launcher does not restart it: it would fail the same way).\n");
    return f == stdout ? 0 : 2;
}

static void cleanup(worker *w) {
    nm_slot_unmap(&w->slot);
    nm_shard_free(&w->shard);
    if (w->m.layers || w->m.owned) nm_model_free(&w->m);
    nm_gguf_close(w->g);
    w->g = NULL;
    nm_pool_destroy(w->pool);
    free(w->is_moe);
    free(w->ibuf);
    memset(&w->key, 0, sizeof w->key);
    if (w->zap) zmq_close(w->zap);
    if (w->sock) zmq_close(w->sock);
    if (w->zctx) zmq_ctx_term(w->zctx);
}

/* Prints the error, sends it to the coordinator, exits NM_WORKER_EXIT_ERROR:
 * the coordinator has the reason, and the launcher does not restart a worker
 * that ended this way (it would fail the same way again). */
static int fail(worker *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(worker *w, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!w->quiet || !w->sock || w->listen) fprintf(stderr, "numoe-worker %d: %s\n", w->id, msg);
    if (w->sock && !w->listen) {
        Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
        Numoe__Error e = NUMOE__ERROR__INIT;
        e.worker_id = (uint32_t)w->id;
        e.message = msg;
        env.msg_case = NUMOE__ENVELOPE__MSG_ERROR;
        env.error = &e;
        nm_wire_send(w->sock, NULL, &env, NULL);
        int linger = 2000; /* deliver it before the context goes */
        zmq_setsockopt(w->sock, ZMQ_LINGER, &linger, sizeof linger);
    }
    cleanup(w);
    exit(NM_WORKER_EXIT_ERROR);
}

static int parse_int(const char *v, long lo, long hi, int *out) {
    long long x;
    if (nm_parse_int(v, lo, hi, &x)) return -1;
    *out = (int)x;
    return 0;
}

static int parse_args(worker *w, int argc, char **argv) {
    w->id = w->n_workers = w->node = w->shard_fd = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) exit(usage(stdout));
        if (!strcmp(a, "--quiet")) {
            w->quiet = 1;
            continue;
        }
        if (!strcmp(a, "--pin-threads")) {
            w->pin = 1;
            continue;
        }
        if (!v) {
            fprintf(stderr, "numoe-worker: unknown option or missing value: %s\n", a);
            return -1;
        }
        if (!strcmp(a, "--model") || !strcmp(a, "-m")) w->model = v;
        else if (!strcmp(a, "--endpoint")) w->endpoint = v;
        else if (!strcmp(a, "--listen")) w->listen = v, bad = strncmp(v, "tcp://", 6) != 0;
        else if (!strcmp(a, "--key")) w->key_path = v;
        else if (!strcmp(a, "--placement")) /* a family name or a readable map file */
            w->placement = v, bad = !nm_placement_parse_kind(v) && access(v, R_OK) != 0;
        else if (!strcmp(a, "--worker-id")) bad = parse_int(v, 0, 4095, &w->id);
        else if (!strcmp(a, "--workers")) bad = parse_int(v, 1, 4096, &w->n_workers);
        else if (!strcmp(a, "--node")) bad = parse_int(v, 0, 1 << 20, &w->node);
        else if (!strcmp(a, "--threads") || !strcmp(a, "-t")) bad = parse_int(v, 1, 4096, &w->threads);
        else if (!strcmp(a, "--shard-fd")) bad = parse_int(v, 0, 1 << 20, &w->shard_fd);
        else if (!strcmp(a, "--shard-memory"))
            w->shard_mode = !strcmp(v, "file") ? NM_SHARD_FILE : NM_SHARD_RAM, bad = strcmp(v, "file") && strcmp(v, "ram");
        else if (!strcmp(a, "--attempt")) bad = parse_int(v, 0, 1 << 20, &w->attempt);
        else if (!strcmp(a, "--progress")) /* the launcher's choice for several workers; NUMOE_PROGRESS wins */
            bad = strcmp(v, "bar") && strcmp(v, "lines") && strcmp(v, "off"), bad || setenv("NUMOE_PROGRESS", v, 0);
        else {
            fprintf(stderr, "numoe-worker: unknown option %s\n", a);
            return -1;
        }
        if (bad) {
            fprintf(stderr, "numoe-worker: bad value '%s' for %s\n", v, a);
            return -1;
        }
        i++;
    }
    if (w->endpoint && w->listen) {
        fprintf(stderr, "numoe-worker: give either --endpoint or --listen, not both\n");
        return -1;
    }
    if (w->key_path && !w->listen) {
        fprintf(stderr, "numoe-worker: --key is for --listen (tcp) workers\n");
        return -1;
    }
    const char *miss = !w->model ? "--model" : !w->endpoint && !w->listen ? "--endpoint"
                       : !w->placement ? "--placement"
                       : w->id < 0 ? "--worker-id" : w->n_workers < 0 ? "--workers" : NULL;
    if (miss) {
        fprintf(stderr, "numoe-worker: %s is required\n", miss);
        return -1;
    }
    if (w->id >= w->n_workers) {
        fprintf(stderr, "numoe-worker: --worker-id %d is not below --workers %d\n", w->id, w->n_workers);
        return -1;
    }
    return 0;
}

static void read_fault(worker *w) {
    const char *d = getenv("NUMOE_TEST_DELAY_US");
    if (d) w->delay_us = atol(d);
    const char *f = getenv("NUMOE_TEST_FAULT");
    int id, layer;
    char mode[16];
    if (!f || sscanf(f, "%d:%d:%15s", &id, &layer, mode) != 3 || id != w->id) return;
    w->fault_layer = layer;
    if (!strcmp(mode, "die-once") && w->attempt > 0) return;
    if (!strncmp(mode, "die-until-", 10)) {
        if ((long)w->attempt >= atol(mode + 10)) return;
        snprintf(mode, sizeof mode, "die");
    }
    w->fault_mode = !strcmp(mode, "die") || !strcmp(mode, "die-once") ? FAULT_DIE : !strcmp(mode, "hang") ? FAULT_HANG
                    : !strcmp(mode, "error") ? FAULT_ERROR : FAULT_NONE;
}

/* Computes one request (test faults, layer check); 0 or -1 with msg filled. */
static int compute_into(worker *w, int layer, int64_t n_tok, int k, const float *x, const int32_t *ids,
                        const float *wt, float *out, char *msg, size_t len) {
    if (w->fault_mode && layer == w->fault_layer) {
        if (w->fault_mode == FAULT_DIE) raise(SIGKILL);
        if (w->fault_mode == FAULT_HANG)
            while (!g_stop) pause();
        if (w->fault_mode == FAULT_ERROR) return snprintf(msg, len, "injected failure (NUMOE_TEST_FAULT)"), -1;
    }
    if (layer < 0 || layer >= w->n_layer || !w->is_moe[layer])
        return snprintf(msg, len, "not a MoE layer of this model"), -1;
    if (n_tok == 0) return 0;
    if (w->delay_us > 0) usleep((useconds_t)w->delay_us);
    nm_err err;
    if (nm_shard_moe(&w->shard, w->pool, layer, n_tok, x, k, ids, wt, out, &err))
        return snprintf(msg, len, "%.480s", err.msg), -1;
    return 0;
}

/* Computes one request out of the slot; 0 or -1 with msg filled. */
static int compute(worker *w, int layer, int64_t n_tok, int k, char *msg, size_t len) {
    const nm_slot_header *h = w->slot.h;
    if (n_tok < 0 || n_tok > h->max_tok || k < 1 || k > h->max_k)
        return snprintf(msg, len, "request of %lld tokens x %d experts exceeds the slot (%lld x %lld)",
                        (long long)n_tok, k, (long long)h->max_tok, (long long)h->max_k), -1;
    return compute_into(w, layer, n_tok, k, w->slot.x, w->slot.ids, w->slot.w, w->slot.out, msg, len);
}

/* --listen: one request with the data inline; on success *out_bytes bytes of
 * the answer lie at *out (in w->ibuf). */
static int compute_inline(worker *w, const Numoe__MoeRequest *rq, uint8_t **out, size_t *out_bytes, char *msg,
                          size_t len) {
    const int64_t H = (int64_t)w->shard.n_embd;
    int64_t n_tok = rq->n_tok;
    int k = (int)rq->k;
    if (k < 1 || k > 4096 || n_tok > (1 << 24))
        return snprintf(msg, len, "request of %lld tokens x %d experts is out of range", (long long)n_tok, k), -1;
    size_t xb = (size_t)(n_tok * H) * sizeof(float), kb = (size_t)(n_tok * k) * sizeof(int32_t);
    if (rq->x.len != xb || rq->ids.len != kb || rq->weights.len != kb)
        return snprintf(msg, len, "inline data of %zu / %zu / %zu bytes, %lld tokens x %lld x %d experts need "
                        "%zu / %zu / %zu", rq->x.len, rq->ids.len, rq->weights.len, (long long)n_tok, (long long)H, k,
                        xb, kb, kb), -1;
    size_t need = 2 * xb + 2 * kb;
    if (need > w->ibuf_bytes) {
        float *nb = realloc(w->ibuf, need);
        if (!nb) return snprintf(msg, len, "out of memory (%zu bytes for a request)", need), -1;
        w->ibuf = nb, w->ibuf_bytes = need;
    }
    /* copies: the message's bytes need not be aligned for float / int32 */
    uint8_t *b = (uint8_t *)w->ibuf;
    if (xb) memcpy(b, rq->x.data, xb);
    if (kb) memcpy(b + xb, rq->ids.data, kb), memcpy(b + xb + kb, rq->weights.data, kb);
    *out = b + xb + 2 * kb, *out_bytes = xb;
    return compute_into(w, (int)rq->layer, n_tok, k, (const float *)b, (const int32_t *)(b + xb),
                        (const float *)(b + xb + kb), (float *)*out, msg, len);
}

static void send_env(worker *w, Numoe__Envelope *env) { nm_wire_send(w->sock, NULL, env, NULL); }

/* Handles pending control messages without waiting (timeout_ms 0) or
 * waiting up to timeout_ms; returns 1 on Shutdown. In the ZeroMQ hand-off
 * mode MoeRequests arrive here too. */
static int poll_control(worker *w, int timeout_ms) {
    for (;;) {
        Numoe__Envelope *env;
        nm_err err;
        int r = nm_wire_recv(w->sock, timeout_ms, NULL, &env, &err);
        if (r) return 0; /* nothing (or a malformed message, dropped) */
        timeout_ms = 0;
        int stop = 0;
        Numoe__Envelope out = NUMOE__ENVELOPE__INIT;
        switch (env->msg_case) {
        case NUMOE__ENVELOPE__MSG_SHUTDOWN: stop = 1; break;
        case NUMOE__ENVELOPE__MSG_HEARTBEAT: {
            Numoe__Heartbeat hb = NUMOE__HEARTBEAT__INIT;
            hb.seq = env->heartbeat->seq;
            hb.time_ns = (uint64_t)nm_now_ns();
            hb.slot_bytes = w->slot.bytes;
            hb.requests = w->requests;
            out.msg_case = NUMOE__ENVELOPE__MSG_HEARTBEAT, out.heartbeat = &hb;
            send_env(w, &out);
            break;
        }
        case NUMOE__ENVELOPE__MSG_MOE_REQUEST: {
            Numoe__MoeRequest *rq = env->moe_request;
            Numoe__MoeReply rp = NUMOE__MOE_REPLY__INIT;
            char msg[NM_SLOT_ERROR_LEN] = "";
            int64_t t0 = nm_now_ns();
            rp.seq = rq->seq, rp.layer = rq->layer;
            if (rq->x.len || rq->ids.len || rq->weights.len)
                snprintf(msg, sizeof msg, "inline activations go to --listen (tcp) workers; this spawned worker reads its shm slot");
            else if (w->handoff != NUMOE__HANDOFF__HANDOFF_ZMQ)
                snprintf(msg, sizeof msg, "MoeRequest over ZeroMQ, but this worker was registered for the doorbell");
            else if (rq->slot != 0)
                snprintf(msg, sizeof msg, "slot %u does not exist", rq->slot);
            else if (rq->layer != UINT32_MAX) /* UINT32_MAX: an empty round trip (`numoe bench ipc`) */
                compute(w, (int)rq->layer, (int64_t)rq->n_tok, (int)rq->k, msg, sizeof msg);
            w->requests++;
            rp.status = msg[0] ? NUMOE__STATUS__STATUS_ERROR : NUMOE__STATUS__STATUS_OK;
            rp.error = msg;
            rp.compute_ns = (uint64_t)(nm_now_ns() - t0);
            out.msg_case = NUMOE__ENVELOPE__MSG_MOE_REPLY, out.moe_reply = &rp;
            send_env(w, &out);
            break;
        }
        default:
            fprintf(stderr, "numoe-worker %d: ignoring an unexpected %s\n", w->id, nm_wire_msg_name(env));
        }
        numoe__envelope__free_unpacked(env, NULL);
        if (stop) return 1;
    }
}

static void serve_doorbell(worker *w) {
    nm_slot_header *h = w->slot.h;
    /* the last request answered, not the current req: the coordinator may ring
     * the first one as soon as our Heartbeat arrives, before we get here */
    unsigned last = atomic_load(&h->done.seq);
    while (!g_stop) {
        if (nm_doorbell_wait(&h->req, last, w->spin_ns, 100 * 1000000LL)) {
            if (poll_control(w, 0)) return;
            continue;
        }
        unsigned req = atomic_load_explicit(&h->req.seq, memory_order_acquire);
        last = req;
        int64_t t0 = nm_now_ns();
        int stop = 0, status = 0;
        char msg[NM_SLOT_ERROR_LEN] = "";
        switch (h->op) {
        case NM_SLOT_OP_MOE:
            status = compute(w, (int)h->layer, h->n_tok, h->k, msg, sizeof msg);
            w->requests++;
            break;
        case NM_SLOT_OP_PING: break;
        case NM_SLOT_OP_CONTROL: stop = poll_control(w, 1000); break; /* the message may still be on its way */
        default: status = -1, snprintf(msg, sizeof msg, "unknown doorbell op %u", h->op);
        }
        h->status = status;
        if (status) memcpy(h->error, msg, sizeof h->error);
        h->compute_ns = (uint64_t)(nm_now_ns() - t0);
        nm_doorbell_ring(&h->done, req);
        if (stop) return;
    }
}

/* --listen: answers hellos with our Register and inline MoeRequests with
 * MoeReplies, to whichever coordinator sent them, until a signal. */
static void serve_listen(worker *w) {
    while (!g_stop) {
        Numoe__Envelope *env;
        nm_routing_id rid;
        nm_err err;
        if (w->zap) { /* handshakes (--key) and requests on one thread */
            zmq_pollitem_t it[2] = {{w->sock, 0, ZMQ_POLLIN, 0}, {w->zap, 0, ZMQ_POLLIN, 0}};
            if (zmq_poll(it, 2, 100) <= 0) continue;
            if ((it[1].revents & ZMQ_POLLIN) && nm_wire_zap_answer(w->zap, &w->key) == 1)
                fprintf(stderr, "numoe-worker %d: refused a connection whose key is not this worker's --key\n", w->id);
            if (!(it[0].revents & ZMQ_POLLIN)) continue;
        }
        if (nm_wire_recv(w->sock, w->zap ? 0 : 100, &rid, &env, &err)) continue;
        Numoe__Envelope out = NUMOE__ENVELOPE__INIT;
        switch (env->msg_case) {
        case NUMOE__ENVELOPE__MSG_HEARTBEAT: /* a coordinator's hello */
            out.msg_case = NUMOE__ENVELOPE__MSG_REGISTER, out.register_ = w->reg;
            nm_wire_send(w->sock, &rid, &out, NULL);
            break;
        case NUMOE__ENVELOPE__MSG_REGISTER_REPLY:
            if (!env->register_reply->accepted)
                fprintf(stderr, "numoe-worker %d: refused by a coordinator: %s\n", w->id, env->register_reply->reason);
            else if (!w->quiet)
                fprintf(stderr, "numoe-worker %d: serving a coordinator\n", w->id);
            break;
        case NUMOE__ENVELOPE__MSG_MOE_REQUEST: {
            Numoe__MoeRequest *rq = env->moe_request;
            Numoe__MoeReply rp = NUMOE__MOE_REPLY__INIT;
            char msg[NM_SLOT_ERROR_LEN] = "";
            int64_t t0 = nm_now_ns();
            uint8_t *o = NULL;
            size_t ob = 0;
            rp.seq = rq->seq, rp.layer = rq->layer;
            if (rq->layer != UINT32_MAX) compute_inline(w, rq, &o, &ob, msg, sizeof msg);
            w->requests++;
            rp.status = msg[0] ? NUMOE__STATUS__STATUS_ERROR : NUMOE__STATUS__STATUS_OK;
            rp.error = msg;
            if (!msg[0]) rp.out.data = o, rp.out.len = ob;
            rp.compute_ns = (uint64_t)(nm_now_ns() - t0);
            out.msg_case = NUMOE__ENVELOPE__MSG_MOE_REPLY, out.moe_reply = &rp;
            nm_wire_send(w->sock, &rid, &out, NULL);
            break;
        }
        case NUMOE__ENVELOPE__MSG_SHUTDOWN: break; /* that coordinator is done; we keep listening */
        default:
            fprintf(stderr, "numoe-worker %d: ignoring an unexpected %s\n", w->id, nm_wire_msg_name(env));
        }
        numoe__envelope__free_unpacked(env, NULL);
    }
}

static void serve_zmq(worker *w) {
    while (!g_stop)
        if (poll_control(w, 100)) return;
}

int main(int argc, char **argv) {
    worker w = {0};
    if (parse_args(&w, argc, argv)) return usage(stderr);
    read_fault(&w);
    nm_err err;

    /* the control socket first, so every later failure reaches the coordinator
     * (--listen: so coordinators can connect while we load) */
    if (!(w.zctx = zmq_ctx_new()) || !(w.sock = zmq_socket(w.zctx, w.listen ? ZMQ_ROUTER : ZMQ_DEALER))) {
        fprintf(stderr, "numoe-worker %d: ZeroMQ: %s\n", w.id, zmq_strerror(zmq_errno()));
        return 1;
    }
    int linger = 0, sndtimeo = 10000;
    zmq_setsockopt(w.sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(w.sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
    if (w.key_path) {
        int forever = 0; /* the handshake waits while the shard loads: ZAP is answered once we serve */
        if (nm_wire_key_load(w.key_path, &w.key, &err) || nm_wire_key_server(w.sock, &w.key, &err) ||
            !(w.zap = nm_wire_zap_open(w.zctx, &err))) {
            zmq_close(w.sock);
            w.sock = NULL;
            fail(&w, "%s", err.msg);
        }
        zmq_setsockopt(w.sock, ZMQ_HANDSHAKE_IVL, &forever, sizeof forever);
    } else if (w.listen) {
        fprintf(stderr, "numoe-worker %d: warning: no --key: anyone who can reach %s can use this worker and read "
                "its traffic (make a key with `numoe keygen FILE`)\n", w.id, w.listen);
    }
    if (w.listen && zmq_bind(w.sock, w.listen)) {
        int e = zmq_errno();
        zmq_close(w.sock);
        w.sock = NULL;
        fail(&w, "cannot listen on %s: %s", w.listen, zmq_strerror(e));
    }
    if (w.listen) { /* what was bound: PORT * or 0 becomes the port the system chose */
        size_t len = sizeof w.bound;
        if (zmq_getsockopt(w.sock, ZMQ_LAST_ENDPOINT, w.bound, &len) || !w.bound[0]) {
            int e = zmq_errno();
            zmq_close(w.sock);
            w.sock = NULL;
            fail(&w, "listening on %s, but cannot read back the endpoint bound: %s", w.listen, zmq_strerror(e));
        }
    }
    if (!w.listen && zmq_connect(w.sock, w.endpoint)) {
        zmq_close(w.sock);
        w.sock = NULL;
        fail(&w, "cannot connect to %s: %s", w.endpoint, zmq_strerror(zmq_errno()));
    }

    nm_binding bind;
    if (nm_bind_node(w.node, &bind, &err)) fail(&w, "%s", err.msg);

    nm_placement p = {0};
    if (nm_gguf_open(w.model, &w.g, &err)) fail(&w, "%s", err.msg);
    if (nm_model_load(&w.m, w.g, &err)) {
        memset(&w.m, 0, sizeof w.m); /* nothing of it to free */
        fail(&w, "%s", err.msg);
    }
    nm_gguf *g = w.g;
    nm_model *m = &w.m;
    Numoe__ModelIdentity mid = NUMOE__MODEL_IDENTITY__INIT;
    nm_model_identity(g, &mid.file_bytes, &mid.header_hash);
    mid.n_layer = (uint32_t)m->hp.n_layer, mid.n_expert = (uint32_t)m->hp.n_expert;
    mid.n_embd = (uint32_t)m->hp.n_embd, mid.n_ff_exp = (uint32_t)m->hp.n_ff_exp;
    w.n_layer = m->hp.n_layer;
    if (!(w.is_moe = calloc((size_t)w.n_layer, 1))) fail(&w, "out of memory");
    for (int64_t l = 0; l < w.n_layer; l++) w.is_moe[l] = (uint8_t)m->layers[l].is_moe;
    int64_t t_build = nm_now_ns();
    int rc = nm_placement_for_model_spec(&p, m, w.placement, w.n_workers, &err);
    w.kind = p.kind;
    uint64_t place_hash = rc ? 0 : nm_placement_hash(&p);
    if (w.shard_fd >= 0) { /* its name, as /proc shows it: "/memfd:numoe-<pid>-shard-<id> (deleted)" */
        char link[64], target[160];
        snprintf(link, sizeof link, "/proc/self/fd/%d", w.shard_fd);
        ssize_t n = readlink(link, target, sizeof target - 1);
        target[n > 0 ? n : 0] = 0;
        char *del = strstr(target, " (deleted)");
        if (del) *del = 0;
        if (n <= 0) rc = nm_errf(&err, "--shard-fd %d is not an open file descriptor: %s", w.shard_fd, strerror(errno));
        snprintf(w.shard_label, sizeof w.shard_label, "%s", target[0] == '/' ? target + 1 : target);
    }
    nm_shard_seg seg = {.fd = w.shard_fd, .label = w.shard_label, .file_bytes = mid.file_bytes,
                        .header_hash = mid.header_hash, .placement_hash = place_hash,
                        .n_workers = (uint32_t)w.n_workers, .kind = (uint32_t)w.kind};
    char label[64];
    snprintf(label, sizeof label, "numoe-worker %d: building its shard", w.id);
    if (!rc && !(w.pool = nm_pool_create(w.threads))) rc = nm_errf(&err, "cannot start %d threads", w.threads);
    if (!rc && w.pin) nm_pool_pin(w.pool); /* after the node binding: its CPUs */
    const char *spin = getenv("NUMOE_POOL_SPIN_US"); /* developer knob, as the coordinator's */
    if (!rc && spin) nm_pool_set_spin_us(w.pool, atoi(spin));
    const char *hold = getenv("NUMOE_TEST_BUILD_HOLD"), *hold_path = hold ? strchr(hold, ':') : NULL;
    if (hold_path && (!strncmp(hold, "all:", 4) || atoi(hold) == w.id)) /* a test holds the load (signals end it) */
        while (!g_stop && access(hold_path + 1, F_OK)) usleep(10000);
    if (!rc)
        rc = nm_shard_build(&w.shard, m, &p, w.id, bind.node, w.pool, w.shard_mode, w.shard_fd >= 0 ? &seg : NULL,
                            label, &err);
    if (!rc && w.shard_mode == NM_SHARD_FILE)
        fprintf(stderr, "numoe-worker %d: file-backed shard: computes from the model's pages (%llu bytes of routed "
                "experts, read as they are used; nothing copied)\n", w.id, (unsigned long long)w.shard.weight_bytes);
    else if (!rc && w.shard.reused)
        fprintf(stderr, "numoe-worker %d: re-mapped its persistent shard %s read-only (%llu bytes, in %.1f ms; "
                "nothing copied from the model)\n", w.id, w.shard_label, (unsigned long long)w.shard.weight_bytes,
                (double)(nm_now_ns() - t_build) * 1e-6);
    else if (!rc && w.shard_fd >= 0 && w.attempt > 0)
        fprintf(stderr, "numoe-worker %d: no persistent shard in %s to re-map: rebuilt it from the model\n", w.id,
                w.shard_label);
    if (!rc && w.shard.tiled_bytes) /* what the memory figures are made of: tiles are a little over their rows */
        fprintf(stderr, "numoe-worker %d: shard of %llu bytes (%llu bytes of rows): %llu bytes are experts' matrices as "
                "packed tiles, computed with no packing per call\n", w.id, (unsigned long long)w.shard.mem_bytes,
                (unsigned long long)w.shard.weight_bytes, (unsigned long long)w.shard.tiled_bytes);
    nm_placement_free(&p);
    if (w.shard_mode != NM_SHARD_FILE) { /* the shard is a copy: the mapping goes */
        nm_model_free(&w.m);
        memset(&w.m, 0, sizeof w.m);
        nm_gguf_close(w.g);
        w.g = NULL;
    }
    if (rc) fail(&w, "%s", err.msg);

    /* register */
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    Numoe__Register reg = NUMOE__REGISTER__INIT;
    const char *fake = getenv("NUMOE_FAKE_PROTOCOL_VERSION");
    reg.protocol_version = fake ? (uint32_t)strtoul(fake, NULL, 10) : NM_PROTOCOL_VERSION;
    reg.build_id = (char *)nm_build_id();
    reg.worker_id = (uint32_t)w.id, reg.n_workers = (uint32_t)w.n_workers;
    reg.node = bind.node, reg.cores = (uint32_t)bind.cpus, reg.threads = (uint32_t)nm_pool_size(w.pool);
    reg.model = &mid;
    reg.placement = (Numoe__PlacementKind)w.kind, reg.placement_hash = place_hash;
    reg.shard_bytes = w.shard.weight_bytes;
    reg.pid = (uint64_t)getpid();
    reg.host = host;
    reg.attempt = (uint32_t)w.attempt;
    Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
    env.msg_case = NUMOE__ENVELOPE__MSG_REGISTER, env.register_ = &reg;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: waits return EINTR */
    sigemptyset(&sa.sa_mask);
    if (w.listen) {
        w.reg = &reg;
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        fprintf(stderr, "numoe-worker %d: listening on %s (worker %d of %d, placement %s, shard %llu bytes)\n", w.id,
                w.bound, w.id, w.n_workers, w.placement, (unsigned long long)w.shard.weight_bytes);
        serve_listen(&w);
        cleanup(&w);
        return 0;
    }
    if (nm_wire_send(w.sock, NULL, &env, &err)) fail(&w, "%s", err.msg);

    Numoe__Envelope *in = NULL;
    for (int waited = 0; !in; waited++) {
        int r = nm_wire_recv(w.sock, 1000, NULL, &in, &err);
        if (r < 0) fail(&w, "%s", err.msg);
        if (r == 0 && in->msg_case == NUMOE__ENVELOPE__MSG_SHUTDOWN) {
            numoe__envelope__free_unpacked(in, NULL);
            cleanup(&w);
            return 0;
        }
        if (r == 0 && in->msg_case != NUMOE__ENVELOPE__MSG_REGISTER_REPLY) {
            numoe__envelope__free_unpacked(in, NULL);
            in = NULL;
        }
        if (!in && waited >= 120) fail(&w, "no answer from the coordinator at %s within 120 s", w.endpoint);
    }
    Numoe__RegisterReply *rr = in->register_reply;
    if (!rr->accepted) {
        fprintf(stderr, "numoe-worker %d: refused by the coordinator: %s\n", w.id, rr->reason);
        numoe__envelope__free_unpacked(in, NULL);
        cleanup(&w);
        return NM_WORKER_EXIT_ERROR;
    }
    if (rr->protocol_version != NM_PROTOCOL_VERSION) {
        uint32_t v = rr->protocol_version;
        numoe__envelope__free_unpacked(in, NULL);
        fail(&w, "the coordinator speaks numoe protocol version %u, this worker version %u", v, NM_PROTOCOL_VERSION);
    }
    w.handoff = rr->handoff;
    w.spin_ns = (int64_t)rr->spin_us * 1000;
    rc = nm_slot_attach(&w.slot, rr->slot_name, rr->slot_bytes, (int64_t)mid.n_embd, &err);
    numoe__envelope__free_unpacked(in, NULL);
    if (rc) fail(&w, "%s", err.msg);
    Numoe__Heartbeat hb = NUMOE__HEARTBEAT__INIT;
    hb.time_ns = (uint64_t)nm_now_ns();
    hb.slot_bytes = w.slot.bytes;
    Numoe__Envelope henv = NUMOE__ENVELOPE__INIT;
    henv.msg_case = NUMOE__ENVELOPE__MSG_HEARTBEAT, henv.heartbeat = &hb;
    if (nm_wire_send(w.sock, NULL, &henv, &err)) fail(&w, "%s", err.msg);

    /* serve until Shutdown or a signal */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    if (w.handoff == NUMOE__HANDOFF__HANDOFF_ZMQ) serve_zmq(&w);
    else serve_doorbell(&w);
    cleanup(&w);
    /* a signal is not the coordinator's Shutdown: 128 + signal, as a shell
     * reports it, so the launcher restarts a worker someone else stopped */
    return g_stop ? 128 + (int)g_stop : 0;
}
