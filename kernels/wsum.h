/* wsum.h - weighted sums of rows: out[v][c] = sum_p w[v][p] * rows[p][c].
 *
 * Why: in absorbed MLA every head of a token attends over the same latent
 * cache rows, so the attention output o_c of nv heads is one such sum over
 * the cache (coordinator/engine/cpu/forward.c). Done head by head, the
 * rows are streamed once per head; here each row is loaded once for all nv
 * heads, and the partial sums of a block of columns stay in registers.
 *
 * Numbers: for every element the products w[v][p] * rows[p][c] are rounded
 * on their own and added in ascending p, from 0 (no FMA), on every path, so
 * the result equals the plain loop
 *     o = 0; for p: o += w[v][p] * rows[p][c]
 * bit for bit, whatever the ISA, nv or block sizes.
 *
 * Layout: w[v] at w + v * ldw (n_rows floats), rows[p] at rows + p * ldr
 * (cols floats), out[v] at out + v * ldo. 1 <= nv <= NM_WSUM_MAX_V. */
#ifndef NUMOE_KERNELS_WSUM_H
#define NUMOE_KERNELS_WSUM_H

#include <stdint.h>

#define NM_WSUM_MAX_V 16

typedef void (*nm_wsum_fn)(int64_t n_rows, int nv, const float *w, int64_t ldw, const float *rows, int64_t ldr,
                           int64_t cols, float *out, int64_t ldo);

/* The scalar reference. */
void nm_wsum_ref(int64_t n_rows, int nv, const float *w, int64_t ldw, const float *rows, int64_t ldr, int64_t cols,
                 float *out, int64_t ldo);
/* The AVX-512 path (kernels/wsum_avx512.c); only where nm_isa_supported(NM_ISA_AVX512). */
void nm_wsum_avx512(int64_t n_rows, int nv, const float *w, int64_t ldw, const float *rows, int64_t ldr, int64_t cols,
                    float *out, int64_t ldo);
/* The best path for this CPU at the level nm_isa_best() allows. */
nm_wsum_fn nm_wsum(void);

#endif
