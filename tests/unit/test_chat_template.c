/* test_chat_template.c - the C chat formats against transformers.
 *
 * tests/fixtures/chat/deepseek_chat.json (tests/make_chat_fixtures.py) holds
 * conversations and what transformers' apply_chat_template renders for them
 * with the real DeepSeek-V3 / V2 Jinja templates; every case is rendered here
 * and compared byte for byte. Also: detection from the fixture GGUFs'
 * tokenizer.chat_template, names, errors, and the reasoning splitter. */
#include <stdint.h>
#include <stdlib.h>

#include "common/gguf.h"
#include "coordinator/text/chat_template.h"
#include "kernels/quant.h"
#include "tests/unit/check.h"

/* ---- a small JSON reader (enough for the fixture) ---- */

enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };

typedef struct jv {
    int type;
    int b;
    double num;
    char *s; /* J_STR: NUL-terminated UTF-8 */
    size_t n; /* J_ARR / J_OBJ: children */
    struct jv *kid;
    char **key; /* J_OBJ */
} jv;

typedef struct {
    const char *p, *end;
    int err;
} jparse;

static void jws(jparse *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\n' || *j->p == '\r' || *j->p == '\t')) j->p++;
}

static void put_utf8(char **o, uint32_t c) {
    char *q = *o;
    if (c < 0x80) *q++ = (char)c;
    else if (c < 0x800) *q++ = (char)(0xC0 | c >> 6), *q++ = (char)(0x80 | (c & 63));
    else if (c < 0x10000)
        *q++ = (char)(0xE0 | c >> 12), *q++ = (char)(0x80 | ((c >> 6) & 63)), *q++ = (char)(0x80 | (c & 63));
    else
        *q++ = (char)(0xF0 | c >> 18), *q++ = (char)(0x80 | ((c >> 12) & 63)), *q++ = (char)(0x80 | ((c >> 6) & 63)),
        *q++ = (char)(0x80 | (c & 63));
    *o = q;
}

static int hex4(const char *p, uint32_t *v) {
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        *v = *v << 4 | (uint32_t)d;
    }
    return 0;
}

static char *jstring(jparse *j) {
    if (j->p >= j->end || *j->p != '"') return j->err = 1, NULL;
    const char *p = ++j->p;
    char *out = malloc((size_t)(j->end - p) + 1), *o = out;
    while (p < j->end && *p != '"') {
        if (*p != '\\') {
            *o++ = *p++;
            continue;
        }
        if (++p >= j->end) break;
        char c = *p++;
        uint32_t u, lo;
        switch (c) {
        case 'n': *o++ = '\n'; break;
        case 't': *o++ = '\t'; break;
        case 'r': *o++ = '\r'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'u':
            if (j->end - p < 4 || hex4(p, &u)) goto bad;
            p += 4;
            if (u >= 0xD800 && u < 0xDC00) {
                if (j->end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &lo)) goto bad;
                p += 6;
                u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
            }
            put_utf8(&o, u);
            break;
        default: *o++ = c; break; /* \" \\ \/ */
        }
    }
    if (p >= j->end) goto bad;
    j->p = p + 1;
    *o = 0;
    return out;
bad:
    free(out);
    j->err = 1;
    return NULL;
}

static void jparse_value(jparse *j, jv *v);

static void jparse_seq(jparse *j, jv *v, char close, int obj) {
    size_t cap = 8;
    v->kid = calloc(cap, sizeof *v->kid);
    if (obj) v->key = calloc(cap, sizeof *v->key);
    j->p++;
    jws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        return;
    }
    while (!j->err) {
        if (v->n == cap) {
            cap *= 2;
            v->kid = realloc(v->kid, cap * sizeof *v->kid);
            if (obj) v->key = realloc(v->key, cap * sizeof *v->key);
        }
        memset(&v->kid[v->n], 0, sizeof *v->kid);
        if (obj) {
            jws(j);
            v->key[v->n] = jstring(j);
            jws(j);
            if (j->err || j->p >= j->end || *j->p != ':') {
                j->err = 1;
                v->n++;
                return;
            }
            j->p++;
        }
        jparse_value(j, &v->kid[v->n++]);
        jws(j);
        if (j->p < j->end && *j->p == ',') {
            j->p++;
            continue;
        }
        if (j->p < j->end && *j->p == close) {
            j->p++;
            return;
        }
        j->err = 1;
    }
}

