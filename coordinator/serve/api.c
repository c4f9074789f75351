/* api.c - the JSON bodies of `numoe serve` (see api.h).
 *
 * Parsing is strict about types and ranges (a wrong type is a client bug we
 * report, never a value we guess), lenient about fields it does not know
 * (OpenAI-compatible clients send many: tools, response_format, user, ...).
 *
 * Rendering builds cJSON trees, except for two kinds of values cJSON cannot
 * write faithfully, which are inserted as raw JSON text:
 *   - generated text: it is length-delimited (views into a larger buffer),
 *     may in principle hold NUL bytes, and must come out as valid UTF-8
 *     (invalid bytes become U+FFFD) whatever the model emitted;
 *   - 64-bit integers: cJSON prints numbers through double with "%1.15g",
 *     which turns large values into 1e+15 notation that Go clients (Ollama's)
 *     refuse to read into an int64. */
#include "coordinator/serve/api.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_STOPS 16

/* ------------------------------------------------------------------ errors */

int nm_api_errorf(nm_api_error *e, int status, const char *type, const char *param, const char *fmt, ...) {
    if (!e) return -1;
    e->status = status;
    snprintf(e->type, sizeof e->type, "%s", type ? type : "");
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

/* Every parse error is a 400 invalid_request_error. */
#define BAD(e, param, ...) nm_api_errorf((e), 400, "invalid_request_error", (param), __VA_ARGS__)

char *nm_api_error_json(const nm_api_error *e, int ollama_style) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return NULL;
    int ok;
    if (ollama_style) {
        ok = cJSON_AddStringToObject(root, "error", e->message) != NULL;
    } else {
        cJSON *err = cJSON_AddObjectToObject(root, "error");
        ok = err && cJSON_AddStringToObject(err, "message", e->message) &&
             cJSON_AddStringToObject(err, "type", e->type[0] ? e->type : "invalid_request_error") &&
             (e->param[0] ? cJSON_AddStringToObject(err, "param", e->param) != NULL
                          : cJSON_AddNullToObject(err, "param") != NULL) &&
             cJSON_AddNullToObject(err, "code");
    }
    char *s = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return s;
}

/* ------------------------------------------------------------- field access */

static const char *type_name(const cJSON *v) {
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    return "null";
}

/* The member NAME of OBJ, or NULL when absent or null: OpenAI's SDKs send
 * null for "not given", so null never overrides a default. */
static const cJSON *field(const cJSON *obj, const char *name) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
    return v && !cJSON_IsNull(v) ? v : NULL;
}

/* Parameter names as clients know them: "options.temperature" for Ollama. */
static const char *pname(char *buf, size_t size, const char *prefix, const char *name) {
    snprintf(buf, size, "%s%s", prefix, name);
    return buf;
}

/* A boolean member: *out untouched when absent. */
static int opt_bool(const cJSON *obj, const char *prefix, const char *name, int *out, nm_api_error *e) {
    const cJSON *v = field(obj, name);
    if (!v) return 0;
    char p[64];
    pname(p, sizeof p, prefix, name);
    if (!cJSON_IsBool(v)) return BAD(e, p, "'%s' must be a boolean, got %s", p, type_name(v));
    *out = cJSON_IsTrue(v) ? 1 : 0;
    return 0;
}

/* A number member in [lo, hi] (lo excluded with lo_open): *out untouched and
 * *has 0 when absent. Bounds are checked on the double, so a huge value is a
 * 400 before any conversion could overflow. */
static int opt_num(const cJSON *obj, const char *prefix, const char *name, double lo, double hi, int lo_open,
                   double *out, int *has, nm_api_error *e) {
    const cJSON *v = field(obj, name);
    *has = 0;
    if (!v) return 0;
    char p[64];
    pname(p, sizeof p, prefix, name);
    if (!cJSON_IsNumber(v)) return BAD(e, p, "'%s' must be a number, got %s", p, type_name(v));
    double d = v->valuedouble;
    if (!isfinite(d) || (lo_open ? d <= lo : d < lo) || d > hi) {
        if (hi >= FLT_MAX) return BAD(e, p, "'%s' must be a number %s %g, got %g", p, lo_open ? ">" : ">=", lo, d);
        return BAD(e, p, "'%s' must be a number between %g and %g, got %g", p, lo, hi, d);
    }
    *out = d, *has = 1;
    return 0;
}

/* A float sampler parameter, written only when present. */
static int opt_float(const cJSON *obj, const char *prefix, const char *name, double lo, double hi, int lo_open,
                     float *out, nm_api_error *e) {
    double d;
    int has;
    if (opt_num(obj, prefix, name, lo, hi, lo_open, &d, &has, e)) return -1;
    /* a double above the bound may round onto it as a float (1e-50 > 0, but
     * not as a float): the sampler would then refuse it in its own words */
    if (has && lo_open && (float)d <= (float)lo) {
        char p[64];
        pname(p, sizeof p, prefix, name);
        return BAD(e, p, "'%s' must be a number > %g, got %g", p, lo, d);
    }
    if (has) *out = (float)d;
    return 0;
}

/* An integer member in [lo, hi]: JSON has one number type, so 40.0 is the
 * integer 40 but 1.5, "10" and 1e30 (for a small range) are refused. */
