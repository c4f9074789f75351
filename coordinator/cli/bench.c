/* bench.c - `numoe bench --model M.gguf -p 512 -n 128`: prefill and
 * decode tokens/s, measured like llama-bench (pp: one batch of p tokens into
 * an empty cache; tg: n single-token steps from an empty cache), so the two
 * tables can be put side by side. Also prints the decode bound: the bytes a
 * decode step must read (dense weights + the routed experts actually used)
 * over a measured memory-copy bandwidth. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>

#include "common/clock.h"
#include "common/opt.h"
#include "coordinator/cli/commands.h"
#include "coordinator/cli/options.h"
#include "coordinator/cli/session.h"
#include "kernels/quant.h"

static int usage(FILE *f) {
    fprintf(f,
            "usage: numoe bench --model M.gguf [-p 512] [-n 128] [-r 1] [options]\n"
            "  -p N                    prefill test: N tokens in one batch (0 = skip)\n"
            "  -n N                    decode test: N single-token steps (0 = skip)\n"
            "  -r N                    repetitions; the table shows mean and spread (default 1)\n"
            "  --experts-sync          wait for the routed experts before computing the shared ones\n"
            "                          (the default overlaps them: compare the two)\n"
            "%s"
            "`numoe bench kernels` benchmarks the GEMV kernels instead.\n",
            nm_session_opts_help);
    return f == stdout ? 0 : 2;
}

/* Bytes one decode step reads: every non-expert matrix once (embedding: one row)
 * plus k of n_expert experts per MoE layer. */
static double decode_bytes(const nm_model *m, int k) {
    double b = 0;
    const nm_gguf *g = m->gguf;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const nm_gguf_tensor *t = &g->tensors[i];
        if (strstr(t->name, "_exps.")) b += (double)t->nbytes * k / (double)m->hp.n_expert;
        else if (!strcmp(t->name, "token_embd.weight")) b += (double)t->nbytes / (double)t->ne[1];
        else b += (double)t->nbytes;
    }
    return b;
}

static void stats(const double *v, int n, double *mean, double *sd) {
    double s = 0, q = 0;
    for (int i = 0; i < n; i++) s += v[i];
    *mean = s / n;
    for (int i = 0; i < n; i++) q += (v[i] - *mean) * (v[i] - *mean);
    *sd = n > 1 ? sqrt(q / (n - 1)) : 0;
}

