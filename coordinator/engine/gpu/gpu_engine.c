/* gpu_engine.c - the GPU engine (gpu_engine.h): nm_engine's functions over
 * gpu_forward.h. A sequence is one VRAM latent cache; a step hands the
 * segments to nm_gpu_forward_batch in one pass, copies the logits rows the
 * callers asked for and draws the tokens they asked for on the host.
 * Compiled with NUMOE_CUDA (the Makefile sets it where nvcc exists, outside
 * the sanitizer tree); without it every entry point says why it cannot run. */
#include "coordinator/engine/gpu/gpu_engine.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NO_CUDA_FIX                                                                                                   \
    "this numoe was built without CUDA (no nvcc at build time, or the sanitizer build tree): rebuild with `make` "   \
    "where /usr/local/cuda/bin/nvcc exists (or NVCC=/path/to/nvcc), or run on the CPU with --gpu none"

int nm_pcie_gen_of(const char *speed) {
    /* the per-lane rates of PCIe 1.0 .. 6.0 (GT/s) */
    static const double rate[] = {2.5, 5.0, 8.0, 16.0, 32.0, 64.0};
    char *end = NULL;
    const double v = speed ? strtod(speed, &end) : 0;
    if (!speed || end == speed || strncmp(end, " GT/s", 5)) return 0;
    for (int i = 0; i < (int)(sizeof rate / sizeof rate[0]); i++)
        if (fabs(v - rate[i]) < 0.01) return i + 1;
    return 0;
}

#ifdef NUMOE_CUDA

#include "common/clock.h"
#include "common/ggml_type.h"
#include "common/progress.h"
#include "coordinator/engine/gpu/gpu_forward.h"
#include "kernels/cuda/cuda_quant.h"

struct nm_engine_seq {
    nm_gpu_kv *kv;
};

typedef struct {
    nm_engine base;
    nm_gpu_forward *gf;
    nm_gpu_forward_seq *gseg; /* the step's segments as gpu_forward.h takes them */
    int cap_seg;
    float *rows; /* host logits of segments that want a token but no logits */
    int64_t cap_rows;
    /* sampling from the GPU's top entries (gpu_forward.h's top): per segment
     * slot NM_GPU_TOP_MAX ids / logits / extra logits, and a vocabulary row
     * that is -inf but where a step writes its candidates (and restores) */
    int32_t *top_ids;
    float *top_vals, *extra_vals, *sparse;
    int cap_top;
    uint64_t n_steps, n_tokens;
} gpu_engine;

static nm_engine_seq *gpu_seq_new(nm_engine *e, int64_t n_ctx, nm_err *err) {
    gpu_engine *ge = (gpu_engine *)e;
    if (n_ctx < 1 || n_ctx > e->info.n_ctx) {
        nm_errf(err, "a sequence of %lld positions: the engine was made for 1..%lld (--ctx-size)", (long long)n_ctx,
                (long long)e->info.n_ctx);
        return NULL;
    }
    nm_engine_seq *s = calloc(1, sizeof *s);
    if (!s) {
        nm_errf(err, "out of memory");
        return NULL;
    }
    if (nm_gpu_kv_create(ge->gf, n_ctx, &s->kv, err)) {
        free(s);
        return NULL;
    }
    return s;
}

static void gpu_seq_free(nm_engine *e, nm_engine_seq *s) {
    (void)e;
    nm_gpu_kv_free(s->kv);
    free(s);
}

static int64_t gpu_seq_len(const nm_engine *e, const nm_engine_seq *s) {
    (void)e;
    return nm_gpu_kv_pos(s->kv);
}

static int64_t gpu_seq_ctx(const nm_engine *e, const nm_engine_seq *s) {
    (void)e;
    return nm_gpu_kv_ctx(s->kv);
}

static void gpu_seq_rewind(nm_engine *e, nm_engine_seq *s, int64_t n) {
    (void)e;
    nm_gpu_kv_rewind(s->kv, n);
}