static int opt_int(const cJSON *obj, const char *prefix, const char *name, double lo, double hi, int64_t *out,
                   int *has, nm_api_error *e) {
    const cJSON *v = field(obj, name);
    *has = 0;
    if (!v) return 0;
    char p[64];
    pname(p, sizeof p, prefix, name);
    if (!cJSON_IsNumber(v)) return BAD(e, p, "'%s' must be an integer, got %s", p, type_name(v));
    double d = v->valuedouble;
    if (!isfinite(d) || floor(d) != d) return BAD(e, p, "'%s' must be an integer, got %g", p, d);
    if (d < lo || d > hi) return BAD(e, p, "'%s' must be an integer between %.0f and %.0f, got %g", p, lo, hi, d);
    *out = (int64_t)d, *has = 1;
    return 0;
}

/* seed: any integer a client may send, [-2^63, 2^64 - 1]. cJSON keeps numbers
 * as doubles, so 2^64 - 1 arrives rounded up to 2^64 and is capped back to
 * UINT64_MAX; above 2^53 neighbouring seeds can share a double (documented in
 * docs/SERVE.md). -1 is "random" for llama.cpp and Ollama, so it leaves the
 * server's seed in place. */
static int opt_seed(const cJSON *obj, const char *prefix, nm_api_request *r, nm_api_error *e) {
    const cJSON *v = field(obj, "seed");
    if (!v) return 0;
    char p[64];
    pname(p, sizeof p, prefix, "seed");
    if (!cJSON_IsNumber(v)) return BAD(e, p, "'%s' must be an integer, got %s", p, type_name(v));
    double d = v->valuedouble;
    if (!isfinite(d) || floor(d) != d) return BAD(e, p, "'%s' must be an integer, got %g", p, d);
    if (d < -0x1p63 || d > 0x1p64) return BAD(e, p, "'%s' %g is out of the 64-bit range", p, d);
    if (d == -1) return 0;
    r->sampling.seed = d < 0 ? (uint64_t)(int64_t)d : d >= 0x1p64 ? UINT64_MAX : (uint64_t)d;
    r->has_seed = 1;
    return 0;
}

/* An optional string member, copied (*out untouched when absent). */
static int opt_str(const cJSON *obj, const char *name, char **out, nm_api_error *e) {
    const cJSON *v = field(obj, name);
    if (!v) return 0;
    if (!cJSON_IsString(v)) return BAD(e, name, "'%s' must be a string, got %s", name, type_name(v));
    char *s = strdup(v->valuestring);
    if (!s) return nm_api_errorf(e, 500, "server_error", name, "out of memory");
    free(*out);
    *out = s;
    return 0;
}

/* -------------------------------------------------------- sampling options */

/* stop: a string, or an array of at most MAX_STOPS strings. Empty strings are
 * refused rather than skipped: a stop that can never match is a client bug. */
static int parse_stop(const cJSON *obj, const char *prefix, nm_api_request *r, nm_api_error *e) {
    const cJSON *v = field(obj, "stop");
    if (!v) return 0;
    char p[64];
    pname(p, sizeof p, prefix, "stop");
    int n = cJSON_IsString(v) ? 1 : cJSON_IsArray(v) ? cJSON_GetArraySize(v) : -1;
    if (n < 0) return BAD(e, p, "'%s' must be a string or an array of strings, got %s", p, type_name(v));
    if (n > MAX_STOPS) return BAD(e, p, "'%s' has %d strings; at most %d are supported", p, n, MAX_STOPS);
    for (int i = 0; i < r->n_stops; i++) free(r->stops[i]);
    free(r->stops);
    r->stops = NULL, r->n_stops = 0;
    if (n == 0) return 0;
    if (!(r->stops = calloc((size_t)n, sizeof *r->stops))) return nm_api_errorf(e, 500, "server_error", p, "out of memory");
    for (int i = 0; i < n; i++) {
        const cJSON *s = cJSON_IsString(v) ? v : cJSON_GetArrayItem(v, i);
        if (!cJSON_IsString(s)) return BAD(e, p, "'%s[%d]' must be a string, got %s", p, i, type_name(s));
        if (!s->valuestring[0]) return BAD(e, p, "'%s' strings must not be empty", p);
        if (!(r->stops[i] = strdup(s->valuestring))) return nm_api_errorf(e, 500, "server_error", p, "out of memory");
        r->n_stops = i + 1;
    }
    return 0;
}

/* The sampler fields both APIs share, at the top level (OpenAI) or inside
 * "options" (Ollama, prefix "options."). Ranges follow OpenAI where it has
 * the field and the sampler's own checks (sampler.c) elsewhere. */
