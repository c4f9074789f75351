/* stop_text.h - generated text cut at stop strings, released to the reader
 * only once it is final.
 *
 * Text arrives piece by piece (one detokenized token at a time) and a stop
 * string may straddle pieces, so the end of the text is held back while it
 * could still become the start of a stop string: with the longest stop string
 * K bytes long, the last K - 1 bytes. The release mark also never falls inside
 * a UTF-8 character, so a reader that shows the released part never shows half
 * a character. When a stop string turns up, the text is cut before it and all
 * that is left becomes final. Of several stop strings found in the same new
 * text, the one that starts first wins. Empty stop strings are ignored (one
 * would end the text before it began).
 *
 * Used by `numoe generate` / `numoe chat` (printing as they go) and by the
 * scheduler (clients read the released part under the request's lock).
 *
 * Ownership: the struct owns its text buffer and copies of the stop strings;
 * nm_stop_text_free releases them. Not thread-safe: callers that share it
 * lock around it. */
#ifndef NUMOE_COORDINATOR_TEXT_STOP_TEXT_H
#define NUMOE_COORDINATOR_TEXT_STOP_TEXT_H

#include <stddef.h>

#include "coordinator/text/text.h"

typedef struct {
    nm_text text;    /* the text so far, NUL-terminated (cut before a stop string once one is hit) */
    size_t released; /* text.buf[0..released) is final: it can no longer change */
    char **stops;    /* copies of the non-empty stop strings */
    int n_stops;
    size_t max_stop; /* the longest one's length */
    int stopped;     /* a stop string was hit: the text is complete */
} nm_stop_text;

/* Copies the stop strings (N of them, empty ones skipped) into a zeroed T and
 * allocates an empty text, so buf is a valid string from here on. 0, or -1
 * when out of memory (T is then freed and safe to free again). */
int nm_stop_text_init(nm_stop_text *t, const char *const *stops, int n);
/* Appends LEN bytes and looks for stop strings in what could newly contain
 * one. Returns 1 when a stop string has been hit (the text is cut before it;
 * once hit, further pieces are ignored), 0 when not, -1 when out of memory
 * (T unchanged: the piece is lost). Does not move the release mark. */
int nm_stop_text_append(nm_stop_text *t, const char *piece, size_t len);
/* Moves the release mark as far as it may go and returns it: to the end of
 * the text when FINAL (no more pieces will come) or after a stop string, else
 * to before the tail that could still start a stop string, backed off to the
 * start of a UTF-8 character (an incomplete last character included). Never
 * moves back. */
size_t nm_stop_text_release(nm_stop_text *t, int final);
/* Frees what T owns and zeroes it; safe on a zeroed or freed T. */
void nm_stop_text_free(nm_stop_text *t);

#endif
