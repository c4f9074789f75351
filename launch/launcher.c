/* launcher.c - start, bind and supervise the workers and the coordinator
 * (launcher.h).
 *
 * The launcher blocks the signals it cares about and takes them one at a
 * time from sigtimedwait, so there is no handler and no race between "a
 * child died" and "schedule its restart". Its loop:
 *   - a worker ended while the coordinator runs: unless it exited 0 (it was
 *     told to shut down), restart it after a back-off of 10, 50, 250, 1000,
 *     2000 ms, with the same arguments and --attempt K. The new process
 *     re-maps its persistent shard (the memfd numoe-<launcher pid>-shard-<id>
 *     this launcher created and holds, passed down as --shard-fd;
 *     worker/shard.h) and registers again; the coordinator, which saw the
 *     old one die, re-sends it the layer in flight. At most
 *     NUMOE_WORKER_RESTARTS (default 4; 0 = never) restarts in a row: a
 *     worker that then still dies within RESTART_RESET_S of its start is
 *     given up, and so is one that exited NM_WORKER_EXIT_ERROR (it told
 *     the coordinator why; it would fail again). The coordinator is told (an Error message on its
 *     control socket) and fails the request with that reason.
 *     Under `numoe serve` (argv[1]) giving up is for now only: the
 *     coordinator is told the same way (the layer fails at once, /health
 *     answers 503 with the reason), and the worker is started again every
 *     BACKOFF_CAP_MS for as long as the server runs, a transient cause
 *     (memory, a node's trouble) being worth outliving; once one registers
 *     and is idle the coordinator re-arms and serves again
 *     (coordinator/experts/remote.c). NUMOE_WORKER_RESTARTS=0 still means
 *     no restarts at all.
 *   - the coordinator ended: every worker gets a few seconds to follow its
 *     Shutdown, then SIGTERM, then SIGKILL; every shared-memory name of
 *     the run (/dev/shm/numoe-<launcher pid>-*: slots a failed start left)
 *     is removed, and the shards' memory goes with the last fd; the
 *     launcher exits as the coordinator did.
 *   - SIGTERM, SIGHUP, SIGQUIT, or SIGINT sent with kill(): passed on to the
 *     coordinator, which shuts down in order. A SIGINT from the terminal
 *     (Ctrl-C) is not passed on: it already reached the coordinator, which
 *     shares the launcher's process group; the workers have their own.
 * Every child gets PR_SET_PDEATHSIG = SIGTERM, so a launcher killed with
 * SIGKILL still takes them down (and their shards' memory with them).
 *
 * Shard memory (launch/memory.h): ram, the default, keeps each worker's copy
 * in its memfd; file, chosen when the shards do not fit the memory the
 * workers may use or by --shard-memory file, has them compute from the
 * model file's pages. One line says which and why. */
#include "launch/launcher.h"

#include <dirent.h>
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

#include "common/clock.h"
#include "common/gguf.h"
#include "coordinator/cli/options.h"
#include "coordinator/experts/remote.h"
#include "launch/memory.h"
#include "launch/topology.h"
#include "model/model.h"
#include "model/placement.h"
#include "proto/shm_slot.h"
#include "proto/wire.h"

#define RESTARTS_DEFAULT 4
#define RESTART_RESET_S 30.0 /* a worker that ran this long before dying starts a new count */
#define MAX_ARGS 28
#define BACKOFF_CAP_MS 2000  /* the last and longest restart back-off */

typedef struct {
    int id;
    pid_t pid;             /* 0: not running */
    int node, threads;
    char binding[256];     /* numactl options of the line printed for it */
    int pinned;            /* shares its node with other workers: runs on cpus only */
    int pin_threads;       /* its CPUs are its own (pinned, or alone on its node): --pin-threads */
    cpu_set_t cpus;
    int shard_fd;          /* its memfd (ram mode), -1: none */
    char *argv[MAX_ARGS];  /* owned */
    int attempt_arg;       /* index in argv of the --attempt value */
    int restarts;          /* restarts so far, for --attempt */
    int in_row;            /* restarts since it last ran RESTART_RESET_S */
    double started;        /* when the running process was started */
    double restart_at;     /* > 0: start it again at this time */
    int finished;          /* exited 0, or given up: not to be started again */
    int told_to_end;       /* the launcher sent it SIGTERM / SIGKILL at shutdown */
} lworker;