/* How many top entries a sampler's draw needs from the GPU: the draw only
 * looks at what top-k keeps of the penalised logits (greedy: the argmax),
 * and those are among the top (k + W) raw logits plus the W ids the
 * penalties change (a token outside the window is below at most k - 1
 * others after the penalties, so at most k - 1 + W before). 0: the whole
 * row is needed (top-k off or over the limit: top-p / plain softmax see the
 * whole vocabulary). */
static int top_needed(const nm_sampler *s, int64_t V) {
    const int w = s->hist ? s->hist_n : 0;
    const int64_t k = s->par.temp <= 0 ? 1 : s->par.top_k > 0 ? s->par.top_k : 0;
    if (k == 0 || k + w > NM_GPU_TOP_MAX) return 0;
    return (int)(k + w < V ? k + w : V);
}

static int gpu_step(nm_engine *e, nm_engine_segment *segs, int n_segs, nm_err *err) {
    gpu_engine *ge = (gpu_engine *)e;
    const int64_t V = e->info.n_vocab;
    if (n_segs < 1) return nm_errf(err, "a step with no segments");
    if (n_segs > ge->cap_seg) {
        nm_gpu_forward_seq *ns = realloc(ge->gseg, (size_t)n_segs * sizeof *ns);
        if (!ns) return nm_errf(err, "out of memory for a step of %d segments", n_segs);
        ge->gseg = ns, ge->cap_seg = n_segs;
    }
    /* a sampler without a logits buffer needs its row on the host, or only
     * the row's top entries (top_needed) */
    int64_t need = 0, total = 0;
    for (int i = 0; i < n_segs; i++) {
        need += !segs[i].logits && segs[i].sampler && !top_needed(segs[i].sampler, V);
        total += segs[i].n;
    }
    if (n_segs > ge->cap_top) {
        int32_t *ti = realloc(ge->top_ids, (size_t)n_segs * NM_GPU_TOP_MAX * sizeof *ti);
        if (ti) ge->top_ids = ti;
        float *tv = realloc(ge->top_vals, (size_t)n_segs * NM_GPU_TOP_MAX * sizeof *tv);
        if (tv) ge->top_vals = tv;
        float *ev = realloc(ge->extra_vals, (size_t)n_segs * NM_GPU_TOP_MAX * sizeof *ev);
        if (ev) ge->extra_vals = ev;
        if (!ti || !tv || !ev) return nm_errf(err, "out of memory for the sampling candidates of %d segments", n_segs);
        ge->cap_top = n_segs;
    }
    if (!ge->sparse) {
        if (!(ge->sparse = malloc((size_t)V * sizeof *ge->sparse))) return nm_errf(err, "out of memory");
        for (int64_t j = 0; j < V; j++) ge->sparse[j] = -INFINITY;
    }
    if (total > e->info.n_batch)
        return nm_errf(err, "a step of %lld tokens exceeds the batch of %lld (--batch)", (long long)total,
                       (long long)e->info.n_batch);
    if (need > ge->cap_rows) {
        float *nr = realloc(ge->rows, (size_t)need * (size_t)V * sizeof *nr);
        if (!nr) return nm_errf(err, "out of memory for %lld logits rows", (long long)need);
        ge->rows = nr, ge->cap_rows = need;
    }
    int64_t r = 0;
    for (int i = 0; i < n_segs; i++) {
        const nm_engine_segment *g = &segs[i];
        const int top = !g->logits && g->sampler ? top_needed(g->sampler, V) : 0;
        float *dst = g->logits ? g->logits : g->sampler && !top ? ge->rows + (size_t)(r++) * (size_t)V : NULL;
        ge->gseg[i] = (nm_gpu_forward_seq){.kv = g->seq->kv, .tokens = g->tokens, .n = g->n, .logits = dst,
                                           .all_logits = g->logits && g->all_logits};
        if (top) {
            const nm_sampler *s = g->sampler;
            nm_gpu_forward_seq *q = &ge->gseg[i];
            q->top = top;
            q->top_ids = ge->top_ids + (size_t)i * NM_GPU_TOP_MAX;
            q->top_logits = ge->top_vals + (size_t)i * NM_GPU_TOP_MAX;
            q->n_extra = s->hist ? s->hist_n : 0;
            q->extra_ids = s->hist;
            q->extra_logits = ge->extra_vals + (size_t)i * NM_GPU_TOP_MAX;
        }
    }
    if (nm_gpu_forward_batch(ge->gf, ge->gseg, n_segs, err)) return -1;
    ge->n_steps++, ge->n_tokens += (uint64_t)total;
    for (int i = 0; i < n_segs; i++) {
        nm_engine_segment *g = &segs[i];
        const nm_gpu_forward_seq *q = &ge->gseg[i];
        if (g->sampler && q->top > 0 && g->sampler->par.temp <= 0 && q->n_extra == 0) {
            /* greedy without penalties: the argmax is the GPU's top entry, as nm_sampler_sample takes it */
            *g->token = q->top_ids[0];
            nm_sampler_accept(g->sampler, q->top_ids[0]);
        } else if (g->sampler && q->top > 0) {
            /* the draw over a row that holds the candidates and -inf elsewhere: the same tokens as the full
             * row (see top_needed); the row is -inf again afterwards */
            for (int j = 0; j < q->top; j++) ge->sparse[q->top_ids[j]] = q->top_logits[j];
            for (int j = 0; j < q->n_extra; j++) ge->sparse[q->extra_ids[j]] = q->extra_logits[j];
            int32_t tok = nm_sampler_sample(g->sampler, ge->sparse, V);
            for (int j = 0; j < q->top; j++) ge->sparse[q->top_ids[j]] = -INFINITY;
            for (int j = 0; j < q->n_extra; j++) ge->sparse[q->extra_ids[j]] = -INFINITY;
            *g->token = tok;
        } else if (g->sampler) {
            const float *last = q->logits + (q->all_logits ? (size_t)(q->n - 1) * (size_t)V : 0);
            *g->token = nm_sampler_sample(g->sampler, last, V);
        }
    }
    return 0;
}

