/* scores_avx2.c - scores.h's reference compiled with AVX2 + FMA (the
 * Makefile's *_avx2 rule): the same text (scores_impl.h), so the same bits,
 * without a libm call per multiply where the CPU has no AVX-512. */
#include "kernels/scores_impl.h"

void nm_scores_avx2(int64_t n, const float *const *q, const float *const *k, float *out) { scores_generic(n, q, k, out); }
