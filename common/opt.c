/* opt.c - see opt.h. */
#include "common/opt.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

int nm_parse_int_at(const char **s, long long lo, long long hi, long long *out) {
    char *end;
    errno = 0;
    long long x = strtoll(*s, &end, 10);
    if (end == *s || errno || x < lo || x > hi) return -1;
    *out = x;
    *s = end;
    return 0;
}

int nm_parse_int(const char *v, long long lo, long long hi, long long *out) {
    const char *p = v;
    long long x;
    if (!v || nm_parse_int_at(&p, lo, hi, &x) || *p) return -1;
    *out = x;
    return 0;
}

int nm_opt_int(const char *cmd, const char *opt, const char *v, long long lo, long long hi, long long *out) {
    if (!nm_parse_int(v, lo, hi, out)) return 0;
    fprintf(stderr, "%s: %s needs an integer in %lld..%lld (got '%s')\n", cmd, opt, lo, hi, v ? v : "");
    return -1;
}

int nm_opt_float(const char *cmd, const char *opt, const char *v, double lo, double hi, float *out) {
    char *end;
    errno = 0;
    double x = v ? strtod(v, &end) : 0;
    if (!v || *end || end == v || errno || !(x >= lo && x <= hi)) {
        fprintf(stderr, "%s: %s needs a number in [%g, %g] (got '%s')\n", cmd, opt, lo, hi, v ? v : "");
        return -1;
    }
    *out = (float)x;
    return 0;
}

int nm_opt_u64(const char *cmd, const char *opt, const char *v, uint64_t *out) {
    char *end;
    errno = 0;
    /* strtoull takes "-1" as 2^64 - 1: a sign is refused before it looks */
    unsigned long long u = v && *v != '-' ? strtoull(v, &end, 10) : 0;
    if (!v || *v == '-' || *end || end == v || errno) {
        fprintf(stderr, "%s: %s needs a non-negative integer (got '%s')\n", cmd, opt, v ? v : "");
        return -1;
    }
    *out = u;
    return 0;
}