static void jparse_value(jparse *j, jv *v) {
    memset(v, 0, sizeof *v);
    jws(j);
    if (j->p >= j->end) {
        j->err = 1;
        return;
    }
    char c = *j->p;
    if (c == '{') v->type = J_OBJ, jparse_seq(j, v, '}', 1);
    else if (c == '[') v->type = J_ARR, jparse_seq(j, v, ']', 0);
    else if (c == '"') v->type = J_STR, v->s = jstring(j);
    else if (j->end - j->p >= 4 && !memcmp(j->p, "true", 4)) v->type = J_BOOL, v->b = 1, j->p += 4;
    else if (j->end - j->p >= 5 && !memcmp(j->p, "false", 5)) v->type = J_BOOL, j->p += 5;
    else if (j->end - j->p >= 4 && !memcmp(j->p, "null", 4)) v->type = J_NULL, j->p += 4;
    else {
        char *e;
        v->type = J_NUM, v->num = strtod(j->p, &e);
        if (e == j->p) j->err = 1;
        j->p = e;
    }
}

static void jfree(jv *v) {
    free(v->s);
    for (size_t i = 0; i < v->n; i++) {
        jfree(&v->kid[i]);
        if (v->key) free(v->key[i]);
    }
    free(v->kid);
    free(v->key);
}

static const jv *jget(const jv *o, const char *k) {
    if (!o || o->type != J_OBJ) return NULL;
    for (size_t i = 0; i < o->n; i++)
        if (o->key[i] && !strcmp(o->key[i], k)) return &o->kid[i];
    return NULL;
}

static const char *jstr(const jv *o, const char *k) {
    const jv *v = jget(o, k);
    return v && v->type == J_STR ? v->s : NULL;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) free(b), b = NULL;
    fclose(f);
    if (b) b[n] = 0, *len = (size_t)n;
    return b;
}

/* the tests run from the repository root; fall back to the binary's ../../ */
static char root_[4096] = ".";
static void find_root(const char *argv0) {
    FILE *f = fopen("tests/fixtures/chat/deepseek_chat.json", "rb");
    if (f) {
        fclose(f);
        return;
    }
    const char *s = strrchr(argv0, '/');
    if (s) snprintf(root_, sizeof root_, "%.*s/../..", (int)(s - argv0), argv0);
}

static char *fixture(const char *rel, size_t *len) {
    char path[8192];
    snprintf(path, sizeof path, "%s/%s", root_, rel);
    return read_file(path, len);
}

/* ---- tests ---- */

static void show_diff(const char *name, const char *got, const char *want) {
    size_t i = 0;
    while (got[i] && got[i] == want[i]) i++;
    fprintf(stderr, "  %s: first difference at byte %zu\n    got:  \"%.60s\"\n    want: \"%.60s\"\n", name, i, got + i,
            want + i);
}

