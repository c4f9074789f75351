/* tile_amx_impl.h - the body of the AMX-INT8 tile GEMM (tile.h:
 * nm_tile_gemm_many), one text included twice: by tile_amx.c, where the
 * six tile operations below are the AMX instructions, and by
 * tile_amx_emu_avx512.c (NM_AMX_EMULATE), where they are plain C following
 * Intel's definitions. Everything else (unpacking, scales, the float steps)
 * is the same AVX-512 code in both, so a test on a CPU without AMX runs
 * every line of the kernel except the tile unit itself, and that unit is
 * small enough to check against the SDM by eye.
 *
 * Why AMX fits the tile layout unchanged (tile.h, NM_TILE_LAYOUT 2). An AMX
 * B operand is in "VNNI format": K/4 rows of N dwords, row k, dword n = the
 * 4 bytes of column n at K positions 4k .. 4k + 3. Q4_K vector 8c + d holds,
 * for weight row r, bytes 4r .. 4r + 3 whose low nibbles are quants
 * 64c + 4d + i (sub-block 2c) and high nibbles 64c + 32 + 4d + i (sub-block
 * 2c + 1). So with N = the 16 weight rows and K = the 32 quants of a
 * sub-block, B row d of sub-block 2c is vector 8c + d AND 0x0F, of sub-block
 * 2c + 1 the same vector >> 4 AND 0x0F: the VNNI kernel's unpack gives B
 * rows, and 64 quants of chunk c (sub-blocks 2c, 2c + 1) are one 16-row B
 * tile. A is 16 activation rows' Q8_K quants, loaded in place (tileloadd
 * takes a row stride); TDPBSUD (A signed, B unsigned) adds A . B into C,
 * 16 tokens x 16 rows. Q4_K's sub-block scales go into B (the scale split
 * at amx_gemm_many_q4_K), so a block is 8 full TDPBSUD per 16 tokens and
 * two C tiles. Q5_0: a block's 32 quants are K, B row k the 4 quants
 * 4k + i: low nibbles of vector 4h + k (k < 4) or high nibbles of vector
 * 4h + k - 4, plus 16 under the high-bit mask 8h + k; one TDPBSUD per block.
 *
 * Numbers: the integer parts are exact (int32, far from overflow), so their
 * order is free; the float steps per block and token are tile.h's, in its
 * order, with the instructions the VNNI kernel uses (cvtdq2ps, mul, fnmadd,
 * fmadd): the result equals nm_tile_dot_ref bit for bit, whatever nx or the
 * tiling of tokens (tests/unit/test_tile.c; on a Xeon with AMX too).
 *
 * Tokens go in tiles of 16 (A and C rows); a last partial tile runs in a
 * second pass under a configuration with fewer rows (loading a full 16
 * would read past the caller's rows). Per pass each block's B tiles are
 * unpacked once into a 64-byte aligned stack buffer and serve every token
 * tile of the pass. Tile registers: tmm0-3 C, tmm4-5 A, tmm6-7 B.
 *
 * Measured on a 16-core Xeon with AMX (the GPU box), 256 tokens x one V3
 * expert matrix (2048 x 7168 Q4_K): 13-28 ms on one thread against 23-45 for
 * the VNNI tiles (the box's figures moved 2x between runs; the ratio held at
 * 1.5-1.8x), 1.7-1.9 ms against 2.2-2.35 on 16; 5-11% of the TDPBSUD peak
 * of 5 TOPS a core. Tried and slower there: one TDPBSUD per sub-block (K = 32,
 * 8 C tiles to store and fold per block: 1.5x slower), that with the fold
 * pipelined one step behind through double buffers (slower still), and
 * software prefetch of the next block's activation rows (2x slower). */
#ifndef NUMOE_KERNELS_TILE_AMX_IMPL_H
#define NUMOE_KERNELS_TILE_AMX_IMPL_H

#include <immintrin.h>
#include <stddef.h>
#include <string.h>

#include "kernels/dot_simd.h"
#include "kernels/quant.h"
#include "kernels/tile.h"
#include "kernels/tile_layout.h"

