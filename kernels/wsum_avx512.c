/* wsum_avx512.c - weighted sums of rows (wsum.h) with AVX-512: for a block
 * of 16 columns, one zmm accumulator per weight vector (up to 16), each row
 * segment loaded once and multiplied into all of them (mul, then add: no
 * FMA, so the bits are the reference's); the last partial block masked. */
#include <immintrin.h>

#include "kernels/wsum.h"

void nm_wsum_avx512(int64_t n_rows, int nv, const float *w, int64_t ldw, const float *rows, int64_t ldr, int64_t cols,
                    float *out, int64_t ldo) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        const int64_t left = cols - c0;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 acc[NM_WSUM_MAX_V];
        for (int v = 0; v < nv; v++) acc[v] = _mm512_setzero_ps();
        for (int64_t p = 0; p < n_rows; p++) {
            const __m512 r = _mm512_maskz_loadu_ps(m, rows + p * ldr + c0);
            for (int v = 0; v < nv; v++)
                acc[v] = _mm512_add_ps(acc[v], _mm512_mul_ps(_mm512_set1_ps(w[v * ldw + p]), r));
        }
        for (int v = 0; v < nv; v++) _mm512_mask_storeu_ps(out + v * ldo + c0, m, acc[v]);
    }
}
