/* error.h - errors as values: a function that can fail takes an nm_err *,
 * fills it with one line of context (file, tensor, layer, field) and returns
 * -1. Callers add their own context in front with nm_err_prefix and pass the
 * error up; only main() prints it. Nothing in a library exits the process. */
#ifndef NUMOE_COMMON_ERROR_H
#define NUMOE_COMMON_ERROR_H

#include <stddef.h>

typedef struct {
    char msg[1024];
} nm_err;

/* Formats into e (if non-NULL) and returns -1 so callers can `return nm_errf(...)`. */
int nm_errf(nm_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prepends "prefix: " to the message already in e; returns -1. */
int nm_err_prefix(nm_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
