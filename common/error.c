#include "common/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int nm_errf(nm_err *e, const char *fmt, ...) {
    if (!e) return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return -1;
}

int nm_err_prefix(nm_err *e, const char *fmt, ...) {
    if (!e) return -1;
    char prefix[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    /* shift the old message right and put "prefix: " in front (truncating the tail) */
    size_t cap = sizeof e->msg, np = strlen(prefix) + 2, nold = strnlen(e->msg, cap - 1);
    if (np >= cap) np = cap - 1;
    if (nold > cap - 1 - np) nold = cap - 1 - np;
    memmove(e->msg + np, e->msg, nold);
    e->msg[np + nold] = 0;
    memcpy(e->msg, prefix, np - 2);
    e->msg[np - 2] = ':';
    e->msg[np - 1] = ' ';
    return -1;
}
