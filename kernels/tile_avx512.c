/* tile_avx512.c - the VNNI half of tile.h: the SIMD packers and the tile
 * GEMMs. Compiled with the AVX-512 + VNNI flags (the Makefile's *_avx512
 * rule); tile.c enters it only where nm_isa_best() is AVX512-VNNI.
 *
 * GEMM: per block, 16 rows x NX activation rows; one vpdpbusd per group of
 * 4 quants (of each of the 16 rows) and activation row (the activation dword broadcast from memory),
 * then per Q4_K sub-block one vpmulld by the 16 rows' sub-block scales into
 * the block integer I, the min term M by 4 vpdpwssd, and 5 float steps per
 * block: the order tile.h fixes, so results equal nm_tile_dot_ref. NX is a
 * compile-time constant (entry points switch over nx), so the row loops
 * unroll and every accumulator is a register: at NX = 8, Q4_K holds 8
 * float accumulators, 8 block integers and 8 sub-block sums.
 *
 * Tiles are read a fixed distance ahead (nm_prefetch_weights, as the single
 * dots do): a shard's pre-packed tiles come from memory, and at NX = 1
 * (decode) the kernel is bound by how many loads one core keeps in flight
 * (a 16-core Xeon reads 16.7 GB/s per thread prefetching, 8.5 without).
 *
 * The tiles hold the quants as nibbles (tile.h), unpacked here: one AND
 * (low nibbles) or shift + AND (high) per 64-byte vector, shared by the NX
 * vpdpbusd that use it.
 *
 * Packing: the rows' quant bytes are not unpacked at all, only transposed
 * as a 16 x 16 dword matrix (16 rows x 64 bytes), which puts each row's
 * dword of a group pair in its lane. */
#include <immintrin.h>
#include <string.h>

#include "kernels/dot_simd.h"
#include "kernels/quant_unpack.h"
#include "kernels/transpose_avx512.h"
#include "kernels/tile.h"
#include "kernels/tile_layout.h"

/* offsets of rows 0..15 (row_bytes apart, < 2^31 in all), the missing ones masked */
static inline __m512i row_offsets(size_t row_bytes) {
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32((int)row_bytes));
}

/* The quant vectors are the rows' qs bytes transposed as dwords: per block,
 * 16 rows x 64 bytes (two chunks of 32) through transpose16, twice; the
 * scales and mins per row in plain C; d and dmin of the 16 rows gathered
 * as one dword each (the block starts with d, dmin) and narrowed to the
 * two fp16 vectors. */
static void pack_q4_K(int64_t n, const void *rows, size_t row_bytes, int nrows, void *tile) {
    const __mmask16 live = (__mmask16)((1u << nrows) - 1);
    const __m512i offs = row_offsets(row_bytes);
    for (int64_t b = 0; b < n / NM_QK_K; b++) {
        uint8_t *B = (uint8_t *)tile + (size_t)b * Q4K_BLOCK;
        for (int h = 0; h < 2; h++) {
            __m512i r[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) {
                const block_q4_K *blk = (const block_q4_K *)((const uint8_t *)rows + (size_t)i * row_bytes) + b;
                r[i] = i < nrows ? _mm512_loadu_si512(blk->qs + 64 * h) : _mm512_setzero_si512();
            }
            transpose16(r);
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(B + (size_t)(16 * h + i) * 64, r[i]);
        }
        uint8_t sc[8][16] = {{0}}, m[4][16][2] = {{{0}}};
        for (int i = 0; i < nrows; i++) {
            const block_q4_K *blk = (const block_q4_K *)((const uint8_t *)rows + (size_t)i * row_bytes) + b;
            int8_t s8[8], m8[8];
            nm_k4_scale_min(blk->scales, s8, m8);
            for (int j = 0; j < 8; j++) sc[j][i] = (uint8_t)s8[j];
            for (int j = 0; j < 4; j++) m[j][i][0] = (uint8_t)m8[2 * j], m[j][i][1] = (uint8_t)m8[2 * j + 1];
        }
        memcpy(B + Q4K_SC, sc, sizeof sc);
        memcpy(B + Q4K_M, m, sizeof m);
        const __m512i dd = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offs,
                                                       (const uint8_t *)rows + (size_t)b * sizeof(block_q4_K), 1);
        _mm256_storeu_si256((__m256i *)(B + Q4K_D), _mm512_cvtepi32_epi16(dd));
        _mm256_storeu_si256((__m256i *)(B + Q4K_DMIN), _mm512_cvtepi32_epi16(_mm512_srli_epi32(dd, 16)));
    }
}

