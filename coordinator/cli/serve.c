/* serve.c - `numoe serve`: the model behind an OpenAI- and
 * Ollama-compatible HTTP API, requests batched continuously.
 *
 * Order of start-up: the HTTP daemon first (so a port in use fails in a
 * second, and /health answers 503 "loading" while a big model maps and its
 * expert workers start), then the session, tokenizer, chat template and
 * scheduler, then /health turns 200 and one "listening" line goes to stderr.
 * SIGINT / SIGTERM stop it in the reverse order (docs/SERVE.md). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/opt.h"
#include "coordinator/cli/commands.h"
#include "coordinator/cli/options.h"
#include "coordinator/cli/session.h"
#include "coordinator/serve/http.h"
#include "coordinator/serve/info.h"
#include "coordinator/serve/scheduler.h"
#include "coordinator/text/chat_template.h"
#include "coordinator/text/sampler.h"
#include "coordinator/text/tokenizer.h"

#define CMD "numoe serve"
#define DEF_MAX_CONNS 256
#define DEF_MAX_PER_CLIENT 64
#define DEF_IDLE_S 30.0
#define DEF_REQUEST_S 60.0
#define MAX_CORS 4096

static int usage(FILE *f) {
    nm_sampler_params d = nm_sampler_params_default();
    fprintf(f,
            "usage: numoe serve --model M.gguf [options]\n"
            "\n"
            "OpenAI- and Ollama-compatible HTTP server with continuous batching (docs/SERVE.md).\n"
            "Endpoints: GET /health /metrics /v1/models /api/tags /api/version;\n"
            "           POST /v1/chat/completions /v1/completions /api/chat /api/generate\n"
            "\n"
            "  --host ADDR             address to listen on (default 127.0.0.1; 0.0.0.0 for all)\n"
            "  --port N                TCP port (default 10002; 0: the OS picks a free one, which the\n"
            "                          'loading' and 'listening' lines on stderr name)\n"
            "  --served-model-name S   model name in API answers (default: the file name without\n"
            "                          .gguf and without a -0000N-of-0000M split suffix)\n"
            "  --api-key-file FILE     require 'Authorization: Bearer KEY' on every endpoint except\n"
            "                          /health, /metrics, /api/version and /, KEY being the file's first\n"
            "                          line; the file must not be readable by group or others\n"
            "                          (default: $NUMOE_API_KEY if set, else no key)\n"
            "  --api-key KEY           the same with the key itself: every local user can read it in\n"
            "                          /proc/PID/cmdline, so it is warned about\n"
            "  --cors-origin ORIGIN    let web pages of ORIGIN (e.g. http://localhost:3000; repeat it\n"
            "                          for more; '*' for any) call the server from a browser. Default:\n"
            "                          any origin with an API key, none without (403)\n"
            "  --max-connections N     connections served at once; more get 503 (default %d)\n"
            "  --max-connections-per-client N\n"
            "                          of them from one client address; more get 503 (default %d;\n"
            "                          behind a reverse proxy every client has the proxy's address)\n"
            "  --idle-timeout S        close a connection that sends no request for S seconds after\n"
            "                          opening or after its last answer (default %g; 0: never)\n"
            "  --request-timeout S     close a connection whose request (headers and body) takes more\n"
            "                          than S seconds to arrive (default %g; 0: never). Answers have no\n"
            "                          time limit\n"
            "  --max-batch-size N      requests generating together (default 4)\n"
            "  --chunk-size N          tokens per batched step: one decode token per running request\n"
            "                          plus a chunk of a waiting prompt (default 256; at most --batch)\n"
            "  --cache-lens N          KV cache positions shared by all requests; each reserves\n"
            "                          prompt + max_tokens on admission and waits in the queue until\n"
            "                          that much is free (default: context * --max-batch-size)\n"
            "  --chat-template NAME    %s (default: detected from the GGUF)\n"
            "  --force-think           start every chat answer inside <think> (DeepSeek-R1)\n"
            "  --reasoning-format F    deepseek: <think> text goes to reasoning_content (OpenAI) /\n"
            "                          thinking (Ollama); none: left in the content (default deepseek)\n"
            "  --log-requests 0|1      one stderr line per request (default 1)\n"
            "  -q, --quiet             same as --log-requests 0\n"
            "\n"
            "model and engine:\n%s"
            "sampling defaults (a request's own fields override them; without a \"seed\" each request\n"
            "gets one derived from --seed and its arrival order):\n%s"
            "  (defaults: --temp %g --top-k %d --top-p %g --min-p %g --repeat-penalty %g --repeat-last-n %d\n"
            "   --seed %llu)\n",
            DEF_MAX_CONNS, DEF_MAX_PER_CLIENT, DEF_IDLE_S, DEF_REQUEST_S, nm_chat_template_names,
            nm_session_opts_help, nm_sampler_opts_help, d.temp, d.top_k, d.top_p, d.min_p,
            d.repeat_penalty, d.penalty_last_n, (unsigned long long)d.seed);
    return f == stdout ? 0 : 2;
}

/* ---- signals ---- */