typedef struct {
    lworker *w;
    int n;
    pid_t coord;
    int coord_status, coord_done;
    char endpoint[128];
    const char *placement; /* --placement, or the one chose_placement() picked */
    int file_backed;       /* the workers compute from the model file (--shard-memory file, or it did not fit) */
    int max_restarts;
    int keep_trying;       /* `numoe serve`: a worker given up is still restarted, every BACKOFF_CAP_MS */
    int stopping;          /* a termination signal was passed on: no more restarts */
    void *zctx, *zsock;    /* made on first use: telling the coordinator a worker was given up */
} launcher;

static void describe_exit(int st, char *buf, size_t len) {
    if (WIFSIGNALED(st)) snprintf(buf, len, "killed by signal %d (%s)", WTERMSIG(st), strsignal(WTERMSIG(st)));
    else if (WIFEXITED(st)) snprintf(buf, len, "exited with status %d", WEXITSTATUS(st));
    else snprintf(buf, len, "ended (wait status %#x)", st);
}

static char *xprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xprintf(const char *fmt, ...) {
    char buf[PATH_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return strdup(buf);
}

int nm_launch_plan(int argc, char **argv, nm_session_opts *o) {
    memset(o, 0, sizeof *o);
    /* The plan only peeks at the options; a bad one is the command's to report,
     * with its name in front (`numoe generate: ...`), once. The parser prints
     * as it goes, so its complaints are sent to /dev/null here: without that a
     * bad value was printed three times (here, here again after the re-exec as
     * numoe-coordinator, and by the command). */
    fflush(stderr);
    int saved = dup(STDERR_FILENO), devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (saved >= 0 && devnull >= 0) dup2(devnull, STDERR_FILENO);
    int bad = 0;
    for (int i = 2; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) bad = 1;
        else if (nm_session_parse_opt(o, argc, argv, &i, "numoe") < 0) bad = 1;
    }
    fflush(stderr);
    if (saved >= 0 && devnull >= 0) dup2(saved, STDERR_FILENO);
    if (saved >= 0) close(saved);
    if (devnull >= 0) close(devnull);
    if (bad) return 0; /* --help, or a bad option: the command alone answers */
    /* an unreadable model: the coordinator alone says so, without workers failing too */
    if (!o->model_path || o->worker_endpoints || access(o->model_path, R_OK)) return 0;
    /* nor for a --gpu N that names no device */
    char why[256];
    nm_err gerr;
    const int gpus = nm_session_gpu_count(o, why, sizeof why, &gerr);
    if (gpus < 0) return 0;
    /* the workers of a GPU run poll longer between layers (session.h) */
    if (nm_session_use_gpu(o, gpus)) {
        char spin[16];
        snprintf(spin, sizeof spin, "%d", NM_SESSION_GPU_SPIN_US);
        setenv("NUMOE_POOL_SPIN_US", spin, 0);
    }
    if (o->workers_set) return o->workers;
    int nodes = numa_available() < 0 ? 1 : numa_num_configured_nodes();
    return nodes > 0 ? nodes : 1;
}

