/* chat.c - `numoe chat`: an interactive conversation in the terminal.
 *
 * A message may span several lines: it is sent at an empty line (or at end of
 * input), unlike KTransformers' local_chat which starts generating at the
 * first newline. Lines starting with '/' are commands when they open a
 * message. Each turn renders the whole conversation with the model's chat
 * template, tokenizes it and evaluates only what follows the longest prefix
 * already in the KV cache, so earlier turns are not recomputed. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/opt.h"
#include "coordinator/cli/commands.h"
#include "coordinator/cli/options.h"
#include "coordinator/cli/session.h"
#include "coordinator/text/chat_template.h"
#include "coordinator/text/decode.h"
#include "coordinator/text/sampler.h"
#include "coordinator/text/tokenizer.h"

typedef enum { REASON_SHOW, REASON_HIDE, REASON_SEPARATE } reason_mode;

typedef struct {
    nm_chat_msg *v;
    size_t n, cap;
} msg_list;

typedef struct {
    nm_session s;
    nm_engine_seq *seq; /* the conversation's KV cache */
    nm_tokenizer *tk;
    nm_sampler smp;
    nm_chat_tmpl tmpl;
    msg_list msgs;
    int32_t *cached;   /* tokens whose KV is in the cache */
    size_t n_cached, cap_cached;
    float *logits;
    long long max_new;
    int force_think;
    reason_mode reason;
    const char **stops;
    int n_stops;
} chat;

static int usage(FILE *f) {
    fprintf(f,
            "usage: numoe chat --model M.gguf [options]\n"
            "\n"
            "Type a message; it may span several lines and is sent at an empty line (or Ctrl-D).\n"
            "Commands: /reset (forget the conversation), /exit, /help.\n"
            "\n"
            "  --system TEXT           system prompt\n"
            "  --prompt-file F         send the contents of F as the first message\n"
            "  --chat-template NAME    %s (default: detected from the GGUF)\n"
            "  --force-think           start each answer inside <think> (DeepSeek-R1)\n"
            "  --reasoning MODE        show | hide | separate: the <think> block printed inline, not at all,\n"
            "                          or on stderr apart from the answer (default show)\n"
            "  -n, --n-predict N       at most N tokens per answer (default 1024)\n"
            "  --stop STRING           also stop when the answer ends with STRING (repeatable)\n"
            "%s%s",
            nm_chat_template_names, nm_session_opts_help, nm_sampler_opts_help);
    return f == stdout ? 0 : 2;
}

static int push_msg(msg_list *l, const char *role, const char *content) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 8;
        nm_chat_msg *v = realloc(l->v, cap * sizeof *v);
        if (!v) return -1;
        l->v = v, l->cap = cap;
    }
    char *r = strdup(role), *c = strdup(content);
    if (!r || !c) return free(r), free(c), -1;
    l->v[l->n++] = (nm_chat_msg){r, c};
    return 0;
}

static void clear_msgs(msg_list *l, size_t keep) {
    while (l->n > keep) {
        l->n--;
        free((char *)l->v[l->n].role);
        free((char *)l->v[l->n].content);
    }
}

/* Reads one message: lines until an empty line or EOF. *cmd is set when the
 * first line is a /command. Returns NULL at EOF with nothing read. */
static char *read_message(int *eof) {
    size_t cap = 256, n = 0;
    char *buf = malloc(cap), *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    *eof = 0;
    if (!buf) return NULL;
    buf[0] = 0;
    while ((len = getline(&line, &lcap, stdin)) >= 0) {
        if (len > 0 && line[len - 1] == '\n') line[--len] = 0;
        if (len > 0 && line[len - 1] == '\r') line[--len] = 0;
        if (len == 0) {
            if (n) break;
            continue; /* empty lines before a message are ignored */
        }
        if (n + (size_t)len + 2 > cap) {
            while (n + (size_t)len + 2 > cap) cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) break;
            buf = nb;
        }
        if (n) buf[n++] = '\n';
        memcpy(buf + n, line, (size_t)len + 1);
        n += (size_t)len;
        if (n == (size_t)len && line[0] == '/') break; /* a command is one line */
    }
    if (len < 0) *eof = 1;
    free(line);
    if (!n) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* Prints the part of the answer text not printed yet, honouring the reasoning mode. */
static void emit(chat *c, const char *text, size_t len, size_t *shown_reason, size_t *shown_answer) {
    if (c->reason == REASON_SHOW) {
        fwrite(text + *shown_answer, 1, len - *shown_answer, stdout);
        *shown_answer = len;
        fflush(stdout);
        return;
    }
    nm_chat_reasoning r;
    nm_chat_split_reasoning(text, len, c->force_think, &r);
    if (c->reason == REASON_SEPARATE && r.reasoning_len > *shown_reason) {
        fwrite(r.reasoning + *shown_reason, 1, r.reasoning_len - *shown_reason, stderr);
        *shown_reason = r.reasoning_len;
    }
    if (!r.thinking && r.answer_len > *shown_answer) {
        fwrite(r.answer + *shown_answer, 1, r.answer_len - *shown_answer, stdout);
        *shown_answer = r.answer_len;
        fflush(stdout);
    }
}

