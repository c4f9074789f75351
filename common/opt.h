/* opt.h - the one parser of numbers given on command lines (and in the
 * environment): every option of every numoe command goes through these, so
 * "what counts as an integer" and the wording of the complaint are the same
 * everywhere.
 *
 * Syntax: what strtoll / strtod / strtoull accept (optional leading blanks
 * and sign, decimal digits), the whole string, in range. */
#ifndef NUMOE_COMMON_OPT_H
#define NUMOE_COMMON_OPT_H

#include <stdint.h>

/* The integer at *s (followed by anything) into *out when it lies in
 * [lo, hi]; *s moves past it. 0, or -1 with *s unchanged (no number there,
 * out of range). For lists: the caller handles the separators. */
int nm_parse_int_at(const char **s, long long lo, long long hi, long long *out);
/* V (may be NULL) as a whole integer in [lo, hi]. 0, or -1; prints nothing. */
int nm_parse_int(const char *v, long long lo, long long hi, long long *out);

/* The value V of option OPT of command CMD, checked as above; on failure one
 * line on stderr, "CMD: OPT needs an integer in LO..HI (got 'V')", and -1. */
int nm_opt_int(const char *cmd, const char *opt, const char *v, long long lo, long long hi, long long *out);
/* A number in [lo, hi] (NaN never is): "CMD: OPT needs a number in [LO, HI]
 * (got 'V')" on failure. */
int nm_opt_float(const char *cmd, const char *opt, const char *v, double lo, double hi, float *out);
/* A non-negative integer up to 2^64 - 1 (seeds): "CMD: OPT needs a
 * non-negative integer (got 'V')" on failure. */
int nm_opt_u64(const char *cmd, const char *opt, const char *v, uint64_t *out);

#endif