static int sig_pipe[2] = {-1, -1};
static volatile sig_atomic_t sig_count, loading;

/* Wakes the main thread through a pipe (the only async-signal-safe way to
 * say more than "a flag changed"). A second signal while the model is still
 * loading, which cannot be interrupted, kills the process the default way. */
static void on_signal(int sig) {
    int saved = errno;
    sig_count++;
    if (sig_pipe[1] >= 0) {
        ssize_t w = write(sig_pipe[1], "x", 1);
        (void)w;
    }
    if (loading && sig_count > 1) {
        signal(sig, SIG_DFL);
        raise(sig);
    }
    errno = saved;
}

static int install_signals(nm_err *err) {
    if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK)) return nm_errf(err, "pipe: %s", strerror(errno));
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART; /* model loading and the daemon's threads go on through it */
    sigemptyset(&sa.sa_mask);
    /* A shell starts background jobs with SIGINT ignored so that Ctrl-C at
     * the prompt spares them; keep it that way (SIGTERM still stops us). */
    struct sigaction old;
    if (sigaction(SIGINT, NULL, &old) || old.sa_handler != SIG_IGN) sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    return 0;
}

static void restore_signals(void) {
    struct sigaction cur;
    if (!sigaction(SIGINT, NULL, &cur) && cur.sa_handler == on_signal) signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    for (int i = 0; i < 2; i++)
        if (sig_pipe[i] >= 0) close(sig_pipe[i]), sig_pipe[i] = -1;
}

static void wait_for_signal(void) {
    struct pollfd p = {.fd = sig_pipe[0], .events = POLLIN};
    while (!sig_count) poll(&p, 1, 1000);
}

/* ---- options ---- */

typedef struct {
    nm_session_opts so;
    nm_sampler_params sp;
    const char *host, *name, *api_key, *api_key_file, *tmpl_name;
    int port, force_think, reasoning, log_requests;
    char cors[MAX_CORS];    /* --cors-origin values joined with commas; "" none given */
    nm_conn_limits conns;
    nm_sched_opts sched;
} serve_opts;

