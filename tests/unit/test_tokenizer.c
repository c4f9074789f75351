/* test_tokenizer.c - the byte-level BPE tokenizer (coordinator/text/tokenizer.c):
 * merges and their order, byte fallback, special-token gating (CONTROL only
 * with parse_special, USER_DEFINED always), BOS/EOS, invalid UTF-8 input,
 * decoding, the streaming detokenizer (a character split over tokens comes
 * out whole, never half), lookups by text, and the load errors.
 *
 * Uses only repository files: the tiny DeepSeek-V3-style model
 * tests/fixtures/models/deepseek-v3-tiny-Q8_0-mla.gguf (256 byte tokens, 62
 * merges, CONTROL <｜User｜>...) and vocabularies written here into memory
 * with a small GGUF writer. Run from the repository root. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/gguf.h"
#include "coordinator/text/tokenizer.h"
#include "tests/unit/check.h"

#define TINY_MODEL "tests/fixtures/models/deepseek-v3-tiny-Q8_0-mla.gguf"
#define USER "<\xef\xbd\x9cUser\xef\xbd\x9c>"                                   /* <｜User｜> */
#define EOS_TEXT "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>" /* <｜end▁of▁sentence｜> */

/* ---------------------------------------------------------------- helpers */

static int ids_eq(const int32_t *a, size_t na, const int32_t *b, size_t nb) {
    return na == nb && (na == 0 || !memcmp(a, b, na * sizeof *a));
}

static void ids_str(char *buf, size_t cap, const int32_t *v, size_t n) {
    size_t k = 0;
    buf[0] = 0;
    for (size_t i = 0; i < n && k + 16 < cap; i++) k += (size_t)snprintf(buf + k, cap - k, i ? ",%d" : "%d", v[i]);
}

/* Tokenizes TEXT and checks the ids against WANT (n_want of them). */
static void expect_ids(const nm_tokenizer *tk, const char *text, size_t len, int add, int special,
                       const int32_t *want, size_t n_want, const char *what) {
    int32_t *ids = NULL;
    size_t n = 0;
    nm_err e;
    if (nm_tokenize(tk, text, len, add, special, &ids, &n, &e)) {
        CHECK(0, "%s: tokenize failed: %s", what, e.msg);
        return;
    }
    char got[512], exp[512];
    ids_str(got, sizeof got, ids, n);
    ids_str(exp, sizeof exp, want, n_want);
    CHECK(ids_eq(ids, n, want, n_want), "%s: got [%s] want [%s]", what, got, exp);
    free(ids);
}

/* encode then decode gives back TEXT */
static void expect_roundtrip(const nm_tokenizer *tk, const char *text, size_t len, int special) {
    int32_t *ids;
    size_t n, dl;
    char *d;
    nm_err e;
    if (nm_tokenize(tk, text, len, 0, special, &ids, &n, &e)) {
        CHECK(0, "tokenize: %s", e.msg);
        return;
    }
    if (nm_detokenize(tk, ids, n, 1, &d, &dl, &e)) {
        CHECK(0, "detokenize: %s", e.msg);
        free(ids);
        return;
    }
    CHECK(dl == len && !memcmp(d, text, len), "roundtrip of '%.*s' gave '%s'", (int)len, text, d);
    free(d);
    free(ids);
}

static nm_tokenizer *load_tiny(nm_gguf **g) {
    nm_err e;
    nm_tokenizer *tk = NULL;
    *g = NULL;
    if (nm_gguf_open(TINY_MODEL, g, &e)) {
        CHECK(0, "open %s: %s (run from the repository root)", TINY_MODEL, e.msg);
        return NULL;
    }
    if (nm_tokenizer_load(&tk, *g, &e)) CHECK(0, "load: %s", e.msg);
    return tk;
}

/* ------------------------------------------------ a small in-memory GGUF */

typedef struct {
    uint8_t *b;
    size_t n, cap;
    uint64_t n_kv;
} gw;

