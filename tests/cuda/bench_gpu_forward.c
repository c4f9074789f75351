/* bench_gpu_forward.c - prefill and decode tokens/s of the GPU forward pass
 * (coordinator/engine/gpu/gpu_forward.h) next to the CPU forward pass on the same
 * model in the same process, measured as `numoe bench` measures (pp: one
 * batch of p tokens into an empty cache; tg: n single-token steps from an
 * empty cache), routed experts in process on a pool of -t threads.
 *
 * usage: bench_gpu_forward MODEL.gguf [-p 512] [-n 128] [-r 2] [-t 0]
 *                          [--engines cpu,gpu] [--gemm f32,bf16,tf32]
 * The GPU runs with the engine's decode defaults (CUDA graphs, 8-bit
 * activations, fused kernels; NUMOE_GPU_FUSE=0 unfuses). -t 0 = every CPU; --gemm lists the GPU prefill GEMM modes to run (each is
 * a GPU row of the table). One warm-up prefill per engine is not timed.
 * Prints a markdown table, then where a GPU decode step's time went. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/gguf.h"
#include "coordinator/experts/backend.h"
#include "common/clock.h"
#include "coordinator/engine/cpu/cpu_engine.h"
#include "coordinator/engine/gpu/gpu_forward.h"
#include "coordinator/experts/local.h"
#include "kernels/threadpool.h"

typedef int (*run_fn)(void *st, const int32_t *t, int64_t n, float *logits, nm_err *err);
typedef void (*reset_fn)(void *st);

/* the CPU engine and its one sequence */
typedef struct {
    nm_engine *e;
    nm_engine_seq *seq;
} cpu_state;
static int cpu_run(void *st, const int32_t *t, int64_t n, float *l, nm_err *err) {
    cpu_state *c = st;
    return nm_engine_eval(c->e, c->seq, t, n, l, 0, err);
}
static void cpu_reset(void *st) {
    cpu_state *c = st;
    nm_engine_seq_rewind(c->e, c->seq, 0);
}
static int gpu_run(void *st, const int32_t *t, int64_t n, float *l, nm_err *err) {
    return nm_gpu_forward_tokens(st, t, n, l, 0, err);
}
static void gpu_reset(void *st) { nm_gpu_forward_reset(st); }

static void stats(const double *v, int n, double *mean, double *sd) {
    double s = 0, q = 0;
    for (int i = 0; i < n; i++) s += v[i];
    *mean = s / n;
    for (int i = 0; i < n; i++) q += (v[i] - *mean) * (v[i] - *mean);
    *sd = n > 1 ? sqrt(q / (n - 1)) : 0;
}

/* pp and tg tokens/s (mean, sd over reps) */
static int measure(run_fn run, reset_fn reset, void *st, const int32_t *tok, long long p, long long n, int reps,
                   float *logits, double out[4], nm_err *err) {
    double pp[64], tg[64];
    if (p) {
        reset(st);
        if (run(st, tok, p, logits, err)) return -1; /* warm-up */
    }
    for (int r = 0; p && r < reps; r++) {
        reset(st);
        double t0 = nm_now_s();
        if (run(st, tok, p, logits, err)) return -1;
        pp[r] = (double)p / (nm_now_s() - t0);
    }
    for (int r = 0; n && r < reps; r++) {
        reset(st);
        double t0 = nm_now_s();
        for (long long i = 0; i < n; i++)
            if (run(st, tok + i, 1, logits, err)) return -1;
        tg[r] = (double)n / (nm_now_s() - t0);
    }
    out[0] = out[1] = out[2] = out[3] = 0;
    if (p) stats(pp, reps, &out[0], &out[1]);
    if (n) stats(tg, reps, &out[2], &out[3]);
    return 0;
}