/* 0 ok, 1 --help given, 2 bad usage (message printed). */
static int parse_args(serve_opts *o, int argc, char **argv) {
    memset(o, 0, sizeof *o);
    o->sp = nm_sampler_params_default();
    o->host = "127.0.0.1";
    o->port = 10002;
    o->reasoning = 1;
    o->log_requests = 1;
    o->sched.max_batch = 4;
    o->sched.chunk = 256;
    o->conns = (nm_conn_limits){.max_conns = DEF_MAX_CONNS, .max_per_client = DEF_MAX_PER_CLIENT,
                                .idle_s = DEF_IDLE_S, .request_s = DEF_REQUEST_S};
    int per_client_set = 0;
    for (int i = 1; i < argc; i++) {
        int r = nm_session_parse_opt(&o->so, argc, argv, &i, CMD);
        if (!r) r = nm_sampler_parse_opt(&o->sp, argc, argv, &i, CMD);
        if (r < 0) return 2;
        if (r) continue;
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        long long x;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return 1;
        if (!strcmp(a, "--force-think")) {
            o->force_think = 1;
            continue;
        }
        if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            o->log_requests = 0;
            continue;
        }
        if (!v) {
            fprintf(stderr, CMD ": unknown option or missing value: %s (see --help)\n", a);
            return 2;
        }
        if (!strcmp(a, "--host")) {
            o->host = v;
        } else if (!strcmp(a, "--port")) {
            if (nm_opt_int(CMD, a, v, 0, 65535, &x)) return 2;
            o->port = (int)x;
        } else if (!strcmp(a, "--served-model-name")) {
            if (!*v) return fprintf(stderr, CMD ": --served-model-name must not be empty\n"), 2;
            o->name = v;
        } else if (!strcmp(a, "--api-key")) {
            if (!*v) return fprintf(stderr, CMD ": --api-key must not be empty\n"), 2;
            o->api_key = v;
        } else if (!strcmp(a, "--api-key-file")) {
            o->api_key_file = v;
        } else if (!strcmp(a, "--cors-origin")) {
            size_t at = strlen(o->cors);
            if (!*v || strchr(v, ',') || strpbrk(v, " \t\r\n"))
                return fprintf(stderr, CMD ": --cors-origin takes one origin (scheme://host[:port]) or '*', got '%s'\n", v), 2;
            if (at + strlen(v) + 2 > sizeof o->cors) return fprintf(stderr, CMD ": too many --cors-origin values\n"), 2;
            snprintf(o->cors + at, sizeof o->cors - at, "%s%s", at ? "," : "", v);
        } else if (!strcmp(a, "--max-connections")) {
            if (nm_opt_int(CMD, a, v, 1, 100000, &x)) return 2;
            o->conns.max_conns = (int)x;
        } else if (!strcmp(a, "--max-connections-per-client")) {
            if (nm_opt_int(CMD, a, v, 1, 100000, &x)) return 2;
            o->conns.max_per_client = (int)x;
            per_client_set = 1;
        } else if (!strcmp(a, "--idle-timeout") || !strcmp(a, "--request-timeout")) {
            char *end;
            errno = 0;
            double t = strtod(v, &end);
            if (errno || end == v || *end || !(t >= 0 && t <= 86400))
                return fprintf(stderr, CMD ": %s must be a number of seconds from 0 to 86400, got '%s'\n", a, v), 2;
            if (a[2] == 'i') o->conns.idle_s = t;
            else o->conns.request_s = t;
        } else if (!strcmp(a, "--max-batch-size")) {
            if (nm_opt_int(CMD, a, v, 1, 4096, &x)) return 2;
            o->sched.max_batch = x;
        } else if (!strcmp(a, "--chunk-size")) {
            if (nm_opt_int(CMD, a, v, 1, 1 << 16, &x)) return 2;
            o->sched.chunk = x;
        } else if (!strcmp(a, "--cache-lens")) {
            if (nm_opt_int(CMD, a, v, 2, (long long)1 << 40, &x)) return 2;
            o->sched.cache_lens = x;
        } else if (!strcmp(a, "--chat-template")) {
            nm_chat_tmpl t;
            nm_err err;
            if (nm_chat_template_from_name(v, &t, &err)) return fprintf(stderr, CMD ": %s\n", err.msg), 2;
            o->tmpl_name = v;
        } else if (!strcmp(a, "--reasoning-format")) {
            if (!strcmp(v, "deepseek")) o->reasoning = 1;
            else if (!strcmp(v, "none")) o->reasoning = 0;
            else return fprintf(stderr, CMD ": --reasoning-format must be deepseek or none (got '%s')\n", v), 2;
        } else if (!strcmp(a, "--log-requests")) {
            if (nm_opt_int(CMD, a, v, 0, 1, &x)) return 2;
            o->log_requests = (int)x;
        } else {
            fprintf(stderr, CMD ": unknown option %s (see --help)\n", a);
            return 2;
        }
        i++;
    }
    if (!o->so.model_path) {
        fprintf(stderr, CMD ": no model given (--model FILE.gguf)\n");
        return 2;
    }
    if (o->api_key && o->api_key_file) return fprintf(stderr, CMD ": give --api-key or --api-key-file, not both\n"), 2;
    if (!per_client_set && o->conns.max_per_client > o->conns.max_conns) o->conns.max_per_client = o->conns.max_conns;
    if (strstr(o->cors, "*") && strcmp(o->cors, "*"))
        return fprintf(stderr, CMD ": --cors-origin '*' allows every origin: give it alone\n"), 2;
    return 0;
}

/* The key of --api-key-file: its first line. A key others can read is no
 * key, so such a file is refused rather than used. 0, or -1 with err. */