static void put(gw *w, const void *p, size_t n) {
    if (w->n + n > w->cap) {
        while (w->n + n > w->cap) w->cap = w->cap ? w->cap * 2 : 4096;
        w->b = realloc(w->b, w->cap);
    }
    memcpy(w->b + w->n, p, n);
    w->n += n;
}
static void put_u32(gw *w, uint32_t v) { put(w, &v, 4); }
static void put_u64(gw *w, uint64_t v) { put(w, &v, 8); }
static void put_str(gw *w, const char *s) {
    put_u64(w, strlen(s));
    put(w, s, strlen(s));
}
static void kv_key(gw *w, const char *k, uint32_t type) {
    put_str(w, k);
    put_u32(w, type);
    w->n_kv++;
}
static void kv_string(gw *w, const char *k, const char *v) {
    kv_key(w, k, NM_GGUF_STRING);
    put_str(w, v);
}
static void kv_u32(gw *w, const char *k, uint32_t v) {
    kv_key(w, k, NM_GGUF_U32);
    put_u32(w, v);
}
static void kv_bool(gw *w, const char *k, int v) {
    kv_key(w, k, NM_GGUF_BOOL);
    uint8_t b = (uint8_t)!!v;
    put(w, &b, 1);
}
static void kv_strings(gw *w, const char *k, const char *const *v, size_t n) {
    kv_key(w, k, NM_GGUF_ARRAY);
    put_u32(w, NM_GGUF_STRING);
    put_u64(w, n);
    for (size_t i = 0; i < n; i++) put_str(w, v[i]);
}
static void kv_i32s(gw *w, const char *k, const int32_t *v, size_t n) {
    kv_key(w, k, NM_GGUF_ARRAY);
    put_u32(w, NM_GGUF_I32);
    put_u64(w, n);
    put(w, v, n * 4);
}
/* header in front, padding behind: a complete tensor-less GGUF */
static uint8_t *gw_finish(gw *w, size_t *size) {
    gw out = {0};
    put(&out, "GGUF", 4);
    put_u32(&out, 3);
    put_u64(&out, 0);
    put_u64(&out, w->n_kv);
    put(&out, w->b, w->n);
    static const uint8_t zero[32] = {0};
    put(&out, zero, (32 - out.n % 32) % 32);
    free(w->b);
    *size = out.n;
    return out.b;
}

