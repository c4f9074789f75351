/* text.h - a growable byte buffer: generated text, HTTP bodies, metrics. */
#ifndef NUMOE_COORDINATOR_TEXT_TEXT_H
#define NUMOE_COORDINATOR_TEXT_TEXT_H

#include <stddef.h>

/* The caller owns it (zero-init; free(buf) when done). buf, once allocated,
 * is always NUL-terminated. */
typedef struct {
    char *buf;
    size_t len, cap;
} nm_text;

/* Appends LEN bytes to T; 0 or -1 (out of memory, T unchanged). */
int nm_text_append(nm_text *t, const char *s, size_t len);
/* printf-style append; 0 or -1. */
int nm_text_printf(nm_text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
