#include "coordinator/cli/session.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <numa.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "coordinator/experts/remote.h"
#include "kernels/quant.h"
#include "proto/numoe.pb-c.h"

const char nm_session_opts_help[] =
    "  -m, --model FILE        GGUF model (first part of a split model)\n"
    "  -t, --threads N         CPU threads (default: all online CPUs)\n"
    "  -c, --ctx-size N        KV cache positions (default: min(model context, 4096))\n"
    "  -b, --batch N           prefill chunk in tokens (default 512)\n"
    "      --experts-used K    routed experts per token, at most the model's count (default: the model's)\n"
    "      --no-prefault       page the model in lazily instead of reading it all at start-up\n"
    "      --workers N         routed experts in N numoe-worker processes (shm + ZeroMQ), each holding\n"
    "                          its share once, started and restarted by numoe; 0 = in this process\n"
    "                          (fastest on a one-node machine: no hand-off). Default: one per NUMA node;\n"
    "                          more workers than nodes split each node's cores\n"
    "      --placement P       how the workers share the experts: split (1/N of every expert's ff\n"
    "                          dimension each; default), experts (whole experts, contiguous ids),\n"
    "                          experts-rr (whole experts, round-robin), or a map FILE (configs/README.md;\n"
    "                          `numoe placement --profile` balances one from a --dump-routing file)\n"
    "      --worker-threads N  compute threads per worker (default: its node's CPUs / workers on it)\n"
    "      --worker-nodes L    NUMA node of each worker, comma-separated, repeated cyclically\n"
    "                          (default: round-robin over the nodes when there are several)\n"
    "      --worker-timeout S  a worker that does not answer a layer within S seconds is killed and\n"
    "                          restarted, and gets the layer again (300)\n"
    "      --worker-endpoints tcp://H1:P1,tcp://H2:P2,...\n"
    "                          use workers started by hand (maybe on other hosts) instead of spawning\n"
    "                          them: worker i is `numoe-worker --worker-id i --workers N --placement P\n"
    "                          --listen` at the i-th endpoint, with its own copy of the model file;\n"
    "                          activations travel inline over tcp (no shm). Nobody here restarts them;\n"
    "                          one that is lost is waited for (NUMOE_WORKER_RECONNECT_S, default 60) to\n"
    "                          come back at its endpoint, then sent the layer again\n"
    "      --worker-key FILE   encrypt and authenticate the tcp workers' traffic (ZeroMQ CURVE) with this\n"
    "                          key file, the one the workers got as --key (`numoe keygen FILE` makes one)\n";

static int parse_int(const char *cmd, const char *opt, const char *v, long long lo, long long hi, long long *out) {
    char *end;
    long long x = v ? strtoll(v, &end, 10) : 0;
    if (!v || *end || end == v || x < lo || x > hi) {
        fprintf(stderr, "%s: %s needs an integer in %lld..%lld (got '%s')\n", cmd, opt, lo, hi, v ? v : "");
        return -1;
    }
    *out = x;
    return 0;
}

