/* wsum.c - weighted sums of rows (wsum.h): the scalar reference and the
 * choice of path. */
#include "kernels/wsum.h"

#include "kernels/quant.h"

void nm_wsum_ref(int64_t n_rows, int nv, const float *w, int64_t ldw, const float *rows, int64_t ldr, int64_t cols,
                 float *out, int64_t ldo) {
    for (int v = 0; v < nv; v++)
        for (int64_t c = 0; c < cols; c++) {
            float o = 0.0f;
            for (int64_t p = 0; p < n_rows; p++) {
                const float prod = w[v * ldw + p] * rows[p * ldr + c];
                o = o + prod;
            }
            out[v * ldo + c] = o;
        }
}

nm_wsum_fn nm_wsum(void) { return nm_isa_best() >= NM_ISA_AVX512 ? nm_wsum_avx512 : nm_wsum_ref; }
