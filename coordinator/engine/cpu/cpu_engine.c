/* cpu_engine.c - the CPU engine (cpu_engine.h): nm_engine's functions over
 * forward.c. A sequence is a latent KV cache in its own anonymous mapping;
 * a step hands the segments to nm_forward_batch, then copies the logits rows
 * the callers asked for and draws the tokens they asked for on the host. */
#include "coordinator/engine/cpu/cpu_engine.h"

#include <stdlib.h>
#include <string.h>

#include "coordinator/engine/cpu/forward.h"
#include "coordinator/engine/cpu/kv_cache.h"

struct nm_engine_seq {
    nm_kv_cache kv;
};

typedef struct {
    nm_engine base;
    nm_forward fwd;
    nm_forward_seq *fseg; /* the step's segments as forward.c takes them */
    int cap_seg;
} cpu_engine;

static nm_engine_seq *cpu_seq_new(nm_engine *e, int64_t n_ctx, nm_err *err) {
    cpu_engine *ce = (cpu_engine *)e;
    const nm_hparams *hp = &ce->fwd.m->hp;
    if (n_ctx < 1 || n_ctx > ce->fwd.n_ctx) {
        nm_errf(err, "a sequence of %lld positions: the engine was made for 1..%lld (--ctx-size)", (long long)n_ctx,
                (long long)ce->fwd.n_ctx);
        return NULL;
    }
    nm_engine_seq *s = calloc(1, sizeof *s);
    if (!s) {
        nm_errf(err, "out of memory");
        return NULL;
    }
    if (nm_kv_cache_alloc(&s->kv, hp->n_layer, n_ctx, hp->kv_lora + hp->d_rope, err)) {
        free(s);
        return NULL;
    }
    return s;
}

static void cpu_seq_free(nm_engine *e, nm_engine_seq *s) {
    (void)e;
    nm_kv_cache_free(&s->kv);
    free(s);
}

static int64_t cpu_seq_len(const nm_engine *e, const nm_engine_seq *s) {
    (void)e;
    return s->kv.n_pos;
}

static int64_t cpu_seq_ctx(const nm_engine *e, const nm_engine_seq *s) {
    (void)e;
    return s->kv.n_ctx;
}

static void cpu_seq_rewind(nm_engine *e, nm_engine_seq *s, int64_t n) {
    (void)e;
    if (n >= 0 && n < s->kv.n_pos) s->kv.n_pos = n;
}

static int cpu_step(nm_engine *e, nm_engine_segment *segs, int n_segs, nm_err *err) {
    cpu_engine *ce = (cpu_engine *)e;
    int64_t V = e->info.n_vocab;
    if (n_segs > ce->cap_seg) {
        nm_forward_seq *nf = realloc(ce->fseg, (size_t)n_segs * sizeof *nf);
        if (!nf) return nm_errf(err, "out of memory for a step of %d segments", n_segs);
        ce->fseg = nf, ce->cap_seg = n_segs;
    }
    for (int i = 0; i < n_segs; i++) {
        const nm_engine_segment *g = &segs[i];
        for (int j = 0; j < i; j++)
            if (segs[j].seq == g->seq) return nm_errf(err, "batch segments %d and %d are the same sequence", j, i);
        int64_t rows = g->logits && g->all_logits ? g->n : g->logits || g->sampler ? 1 : 0;
        ce->fseg[i] = (nm_forward_seq){.kv = &g->seq->kv, .tokens = g->tokens, .n = g->n, .rows = rows};
    }
    if (nm_forward_batch(&ce->fwd, ce->fseg, n_segs, err)) return -1;
    for (int i = 0; i < n_segs; i++) {
        nm_engine_segment *g = &segs[i];
        const nm_forward_seq *q = &ce->fseg[i];
        if (g->logits) memcpy(g->logits, q->logits, (size_t)q->rows * (size_t)V * sizeof(float));
        if (g->sampler) *g->token = nm_sampler_sample(g->sampler, q->logits + (q->rows - 1) * V, V);
    }
    return 0;
}

static int cpu_route_log(nm_engine *e, FILE *f, nm_err *err) {
    (void)err;
    ((cpu_engine *)e)->fwd.route_log = f;
    return 0;
}

static void cpu_stats(const nm_engine *e, nm_engine_stats *out) {
    const nm_forward *f = &((const cpu_engine *)e)->fwd;
    *out = (nm_engine_stats){.steps = f->n_steps, .tokens = f->n_tokens, .expert_wait_s = f->expert_wait_s};
}

static void cpu_destroy(nm_engine *e) {
    cpu_engine *ce = (cpu_engine *)e;
    nm_forward_free(&ce->fwd);
    free(ce->fseg);
    free(ce);
}

nm_engine *nm_engine_cpu_create(const nm_model *m, nm_pool *pool, nm_expert_backend *experts,
                                const nm_engine_cpu_opts *o, nm_err *err) {
    cpu_engine *ce = calloc(1, sizeof *ce);
    if (!ce) {
        nm_errf(err, "out of memory");
        return NULL;
    }
    if (nm_forward_init(&ce->fwd, m, pool, experts, o->n_ctx, o->n_batch > 0 ? o->n_batch : 512, o->n_expert_used,
                        err)) {
        free(ce);
        return NULL;
    }
    ce->fwd.sync_experts = o->sync_experts;
    /* the attention's form (forward.c attn_decompress): per run by counting
     * multiply-adds; NUMOE_CPU_ATTN=absorbed|decompressed forces one (tests
     * run every fixture through both) */
    const char *attn = getenv("NUMOE_CPU_ATTN");
    if (attn && *attn && strcmp(attn, "auto") && strcmp(attn, "absorbed") && strcmp(attn, "decompressed")) {
        nm_errf(err, "NUMOE_CPU_ATTN=%s: use auto (the default), absorbed or decompressed", attn);
        nm_forward_free(&ce->fwd);
        free(ce);
        return NULL;
    }
    ce->fwd.attn_mode = !attn || !*attn || !strcmp(attn, "auto") ? NM_ATTN_AUTO
                        : !strcmp(attn, "absorbed")              ? NM_ATTN_ABSORBED
                                                                 : NM_ATTN_DECOMPRESSED;
    ce->base = (nm_engine){
        .info = {.name = "cpu", .n_vocab = m->hp.n_vocab, .n_ctx = ce->fwd.n_ctx, .n_batch = ce->fwd.n_batch,
                 .n_layer = m->hp.n_layer, .n_expert_used = ce->fwd.n_expert_used},
        .seq_new = cpu_seq_new, .seq_free = cpu_seq_free, .seq_len = cpu_seq_len, .seq_ctx = cpu_seq_ctx,
        .seq_rewind = cpu_seq_rewind, .step = cpu_step, .route_log = cpu_route_log, .stats = cpu_stats,
        .destroy = cpu_destroy};
    return &ce->base;
}