/* The 64-byte operand of LDTILECFG, palette 1 (Intel SDM vol. 2, LDTILECFG):
 * byte 0 palette, 1 start_row, 16-47 bytes per row of tiles 0-15, 48-63
 * rows of tiles 0-15; the rest must be 0. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;
_Static_assert(sizeof(amx_tilecfg) == 64, "LDTILECFG reads 64 bytes");

#ifdef NM_AMX_EMULATE
/* ---- the tile unit in plain C --------------------------------------------
 *
 * Intel SDM vol. 2 (TILELOADD, TILESTORED, TILEZERO, TDPBSUD) and the
 * intrinsics guide, palette 1: 8 tiles of 16 rows x 64 bytes; a tile's
 * configured rows x colsb is its shape.
 *   LDTILECFG: takes the shapes, zeroes every tile.
 *   TILELOADD t, [base + stride]: row r < rows = colsb bytes at base + r *
 *     stride; the rest of each row, and rows >= rows, become 0.
 *   TILESTORED [base + stride], t: row r < rows -> colsb bytes at base + r *
 *     stride.
 *   TILEZERO t: 0.
 *   TDPBSUD c, a, b: for m < c.rows, n < c.colsb / 4:
 *     c[m].dword[n] += sum over k < a.colsb / 4, i < 4 of
 *     SignExtend(a[m].byte[4k + i]) * ZeroExtend(b[k].byte[4n + i]),
 *     in 32-bit wrap-around arithmetic (no saturation); the rest of c is
 *     zeroed. #UD unless c.colsb == b.colsb, a.colsb / 4 == b.rows and
 *     c.rows == a.rows (here: a trap, as the instruction's fault would be).
 * The sums are done in uint32_t: wrap-around without signed overflow. */
typedef struct {
    uint8_t t[8][16][64];
    uint16_t colsb[8];
    uint8_t rows[8];
} amx_emu;

static void amx_emu_config(amx_emu *e, const amx_tilecfg *c) {
    if (c->palette != 1) __builtin_trap();
    memset(e->t, 0, sizeof e->t);
    for (int i = 0; i < 8; i++) {
        if (c->colsb[i] > 64 || c->rows[i] > 16) __builtin_trap();
        e->colsb[i] = c->colsb[i], e->rows[i] = c->rows[i];
    }
}

static void amx_emu_load(amx_emu *e, int t, const void *base, long stride) {
    memset(e->t[t], 0, sizeof e->t[t]);
    for (int r = 0; r < e->rows[t]; r++) memcpy(e->t[t][r], (const uint8_t *)base + (long)r * stride, e->colsb[t]);
}

static void amx_emu_store(const amx_emu *e, int t, void *base, long stride) {
    for (int r = 0; r < e->rows[t]; r++) memcpy((uint8_t *)base + (long)r * stride, e->t[t][r], e->colsb[t]);
}

static void amx_emu_zero(amx_emu *e, int t) { memset(e->t[t], 0, sizeof e->t[t]); }

static void amx_emu_dpbsud(amx_emu *e, int c, int a, int b) {
    if (e->colsb[c] != e->colsb[b] || e->colsb[a] / 4 != e->rows[b] || e->rows[c] != e->rows[a]) __builtin_trap();
    uint8_t out[16][64] = {{0}};
    for (int m = 0; m < e->rows[c]; m++)
        for (int n = 0; n < e->colsb[c] / 4; n++) {
            uint32_t acc;
            memcpy(&acc, &e->t[c][m][4 * n], 4);
            for (int k = 0; k < e->colsb[a] / 4; k++)
                for (int i = 0; i < 4; i++)
                    acc += (uint32_t)((int32_t)(int8_t)e->t[a][m][4 * k + i] * (int32_t)e->t[b][k][4 * n + i]);
            memcpy(&out[m][4 * n], &acc, 4);
        }
    memcpy(e->t[c], out, sizeof out);
}