static int gpu_route_log(nm_engine *e, FILE *f, nm_err *err) {
    (void)err;
    nm_gpu_forward_route_log(((gpu_engine *)e)->gf, f);
    return 0;
}

static void gpu_stats(const nm_engine *e, nm_engine_stats *out) {
    const gpu_engine *ge = (const gpu_engine *)e;
    nm_gpu_forward_stats s;
    nm_gpu_forward_get_stats(ge->gf, &s);
    *out = (nm_engine_stats){.steps = ge->n_steps, .tokens = ge->n_tokens, .expert_wait_s = s.t_moe,
                             .step_s = s.t_total, .device_wait_s = s.t_wait, .stream_layers = (uint64_t)s.n_stream_layers,
                             .stream_bytes = s.stream_bytes, .stream_copy_s = s.t_stream_copy,
                             .picks = (uint64_t)s.n_picks, .hot_picks = (uint64_t)s.n_hot_picks,
                             .handoffs = (uint64_t)s.n_moe_calls,
                             .hot_bytes = (double)s.hot_bytes, .routed_bytes = (double)s.routed_bytes};
}

static void gpu_destroy(nm_engine *e) {
    gpu_engine *ge = (gpu_engine *)e;
    nm_gpu_forward_free(ge->gf);
    free(ge->gseg);
    free(ge->rows);
    free(ge->top_ids), free(ge->top_vals), free(ge->extra_vals), free(ge->sparse);
    free(ge);
}

/* The copy of the weights to VRAM, as a start-up step with progress
 * (common/progress.h; part of the load meter /health reports). */
typedef struct {
    nm_progress p;
    int begun;
    uint64_t seen;
} upload_progress;