static int parse_sampling(const cJSON *obj, const char *prefix, nm_api_request *r, nm_api_error *e) {
    nm_sampler_params *s = &r->sampling;
    int64_t v;
    int has;
    if (opt_float(obj, prefix, "temperature", 0, 2, 0, &s->temp, e) ||
        opt_float(obj, prefix, "top_p", 0, 1, 0, &s->top_p, e) ||
        opt_float(obj, prefix, "min_p", 0, 1, 0, &s->min_p, e) ||
        opt_float(obj, prefix, "presence_penalty", -2, 2, 0, &s->presence_penalty, e) ||
        opt_float(obj, prefix, "frequency_penalty", -2, 2, 0, &s->frequency_penalty, e) ||
        opt_float(obj, prefix, "repeat_penalty", 0, FLT_MAX, 1, &s->repeat_penalty, e))
        return -1;
    if (opt_int(obj, prefix, "top_k", 0, INT32_MAX, &v, &has, e)) return -1;
    if (has) s->top_k = (int32_t)v;
    /* Ollama's -1 means "the whole context", which the sampler's fixed
     * penalty ring cannot do; say so instead of quietly using another window */
    const cJSON *rl = field(obj, "repeat_last_n");
    if (rl && cJSON_IsNumber(rl) && rl->valuedouble == -1) {
        char p[64];
        pname(p, sizeof p, prefix, "repeat_last_n");
        return BAD(e, p, "'%s' -1 (the whole context) is not supported; give a window size >= 0", p);
    }
    if (opt_int(obj, prefix, "repeat_last_n", 0, NM_API_MAX_REPEAT_LAST_N, &v, &has, e)) return -1;
    if (has) s->penalty_last_n = (int32_t)v;
    return opt_seed(obj, prefix, r, e) || parse_stop(obj, prefix, r, e) ? -1 : 0;
}

/* ----------------------------------------------------------------- messages */

static char *oom_str(nm_api_error *e, const char *param) {
    nm_api_errorf(e, 500, "server_error", param, "out of memory");
    return NULL;
}

/* OpenAI content parts: only {"type":"text","text":...}, joined with "\n" as
 * llama.cpp's server and vLLM join them. */
static char *join_text_parts(const cJSON *parts, int mi, nm_api_error *e) {
    char p[64];
    size_t total = 1;
    int j = 0;
    const cJSON *part;
    cJSON_ArrayForEach(part, parts) { /* linear: cJSON_GetArrayItem walks the list each time */
        snprintf(p, sizeof p, "messages[%d].content[%d]", mi, j);
        if (!cJSON_IsObject(part)) return BAD(e, p, "'%s' must be an object, got %s", p, type_name(part)), NULL;
        const cJSON *t = field(part, "type"), *txt = field(part, "text");
        snprintf(p, sizeof p, "messages[%d].content[%d].type", mi, j);
        if (!cJSON_IsString(t)) return BAD(e, p, "'%s' must be a string", p), NULL;
        if (strcmp(t->valuestring, "text"))
            return BAD(e, p, "only text content parts are supported, got type \"%.64s\"", t->valuestring), NULL;
        snprintf(p, sizeof p, "messages[%d].content[%d].text", mi, j);
        if (!cJSON_IsString(txt)) return BAD(e, p, "'%s' must be a string", p), NULL;
        total += strlen(txt->valuestring) + 1;
        j++;
    }
    char *out = malloc(total);
    if (!out) return oom_str(e, "messages");
    size_t at = 0;
    cJSON_ArrayForEach(part, parts) {
        const char *txt = field(part, "text")->valuestring;
        size_t l = strlen(txt);
        if (part != parts->child) out[at++] = '\n';
        memcpy(out + at, txt, l), at += l;
    }
    out[at] = 0;
    return out;
}

/* A message's content as one string. Missing content is allowed only for an
 * assistant turn that carries tool calls (OpenAI's rule); it becomes "". */
static char *message_content(const cJSON *m, int mi, const char *role, int ollama, nm_api_error *e) {
    char p[64];
    snprintf(p, sizeof p, "messages[%d].content", mi);
    const cJSON *c = field(m, "content");
    int tool_call = !strcmp(role, "assistant") && (field(m, "tool_calls") || field(m, "function_call"));
    if (!c && !tool_call) return BAD(e, p, "'%s' is required", p), NULL;
    if (!c || cJSON_IsString(c)) {
        char *s = strdup(c ? c->valuestring : "");
        return s ? s : oom_str(e, p);
    }
    if (cJSON_IsArray(c) && !ollama) return join_text_parts(c, mi, e);
    return BAD(e, p, ollama ? "'%s' must be a string, got %s" : "'%s' must be a string or an array of text parts, got %s",
               p, type_name(c)), NULL;
}

/* system / user / assistant / tool, as nm_chat_render knows them; OpenAI's
 * newer "developer" role is its system prompt under another name. */
static const char *canonical_role(const char *role) {
    static const char *const known[] = {"system", "user", "assistant", "tool"};
    for (size_t i = 0; i < sizeof known / sizeof *known; i++)
        if (!strcmp(role, known[i])) return known[i];
    return !strcmp(role, "developer") ? "system" : NULL;
}

static int parse_message(const cJSON *m, int mi, int ollama, nm_chat_msg *out, nm_api_error *e) {
    char p[64];
    snprintf(p, sizeof p, "messages[%d]", mi);
    if (!cJSON_IsObject(m)) return BAD(e, p, "'%s' must be an object, got %s", p, type_name(m));
    snprintf(p, sizeof p, "messages[%d].role", mi);
    const cJSON *rv = field(m, "role");
    if (!rv) return BAD(e, p, "'%s' is required", p);
    if (!cJSON_IsString(rv)) return BAD(e, p, "'%s' must be a string, got %s", p, type_name(rv));
    const char *role = canonical_role(rv->valuestring);
    if (!role)
        return BAD(e, p, "unknown role \"%.64s\" in messages[%d] (expected system, user, assistant or tool)",
                   rv->valuestring, mi);
    const cJSON *img = field(m, "images");
    if (ollama && img && !(cJSON_IsArray(img) && cJSON_GetArraySize(img) == 0)) {
        snprintf(p, sizeof p, "messages[%d].images", mi);
        return BAD(e, p, "images are not supported (the served model reads text only)");
    }
    char *content = message_content(m, mi, role, ollama, e);
    if (!content) return -1;
    char *r = strdup(role);
    if (!r) {
        free(content);
        return nm_api_errorf(e, 500, "server_error", p, "out of memory");
    }
    out->role = r, out->content = content;
    return 0;
}