#define AMX_STATE amx_emu amx_emu_
#define AMX_CONFIG(cfg) amx_emu_config(&amx_emu_, (cfg))
#define AMX_LOAD(t, base, stride) amx_emu_load(&amx_emu_, (t), (base), (long)(stride))
#define AMX_STORE(t, base, stride) amx_emu_store(&amx_emu_, (t), (base), (long)(stride))
#define AMX_ZERO(t) amx_emu_zero(&amx_emu_, (t))
#define AMX_DPBSUD(c, a, b) amx_emu_dpbsud(&amx_emu_, (c), (a), (b))
#define AMX_RELEASE() ((void)amx_emu_)
#define AMX_FN(name) name##_emu

#else
/* ---- the tile unit itself -------------------------------------------------
 *
 * GCC's tile intrinsics are asm statements that name neither the memory
 * they read (tileloadd, ldtilecfg: only 8 bytes of the config) nor the
 * memory they write (tilestored), so without a compiler barrier the stores
 * that fill a B buffer could be dropped as dead, or the loads of a stored C
 * hoisted above the store. Each operation that touches memory is fenced by
 * an empty asm with a "memory" clobber (no instruction, only ordering).
 * Tile numbers must be literal digits (the intrinsics paste them). */
#define AMX_BARRIER() __asm__ __volatile__("" ::: "memory")
#define AMX_STATE ((void)0)
#define AMX_CONFIG(cfg)                                                                                        \
    do {                                                                                                   \
        AMX_BARRIER();                                                                                     \
        _tile_loadconfig(cfg);                                                                             \
    } while (0)
#define AMX_LOAD(t, base, stride)                                                                              \
    do {                                                                                                   \
        AMX_BARRIER();                                                                                     \
        _tile_loadd(t, (base), (long)(stride));                                                            \
    } while (0)
#define AMX_STORE(t, base, stride)                                                                             \
    do {                                                                                                   \
        _tile_stored(t, (base), (long)(stride));                                                           \
        AMX_BARRIER();                                                                                     \
    } while (0)
#define AMX_ZERO(t) _tile_zero(t)
#define AMX_DPBSUD(c, a, b) _tile_dpbsud(c, a, b)
#define AMX_RELEASE() _tile_release()
#define AMX_FN(name) name
#endif

/* The token passes of a call of nx tokens: pass 0 takes [0, full) in tiles
 * of 16, pass 1 the rest [full, nx) as one tile of fewer rows (mrows);
 * 0 when the pass has no tokens. */
static inline int amx_pass(int pass, int nx, int *lo, int *hi, int *mrows) {
    const int full = nx / 16 * 16;
    *lo = pass ? full : 0, *hi = pass ? nx : full, *mrows = pass ? nx - full : 16;
    return *lo < *hi;
}

/* C tiles (tmm0-3): mrows tokens x 16 rows' dwords; A (tmm4-5): mrows
 * tokens x k bytes; B (tmm6-7): k / 4 rows (VNNI format) x 64 bytes (16
 * weight rows). k = 64 for Q4_K, 32 for Q5_0. */
static inline void amx_config_for(amx_tilecfg *cfg, int mrows, int k) {
    memset(cfg, 0, sizeof *cfg);
    cfg->palette = 1;
    for (int i = 0; i < 4; i++) cfg->colsb[i] = 64, cfg->rows[i] = (uint8_t)mrows;
    for (int i = 4; i < 6; i++) cfg->colsb[i] = (uint16_t)k, cfg->rows[i] = (uint8_t)mrows;
    for (int i = 6; i < 8; i++) cfg->colsb[i] = 64, cfg->rows[i] = (uint8_t)(k / 4);
}