/* Two Q5_0 blocks' 64 quants (0..31) of one row; the second zero if !two.
 * (The row-major GEMV's unpacking, not the tile's.) */
static inline __m512i q5_0_2x32(const block_q5_0 *b, int two) {
    const __m128i a = _mm_loadu_si128((const __m128i *)b[0].qs);
    const __m128i c = two ? _mm_loadu_si128((const __m128i *)b[1].qs) : _mm_setzero_si128();
    const __m256i t = _mm256_set_m128i(c, a);
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(t), _mm256_srli_epi16(t, 4), 1);
    __m512i u = _mm512_and_si512(_mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(0x0F));
    uint32_t h0, h1 = 0;
    memcpy(&h0, b[0].qh, 4);
    if (two) memcpy(&h1, b[1].qh, 4);
    return _mm512_mask_add_epi8(u, (__mmask64)((uint64_t)h1 << 32 | h0), u, _mm512_set1_epi8(16));
}

/* Per two pairs of blocks (4 blocks): each row's 4 x 16 qs bytes as one
 * vector through transpose16 (vectors 0-7 the first pair's, 8-15 the
 * second's); per block the 16 rows' qh gathered as dwords (lane r = row r),
 * and mask g's byte 4r + i tested for bit 4g + i of lane r: a byte shuffle
 * puts qh byte (4g + i) / 8 of each lane in place, vptestmb picks the bit. */
static void pack_q5_0(int64_t n, const void *rows, size_t row_bytes, int nrows, void *tile) {
    const int64_t nb = n / NM_QK5_0;
    const __mmask16 live = (__mmask16)((1u << nrows) - 1);
    const __m512i offs = row_offsets(row_bytes);
    /* per group g: shuffle index (byte 4r + i <- byte 4r + (4g + i) / 8) and bit (1 << (4g + i) % 8) */
    __m512i sel[8], bit[8];
    for (int g = 0; g < 8; g++) {
        uint8_t si[64], bi[64];
        for (int k = 0; k < 64; k++) {
            const int r = k / 4, i = k % 4;
            si[k] = (uint8_t)((r % 4) * 4 + (4 * g + i) / 8); /* vpshufb indexes within a 128-bit lane */
            bi[k] = (uint8_t)(1u << ((4 * g + i) % 8));
        }
        sel[g] = _mm512_loadu_si512(si), bit[g] = _mm512_loadu_si512(bi);
    }
    for (int64_t b = 0; b < nb; b += 4) {
        const int nblk = nb - b < 4 ? (int)(nb - b) : 4;
        uint8_t *P0 = (uint8_t *)tile + (size_t)(b / 2) * Q50_PAIR;
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            const block_q5_0 *blk = (const block_q5_0 *)((const uint8_t *)rows + (size_t)i * row_bytes) + b;
            __m512i v = _mm512_setzero_si512();
            if (i < nrows) {
                v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)blk[0].qs));
                if (nblk > 1) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)blk[1].qs), 1);
                if (nblk > 2) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)blk[2].qs), 2);
                if (nblk > 3) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)blk[3].qs), 3);
            }
            r[i] = v;
        }
        transpose16(r);
        for (int k = 0; k < (nblk > 2 ? 2 : 1); k++) {
            uint8_t *P = P0 + (size_t)k * Q50_PAIR;
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) _mm512_storeu_si512(P + (size_t)i * 64, r[8 * k + i]);
            uint64_t hb[16] = {0};
            uint16_t d[32] = {0};
            for (int h = 0; h < 2 && 2 * k + h < nblk; h++) {
                const uint8_t *base = (const uint8_t *)rows + (size_t)(b + 2 * k + h) * sizeof(block_q5_0);
                const __m512i dq = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offs, base, 1);
                const __m512i qh = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offs, base + 2, 1);
                _mm256_storeu_si256((__m256i *)(d + 16 * h), _mm512_cvtepi32_epi16(dq));
                for (int g = 0; g < 8; g++)
                    hb[8 * h + g] = (uint64_t)_mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, sel[g]), bit[g]);
            }
            memcpy(P + Q50_H, hb, sizeof hb);
            memcpy(P + Q50_D, d, sizeof d);
        }
    }
}