int main(int argc, char **argv) {
    const char *path = NULL, *engines = "cpu,gpu", *gemms = "f32";
    long long p = 512, n = 128;
    int reps = 2, threads = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-p") && v) p = atoll(v), i++;
        else if (!strcmp(a, "-n") && v) n = atoll(v), i++;
        else if (!strcmp(a, "-r") && v) reps = atoi(v), i++;
        else if (!strcmp(a, "-t") && v) threads = atoi(v), i++;
        else if (!strcmp(a, "--engines") && v) engines = v, i++;
        else if (!strcmp(a, "--gemm") && v) gemms = v, i++;
        else if (a[0] != '-' && !path) path = a;
        else {
            fprintf(stderr, "usage: %s MODEL.gguf [-p 512] [-n 128] [-r 2] [-t 0] [--engines cpu,gpu] "
                            "[--gemm f32,bf16,tf32]\n", argv[0]);
            return 2;
        }
    }
    if (!path || p < 0 || n < 0 || reps < 1 || reps > 64) {
        fprintf(stderr, "%s: need a model, p >= 0, n >= 0, 1 <= r <= 64\n", argv[0]);
        return 2;
    }
    nm_err err;
    nm_gguf *g = NULL;
    nm_model m;
    if (nm_gguf_open(path, &g, &err) || nm_model_load(&m, g, &err)) {
        fprintf(stderr, "%s: %s\n", argv[0], err.msg);
        return 1;
    }
    fprintf(stderr, "prefault: %.1f s\n", nm_gguf_prefault(g, 0));
    nm_pool *pool = nm_pool_create(threads);
    nm_expert_backend *local =
        pool ? nm_experts_local_create(&m, pool, p > 0 ? p : 1, (int)m.hp.n_expert_used, &err) : NULL;
    if (!local) {
        fprintf(stderr, "%s: %s\n", argv[0], pool ? err.msg : "cannot start threads");
        return 1;
    }
    const int64_t len = p > n ? p : n, ctx = len + 8;
    int32_t *tok = malloc((size_t)(len + 1) * sizeof *tok);
    float *logits = malloc((size_t)m.hp.n_vocab * sizeof *logits);
    if (!tok || !logits) return 1;
    uint64_t x = 12345;
    for (int64_t i = 0; i <= len; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((x >> 33) % (uint64_t)m.hp.n_vocab);
    }
    printf("| engine | threads | pp%lld tok/s | tg%lld tok/s |\n|---|---|---|---|\n", p, n);
    fflush(stdout);
    int rc = 0;
    char lines[8][512];
    int n_lines = 0;
    if (strstr(engines, "cpu")) {
        double r[4];
        nm_engine_cpu_opts eo = {.n_ctx = ctx, .n_batch = p > 0 ? p : 1};
        cpu_state cs = {nm_engine_cpu_create(&m, pool, local, &eo, &err), NULL};
        if (!cs.e || !(cs.seq = nm_engine_seq_new(cs.e, ctx, &err)) ||
            measure(cpu_run, cpu_reset, &cs, tok, p, n, reps, logits, r, &err)) {
            fprintf(stderr, "CPU: %s\n", err.msg);
            rc = 1;
        } else {
            printf("| CPU (numoe's CPU engine) | %d | %.1f ± %.1f | %.1f ± %.1f |\n", nm_pool_size(pool), r[0], r[1],
                   r[2], r[3]);
        }
        if (cs.e) nm_engine_seq_free(cs.e, cs.seq);
        nm_engine_destroy(cs.e);
        fflush(stdout);
    }
    if (strstr(engines, "gpu")) {
        static const char *names[] = {"f32", "tf32", "bf16"};
        for (int mode = 0; mode < 3; mode++) {
            if (!strstr(gemms, names[mode])) continue;
            nm_gpu_forward_opts o = {0};
            o.n_ctx = ctx;
            o.n_batch = p > 0 ? p : 1;
            o.gemm = (nm_gpu_gemm_mode)mode;
            /* the engine's decode defaults (gpu_engine.c): graphs, 8-bit activations, fused kernels */
            o.graphs = 1;
            o.q8_gemv = 1;
            o.unfused = getenv("NUMOE_GPU_FUSE") && !strcmp(getenv("NUMOE_GPU_FUSE"), "0");
            nm_gpu_forward *gf = NULL;
            double r[4], t0 = nm_now_s();
            if (nm_gpu_forward_create(&gf, &m, local, &o, &err)) {
                fprintf(stderr, "GPU: %s\n", err.msg);
                rc = 1;
                continue;
            }
            fprintf(stderr, "GPU loaded in %.2f s: %s\n", nm_now_s() - t0, nm_gpu_forward_describe(gf));
            if (measure(gpu_run, gpu_reset, gf, tok, p, n, reps, logits, r, &err)) {
                fprintf(stderr, "GPU: %s\n", err.msg);
                rc = 1;
            } else {
                printf("| GPU + experts on CPU, prefill GEMM %s | %d | %.1f ± %.1f | %.1f ± %.1f |\n", names[mode],
                       nm_pool_size(pool), r[0], r[1], r[2], r[3]);
                /* one more prefill and decode run, timed by parts */
                nm_gpu_forward_stats s;
                nm_gpu_forward_reset(gf);
                nm_gpu_forward_reset_stats(gf);
                if (p > 0 && nm_gpu_forward_tokens(gf, tok, p, logits, 0, &err)) rc = 1;
                nm_gpu_forward_get_stats(gf, &s);
                if (p > 0 && n_lines < 8)
                    snprintf(lines[n_lines++], sizeof lines[0],
                             "GPU %s prefill of %lld: %.1f ms = host experts %.1f ms + waiting for the GPU before a "
                             "hand-off %.1f ms + the rest %.1f ms",
                             names[mode], p, 1e3 * s.t_total, 1e3 * s.t_moe, 1e3 * s.t_wait,
                             1e3 * (s.t_total - s.t_moe - s.t_wait));
                nm_gpu_forward_reset(gf);
                nm_gpu_forward_reset_stats(gf);
                for (long long i = 0; i < n && !rc; i++)
                    if (nm_gpu_forward_tokens(gf, tok + i, 1, logits, 0, &err)) rc = 1;
                nm_gpu_forward_get_stats(gf, &s);
                if (n > 0 && n_lines < 8)
                    snprintf(lines[n_lines++], sizeof lines[0],
                             "GPU %s decode step: %.3f ms = host experts %.3f ms (%lld hand-offs) + waiting for the GPU "
                             "before a hand-off %.3f ms + the rest (launches, last layers, head, logits) %.3f ms",
                             names[mode], 1e3 * s.t_total / n, 1e3 * s.t_moe / n, (long long)(s.n_moe_calls / n),
                             1e3 * s.t_wait / n, 1e3 * (s.t_total - s.t_moe - s.t_wait) / n);
            }
            nm_gpu_forward_free(gf);
            fflush(stdout);
        }
    }
    for (int i = 0; i < n_lines; i++) printf("\n%s", lines[i]);
    printf("\n");
    free(tok), free(logits);
    local->destroy(local);
    nm_pool_destroy(pool);
    nm_model_free(&m);
    nm_gguf_close(g);
    return rc;
}