/* Path of numoe-worker: $NUMOE_WORKER, else next to this executable. */
static int find_worker_exe(char *out, size_t len) {
    const char *env = getenv("NUMOE_WORKER");
    if (env && *env) {
        snprintf(out, len, "%s", env);
    } else {
        char self[PATH_MAX];
        ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
        if (n <= 0) return fprintf(stderr, "numoe: cannot read /proc/self/exe to find numoe-worker: %s\n", strerror(errno)), -1;
        self[n] = 0;
        char *slash = strrchr(self, '/');
        if (slash) *slash = 0;
        size_t n_self = strlen(self);
        if (n_self + sizeof "/numoe-worker" > len) return fprintf(stderr, "numoe: path of this executable too long\n"), -1;
        memcpy(out, self, n_self);
        memcpy(out + n_self, "/numoe-worker", sizeof "/numoe-worker");
    }
    if (access(out, X_OK))
        return fprintf(stderr, "numoe: cannot run the worker binary %s: %s (build it with `make`, or set NUMOE_WORKER)\n",
                       out, strerror(errno)), -1;
    return 0;
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

/* fork + exec with the launcher's signal mask undone; own process group
 * (pgrp) for workers, so a terminal's Ctrl-C reaches only the coordinator. */
static pid_t start(const char *exe, char **argv, int own_pgrp, const cpu_set_t *cpus, int keep_fd) {
    pid_t parent = getpid();
    fflush(NULL);
    pid_t pid = fork();
    if (pid != 0) return pid;
    /* child: async-signal-safe calls only until exec */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (own_pgrp) setpgid(0, 0);
    if (cpus) sched_setaffinity(0, sizeof *cpus, cpus); /* numactl --physcpubind; threads inherit it */
    if (keep_fd >= 0) fcntl(keep_fd, F_SETFD, 0);       /* the one fd it inherits: its shard */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1); /* the launcher is already gone */
    execv(exe, argv);
    static const char msg[] = "numoe: cannot exec a child process\n";
    ssize_t r = write(2, msg, sizeof msg - 1);
    (void)r;
    _exit(127);
}

static int start_worker(launcher *L, lworker *w) {
    w->pid = start(w->argv[0], w->argv, 1, w->pinned ? &w->cpus : NULL, w->shard_fd);
    if (w->pid < 0) {
        fprintf(stderr, "numoe: cannot start worker %d: fork: %s\n", w->id, strerror(errno));
        w->pid = 0;
        return -1;
    }
    w->started = nm_now_s();
    w->restart_at = 0;
    (void)L;
    return 0;
}

/* Worker w's arguments, and the command line a user would type to start it
 * by hand (binding included), printed once. */
static int build_worker(launcher *L, lworker *w, const char *exe, const nm_session_opts *o) {
    int a = 0;
    char **v = w->argv;
    v[a++] = strdup(exe);
    v[a++] = strdup("--model"), v[a++] = strdup(o->model_path);
    v[a++] = strdup("--worker-id"), v[a++] = xprintf("%d", w->id);
    v[a++] = strdup("--workers"), v[a++] = xprintf("%d", L->n);
    v[a++] = strdup("--placement"), v[a++] = strdup(L->placement);
    v[a++] = strdup("--endpoint"), v[a++] = strdup(L->endpoint);
    v[a++] = strdup("--threads"), v[a++] = xprintf("%d", w->threads);
    if (w->node >= 0) v[a++] = strdup("--node"), v[a++] = xprintf("%d", w->node);
    if (L->file_backed) {
        v[a++] = strdup("--shard-memory"), v[a++] = strdup("file");
    } else {
        /* the shard's memory: held here, so it outlives each worker process;
         * not a /dev/shm name, so /dev/shm's size does not cap it */
        char name[64];
        snprintf(name, sizeof name, "numoe-%d-shard-%d", (int)getpid(), w->id);
        const char *huge = getenv("NUMOE_HUGETLB");
        w->shard_fd = memfd_create(name, MFD_CLOEXEC | (huge && !strcmp(huge, "1") ? MFD_HUGETLB : 0));
        if (w->shard_fd < 0)
            return fprintf(stderr, "numoe: cannot create the memfd %s for worker %d's shard: %s\n", name, w->id,
                           strerror(errno)), -1;
        v[a++] = strdup("--shard-fd"), v[a++] = xprintf("%d", w->shard_fd);
    }
    if (L->n > 1) v[a++] = strdup("--progress"), v[a++] = strdup("lines"); /* bars of several processes would mix */
    v[a++] = strdup("--attempt"), w->attempt_arg = a, v[a++] = strdup("0");
    if (w->pin_threads) v[a++] = strdup("--pin-threads");
    v[a++] = strdup("--quiet"); /* its errors reach the coordinator as Error messages, printed there */
    v[a] = NULL;
    for (int i = 0; i < a; i++)
        if (!v[i]) return fprintf(stderr, "numoe: out of memory\n"), -1;
    /* the line numactl would run it with: w->binding from the topology, or the
     * node named by --worker-nodes */
    if (!w->binding[0] && w->node >= 0)
        snprintf(w->binding, sizeof w->binding, "--cpunodebind=%d --membind=%d", w->node, w->node);
    fprintf(stderr, "numoe: worker %d:%s%s", w->id, w->binding[0] ? " numactl " : "", w->binding);
    for (int i = 0; i < a; i++) fprintf(stderr, " %s", v[i]);
    fputc('\n', stderr);
    return 0;
}