static inline __m512i bcast32(const void *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

/* Per chunk c of a Q4_K block the 8 quant vectors serve two sub-blocks:
 * their low nibbles sub-block 2c, their high nibbles 2c + 1. Each sub-block
 * is one pass over the 8 vectors (reloaded from L1 for the second: at
 * NX = 8 the 8 sums, 8 block integers and 8 float accumulators already
 * take 24 of the 32 registers), one AND or shift + AND per vector, then
 * NX vpdpbusd. Integer sums are exact, so their order is free; the float
 * steps are tile.h's. */
static inline __attribute__((always_inline)) void gemm_q4_K_nx(int NX, int64_t n, const void *tile,
                                                                const void *const *x, const void *const *aux,
                                                                float *out) {
    const block_q8_K *bx[NM_TILE_NX];
    const int32_t *ax[NM_TILE_NX];
    __m512 acc[NM_TILE_NX];
    const __m512i m4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) bx[j] = x[j], ax[j] = aux[j], acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / NM_QK_K; b++) {
        const uint8_t *B = (const uint8_t *)tile + (size_t)b * Q4K_BLOCK;
        nm_prefetch_weights(B, Q4K_BLOCK);
        __m512i I[NM_TILE_NX], S[NM_TILE_NX];
#pragma GCC unroll 8
        for (int j = 0; j < NX; j++) I[j] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++)
#pragma GCC unroll 2
        for (int hi = 0; hi < 2; hi++) {
            const int s = 2 * c + hi;
#pragma GCC unroll 8
            for (int j = 0; j < NX; j++) S[j] = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int d = 0; d < 8; d++) {
                const __m512i p = _mm512_loadu_si512(B + (size_t)(8 * c + d) * 64);
                const __m512i w = _mm512_and_si512(hi ? _mm512_srli_epi16(p, 4) : p, m4);
                const int g = 16 * c + 8 * hi + d; /* the group: activation bytes 4g .. 4g + 3 */
#pragma GCC unroll 8
                for (int j = 0; j < NX; j++) S[j] = _mm512_dpbusd_epi32(S[j], w, bcast32(bx[j][b].qs + 4 * g));
            }
            const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(B + Q4K_SC + 16 * s)));
#pragma GCC unroll 8
            for (int j = 0; j < NX; j++) I[j] = _mm512_add_epi32(I[j], _mm512_mullo_epi32(S[j], sc));
        }
#pragma GCC unroll 8
        for (int j = 0; j < NX; j++) S[j] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            const __m512i mp = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(B + Q4K_M + 32 * i)));
#pragma GCC unroll 8
            for (int j = 0; j < NX; j++) S[j] = _mm512_dpwssd_epi32(S[j], mp, _mm512_set1_epi32(ax[j][4 * b + i]));
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(B + Q4K_D)));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(B + Q4K_DMIN)));
#pragma GCC unroll 8
        for (int j = 0; j < NX; j++) {
            __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(I[j]), d);
            t = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(S[j]), dmin, t);
            acc[j] = _mm512_fmadd_ps(t, _mm512_set1_ps(bx[j][b].d), acc[j]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) _mm512_storeu_ps(out + 16 * j, acc[j]);
}

/* Per Q5_0 block: 4 quant vectors, each giving group d (low nibbles) and
 * group 4 + d (high), 16 added under the group's high-bit mask; S starts
 * at the aux's -16 * sum x. */