/* GPT-2 bytes_to_unicode, as UTF-8 */
static void byte_char(int b, char out[3]) {
    int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    unsigned cp = (unsigned)b;
    if (!printable) {
        unsigned k = 0;
        for (int x = 0; x < b; x++)
            if (!((x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE)) k++;
        cp = 256 + k;
    }
    if (cp < 0x80) out[0] = (char)cp, out[1] = 0;
    else out[0] = (char)(0xC0 | (cp >> 6)), out[1] = (char)(0x80 | (cp & 0x3F)), out[2] = 0;
}

typedef struct {
    const char *text;
    int32_t type;
} tok_def;

/* A vocabulary: the 256 byte characters (ids 0..255) except those in
 * SKIP_BYTES (their ids get "[SKIP<b>]" UNUSED tokens), then EXTRA tokens
 * (ids 256...), MERGES. Loaded into *tk; the GGUF buffer is freed. */
static int make_vocab(nm_tokenizer **tk, const char *model, const char *pre, const uint8_t *skip_bytes, size_t n_skip,
                      const tok_def *extra, size_t n_extra, const char *const *merges, size_t n_merges, int add_bos,
                      int bos, int eos, nm_err *err) {
    size_t nv = 256 + n_extra;
    char **texts = calloc(nv, sizeof *texts);
    int32_t *types = calloc(nv, sizeof *types);
    for (int b = 0; b < 256; b++) {
        texts[b] = malloc(16);
        byte_char(b, texts[b]);
        types[b] = NM_TOKEN_NORMAL;
        for (size_t k = 0; k < n_skip; k++)
            if (skip_bytes[k] == b) snprintf(texts[b], 16, "[SKIP%d]", b), types[b] = NM_TOKEN_UNUSED;
    }
    for (size_t i = 0; i < n_extra; i++) {
        texts[256 + i] = strdup(extra[i].text);
        types[256 + i] = extra[i].type;
    }
    gw w = {0};
    kv_string(&w, "general.architecture", "deepseek2");
    if (model) kv_string(&w, "tokenizer.ggml.model", model);
    if (pre) kv_string(&w, "tokenizer.ggml.pre", pre);
    kv_strings(&w, "tokenizer.ggml.tokens", (const char *const *)texts, nv);
    kv_i32s(&w, "tokenizer.ggml.token_type", types, nv);
    kv_strings(&w, "tokenizer.ggml.merges", merges, n_merges);
    if (bos >= 0) kv_u32(&w, "tokenizer.ggml.bos_token_id", (uint32_t)bos);
    if (eos >= 0) kv_u32(&w, "tokenizer.ggml.eos_token_id", (uint32_t)eos);
    kv_bool(&w, "tokenizer.ggml.add_bos_token", add_bos);
    size_t size;
    uint8_t *buf = gw_finish(&w, &size);
    for (size_t i = 0; i < nv; i++) free(texts[i]);
    free(texts);
    free(types);
    nm_gguf *g = NULL;
    int rc = nm_gguf_parse_buffer(buf, size, "mem.gguf", &g, err);
    if (!rc) rc = nm_tokenizer_load(tk, g, err);
    nm_gguf_close(g);
    free(buf); /* the tokenizer keeps its own copy */
    return rc;
}

/* ------------------------------------------------------------------ tests */

static void test_tiny_model_basics(void) {
    nm_gguf *g;
    nm_tokenizer *tk = load_tiny(&g);
    if (!tk) return nm_gguf_close(g);
    CHECK(nm_tokenizer_n_vocab(tk) == 324, "n_vocab %d", nm_tokenizer_n_vocab(tk));
    CHECK(nm_tokenizer_n_merges(tk) == 62, "n_merges %zu", nm_tokenizer_n_merges(tk));
    CHECK(!strcmp(nm_tokenizer_pre_used(tk), "deepseek-v3"), "pre %s", nm_tokenizer_pre_used(tk));
    CHECK(nm_tokenizer_bos(tk) == 0 && nm_tokenizer_eos(tk) == 1, "bos %d eos %d", nm_tokenizer_bos(tk),
          nm_tokenizer_eos(tk));
    CHECK(nm_tokenizer_add_bos(tk) == 1, "add_bos");
    CHECK(nm_tokenizer_n_missing_bytes(tk) == 0, "missing bytes");
    /* " the" -> Ġthe (merges Ġ t, h e, Ġt he), "and" has no merge of its own */
    int32_t w1[] = {260};
    expect_ids(tk, " the", 4, 0, 0, w1, 1, "' the'");
    int32_t w2[] = {0, 260};
    expect_ids(tk, " the", 4, 1, 0, w2, 2, "' the' with BOS");
    int32_t w3[] = {0};
    expect_ids(tk, "", 0, 1, 0, w3, 1, "empty with BOS");
    expect_ids(tk, "", 0, 0, 0, NULL, 0, "empty");
    /* lookups */
    CHECK(nm_token_id(tk, EOS_TEXT, strlen(EOS_TEXT)) == 1, "EOS by text");
    CHECK(nm_token_id(tk, USER, strlen(USER)) == 320, "<｜User｜> by text");
    CHECK(nm_token_id(tk, "\xc4\xa0the", 5) == 260, "Ġthe by text");
    CHECK(nm_token_id(tk, "nope-not-a-token", 16) == -1, "unknown text");
    CHECK(nm_tokenizer_eot(tk) == 1, "eot %d", nm_tokenizer_eot(tk));
    CHECK(nm_tokenizer_is_eog(tk, 1) && !nm_tokenizer_is_eog(tk, 0) && !nm_tokenizer_is_eog(tk, 260), "eog");
    size_t len;
    const char *t = nm_token_text(tk, 260, &len);
    CHECK(t && len == 5 && !memcmp(t, "\xc4\xa0the", 5), "token text of 260");
    t = nm_token_piece(tk, 260, 0, &len);
    CHECK(t && len == 4 && !memcmp(t, " the", 4), "piece of 260");
    CHECK(nm_token_type(tk, 320) == NM_TOKEN_CONTROL && nm_token_type(tk, 260) == NM_TOKEN_NORMAL, "types");
    CHECK(nm_token_text(tk, 324, &len) == NULL && nm_token_piece(tk, -1, 1, &len) == NULL, "out of range");
    /* roundtrips: English, Chinese, code, emoji, whitespace */
    const char *texts[] = {"The model and the experts.\n", "深度学习模型的推理速度。", "for (int i = 0; i < n; i++) {}",
                           "\xf0\x9f\xa6\x99 llama \xf0\x9f\x9a\x80", "  \t\n\n   x  ", "1234567 89"};
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) expect_roundtrip(tk, texts[i], strlen(texts[i]), 0);
    nm_tokenizer_free(tk);
    nm_gguf_close(g);
}

