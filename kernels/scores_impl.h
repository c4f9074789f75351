/* scores_impl.h - the body of scores.h's reference, included by scores_ref.c
 * (plain C: the reference) and by scores_avx2.c (the same C compiled with
 * AVX2 + FMA, where fmaf is one instruction and the lane loop vectorises):
 * one text, so the two give the same bits by construction. */
#ifndef NUMOE_KERNELS_SCORES_IMPL_H
#define NUMOE_KERNELS_SCORES_IMPL_H

#include <math.h>
#include <stdint.h>

#include "kernels/scores.h"

/* the 16 lane partials summed in scores.h's tree */
static inline float scores_tree16(const float p[16]) {
    const float a = (p[0] + p[1]) + (p[2] + p[3]), b = (p[4] + p[5]) + (p[6] + p[7]);
    const float c = (p[8] + p[9]) + (p[10] + p[11]), d = (p[12] + p[13]) + (p[14] + p[15]);
    return (a + b) + (c + d);
}

static inline void scores_generic(int64_t n, const float *const *q, const float *const *k, float *out) {
    for (int g = 0; g < NM_SCORES_Q; g++)
        for (int i = 0; i < NM_SCORES_K; i++) {
            float p[16] = {0};
            for (int64_t c0 = 0; c0 < n; c0 += 16)
                for (int l = 0; l < 16; l++) {
                    const int64_t c = c0 + l;
                    p[l] = c < n ? fmaf(q[g][c], k[i][c], p[l]) : fmaf(0.0f, 0.0f, p[l]);
                }
            out[g * NM_SCORES_K + i] = scores_tree16(p);
        }
}

#endif