int nm_cmd_bench_model(int argc, char **argv) {
    nm_session_opts so = {0};
    long long p = 512, n = 128, reps = 1;
    for (int i = 1; i < argc; i++) {
        int r = nm_session_parse_opt(&so, argc, argv, &i, "numoe bench");
        if (r < 0) return 2;
        if (r) continue;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) return usage(stdout);
        if (!strcmp(argv[i], "--experts-sync")) {
            so.sync_experts = 1;
            continue;
        }
        long long *dst = !strcmp(argv[i], "-p") ? &p : !strcmp(argv[i], "-n") ? &n : !strcmp(argv[i], "-r") ? &reps : NULL;
        if (!dst || i + 1 >= argc || nm_parse_int(argv[i + 1], 0, LLONG_MAX, dst)) {
            fprintf(stderr, "numoe bench: bad option or value: %s\n", argv[i]);
            return usage(stderr);
        }
        i++;
    }
    if (!p && !n) {
        fprintf(stderr, "numoe bench: nothing to measure: -p and -n are both 0\n");
        return 2;
    }
    if (reps < 1) reps = 1;
    if (!so.ctx_size) so.ctx_size = (p > n ? p : n) + 8;
    if (!so.batch) so.batch = p > 0 ? p : 1;
    nm_session s;
    nm_err err;
    if (nm_session_open(&s, &so, &err)) {
        fprintf(stderr, "numoe bench: %s\n", err.msg);
        return 1;
    }
    const nm_hparams *hp = &s.model.hp;
    nm_engine *e = s.engine;
    int64_t len = p > n ? p : n;
    int32_t *tok = malloc((size_t)(len + 1) * sizeof *tok);
    float *logits = malloc((size_t)hp->n_vocab * sizeof *logits);
    double *pp = calloc((size_t)reps, sizeof *pp), *tg = calloc((size_t)reps, sizeof *tg);
    nm_engine_stats st0, st1, st2; /* before prefill, between prefill and decode, after decode */
    int rc = 1;
    nm_engine_seq *seq = NULL;
    if (!tok || !logits || !pp || !tg) goto done;
    if (!(seq = nm_engine_seq_new(e, e->info.n_ctx, &err))) goto fail;
    uint64_t x = 12345;
    for (int64_t i = 0; i <= len; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((x >> 33) % (uint64_t)hp->n_vocab);
    }
    /* warm-up: touches every page of the mapping used by one token */
    if (nm_engine_eval(e, seq, tok, 1, logits, 0, &err)) goto fail;
    /* all prefill repetitions, then all decode ones, as llama-bench orders its tests */
    nm_engine_stats_of(e, &st0);
    for (long long r = 0; p && r < reps; r++) {
        nm_engine_seq_rewind(e, seq, 0);
        double t0 = nm_now_s();
        if (nm_engine_eval(e, seq, tok, p, logits, 0, &err)) goto fail;
        pp[r] = (double)p / (nm_now_s() - t0);
    }
    nm_engine_stats_of(e, &st1);
    for (long long r = 0; n && r < reps; r++) {
        nm_engine_seq_rewind(e, seq, 0);
        double t0 = nm_now_s();
        for (long long i = 0; i < n; i++)
            if (nm_engine_eval(e, seq, tok + i, 1, logits, 0, &err)) goto fail;
        tg[r] = (double)n / (nm_now_s() - t0);
    }
    nm_engine_stats_of(e, &st2);
    int k = e->info.n_expert_used;
    double bytes = decode_bytes(&s.model, k), m, sd;
    printf("| model | threads | experts used | test | tokens/s |\n|---|---|---|---|---|\n");
    if (p) {
        stats(pp, (int)reps, &m, &sd);
        printf("| %s | %d | %d | pp%lld | %.2f ± %.2f |\n", so.model_path, nm_pool_size(s.pool), k, p,
               m, sd);
    }
    if (n) {
        stats(tg, (int)reps, &m, &sd);
        printf("| %s | %d | %d | tg%lld | %.2f ± %.2f |\n", so.model_path, nm_pool_size(s.pool), k, n,
               m, sd);
        printf("\ndecode reads %.1f MB of weights per token (dense + %d of %lld experts per MoE layer): "
               "%.2f GB/s effective at the measured rate\n",
               bytes / 1e6, k, (long long)hp->n_expert, bytes * m / 1e9);
    }
    /* How long the steps sat waiting for the routed experts once their own
     * work (attention, shared experts) was done: what the overlap of the
     * shared experts with the routed ones could not hide (--experts-sync
     * waits before the shared experts instead). On stderr with the other
     * timings: stdout keeps llama-bench's table. */
    fflush(stdout);
    fprintf(stderr, "numoe: waiting for routed experts (%s): ",
            so.sync_experts ? "--experts-sync" : "overlapped with the shared experts");
    if (p) fprintf(stderr, "prefill %.3f ms per token", (st1.expert_wait_s - st0.expert_wait_s) * 1e3 / (double)(p * reps));
    if (n)
        fprintf(stderr, "%sdecode %.3f ms per token", p ? ", " : "",
                (st2.expert_wait_s - st1.expert_wait_s) * 1e3 / (double)(n * reps));
    fputc('\n', stderr);
    /* The GPU engine's step, split: the host waiting for the GPU before each
     * hand-off (attention, router, the copy to the host), the routed experts
     * on the host (hand-off to the workers + their compute + the way back),
     * and the rest (the sum's copy back, shared-expert tail, head, logits,
     * host work). And how the streamed experts of long passes moved. */
    if (st2.step_s > 0) {
        if (n) {
            const double per = 1e3 / (double)(n * reps), all = (st2.step_s - st1.step_s) * per;
            const double dev = (st2.device_wait_s - st1.device_wait_s) * per, ex = (st2.expert_wait_s - st1.expert_wait_s) * per;
            const int64_t n_moe = hp->n_layer - hp->n_dense;
            const int handed = st2.handoffs > st1.handoffs; /* did any layer go to the host? */
            if (handed)
                fprintf(stderr, "numoe: decode step %.3f ms: GPU before the hand-offs %.3f ms, routed experts on the host "
                        "%.3f ms, rest (H2D, head, logits, host) %.3f ms\n", all, dev, ex, all - dev - ex);
            else
                fprintf(stderr, "numoe: decode step %.3f ms, all of it the GPU's (no hand-off: every routed expert of "
                        "every layer in VRAM)\n", all);
            if (n_moe > 0 && handed)
                fprintf(stderr, "numoe: per MoE layer (%lld): the GPU's part %.0f us, the host's experts %.0f us, the rest "
                        "%.0f us\n", (long long)n_moe, dev * 1e3 / (double)n_moe, ex * 1e3 / (double)n_moe,
                        (all - dev - ex) * 1e3 / (double)n_moe);
            if (st2.hot_bytes > 0 && st2.picks > st1.picks)
                fprintf(stderr, "numoe: decode: %.1f%% of the routed picks computed by the experts in VRAM (%.2f of "
                        "%.2f GiB of routed experts there)\n",
                        100.0 * (double)(st2.hot_picks - st1.hot_picks) / (double)(st2.picks - st1.picks),
                        st2.hot_bytes / 1073741824.0, st2.routed_bytes / 1073741824.0);
        }
        if (p && st1.stream_layers > st0.stream_layers) {
            const double b = st1.stream_bytes - st0.stream_bytes, t = st1.stream_copy_s - st0.stream_copy_s;
            fprintf(stderr, "numoe: prefill: routed experts of %llu MoE layers on the GPU, %.2f GB streamed in %.3f s of "
                    "copies (%.1f GB/s), %.3f s of %.3f s in steps\n",
                    (unsigned long long)(st1.stream_layers - st0.stream_layers), b / 1e9, t, t > 0 ? b / t / 1e9 : 0.0,
                    t, st1.step_s - st0.step_s);
        }
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "numoe bench: %s\n", err.msg);
done:
    free(tok), free(logits), free(pp), free(tg);
    nm_engine_seq_free(e, seq);
    nm_session_close(&s);
    return rc;
}
