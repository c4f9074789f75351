/* cmd_generate.c - `numoe generate`: token ids in, token ids out.
 * stdout carries only the generated ids (so two runs compare with diff);
 * load progress and timings go to stderr. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coordinator/cli.h"
#include "coordinator/sampler.h"
#include "coordinator/session.h"

static int usage(FILE *f) {
    fprintf(f,
            "usage: numoe generate --model M.gguf --tokens 1,2,3 [-n 32] [options]\n"
            "\n"
            "Evaluates the prompt token ids and generates -n more; prints the generated ids,\n"
            "comma-separated, on stdout.\n"
            "\n"
            "  --tokens LIST           prompt token ids, comma-separated (required)\n"
            "  -n, --n-predict N       tokens to generate (default 32; 0 = only evaluate the prompt)\n"
            "      --temp T            sampling temperature; 0 = greedy (default 0)\n"
            "      --seed N            sampler seed (default 42)\n"
            "      --dump-logits FILE  write raw little-endian float32 rows of n_vocab: one per prompt\n"
            "                          position (row i = logits after prompt token i), then one per\n"
            "                          generated token (the logits after feeding it)\n"
            "      --dump-routing FILE write every routing decision as int32 records\n"
            "                          {position, layer, expert ids...} (expert-used count per record)\n"
            "      --decode-from K     evaluate prompt tokens K.. one at a time (decode path) instead of\n"
            "                          in batches (default: whole prompt in chunks of --batch)\n"
            "%s",
            nm_session_opts_help);
    return f == stdout ? 0 : 2;
}

static int parse_tokens(const char *s, int32_t **out, int64_t *n) {
    int64_t cap = 16, k = 0;
    int32_t *v = malloc((size_t)cap * sizeof *v);
    if (!v) return -1;
    while (*s) {
        char *end;
        errno = 0;
        long x = strtol(s, &end, 10);
        if (end == s || errno || x < INT32_MIN || x > INT32_MAX || (*end && *end != ',')) {
            free(v);
            return -1;
        }
        if (k == cap) {
            int32_t *nv = realloc(v, (size_t)(cap *= 2) * sizeof *v);
            if (!nv) return free(v), -1;
            v = nv;
        }
        v[k++] = (int32_t)x;
        s = *end ? end + 1 : end;
    }
    *out = v, *n = k;
    return k > 0 ? 0 : (free(v), -1);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int nm_cmd_generate(int argc, char **argv) {
    nm_session_opts so = {0};
    const char *tokens_arg = NULL, *dump = NULL, *route = NULL;
    long long n_predict = 32, decode_from = -1, seed = 42;
    float temp = 0;
    for (int i = 1; i < argc; i++) {
        int r = nm_session_parse_opt(&so, argc, argv, &i, "numoe generate");
        if (r < 0) return 2;
        if (r) continue;
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return usage(stdout);
        if (!v) {
            fprintf(stderr, "numoe generate: unknown option or missing value: %s\n", a);
            return usage(stderr);
        }
        if (!strcmp(a, "--tokens")) tokens_arg = v;
        else if (!strcmp(a, "--dump-logits")) dump = v;
        else if (!strcmp(a, "--dump-routing")) route = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) n_predict = strtoll(v, &end, 10);
        else if (!strcmp(a, "--decode-from")) decode_from = strtoll(v, &end, 10);
        else if (!strcmp(a, "--seed")) seed = strtoll(v, &end, 10);
        else if (!strcmp(a, "--temp")) temp = strtof(v, &end);
        else {
            fprintf(stderr, "numoe generate: unknown option %s\n", a);
            return usage(stderr);
        }
        if (end && (*end || end == v || n_predict < 0 || temp < 0 || !isfinite(temp))) {
            fprintf(stderr, "numoe generate: bad value '%s' for %s\n", v, a);
            return 2;
        }
        i++;
    }
    int32_t *prompt;
    int64_t n_prompt;
    if (!tokens_arg) {
        fprintf(stderr, "numoe generate: --tokens is required (text prompts come with the tokenizer)\n");
        return usage(stderr);
    }
    if (parse_tokens(tokens_arg, &prompt, &n_prompt)) {
        fprintf(stderr, "numoe generate: --tokens must be comma-separated integers, got '%s'\n", tokens_arg);
        return 2;
    }
    nm_session s;
    nm_err err;
    if (nm_session_open(&s, &so, &err)) {
        fprintf(stderr, "numoe generate: %s\n", err.msg);
        free(prompt);
        return 1;
    }
    int64_t V = s.model.hp.n_vocab;
    int rc = 1;
    FILE *df = NULL;
    float *logits = malloc((size_t)(n_prompt > 1 ? n_prompt : 1) * (size_t)V * sizeof *logits);
    int32_t *out = malloc((size_t)(n_predict + 1) * sizeof *out);
    nm_sampler smp;
    nm_sampler_init(&smp, temp, (uint64_t)seed);
    if (!logits || !out) {
        fprintf(stderr, "numoe generate: out of memory\n");
        goto done;
    }
    if (dump && !(df = fopen(dump, "wb"))) {
        fprintf(stderr, "numoe generate: cannot write %s: %s\n", dump, strerror(errno));
        goto done;
    }
    if (route && !(s.fwd.route_log = fopen(route, "wb"))) {
        fprintf(stderr, "numoe generate: cannot write %s: %s\n", route, strerror(errno));
        goto done;
    }
    if (decode_from < 0 || decode_from > n_prompt) decode_from = n_prompt;
    double t0 = now_s();
    float *last = logits;
    if (decode_from > 0) {
        if (nm_forward_tokens(&s.fwd, prompt, decode_from, logits, df != NULL, &err)) goto fail;
        last = df ? logits + (decode_from - 1) * V : logits;
        if (df && fwrite(logits, sizeof *logits * (size_t)V, (size_t)decode_from, df) != (size_t)decode_from) goto wfail;
    }
    for (int64_t t = decode_from; t < n_prompt; t++) {
        if (nm_forward_tokens(&s.fwd, prompt + t, 1, logits, 0, &err)) goto fail;
        last = logits;
        if (df && fwrite(logits, sizeof *logits, (size_t)V, df) != (size_t)V) goto wfail;
    }
    double t1 = now_s();
    for (int64_t j = 0; j < n_predict; j++) {
        if ((out[j] = nm_sampler_sample(&smp, last, V)) < 0) {
            fprintf(stderr, "numoe generate: out of memory in the sampler\n");
            goto done;
        }
        printf("%s%d", j ? "," : "", out[j]);
        fflush(stdout);
        if (!df && j + 1 == n_predict) break; /* the last token's logits are only needed for the dump */
        if (nm_forward_tokens(&s.fwd, out + j, 1, logits, 0, &err)) goto fail;
        last = logits;
        if (df && fwrite(logits, sizeof *logits, (size_t)V, df) != (size_t)V) goto wfail;
    }
    if (n_predict) putchar('\n');
    double t2 = now_s();
    fprintf(stderr, "numoe: prompt %lld tokens in %.3f s (%.2f tok/s), generated %lld tokens in %.3f s (%.2f tok/s)\n",
            (long long)n_prompt, t1 - t0, n_prompt / (t1 - t0 > 0 ? t1 - t0 : 1e-9), n_predict, t2 - t1,
            n_predict / (t2 - t1 > 0 ? t2 - t1 : 1e-9));
    rc = 0;
    goto done;
wfail:
    fprintf(stderr, "numoe generate: writing %s failed: %s\n", dump, strerror(errno));
    goto done;
fail:
    fprintf(stderr, "numoe generate: %s\n", err.msg);
done:
    if (df && fclose(df) && rc == 0) {
        fprintf(stderr, "numoe generate: writing %s failed\n", dump);
        rc = 1;
    }
    if (s.fwd.route_log && fclose(s.fwd.route_log) && rc == 0) {
        fprintf(stderr, "numoe generate: writing %s failed\n", route);
        rc = 1;
    }
    s.fwd.route_log = NULL;
    nm_sampler_free(&smp);
    free(logits);
    free(out);
    free(prompt);
    nm_session_close(&s);
    return rc;
}
