/* chat_template.c - the DeepSeek chat formats of chat_template.h. */
#include "coordinator/text/chat_template.h"

#include <stdlib.h>
#include <string.h>

#define U_BOS "<｜begin▁of▁sentence｜>"
#define U_EOS "<｜end▁of▁sentence｜>"
#define U_USER "<｜User｜>"
#define U_ASSISTANT "<｜Assistant｜>"
#define U_TOOL_OUTPUTS_BEGIN "<｜tool▁outputs▁begin｜>"
#define U_TOOL_OUTPUTS_END "<｜tool▁outputs▁end｜>"
#define U_TOOL_OUTPUT_BEGIN "<｜tool▁output▁begin｜>"
#define U_TOOL_OUTPUT_END "<｜tool▁output▁end｜>"

const char nm_chat_template_names[] = "deepseek3, deepseek2";

static const struct {
    const char *name;
    nm_chat_tmpl id;
} names[] = {
    {"deepseek3", NM_CHAT_TMPL_DEEPSEEK3},
    {"deepseek2", NM_CHAT_TMPL_DEEPSEEK2},
};

static int contains(const char *s, size_t len, const char *needle) {
    return memmem(s, len, needle, strlen(needle)) != NULL;
}

nm_chat_tmpl nm_chat_template_detect(const char *t, size_t len) {
    if (!t) return NM_CHAT_TMPL_NONE;
    /* the same tests, in the same order, as llama.cpp's llm_chat_detect_template */
    if (contains(t, len, "'Assistant: ' + message['content'] + eos_token")) return NM_CHAT_TMPL_DEEPSEEK2;
    if (contains(t, len, U_ASSISTANT) && contains(t, len, U_USER) && contains(t, len, U_EOS))
        return NM_CHAT_TMPL_DEEPSEEK3;
    return NM_CHAT_TMPL_NONE;
}

int nm_chat_template_from_name(const char *name, nm_chat_tmpl *out, nm_err *e) {
    for (size_t i = 0; name && i < sizeof names / sizeof *names; i++)
        if (!strcmp(name, names[i].name)) {
            *out = names[i].id;
            return 0;
        }
    return nm_errf(e, "unknown chat template '%s' (known: %s)", name ? name : "", nm_chat_template_names);
}

const char *nm_chat_template_name(nm_chat_tmpl t) {
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (names[i].id == t) return names[i].name;
    return "none";
}

int nm_chat_template_resolve(const char *name, const char *tmpl_text, size_t len, nm_chat_tmpl *out, nm_err *e) {
    if (name) return nm_chat_template_from_name(name, out, e);
    if ((*out = nm_chat_template_detect(tmpl_text, len)) != NM_CHAT_TMPL_NONE) return 0;
    return nm_errf(e, "%s; choose one with --chat-template NAME (known: %s)",
                   tmpl_text ? "the model's chat template (tokenizer.chat_template) is not one numoe knows"
                             : "the model has no chat template (tokenizer.chat_template)",
                   nm_chat_template_names);
}

/* ---- output buffer ---- */

typedef struct {
    char *p;
    size_t n, cap;
    int oom;
} buf;

static void put_n(buf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) {
            b->oom = 1;
            return;
        }
        b->p = q, b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void put(buf *b, const char *s) {
    if (s) put_n(b, s, strlen(s));
}

/* ---- the formats ---- */

enum { R_SYSTEM, R_USER, R_ASSISTANT, R_TOOL };

static int role_of(const nm_chat_msg *m, size_t i, nm_err *e) {
    static const char *const r[] = {"system", "user", "assistant", "tool"};
    for (int k = 0; m->role && k < 4; k++)
        if (!strcmp(m->role, r[k])) return k;
    return nm_errf(e, "chat message %zu: unknown role '%s' (system, user, assistant or tool)", i,
                   m->role ? m->role : "(null)");
}

/* DeepSeek-V3 tokenizer_config.json template, statement by statement. */
static void render_v3(buf *b, const nm_chat_msg *m, const int *role, size_t n, int add_gen, const char *bos) {
    put(b, bos);
    int first_sp = 1;
    for (size_t i = 0; i < n; i++)
        if (role[i] == R_SYSTEM) {
            if (!first_sp) put(b, "\n\n");
            put(b, m[i].content);
            first_sp = 0;
        }
    int is_tool = 0, is_output_first = 1, is_last_user = 0;
    for (size_t i = 0; i < n; i++) {
        switch (role[i]) {
        case R_USER:
            is_tool = 0, is_last_user = 1;
            put(b, U_USER), put(b, m[i].content), put(b, U_ASSISTANT);
            break;
        case R_ASSISTANT:
            is_last_user = 0;
            if (is_tool) put(b, U_TOOL_OUTPUTS_END);
            is_tool = 0;
            put(b, m[i].content), put(b, U_EOS);
            break;
        case R_TOOL:
            is_last_user = 0, is_tool = 1;
            put(b, is_output_first ? U_TOOL_OUTPUTS_BEGIN U_TOOL_OUTPUT_BEGIN : "\n" U_TOOL_OUTPUT_BEGIN);
            put(b, m[i].content), put(b, U_TOOL_OUTPUT_END);
            is_output_first = 0;
            break;
        default:
            break;
        }
    }
    if (is_tool) put(b, U_TOOL_OUTPUTS_END);
    if (add_gen && !is_last_user && !is_tool) put(b, U_ASSISTANT);
}