static void test_fixture_cases(void) {
    size_t len;
    char *txt = fixture("tests/fixtures/chat/deepseek_chat.json", &len);
    CHECK(txt != NULL, "cannot read tests/fixtures/chat/deepseek_chat.json (run from the repository root)");
    if (!txt) return;
    jparse j = {txt, txt + len, 0};
    jv root;
    jparse_value(&j, &root);
    CHECK(!j.err, "fixture JSON does not parse");
    const jv *cases = jget(&root, "cases");
    CHECK(cases && cases->type == J_ARR && cases->n >= 40, "fixture has cases");
    size_t n_ok = 0, n_v3 = 0, n_v2 = 0;
    for (size_t i = 0; !j.err && cases && i < cases->n; i++) {
        const jv *c = &cases->kid[i], *msgs = jget(c, "messages");
        const char *name = jstr(c, "name"), *want = jstr(c, "expected"), *tname = jstr(c, "template");
        const jv *agp = jget(c, "add_generation_prompt"), *ft = jget(c, "force_think");
        if (!name || !want || !tname || !msgs || !agp || !ft) {
            CHECK(0, "case %zu is malformed", i);
            continue;
        }
        nm_chat_tmpl t;
        nm_err e;
        if (nm_chat_template_from_name(tname, &t, &e)) {
            CHECK(0, "%s: %s", name, e.msg);
            continue;
        }
        n_v3 += t == NM_CHAT_TMPL_DEEPSEEK3, n_v2 += t == NM_CHAT_TMPL_DEEPSEEK2;
        nm_chat_msg m[32];
        size_t nm = msgs->n < 32 ? msgs->n : 32;
        for (size_t k = 0; k < nm; k++) m[k].role = jstr(&msgs->kid[k], "role"), m[k].content = jstr(&msgs->kid[k], "content");
        char *out = NULL;
        if (nm_chat_render(t, m, nm, agp->b, ft->b, jstr(c, "bos"), jstr(c, "eos"), &out, &e)) {
            CHECK(0, "%s: %s", name, e.msg);
            continue;
        }
        int same = !strcmp(out, want);
        CHECK(same, "%s (add_generation_prompt=%d): rendering differs from transformers", name, agp->b);
        if (!same) show_diff(name, out, want);
        n_ok += same;
        free(out);
    }
    CHECK(n_v3 > 10 && n_v2 > 10, "both formats covered (%zu v3, %zu v2)", n_v3, n_v2);
    fprintf(stderr, "     %zu fixture renderings identical to transformers'\n", n_ok);
    jfree(&root);
    free(txt);
}

static void test_detect_gguf(void) {
    /* The test links libnumoe_{coordinator,kernels,common}.a in that order and
     * common's GGUF reader needs the type table from kernels: referring to it
     * here pulls it in (nothing else in this test uses kernels/). */
    CHECK(nm_type_traits_of(0) != NULL, "F32 type traits");
    static const struct { const char *file; nm_chat_tmpl want; } files[] = {
        {"tests/fixtures/models/deepseek-v3-tiny-F32-mla.gguf", NM_CHAT_TMPL_DEEPSEEK3},
        {"tests/fixtures/models/deepseek-v3-tiny-Q8_0-mla.gguf", NM_CHAT_TMPL_DEEPSEEK3},
        {"tests/fixtures/models/deepseek-v2-tiny-F32-legacy.gguf", NM_CHAT_TMPL_DEEPSEEK2},
    };
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", root_, files[i].file);
        nm_gguf *g;
        nm_err e;
        if (nm_gguf_open(path, &g, &e)) {
            CHECK(0, "%s", e.msg);
            continue;
        }
        nm_str s = {0};
        int r = nm_gguf_get_str(g, "tokenizer.chat_template", &s, &e);
        CHECK(r == 0, "%s: no tokenizer.chat_template", files[i].file);
        nm_chat_tmpl t = nm_chat_template_detect(s.ptr, (size_t)s.len);
        CHECK(t == files[i].want, "%s: detected %s", files[i].file, nm_chat_template_name(t));
        nm_chat_tmpl t2;
        CHECK(nm_chat_template_resolve(NULL, s.ptr, (size_t)s.len, &t2, &e) == 0 && t2 == t, "resolve by detection");
        CHECK(nm_chat_template_resolve("deepseek2", s.ptr, (size_t)s.len, &t2, &e) == 0 && t2 == NM_CHAT_TMPL_DEEPSEEK2,
              "the name overrides detection");
        nm_gguf_close(g);
    }
}

static void test_detect_rules(void) {
    const char *v3 = "{{'<｜User｜>' + x + '<｜Assistant｜>'}}{{'<｜end▁of▁sentence｜>'}}";
    const char *v3_partial = "{{'<｜User｜>' + x + '<｜Assistant｜>'}}"; /* no end-of-sentence text */
    const char *v2 = "{{ 'Assistant: ' + message['content'] + eos_token }}";
    const char *chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}{% endfor %}";
    CHECK(nm_chat_template_detect(v3, strlen(v3)) == NM_CHAT_TMPL_DEEPSEEK3, "v3 markers");
    CHECK(nm_chat_template_detect(v3_partial, strlen(v3_partial)) == NM_CHAT_TMPL_NONE, "v3 needs all three markers");
    CHECK(nm_chat_template_detect(v2, strlen(v2)) == NM_CHAT_TMPL_DEEPSEEK2, "v2 marker");
    CHECK(nm_chat_template_detect(chatml, strlen(chatml)) == NM_CHAT_TMPL_NONE, "chatml is not ours");
    CHECK(nm_chat_template_detect(NULL, 0) == NM_CHAT_TMPL_NONE, "NULL");
    /* the length bounds the search (GGUF strings are not NUL-terminated) */
    CHECK(nm_chat_template_detect(v3, strlen(v3) - 5) == NM_CHAT_TMPL_NONE, "length respected");
}