static int read_key_file(const char *path, char *key, size_t cap, nm_err *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) return nm_errf(err, "--api-key-file %s: %s", path, strerror(errno));
    struct stat st;
    int rc = -1;
    if (fstat(fd, &st)) {
        nm_errf(err, "--api-key-file %s: %s", path, strerror(errno));
    } else if (!S_ISREG(st.st_mode)) {
        nm_errf(err, "--api-key-file %s is not a regular file", path);
    } else if (st.st_mode & (S_IRWXG | S_IRWXO)) {
        nm_errf(err, "--api-key-file %s can be read or written by group or others (mode %03o); chmod 600 it", path,
                (unsigned)(st.st_mode & 0777));
    } else {
        ssize_t n = read(fd, key, cap - 1);
        if (n < 0) {
            nm_errf(err, "--api-key-file %s: %s", path, strerror(errno));
        } else {
            key[n] = 0;
            key[strcspn(key, "\r\n")] = 0;
            if (!key[0]) nm_errf(err, "--api-key-file %s: the first line is empty", path);
            else if ((size_t)n == cap - 1 && !strpbrk(key, "\r\n") && (size_t)strlen(key) == cap - 1)
                nm_errf(err, "--api-key-file %s: the key is longer than %zu bytes", path, cap - 2);
            else rc = 0;
        }
    }
    close(fd);
    return rc;
}

/* Engine health for the scheduler (scheduler.h nm_sched_probe): the expert
 * backend's, where it has one (workers). Engine thread. */
static void probe_experts(void *ctx, nm_sched_health *h) {
    nm_expert_backend *b = ctx;
    if (!b || !b->health) return;
    nm_expert_health eh;
    memset(&eh, 0, sizeof eh);
    b->health(b, &eh);
    h->ok = eh.ok;
    h->restarts = eh.restarts, h->give_ups = eh.give_ups;
    snprintf(h->why, sizeof h->why, "%s", eh.why);
}

/* ---- the model side ---- */

typedef struct {
    nm_session s;
    int s_open;
    nm_tokenizer *tk;
    nm_sched *sched;
} loaded;

