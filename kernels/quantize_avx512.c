/* quantize_avx512.c - the activation quantisers Q8_K and Q8_0 with AVX-512
 * (quant.h nm_quant_q8_K_avx512 / nm_quant_q8_0_avx512).
 *
 * Why: every matmul of quantised weights quantises its activations first
 * (kernels/matmul.c, kernels/moe.c); the scalar loops call lrintf per element
 * and took ~11% of a 512-token CPU prefill (perf on the development VM).
 *
 * Numbers: the same bytes as the scalar reference (quantize.c) for finite
 * inputs, bit for bit: the same float products, the same rounding (Q8_K:
 * round half to even, which is what the vector conversion does in the default
 * rounding mode, as lrintf; Q8_0: half away from zero, decided exactly from
 * v - trunc(v) as quantize.c's round_away does), the same clamp and the same
 * scale (the first element of largest magnitude for Q8_K's signed d). */
#include <immintrin.h>
#include <string.h>

#include "kernels/fp16.h"
#include "kernels/quant.h"

/* The largest |x| of n (a multiple of 16) floats. */
static float absmax16(const float *x, int n) {
    __m512 m = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
    return _mm512_reduce_max_ps(m);
}

void nm_quant_q8_K_avx512(const float *x, void *dst, int64_t nb) {
    block_q8_K *y = dst;
    for (int64_t i = 0; i < nb; i++, x += NM_QK_K) {
        const float amax = absmax16(x, NM_QK_K);
        if (amax == 0) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        /* the first element of that magnitude, with its sign */
        float vmax = 0;
        const __m512 va = _mm512_set1_ps(amax);
        for (int j = 0; j < NM_QK_K; j += 16) {
            const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + j)), va, _CMP_EQ_OQ);
            if (hit) {
                vmax = x[j + __builtin_ctz(hit)];
                break;
            }
        }
        const float iscale = -127.f / vmax;
        const __m512 vs = _mm512_set1_ps(iscale);
        const __m512i top = _mm512_set1_epi32(127);
        for (int g = 0; g < NM_QK_K / 16; g++) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(vs, _mm512_loadu_ps(x + 16 * g)));
            q = _mm512_min_epi32(q, top);
            _mm_storeu_si128((__m128i *)(y[i].qs + 16 * g), _mm512_cvtepi32_epi8(q));
            y[i].bsums[g] = (int16_t)_mm512_reduce_add_epi32(q);
        }
        y[i].d = 1 / iscale;
    }
}

void nm_quant_q8_0_avx512(const float *x, void *dst, int64_t nb) {
    block_q8_0 *y = dst;
    const __m512 half = _mm512_set1_ps(0.5f), mhalf = _mm512_set1_ps(-0.5f);
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t i = 0; i < nb; i++, x += NM_QK8_0) {
        const float d = absmax16(x, NM_QK8_0) / 127;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        y[i].d = nm_fp32_to_fp16(d);
        const __m512 vid = _mm512_set1_ps(id);
        for (int j = 0; j < NM_QK8_0; j += 16) {
            const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + j), vid);
            __m512i q = _mm512_cvttps_epi32(v);
            const __m512 f = _mm512_sub_ps(v, _mm512_cvtepi32_ps(q));
            q = _mm512_mask_add_epi32(q, _mm512_cmp_ps_mask(f, half, _CMP_GE_OQ), q, one);
            q = _mm512_mask_sub_epi32(q, _mm512_cmp_ps_mask(f, mhalf, _CMP_LE_OQ), q, one);
            _mm_storeu_si128((__m128i *)(y[i].qs + j), _mm512_cvtepi32_epi8(q));
        }
    }
}