static void on_upload(void *ctx, uint64_t done, uint64_t total) {
    upload_progress *u = ctx;
    if (!u->begun) {
        nm_progress_begin(&u->p, "numoe: copying the weights to VRAM", total);
        u->begun = 1;
    }
    nm_progress_add(&u->p, done - u->seen);
    nm_load_add(done - u->seen);
    u->seen = done;
}

/* A 0 / 1 environment switch: *v keeps its default when the variable is
 * unset or empty; any other value than 0 or 1 is an error naming both. */
static int env_switch(const char *name, const char *on, const char *off, int *v, nm_err *err) {
    const char *e = getenv(name);
    if (!e || !*e) return 0;
    if (strcmp(e, "0") && strcmp(e, "1"))
        return nm_errf(err, "%s=%s: use 1 (%s%s) or 0 (%s%s)", name, e, on, *v ? ", the default" : "", off,
                       *v ? "" : ", the default");
    *v = e[0] == '1';
    return 0;
}


nm_engine *nm_engine_gpu_create(const nm_model *m, nm_expert_backend *experts, const nm_engine_gpu_opts *o,
                                nm_err *err) {
    char why[512];
    int count = nm_gpu_device_count(why, sizeof why);
    if (o->device < 0 || o->device >= count) {
        if (count > 0)
            nm_errf(err, "--gpu %d: this machine has %d usable CUDA device%s (0..%d); pick one of them or --gpu none",
                    o->device, count, count == 1 ? "" : "s", count - 1);
        else
            nm_errf(err, "--gpu %d: no usable CUDA device: %s; run on the CPU with --gpu none", o->device, why);
        return NULL;
    }
    gpu_engine *ge = calloc(1, sizeof *ge);
    if (!ge) {
        nm_errf(err, "out of memory");
        return NULL;
    }
    nm_gpu_forward_opts go = {.device = o->device, .n_ctx = o->n_ctx, .n_batch = o->n_batch > 0 ? o->n_batch : 512,
                              .n_expert_used = o->n_expert_used, .gemm = NM_GPU_GEMM_F32,
                              .stream_min = o->prefill_experts == NM_PREFILL_EXPERTS_GPU ||
                                                    o->prefill_experts == NM_PREFILL_EXPERTS_SPLIT
                                                ? 1
                                                : -1,
                              .split_half = o->prefill_experts == NM_PREFILL_EXPERTS_SPLIT,
                              .stream_auto = o->prefill_experts == NM_PREFILL_EXPERTS_AUTO,
                              .hot_experts = o->gpu_experts, .hot_counts = o->gpu_expert_counts,
                              .hot_reserve_positions = o->kv_positions > 0 ? o->kv_positions : 0};
    /* CUDA graphs for decode: on unless NUMOE_CUDA_GRAPHS=0 (measured on the
     * H200 box: the rest of an 8-layer step 1.28 -> 0.39 ms; docs/GPU.md) */
    const char *graphs = getenv("NUMOE_CUDA_GRAPHS");
    go.graphs = !(graphs && !strcmp(graphs, "0"));
    /* decode GEMVs on 8-bit activations (integer kernels) unless
     * NUMOE_GPU_GEMV=f32 (kept for measuring one against the other) */
    const char *gemv = getenv("NUMOE_GPU_GEMV");
    if (gemv && *gemv && strcmp(gemv, "f32") && strcmp(gemv, "q8")) {
        nm_errf(err, "NUMOE_GPU_GEMV=%s: use q8 (the default: 8-bit activations) or f32", gemv);
        free(ge);
        return NULL;
    }
    go.q8_gemv = !(gemv && !strcmp(gemv, "f32"));
    /* the 0 / 1 switches, kept for measuring one way against the other:
     * NUMOE_GPU_FUSE (default 1) the residual add, the norm and its 8-bit
     * copy in one kernel, the hand-off written by the kernels into the
     * backend's region; NUMOE_GPU_SPLIT (default 0) long passes sharing
     * their routed experts between the GPU (streamed) and the CPU, sized by
     * the measured cost of each: off because on the H200 box the bounce
     * copies (read, write, DMA read of every streamed byte) and the host's
     * experts share the memory bus and the cores, and a split pass ran at
     * 0.55-0.76x of the streamed one (docs/BENCHMARKS.md, session 13);
     * NUMOE_GPU_AHEAD (default 0) the next decode segment queued while the
     * host computes the experts (its first node waits for them): off
     * because on the H100 box it changed nothing measurable (session 14:
     * the rest of a MoE layer 80-81 against 82-88 us, the step 0.867-0.933
     * against 0.869-0.906 ms); NUMOE_GPU_PDL (default 0) the decode kernels
     * launched so that each starts while the one before finishes
     * (kernels/cuda/pdl.cuh; process-wide): off because there the GPU's part
     * of a MoE layer went 119-120 -> 126-127 us with it (docs/GPU.md) */
    int fuse = 1, split = 0, ahead = 0, pdl = 0;
    if (env_switch("NUMOE_GPU_FUSE", "fused decode kernels", "one launch per step", &fuse, err) ||
        env_switch("NUMOE_GPU_SPLIT", "GPU and CPU share a streamed pass's experts in the measured proportion",
                   "a streamed pass's experts all on the GPU", &split, err) ||
        env_switch("NUMOE_GPU_AHEAD", "each decode segment queued while the host's experts compute",
                   "each decode segment launched after them", &ahead, err) ||
        env_switch("NUMOE_GPU_PDL", "each decode kernel may start while the one before finishes",
                   "each kernel starts after the one before", &pdl, err)) {
        free(ge);
        return NULL;
    }
    nm_cuda_set_pdl(pdl);
    go.unfused = !fuse;
    go.split_auto = split;
    go.ahead = ahead;
    /* the prefill GEMMs (and the attention of long runs): on the tensor
     * cores with TF32 operands for quantised models, whose CPU path already
     * rounds activations to 8 bits (TF32 keeps 11 significant bits; measured
     * on the H200 box, 8-layer pp2048 16.3k -> 52.6k tok/s), fp32 FMA for
     * float models; NUMOE_GPU_GEMM=f32|tf32|bf16 overrides */
    const char *gemm = getenv("NUMOE_GPU_GEMM");
    if (gemm && *gemm && strcmp(gemm, "f32") && strcmp(gemm, "tf32") && strcmp(gemm, "bf16")) {
        nm_errf(err, "NUMOE_GPU_GEMM=%s: use f32, tf32 or bf16 (default: tf32, f32 for float models)", gemm);
        free(ge);
        return NULL;
    }
    const int kv_type = m->hp.n_layer > 0 ? m->layers[0].kv_a.type : NM_TYPE_F32;
    const int float_model = kv_type == NM_TYPE_F32 || kv_type == NM_TYPE_F16 || kv_type == NM_TYPE_BF16;
    go.gemm = !gemm || !*gemm ? (float_model ? NM_GPU_GEMM_F32 : NM_GPU_GEMM_TF32)
              : !strcmp(gemm, "f32")  ? NM_GPU_GEMM_F32
              : !strcmp(gemm, "tf32") ? NM_GPU_GEMM_TF32
                                      : NM_GPU_GEMM_BF16;
    upload_progress up = {.begun = 0};
    go.on_upload = on_upload;
    go.upload_ctx = &up;
    if (nm_gpu_forward_create(&ge->gf, m, experts, &go, err)) {
        if (up.begun && up.p.mode == NM_PROGRESS_BAR) fputc('\n', stderr); /* a bar stopped half-way ends its line */
        free(ge);
        return NULL;
    }
    if (up.begun) nm_progress_end(&up.p);
    ge->base = (nm_engine){
        .info = {.name = "gpu", .n_vocab = m->hp.n_vocab, .n_ctx = o->n_ctx, .n_batch = go.n_batch,
                 .n_layer = m->hp.n_layer,
                 .n_expert_used = o->n_expert_used > 0 ? o->n_expert_used : (int)m->hp.n_expert_used},
        .seq_new = gpu_seq_new, .seq_free = gpu_seq_free, .seq_len = gpu_seq_len, .seq_ctx = gpu_seq_ctx,
        .seq_rewind = gpu_seq_rewind, .step = gpu_step, .route_log = gpu_route_log, .stats = gpu_stats,
        .destroy = gpu_destroy};
    return &ge->base;
}