static int parse_messages(const cJSON *root, int ollama, nm_api_request *r, nm_api_error *e) {
    const cJSON *ms = field(root, "messages");
    if (ollama && (!ms || (cJSON_IsArray(ms) && cJSON_GetArraySize(ms) == 0))) {
        r->load_only = 1; /* Ollama's "load the model" request */
        return 0;
    }
    if (!ms) return BAD(e, "messages", "'messages' is required");
    if (!cJSON_IsArray(ms)) return BAD(e, "messages", "'messages' must be an array of messages, got %s", type_name(ms));
    int n = cJSON_GetArraySize(ms);
    if (n == 0) return BAD(e, "messages", "'messages' must contain at least one message");
    if (!(r->msgs = calloc((size_t)n, sizeof *r->msgs))) return nm_api_errorf(e, 500, "server_error", "messages", "out of memory");
    const cJSON *m;
    cJSON_ArrayForEach(m, ms) {
        if (parse_message(m, (int)r->n_msgs, ollama, &r->msgs[r->n_msgs], e)) return -1;
        r->n_msgs++;
    }
    return 0;
}

/* ------------------------------------------------------------------ prompts */

/* OpenAI's prompt may be a string, an array of strings (one completion each),
 * a token-id array or an array of those. One string is all one request makes
 * here; token ids would bypass the tokenizer and the checks on it. */
static int parse_openai_prompt(const cJSON *root, nm_api_request *r, nm_api_error *e) {
    const cJSON *v = field(root, "prompt");
    if (!v) return BAD(e, "prompt", "'prompt' is required");
    if (cJSON_IsArray(v)) {
        int n = cJSON_GetArraySize(v);
        const cJSON *first = cJSON_GetArrayItem(v, 0);
        if (first && (cJSON_IsNumber(first) || cJSON_IsArray(first)))
            return BAD(e, "prompt", "token-id prompts are not supported; send the prompt as a string");
        if (n != 1) return BAD(e, "prompt", "'prompt' must be a string or an array of exactly one string (got %d)", n);
        v = first;
    }
    if (!cJSON_IsString(v)) return BAD(e, "prompt", "'prompt' must be a string, got %s", type_name(v));
    if (!(r->prompt = strdup(v->valuestring))) return nm_api_errorf(e, 500, "server_error", "prompt", "out of memory");
    return 0;
}

static int parse_ollama_prompt(const cJSON *root, nm_api_request *r, nm_api_error *e) {
    const cJSON *img = field(root, "images");
    if (img && !(cJSON_IsArray(img) && cJSON_GetArraySize(img) == 0))
        return BAD(e, "images", "images are not supported (the served model reads text only)");
    if (opt_str(root, "prompt", &r->prompt, e) || opt_str(root, "system", &r->system, e) ||
        opt_bool(root, "", "raw", &r->raw, e))
        return -1;
    if (!r->prompt && !(r->prompt = strdup(""))) return nm_api_errorf(e, 500, "server_error", "prompt", "out of memory");
    /* Ollama's rule: nothing to say means "load the model" */
    r->load_only = !r->prompt[0] && (!r->system || !r->system[0]);
    return 0;
}

/* -------------------------------------------------------------- top levels */

static int parse_openai(const cJSON *root, nm_api_request *r, nm_api_error *e) {
    int64_t v;
    int has;
    if (opt_str(root, "model", &r->model, e)) return -1;
    if (r->kind == NM_API_OPENAI_CHAT ? parse_messages(root, 0, r, e) : parse_openai_prompt(root, r, e)) return -1;
    if (opt_bool(root, "", "stream", &r->stream, e) || opt_bool(root, "", "ignore_eos", &r->ignore_eos, e)) return -1;
    const cJSON *so = field(root, "stream_options");
    if (so && !cJSON_IsObject(so))
        return BAD(e, "stream_options", "'stream_options' must be an object, got %s", type_name(so));
    if (so && opt_bool(so, "stream_options.", "include_usage", &r->include_usage, e)) return -1;
    if (opt_int(root, "", "n", 0, INT32_MAX, &v, &has, e)) return -1;
    if (has && v != 1) return BAD(e, "n", "only n = 1 (one choice per request) is supported, got %" PRId64, v);
    if (opt_int(root, "", "max_tokens", 1, INT32_MAX, &v, &has, e)) return -1;
    if (has) r->max_tokens = v;
    if (opt_int(root, "", "max_completion_tokens", 1, INT32_MAX, &v, &has, e)) return -1;
    if (has) r->max_tokens = v;
    return parse_sampling(root, "", r, e);
}

