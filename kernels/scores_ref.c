/* scores_ref.c - scores.h's scalar reference: scores_impl.h compiled for
 * any x86-64 (fmaf may be a libm call here; the AVX2 build of the same
 * text, scores_avx2.c, is what AVX2 CPUs run). */
#include "kernels/scores_impl.h"

void nm_scores_ref(int64_t n, const float *const *q, const float *const *k, float *out) { scores_generic(n, q, k, out); }