int nm_gpu_usable(char *why, size_t n) { return nm_gpu_device_count(why, n); }

int nm_gpu_describe_device(int dev, char *out, size_t n, nm_err *err) {
    char name[256];
    size_t vram = 0;
    if (nm_gpu_device_props(dev, name, sizeof name, &vram, err)) return -1;
    snprintf(out, n, "%s, %.0f GiB", name, (double)vram / (1024.0 * 1024.0 * 1024.0));
    return 0;
}

const char *nm_engine_gpu_describe(const nm_engine *e) { return nm_gpu_forward_describe(((const gpu_engine *)e)->gf); }

/* The first line of /sys/bus/pci/devices/PCI/FILE into buf: 0, or -1 when
 * the platform has no such file (containers and some VMs hide them). */
static int pci_attr(const char *pci, const char *file, char *buf, size_t n) {
    char path[256];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/%s", pci, file);
    FILE *fp = fopen(path, "r");
    if (!fp) return -1;
    const int ok = fgets(buf, (int)n, fp) != NULL;
    fclose(fp);
    if (!ok) return -1;
    buf[strcspn(buf, "\n")] = 0;
    return 0;
}

int nm_gpu_info_of(int dev, nm_gpu_info *g, nm_err *err) {
    memset(g, 0, sizeof *g);
    g->numa_node = -1;
    if (nm_gpu_device_query(dev, &g->dev, err)) return -1;
    char buf[64];
    const char *pci = g->dev.pci;
    if (!pci_attr(pci, "numa_node", buf, sizeof buf)) g->numa_node = atoi(buf) >= 0 ? atoi(buf) : -1;
    if (!pci_attr(pci, "current_link_speed", buf, sizeof buf)) g->pcie_gen = nm_pcie_gen_of(buf);
    if (!pci_attr(pci, "current_link_width", buf, sizeof buf)) g->pcie_width = atoi(buf) > 0 ? atoi(buf) : 0;
    return 0;
}

