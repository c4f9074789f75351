/* bench_ipc.c - `numoe bench ipc`: what one per-layer hand-off between
 * the coordinator and a worker costs, with empty work.
 *
 * Without --model, between this process and a forked child:
 *   zmq-req-rep   ZeroMQ REQ/REP over ipc://, 1-byte messages
 *   zmq-envelope  ZeroMQ DEALER/ROUTER over ipc://, a packed MoeRequest
 *                 Envelope out and a MoeReply back (what a ZeroMQ hand-off
 *                 of a layer would cost)
 *   doorbell-spin the shm slot doorbell (proto/shm_slot.h), both sides polling
 *   doorbell-futex the same, never polling: every hand-off sleeps and wakes
 *                 through the kernel (the cost once the poll budget is spent)
 *   doorbell, one CPU  both processes on one CPU: the doorbell sees the
 *                 other side rang from its own CPU and sleeps at once
 * The two processes are pinned to two different CPUs (the first two this
 * process may use) except in the last case.
 * With --model M.gguf (--workers N, default one per node; the launcher starts
 * them): the remote expert backend itself, n_tok = 0 on a MoE layer (copy,
 * ring, wait, sum - no expert work) in the hand-off NUMOE_HANDOFF names
 * (doorbell, or zmq), then one decode token's layer, against the in-process
 * backend. */
#include <errno.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include "common/clock.h"
#include "common/opt.h"
#include "coordinator/cli/commands.h"
#include "coordinator/cli/options.h"
#include "coordinator/cli/session.h"
#include "coordinator/experts/local.h"
#include "coordinator/experts/remote.h"
#include "proto/shm_slot.h"
#include "proto/wire.h"

#define WARMUP 500

/* The two ends run on two different CPUs (as a coordinator and a worker
 * would): a ping-pong on one CPU measures the scheduler instead. */
static int cpu_a = -1, cpu_b = -1;
static cpu_set_t saved_mask;

static void pick_cpus(void) {
    if (sched_getaffinity(0, sizeof saved_mask, &saved_mask)) return;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &saved_mask)) {
            if (cpu_a < 0) cpu_a = c;
            else if (cpu_b < 0) cpu_b = c;
        }
}

static void pin(int cpu) {
    if (cpu < 0) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    sched_setaffinity(0, sizeof one, &one);
}

static void unpin(void) {
    if (cpu_a >= 0) sched_setaffinity(0, sizeof saved_mask, &saved_mask);
}

static int usage(FILE *f) {
    fprintf(f,
            "usage: numoe bench ipc [-n ITERS] [--spin-us US] [--model M.gguf --workers N [options]]\n"
            "\n"
            "Round trip of a per-layer hand-off with empty work: ZeroMQ REQ/REP and DEALER/ROUTER\n"
            "(protobuf Envelopes) over ipc://, and the shm slot doorbell polling and sleeping, between\n"
            "two processes. With --model, also the remote expert backend with its real workers (--workers\n"
            "N, default one per NUMA node; empty layer and one decode token) against the in-process\n"
            "backend; NUMOE_HANDOFF=zmq measures the ZeroMQ hand-off instead of the doorbell.\n"
            "\n"
            "  -n ITERS          round trips per measurement (default 20000)\n"
            "      --spin-us US  doorbell polling budget of the spinning variant (default 1000000)\n"
            "%s",
            nm_session_opts_help);
    return f == stdout ? 0 : 2;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void report(const char *name, double *us, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += us[i];
    qsort(us, (size_t)n, sizeof *us, cmp_d);
    printf("%-44s %8.2f %8.2f %8.2f %8.2f %8.2f\n", name, us[0], us[n / 2], us[n * 9 / 10], us[n * 99 / 100], s / n);
    fflush(stdout);
}

static void endpoint(char *buf, size_t len, const char *tag) {
    uint32_t rnd = 0;
    if (getrandom(&rnd, sizeof rnd, GRND_NONBLOCK) != sizeof rnd) rnd = (uint32_t)nm_now_ns();
    snprintf(buf, len, "ipc://@numoe-bench-%s-%d-%08x", tag, (int)getpid(), rnd);
}

static int reap(pid_t pid) {
    int st;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st)) {
        fprintf(stderr, "numoe bench ipc: the echo process failed\n");
        return -1;
    }
    return 0;
}

