/* stop_text.c - stop strings over streamed text (see stop_text.h). */
#include "coordinator/text/stop_text.h"

#include <stdlib.h>
#include <string.h>

static int is_cont(unsigned char c) { return (c & 0xC0) == 0x80; }

/* Bytes of the character a lead byte starts (1 for ASCII or a stray byte). */
static size_t utf8_span(unsigned char c) { return c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1; }

/* The last character boundary at or before POS in S[0..LEN). At the end of
 * the text, a last character still missing bytes (a piece that stopped in
 * the middle of one) is not complete either, so the boundary is its start. */
static size_t char_start(const char *s, size_t len, size_t pos) {
    if (pos < len) {
        while (pos > 0 && is_cont((unsigned char)s[pos])) pos--;
        return pos;
    }
    size_t lead = len;
    while (lead > 0 && len - lead < 3 && is_cont((unsigned char)s[lead - 1])) lead--;
    if (lead > 0 && lead - 1 + utf8_span((unsigned char)s[lead - 1]) > len) return lead - 1;
    return len;
}

int nm_stop_text_init(nm_stop_text *t, const char *const *stops, int n) {
    *t = (nm_stop_text){0};
    if (nm_text_append(&t->text, "", 0)) goto oom; /* buf is a valid string from here on */
    if (n > 0 && !(t->stops = calloc((size_t)n, sizeof *t->stops))) goto oom;
    for (int i = 0; i < n; i++) {
        size_t k = strlen(stops[i]);
        if (!k) continue; /* would match at once, before any text */
        if (!(t->stops[t->n_stops] = strdup(stops[i]))) goto oom;
        t->n_stops++;
        if (k > t->max_stop) t->max_stop = k;
    }
    return 0;
oom:
    nm_stop_text_free(t);
    return -1;
}

int nm_stop_text_append(nm_stop_text *t, const char *piece, size_t len) {
    if (t->stopped) return 1;
    nm_text *x = &t->text;
    size_t old = x->len;
    if (nm_text_append(x, piece, len)) return -1;
    /* The text before this piece held no stop string, so one found now ends in
     * the piece: a stop string of K bytes starts at old - (K - 1) or later.
     * Nor can it start in text already released (that is final; the hold-back
     * keeps this from mattering unless a caller appends after FINAL). */
    const char *first = NULL;
    for (int i = 0; i < t->n_stops; i++) {
        size_t k = strlen(t->stops[i]);
        size_t from = old >= k - 1 ? old - (k - 1) : 0;
        if (from < t->released) from = t->released;
        const char *hit = memmem(x->buf + from, x->len - from, t->stops[i], k);
        if (hit && (!first || hit < first)) first = hit;
    }
    if (!first) return 0;
    x->len = (size_t)(first - x->buf);
    x->buf[x->len] = 0;
    t->stopped = 1;
    return 1;
}

size_t nm_stop_text_release(nm_stop_text *t, int final) {
    const nm_text *x = &t->text;
    size_t rel = x->len;
    if (!final && !t->stopped) {
        /* the last max_stop - 1 bytes could be the start of a stop string */
        size_t hold = t->max_stop > 0 ? t->max_stop - 1 : 0;
        rel = char_start(x->buf, x->len, x->len > hold ? x->len - hold : 0);
    }
    if (rel > t->released) t->released = rel;
    return t->released;
}

void nm_stop_text_free(nm_stop_text *t) {
    for (int i = 0; i < t->n_stops; i++) free(t->stops[i]);
    free(t->stops);
    free(t->text.buf);
    *t = (nm_stop_text){0};
}