int nm_gpu_link_of(int a, int b, nm_gpu_peer *l, nm_err *err) { return nm_gpu_peer_query(a, b, l, err); }

#else /* no CUDA in this build */

nm_engine *nm_engine_gpu_create(const nm_model *m, nm_expert_backend *experts, const nm_engine_gpu_opts *o,
                                nm_err *err) {
    (void)m, (void)experts;
    nm_errf(err, "--gpu %d: %s", o->device, NO_CUDA_FIX);
    return NULL;
}

int nm_gpu_usable(char *why, size_t n) {
    snprintf(why, n, "this numoe was built without CUDA (no nvcc at build time, or the sanitizer tree; `make` "
                     "where /usr/local/cuda/bin/nvcc exists builds the GPU engine in)");
    return 0;
}

int nm_gpu_describe_device(int dev, char *out, size_t n, nm_err *err) {
    (void)out, (void)n;
    return nm_errf(err, "GPU %d: %s", dev, NO_CUDA_FIX);
}

int nm_gpu_info_of(int dev, nm_gpu_info *g, nm_err *err) {
    memset(g, 0, sizeof *g);
    return nm_errf(err, "GPU %d: %s", dev, NO_CUDA_FIX);
}

int nm_gpu_link_of(int a, int b, nm_gpu_peer *l, nm_err *err) {
    memset(l, 0, sizeof *l);
    return nm_errf(err, "GPUs %d, %d: %s", a, b, NO_CUDA_FIX);
}

const char *nm_engine_gpu_describe(const nm_engine *e) {
    (void)e;
    return "";
}

#endif