static void iso8601_mtime(const char *path, char *out, size_t cap) {
    struct stat st;
    time_t t = stat(path, &st) ? time(NULL) : st.st_mtime;
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, cap, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static int load(loaded *l, const serve_opts *o, nm_http_model *m, nm_err *err) {
    /* the caches the scheduler will hold stay free of experts in VRAM (--gpu-experts auto) */
    nm_session_opts sess = o->so;
    sess.kv_positions = o->sched.cache_lens;
    sess.kv_seqs = (int)o->sched.max_batch;
    if (nm_session_open(&l->s, &sess, err)) return -1; /* its errors name the file */
    l->s_open = 1;
    if (nm_tokenizer_load(&l->tk, l->s.gguf, err)) return nm_err_prefix(err, "tokenizer of %s", o->so.model_path);
    nm_str tmpl = {"", 0};
    nm_gguf_get_str(l->s.gguf, "tokenizer.chat_template", &tmpl, NULL);
    nm_chat_tmpl t = NM_CHAT_TMPL_NONE;
    nm_err terr;
    if (nm_chat_template_resolve(o->tmpl_name, tmpl.ptr, (size_t)tmpl.len, &t, &terr)) {
        /* completions still work without one; chat requests say why they cannot */
        fprintf(stderr, CMD ": warning: %s; chat endpoints will answer 400\n", terr.msg);
        t = NM_CHAT_TMPL_NONE;
    }
    /* reject bad sampler defaults now rather than in every request */
    nm_sampler smp = {0};
    int bad = nm_sampler_init_params(&smp, &o->sp, l->s.model.hp.n_vocab, err);
    nm_sampler_free(&smp);
    if (bad) return nm_err_prefix(err, "sampler options");
    nm_sched_opts so = o->sched;
    so.probe = probe_experts, so.probe_ctx = l->s.experts;
    if (nm_sched_create(&l->sched, l->s.engine, l->tk, &so, err)) return nm_err_prefix(err, "scheduler");
    memset(m, 0, sizeof *m);
    m->sched = l->sched;
    m->tk = l->tk;
    m->tmpl = t;
    m->force_think = o->force_think;
    m->reasoning = o->reasoning;
    m->defaults = o->sp;
    nm_serve_model_facts_of(l->s.gguf, &m->facts);
    iso8601_mtime(o->so.model_path, m->modified, sizeof m->modified);
    return 0;
}

int nm_cmd_serve(int argc, char **argv) {
    serve_opts o;
    int pr = parse_args(&o, argc, argv);
    if (pr == 1) return usage(stdout);
    if (pr) return 2;
    char name[256];
    if (o.name) snprintf(name, sizeof name, "%s", o.name);
    else nm_serve_model_name(o.so.model_path, name, sizeof name);

    nm_err err;
    nm_http *h = NULL;
    loaded l;
    memset(&l, 0, sizeof l);
    int rc = 1;
    if (install_signals(&err)) goto fail;
    char file_key[4096];
    const char *key = o.api_key;
    if (o.api_key_file) {
        if (read_key_file(o.api_key_file, file_key, sizeof file_key, &err)) goto fail;
        key = file_key;
    } else if (o.api_key) {
        fprintf(stderr, CMD ": warning: --api-key puts the key on the command line, where every local user can "
                        "read it (/proc/%d/cmdline); use --api-key-file FILE or NUMOE_API_KEY\n", (int)getpid());
    } else if (getenv("NUMOE_API_KEY") && *getenv("NUMOE_API_KEY")) {
        snprintf(file_key, sizeof file_key, "%s", getenv("NUMOE_API_KEY"));
        key = file_key;
    }
    nm_http_opts ho = {.host = o.host, .port = o.port, .api_key = key, .model_name = name,
                       .log_requests = o.log_requests, .cors_origin = o.cors[0] ? o.cors : NULL, .conns = o.conns};
    if (nm_http_start(&h, &ho, &err)) goto fail;
    int v6 = strchr(o.host, ':') != NULL; /* a literal IPv6 address goes in brackets in a URL */
    /* the port is the bound one (with --port 0 the OS picked it), so a script
     * can poll /health from here on; the listening line below repeats it */
    fprintf(stderr, CMD ": loading %s (http://%s%s%s:%d/health answers 503 until it is ready)\n", o.so.model_path,
            v6 ? "[" : "", o.host, v6 ? "]" : "", nm_http_port(h));
    nm_http_model m;
    loading = 1;
    int lrc = load(&l, &o, &m, &err);
    loading = 0;
    if (lrc) goto fail;
    nm_sched_stats ss;
    nm_sched_get_stats(l.sched, &ss);
    fprintf(stderr,
            CMD ": %lld requests at once, %lld tokens per step, KV cache %lld positions, context %lld per request, "
                "chat template %s\n",
            (long long)ss.max_batch, (long long)ss.chunk, (long long)ss.cache_total, (long long)ss.n_ctx,
            nm_chat_template_name(m.tmpl));
    nm_http_set_model(h, &m);
    l.sched = NULL; /* the server owns it now; nm_http_close_gate hands it back */
    size_t max_body, max_prompt;
    nm_http_limits(h, &max_body, &max_prompt);
    fprintf(stderr,
            CMD ": request bodies up to %zu bytes, prompts up to %zu bytes; %d connections (%d per client), idle "
                "timeout %g s, request timeout %g s; browser origins: %s\n",
            max_body, max_prompt, o.conns.max_conns, o.conns.max_per_client, o.conns.idle_s, o.conns.request_s,
            o.cors[0] ? o.cors : key ? "* (an API key is set)" : "none");
    if (!sig_count) {
        fprintf(stderr, CMD ": listening on http://%s%s%s:%d (model %s)\n", v6 ? "[" : "", o.host, v6 ? "]" : "",
                nm_http_port(h), name);
        wait_for_signal();
    }
    fprintf(stderr, CMD ": shutting down\n");
    rc = 0;
    goto shutdown;
fail:
    fprintf(stderr, CMD ": %s\n", err.msg);
shutdown:
    if (h) {
        /* stop new connections and new work, end every request (blocked
         * handlers and stream callbacks then return), wait for the
         * connection threads, and only then free what they used */
        nm_sched *s = nm_http_close_gate(h);
        nm_sched_destroy(s);
        nm_http_stop(h);
    }
    nm_sched_destroy(l.sched);
    nm_tokenizer_free(l.tk);
    if (l.s_open) nm_session_close(&l.s);
    restore_signals();
    return rc;
}
