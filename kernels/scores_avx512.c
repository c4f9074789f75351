/* scores_avx512.c - attention scores of a block (scores.h) with AVX-512:
 * 16 zmm accumulators, one per (query, key) pair, whose lanes are the 16
 * partials; per 16-column chunk the 4 query and 4 key segments are loaded
 * once each and multiplied pairwise (FMA: fmaf's rounding), the last chunk
 * masked (zeros). Then the 16 accumulators are transposed, so that vector
 * l holds partial l of every pair, and the vectors summed in scores.h's
 * tree: lane g * 4 + i is that pair's score. */
#include <immintrin.h>

#include "kernels/scores.h"
#include "kernels/transpose_avx512.h"

_Static_assert(NM_SCORES_Q * NM_SCORES_K == 16, "one zmm of results");

void nm_scores_avx512(int64_t n, const float *const *q, const float *const *k, float *out) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < n; c0 += 16) {
        const int64_t left = n - c0;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 qv[NM_SCORES_Q], kv[NM_SCORES_K];
        for (int g = 0; g < NM_SCORES_Q; g++) qv[g] = _mm512_maskz_loadu_ps(m, q[g] + c0);
        for (int i = 0; i < NM_SCORES_K; i++) kv[i] = _mm512_maskz_loadu_ps(m, k[i] + c0);
        for (int g = 0; g < NM_SCORES_Q; g++)
            for (int i = 0; i < NM_SCORES_K; i++) acc[g * NM_SCORES_K + i] = _mm512_fmadd_ps(qv[g], kv[i], acc[g * NM_SCORES_K + i]);
    }
    __m512i r[16]; /* the transpose moves dwords: the floats' bits as they are */
    for (int j = 0; j < 16; j++) r[j] = _mm512_castps_si512(acc[j]);
    transpose16(r);
    for (int j = 0; j < 16; j++) acc[j] = _mm512_castsi512_ps(r[j]);
    const __m512 a = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    const __m512 b = _mm512_add_ps(_mm512_add_ps(acc[4], acc[5]), _mm512_add_ps(acc[6], acc[7]));
    const __m512 c = _mm512_add_ps(_mm512_add_ps(acc[8], acc[9]), _mm512_add_ps(acc[10], acc[11]));
    const __m512 d = _mm512_add_ps(_mm512_add_ps(acc[12], acc[13]), _mm512_add_ps(acc[14], acc[15]));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}
