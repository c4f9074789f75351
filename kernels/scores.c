/* scores.c - attention scores of a block (scores.h): the choice of path. */
#include "kernels/scores.h"

#include "kernels/quant.h"

nm_scores_fn nm_scores(void) {
    const nm_isa isa = nm_isa_best();
    return isa >= NM_ISA_AVX512 ? nm_scores_avx512 : isa >= NM_ISA_AVX2 ? nm_scores_avx2 : nm_scores_ref;
}