/* ZeroMQ REQ/REP, 1 byte each way. */
static int bench_req_rep(int iters, double *us) {
    char ep[128];
    endpoint(ep, sizeof ep, "rr");
    int total = iters + WARMUP;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        pin(cpu_b);
        void *ctx = zmq_ctx_new(), *s = zmq_socket(ctx, ZMQ_REP);
        char b;
        int rc = zmq_connect(s, ep);
        for (int i = 0; i < total && !rc; i++)
            if (zmq_recv(s, &b, 1, 0) < 0 || zmq_send(s, &b, 1, 0) < 0) rc = 1;
        zmq_close(s);
        zmq_ctx_term(ctx);
        _exit(rc);
    }
    void *ctx = zmq_ctx_new(), *s = zmq_socket(ctx, ZMQ_REQ);
    int rc = zmq_bind(s, ep);
    char b = 1;
    for (int i = 0; i < total && !rc; i++) {
        int64_t t0 = nm_now_ns();
        if (zmq_send(s, &b, 1, 0) < 0 || zmq_recv(s, &b, 1, 0) < 0) rc = -1;
        if (i >= WARMUP) us[i - WARMUP] = (double)(nm_now_ns() - t0) * 1e-3;
    }
    zmq_close(s);
    zmq_ctx_term(ctx);
    return reap(pid) || rc ? -1 : 0;
}

/* ZeroMQ DEALER (child, a worker) / ROUTER (this process), Envelopes packed and unpacked. */
static int bench_envelope(int iters, double *us) {
    char ep[128];
    endpoint(ep, sizeof ep, "env");
    int total = iters + WARMUP;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        pin(cpu_b);
        void *ctx = zmq_ctx_new(), *s = zmq_socket(ctx, ZMQ_DEALER);
        int rc = zmq_connect(s, ep);
        Numoe__Envelope hello = NUMOE__ENVELOPE__INIT;
        Numoe__Heartbeat hb = NUMOE__HEARTBEAT__INIT;
        hello.msg_case = NUMOE__ENVELOPE__MSG_HEARTBEAT, hello.heartbeat = &hb;
        if (!rc) rc = nm_wire_send(s, NULL, &hello, NULL);
        for (int i = 0; i < total && !rc; i++) {
            Numoe__Envelope *in;
            if (nm_wire_recv(s, -1, NULL, &in, NULL)) {
                rc = 1;
                break;
            }
            Numoe__Envelope out = NUMOE__ENVELOPE__INIT;
            Numoe__MoeReply rp = NUMOE__MOE_REPLY__INIT;
            rp.seq = in->moe_request->seq, rp.layer = in->moe_request->layer, rp.error = "";
            out.msg_case = NUMOE__ENVELOPE__MSG_MOE_REPLY, out.moe_reply = &rp;
            rc = nm_wire_send(s, NULL, &out, NULL);
            numoe__envelope__free_unpacked(in, NULL);
        }
        zmq_close(s);
        zmq_ctx_term(ctx);
        _exit(rc ? 1 : 0);
    }
    void *ctx = zmq_ctx_new(), *s = zmq_socket(ctx, ZMQ_ROUTER);
    int rc = zmq_bind(s, ep);
    nm_routing_id rid;
    Numoe__Envelope *in = NULL;
    if (!rc && nm_wire_recv(s, 10000, &rid, &in, NULL)) rc = -1; /* the child's hello gives its routing id */
    if (in) numoe__envelope__free_unpacked(in, NULL);
    for (int i = 0; i < total && !rc; i++) {
        int64_t t0 = nm_now_ns();
        Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
        Numoe__MoeRequest rq = NUMOE__MOE_REQUEST__INIT;
        rq.seq = (uint64_t)i, rq.layer = 3, rq.n_tok = 1, rq.k = 8;
        env.msg_case = NUMOE__ENVELOPE__MSG_MOE_REQUEST, env.moe_request = &rq;
        if (nm_wire_send(s, &rid, &env, NULL) || nm_wire_recv(s, 10000, &rid, &in, NULL)) {
            rc = -1;
            break;
        }
        if (in->msg_case != NUMOE__ENVELOPE__MSG_MOE_REPLY || in->moe_reply->seq != (uint64_t)i) rc = -1;
        numoe__envelope__free_unpacked(in, NULL);
        if (i >= WARMUP) us[i - WARMUP] = (double)(nm_now_ns() - t0) * 1e-3;
    }
    zmq_close(s);
    zmq_ctx_term(ctx);
    return reap(pid) || rc ? -1 : 0;
}