static inline float amx_load_f32(const void *p) {
    float v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline int32_t amx_load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The float side of one (block, token tile) of Q4_K: per token, I from the
 * two stored C tiles (I = C_lo + 8 C_hi, below), M from the bsum pairs
 * (aux) and the mins, then tile.h's three float steps into acc. */
static inline __attribute__((always_inline)) void amx_q4_K_fold(const uint8_t *B, const int32_t (*c)[16][16],
                                                                const uint8_t *x, size_t xs, const uint8_t *aux,
                                                                size_t as, int64_t b, int m0, int mt,
                                                                float (*acc)[16]) {
    __m512i mp[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        mp[i] = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(B + Q4K_M + 32 * i)));
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(B + Q4K_D)));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(B + Q4K_DMIN)));
    const size_t xoff = (size_t)b * sizeof(block_q8_K) + offsetof(block_q8_K, d);
    for (int m = 0; m < mt; m++) {
        const int j = m0 + m;
        const __m512i I = _mm512_add_epi32(_mm512_load_si512(c[0][m]), _mm512_slli_epi32(_mm512_load_si512(c[1][m]), 3));
        const uint8_t *aj = aux + (size_t)j * as + (size_t)b * 16;
        __m512i M = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) M = _mm512_dpwssd_epi32(M, mp[i], _mm512_set1_epi32(amx_load_i32(aj + 4 * i)));
        __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(I), d);
        t = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(M), dmin, t);
        const float xd = amx_load_f32(x + (size_t)j * xs + xoff);
        _mm512_store_ps(acc[j], _mm512_fmadd_ps(t, _mm512_set1_ps(xd), _mm512_load_ps(acc[j])));
    }
}

/* Q4_K, with the sub-block scales inside B. A TDPBSUD per sub-block (K =
 * 32) would leave 8 C tiles per block and token tile to store and fold with
 * 8 vpmulld per token. Instead each 6-bit scale is split, sc = lo + 8 hi
 * (lo, hi in 0..7), and B carries q * lo or q * hi: at most 15 * 7 = 105,
 * still one unsigned byte. Then
 *   I = sum_j sc_j S_j = sum_l (q_l lo_j(l)) x_l + 8 sum_l (q_l hi_j(l)) x_l,
 * exactly, two sums over the whole block that the tile unit accumulates at
 * K = 64 (chunk c: sub-blocks 2c and 2c + 1, A the 64 contiguous quants
 * 64c .. 64c + 63, B rows 0-7 the low nibbles of vectors 8c + d, rows 8-15
 * the high ones), into two C tiles per token tile: 8 full-width TDPBSUD per
 * block and token tile, 2 stores, and I = C_lo + 8 C_hi per token (|C| <=
 * 256 * 105 * 128 < 2^22: no overflow). Products q * lo come from one
 * vpmulld of the quant dword by the row's scale: its 4 bytes times a
 * number < 17 carry nothing into each other. Token tiles go two at a time
 * (four C tiles: each A load serves two products, each B load two). */
