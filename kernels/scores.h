/* scores.h - attention scores of a block: the dots of NM_SCORES_Q query
 * rows with NM_SCORES_K key rows, out[g * NM_SCORES_K + i] = q[g] . k[i].
 *
 * Why: a prefill run of decompressed MLA (coordinator/engine/cpu/forward.c)
 * scores every token of a group against every position of its context,
 * 192-wide dots. One dot at a time loads both rows for every multiply and
 * ends in a horizontal sum; a 4 x 4 block loads each row chunk once for
 * four dots and sums all 16 at once (a transpose), about 2.5x fewer
 * instructions per score.
 *
 * Numbers: per (g, i) the products go into 16 lane partials, p_l = fmaf(q[c],
 * k[c], p_l) for c = 16 j + l in ascending j from p_l = 0 (a chunk past n
 * multiplies zeros), then out = the fixed tree
 *     ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
 *   + ((p8 + p9) + (p10 + p11)) + ((p12 + p13) + (p14 + p15)),
 * on every path, bit for bit. So a pair's score depends on its two rows
 * only, never on which other rows share its block: a caller may repeat a
 * row to fill a block and drop those results.
 *
 * Layout: q[g] and k[i] point at n floats each (any alignment). */
#ifndef NUMOE_KERNELS_SCORES_H
#define NUMOE_KERNELS_SCORES_H

#include <stdint.h>

#define NM_SCORES_Q 4
#define NM_SCORES_K 4

typedef void (*nm_scores_fn)(int64_t n, const float *const *q, const float *const *k, float *out);

/* The scalar reference. */
void nm_scores_ref(int64_t n, const float *const *q, const float *const *k, float *out);
/* The reference compiled for AVX2 + FMA (kernels/scores_avx2.c); only where
 * nm_isa_supported(NM_ISA_AVX2). */
void nm_scores_avx2(int64_t n, const float *const *q, const float *const *k, float *out);
/* The AVX-512 path (kernels/scores_avx512.c); only where nm_isa_supported(NM_ISA_AVX512). */
void nm_scores_avx512(int64_t n, const float *const *q, const float *const *k, float *out);
/* The best path for this CPU at the level nm_isa_best() allows. */
nm_scores_fn nm_scores(void);

#endif