static void test_names_and_errors(void) {
    nm_chat_tmpl t;
    nm_err e;
    CHECK(nm_chat_template_from_name("deepseek3", &t, &e) == 0 && t == NM_CHAT_TMPL_DEEPSEEK3, "deepseek3");
    CHECK(nm_chat_template_from_name("deepseek2", &t, &e) == 0 && t == NM_CHAT_TMPL_DEEPSEEK2, "deepseek2");
    CHECK(!strcmp(nm_chat_template_name(NM_CHAT_TMPL_DEEPSEEK3), "deepseek3"), "name");
    CHECK(nm_chat_template_from_name("chatml", &t, &e) == -1 && strstr(e.msg, "chatml") &&
              strstr(e.msg, "deepseek3") && strstr(e.msg, "deepseek2"),
          "unknown name lists the known ones: %s", e.msg);
    const char *other = "<|im_start|>";
    CHECK(nm_chat_template_resolve(NULL, other, strlen(other), &t, &e) == -1 && strstr(e.msg, "--chat-template") &&
              strstr(e.msg, "deepseek3"),
          "unrecognised template: %s", e.msg);
    CHECK(nm_chat_template_resolve(NULL, NULL, 0, &t, &e) == -1 && strstr(e.msg, "no chat template"), "no template: %s",
          e.msg);

    nm_chat_msg bad[] = {{"user", "hi"}, {"narrator", "x"}};
    char *out = (char *)1;
    CHECK(nm_chat_render(NM_CHAT_TMPL_DEEPSEEK3, bad, 2, 1, 0, NULL, NULL, &out, &e) == -1 && out == NULL &&
              strstr(e.msg, "narrator") && strstr(e.msg, "message 1"),
          "unknown role: %s", e.msg);
    CHECK(nm_chat_render(NM_CHAT_TMPL_NONE, bad, 1, 1, 0, NULL, NULL, &out, &e) == -1, "no format");
}

static void test_render_defaults(void) {
    nm_err e;
    char *out;
    /* NULL bos/eos: the DeepSeek texts; "" none; NULL content renders empty */
    nm_chat_msg m[] = {{"user", "hi"}, {"assistant", NULL}, {"user", "again"}};
    CHECK(nm_chat_render(NM_CHAT_TMPL_DEEPSEEK2, m, 3, 1, 0, NULL, NULL, &out, &e) == 0, "%s", e.msg);
    CHECK(!strcmp(out, "<｜begin▁of▁sentence｜>User: hi\n\nAssistant: <｜end▁of▁sentence｜>User: again\n\nAssistant:"),
          "v2 defaults: %s", out);
    free(out);
    CHECK(nm_chat_render(NM_CHAT_TMPL_DEEPSEEK3, m, 1, 1, 1, "", "", &out, &e) == 0, "%s", e.msg);
    CHECK(!strcmp(out, "<｜User｜>hi<｜Assistant｜><think>\n"), "v3 no bos, force_think: %s", out);
    free(out);
    /* force_think needs the generation prompt */
    CHECK(nm_chat_render(NM_CHAT_TMPL_DEEPSEEK3, m, 1, 0, 1, NULL, NULL, &out, &e) == 0, "%s", e.msg);
    CHECK(!strcmp(out, "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"), "force_think without generation prompt: %s", out);
    free(out);
    /* empty conversation (transformers refuses one; the templates give BOS + prompt) */
    CHECK(nm_chat_render(NM_CHAT_TMPL_DEEPSEEK3, NULL, 0, 1, 0, NULL, NULL, &out, &e) == 0 &&
              !strcmp(out, "<｜begin▁of▁sentence｜><｜Assistant｜>"),
          "empty v3");
    free(out);
    CHECK(nm_chat_render(NM_CHAT_TMPL_DEEPSEEK2, NULL, 0, 0, 0, "", NULL, &out, &e) == 0 && !strcmp(out, ""), "empty v2");
    free(out);
}