int nm_session_parse_opt(nm_session_opts *o, int argc, char **argv, int *i, const char *cmd) {
    const char *a = argv[*i], *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    long long x;
    if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
        if (!v) return fprintf(stderr, "%s: %s needs a file\n", cmd, a), -1;
        o->model_path = v;
    } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
        if (parse_int(cmd, a, v, 1, 4096, &x)) return -1;
        o->threads = (int)x;
    } else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) {
        if (parse_int(cmd, a, v, 1, 1 << 24, &x)) return -1;
        o->ctx_size = x;
    } else if (!strcmp(a, "-b") || !strcmp(a, "--batch")) {
        if (parse_int(cmd, a, v, 1, 1 << 16, &x)) return -1;
        o->batch = x;
    } else if (!strcmp(a, "--no-prefault")) {
        o->no_prefault = 1;
        return 1; /* a flag: no value to skip */
    } else if (!strcmp(a, "--experts-used")) {
        if (parse_int(cmd, a, v, 1, 1024, &x)) return -1;
        o->experts_used = (int)x;
    } else if (!strcmp(a, "--workers")) {
        if (parse_int(cmd, a, v, 0, NM_MAX_WORKERS, &x)) return -1;
        o->workers = (int)x;
        o->workers_set = 1;
    } else if (!strcmp(a, "--placement")) {
        if (!v || (strcmp(v, "split") && strcmp(v, "experts") && strcmp(v, "experts-rr") && access(v, R_OK)))
            return fprintf(stderr, "%s: --placement must be split, experts, experts-rr or a readable map file (got '%s')\n",
                           cmd, v ? v : ""), -1;
        o->placement = v;
    } else if (!strcmp(a, "--worker-threads")) {
        if (parse_int(cmd, a, v, 1, 4096, &x)) return -1;
        o->worker_threads = (int)x;
    } else if (!strcmp(a, "--worker-nodes")) {
        const char *p = v;
        o->n_worker_nodes = 0;
        while (p && *p) {
            char *end;
            long n = strtol(p, &end, 10);
            if (end == p || n < 0 || n > 1 << 20 || (*end && *end != ',') ||
                o->n_worker_nodes == (int)(sizeof o->worker_nodes / sizeof *o->worker_nodes)) {
                p = NULL;
                break;
            }
            o->worker_nodes[o->n_worker_nodes++] = (int)n;
            p = *end ? end + 1 : end;
        }
        if (!p || !o->n_worker_nodes)
            return fprintf(stderr, "%s: --worker-nodes needs comma-separated NUMA node numbers (got '%s')\n", cmd,
                           v ? v : ""), -1;
    } else if (!strcmp(a, "--worker-endpoints")) {
        if (!v || strncmp(v, "tcp://", 6))
            return fprintf(stderr, "%s: --worker-endpoints needs comma-separated tcp://HOST:PORT endpoints (got '%s')\n",
                           cmd, v ? v : ""), -1;
        o->worker_endpoints = v;
    } else if (!strcmp(a, "--worker-key")) {
        if (!v) return fprintf(stderr, "%s: --worker-key needs a key file (`numoe keygen FILE`)\n", cmd), -1;
        o->worker_key = v;
    } else if (!strcmp(a, "--worker-timeout")) {
        if (parse_int(cmd, a, v, 1, 1 << 24, &x)) return -1;
        o->worker_timeout = (double)x;
    } else {
        return 0;
    }
    (*i)++;
    return 1;
}

