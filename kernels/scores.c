/* scores.c - attention scores of a block (scores.h): the scalar reference
 * and the choice of path. */
#include "kernels/scores.h"

#include "kernels/quant.h"
#include "kernels/scores_impl.h"

void nm_scores_ref(int64_t n, const float *const *q, const float *const *k, float *out) { scores_generic(n, q, k, out); }

nm_scores_fn nm_scores(void) {
    const nm_isa isa = nm_isa_best();
    return isa >= NM_ISA_AVX512 ? nm_scores_avx512 : isa >= NM_ISA_AVX2 ? nm_scores_avx2 : nm_scores_ref;
}