/* The slot doorbell over a shared anonymous page; spin_ns on both sides. */
static int bench_doorbell(int iters, int64_t spin_ns, int child_cpu, double *us) {
    nm_slot_header *h = mmap(NULL, NM_SLOT_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (h == MAP_FAILED) return -1;
    int total = iters + WARMUP;
    pid_t pid = fork();
    if (pid < 0) return munmap(h, NM_SLOT_PAGE), -1;
    if (pid == 0) {
        pin(child_cpu);
        unsigned last = 0;
        for (int i = 0; i < total; i++) {
            while (nm_doorbell_wait(&h->req, last, spin_ns, 5000000000LL)) {
                if (getppid() == 1) _exit(1);
            }
            last = atomic_load(&h->req.seq);
            h->status = 0;
            nm_doorbell_ring(&h->done, last);
        }
        _exit(0);
    }
    int rc = 0;
    for (int i = 0; i < total && !rc; i++) {
        int64_t t0 = nm_now_ns();
        h->op = NM_SLOT_OP_PING;
        nm_doorbell_ring(&h->req, (unsigned)i + 1);
        if (nm_doorbell_wait(&h->done, (unsigned)i, spin_ns, 10000000000LL)) rc = -1;
        if (i >= WARMUP) us[i - WARMUP] = (double)(nm_now_ns() - t0) * 1e-3;
    }
    if (rc) kill(pid, SIGKILL);
    rc |= reap(pid);
    munmap(h, NM_SLOT_PAGE);
    return rc;
}

/* The remote backend: iters calls of moe() on layer `layer` with n_tok tokens. */
static int bench_backend(nm_expert_backend *b, const nm_model *m, int layer, int64_t n_tok, int k, int iters,
                         double *us, nm_err *err) {
    int64_t H = m->hp.n_embd, n = n_tok > 0 ? n_tok : 1;
    float *x = calloc((size_t)(n * H), sizeof *x), *out = calloc((size_t)(n * H), sizeof *out);
    float *w = calloc((size_t)(n * k), sizeof *w);
    int32_t *ids = calloc((size_t)(n * k), sizeof *ids);
    int rc = 0;
    if (!x || !out || !w || !ids) rc = nm_errf(err, "out of memory");
    for (int64_t i = 0; i < n * H && !rc; i++) x[i] = (float)sin((double)i) * 0.1f;
    for (int64_t i = 0; i < n * k && !rc; i++) ids[i] = (int32_t)((i * 5 + 1) % m->hp.n_expert), w[i] = 0.3f;
    int total = iters + WARMUP / 5;
    for (int i = 0; i < total && !rc; i++) {
        int64_t t0 = nm_now_ns();
        rc = nm_experts_run(b, layer, n_tok, x, k, ids, w, out, err);
        if (i >= WARMUP / 5) us[i - WARMUP / 5] = (double)(nm_now_ns() - t0) * 1e-3;
    }
    free(x), free(out), free(w), free(ids);
    return rc;
}

int nm_cmd_bench_ipc(int argc, char **argv) {
    nm_session_opts so = {0};
    long long iters = 20000, spin_us = 1000000;
    for (int i = 1; i < argc; i++) {
        int r = nm_session_parse_opt(&so, argc, argv, &i, "numoe bench ipc");
        if (r < 0) return 2;
        if (r) continue;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) return usage(stdout);
        long long *dst = !strcmp(argv[i], "-n") ? &iters : !strcmp(argv[i], "--spin-us") ? &spin_us : NULL;
        if (!dst || i + 1 >= argc || nm_parse_int(argv[i + 1], 0, LLONG_MAX, dst)) {
            fprintf(stderr, "numoe bench ipc: bad option or value: %s\n", argv[i]);
            return usage(stderr);
        }
        i++;
    }
    if (iters < 100) iters = 100;
    double *us = malloc((size_t)iters * sizeof *us);
    if (!us) return fprintf(stderr, "numoe bench ipc: out of memory\n"), 1;
    int rc = 0;
    pick_cpus();
    printf("numoe bench ipc: %lld round trips each (after %d warm-up), microseconds; two processes", iters, WARMUP);
    if (cpu_b >= 0) printf(" pinned to CPUs %d and %d", cpu_a, cpu_b);
    printf("\n");
    pin(cpu_b >= 0 ? cpu_a : -1);
    printf("%-44s %8s %8s %8s %8s %8s\n", "hand-off", "min", "median", "p90", "p99", "mean");
    if (bench_req_rep((int)iters, us) == 0) report("zmq REQ/REP ipc, 1 byte", us, (int)iters);
    else rc = 1;
    if (bench_envelope((int)iters, us) == 0) report("zmq DEALER/ROUTER ipc, MoeRequest/MoeReply", us, (int)iters);
    else rc = 1;
    if (bench_doorbell((int)iters, spin_us * 1000, cpu_b, us) == 0) report("shm doorbell, polling", us, (int)iters);
    else rc = 1;
    if (bench_doorbell((int)iters, -1, cpu_b, us) == 0)
        report("shm doorbell, futex sleep/wake every time", us, (int)iters);
    else rc = 1;
    if (cpu_b >= 0) {
        if (bench_doorbell((int)iters, spin_us * 1000, cpu_a, us) == 0)
            report("shm doorbell, polling, both on one CPU", us, (int)iters);
        else rc = 1;
    }
    unpin();

    if (so.model_path) {
        /* the launcher started the workers (--workers N, default one per node);
         * the session attaches to them in the hand-off NUMOE_HANDOFF names */
        nm_session s;
        nm_err err;
        if (nm_session_open(&s, &so, &err)) {
            fprintf(stderr, "numoe bench ipc: %s\n", err.msg);
            free(us);
            return 1;
        }
        int layer = -1;
        for (int l = 0; l < s.model.hp.n_layer && layer < 0; l++)
            if (s.model.layers[l].is_moe) layer = l;
        int k = (int)s.model.hp.n_expert_used;
        int it = (int)(iters / 4 > 100 ? iters / 4 : 100);
        const char *launched = getenv("NUMOE_LAUNCH_WORKERS"), *h = getenv("NUMOE_HANDOFF");
        char name[96];
        if (launched) {
            const char *mn = h && !strcmp(h, "zmq") ? "zmq" : "doorbell";
            snprintf(name, sizeof name, "backend, %s workers, %s, empty layer", launched, mn);
            if (bench_backend(s.experts, &s.model, layer, 0, k, it, us, &err) == 0) report(name, us, it);
            else fprintf(stderr, "numoe bench ipc: %s\n", err.msg), rc = 1;
            snprintf(name, sizeof name, "backend, %s workers, %s, 1 token", launched, mn);
            if (!rc && bench_backend(s.experts, &s.model, layer, 1, k, it, us, &err) == 0) report(name, us, it);
            else if (!rc) fprintf(stderr, "numoe bench ipc: %s\n", err.msg), rc = 1;
        }
        nm_expert_backend *local = launched ? nm_experts_local_create(&s.model, s.pool, 1, k, &err) : s.experts;
        if (!local) fprintf(stderr, "numoe bench ipc: %s\n", err.msg), rc = 1;
        if (!rc && bench_backend(local, &s.model, layer, 1, k, it, us, &err) == 0)
            report("in-process backend, 1 token", us, it);
        if (local && local != s.experts) local->destroy(local);
        nm_session_close(&s);
    }
    free(us);
    return rc;
}