int nm_session_open(nm_session *s, const nm_session_opts *o, nm_err *err) {
    memset(s, 0, sizeof *s);
    if (!o->model_path) return nm_errf(err, "no model given (--model FILE.gguf)");
    double t0 = nm_now_s();
    if (nm_gguf_open(o->model_path, &s->gguf, err)) return -1;
    if (nm_model_load(&s->model, s->gguf, err)) {
        nm_session_close(s);
        return -1;
    }
    /* the launcher (launch/launcher.h) started the workers and says how many */
    const char *launched = getenv("NUMOE_LAUNCH_WORKERS");
    int n_workers = launched ? atoi(launched) : o->workers;
    if (!launched && !o->workers_set && !o->worker_endpoints) {
        int nodes = numa_available() < 0 ? 1 : numa_num_configured_nodes();
        n_workers = nodes > 0 ? nodes : 1;
    }
    /* in-process experts read the whole file; workers copy their own shards */
    int remote = n_workers > 0 || o->worker_endpoints;
    prctl(PR_SET_NAME, "numoe-coordinator"); /* the kernel keeps 15 bytes: numoe-coordinat */
    if (!o->no_prefault && !remote) nm_gguf_prefault(s->gguf, 1);
    const nm_hparams *hp = &s->model.hp;
    int64_t ctx = o->ctx_size ? o->ctx_size : (hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096);
    if (o->experts_used > hp->n_expert_used) {
        nm_session_close(s);
        return nm_errf(err, "--experts-used %d: the model routes to %lld experts per token; numoe can lower it, not raise it",
                       o->experts_used, (long long)hp->n_expert_used);
    }
    if (!(s->pool = nm_pool_create(o->threads))) {
        nm_session_close(s);
        return nm_errf(err, "cannot start %d threads", o->threads);
    }
    /* With workers polling on the same cores, thread i stays on CPU i: migrating
     * threads made decode swing by 2x and cost 20-30% under server load; alone
     * (in-process) pinning measured neutral to 10% worse under load, where the
     * scheduler does better moving threads off cores the HTTP side is using
     * (docs/NUMA.md). NUMOE_PIN_THREADS=0 / 1 overrides either way. */
    const char *pin = getenv("NUMOE_PIN_THREADS");
    if (pin ? !strcmp(pin, "1") : launched != NULL) nm_pool_pin(s->pool);
    if (remote) {
        nm_remote_opts ro = {.n_workers = n_workers, .placement = o->placement ? o->placement : "split",
                             .timeout_s = o->worker_timeout, .key_path = o->worker_key, .max_tok = o->batch ? o->batch : 512, .max_k = (int)hp->n_expert_used, .verbose = 1,
                             .endpoints = o->worker_endpoints};
        const char *h = getenv("NUMOE_HANDOFF"); /* developer knob: zmq = per-layer hand-off over ZeroMQ */
        ro.handoff = h && !strcmp(h, "zmq") ? NUMOE__HANDOFF__HANDOFF_ZMQ : NUMOE__HANDOFF__HANDOFF_DOORBELL;
        s->experts = nm_experts_remote_create(&s->model, &ro, err);
        /* the workers hold the routed experts: drop any expert pages this process
         * touched (identity hash, fault-around) so its RSS has no second copy */
        long page = sysconf(_SC_PAGESIZE);
        for (uint64_t i = 0; s->experts && i < s->gguf->n_tensors; i++) {
            const nm_gguf_tensor *t = &s->gguf->tensors[i];
            if (!strstr(t->name, "_exps.")) continue;
            uintptr_t a = ((uintptr_t)t->data + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
            uintptr_t b = ((uintptr_t)t->data + t->nbytes) & ~((uintptr_t)page - 1);
            if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
        }
    } else {
        s->experts = nm_experts_local_create(&s->model, s->pool, err);
    }
    if (!s->experts ||
        nm_forward_init(&s->fwd, &s->model, s->pool, s->experts, ctx, o->batch ? o->batch : 512, o->experts_used,
                        err)) {
        nm_session_close(s);
        return -1;
    }
    fprintf(stderr,
            "numoe: %s: deepseek2, %lld layers (%lld dense), embd %lld, %lld heads, q_lora %lld, kv_lora %lld, "
            "%lld experts (%d used, %lld shared), vocab %lld; ctx %lld, %d threads, %s%s; loaded in %.2f s\n",
            o->model_path, (long long)hp->n_layer, (long long)hp->n_dense, (long long)hp->n_embd,
            (long long)hp->n_head, (long long)hp->q_lora, (long long)hp->kv_lora, (long long)hp->n_expert,
            s->fwd.n_expert_used, (long long)hp->n_shared, (long long)hp->n_vocab, (long long)ctx,
            nm_pool_size(s->pool), nm_isa_name(nm_isa_best()), remote ? ", routed experts in workers" : "",
            nm_now_s() - t0);
    return 0;
}

void nm_session_close(nm_session *s) {
    if (s->fwd.m) nm_forward_free(&s->fwd);
    if (s->experts) s->experts->destroy(s->experts);
    if (s->pool) nm_pool_destroy(s->pool);
    if (s->model.layers || s->model.owned) nm_model_free(&s->model);
    nm_gguf_close(s->gguf);
    memset(s, 0, sizeof *s);
}
