/* test_stop_text.c - stop strings over streamed text: found across pieces,
 * a possible start held back and released at the end, UTF-8 characters never
 * split, the earliest of several stop strings wins, empty ones ignored. */
#include "coordinator/text/stop_text.h"
#include "tests/unit/check.h"

static int init(nm_stop_text *t, const char *const *stops, int n) {
    int r = nm_stop_text_init(t, stops, n);
    CHECK(r == 0 && t->text.buf && !t->text.buf[0] && t->text.len == 0 && t->released == 0, "init: %d", r);
    return r;
}

/* Appends PIECE; checks the hit result, then the text released so far. */
static void feed(nm_stop_text *t, const char *piece, int want_hit, const char *want_released) {
    int hit = nm_stop_text_append(t, piece, strlen(piece));
    CHECK(hit == want_hit, "append '%s': hit %d, want %d", piece, hit, want_hit);
    size_t rel = nm_stop_text_release(t, 0);
    CHECK(rel == t->released && rel <= t->text.len, "release %zu, len %zu", rel, t->text.len);
    CHECK(rel == strlen(want_released) && !memcmp(t->text.buf, want_released, rel),
          "after '%s': released '%.*s', want '%s'", piece, (int)rel, t->text.buf, want_released);
}

static void test_stop_across_pieces(void) {
    const char *stops[] = {"STOP"};
    nm_stop_text t;
    if (init(&t, stops, 1)) return;
    feed(&t, "hello S", 0, "hell");
    feed(&t, "T", 0, "hello");
    feed(&t, "OP and more", 1, "hello ");
    CHECK(!strcmp(t.text.buf, "hello ") && t.text.len == 6 && t.stopped, "text '%s'", t.text.buf);
    /* after a hit further pieces are ignored and the end adds nothing */
    feed(&t, "STOP again", 1, "hello ");
    CHECK(nm_stop_text_release(&t, 1) == 6, "final %zu", t.released);
    nm_stop_text_free(&t);
}

static void test_hold_back_partial_prefix(void) {
    const char *stops[] = {"</end>"};
    nm_stop_text t;
    if (init(&t, stops, 1)) return;
    /* the last len("</end>") - 1 bytes could still start the stop string */
    feed(&t, "ab", 0, "");
    feed(&t, "cdefg", 0, "ab");
    feed(&t, "</en", 0, "abcdef");
    /* a near miss: "</enX" cannot be the stop string, but its tail is held back */
    feed(&t, "X", 0, "abcdefg");
    CHECK(!t.stopped && t.text.len == 12, "len %zu", t.text.len);
    nm_stop_text_free(&t);
}

static void test_release_at_final(void) {
    const char *stops[] = {"###"};
    nm_stop_text t;
    if (init(&t, stops, 1)) return;
    feed(&t, "answer #", 0, "answer");
    feed(&t, "#", 0, "answer ");
    /* no more pieces: the held "##" was not a stop string after all */
    CHECK(nm_stop_text_release(&t, 1) == t.text.len && !strcmp(t.text.buf, "answer ##"), "final '%s'", t.text.buf);
    CHECK(!t.stopped, "stopped");
    /* the mark never moves back */
    CHECK(nm_stop_text_release(&t, 0) == t.text.len, "moved back to %zu", t.released);
    nm_stop_text_free(&t);

    /* no stop strings: everything is released at once */
    if (init(&t, NULL, 0)) return;
    feed(&t, "plain", 0, "plain");
    feed(&t, "", 0, "plain");
    nm_stop_text_free(&t);
}