static void test_special_gating(void) {
    nm_gguf *g;
    nm_tokenizer *tk = load_tiny(&g);
    if (!tk) return nm_gguf_close(g);
    const char *s = "x" USER "y";
    int32_t *ids;
    size_t n;
    nm_err e;
    /* --special: <｜User｜> is one token */
    int32_t want[] = {nm_token_id(tk, "x", 1), 320, nm_token_id(tk, "y", 1)};
    expect_ids(tk, s, strlen(s), 0, 1, want, 3, "parse_special on");
    /* without: no 320, and the text comes back when decoded */
    if (!nm_tokenize(tk, s, strlen(s), 0, 0, &ids, &n, &e)) {
        int has = 0;
        for (size_t i = 0; i < n; i++) has |= ids[i] == 320;
        CHECK(!has && n > 3, "parse_special off still matched <｜User｜> (%zu ids)", n);
        free(ids);
    } else {
        CHECK(0, "%s", e.msg);
    }
    expect_roundtrip(tk, s, strlen(s), 0);
    expect_roundtrip(tk, s, strlen(s), 1);
    /* EOS text with --special, and the two gated the same way */
    const char *s2 = EOS_TEXT EOS_TEXT;
    int32_t w2[] = {1, 1};
    expect_ids(tk, s2, strlen(s2), 0, 1, w2, 2, "two EOS");
    /* control tokens render only when asked */
    size_t len;
    nm_token_piece(tk, 320, 0, &len);
    CHECK(len == 0, "control piece hidden");
    const char *p = nm_token_piece(tk, 320, 1, &len);
    CHECK(len == strlen(USER) && !memcmp(p, USER, len), "control piece rendered");
    nm_tokenizer_free(tk);
    nm_gguf_close(g);
}

/* USER_DEFINED tokens match without parse_special (llama.cpp, HF); CONTROL
 * ones only with it; the longer token wins where two start together. */
static void test_user_defined_and_order(void) {
    const tok_def extra[] = {{"<|c|>", NM_TOKEN_CONTROL}, {"<u>", NM_TOKEN_USER_DEFINED},
                             {"<u><u>", NM_TOKEN_USER_DEFINED}, {"<s>", NM_TOKEN_CONTROL}};
    nm_tokenizer *tk = NULL;
    nm_err e;
    if (make_vocab(&tk, "gpt2", "deepseek-v3", NULL, 0, extra, 4, NULL, 0, 1, 259, 259, &e)) {
        CHECK(0, "make_vocab: %s", e.msg);
        return;
    }
    int32_t a = nm_token_id(tk, "a", 1), lt = nm_token_id(tk, "<", 1), bar = nm_token_id(tk, "|", 1),
            c = nm_token_id(tk, "c", 1), gt = nm_token_id(tk, ">", 1);
    int32_t w1[] = {a, 257};
    expect_ids(tk, "a<u>", 4, 0, 0, w1, 2, "user-defined without parse_special");
    expect_ids(tk, "a<u>", 4, 0, 1, w1, 2, "user-defined with parse_special");
    int32_t w2[] = {a, lt, bar, c, bar, gt};
    expect_ids(tk, "a<|c|>", 6, 0, 0, w2, 6, "control as text");
    int32_t w3[] = {a, 256};
    expect_ids(tk, "a<|c|>", 6, 0, 1, w3, 2, "control as token");
    int32_t w4[] = {258, 257}; /* "<u><u>" first (longest), then the lone "<u>" */
    expect_ids(tk, "<u><u><u>", 9, 0, 0, w4, 2, "longest special first");
    int32_t w5[] = {259, a}; /* add_bos honoured */
    expect_ids(tk, "a", 1, 1, 0, w5, 2, "BOS from the vocabulary");
    nm_tokenizer_free(tk);
}

