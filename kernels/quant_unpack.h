/* quant_unpack.h - one definition of each block's bit layout (internal).
 *
 * Each nm_unpack_* turns one block into its integer quants in element order
 * plus its integer sub-block scales (and mins). dequant.c multiplies them out
 * in float the way ggml does; dot_ref.c multiplies them with Q8 activations in
 * integers. Sharing the unpacking keeps the two from disagreeing about where a
 * bit lives. Layouts: ggml-common.h / ggml-quants.c (llama.cpp), the block
 * structs in quant.h, the types in docs/MODEL.md §4. */
#ifndef NUMOE_KERNELS_QUANT_UNPACK_H
#define NUMOE_KERNELS_QUANT_UNPACK_H

#include <stdint.h>

#include "kernels/quant.h"

/* The 32 fifth bits of Q5_0/Q5_1, little-endian regardless of the host. */
static inline uint32_t nm_qh32(const uint8_t qh[4]) {
    return (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
}

/* Legacy 32-blocks: byte j holds element j (low nibble) and j+16 (high). */
static inline void nm_unpack_nibbles32(const uint8_t qs[16], int offset, int8_t q[32]) {
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)((qs[j] & 0x0F) - offset);
        q[j + 16] = (int8_t)((qs[j] >> 4) - offset);
    }
}

/* Fifth bit of element j is bit j of qh. */
static inline void nm_unpack_5bit32(const uint8_t qs[16], const uint8_t qh[4], int offset, int8_t q[32]) {
    const uint32_t h = nm_qh32(qh);
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)(((qs[j] & 0x0F) | ((h >> j) & 1u) << 4) - offset);
        q[j + 16] = (int8_t)(((qs[j] >> 4) | ((h >> (j + 16)) & 1u) << 4) - offset);
    }
}

/* Q4_0: q in [-8, 7]. */
static inline void nm_unpack_q4_0(const block_q4_0 *b, int8_t q[32]) { nm_unpack_nibbles32(b->qs, 8, q); }
/* Q4_1: q in [0, 15], value d*q + m. */
static inline void nm_unpack_q4_1(const block_q4_1 *b, int8_t q[32]) { nm_unpack_nibbles32(b->qs, 0, q); }
/* Q5_0: q in [-16, 15]. */
static inline void nm_unpack_q5_0(const block_q5_0 *b, int8_t q[32]) { nm_unpack_5bit32(b->qs, b->qh, 16, q); }
/* Q5_1: q in [0, 31], value d*q + m. */
static inline void nm_unpack_q5_1(const block_q5_1 *b, int8_t q[32]) { nm_unpack_5bit32(b->qs, b->qh, 0, q); }

/* The 2-bit planes shared by Q2_K and Q3_K: two halves of 128 elements; in
 * half n, bit pair 2j of qs[32n + l] is element 128n + 32j + l (l < 32). */
static inline void nm_unpack_2bit256(const uint8_t qs[64], int8_t q[256]) {
    for (int n = 0; n < 2; n++)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) q[128 * n + 32 * j + l] = (int8_t)((qs[32 * n + l] >> (2 * j)) & 3);
}

/* Q2_K: q in [0, 3]; 16 sub-blocks of 16 with 4-bit scale (low nibble) and
 * 4-bit min (high nibble); value d*sc*q - dmin*m. */
static inline void nm_unpack_q2_K(const block_q2_K *b, int8_t q[256], int8_t sc[16], int8_t m[16]) {
    nm_unpack_2bit256(b->qs, q);
    for (int s = 0; s < 16; s++) {
        sc[s] = (int8_t)(b->scales[s] & 0x0F);
        m[s] = (int8_t)(b->scales[s] >> 4);
    }
}

/* Q3_K: q in [-4, 3] = low 2 bits - 4 unless the element's hmask bit (bit
 * i/32 of hmask[i%32]) is set; 16 sub-blocks of 16 with 6-bit scales stored
 * as 4 low bits (scales[0..7], two per byte) and 2 high bits (scales[8..11],
 * four per byte), biased by 32; value d*sc*q. */