static int span_is(const char *p, size_t n, const char *want) { return n == strlen(want) && !memcmp(p, want, n); }

static void test_split_reasoning(void) {
    nm_chat_reasoning r;
    const char *t1 = "<think>\nLet me think.\nOK.\n</think>\n\nThe answer is 4.";
    nm_chat_split_reasoning(t1, strlen(t1), 0, &r);
    CHECK(r.has_reasoning && !r.thinking, "closed block");
    CHECK(span_is(r.reasoning, r.reasoning_len, "Let me think.\nOK."), "reasoning: '%.*s'", (int)r.reasoning_len, r.reasoning);
    CHECK(span_is(r.answer, r.answer_len, "The answer is 4."), "answer: '%.*s'", (int)r.answer_len, r.answer);

    /* force_think: the text starts inside the block */
    const char *t2 = "Hmm, 2+2.\n</think>\n\n4";
    nm_chat_split_reasoning(t2, strlen(t2), 1, &r);
    CHECK(r.has_reasoning && !r.thinking && span_is(r.reasoning, r.reasoning_len, "Hmm, 2+2.") &&
              span_is(r.answer, r.answer_len, "4"),
          "started in think");

    /* no reasoning at all */
    const char *t3 = "  Just an answer.";
    nm_chat_split_reasoning(t3, strlen(t3), 0, &r);
    CHECK(!r.has_reasoning && !r.thinking && r.reasoning_len == 0 && span_is(r.answer, r.answer_len, t3), "plain answer");

    /* still thinking (streaming / cut off), with a closing tag half arrived */
    const char *t4 = "<think>\nstep one\nstep two</th";
    nm_chat_split_reasoning(t4, strlen(t4), 0, &r);
    CHECK(r.has_reasoning && r.thinking && r.answer_len == 0, "open block");
    CHECK(span_is(r.reasoning, r.reasoning_len, "step one\nstep two"), "partial close tag held back: '%.*s'",
          (int)r.reasoning_len, r.reasoning);

    /* an opening tag half arrived: no answer yet */
    nm_chat_split_reasoning("<thi", 4, 0, &r);
    CHECK(!r.has_reasoning && r.answer_len == 0, "partial open tag");

    /* empty reasoning block (R1 sometimes answers directly) */
    const char *t5 = "<think>\n\n</think>\n\nDirect.";
    nm_chat_split_reasoning(t5, strlen(t5), 0, &r);
    CHECK(r.has_reasoning && r.reasoning_len == 0 && span_is(r.answer, r.answer_len, "Direct."), "empty block");

    /* <think> not at the start is just text */
    const char *t6 = "Answer <think>x</think> y";
    nm_chat_split_reasoning(t6, strlen(t6), 0, &r);
    CHECK(!r.has_reasoning && span_is(r.answer, r.answer_len, t6), "tag inside the answer");

    /* non-ASCII, only the first </think> closes */
    const char *t7 = "<think>思考中……</think>答案：</think>四";
    nm_chat_split_reasoning(t7, strlen(t7), 0, &r);
    CHECK(span_is(r.reasoning, r.reasoning_len, "思考中……") && span_is(r.answer, r.answer_len, "答案：</think>四"),
          "first close tag ends the block");

    nm_chat_split_reasoning("", 0, 1, &r);
    CHECK(r.has_reasoning && r.thinking && r.reasoning_len == 0 && r.answer_len == 0, "empty text, in think");
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    find_root(argv[0]);
    RUN(test_fixture_cases);
    RUN(test_detect_gguf);
    RUN(test_detect_rules);
    RUN(test_names_and_errors);
    RUN(test_render_defaults);
    RUN(test_split_reasoning);
    return check_summary();
}