/* One user turn: render, evaluate the new suffix, generate and stream the answer. */
static int turn(chat *c, nm_err *err) {
    char *prompt = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int rc = -1;
    nm_decode ans = {0}; /* the answer; shown up to ans.text.released */
    nm_engine *e = c->s.engine;
    if (nm_chat_render(c->tmpl, c->msgs.v, c->msgs.n, 1, c->force_think, NULL, NULL, &prompt, err) ||
        nm_tokenize(c->tk, prompt, strlen(prompt), 0, 1, &ids, &n_ids, err))
        goto out;
    size_t keep = 0;
    while (keep < n_ids && keep < c->n_cached && ids[keep] == c->cached[keep]) keep++;
    if (keep == n_ids) keep--; /* at least one token must be evaluated to get logits */
    nm_engine_seq_rewind(e, c->seq, (int64_t)keep);
    if ((int64_t)n_ids + c->max_new > nm_engine_seq_ctx(e, c->seq)) {
        nm_errf(err, "the conversation (%zu tokens) plus up to %lld new ones exceeds the context (%lld); /reset or raise --ctx-size",
                n_ids, c->max_new, (long long)nm_engine_seq_ctx(e, c->seq));
        goto out;
    }
    double t0 = nm_now_s();
    if (nm_engine_eval(e, c->seq, ids + keep, (int64_t)(n_ids - keep), c->logits, 0, err)) goto out;
    double t1 = nm_now_s();
    if (n_ids > c->cap_cached) {
        int32_t *nc = realloc(c->cached, (n_ids + (size_t)c->max_new + 1) * sizeof *nc);
        if (!nc) goto oom;
        c->cached = nc, c->cap_cached = n_ids + (size_t)c->max_new + 1;
    }
    memcpy(c->cached, ids, n_ids * sizeof *ids);
    c->n_cached = n_ids;
    for (size_t i = keep; i < n_ids; i++) nm_sampler_accept(&c->smp, ids[i]);
    if (nm_decode_init(&ans, c->tk, 1, c->stops, c->n_stops, c->max_new, 0, err)) goto out;
    size_t shown_r = 0, shown_a = 0;
    for (;;) {
        int32_t t = nm_sampler_sample(&c->smp, c->logits, e->info.n_vocab);
        if (t < 0) goto oom;
        nm_finish f = nm_decode_token(&ans, t);
        if (f == NM_FINISH_ERROR) goto oom;
        /* shown as far as it cannot still turn into a stop string */
        emit(c, ans.text.text.buf, ans.text.released, &shown_r, &shown_a);
        if (f != NM_FINISH_NONE) break;
        if (c->n_cached < c->cap_cached) c->cached[c->n_cached++] = t;
        if (nm_engine_eval(e, c->seq, &t, 1, c->logits, 0, err)) goto out;
    }
    long long n_gen = ans.n_gen;
    double t2 = nm_now_s();
    fputc('\n', stdout);
    fflush(stdout);
    fprintf(stderr, "[prompt %zu tokens (%zu new) at %.2f tok/s, answer %lld tokens at %.2f tok/s]\n", n_ids,
            n_ids - keep, (double)(n_ids - keep) / (t1 - t0 > 0 ? t1 - t0 : 1e-9), n_gen,
            (double)n_gen / (t2 - t1 > 0 ? t2 - t1 : 1e-9));
    /* history keeps the answer only: the V3/R1 templates drop earlier reasoning */
    nm_chat_reasoning r;
    nm_chat_split_reasoning(ans.text.text.buf, ans.text.text.len, c->force_think, &r);
    char *keep_text = strndup(r.answer ? r.answer : "", r.answer_len);
    if (!keep_text || push_msg(&c->msgs, "assistant", keep_text)) {
        free(keep_text);
        goto oom;
    }
    free(keep_text);
    rc = 0;
    goto out;
oom:
    nm_errf(err, "out of memory");
out:
    free(prompt);
    free(ids);
    nm_decode_free(&ans);
    return rc;
}

static char *read_file(const char *path, nm_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return nm_errf(err, "%s: %s", path, strerror(errno)), NULL;
    size_t cap = 4096, n = 0, r;
    char *buf = malloc(cap);
    while (buf && (r = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += r;
        if (cap - n < 2) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) free(buf);
            buf = nb;
        }
    }
    fclose(f);
    if (!buf) return nm_errf(err, "out of memory"), NULL;
    buf[n] = 0;
    return buf;
}

