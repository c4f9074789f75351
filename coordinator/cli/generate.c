/* generate.c - `numoe generate`: a prompt in, a continuation out.
 *
 * With --tokens the prompt is token ids and stdout gets the generated ids
 * (comma-separated, so two runs compare with diff); generation runs exactly
 * -n tokens. With --prompt the text is tokenized with the model's tokenizer
 * and the continuation is streamed as text, stopping at end-of-generation.
 * Load summary and timings always go to stderr. Greedy unless --temp > 0. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "common/opt.h"
#include "coordinator/cli/commands.h"
#include "coordinator/cli/options.h"
#include "coordinator/cli/session.h"
#include "coordinator/text/decode.h"
#include "coordinator/text/sampler.h"
#include "coordinator/text/tokenizer.h"

static int usage(FILE *f) {
    fprintf(f,
            "usage: numoe generate --model M.gguf (--tokens 1,2,3 | --prompt TEXT) [-n 32] [options]\n"
            "\n"
            "  --tokens LIST           prompt token ids, comma-separated; prints generated ids, runs exactly -n\n"
            "  --prompt TEXT           prompt text (BOS as the GGUF says; special-token text is matched);\n"
            "                          prints the continuation as text, stops at end-of-generation\n"
            "  --print-ids             with --prompt: print ids instead of text\n"
            "  --ignore-eos            with --prompt: do not stop at end-of-generation\n"
            "  --stop STRING           with --prompt: stop when the output ends with STRING, which is not\n"
            "                          printed (repeatable)\n"
            "  -n, --n-predict N       tokens to generate (default 32; 0 = only evaluate the prompt)\n"
            "  --dump-logits FILE      write raw little-endian float32 rows of n_vocab: one per prompt\n"
            "                          position (row i = logits after prompt token i), then one per\n"
            "                          generated token (the logits after feeding it)\n"
            "  --dump-routing FILE     write every routing decision as int32 records\n"
            "                          {position, layer, expert ids...} (expert-used count per record)\n"
            "  --decode-from K         evaluate prompt tokens K.. one at a time (decode path) instead of\n"
            "                          in batches (default: whole prompt in chunks of --batch)\n"
            "%s"
            "sampling (generate defaults to greedy, --temp 0):\n%s",
            nm_session_opts_help, nm_sampler_opts_help);
    return f == stdout ? 0 : 2;
}

static int parse_tokens(const char *s, int32_t **out, size_t *n) {
    size_t cap = 16, k = 0;
    int32_t *v = malloc(cap * sizeof *v);
    if (!v) return -1;
    while (*s) {
        long long x;
        if (nm_parse_int_at(&s, INT32_MIN, INT32_MAX, &x) || (*s && *s != ',')) {
            free(v);
            return -1;
        }
        if (k == cap) {
            int32_t *nv = realloc(v, (cap *= 2) * sizeof *v);
            if (!nv) return free(v), -1;
            v = nv;
        }
        v[k++] = (int32_t)x;
        if (*s) s++;
    }
    *out = v, *n = k;
    return k > 0 ? 0 : (free(v), -1);
}

int nm_cmd_generate(int argc, char **argv) {
    nm_session_opts so = {0};
    nm_sampler_params sp = nm_sampler_params_default();
    sp.temp = 0; /* reproducible by default; --temp turns sampling on */
    const char *tokens_arg = NULL, *text = NULL, *dump = NULL, *route = NULL;
    long long n_predict = 32, decode_from = -1;
    int print_ids = 0, ignore_eos = 0, n_stops = 0;
    const char *stops[16];
    for (int i = 1; i < argc; i++) {
        int r = nm_session_parse_opt(&so, argc, argv, &i, "numoe generate");
        if (!r) r = nm_sampler_parse_opt(&sp, argc, argv, &i, "numoe generate");
        if (r < 0) return 2;
        if (r) continue;
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return usage(stdout);
        if (!strcmp(a, "--print-ids")) { print_ids = 1; continue; }
        if (!strcmp(a, "--ignore-eos")) { ignore_eos = 1; continue; }
        if (!v) {
            fprintf(stderr, "numoe generate: unknown option or missing value: %s\n", a);
            return usage(stderr);
        }
        if (!strcmp(a, "--tokens")) tokens_arg = v;
        else if (!strcmp(a, "--stop")) {
            if (n_stops == 16) return fprintf(stderr, "numoe generate: at most 16 --stop strings\n"), 2;
            stops[n_stops++] = v;
        }
        else if (!strcmp(a, "--prompt")) text = v;
        else if (!strcmp(a, "--dump-logits")) dump = v;
        else if (!strcmp(a, "--dump-routing")) route = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) bad = nm_parse_int(v, 0, LLONG_MAX, &n_predict);
        else if (!strcmp(a, "--decode-from")) bad = nm_parse_int(v, LLONG_MIN, LLONG_MAX, &decode_from);
        else {
            fprintf(stderr, "numoe generate: unknown option %s\n", a);
            return usage(stderr);
        }
        if (bad) {
            fprintf(stderr, "numoe generate: bad value '%s' for %s\n", v, a);
            return 2;
        }
        i++;
    }
    if (!tokens_arg == !text) {
        fprintf(stderr, "numoe generate: give exactly one of --tokens and --prompt\n");
        return usage(stderr);
    }
    int32_t *prompt = NULL;
    size_t n_prompt = 0;
    if (tokens_arg && parse_tokens(tokens_arg, &prompt, &n_prompt)) {
        fprintf(stderr, "numoe generate: --tokens must be comma-separated integers, got '%s'\n", tokens_arg);
        return 2;
    }
    nm_session s;
    nm_err err;
    nm_tokenizer *tk = NULL;
    nm_engine_seq *seq = NULL;
    nm_sampler smp = {0};
    nm_decode dec = {0}; /* the continuation; printed up to dec.text.released */
    float *logits = NULL;
    FILE *df = NULL, *rf = NULL;
    int rc = 1;
    size_t printed = 0;
    if (nm_session_open(&s, &so, &err)) {
        fprintf(stderr, "numoe generate: %s\n", err.msg);
        free(prompt);
        return 1;
    }
    nm_engine *e = s.engine;
    int64_t V = e->info.n_vocab;
    if (text) {
        if (nm_tokenizer_load(&tk, s.gguf, &err) ||
            nm_tokenize(tk, text, strlen(text), nm_tokenizer_add_bos(tk), 1, &prompt, &n_prompt, &err))
            goto fail;
        if (n_prompt == 0) {
            nm_errf(&err, "the prompt tokenized to nothing");
            goto fail;
        }
    }
    /* token-id prompts run exactly -n tokens (no tokenizer: no end of
     * generation); text prompts stop at it and print text unless --print-ids */
    if (nm_decode_init(&dec, tk, !print_ids, stops, n_stops, n_predict > 0 ? n_predict : 1, ignore_eos, &err) ||
        nm_sampler_init_params(&smp, &sp, V, &err) || !(seq = nm_engine_seq_new(e, e->info.n_ctx, &err)))
        goto fail;
    logits = malloc(n_prompt * (size_t)V * sizeof *logits);
    if (!logits) goto oom;
    if (dump && !(df = fopen(dump, "wb"))) {
        nm_errf(&err, "cannot write %s: %s", dump, strerror(errno));
        goto fail;
    }
    if (route && (!(rf = fopen(route, "wb")) || nm_engine_route_log(e, rf, &err))) {
        if (!rf) nm_errf(&err, "cannot write %s: %s", route, strerror(errno));
        goto fail;
    }
    if (decode_from < 0 || decode_from > (long long)n_prompt) decode_from = (long long)n_prompt;
    /* Without a logits dump the engine draws each token in its step (the GPU
     * engine then moves only the sampler's candidates off the device); with
     * one, the rows come back and are drawn here. The same tokens either way:
     * the prompt enters the penalty window before the first draw. */
    for (size_t t = 0; t < n_prompt; t++) nm_sampler_accept(&smp, prompt[t]);
    int32_t drawn = -1;
    double t0 = nm_now_s();
    float *last = logits;
    if (decode_from > 0) {
        if (!df && decode_from == (long long)n_prompt) {
            if (nm_engine_eval_draw(e, seq, prompt, decode_from, &smp, &drawn, &err)) goto fail;
        } else if (nm_engine_eval(e, seq, prompt, decode_from, logits, df != NULL, &err)) {
            goto fail;
        }
        last = df ? logits + (decode_from - 1) * V : logits;
        if (df && fwrite(logits, sizeof *logits * (size_t)V, (size_t)decode_from, df) != (size_t)decode_from) goto wfail;
    }
    for (size_t t = (size_t)decode_from; t < n_prompt; t++) {
        if (!df && t + 1 == n_prompt) {
            if (nm_engine_eval_draw(e, seq, prompt + t, 1, &smp, &drawn, &err)) goto fail;
        } else if (nm_engine_eval(e, seq, prompt + t, 1, logits, 0, &err)) {
            goto fail;
        }
        last = logits;
        if (df && fwrite(logits, sizeof *logits, (size_t)V, df) != (size_t)V) goto wfail;
    }
    double t1 = nm_now_s();
    long long j = 0; /* tokens printed (an end-of-generation token is not) */
    nm_finish fin = NM_FINISH_NONE;
    while (n_predict > 0 && fin == NM_FINISH_NONE) {
        int32_t tok = drawn >= 0 ? drawn : nm_sampler_sample(&smp, last, V);
        drawn = -1;
        if (tok < 0) goto oom;
        fin = nm_decode_token(&dec, tok);
        if (fin == NM_FINISH_ERROR) {
            nm_errf(&err, "detokenizing token %d failed (out of memory)", tok);
            goto fail;
        }
        if (dec.hit_eog) break;
        j++;
        if (!dec.detok) printf("%s%d", j > 1 ? "," : "", tok);
        /* the text as far as it can no longer become a stop string */
        fwrite(dec.text.text.buf + printed, 1, dec.text.released - printed, stdout);
        printed = dec.text.released;
        fflush(stdout);
        /* the last token's logits are needed only for the dump */
        if (fin == NM_FINISH_STOP || (fin == NM_FINISH_LENGTH && !df)) break;
        if (!df) {
            if (nm_engine_eval_draw(e, seq, &tok, 1, &smp, &drawn, &err)) goto fail;
            continue;
        }
        if (nm_engine_eval(e, seq, &tok, 1, logits, 0, &err)) goto fail;
        last = logits;
        if (df && fwrite(logits, sizeof *logits, (size_t)V, df) != (size_t)V) goto wfail;
    }
    /* what the detokenizer still holds ends the text (a no-op when the step ended it) */
    if (nm_decode_end(&dec)) goto oom;
    fwrite(dec.text.text.buf + printed, 1, dec.text.released - printed, stdout);
    if (j || dec.detok) putchar('\n');
    double t2 = nm_now_s();
    fprintf(stderr, "numoe: prompt %zu tokens in %.3f s (%.2f tok/s), generated %lld tokens in %.3f s (%.2f tok/s)\n",
            n_prompt, t1 - t0, (double)n_prompt / (t1 - t0 > 0 ? t1 - t0 : 1e-9), j, t2 - t1,
            (double)j / (t2 - t1 > 0 ? t2 - t1 : 1e-9));
    rc = 0;
    goto done;
oom:
    nm_errf(&err, "out of memory");
    goto fail;
wfail:
    nm_errf(&err, "writing %s failed: %s", dump, strerror(errno));
fail:
    fprintf(stderr, "numoe generate: %s\n", err.msg);
done:
    if (df && fclose(df) && rc == 0) {
        fprintf(stderr, "numoe generate: writing %s failed\n", dump);
        rc = 1;
    }
    if (rf) {
        nm_engine_route_log(e, NULL, &err);
        if (fclose(rf) && rc == 0) {
            fprintf(stderr, "numoe generate: writing %s failed\n", route);
            rc = 1;
        }
    }
    nm_decode_free(&dec);
    nm_engine_seq_free(e, seq);
    nm_tokenizer_free(tk);
    nm_sampler_free(&smp);
    free(logits);
    free(prompt);
    nm_session_close(&s);
    return rc;
}