/* A symbol whose text is not a token falls back to its bytes: the byte's
 * character token, else a <0xXX> BYTE token, else nothing. */
static void test_byte_fallback(void) {
    /* "a b" merges, but "ab" is not a token; byte 0xE4 has no character token
     * but a <0xE4> one; byte 0xB8 has neither */
    const tok_def extra[] = {{"<0xE4>", NM_TOKEN_BYTE}, {"<s>", NM_TOKEN_CONTROL}};
    const char *merges[] = {"a b", "c d"};
    const uint8_t skip[] = {0xE4, 0xB8};
    nm_tokenizer *tk = NULL;
    nm_err e;
    if (make_vocab(&tk, "gpt2", "deepseek-v3", skip, 2, extra, 2, merges, 2, 0, 257, 257, &e)) {
        CHECK(0, "make_vocab: %s", e.msg);
        return;
    }
    CHECK(nm_tokenizer_n_missing_bytes(tk) == 1, "missing bytes %d", nm_tokenizer_n_missing_bytes(tk));
    int32_t a = nm_token_id(tk, "a", 1), b = nm_token_id(tk, "b", 1), x = nm_token_id(tk, "x", 1);
    int32_t w1[] = {x, a, b, x};
    expect_ids(tk, "xabx", 4, 0, 0, w1, 4, "merge result not in vocab -> bytes");
    /* 世 = E4 B8 96: E4 via <0xE4>, B8 dropped, 96 via its character */
    char c96[3];
    byte_char(0x96, c96);
    int32_t w2[] = {256, nm_token_id(tk, c96, strlen(c96))};
    expect_ids(tk, "\xe4\xb8\x96", 3, 0, 0, w2, 2, "byte fallback");
    size_t len;
    const char *p = nm_token_piece(tk, 256, 0, &len);
    CHECK(len == 1 && (unsigned char)p[0] == 0xE4, "<0xE4> decodes to the byte");
    nm_tokenizer_free(tk);
}

/* Merge order: lowest rank first, leftmost among equal ranks. */
static void test_merge_order(void) {
    const tok_def extra[] = {{"ab", 1}, {"bc", 1}, {"abc", 1}, {"aa", 1}, {"aaa", 1}};
    const char *merges[] = {"b c", "a b", "a bc", "a a", "aa a"};
    nm_tokenizer *tk = NULL;
    nm_err e;
    if (make_vocab(&tk, "gpt2", "gpt2", NULL, 0, extra, 5, merges, 5, 0, -1, -1, &e)) {
        CHECK(0, "make_vocab: %s", e.msg);
        return;
    }
    CHECK(!strcmp(nm_tokenizer_pre_used(tk), "gpt2"), "pre %s", nm_tokenizer_pre_used(tk));
    CHECK(nm_tokenizer_bos(tk) == -1, "no bos");
    int32_t w1[] = {258}; /* b c first (rank 0), then a bc */
    expect_ids(tk, "abc", 3, 1, 0, w1, 1, "abc");
    int32_t w2[] = {259, 259}; /* a a at 0 first, then a a at 2; aa a never applies */
    expect_ids(tk, "aaaa", 4, 0, 0, w2, 2, "aaaa");
    int32_t w3[] = {260}; /* aa then aa a */
    expect_ids(tk, "aaa", 3, 0, 0, w3, 1, "aaa");
    nm_tokenizer_free(tk);
}