/* The placement when the command names none: split (every worker a 1/N
 * slice of every expert) unless this model's experts cannot be cut between
 * n workers (their down rows have fewer quantisation blocks than there are
 * workers: small models, many workers); then whole experts, and one line
 * says why. An explicit --placement is used as given, so `--placement split`
 * still fails with the validator's error. A model that does not load keeps
 * split: the coordinator reports the model's error itself. */
static const char *choose_placement(const nm_session_opts *o, int n) {
    if (o->placement) return o->placement;
    const char *pick = "split";
    nm_gguf *g = NULL;
    nm_model m;
    nm_placement p;
    nm_err why, err;
    if (nm_gguf_open(o->model_path, &g, &err)) return pick;
    if (!nm_model_load(&m, g, &err)) {
        if (!nm_placement_for_model(&p, &m, NM_PLACE_SPLIT, n, &why)) {
            nm_placement_free(&p);
        } else if (!nm_placement_for_model(&p, &m, NM_PLACE_EXPERTS, n, &err)) {
            nm_placement_free(&p);
            pick = "experts";
            /* the validator's reason, without its "placement split: " label and
             * its advice (to use experts, which is what happens here) */
            const char *r = why.msg, *lbl = "placement split: ";
            if (!strncmp(r, lbl, strlen(lbl))) r += strlen(lbl);
            const char *advice = strstr(r, "; use --placement");
            fprintf(stderr, "numoe: placement experts (whole experts per worker) instead of the default split, which "
                    "cannot hold this model on %d workers: %.*s\n", n, advice ? (int)(advice - r) : (int)strlen(r), r);
        } /* neither fits: split, whose error the coordinator prints */
        nm_model_free(&m);
    }
    nm_gguf_close(g);
    return pick;
}

/* ram or file (memory.h): --shard-memory, else file when the workers'
 * shards do not fit 90% of the memory they may use, all together or those
 * of one node. One line says which, with the figures. A model that does not
 * load keeps ram: the coordinator reports its error. */
static void choose_shard_memory(launcher *L, const nm_session_opts *o) {
    if (o->shard_memory == NM_SHARD_MEMORY_FILE) {
        L->file_backed = 1;
        fprintf(stderr, "numoe: shard memory: file (--shard-memory file): the workers compute from the model file's "
                "pages\n");
        return;
    }
    if (o->shard_memory == NM_SHARD_MEMORY_RAM) return;
    nm_gguf *g = NULL;
    nm_model m;
    nm_placement p;
    nm_err err;
    if (nm_gguf_open(o->model_path, &g, &err)) return;
    if (nm_model_load(&m, g, &err)) {
        nm_gguf_close(g);
        return;
    }
    if (nm_placement_for_model_spec(&p, &m, L->placement, L->n, &err)) {
        nm_model_free(&m);
        nm_gguf_close(g);
        return;
    }
    uint64_t total = 0;
    nm_mem_avail all, worst = {.bytes = UINT64_MAX};
    uint64_t worst_need = 0;
    nm_mem_available(-1, &all);
    int multi = numa_available() >= 0 && numa_num_configured_nodes() > 1;
    for (int i = 0; i < L->n; i++) total += nm_mem_shard_bytes(&m, &p, i);
    for (int i = 0; multi && i < L->n; i++) { /* per node: the workers bound there */
        int node = L->w[i].node, first = 1;
        for (int j = 0; j < i; j++) first &= L->w[j].node != node;
        if (node < 0 || !first) continue;
        uint64_t need = 0;
        for (int j = 0; j < L->n; j++) need += L->w[j].node == node ? nm_mem_shard_bytes(&m, &p, j) : 0;
        nm_mem_avail a;
        nm_mem_available(node, &a);
        if (a.bytes != UINT64_MAX && (double)need > 0.9 * (double)a.bytes && need > worst_need)
            worst = a, worst_need = need;
    }
    nm_placement_free(&p);
    nm_model_free(&m);
    nm_gguf_close(g);
    const double G = 1073741824.0;
    if (worst_need) {
        L->file_backed = 1;
        fprintf(stderr, "numoe: shard memory: file: the shards of one node (%.2f GiB) do not fit 90%% of what it may use "
                "(%s); the workers compute from the model file's pages (--shard-memory ram to insist)\n",
                (double)worst_need / G, worst.what);
    } else if (all.bytes != UINT64_MAX && (double)total > 0.9 * (double)all.bytes) {
        L->file_backed = 1;
        fprintf(stderr, "numoe: shard memory: file: the workers' shards (%.2f GiB) do not fit 90%% of the memory they "
                "may use (%.2f GiB: %s); they compute from the model file's pages (--shard-memory ram to insist)\n",
                (double)total / G, (double)all.bytes / G, all.what);
    } else {
        fprintf(stderr, "numoe: shard memory: ram: the workers' shards (%.2f GiB) fit the memory they may use (%.2f GiB: "
                "%s)\n", (double)total / G, all.bytes == UINT64_MAX ? 0.0 : (double)all.bytes / G, all.what);
    }
}

