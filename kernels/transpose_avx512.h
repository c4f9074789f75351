/* transpose_avx512.h - a 16 x 16 matrix of dwords in 16 zmm registers,
 * transposed (internal to kernels/: include only from files built with the
 * AVX-512 flags). The tile packer (tile_avx512.c) moves rows' quant dwords
 * into lanes with it, the score block (scores_avx512.c) turns 16
 * accumulators into one vector of sums. */
#ifndef NUMOE_KERNELS_TRANSPOSE_AVX512_H
#define NUMOE_KERNELS_TRANSPOSE_AVX512_H

#include <immintrin.h>

/* r[i] dword k -> r[k] dword i (standard 4-stage transpose). */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
#pragma GCC unroll 8
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* u[4g + m] lane L: rows 4g..4g+3 of column 4L + m */
#pragma GCC unroll 4
    for (int m = 0; m < 4; m++) {
        const __m512i a = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x88), b = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xDD);
        const __m512i c = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x88);
        const __m512i d = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xDD);
        r[m] = _mm512_shuffle_i32x4(a, c, 0x88);
        r[4 + m] = _mm512_shuffle_i32x4(b, d, 0x88);
        r[8 + m] = _mm512_shuffle_i32x4(a, c, 0xDD);
        r[12 + m] = _mm512_shuffle_i32x4(b, d, 0xDD);
    }
}

#endif