static inline __attribute__((always_inline)) void gemm_q5_0_nx(int NX, int64_t n, const void *tile,
                                                                const void *const *x, const void *const *aux,
                                                                float *out) {
    const block_q8_0 *bx[NM_TILE_NX];
    const int32_t *ax[NM_TILE_NX];
    __m512 acc[NM_TILE_NX];
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) bx[j] = x[j], ax[j] = aux[j], acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / NM_QK5_0; b++) {
        const uint8_t *P = (const uint8_t *)tile + (size_t)(b / 2) * Q50_PAIR;
        const int h = (int)(b % 2);
        if (!h) nm_prefetch_weights(P, Q50_PAIR);
        __m512i S[NM_TILE_NX];
#pragma GCC unroll 8
        for (int j = 0; j < NX; j++) S[j] = _mm512_set1_epi32(ax[j][2 * b]);
#pragma GCC unroll 4
        for (int d = 0; d < 4; d++) {
            __m512i wl, wh;
            nm_tile_q5_0_unpack(P, h, d, &wl, &wh);
#pragma GCC unroll 8
            for (int j = 0; j < NX; j++) S[j] = _mm512_dpbusd_epi32(S[j], wl, bcast32(bx[j][b].qs + 4 * d));
#pragma GCC unroll 8
            for (int j = 0; j < NX; j++) S[j] = _mm512_dpbusd_epi32(S[j], wh, bcast32(bx[j][b].qs + 16 + 4 * d));
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(P + Q50_D + 32 * h)));
#pragma GCC unroll 8
        for (int j = 0; j < NX; j++) {
            float dx;
            memcpy(&dx, &ax[j][2 * b + 1], sizeof dx);
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S[j]), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[j]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) _mm512_storeu_ps(out + 16 * j, acc[j]);
}

#define TILE_NX(body)                                                                                          \
    switch (nx) {                                                                                              \
    case 1: body(1, n, tile, x, aux, out); break;                                                              \
    case 2: body(2, n, tile, x, aux, out); break;                                                              \
    case 3: body(3, n, tile, x, aux, out); break;                                                              \
    case 4: body(4, n, tile, x, aux, out); break;                                                              \
    case 5: body(5, n, tile, x, aux, out); break;                                                              \
    case 6: body(6, n, tile, x, aux, out); break;                                                              \
    case 7: body(7, n, tile, x, aux, out); break;                                                              \
    case 8: body(8, n, tile, x, aux, out); break;                                                              \
    default: break;                                                                                            \
    }
static_assert(NM_TILE_NX == 8, "TILE_NX lists every nx up to NM_TILE_NX");

static void gemm_q4_K(int64_t n, const void *tile, const void *const *x, const void *const *aux, int nx, float *out) {
    TILE_NX(gemm_q4_K_nx)
}
static void gemm_q5_0(int64_t n, const void *tile, const void *const *x, const void *const *aux, int nx, float *out) {
    TILE_NX(gemm_q5_0_nx)
}

nm_tile_pack_fn nm_tile_pack_vnni(int type) {
    switch (type) {
    case NM_TYPE_Q4_K: return pack_q4_K;
    case NM_TYPE_Q5_0: return pack_q5_0;
    default: return NULL;
    }
}

nm_tile_gemm_fn nm_tile_gemm_vnni(int type) {
    switch (type) {
    case NM_TYPE_Q4_K: return gemm_q4_K;
    case NM_TYPE_Q5_0: return gemm_q5_0;
    default: return NULL;
    }
}

/* ---- one activation row straight from the row-major weights ---------------
 *
 * Decode routes one token to an expert, and packing a tile costs more than
 * the one product it would serve. These kernels read 16 rows as they are
 * and give the same numbers: per row the integer parts are computed as the
 * single dots of dot_avx512.c do (vpdpbusd, the Q4_K sub-block scales by
 * vpackssdw + vpdpwssd, exact), the 16 rows' lane vectors transposed and
 * summed give I and M (Q5_0: S of two blocks) with rows in lanes, and the
 * float steps of tile.h run over the 16 rows at once. */

#define W2(w) ((int)((unsigned)(w) * 0x00010001u))
/* vpermw index: 128-bit lane L holds word a_L four times, then b_L */
static inline __m512i pack_words(int a0, int b0, int a1, int b1, int a2, int b2, int a3, int b3) {
    return _mm512_set_epi32(W2(b3), W2(b3), W2(a3), W2(a3), W2(b2), W2(b2), W2(a2), W2(a2), W2(b1), W2(b1), W2(a1),
                            W2(a1), W2(b0), W2(b0), W2(a0), W2(a0));
}
#undef W2