static void test_utf8_not_split(void) {
    const char *stops[] = {"xyz"};
    nm_stop_text t;
    if (init(&t, stops, 1)) return;
    /* "a€" is 61 e2 82 ac: holding 2 bytes back would cut the euro sign */
    feed(&t, "a\xe2\x82\xac", 0, "a");
    feed(&t, "b", 0, "a");
    /* a four-byte character (U+1F600) held back whole */
    feed(&t, "\xf0\x9f\x98\x80", 0, "a\xe2\x82\xac" "b");
    feed(&t, "cd", 0, "a\xe2\x82\xac" "b\xf0\x9f\x98\x80");
    nm_stop_text_free(&t);

    /* a piece that ends mid-character: the start of it is not released until
     * the rest comes, or until the end */
    if (init(&t, NULL, 0)) return;
    feed(&t, "\xc3\xa9t\xc3", 0, "\xc3\xa9t");
    feed(&t, "\xa9", 0, "\xc3\xa9t\xc3\xa9");
    feed(&t, "\xe2\x82", 0, "\xc3\xa9t\xc3\xa9");
    CHECK(nm_stop_text_release(&t, 1) == t.text.len, "final %zu of %zu", t.released, t.text.len);
    nm_stop_text_free(&t);

    /* a multibyte stop string split across pieces */
    const char *wide[] = {"\xe2\x98\x83"}; /* U+2603 */
    if (init(&t, wide, 1)) return;
    feed(&t, "snow\xe2", 0, "sno");
    feed(&t, "\x98", 0, "snow");
    feed(&t, "\x83man", 1, "snow");
    nm_stop_text_free(&t);
}

static void test_earliest_stop_wins(void) {
    /* both complete in the same piece; the second in the list starts first */
    const char *stops[] = {"world", "lo w", "zzz"};
    nm_stop_text t;
    if (init(&t, stops, 3)) return;
    feed(&t, "hel", 0, "");
    feed(&t, "lo world!", 1, "hel");
    nm_stop_text_free(&t);

    /* a short stop string inside a longer one that started earlier */
    const char *nested[] = {"c", "abcd"};
    if (init(&t, nested, 2)) return;
    feed(&t, "xxab", 0, "x");
    feed(&t, "cd", 1, "xx");
    nm_stop_text_free(&t);

    /* the shorter one is hit first when it completes in an earlier piece */
    if (init(&t, nested, 2)) return;
    feed(&t, "xxabc", 1, "xxab");
    nm_stop_text_free(&t);
}

static void test_empty_stops_ignored(void) {
    const char *stops[] = {"", "END", ""};
    nm_stop_text t;
    if (init(&t, stops, 3)) return;
    CHECK(t.n_stops == 1 && t.max_stop == 3, "n_stops %d max_stop %zu", t.n_stops, t.max_stop);
    feed(&t, "text", 0, "te");
    feed(&t, " END", 1, "text ");
    nm_stop_text_free(&t);

    /* only empty ones: as if there were none */
    const char *empty[] = {""};
    if (init(&t, empty, 1)) return;
    CHECK(t.n_stops == 0 && t.max_stop == 0, "n_stops %d", t.n_stops);
    feed(&t, "all of it", 0, "all of it");
    nm_stop_text_free(&t);
}

static void test_stop_at_start_and_growth(void) {
    const char *stops[] = {"<|eot|>"};
    nm_stop_text t;
    if (init(&t, stops, 1)) return;
    feed(&t, "<|eot|>tail", 1, "");
    CHECK(t.text.len == 0 && !t.text.buf[0], "len %zu", t.text.len);
    nm_stop_text_free(&t);
    nm_stop_text_free(&t); /* safe twice */

    /* many small pieces past the first buffer, then a stop string at the end */
    if (init(&t, stops, 1)) return;
    char piece[2] = "a";
    for (int i = 0; i < 1000; i++) {
        piece[0] = (char)('a' + i % 26);
        CHECK(nm_stop_text_append(&t, piece, 1) == 0, "piece %d", i);
    }
    CHECK(nm_stop_text_release(&t, 0) == 1000 - 6, "released %zu", t.released);
    CHECK(nm_stop_text_append(&t, "<|eo", 4) == 0 && nm_stop_text_append(&t, "t|>", 3) == 1, "late stop");
    CHECK(t.text.len == 1000 && nm_stop_text_release(&t, 0) == 1000, "len %zu released %zu", t.text.len, t.released);
    nm_stop_text_free(&t);
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    RUN(test_stop_across_pieces);
    RUN(test_hold_back_partial_prefix);
    RUN(test_release_at_final);
    RUN(test_utf8_not_split);
    RUN(test_earliest_stop_wins);
    RUN(test_empty_stops_ignored);
    RUN(test_stop_at_start_and_growth);
    return check_summary();
}
