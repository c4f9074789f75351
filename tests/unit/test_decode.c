/* test_decode.c - the one decode step of generate, chat and the scheduler
 * (coordinator/text/decode.h) on a real vocabulary: every token counted, an
 * end-of-generation token ends the text (unless ignore_eos) and adds none of
 * its own, a stop string cuts the text and wins over the limit, the
 * max_tokens-th token ends it with the detokenizer flushed, ids-only and
 * no-text modes, the release mark never shows what may still change, and the
 * lock a reader shares is taken around every change. Uses a fixture model's
 * tokenizer (run from the repo root). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/gguf.h"
#include "coordinator/text/decode.h"
#include "tests/unit/check.h"

static const char *MODEL = "tests/fixtures/models/deepseek-v3-tiny-F32-mla.gguf";
static nm_tokenizer *tk;
static int32_t ids[64];
static size_t n_ids;

/* The text of ids[0..n) as the streaming detokenizer gives it. */
static char *text_of(const int32_t *v, size_t n) {
    char *out = NULL;
    size_t len;
    nm_err err;
    CHECK(nm_detokenize(tk, v, n, 0, &out, &len, &err) == 0, "%s", err.msg);
    return out;
}

static void test_length_and_text(void) {
    nm_decode d;
    nm_err err;
    CHECK(nm_decode_init(&d, tk, 1, NULL, 0, 4, 0, &err) == 0, "%s", err.msg);
    nm_finish f[4];
    for (int i = 0; i < 4; i++) f[i] = nm_decode_token(&d, ids[i]);
    CHECK(f[0] == NM_FINISH_NONE && f[1] == NM_FINISH_NONE && f[2] == NM_FINISH_NONE && f[3] == NM_FINISH_LENGTH,
          "finish %d %d %d %d", f[0], f[1], f[2], f[3]);
    char *want = text_of(ids, 4);
    CHECK(d.n_gen == 4 && !d.hit_eog, "n_gen %lld", (long long)d.n_gen);
    CHECK(want && !strcmp(d.text.text.buf, want) && d.text.released == d.text.text.len,
          "text '%s' (released %zu of %zu), want '%s'", d.text.text.buf, d.text.released, d.text.text.len, want);
    free(want);
    nm_decode_free(&d);
}

static void test_end_of_generation(void) {
    int32_t eos = nm_tokenizer_eos(tk);
    CHECK(eos >= 0 && nm_tokenizer_is_eog(tk, eos), "the fixture has no end-of-generation token (%d)", eos);
    nm_decode d;
    nm_err err;
    CHECK(nm_decode_init(&d, tk, 1, NULL, 0, 10, 0, &err) == 0, "%s", err.msg);
    nm_finish a = nm_decode_token(&d, ids[0]), b = nm_decode_token(&d, eos);
    char *want = text_of(ids, 1);
    CHECK(a == NM_FINISH_NONE && b == NM_FINISH_STOP && d.hit_eog && d.n_gen == 2, "finish %d %d eog %d n_gen %lld", a,
          b, d.hit_eog, (long long)d.n_gen);
    CHECK(want && !strcmp(d.text.text.buf, want) && d.text.released == d.text.text.len, "text '%s', want '%s'",
          d.text.text.buf, want);
    free(want);
    nm_decode_free(&d);

    /* ignore_eos: it is just another token */
    CHECK(nm_decode_init(&d, tk, 1, NULL, 0, 3, 1, &err) == 0, "%s", err.msg);
    a = nm_decode_token(&d, eos);
    b = nm_decode_token(&d, ids[0]);
    nm_finish c = nm_decode_token(&d, ids[1]);
    CHECK(a == NM_FINISH_NONE && b == NM_FINISH_NONE && c == NM_FINISH_LENGTH && !d.hit_eog && d.n_gen == 3,
          "ignore_eos: finish %d %d %d", a, b, c);
    nm_decode_free(&d);

    /* ids only (token-id prompts): no end of generation, no text */
    CHECK(nm_decode_init(&d, NULL, 1, NULL, 0, 2, 0, &err) == 0, "%s", err.msg);
    a = nm_decode_token(&d, eos);
    b = nm_decode_token(&d, eos);
    CHECK(a == NM_FINISH_NONE && b == NM_FINISH_LENGTH && !d.hit_eog && d.text.text.len == 0,
          "ids only: finish %d %d, %zu bytes of text", a, b, d.text.text.len);
    nm_decode_free(&d);

    /* no text (--print-ids): the end of generation still counts */
    const char *stops[] = {"x"};
    CHECK(nm_decode_init(&d, tk, 0, stops, 1, 5, 0, &err) == 0, "%s", err.msg);
    a = nm_decode_token(&d, ids[0]);
    b = nm_decode_token(&d, eos);
    CHECK(a == NM_FINISH_NONE && b == NM_FINISH_STOP && d.hit_eog && d.text.text.len == 0 && !d.detok,
          "no text: finish %d %d, %zu bytes", a, b, d.text.text.len);
    nm_decode_free(&d);
}

/* A stop string straddling the text of tokens 0..2 and the tokens after:
 * nothing of it is ever released, it ends the text before it, and it wins
 * when it arrives with the max_tokens-th token. */
