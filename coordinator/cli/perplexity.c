/* perplexity.c - `numoe perplexity --model M.gguf -f TEXT`: how well the
 * model predicts a text, measured like llama.cpp's llama-perplexity so the
 * figures can be put side by side (and against a trainer's own number): the
 * text is tokenized once, cut into non-overlapping windows that each start
 * from an empty cache with BOS, and every text token of a window is scored
 * by the log-probability the model gave it from what precedes it there.
 *
 * Unlike llama-perplexity (which scores only the second half of each window)
 * every text token of a window is scored; the windows are the same as those
 * of tests/train_demo.py's evaluation, whose float figure the tests compare
 * with this one. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "common/opt.h"
#include "coordinator/cli/commands.h"
#include "coordinator/cli/options.h"
#include "coordinator/cli/session.h"
#include "coordinator/text/tokenizer.h"

static int usage(FILE *f) {
    fprintf(f,
            "usage: numoe perplexity --model M.gguf -f TEXT [--ctx N] [--chunks K] [options]\n"
            "\n"
            "  -f, --file TEXT         the text (UTF-8), tokenized as a whole: no BOS, special-token texts\n"
            "                          are ordinary text\n"
            "      --ctx N             window length in positions, BOS included (default: 512, or the KV\n"
            "                          cache's -c if smaller); also the KV cache size unless -c is given\n"
            "      --chunks K          score only the first K windows (default: every full window)\n"
            "\n"
            "Window j is BOS followed by text tokens [j*(N-1), (j+1)*(N-1)) (a vocabulary without BOS: N\n"
            "text tokens, the first only context), run from an empty cache; each of its text tokens is\n"
            "scored, NLL = -ln p(token | what precedes it in the window). Tokens that do not fill a last\n"
            "window are left out. stderr: the token count, then per window `[j/K] PPL of the window,\n"
            "running PPL`. stdout, last: `PPL = X +/- Y over T tokens (K chunks of N)`, X = exp(mean NLL),\n"
            "Y = X * the standard error of the mean NLL (as llama-perplexity reports it).\n"
            "\n"
            "%s",
            nm_session_opts_help);
    return f == stdout ? 0 : 2;
}

/* The whole file in a malloc'd buffer (*len bytes, NUL-terminated). */
static char *read_file(const char *path, size_t *len, nm_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return nm_errf(err, "cannot open %s: %s", path, strerror(errno)), NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - 1 - n, f);
        if (n < cap - 1) break;
        char *nb = realloc(buf, cap *= 2);
        if (!nb) free(buf);
        buf = nb;
    }
    if (!buf) {
        fclose(f);
        return nm_errf(err, "%s: out of memory", path), NULL;
    }
    if (ferror(f)) {
        nm_errf(err, "cannot read %s: %s", path, strerror(errno));
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

/* -ln softmax(row)[target], in double. */
static double nll_of(const float *row, int64_t n_vocab, int32_t target) {
    float mx = row[0];
    for (int64_t v = 1; v < n_vocab; v++) mx = row[v] > mx ? row[v] : mx;
    double sum = 0;
    for (int64_t v = 0; v < n_vocab; v++) sum += exp((double)row[v] - mx);
    return log(sum) + mx - (double)row[target];
}

static int parse_count(const char *a, const char *v, long long lo, long long *out) {
    if (nm_parse_int(v, lo, LLONG_MAX, out)) {
        fprintf(stderr, "numoe perplexity: %s needs an integer >= %lld (got '%s')\n", a, lo, v ? v : "");
        return -1;
    }
    return 0;
}

int nm_cmd_perplexity(int argc, char **argv) {
    nm_session_opts so = {0};
    const char *path = NULL;
    long long ctx = 0, chunks = 0;
    for (int i = 1; i < argc; i++) {
        int r = nm_session_parse_opt(&so, argc, argv, &i, "numoe perplexity");
        if (r < 0) return 2;
        if (r) continue;
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return usage(stdout);
        if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            if (!v) return fprintf(stderr, "numoe perplexity: %s needs a file name\n", a), 2;
            path = v;
        } else if (!strcmp(a, "--ctx")) {
            if (parse_count(a, v, 2, &ctx)) return 2;
        } else if (!strcmp(a, "--chunks")) {
            if (parse_count(a, v, 1, &chunks)) return 2;
        } else {
            fprintf(stderr, "numoe perplexity: unknown option %s\n", a);
            return usage(stderr);
        }
        i++;
    }
    if (!path) {
        fprintf(stderr, "numoe perplexity: give the text with -f FILE\n");
        return usage(stderr);
    }
    if (ctx && !so.ctx_size) so.ctx_size = ctx;
    if (ctx && ctx > so.ctx_size) {
        fprintf(stderr, "numoe perplexity: --ctx %lld does not fit the KV cache of -c %lld positions\n", ctx,
                (long long)so.ctx_size);
        return 2;
    }
    nm_err err;
    size_t text_len = 0;
    char *text = read_file(path, &text_len, &err);
    if (!text) {
        fprintf(stderr, "numoe perplexity: %s\n", err.msg);
        return 1;
    }
    nm_session s;
    if (nm_session_open(&s, &so, &err)) {
        fprintf(stderr, "numoe perplexity: %s\n", err.msg);
        free(text);
        return 1;
    }
    nm_engine *e = s.engine;
    nm_engine_seq *seq = NULL;
    nm_tokenizer *tk = NULL;
    int32_t *ids = NULL, *win = NULL;
    float *logits = NULL;
    size_t n_ids = 0;
    int rc = 1;
    const nm_hparams *hp = &s.model.hp;
    int64_t V = hp->n_vocab;
    if (nm_tokenizer_load(&tk, s.gguf, &err) || nm_tokenize(tk, text, text_len, 0, 0, &ids, &n_ids, &err)) goto fail;
    if (!ctx) ctx = e->info.n_ctx < 512 ? e->info.n_ctx : 512;
    if (ctx > hp->n_ctx_train)
        fprintf(stderr, "numoe perplexity: note: --ctx %lld is beyond the model's context_length %lld\n", ctx,
                (long long)hp->n_ctx_train);
    int32_t bos = nm_tokenizer_add_bos(tk) ? nm_tokenizer_bos(tk) : -1;
    int64_t stride = bos >= 0 ? ctx - 1 : ctx; /* text tokens per window */
    long long n_full = (long long)(n_ids / (size_t)stride);
    fprintf(stderr, "numoe perplexity: %s: %zu bytes, %zu tokens; %lld full windows of %lld (%s%lld text tokens)\n",
            path, text_len, n_ids, n_full, ctx, bos >= 0 ? "BOS + " : "", (long long)stride);
    if (n_full == 0) {
        nm_errf(&err, "%s has %zu tokens, fewer than one window of --ctx %lld needs (%lld): use a smaller --ctx "
                "or a longer text", path, n_ids, ctx, (long long)stride);
        goto fail;
    }
    if (chunks && chunks > n_full) {
        nm_errf(&err, "--chunks %lld asks for more windows than %s has (%lld of --ctx %lld)", chunks, path, n_full,
                ctx);
        goto fail;
    }
    long long K = chunks ? chunks : n_full;
    int64_t step = e->info.n_batch < ctx ? e->info.n_batch : ctx;
    if (!(seq = nm_engine_seq_new(e, ctx, &err))) goto fail;
    win = malloc((size_t)ctx * sizeof *win);
    logits = malloc((size_t)step * (size_t)V * sizeof *logits);
    if (!win || !logits) {
        nm_errf(&err, "out of memory for a window of %lld x %lld logits", (long long)step, (long long)V);
        goto fail;
    }
    double sum = 0, sum2 = 0, t0 = nm_now_s();
    long long scored = 0;
    for (long long j = 0; j < K; j++) {
        const int32_t *src = ids + (size_t)(j * stride);
        int64_t w = 0;
        if (bos >= 0) win[w++] = bos;
        memcpy(win + w, src, (size_t)stride * sizeof *win);
        nm_engine_seq_rewind(e, seq, 0);
        double wsum = 0;
        for (int64_t p0 = 0; p0 < ctx; p0 += step) {
            int64_t n = ctx - p0 < step ? ctx - p0 : step;
            if (nm_engine_eval(e, seq, win + p0, n, logits, 1, &err)) {
                nm_err_prefix(&err, "window %lld of %s, positions %lld..%lld", j + 1, path, (long long)p0,
                              (long long)(p0 + n - 1));
                goto fail;
            }
            /* row r holds the logits after position p0 + r; they predict position p0 + r + 1 */
            for (int64_t r = 0; r < n && p0 + r + 1 < ctx; r++) {
                double x = nll_of(logits + r * V, V, win[p0 + r + 1]);
                if (!isfinite(x)) {
                    nm_errf(&err, "window %lld of %s: non-finite logits after position %lld", j + 1, path,
                            (long long)(p0 + r));
                    goto fail;
                }
                wsum += x, sum += x, sum2 += x * x;
                scored++;
            }
        }
        double el = nm_now_s() - t0;
        fprintf(stderr, "[%lld/%lld] window PPL %.4f, running PPL %.4f (%.0f tokens/s)\n", j + 1, K,
                exp(wsum / (double)(ctx - 1)), exp(sum / (double)scored),
                (double)(j + 1) * (double)ctx / (el > 0 ? el : 1e-9));
    }
    double mean = sum / (double)scored, var = sum2 / (double)scored - mean * mean;
    double se = scored > 1 && var > 0 ? sqrt(var / (double)(scored - 1)) : 0;
    printf("PPL = %.4f +/- %.4f over %lld tokens (%lld chunks of %lld)\n", exp(mean), exp(mean) * se, scored, K, ctx);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "numoe perplexity: %s\n", err.msg);
done:
    free(win);
    free(logits);
    free(ids);
    free(text);
    nm_tokenizer_free(tk);
    nm_engine_seq_free(e, seq);
    nm_session_close(&s);
    return rc;
}