int nm_cmd_chat(int argc, char **argv) {
    chat c;
    memset(&c, 0, sizeof c);
    nm_session_opts so = {0};
    nm_sampler_params sp = nm_sampler_params_default();
    const char *system = NULL, *prompt_file = NULL, *tmpl_name = NULL;
    c.max_new = 1024;
    c.stops = calloc((size_t)argc, sizeof *c.stops);
    for (int i = 1; i < argc; i++) {
        int r = nm_session_parse_opt(&so, argc, argv, &i, "numoe chat");
        if (!r) r = nm_sampler_parse_opt(&sp, argc, argv, &i, "numoe chat");
        if (r < 0) return free(c.stops), 2;
        if (r) continue;
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return free(c.stops), usage(stdout);
        if (!strcmp(a, "--force-think")) {
            c.force_think = 1;
            continue;
        }
        if (!v) {
            fprintf(stderr, "numoe chat: unknown option or missing value: %s\n", a);
            return free(c.stops), usage(stderr);
        }
        if (!strcmp(a, "--system")) system = v;
        else if (!strcmp(a, "--prompt-file")) prompt_file = v;
        else if (!strcmp(a, "--chat-template")) tmpl_name = v;
        else if (!strcmp(a, "--stop")) c.stops[c.n_stops++] = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) {
            if (nm_parse_int(v, 1, LLONG_MAX, &c.max_new))
                return fprintf(stderr, "numoe chat: bad -n %s\n", v), free(c.stops), 2;
        } else if (!strcmp(a, "--reasoning")) {
            if (!strcmp(v, "show")) c.reason = REASON_SHOW;
            else if (!strcmp(v, "hide")) c.reason = REASON_HIDE;
            else if (!strcmp(v, "separate")) c.reason = REASON_SEPARATE;
            else return fprintf(stderr, "numoe chat: --reasoning show|hide|separate\n"), free(c.stops), 2;
        } else {
            fprintf(stderr, "numoe chat: unknown option %s\n", a);
            return free(c.stops), usage(stderr);
        }
        i++;
    }
    nm_err err;
    int rc = 1;
    char *first = NULL;
    if (prompt_file && !(first = read_file(prompt_file, &err))) goto fail_nosession;
    if (nm_session_open(&c.s, &so, &err)) goto fail_nosession;
    nm_str tmpl = {"", 0};
    nm_gguf_get_str(c.s.gguf, "tokenizer.chat_template", &tmpl, NULL);
    if (nm_tokenizer_load(&c.tk, c.s.gguf, &err) ||
        nm_chat_template_resolve(tmpl_name, tmpl.ptr, (size_t)tmpl.len, &c.tmpl, &err) ||
        nm_sampler_init_params(&c.smp, &sp, c.s.engine->info.n_vocab, &err) ||
        !(c.seq = nm_engine_seq_new(c.s.engine, c.s.engine->info.n_ctx, &err)))
        goto fail;
    if (!(c.logits = malloc((size_t)c.s.engine->info.n_vocab * sizeof *c.logits))) {
        nm_errf(&err, "out of memory");
        goto fail;
    }
    if (system && push_msg(&c.msgs, "system", system)) goto fail;
    size_t base = c.msgs.n;
    int interactive = isatty(STDIN_FILENO);
    fprintf(stderr, "numoe chat: template %s; end a message with an empty line; /help for commands\n",
            nm_chat_template_name(c.tmpl));
    for (;;) {
        int eof = 0;
        char *msg = first;
        first = NULL;
        if (!msg) {
            if (interactive) fputs("> ", stdout), fflush(stdout);
            msg = read_message(&eof);
        }
        if (!msg) break;
        if (msg[0] == '/') {
            if (!strcmp(msg, "/exit") || !strcmp(msg, "/quit")) {
                free(msg);
                break;
            } else if (!strcmp(msg, "/reset")) {
                clear_msgs(&c.msgs, base);
                c.n_cached = 0;
                nm_engine_seq_rewind(c.s.engine, c.seq, 0);
                nm_sampler_reset(&c.smp);
                printf("[conversation reset]\n");
            } else {
                printf("commands: /reset  forget the conversation\n          /exit   leave\n"
                       "a message ends at an empty line\n");
            }
            fflush(stdout);
            free(msg);
            if (eof) break;
            continue;
        }
        int r = push_msg(&c.msgs, "user", msg);
        free(msg);
        if (r || turn(&c, &err)) {
            if (r) nm_errf(&err, "out of memory");
            fprintf(stderr, "numoe chat: %s\n", err.msg);
            clear_msgs(&c.msgs, c.msgs.n - 1); /* drop the failed user turn */
        }
        if (eof) break;
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "numoe chat: %s\n", err.msg);
done:
    clear_msgs(&c.msgs, 0);
    free(c.msgs.v);
    free(c.cached);
    free(c.logits);
    nm_sampler_free(&c.smp);
    nm_tokenizer_free(c.tk);
    if (c.s.engine) nm_engine_seq_free(c.s.engine, c.seq);
    nm_session_close(&c.s);
    free(c.stops);
    free(first);
    return rc;
fail_nosession:
    fprintf(stderr, "numoe chat: %s\n", err.msg);
    free(c.stops);
    free(first);
    return 1;
}
