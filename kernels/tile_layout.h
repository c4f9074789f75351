/* tile_layout.h - the byte offsets inside one tile block (internal): the
 * layout tile.h describes, in one place for its packer (tile.c), the VNNI
 * kernels (tile_avx512.c) and the AMX ones (tile_amx_impl.h), with the
 * AVX-512 unpacking of a Q5_0 vector that both SIMD kernels do.
 *
 * Q4_K: a block of 16 rows x 256 elements; Q5_0: a pair of blocks of 16
 * rows x 32 elements. Sizes asserted in tile.c against tile.h's. */
#ifndef NUMOE_KERNELS_TILE_LAYOUT_H
#define NUMOE_KERNELS_TILE_LAYOUT_H

enum {
    Q4K_Q = 0,                 /* 32 vectors of 16 rows x 4 qs bytes (8 nibbles) */
    Q4K_SC = 32 * 64,          /* u8 [8][16] */
    Q4K_M = Q4K_SC + 8 * 16,   /* u8 [4][16][2] */
    Q4K_D = Q4K_M + 4 * 32,    /* fp16 [16] */
    Q4K_DMIN = Q4K_D + 32,     /* fp16 [16] */
    Q4K_BLOCK = Q4K_DMIN + 32, /* 2368 */
    Q50_Q = 0,                 /* 8 vectors: block h's 4 qs dwords per row */
    Q50_H = 8 * 64,            /* u64 [16] high-bit masks */
    Q50_D = Q50_H + 16 * 8,    /* fp16 [2][16] */
    Q50_PAIR = Q50_D + 64,     /* 704 */
};

#if defined(__AVX512BW__)
#include <immintrin.h>
#include <string.h>

/* Quant vector d (0..3) of block h (0, 1) of the Q5_0 pair at P, as the
 * two 64-byte operands of its low and high nibbles (16 rows x 4 quants
 * each), 0..31: the nibbles with 16 added where the high-bit mask says. */
static inline void nm_tile_q5_0_unpack(const uint8_t *P, int h, int d, __m512i *lo, __m512i *hi) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), v16 = _mm512_set1_epi8(16);
    const __m512i p = _mm512_loadu_si512(P + (size_t)(4 * h + d) * 64);
    __mmask64 k0, k1;
    memcpy(&k0, P + Q50_H + 8 * (8 * h + d), 8);
    memcpy(&k1, P + Q50_H + 8 * (8 * h + 4 + d), 8);
    const __m512i w0 = _mm512_and_si512(p, m4), w1 = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
    *lo = _mm512_mask_add_epi8(w0, k0, w0, v16);
    *hi = _mm512_mask_add_epi8(w1, k1, w1, v16);
}
#endif

#endif