static void test_unknown_pre_uses_default(void) {
    nm_tokenizer *tk = NULL;
    nm_err e;
    if (make_vocab(&tk, "gpt2", "something-new", NULL, 0, NULL, 0, NULL, 0, 0, -1, -1, &e)) {
        CHECK(0, "make_vocab: %s", e.msg);
        return;
    }
    CHECK(!strcmp(nm_tokenizer_pre(tk), "something-new"), "pre %s", nm_tokenizer_pre(tk));
    CHECK(!strcmp(nm_tokenizer_pre_used(tk), "default"), "pre used %s", nm_tokenizer_pre_used(tk));
    expect_roundtrip(tk, "Hello, world! 12345 ~~", 22, 0);
    nm_tokenizer_free(tk);
    if (make_vocab(&tk, "gpt2", NULL, NULL, 0, NULL, 0, NULL, 0, 0, -1, -1, &e)) {
        CHECK(0, "make_vocab without pre: %s", e.msg);
        return;
    }
    CHECK(!strcmp(nm_tokenizer_pre_used(tk), "default"), "no pre -> default");
    nm_tokenizer_free(tk);
}

/* Invalid UTF-8 input: each bad byte becomes U+FFFD (llama.cpp). */
static void test_invalid_utf8_input(void) {
    nm_gguf *g;
    nm_tokenizer *tk = load_tiny(&g);
    if (!tk) return nm_gguf_close(g);
    const char bad[] = "a\xff" "b\xe4\xb8" "c";
    int32_t *ids;
    size_t n, dl;
    char *d;
    nm_err e;
    if (!nm_tokenize(tk, bad, sizeof bad - 1, 0, 0, &ids, &n, &e) && !nm_detokenize(tk, ids, n, 1, &d, &dl, &e)) {
        const char want[] = "a\xef\xbf\xbd" "b\xef\xbf\xbd\xef\xbf\xbd" "c";
        CHECK(dl == sizeof want - 1 && !memcmp(d, want, dl), "invalid input decoded to '%s'", d);
        free(d);
        free(ids);
    } else {
        CHECK(0, "%s", e.msg);
    }
    /* NUL bytes are text like any other */
    expect_roundtrip(tk, "a\0b", 3, 0);
    nm_tokenizer_free(tk);
    nm_gguf_close(g);
}

/* Feeds IDS through a stream; checks every chunk is complete UTF-8 and the
 * chunks add up to WANT; CHUNKS[i] (if given) is what the i-th id must give. */
static void stream_check(const nm_tokenizer *tk, const int32_t *ids, size_t n, const char *const *chunks,
                         const char *want, size_t want_len, int render_special) {
    nm_detok_stream *s = nm_detok_stream_new(tk, render_special);
    CHECK(s != NULL, "stream new");
    if (!s) return;
    char all[1024];
    size_t k = 0;
    nm_err e;
    for (size_t i = 0; i < n; i++) {
        const char *t;
        size_t len;
        if (nm_detok_stream_feed(s, ids[i], &t, &len, &e)) {
            CHECK(0, "feed %d: %s", ids[i], e.msg);
            break;
        }
        if (chunks) CHECK(len == strlen(chunks[i]) && !memcmp(t, chunks[i], len), "chunk %zu: got '%.*s' want '%s'", i,
                          (int)len, t, chunks[i]);
        /* complete characters only */
        for (size_t j = 0; j < len;) {
            unsigned char c = (unsigned char)t[j];
            size_t cl = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
            CHECK(c < 0x80 || c >= 0xC2, "chunk %zu starts a character with 0x%02x", i, c);
            CHECK(j + cl <= len, "chunk %zu ends inside a character", i);
            for (size_t q = 1; q < cl && j + q < len; q++)
                CHECK(((unsigned char)t[j + q] & 0xC0) == 0x80, "chunk %zu: bad continuation", i);
            j += cl;
        }
        if (k + len < sizeof all) memcpy(all + k, t, len), k += len;
    }
    size_t fl;
    const char *f = nm_detok_stream_flush(s, &fl);
    if (k + fl < sizeof all) memcpy(all + k, f, fl), k += fl;
    CHECK(k == want_len && !memcmp(all, want, k), "stream gave '%.*s' want '%.*s'", (int)k, all, (int)want_len,
          want);
    nm_detok_stream_free(s);
}