/* sum over 16 lanes of each of r[0..15] -> lane i: the sum of r[i]'s lanes
 * 0-7 in *lo and of lanes 8-15 in *hi */
static inline void lane_sums16(__m512i r[16], __m512i *lo, __m512i *hi) {
    transpose16(r);
    __m512i a = _mm512_add_epi32(_mm512_add_epi32(r[0], r[1]), _mm512_add_epi32(r[2], r[3]));
    __m512i b = _mm512_add_epi32(_mm512_add_epi32(r[4], r[5]), _mm512_add_epi32(r[6], r[7]));
    __m512i c = _mm512_add_epi32(_mm512_add_epi32(r[8], r[9]), _mm512_add_epi32(r[10], r[11]));
    __m512i d = _mm512_add_epi32(_mm512_add_epi32(r[12], r[13]), _mm512_add_epi32(r[14], r[15]));
    *lo = _mm512_add_epi32(a, b);
    *hi = _mm512_add_epi32(c, d);
}

/* Blocks per pass of the row-major kernels: phase 1 streams each row's
 * blocks in order (one stream at a time, prefetched as the single dots
 * do: 16 rows read block by block ran at half speed), keeping the lane
 * vectors of GEMV_CHUNK blocks x 16 rows (16 KiB) in L1 for phase 2. */
#define GEMV_CHUNK 16

static void gemv_q4_K(int64_t n, const void *rows, size_t row_bytes, int nrows, const void *xv, const void *aux,
                      float *out) {
    (void)aux;
    const block_q8_K *bx = xv;
    const __mmask16 live = (__mmask16)((1u << nrows) - 1);
    const __m512i offs = row_offsets(row_bytes);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i nib_shift = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(4), 1);
    const __m512i ctl0 = pack_words(0, 2, 0, 2, 1, 3, 1, 3), ctl1 = pack_words(4, 6, 4, 6, 5, 7, 5, 7);
    const int64_t nb = n / NM_QK_K;
    __m512 acc = _mm512_setzero_ps();
    __m512i F[GEMV_CHUNK][16];
    for (int64_t b0 = 0; b0 < nb; b0 += GEMV_CHUNK) {
        const int64_t b1 = b0 + GEMV_CHUNK < nb ? b0 + GEMV_CHUNK : nb;
        for (int i = 0; i < 16; i++) {
            if (i >= nrows) {
                for (int64_t b = b0; b < b1; b++) F[b - b0][i] = _mm512_setzero_si512();
                continue;
            }
            const block_q4_K *row = (const block_q4_K *)((const uint8_t *)rows + (size_t)i * row_bytes);
            for (int64_t b = b0; b < b1; b++) {
                const block_q4_K *blk = &row[b];
                const block_q8_K *y = &bx[b];
                nm_prefetch_weights(blk, sizeof *blk);
                const __m128i scm = nm_k4_scales_mins(_mm_loadu_si128((const __m128i *)blk));
                const __m256i sc = _mm256_castsi128_si256(_mm_cvtepu8_epi16(scm));
                const __m512i s0 = _mm512_permutexvar_epi16(ctl0, _mm512_castsi256_si512(sc));
                const __m512i s1 = _mm512_permutexvar_epi16(ctl1, _mm512_castsi256_si512(sc));
                __m512i sumi = _mm512_setzero_si512();
#pragma GCC unroll 4
                for (int c = 0; c < 4; c += 2) {
                    const __m512i q0 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk->qs + 32 * c)));
                    const __m512i q1 =
                        _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk->qs + 32 * c + 32)));
                    const __m512i u0 = _mm512_and_si512(_mm512_srlv_epi16(q0, nib_shift), m4);
                    const __m512i u1 = _mm512_and_si512(_mm512_srlv_epi16(q1, nib_shift), m4);
                    const __m512i z = _mm512_setzero_si512();
                    const __m512i p0 = _mm512_dpbusd_epi32(z, u0, _mm512_loadu_si512(y->qs + 64 * c));
                    const __m512i p1 = _mm512_dpbusd_epi32(z, u1, _mm512_loadu_si512(y->qs + 64 * c + 64));
                    sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(p0, p1), c ? s1 : s0);
                }
                const __m256i md =
                    _mm256_madd_epi16(nm_k4_mins16(scm), _mm256_loadu_si256((const __m256i *)y->bsums));
                /* [sumi lanes 0-7 + lanes 8-15 | md]: lanes 0-7 sum to I, 8-15 to M */
                const __m512i t = _mm512_shuffle_i64x2(sumi, _mm512_castsi256_si512(md), _MM_SHUFFLE(1, 0, 3, 2));
                F[b - b0][i] = _mm512_mask_add_epi32(t, 0x00FF, t, sumi);
            }
        }
        for (int64_t b = b0; b < b1; b++) {
            __m512i I, M;
            lane_sums16(F[b - b0], &I, &M);
            const __m512i dd = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offs,
                                                           (const uint8_t *)rows + (size_t)b * sizeof(block_q4_K), 1);
            const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dd));
            const __m512 dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dd, 16)));
            __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(I), d);
            t = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(M), dmin, t);
            acc = _mm512_fmadd_ps(t, _mm512_set1_ps(bx[b].d), acc);
        }
    }
    _mm512_storeu_ps(out, acc);
}