/* The coordinator is told through its control socket that worker w will not
 * come back; it fails the layer it waits for with this reason. */
static void tell_coordinator(launcher *L, lworker *w, const char *msg) {
    if (!L->zctx) {
        int linger = 200; /* a coordinator that is gone will not read it: do not hold the exit up */
        if (!(L->zctx = zmq_ctx_new()) || !(L->zsock = zmq_socket(L->zctx, ZMQ_DEALER)) ||
            zmq_setsockopt(L->zsock, ZMQ_LINGER, &linger, sizeof linger) || zmq_connect(L->zsock, L->endpoint)) {
            fprintf(stderr, "numoe: cannot reach the coordinator at %s: %s\n", L->endpoint, zmq_strerror(zmq_errno()));
            return;
        }
    }
    Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
    Numoe__Error e = NUMOE__ERROR__INIT;
    e.worker_id = (uint32_t)w->id;
    e.message = (char *)msg;
    e.from_launcher = 1;
    env.msg_case = NUMOE__ENVELOPE__MSG_ERROR, env.error = &e;
    nm_err err;
    if (nm_wire_send(L->zsock, NULL, &env, &err)) fprintf(stderr, "numoe: %s\n", err.msg);
}

static void on_worker_exit(launcher *L, lworker *w, int st) {
    char how[96], msg[400];
    pid_t pid = w->pid;
    w->pid = 0;
    describe_exit(st, how, sizeof how);
    if (L->coord_done) {
        w->finished = 1;
        /* status 3: an error it reported, and the coordinator's own error came first */
        if (!w->told_to_end && (!WIFEXITED(st) || (WEXITSTATUS(st) && WEXITSTATUS(st) != NM_WORKER_EXIT_ERROR)))
            fprintf(stderr, "numoe: worker %d (pid %d) %s at shutdown\n", w->id, (int)pid, how);
        return;
    }
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) { /* the coordinator's Shutdown */
        w->finished = 1;
        return;
    }
    if (L->stopping) { /* e.g. systemd's SIGTERM to the whole group: no restarts now */
        w->finished = 1;
        snprintf(msg, sizeof msg, "worker %d (pid %d) %s while numoe was shutting down", w->id, (int)pid, how);
        tell_coordinator(L, w, msg); /* so a layer waiting for it ends now */
        return;
    }
    if (nm_now_s() - w->started >= RESTART_RESET_S) w->in_row = 0;
    int reported = WIFEXITED(st) && WEXITSTATUS(st) == NM_WORKER_EXIT_ERROR;
    if (L->keep_trying && L->max_restarts > 0 && (reported || w->in_row >= L->max_restarts)) {
        /* a server must come back by itself: the coordinator is told, so the
         * layer waiting for this worker fails now (and /health says why),
         * and the worker is tried again at the capped back-off for as long
         * as the server runs; its Register re-arms the coordinator */
        snprintf(msg, sizeof msg, "worker %d (pid %d) %s%s; gave up after %d restart attempt%s for now; trying again "
                 "every %d ms", w->id, (int)pid, how, reported ? " after an error it reported" : "", w->in_row,
                 w->in_row == 1 ? "" : "s", BACKOFF_CAP_MS);
        fprintf(stderr, "numoe: %s\n", msg);
        tell_coordinator(L, w, msg);
        w->in_row++;
        w->restart_at = nm_now_s() + BACKOFF_CAP_MS * 1e-3;
        return;
    }
    if (reported || w->in_row >= L->max_restarts) {
        w->finished = 1;
        if (reported)
            snprintf(msg, sizeof msg, "worker %d (pid %d) %s after an error it reported; not restarted", w->id,
                     (int)pid, how);
        else if (L->max_restarts == 0)
            snprintf(msg, sizeof msg, "worker %d (pid %d) %s; not restarted (NUMOE_WORKER_RESTARTS=0)", w->id, (int)pid, how);
        else
            snprintf(msg, sizeof msg, "worker %d (pid %d) %s; gave up after %d restart attempt%s", w->id, (int)pid, how,
                     w->in_row, w->in_row > 1 ? "s" : "");
        if (!reported) fprintf(stderr, "numoe: %s\n", msg); /* the coordinator prints the reported one */
        tell_coordinator(L, w, msg);
        return;
    }
    static const int backoff_ms[] = {10, 50, 250, 1000, BACKOFF_CAP_MS};
    int nb = (int)(sizeof backoff_ms / sizeof *backoff_ms);
    int ms = backoff_ms[w->in_row < nb ? w->in_row : nb - 1];
    w->in_row++;
    w->restart_at = nm_now_s() + ms * 1e-3;
    fprintf(stderr, "numoe: worker %d (pid %d) %s; restarting it in %d ms (attempt %d of %d)\n", w->id, (int)pid, how,
            ms, w->in_row, L->max_restarts);
}