static inline void nm_unpack_q3_K(const block_q3_K *b, int8_t q[256], int8_t sc[16]) {
    nm_unpack_2bit256(b->qs, q);
    for (int i = 0; i < 256; i++)
        if (!((b->hmask[i % 32] >> (i / 32)) & 1)) q[i] = (int8_t)(q[i] - 4);
    for (int s = 0; s < 16; s++) {
        const int lo = (s < 8 ? b->scales[s] : b->scales[s - 8] >> 4) & 0x0F;
        const int hi = (b->scales[8 + s % 4] >> (2 * (s / 4))) & 3;
        sc[s] = (int8_t)((lo | hi << 4) - 32);
    }
}

/* Q4_K/Q5_K 6-bit scale and min of sub-block j (ggml get_scale_min_k4):
 * bytes 0-3 hold scales 0-3, bytes 4-7 mins 0-3 (low 6 bits each); scales and
 * mins 4-7 take their low 4 bits from the nibbles of bytes 8-11 and their top
 * 2 bits from the spare top bits of bytes 0-3 (scales) and 4-7 (mins). */
static inline void nm_k4_scale_min(const uint8_t s[12], int8_t sc[8], int8_t m[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = (int8_t)(s[j] & 63);
        m[j] = (int8_t)(s[j + 4] & 63);
        sc[j + 4] = (int8_t)((s[j + 8] & 0x0F) | (s[j] >> 6) << 4);
        m[j + 4] = (int8_t)((s[j + 8] >> 4) | (s[j + 4] >> 6) << 4);
    }
}

/* Q4_K: q in [0, 15]; byte qs[32c + l] holds element 64c + l (low nibble)
 * and 64c + 32 + l (high); 8 sub-blocks of 32; value d*sc*q - dmin*m. */
static inline void nm_unpack_q4_K(const block_q4_K *b, int8_t q[256], int8_t sc[8], int8_t m[8]) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = (int8_t)(b->qs[32 * c + l] & 0x0F);
            q[64 * c + 32 + l] = (int8_t)(b->qs[32 * c + l] >> 4);
        }
    nm_k4_scale_min(b->scales, sc, m);
}

/* Q5_K: Q4_K plus a fifth bit: bit 2c of qh[l] for element 64c + l, bit
 * 2c + 1 for element 64c + 32 + l; q in [0, 31]. */
static inline void nm_unpack_q5_K(const block_q5_K *b, int8_t q[256], int8_t sc[8], int8_t m[8]) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            const int h = b->qh[l] >> (2 * c);
            q[64 * c + l] = (int8_t)((b->qs[32 * c + l] & 0x0F) | (h & 1) << 4);
            q[64 * c + 32 + l] = (int8_t)((b->qs[32 * c + l] >> 4) | (h & 2) << 3);
        }
    nm_k4_scale_min(b->scales, sc, m);
}

/* Q6_K: q in [-32, 31]; two halves of 128 elements; in half n, for l < 32:
 * ql[64n + l] low/high nibble = elements 128n + l / 128n + 64 + l,
 * ql[64n + 32 + l] low/high = 128n + 32 + l / 128n + 96 + l, and the bit
 * pairs 0, 2, 4, 6 of qh[32n + l] top up elements 128n + l, +32, +64, +96.
 * Scales are b->scales (int8, 16 sub-blocks of 16); value d*sc*q. */
static inline void nm_unpack_q6_K(const block_q6_K *b, int8_t q[256]) {
    for (int n = 0; n < 2; n++) {
        const uint8_t *ql = b->ql + 64 * n, *qh = b->qh + 32 * n;
        int8_t *y = q + 128 * n;
        for (int l = 0; l < 32; l++) {
            y[l] = (int8_t)(((ql[l] & 0x0F) | ((qh[l] >> 0) & 3) << 4) - 32);
            y[l + 32] = (int8_t)(((ql[l + 32] & 0x0F) | ((qh[l] >> 2) & 3) << 4) - 32);
            y[l + 64] = (int8_t)(((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32);
            y[l + 96] = (int8_t)(((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32);
        }
    }
}

#endif