static void test_stream_split_characters(void) {
    nm_gguf *g;
    nm_tokenizer *tk = load_tiny(&g);
    if (!tk) return nm_gguf_close(g);
    /* 模型 = E6 A8 A1 E5 9E 8B tokenizes as æ ¨ ¡å ŀ ĭ: the token ¡å ends 模
     * and starts 型, so neither may come out half */
    const char *text = "\xe6\xa8\xa1\xe5\x9e\x8b";
    int32_t *ids;
    size_t n;
    nm_err e;
    if (nm_tokenize(tk, text, strlen(text), 0, 0, &ids, &n, &e)) {
        CHECK(0, "%s", e.msg);
    } else {
        CHECK(n == 5 && ids[2] == 319, "模型 -> %zu ids (ids[2] = %d), want 5 with ¡å (319) third", n,
              n > 2 ? ids[2] : -1);
        if (n == 5) {
            const char *chunks[] = {"", "", "\xe6\xa8\xa1", "", "\xe5\x9e\x8b"};
            stream_check(tk, ids, n, chunks, text, strlen(text), 1);
        }
        free(ids);
    }
    /* 世 = ä¸ (E4 B8) + one byte token */
    char c96[3];
    byte_char(0x96, c96);
    int32_t shi[] = {291, nm_token_id(tk, c96, strlen(c96))};
    const char *chunks2[] = {"", "\xe4\xb8\x96"};
    stream_check(tk, shi, 2, chunks2, "\xe4\xb8\x96", 3, 1);
    /* the same ids mixed with ASCII and a control token, rendered or not */
    int32_t mix[] = {0, 260, 291, shi[1], 320, 295};
    const char *c_on[] = {"<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", " the", "",
                          "\xe4\xb8\x96", USER, ".\n"};
    const char want_on[] = "<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c> the\xe4\xb8\x96" USER ".\n";
    stream_check(tk, mix, 6, c_on, want_on, sizeof want_on - 1, 1);
    const char *c_off[] = {"", " the", "", "\xe4\xb8\x96", "", ".\n"};
    stream_check(tk, mix, 6, c_off, " the\xe4\xb8\x96.\n", 9, 0);
    /* the stream equals nm_detokenize on a longer text */
    const char *long_text = "The experts: 深度学习模型的推理速度取决于内存带宽。\xf0\x9f\xa6\x99\xf0\x9f\x9a\x80 done";
    if (!nm_tokenize(tk, long_text, strlen(long_text), 0, 0, &ids, &n, &e)) {
        stream_check(tk, ids, n, NULL, long_text, strlen(long_text), 1);
        free(ids);
    }
    nm_tokenizer_free(tk);
    nm_gguf_close(g);
}