static void do_restarts(launcher *L) {
    double t = nm_now_s();
    for (int i = 0; i < L->n; i++) {
        lworker *w = &L->w[i];
        if (w->finished || w->pid || w->restart_at <= 0 || w->restart_at > t) continue;
        w->restarts++;
        free(w->argv[w->attempt_arg]);
        w->argv[w->attempt_arg] = xprintf("%d", w->restarts);
        if (!w->argv[w->attempt_arg] || start_worker(L, w)) {
            char msg[200];
            snprintf(msg, sizeof msg, "worker %d could not be restarted", w->id);
            w->finished = 1;
            tell_coordinator(L, w, msg);
        }
    }
}

static void reap(launcher *L) {
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        if (pid == L->coord) {
            L->coord_status = st, L->coord_done = 1, L->coord = 0;
            continue;
        }
        for (int i = 0; i < L->n; i++)
            if (L->w[i].pid == pid) on_worker_exit(L, &L->w[i], st);
    }
}

/* After the coordinator: the workers follow its Shutdown, or are made to. */
static void wind_down(launcher *L, int coordinator_crashed) {
    double t0 = nm_now_s();
    for (int phase = 0; phase < 3; phase++) {
        double grace = phase == 0 ? (coordinator_crashed ? 0.0 : 3.0) : 2.0;
        for (;;) {
            reap(L);
            int left = 0;
            for (int i = 0; i < L->n; i++) left += L->w[i].pid > 0;
            if (!left || nm_now_s() - t0 >= grace) break;
            struct timespec ts = {0, 2000000};
            nanosleep(&ts, NULL);
        }
        for (int i = 0; i < L->n; i++) {
            lworker *w = &L->w[i];
            if (w->pid <= 0) continue;
            if (phase == 0 && !coordinator_crashed)
                fprintf(stderr, "numoe: worker %d (pid %d) did not shut down; sending SIGTERM\n", i, (int)w->pid);
            if (phase < 2) kill(w->pid, phase == 0 ? SIGTERM : SIGKILL), w->told_to_end = 1;
        }
        t0 = nm_now_s();
    }
}

/* Every name of this run starts /numoe-<launcher pid>-: the workers' shard
 * segments and the slots the coordinator made (the workers unlink those once
 * mapped, so only a start that failed half-way leaves one). */