static void test_stop_string(void) {
    char *head = text_of(ids, 3), *all = text_of(ids, n_ids);
    size_t lh = strlen(head), la = strlen(all);
    CHECK(lh >= 2 && la >= lh + 2, "the fixture prompt gives too little text (%zu of %zu bytes)", lh, la);
    if (!(lh >= 2 && la >= lh + 2)) return free(head), free(all);
    char stop[5] = {head[lh - 2], head[lh - 1], all[lh], all[lh + 1], 0};
    const char *stops[] = {stop};
    CHECK(!strstr(head, stop), "the stop string '%s' already occurs in '%s'", stop, head);
    size_t cut = (size_t)(strstr(all, stop) - all);
    /* the token that completes the stop string */
    size_t k = 3;
    for (;; k++) {
        char *t = text_of(ids, k + 1);
        int found = t && strstr(t, stop) != NULL;
        free(t);
        if (found || k + 1 >= n_ids) break;
    }
    for (int64_t max = (int64_t)k + 1; max <= (int64_t)k + 5; max += 4) {
        nm_decode d;
        nm_err err;
        CHECK(nm_decode_init(&d, tk, 1, stops, 1, max, 0, &err) == 0, "%s", err.msg);
        nm_finish f = NM_FINISH_NONE;
        size_t i = 0;
        for (; i <= k && f == NM_FINISH_NONE; i++) {
            f = nm_decode_token(&d, ids[i]);
            CHECK(d.text.released <= cut, "token %zu: released %zu bytes, the stop string starts at %zu", i,
                  d.text.released, cut);
        }
        CHECK(f == NM_FINISH_STOP && i == k + 1 && d.text.text.len == cut && !memcmp(d.text.text.buf, all, cut) &&
                  d.text.released == cut,
              "max %lld: finish %d at token %zu (want %zu), text '%s' (%zu released), want the first %zu bytes of '%s'",
              (long long)max, f, i - 1, k, d.text.text.buf, d.text.released, cut, all);
        nm_decode_free(&d);
    }
    free(head), free(all);
}

/* The detokenizer holds an incomplete UTF-8 character back; the end of the
 * text - an end-of-generation token, the limit - flushes it (as U+FFFD). */
static void test_end_flushes_the_detokenizer(void) {
    /* byte 0xC3 alone: GPT-2's byte table maps it to U+00C3 ("\xC3\x83") */
    int32_t half = nm_token_id(tk, "\xC3\x83", 2), eos = nm_tokenizer_eos(tk);
    CHECK(half >= 0, "the fixture has no token for byte 0xC3");
    if (half < 0) return;
    for (int by_eos = 0; by_eos < 2; by_eos++) {
        nm_decode d;
        nm_err err;
        CHECK(nm_decode_init(&d, tk, 1, NULL, 0, by_eos ? 5 : 1, 0, &err) == 0, "%s", err.msg);
        nm_finish f = nm_decode_token(&d, half);
        if (by_eos) {
            CHECK(f == NM_FINISH_NONE && d.text.text.len == 0, "half a character shown: %zu bytes", d.text.text.len);
            f = nm_decode_token(&d, eos);
        }
        CHECK(f == (by_eos ? NM_FINISH_STOP : NM_FINISH_LENGTH) && !strcmp(d.text.text.buf, "\xEF\xBF\xBD") &&
                  d.text.released == 3,
              "%s: finish %d, text of %zu bytes (%zu released), want U+FFFD", by_eos ? "eos" : "limit", f,
              d.text.text.len, d.text.released);
        nm_decode_free(&d);
    }
}

/* A reader on another thread reads under the same lock: while the lock is
 * held elsewhere the step cannot change n_gen or the text. */
typedef struct {
    nm_decode *d;
    int32_t tok;
    nm_finish f;
} step_arg;

static void *step_thread(void *p) {
    step_arg *a = p;
    a->f = nm_decode_token(a->d, a->tok);
    return NULL;
}

static void test_lock_guards_changes(void) {
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    nm_decode d;
    nm_err err;
    CHECK(nm_decode_init(&d, tk, 1, NULL, 0, 8, 0, &err) == 0, "%s", err.msg);
    d.lock = &mu, d.cv = &cv;
    pthread_mutex_lock(&mu);
    step_arg a = {&d, ids[0], NM_FINISH_ERROR};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, step_thread, &a) == 0, "thread");
    /* the step must block on the lock we hold: it cannot end meanwhile (a
     * step that did not take the lock would end within the wait; one that
     * does is still blocked when the wait runs out, whatever the load) */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 300 * 1000000L;
    if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
    int joined = pthread_timedjoin_np(th, NULL, &ts) == 0;
    CHECK(!joined && d.n_gen == 0 && d.text.text.len == 0, "the step changed n_gen / the text without the lock");
    pthread_mutex_unlock(&mu);
    if (!joined) pthread_join(th, NULL);
    pthread_mutex_lock(&mu);
    CHECK(a.f == NM_FINISH_NONE && d.n_gen == 1, "after the step: finish %d n_gen %lld", a.f, (long long)d.n_gen);
    pthread_mutex_unlock(&mu);
    nm_decode_free(&d);
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    nm_gguf *g = NULL;
    nm_err err;
    if (nm_gguf_open(MODEL, &g, &err) || nm_tokenizer_load(&tk, g, &err)) {
        CHECK(0, "%s", err.msg);
        return check_summary();
    }
    int32_t *v = NULL;
    const char *prompt = "The quick brown fox jumps";
    CHECK(nm_tokenize(tk, prompt, strlen(prompt), 0, 0, &v, &n_ids, &err) == 0 && n_ids >= 4, "%s", err.msg);
    for (size_t i = 0; i < n_ids && i < 64; i++) ids[i] = v[i];
    free(v);
    RUN(test_length_and_text);
    RUN(test_end_of_generation);
    RUN(test_stop_string);
    RUN(test_end_flushes_the_detokenizer);
    RUN(test_lock_guards_changes);
    nm_tokenizer_free(tk);
    nm_gguf_close(g);
    return check_summary();
}