static void test_stream_invalid_and_flush(void) {
    nm_gguf *g;
    nm_tokenizer *tk = load_tiny(&g);
    if (!tk) return nm_gguf_close(g);
    char ch[3];
    int32_t id_e4, id_a, id_80;
    byte_char(0xE4, ch);
    id_e4 = nm_token_id(tk, ch, strlen(ch));
    id_a = nm_token_id(tk, "a", 1);
    byte_char(0x80, ch);
    id_80 = nm_token_id(tk, ch, strlen(ch));
    /* a lead byte followed by ASCII: U+FFFD then the ASCII */
    int32_t v1[] = {id_e4, id_a};
    const char *c1[] = {"", "\xef\xbf\xbd" "a"};
    stream_check(tk, v1, 2, c1, "\xef\xbf\xbd" "a", 4, 1);
    /* a lone continuation byte: U+FFFD at once */
    int32_t v2[] = {id_80, id_a};
    const char *c2[] = {"\xef\xbf\xbd", "a"};
    stream_check(tk, v2, 2, c2, "\xef\xbf\xbd" "a", 4, 1);
    /* an incomplete character at the end comes out of flush as U+FFFD */
    int32_t v3[] = {id_a, 291};
    const char *c3[] = {"a", ""};
    stream_check(tk, v3, 2, c3, "a\xef\xbf\xbd", 4, 1);
    /* errors: out-of-range id leaves the stream usable */
    nm_detok_stream *s = nm_detok_stream_new(tk, 1);
    const char *t;
    size_t len;
    nm_err e;
    CHECK(nm_detok_stream_feed(s, 99999, &t, &len, &e) == -1 && strstr(e.msg, "99999"), "bad id error");
    CHECK(nm_detok_stream_feed(s, id_a, &t, &len, &e) == 0 && len == 1 && t[0] == 'a', "usable after error");
    nm_detok_stream_free(s);
    int32_t badv[] = {5, -3};
    char *d;
    CHECK(nm_detokenize(tk, badv, 2, 1, &d, &len, &e) == -1 && strstr(e.msg, "-3"), "detokenize bad id: %s", e.msg);
    nm_tokenizer_free(tk);
    nm_gguf_close(g);
}

static void test_load_errors(void) {
    nm_tokenizer *tk = NULL;
    nm_err e;
    CHECK(make_vocab(&tk, "llama", "default", NULL, 0, NULL, 0, NULL, 0, 0, -1, -1, &e) == -1 &&
              strstr(e.msg, "SentencePiece") && strstr(e.msg, "not supported"),
          "SentencePiece model: %s", e.msg);
    CHECK(tk == NULL, "no tokenizer on error");
    CHECK(make_vocab(&tk, NULL, NULL, NULL, 0, NULL, 0, NULL, 0, 0, -1, -1, &e) == -1 && strstr(e.msg, "no tokenizer"),
          "no tokenizer: %s", e.msg);
    CHECK(make_vocab(&tk, "gpt2", "deepseek-v3", NULL, 0, NULL, 0, NULL, 0, 0, 5000, -1, &e) == -1 &&
              strstr(e.msg, "bos_token_id"),
          "bad bos: %s", e.msg);
    /* token_type of the wrong length */
    gw w = {0};
    const char *toks[] = {"a", "b"};
    int32_t types[] = {1};
    kv_string(&w, "tokenizer.ggml.model", "gpt2");
    kv_strings(&w, "tokenizer.ggml.tokens", toks, 2);
    kv_i32s(&w, "tokenizer.ggml.token_type", types, 1);
    kv_strings(&w, "tokenizer.ggml.merges", NULL, 0);
    size_t size;
    uint8_t *buf = gw_finish(&w, &size);
    nm_gguf *g = NULL;
    if (!nm_gguf_parse_buffer(buf, size, "mem.gguf", &g, &e)) {
        CHECK(nm_tokenizer_load(&tk, g, &e) == -1 && strstr(e.msg, "token_type"), "token_type length: %s", e.msg);
        nm_gguf_close(g);
    } else {
        CHECK(0, "parse: %s", e.msg);
    }
    free(buf);
    /* merges missing */
    gw w2 = {0};
    kv_string(&w2, "tokenizer.ggml.model", "gpt2");
    kv_strings(&w2, "tokenizer.ggml.tokens", toks, 2);
    buf = gw_finish(&w2, &size);
    if (!nm_gguf_parse_buffer(buf, size, "mem.gguf", &g, &e)) {
        CHECK(nm_tokenizer_load(&tk, g, &e) == -1 && strstr(e.msg, "merges"), "no merges: %s", e.msg);
        nm_gguf_close(g);
    }
    free(buf);
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    RUN(test_tiny_model_basics);
    RUN(test_special_gating);
    RUN(test_user_defined_and_order);
    RUN(test_byte_fallback);
    RUN(test_merge_order);
    RUN(test_unknown_pre_uses_default);
    RUN(test_invalid_utf8_input);
    RUN(test_stream_split_characters);
    RUN(test_stream_invalid_and_flush);
    RUN(test_load_errors);
    return check_summary();
}
