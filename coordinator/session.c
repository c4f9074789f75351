#include "coordinator/session.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/quant.h"

const char nm_session_opts_help[] =
    "  -m, --model FILE        GGUF model (first part of a split model)\n"
    "  -t, --threads N         CPU threads (default: all online CPUs)\n"
    "  -c, --ctx-size N        KV cache positions (default: min(model context, 4096))\n"
    "  -b, --batch N           prefill chunk in tokens (default 512)\n"
    "      --experts-used K    routed experts per token, at most the model's count (default: the model's)\n";

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
    } else if (!strcmp(a, "--experts-used")) {
        if (parse_int(cmd, a, v, 1, 1024, &x)) return -1;
        o->experts_used = (int)x;
    } else {
        return 0;
    }
    (*i)++;
    return 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int nm_session_open(nm_session *s, const nm_session_opts *o, nm_err *err) {
    memset(s, 0, sizeof *s);
    if (!o->model_path) return nm_errf(err, "no model given (--model FILE.gguf)");
    double t0 = now_s();
    if (nm_gguf_open(o->model_path, &s->gguf, err)) return -1;
    if (nm_model_load(&s->model, s->gguf, err)) {
        nm_session_close(s);
        return -1;
    }
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
    if (!(s->experts = nm_experts_local_create(&s->model, s->pool, err)) ||
        nm_forward_init(&s->fwd, &s->model, s->pool, s->experts, ctx, o->batch ? o->batch : 512, o->experts_used,
                        err)) {
        nm_session_close(s);
        return -1;
    }
    fprintf(stderr,
            "numoe: %s: deepseek2, %lld layers (%lld dense), embd %lld, %lld heads, q_lora %lld, kv_lora %lld, "
            "%lld experts (%d used, %lld shared), vocab %lld; ctx %lld, %d threads, %s; loaded in %.2f s\n",
            o->model_path, (long long)hp->n_layer, (long long)hp->n_dense, (long long)hp->n_embd,
            (long long)hp->n_head, (long long)hp->q_lora, (long long)hp->kv_lora, (long long)hp->n_expert,
            s->fwd.n_expert_used, (long long)hp->n_shared, (long long)hp->n_vocab, (long long)ctx,
            nm_pool_size(s->pool), nm_isa_name(nm_isa_best()), now_s() - t0);
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