static void remove_segments(void) {
    DIR *d = opendir("/dev/shm");
    char prefix[32];
    int np = snprintf(prefix, sizeof prefix, "numoe-%d-", (int)getpid());
    struct dirent *de;
    while (d && (de = readdir(d))) {
        if (strncmp(de->d_name, prefix, (size_t)np)) continue;
        char name[300];
        snprintf(name, sizeof name, "/%s", de->d_name);
        shm_unlink(name);
    }
    if (d) closedir(d);
}

int nm_launch(int argc, char **argv, const nm_session_opts *o, int n_workers) {
    launcher L = {0};
    char exe[PATH_MAX], self[PATH_MAX];
    if (n_workers < 1 || n_workers > NM_MAX_WORKERS)
        return fprintf(stderr, "numoe: --workers %d: between 0 and %d\n", n_workers, NM_MAX_WORKERS), 2;
    if (find_worker_exe(exe, sizeof exe)) return 1;
    ssize_t ns = readlink("/proc/self/exe", self, sizeof self - 1);
    if (ns <= 0) return fprintf(stderr, "numoe: cannot read /proc/self/exe: %s\n", strerror(errno)), 1;
    self[ns] = 0;
    const char *rs = getenv("NUMOE_WORKER_RESTARTS");
    L.max_restarts = rs && *rs ? atoi(rs) : RESTARTS_DEFAULT;
    if (L.max_restarts < 0) L.max_restarts = 0;
    const char *h = getenv("NUMOE_HANDOFF");
    if (h && !strcmp(h, "zmq")) L.max_restarts = 0; /* the ZeroMQ hand-off cannot re-send a layer */
    L.keep_trying = argc > 1 && !strcmp(argv[1], "serve");
    nm_slot_sweep_stale();
    uint32_t rnd = 0;
    if (getrandom(&rnd, sizeof rnd, GRND_NONBLOCK) != sizeof rnd) rnd = (uint32_t)nm_now_ns();
    snprintf(L.endpoint, sizeof L.endpoint, "ipc://@numoe-%d-%08x", (int)getpid(), rnd); /* abstract: no file */
    char nbuf[16];
    snprintf(nbuf, sizeof nbuf, "%d", n_workers);
    if (setenv("NUMOE_LAUNCH_ENDPOINT", L.endpoint, 1) || setenv("NUMOE_LAUNCH_WORKERS", nbuf, 1))
        return fprintf(stderr, "numoe: setenv: %s\n", strerror(errno)), 1;

    if (!(L.w = calloc((size_t)n_workers, sizeof *L.w))) return fprintf(stderr, "numoe: out of memory\n"), 1;
    L.n = n_workers;
    L.placement = choose_placement(o, n_workers);
    int machine_nodes = numa_available() < 0 ? 1 : numa_num_configured_nodes();
    /* Placement on the machine (unless --worker-nodes names the nodes): the
     * topology's, as `numoe topology --workers N` prints it - whole nodes per
     * worker, or, with more workers than nodes, a contiguous share of a node's
     * cores each (the workers pinned there, so they never compete for a core).
     * hwloc without its PCI discovery: it costs time, and leaks under LSan. */
    nm_topology topo;
    nm_err err;
    int have_topo = !o->n_worker_nodes && !nm_topology_discover(&topo, NULL, 0, &err);
    for (int i = 0; i < L.n; i++) {
        lworker *w = &L.w[i];
        w->id = i;
        w->shard_fd = -1;
        w->node = o->n_worker_nodes > 0 ? o->worker_nodes[i % o->n_worker_nodes] : machine_nodes > 1 ? i % machine_nodes : -1;
        int node = -1, cpus[CPU_SETSIZE];
        if (!have_topo || nm_topology_worker_binding(&topo, L.n, i, w->binding, sizeof w->binding, &node, &err)) {
            w->binding[0] = 0;
            continue;
        }
        if (machine_nodes > 1) w->node = node;
        int n = nm_topology_worker_cpus(&topo, L.n, i, cpus, CPU_SETSIZE, &node, &err);
        CPU_ZERO(&w->cpus);
        for (int c = 0; c < n; c++)
            if (cpus[c] >= 0 && cpus[c] < CPU_SETSIZE) CPU_SET(cpus[c], &w->cpus);
        w->pinned = n > 0 && CPU_COUNT(&w->cpus) > 0;
        if (!w->pinned && machine_nodes == 1) w->binding[0] = 0; /* one node, whole machine: nothing to bind */
    }
    if (have_topo) nm_topology_free(&topo);
    int rc = 0;
    choose_shard_memory(&L, o);
    for (int i = 0; i < L.n && !rc; i++) {
        lworker *w = &L.w[i];
        int sharing = 0;
        for (int j = 0; j < L.n; j++) sharing += L.w[j].node == w->node;
        int th = o->worker_threads > 0 ? o->worker_threads
                 : w->pinned             ? CPU_COUNT(&w->cpus)
                                         : cpus_of_node(w->node) / sharing;
        w->threads = th > 0 ? th : 1;
        const char *pin = getenv("NUMOE_PIN_THREADS");
        w->pin_threads = (w->pinned || sharing == 1) && !(pin && !strcmp(pin, "0"));
        rc = build_worker(&L, w, exe, o);
    }

    /* the signals are taken synchronously below; children get them back */
    sigset_t set;
    sigemptyset(&set);
    int sigs[] = {SIGCHLD, SIGINT, SIGTERM, SIGHUP, SIGQUIT};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) sigaddset(&set, sigs[i]);
    sigprocmask(SIG_BLOCK, &set, NULL);
    for (int i = 0; i < L.n && !rc; i++) rc = start_worker(&L, &L.w[i]);
    char **cargv = rc ? NULL : calloc((size_t)argc + 3, sizeof *cargv);
    if (cargv) {
        cargv[0] = "numoe-coordinator";
        for (int i = 1; i < argc; i++) cargv[i] = argv[i];
        if (!o->placement) /* the coordinator must expect the placement the workers were given */
            cargv[argc] = "--placement", cargv[argc + 1] = (char *)L.placement;
        L.coord = start(self, cargv, 0, NULL, -1);
        if (L.coord < 0) fprintf(stderr, "numoe: cannot start the coordinator: fork: %s\n", strerror(errno)), L.coord = 0;
        free(cargv);
    }
    if (!L.coord) {
        rc = 1;
        L.coord_done = 1;
        L.coord_status = 1 << 8;
    }

    int forwarded = 0;
    while (!L.coord_done) {
        double next = 0;
        for (int i = 0; i < L.n; i++)
            if (!L.w[i].finished && !L.w[i].pid && L.w[i].restart_at > 0 && (!next || L.w[i].restart_at < next))
                next = L.w[i].restart_at;
        double wait = next ? next - nm_now_s() : 1.0;
        if (wait < 0) wait = 0;
        struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
        siginfo_t si;
        int sig = sigtimedwait(&set, &si, &ts);
        if (sig == SIGCHLD) {
            reap(&L);
        } else if (sig > 0 && L.coord) {
            /* a terminal's Ctrl-C went to the coordinator already */
            int from_tty = sig == SIGINT && si.si_code == SI_KERNEL;
            if (!from_tty) {
                kill(L.coord, forwarded >= 2 ? SIGKILL : sig);
                forwarded++;
                L.stopping = 1;
            }
        }
        reap(&L);
        if (!L.coord_done) do_restarts(&L);
    }
    /* a coordinator that failed may not have sent Shutdown (say, it stopped at a
     * bad model before the workers registered): do not wait for them then */
    int crashed = rc || !WIFEXITED(L.coord_status) || WEXITSTATUS(L.coord_status);
    wind_down(&L, crashed);
    remove_segments();
    if (L.zsock) zmq_close(L.zsock);
    if (L.zctx) zmq_ctx_term(L.zctx);
    for (int i = 0; i < L.n; i++) {
        for (int j = 0; L.w[i].argv[j]; j++) free(L.w[i].argv[j]);
        if (L.w[i].shard_fd >= 0) close(L.w[i].shard_fd); /* the last holder: the shard's memory goes */
    }
    free(L.w);
    if (rc) return rc;
    if (WIFSIGNALED(L.coord_status)) {
        int sig = WTERMSIG(L.coord_status);
        signal(sig, SIG_DFL);
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, sig);
        sigprocmask(SIG_UNBLOCK, &one, NULL);
        raise(sig);
        return 128 + sig;
    }
    return WIFEXITED(L.coord_status) ? WEXITSTATUS(L.coord_status) : 1;
}