/* DeepSeek-V2 / DeepSeek-LLM chat template. */
static void render_v2(buf *b, const nm_chat_msg *m, const int *role, size_t n, int add_gen, const char *bos,
                      const char *eos) {
    put(b, bos);
    for (size_t i = 0; i < n; i++) {
        switch (role[i]) {
        case R_USER: put(b, "User: "), put(b, m[i].content), put(b, "\n\n"); break;
        case R_ASSISTANT: put(b, "Assistant: "), put(b, m[i].content), put(b, eos); break;
        case R_SYSTEM: put(b, m[i].content), put(b, "\n\n"); break;
        default: break; /* the template has no branch for tool messages */
        }
    }
    if (add_gen) put(b, "Assistant:");
}

int nm_chat_render(nm_chat_tmpl t, const nm_chat_msg *msgs, size_t n, int add_generation_prompt, int force_think,
                   const char *bos_text, const char *eos_text, char **out, nm_err *e) {
    *out = NULL;
    if (t != NM_CHAT_TMPL_DEEPSEEK3 && t != NM_CHAT_TMPL_DEEPSEEK2)
        return nm_errf(e, "no chat template to render with (known: %s)", nm_chat_template_names);
    int *role = malloc((n ? n : 1) * sizeof *role);
    if (!role) return nm_errf(e, "out of memory");
    for (size_t i = 0; i < n; i++)
        if ((role[i] = role_of(&msgs[i], i, e)) < 0) {
            free(role);
            return -1;
        }
    const char *bos = bos_text ? bos_text : U_BOS, *eos = eos_text ? eos_text : U_EOS;
    buf b = {0};
    put_n(&b, "", 0); /* an empty conversation still gives a string */
    if (t == NM_CHAT_TMPL_DEEPSEEK3) render_v3(&b, msgs, role, n, add_generation_prompt, bos);
    else render_v2(&b, msgs, role, n, add_generation_prompt, bos, eos);
    if (add_generation_prompt && force_think) put(&b, "<think>\n");
    free(role);
    if (b.oom) {
        free(b.p);
        return nm_errf(e, "out of memory rendering a chat of %zu messages", n);
    }
    *out = b.p;
    return 0;
}

/* ---- reasoning / answer ---- */

static int is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

void nm_chat_split_reasoning(const char *text, size_t len, int started_in_think, nm_chat_reasoning *out) {
    static const char open[] = "<think>", close[] = "</think>";
    memset(out, 0, sizeof *out);
    out->answer = text, out->answer_len = len;
    out->reasoning = text;
    size_t i = 0;
    if (!started_in_think) {
        while (i < len && is_space(text[i])) i++;
        if (len - i < sizeof open - 1 || memcmp(text + i, open, sizeof open - 1)) {
            /* a partial "<think" at the very end of a stream: wait for more */
            if (len - i < sizeof open - 1 && len > i && !memcmp(text + i, open, len - i)) {
                out->answer_len = 0;
                out->answer = text + len;
            }
            return;
        }
        i += sizeof open - 1;
    }
    out->has_reasoning = 1;
    const char *r = text + i, *end = memmem(r, len - i, close, sizeof close - 1);
    size_t rlen = end ? (size_t)(end - r) : len - i;
    const char *a = end ? end + sizeof close - 1 : text + len;
    out->thinking = end == NULL;
    if (!end) /* streaming: a "</think>" still arriving is not reasoning */
        for (size_t k = sizeof close - 2; k > 0; k--)
            if (rlen >= k && !memcmp(r + rlen - k, close, k)) {
                rlen -= k;
                break;
            }
    while (rlen && is_space(*r)) r++, rlen--;
    while (rlen && is_space(r[rlen - 1])) rlen--;
    out->reasoning = r, out->reasoning_len = rlen;
    size_t alen = (size_t)(text + len - a);
    while (alen && is_space(*a)) a++, alen--;
    out->answer = a, out->answer_len = alen;
}