static int parse_ollama(const cJSON *root, nm_api_request *r, nm_api_error *e) {
    const cJSON *m = field(root, "model");
    if (!m || (cJSON_IsString(m) && !m->valuestring[0])) return BAD(e, "model", "model is required");
    if (opt_str(root, "model", &r->model, e)) return -1;
    if (r->kind == NM_API_OLLAMA_CHAT ? parse_messages(root, 1, r, e) : parse_ollama_prompt(root, r, e)) return -1;
    if (opt_bool(root, "", "stream", &r->stream, e)) return -1;
    const cJSON *o = field(root, "options");
    if (!o) return 0;
    if (!cJSON_IsObject(o)) return BAD(e, "options", "'options' must be an object, got %s", type_name(o));
    int64_t v;
    int has;
    /* Ollama: -1 is "no limit", -2 "fill the context"; any <= 0 is no limit */
    if (opt_int(o, "options.", "num_predict", INT32_MIN, INT32_MAX, &v, &has, e)) return -1;
    if (has) r->max_tokens = v > 0 ? v : -1;
    return parse_sampling(o, "options.", r, e);
}

/* ------------------------------------------------------- NUL inside strings */

/* cJSON turns \u0000 into a NUL byte, where the C string then ends: "a\u0000b"
 * would be read as "a", silently. Such a body is refused, naming the string.
 * The walk runs on a body cJSON has accepted, so it is valid JSON. */
typedef struct {
    const char *p, *end;
    char path[64];
} nul_walk;

static void skip_ws(nul_walk *w) {
    while (w->p < w->end && (*w->p == ' ' || *w->p == '\t' || *w->p == '\n' || *w->p == '\r')) w->p++;
}

/* The string at w->p (its opening quote): 1 when it holds \u0000. Its raw
 * text (up to cap - 1 bytes) goes to key when key is not NULL. */
static int walk_string(nul_walk *w, char *key, size_t cap) {
    size_t k = 0;
    int nul = 0;
    for (w->p++; w->p < w->end && *w->p != '"'; w->p++) {
        if (*w->p == '\\' && w->p + 1 < w->end) {
            if (w->p[1] == 'u' && w->end - w->p >= 6 && !memcmp(w->p + 2, "0000", 4)) nul = 1;
            if (key && k + 2 < cap) key[k++] = w->p[0], key[k++] = w->p[1];
            w->p++;
            continue;
        }
        if (key && k + 1 < cap) key[k++] = *w->p;
    }
    w->p++;
    if (key) key[k] = 0;
    return nul;
}

/* 1 when the value at w->p, at path[0..plen), holds a NUL somewhere; path
 * then names that string (a member name's NUL names its object). */
static int walk_value(nul_walk *w, size_t plen, int depth) {
    skip_ws(w);
    if (w->p >= w->end || depth > 2000) return 0;
    char c = *w->p;
    if (c == '"') return walk_string(w, NULL, 0);
    if (c == '{' || c == '[') {
        w->p++;
        for (int i = 0;; i++) {
            skip_ws(w);
            if (w->p >= w->end) return 0;
            if (*w->p == (c == '{' ? '}' : ']')) {
                w->p++;
                return 0;
            }
            if (*w->p == ',') {
                w->p++;
                skip_ws(w);
            }
            w->path[plen] = 0;
            size_t n = plen;
            if (c == '{') {
                char key[64];
                if (walk_string(w, key, sizeof key)) return 1;
                n += (size_t)snprintf(w->path + plen, sizeof w->path - plen, "%s%s", plen ? "." : "", key);
                skip_ws(w);
                w->p++; /* ':' */
            } else {
                n += (size_t)snprintf(w->path + plen, sizeof w->path - plen, "[%d]", i);
            }
            if (n >= sizeof w->path) n = sizeof w->path - 1;
            if (walk_value(w, n, depth + 1)) return 1;
        }
    }
    while (w->p < w->end && !strchr(",]} \t\n\r", *w->p)) w->p++; /* a number or literal */
    return 0;
}

static int check_nul(const char *body, size_t len, nm_api_error *e) {
    if (!memmem(body, len, "\\u0000", 6)) return 0;
    nul_walk w = {.p = body, .end = body + len};
    if (!walk_value(&w, 0, 0)) return 0; /* "\\u0000": an escaped backslash, then text */
    return BAD(e, w.path, "'%s' contains a NUL character (\\u0000), which text sent to numoe may not hold",
               w.path[0] ? w.path : "(the body)");
}

/* cJSON wants the text to end right after the value to reject trailing
 * garbage; the body is length-delimited, so check the rest by hand. */