static void AMX_FN(amx_gemm_many_q4_K)(int64_t n, const void *tile, const void *xv, size_t xs, const void *auxv,
                                       size_t as, int nx, float *out, size_t ldo) {
    AMX_STATE;
    _Alignas(64) amx_tilecfg cfg;
    _Alignas(64) uint8_t wlo[4][16][64], whi[4][16][64]; /* B of chunk c: q * lo, q * hi of their sub-block */
    _Alignas(64) int32_t cb[2][2][16][16];               /* [token tile of a pair][lo, hi][token][row] */
    _Alignas(64) float acc[NM_TILE_MANY][16];
    const uint8_t *x = xv, *aux = auxv;
    const __m512i m4 = _mm512_set1_epi8(0x0F), m7 = _mm512_set1_epi32(7);
    const int64_t nb = n / NM_QK_K;
    for (int j = 0; j < nx; j++) _mm512_store_ps(acc[j], _mm512_setzero_ps());
    for (int pass = 0; pass < 2; pass++) {
        int lo, hi, mrows;
        if (!amx_pass(pass, nx, &lo, &hi, &mrows)) continue;
        amx_config_for(&cfg, mrows, 64);
        AMX_CONFIG(&cfg);
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *B = (const uint8_t *)tile + (size_t)b * Q4K_BLOCK;
            nm_prefetch_weights(B, Q4K_BLOCK);
            __m512i sl[8], sh[8];
#pragma GCC unroll 8
            for (int s = 0; s < 8; s++) {
                const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(B + Q4K_SC + 16 * s)));
                sl[s] = _mm512_and_si512(sc, m7), sh[s] = _mm512_srli_epi32(sc, 3);
            }
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
#pragma GCC unroll 8
                for (int d = 0; d < 8; d++) {
                    const __m512i p = _mm512_loadu_si512(B + (size_t)(8 * c + d) * 64);
                    const __m512i ql = _mm512_and_si512(p, m4), qh = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
                    _mm512_store_si512(wlo[c][d], _mm512_mullo_epi32(ql, sl[2 * c]));
                    _mm512_store_si512(wlo[c][8 + d], _mm512_mullo_epi32(qh, sl[2 * c + 1]));
                    _mm512_store_si512(whi[c][d], _mm512_mullo_epi32(ql, sh[2 * c]));
                    _mm512_store_si512(whi[c][8 + d], _mm512_mullo_epi32(qh, sh[2 * c + 1]));
                }
            const size_t xoff = (size_t)b * sizeof(block_q8_K) + offsetof(block_q8_K, qs);
            for (int m0 = lo; m0 < hi;) {
                const uint8_t *A = x + (size_t)m0 * xs + xoff;
                if (hi - m0 >= 32) { /* two full token tiles: C tmm0-1 (first), tmm2-3 (second) */
                    const uint8_t *A2 = A + 16 * xs;
                    AMX_ZERO(0);
                    AMX_ZERO(1);
                    AMX_ZERO(2);
                    AMX_ZERO(3);
                    for (int c = 0; c < 4; c++) {
                        AMX_LOAD(4, A + 64 * c, xs);
                        AMX_LOAD(6, wlo[c], 64);
                        AMX_DPBSUD(0, 4, 6);
                        AMX_LOAD(7, whi[c], 64);
                        AMX_DPBSUD(1, 4, 7);
                        AMX_LOAD(5, A2 + 64 * c, xs);
                        AMX_DPBSUD(2, 5, 6);
                        AMX_DPBSUD(3, 5, 7);
                    }
                    AMX_STORE(0, cb[0][0], 64);
                    AMX_STORE(1, cb[0][1], 64);
                    AMX_STORE(2, cb[1][0], 64);
                    AMX_STORE(3, cb[1][1], 64);
                    amx_q4_K_fold(B, (const int32_t (*)[16][16])cb[0], x, xs, aux, as, b, m0, 16, acc);
                    amx_q4_K_fold(B, (const int32_t (*)[16][16])cb[1], x, xs, aux, as, b, m0 + 16, 16, acc);
                    m0 += 32;
                } else { /* one token tile, full or the last partial one (the chunk loop again
                          * with tmm0-1 only: tile numbers are immediates of the instructions) */
                    const int mt = hi - m0 < 16 ? hi - m0 : 16;
                    AMX_ZERO(0);
                    AMX_ZERO(1);
                    for (int c = 0; c < 4; c++) {
                        AMX_LOAD(4, A + 64 * c, xs);
                        AMX_LOAD(6, wlo[c], 64);
                        AMX_DPBSUD(0, 4, 6);
                        AMX_LOAD(7, whi[c], 64);
                        AMX_DPBSUD(1, 4, 7);
                    }
                    AMX_STORE(0, cb[0][0], 64);
                    AMX_STORE(1, cb[0][1], 64);
                    amx_q4_K_fold(B, (const int32_t (*)[16][16])cb[0], x, xs, aux, as, b, m0, mt, acc);
                    m0 += mt;
                }
            }
        }
    }
    AMX_RELEASE();
    for (int j = 0; j < nx; j++) _mm512_storeu_ps(out + (size_t)j * ldo, _mm512_load_ps(acc[j]));
}

/* Q5_0: a block is one K = 32 product, so blocks go four at a time (the
 * four C tiles), each block's B unpacked with its 16s added under the
 * high-bit masks; S starts at the aux's -16 * sum x, and the float step per
 * block runs in block order for each token. */