static void gemv_q5_0(int64_t n, const void *rows, size_t row_bytes, int nrows, const void *xv, const void *aux,
                      float *out) {
    const block_q8_0 *bx = xv;
    const int32_t *ax = aux;
    const __mmask16 live = (__mmask16)((1u << nrows) - 1);
    const __m512i offs = row_offsets(row_bytes);
    const int64_t nb = n / NM_QK5_0, np = (nb + 1) / 2; /* pairs of blocks */
    __m512 acc = _mm512_setzero_ps();
    __m512i F[GEMV_CHUNK][16];
    for (int64_t p0 = 0; p0 < np; p0 += GEMV_CHUNK) {
        const int64_t p1 = p0 + GEMV_CHUNK < np ? p0 + GEMV_CHUNK : np;
        for (int i = 0; i < 16; i++) {
            if (i >= nrows) {
                for (int64_t p = p0; p < p1; p++) F[p - p0][i] = _mm512_setzero_si512();
                continue;
            }
            const block_q5_0 *row = (const block_q5_0 *)((const uint8_t *)rows + (size_t)i * row_bytes);
            for (int64_t p = p0; p < p1; p++) {
                const int64_t b = 2 * p;
                const int two = b + 1 < nb;
                nm_prefetch_weights(&row[b], 2 * sizeof *row);
                const __m512i y =
                    _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)bx[b].qs)),
                                       two ? _mm256_loadu_si256((const __m256i *)bx[b + 1].qs) : _mm256_setzero_si256(),
                                       1);
                F[p - p0][i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q5_0_2x32(&row[b], two), y);
            }
        }
        for (int64_t p = p0; p < p1; p++) {
            const int64_t b = 2 * p;
            __m512i S0, S1;
            lane_sums16(F[p - p0], &S0, &S1);
            /* the -16 offsets: -16 * sum x of each block, as the aux holds it */
            S0 = _mm512_add_epi32(S0, _mm512_set1_epi32(ax[2 * b]));
            const __m512i d0 = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offs,
                                                           (const uint8_t *)rows + (size_t)b * sizeof(block_q5_0), 1);
            float dx;
            memcpy(&dx, &ax[2 * b + 1], sizeof dx);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S0),
                                  _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(d0)), _mm512_set1_ps(dx)), acc);
            if (b + 1 < nb) {
                S1 = _mm512_add_epi32(S1, _mm512_set1_epi32(ax[2 * b + 2]));
                const __m512i d1 = _mm512_mask_i32gather_epi32(
                    _mm512_setzero_si512(), live, offs, (const uint8_t *)rows + (size_t)(b + 1) * sizeof(block_q5_0), 1);
                memcpy(&dx, &ax[2 * b + 3], sizeof dx);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S1),
                                      _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(d1)), _mm512_set1_ps(dx)),
                                      acc);
            }
        }
    }
    _mm512_storeu_ps(out, acc);
}

nm_tile_gemv_fn nm_tile_gemv_vnni(int type) {
    switch (type) {
    case NM_TYPE_Q4_K: return gemv_q4_K;
    case NM_TYPE_Q5_0: return gemv_q5_0;
    default: return NULL;
    }
}
