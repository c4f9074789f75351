/* text.c - the growable byte buffer (text.h). */
#include "coordinator/text/text.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int nm_text_append(nm_text *t, const char *s, size_t len) {
    if (t->len + len + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 256;
        while (cap < t->len + len + 1) cap *= 2;
        char *nb = realloc(t->buf, cap);
        if (!nb) return -1;
        t->buf = nb, t->cap = cap;
    }
    if (len) memcpy(t->buf + t->len, s, len);
    t->len += len;
    t->buf[t->len] = 0;
    return 0;
}

int nm_text_printf(nm_text *t, const char *fmt, ...) {
    char small[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) return -1;
    if ((size_t)n < sizeof small) return nm_text_append(t, small, (size_t)n);
    char *big = malloc((size_t)n + 1);
    if (!big) return -1;
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    int r = nm_text_append(t, big, (size_t)n);
    free(big);
    return r;
}