static cJSON *parse_body(const char *body, size_t len, nm_api_error *e) {
    const char *end = NULL;
    cJSON *root = body && len ? cJSON_ParseWithLengthOpts(body, len, &end, 0) : NULL;
    if (!root && !len) {
        BAD(e, "", "the request body is empty (expected a JSON object)");
        return NULL;
    }
    if (!root) {
        size_t at = end && end >= body && end <= body + len ? (size_t)(end - body) : 0;
        BAD(e, "", "malformed JSON in the request body (near byte %zu)", at);
        return NULL;
    }
    for (const char *p = end; p < body + len; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(root);
            BAD(e, "", "malformed JSON in the request body: extra text after the object at byte %zu", (size_t)(p - body));
            return NULL;
        }
    if (!cJSON_IsObject(root)) {
        BAD(e, "", "the request body must be a JSON object, got %s", type_name(root));
        cJSON_Delete(root);
        return NULL;
    }
    if (check_nul(body, len, e)) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

int nm_api_parse(nm_api_kind kind, const char *body, size_t len, const nm_sampler_params *defaults,
                 nm_api_request *out, nm_api_error *e) {
    memset(out, 0, sizeof *out);
    out->kind = kind;
    out->max_tokens = -1;
    out->sampling = defaults ? *defaults : nm_sampler_params_default();
    int ollama = kind == NM_API_OLLAMA_CHAT || kind == NM_API_OLLAMA_GENERATE;
    out->stream = ollama;
    cJSON *root = parse_body(body, len, e);
    if (!root) return -1;
    int rc = ollama ? parse_ollama(root, out, e) : parse_openai(root, out, e);
    cJSON_Delete(root);
    if (rc) {
        nm_api_request_free(out);
        out->kind = kind;
    }
    return rc;
}

void nm_api_request_free(nm_api_request *r) {
    if (!r) return;
    for (size_t i = 0; i < r->n_msgs; i++) free((void *)r->msgs[i].role), free((void *)r->msgs[i].content);
    for (int i = 0; i < r->n_stops; i++) free(r->stops[i]);
    free(r->msgs), free(r->model), free(r->prompt), free(r->system), free(r->stops);
    nm_api_kind kind = r->kind;
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->max_tokens = -1;
}

/* ---------------------------------------------------------------- rendering */

/* Length of the valid UTF-8 sequence at p (n bytes available), 0 if invalid
 * (overlongs, surrogates and code points above U+10FFFF included). */
static size_t utf8_len(const unsigned char *p, size_t n) {
    unsigned c = p[0];
    size_t len;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    else return 0;
    if (n < len || p[1] < lo || p[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if (p[i] < 0x80 || p[i] > 0xBF) return 0;
    return len;
}

/* s[0..n) as a JSON string literal (quotes included), valid UTF-8 whatever
 * the input: invalid bytes become U+FFFD. malloc'd. */
static char *json_quote(const char *s, size_t n) {
    if (n > (SIZE_MAX - 3) / 6) return NULL;
    char *out = malloc(n * 6 + 3), *o = out; /* worst case: every byte "\u00XX" */
    if (!out) return NULL;
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    *o++ = '"';
    while (p < end) {
        unsigned c = *p;
        size_t l = utf8_len(p, (size_t)(end - p));
        if (l > 1) {
            memcpy(o, p, l), o += l, p += l;
            continue;
        }
        p++;
        if (l == 0) o += sprintf(o, "\\ufffd");
        else if (c == '"' || c == '\\') *o++ = '\\', *o++ = (char)c;
        else if (c == '\n') *o++ = '\\', *o++ = 'n';
        else if (c == '\r') *o++ = '\\', *o++ = 'r';
        else if (c == '\t') *o++ = '\\', *o++ = 't';
        else if (c == '\b') *o++ = '\\', *o++ = 'b';
        else if (c == '\f') *o++ = '\\', *o++ = 'f';
        else if (c < 0x20) o += sprintf(o, "\\u%04x", c);
        else *o++ = (char)c;
    }
    *o++ = '"';
    *o = 0;
    return out;
}

static int add_text(cJSON *obj, const char *name, const char *s, size_t n) {
    char *q = json_quote(s ? s : "", s ? n : 0);
    int ok = q && cJSON_AddRawToObject(obj, name, q);
    free(q);
    return ok;
}

static int add_i64(cJSON *obj, const char *name, int64_t v) {
    char buf[32];
    snprintf(buf, sizeof buf, "%" PRId64, v);
    return cJSON_AddRawToObject(obj, name, buf) != NULL;
}

static int add_str(cJSON *obj, const char *name, const char *s) {
    return cJSON_AddStringToObject(obj, name, s ? s : "") != NULL;
}

/* nullable string: a value, or JSON null */
static int add_opt_str(cJSON *obj, const char *name, const char *s) {
    return s ? add_str(obj, name, s) : cJSON_AddNullToObject(obj, name) != NULL;
}

static int add_usage(cJSON *obj, const nm_api_out *o) {
    cJSON *u = cJSON_AddObjectToObject(obj, "usage");
    return u && add_i64(u, "prompt_tokens", o->prompt_tokens) && add_i64(u, "completion_tokens", o->completion_tokens) &&
           add_i64(u, "total_tokens", o->prompt_tokens + o->completion_tokens);
}

/* id, object, created, model: the head of every OpenAI body */
static int add_openai_head(cJSON *root, const char *object, const nm_api_out *o) {
    return add_str(root, "id", o->id) && add_str(root, "object", object) && add_i64(root, "created", o->created) &&
           add_str(root, "model", o->model);
}

static int render_openai_chat(cJSON *root, int stream, const nm_api_out *o) {
    if (!add_openai_head(root, stream ? "chat.completion.chunk" : "chat.completion", o)) return 0;
    cJSON *choices = cJSON_AddArrayToObject(root, "choices");
    if (!choices) return 0;
    int usage_only = stream && o->with_usage && !o->first && !o->finish && !o->content_len && !o->reasoning_len;
    if (usage_only) return add_usage(root, o);
    cJSON *ch = cJSON_CreateObject();
    if (!ch || !cJSON_AddItemToArray(choices, ch)) return cJSON_Delete(ch), 0;
    cJSON *msg = cJSON_AddObjectToObject(ch, stream ? "delta" : "message");
    if (!add_i64(ch, "index", 0) || !msg) return 0;
    /* the role opens the stream (OpenAI's first delta is role + empty content) */
    if ((!stream || o->first) && !add_str(msg, "role", "assistant")) return 0;
    if ((!stream || o->first || o->content_len) && !add_text(msg, "content", o->content, o->content_len)) return 0;
    if (o->reasoning_len && !add_text(msg, "reasoning_content", o->reasoning, o->reasoning_len)) return 0;
    if (!cJSON_AddNullToObject(ch, "logprobs")) return 0;
    if (!add_opt_str(ch, "finish_reason", stream ? o->finish : o->finish ? o->finish : "stop")) return 0;
    return (stream && !o->with_usage) || add_usage(root, o);
}

static int render_openai_completion(cJSON *root, int stream, const nm_api_out *o) {
    if (!add_openai_head(root, "text_completion", o)) return 0;
    cJSON *choices = cJSON_AddArrayToObject(root, "choices");
    if (!choices) return 0;
    if (stream && o->with_usage && !o->first && !o->finish && !o->content_len) return add_usage(root, o);
    cJSON *ch = cJSON_CreateObject();
    if (!ch || !cJSON_AddItemToArray(choices, ch)) return cJSON_Delete(ch), 0;
    if (!add_text(ch, "text", o->content, o->content_len) || !add_i64(ch, "index", 0) ||
        !cJSON_AddNullToObject(ch, "logprobs") ||
        !add_opt_str(ch, "finish_reason", stream ? o->finish : o->finish ? o->finish : "stop"))
        return 0;
    return (stream && !o->with_usage) || add_usage(root, o);
}

/* Ollama: every line has model, created_at, the text and done; the last one
 * (or the whole non-streamed body) adds the reason and the counters. */
static int render_ollama(cJSON *root, nm_api_kind kind, int stream, const nm_api_out *o) {
    char when[48];
    nm_api_time_rfc3339(o->created, o->created_nsec, when, sizeof when);
    if (!add_str(root, "model", o->model) || !add_str(root, "created_at", when)) return 0;
    if (kind == NM_API_OLLAMA_CHAT) {
        cJSON *msg = cJSON_AddObjectToObject(root, "message");
        if (!msg || !add_str(msg, "role", "assistant") || !add_text(msg, "content", o->content, o->content_len)) return 0;
        if (o->reasoning_len && !add_text(msg, "thinking", o->reasoning, o->reasoning_len)) return 0;
    } else {
        if (!add_text(root, "response", o->content, o->content_len)) return 0;
        if (o->reasoning_len && !add_text(root, "thinking", o->reasoning, o->reasoning_len)) return 0;
    }
    int done = !stream || o->finish;
    if (!cJSON_AddBoolToObject(root, "done", done)) return 0;
    if (!done) return 1;
    return add_str(root, "done_reason", o->finish ? o->finish : "stop") && add_i64(root, "total_duration", o->total_ns) &&
           add_i64(root, "load_duration", 0) && add_i64(root, "prompt_eval_count", o->prompt_tokens) &&
           add_i64(root, "prompt_eval_duration", o->prompt_ns) && add_i64(root, "eval_count", o->completion_tokens) &&
           add_i64(root, "eval_duration", o->eval_ns);
}

char *nm_api_render(nm_api_kind kind, int stream, const nm_api_out *o) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return NULL;
    int ok;
    switch (kind) {
    case NM_API_OPENAI_CHAT: ok = render_openai_chat(root, stream, o); break;
    case NM_API_OPENAI_COMPLETION: ok = render_openai_completion(root, stream, o); break;
    default: ok = render_ollama(root, kind, stream, o); break;
    }
    char *s = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return s;
}

char *nm_api_time_rfc3339(int64_t sec, int32_t nsec, char *buf, size_t size) {
    struct tm tm;
    time_t t = (time_t)sec;
    if (nsec < 0 || nsec > 999999999) nsec = 0;
    if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 < 0 || tm.tm_year + 1900 > 9999) {
        memset(&tm, 0, sizeof tm); /* out of RFC 3339's range: the epoch */
        tm.tm_year = 70, tm.tm_mday = 1, nsec = 0;
    }
    snprintf(buf, size, "%04d-%02d-%02dT%02d:%02d:%02d.%09dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
             tm.tm_hour, tm.tm_min, tm.tm_sec, (int)nsec);
    return buf;
}

char *nm_api_health_json(const char *status, const char *reason) {
    cJSON *root = cJSON_CreateObject();
    int ok = root && add_str(root, "status", status) && (!reason || add_str(root, "reason", reason));
    char *s = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return s;
}

char *nm_api_models_json(const char *name, int64_t created) {
    cJSON *root = cJSON_CreateObject(), *m = cJSON_CreateObject();
    cJSON *data = root ? cJSON_AddArrayToObject(root, "data") : NULL;
    int ok = root && m && data && cJSON_AddItemToArray(data, m);
    if (!ok) cJSON_Delete(m); /* not yet owned by root */
    ok = ok && add_str(root, "object", "list") && add_str(m, "id", name) && add_str(m, "object", "model") &&
         add_i64(m, "created", created) && add_str(m, "owned_by", "numoe");
    char *s = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return s;
}

/* The digest is left empty: Ollama's is the sha256 of its manifest, which a
 * GGUF served in place does not have, and hashing hundreds of GB to make one
 * up would stall startup. */
char *nm_api_tags_json(const char *name, int64_t size_bytes, const char *family, const char *quant,
                       const char *params, const char *modified_iso8601) {
    cJSON *root = cJSON_CreateObject(), *m = cJSON_CreateObject();
    cJSON *models = root ? cJSON_AddArrayToObject(root, "models") : NULL;
    int ok = root && m && models && cJSON_AddItemToArray(models, m);
    if (!ok) cJSON_Delete(m);
    /* Go clients decode modified_at into a time.Time: never send "" */
    const char *mod = modified_iso8601 && modified_iso8601[0] ? modified_iso8601 : "1970-01-01T00:00:00Z";
    cJSON *d = ok ? cJSON_AddObjectToObject(m, "details") : NULL;
    cJSON *fams = d ? cJSON_CreateArray() : NULL;
    cJSON *fam = fams ? cJSON_CreateString(family ? family : "") : NULL;
    if (fams && (!fam || !cJSON_AddItemToArray(fams, fam))) cJSON_Delete(fam), fam = NULL;
    if (d && fams && !cJSON_AddItemToObject(d, "families", fams)) cJSON_Delete(fams), fams = NULL;
    ok = ok && d && fam && fams && add_str(m, "name", name) && add_str(m, "model", name) &&
         add_str(m, "modified_at", mod) && add_i64(m, "size", size_bytes) && add_str(m, "digest", "") &&
         add_str(d, "parent_model", "") && add_str(d, "format", "gguf") && add_str(d, "family", family) &&
         add_str(d, "parameter_size", params) && add_str(d, "quantization_level", quant);
    char *s = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return s;
}

/* -------------------------------------------------------- reasoning stream */

static const char OPEN_TAG[] = "<think>", CLOSE_TAG[] = "</think>";
#define OPEN_LEN (sizeof OPEN_TAG - 1)
#define CLOSE_LEN (sizeof CLOSE_TAG - 1)

/* the whitespace nm_chat_split_reasoning trims */
static int is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

static size_t skip_space(const char *t, size_t i, size_t end) {
    while (i < end && is_space(t[i])) i++;
    return i;
}

/* The longest k < CLOSE_LEN with t[len-k..len) == "</think>"[0..k), looking
 * no further back than from: the bytes that may still become the tag. */
static size_t partial_close(const char *t, size_t from, size_t len) {
    for (size_t k = CLOSE_LEN - 1; k > 0; k--)
        if (len - from >= k && !memcmp(t + len - k, CLOSE_TAG, k)) return k;
    return 0;
}

/* What of the text so far is settled: reasoning [r0, r1) and answer [a0, a1)
 * are prefixes of what the final split will give, whatever text follows.
 * Their starts do not move once they are non-empty, and their ends only grow,
 * so "shown" byte counts stay valid from call to call. Not final, that holds
 * back (a) a text that may still open with "<think>" (leading whitespace
 * included: without a block it belongs to the answer, with one it does not),
 * (b) a tail that may still become "</think>", and (c) whitespace at the end
 * of the reasoning or at the start of the answer, which the split trims. */
typedef struct {
    size_t r0, r1, a0, a1;
} settled;

static settled settle(const char *t, size_t len, int started_in_think, int final) {
    settled s = {0, 0, len, len};
    size_t p = 0; /* where the reasoning starts */
    if (!started_in_think) {
        size_t i = skip_space(t, 0, len), rest = len - i;
        if (rest >= OPEN_LEN && !memcmp(t + i, OPEN_TAG, OPEN_LEN)) {
            p = i + OPEN_LEN;
        } else if (rest < OPEN_LEN && !memcmp(t + i, OPEN_TAG, rest) && !final) {
            return s; /* (a): undecided */
        } else {
            s.a0 = 0; /* no reasoning block: the whole text is the answer, untrimmed */
            return s;
        }
    }
    const char *c = memmem(t + p, len - p, CLOSE_TAG, CLOSE_LEN);
    size_t rend = c ? (size_t)(c - t) : final ? len : len - partial_close(t, p, len); /* (b) */
    s.r0 = skip_space(t, p, rend), s.r1 = rend;
    while (s.r1 > s.r0 && is_space(t[s.r1 - 1])) s.r1--; /* (c) */
    if (s.r1 == s.r0) s.r0 = s.r1 = 0;
    if (c) s.a0 = skip_space(t, rend + CLOSE_LEN, len); /* (c); a0 == len while only whitespace came */
    return s;
}

/* The part of [start, end) beyond the *shown bytes already given out. */
static void take(const char *t, size_t start, size_t end, size_t *shown, const char **out, size_t *out_len) {
    size_t n = end > start ? end - start : 0;
    *out = t, *out_len = 0;
    if (n <= *shown) return;
    *out = t + start + *shown, *out_len = n - *shown;
    *shown = n;
}

void nm_reasoning_stream_feed(nm_reasoning_stream *s, const char *text, size_t len, int final,
                              const char **reasoning, size_t *reasoning_len, const char **answer,
                              size_t *answer_len) {
    settled st = settle(text, len, s->started_in_think, final);
    take(text, st.r0, st.r1, &s->shown_reasoning, reasoning, reasoning_len);
    take(text, st.a0, st.a1, &s->shown_answer, answer, answer_len);
}