static void AMX_FN(amx_gemm_many_q5_0)(int64_t n, const void *tile, const void *xv, size_t xs, const void *auxv,
                                       size_t as, int nx, float *out, size_t ldo) {
    AMX_STATE;
    _Alignas(64) amx_tilecfg cfg;
    _Alignas(64) uint8_t wb[4][8][64];
    _Alignas(64) int32_t cb[4][16][16];
    _Alignas(64) float acc[NM_TILE_MANY][16];
    const uint8_t *x = xv, *aux = auxv;
    const int64_t nb = n / NM_QK5_0;
    for (int j = 0; j < nx; j++) _mm512_store_ps(acc[j], _mm512_setzero_ps());
    for (int pass = 0; pass < 2; pass++) {
        int lo, hi, mrows;
        if (!amx_pass(pass, nx, &lo, &hi, &mrows)) continue;
        amx_config_for(&cfg, mrows, 32);
        AMX_CONFIG(&cfg);
        for (int64_t b0 = 0; b0 < nb; b0 += 4) {
            const int g = nb - b0 < 4 ? (int)(nb - b0) : 4;
            __m512 dw[4];
            for (int q = 0; q < g; q++) {
                const int64_t b = b0 + q;
                const uint8_t *P = (const uint8_t *)tile + (size_t)(b / 2) * Q50_PAIR;
                const int h = (int)(b % 2);
                if (!h) nm_prefetch_weights(P, Q50_PAIR);
#pragma GCC unroll 4
                for (int d = 0; d < 4; d++) {
                    __m512i wl, wh;
                    nm_tile_q5_0_unpack(P, h, d, &wl, &wh);
                    _mm512_store_si512(wb[q][d], wl);
                    _mm512_store_si512(wb[q][4 + d], wh);
                }
                dw[q] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(P + Q50_D + 32 * h)));
            }
            for (int m0 = lo; m0 < hi; m0 += 16) {
                /* A of block b0 + q: 32 bytes of qs, sizeof(block_q8_0) further per block */
                const uint8_t *A = x + (size_t)m0 * xs + (size_t)b0 * sizeof(block_q8_0) + offsetof(block_q8_0, qs);
                AMX_LOAD(4, A, xs);
                AMX_LOAD(6, wb[0], 64);
                AMX_ZERO(0);
                AMX_DPBSUD(0, 4, 6);
                if (g > 1) {
                    AMX_LOAD(5, A + sizeof(block_q8_0), xs);
                    AMX_LOAD(7, wb[1], 64);
                    AMX_ZERO(1);
                    AMX_DPBSUD(1, 5, 7);
                }
                if (g > 2) {
                    AMX_LOAD(4, A + 2 * sizeof(block_q8_0), xs);
                    AMX_LOAD(6, wb[2], 64);
                    AMX_ZERO(2);
                    AMX_DPBSUD(2, 4, 6);
                }
                if (g > 3) {
                    AMX_LOAD(5, A + 3 * sizeof(block_q8_0), xs);
                    AMX_LOAD(7, wb[3], 64);
                    AMX_ZERO(3);
                    AMX_DPBSUD(3, 5, 7);
                }
                AMX_STORE(0, cb[0], 64);
                if (g > 1) AMX_STORE(1, cb[1], 64);
                if (g > 2) AMX_STORE(2, cb[2], 64);
                if (g > 3) AMX_STORE(3, cb[3], 64);
                const int mt = hi - m0 < 16 ? hi - m0 : 16;
                for (int m = 0; m < mt; m++) {
                    const int j = m0 + m;
                    const uint8_t *aj = aux + (size_t)j * as;
                    __m512 a = _mm512_load_ps(acc[j]);
                    for (int q = 0; q < g; q++) {
                        const int64_t b = b0 + q;
                        const __m512i S = _mm512_add_epi32(_mm512_load_si512(cb[q][m]),
                                                           _mm512_set1_epi32(amx_load_i32(aj + 8 * b)));
                        const float dx = amx_load_f32(aj + 8 * b + 4);
                        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S), _mm512_mul_ps(dw[q], _mm512_set1_ps(dx)), a);
                    }
                    _mm512_store_ps(acc[j], a);
                }
            }
        }
    }
    AMX_RELEASE();
    for (int j = 0; j < nx; j++) _mm512_storeu_ps(out + (size_t)j * ldo, _mm512_load_ps(acc[j]));
}

static nm_tile_many_fn AMX_FN(amx_many_table)(int type) {
    switch (type) {
    case NM_TYPE_Q4_K: return AMX_FN(amx_gemm_many_q4_K);
    case NM_TYPE_Q5_0: return AMX_FN(amx_gemm_many_q5_0);
    default: return NULL;
    }
}

#endif
