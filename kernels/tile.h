/* tile.h - weight rows repacked 16 at a time for the expert GEMM (VNNI).
 *
 * The multi-row dots (quant.h) still reduce every (row, token) pair on its
 * own: per 256 Q4_K elements and token, 4 vpdpbusd and about 10 more
 * instructions to apply sub-block scales inside the vector and fold it.
 * A tile interleaves 16 weight rows so that one 64-byte vector holds 4
 * consecutive quants of each row: one vpdpbusd with 4 activation bytes
 * broadcast then adds 4 products to each of 16 rows' sums, the lanes are
 * rows, and the sub-block scales and block scales are vectors over rows
 * that apply to whole sums (no horizontal step, nothing per token but the
 * multiplies and one scale step per sub-block).
 *
 * Numbers (the contract every path here keeps, bit for bit). Per
 * (row, token) the integer parts are exact and the float steps run block
 * by block in one fixed order, so the value depends on the row and the
 * activation row only, never on how many tokens or rows a call holds:
 *   Q4_K (x in Q8_K):  per block, I = sum_j sc_j * sum_{l in j} q_l x_l,
 *                      M = sum_j m_j * (bsums[2j] + bsums[2j + 1]);
 *                      t = (float)I * d;  t = fmaf(-(float)M, dmin, t);
 *                      acc = fmaf(t, x.d, acc)
 *   Q5_0 (x in Q8_0):  per block, S = sum_l (q_l - 16) x_l;
 *                      acc = fmaf((float)S, d * x.d, acc)
 * starting from acc = 0. nm_tile_dot_ref computes this in plain C from the
 * original row; nm_tile_gemm must equal it exactly (tests/unit/test_tile.c).
 * These differ from nm_vec_dot's rounding, so a caller that mixes the two
 * for one matrix must not expect batch-independent bits: nm_moe_forward
 * uses the tiles for every token count or not at all.
 *
 * Layouts (NM_TILE_LAYOUT; per 16-row tile, block after block; every part
 * 64-byte sized and placed, so a tile is as big as its rows plus a few
 * per cent: a shard holds tiles instead of rows, kernels/moe.h):
 *   Q4_K block, 2368 bytes (16 rows: 2304; 1.028x):
 *     q[32][16 rows][4]   vector 8c + d, row r: the row's qs bytes
 *                         32c + 4d .. 32c + 4d + 3 as they are: low nibbles
 *                         quants 64c + 4d + i (group 16c + d, sub-block 2c),
 *                         high nibbles 64c + 32 + 4d + i (group 16c + 8 + d,
 *                         sub-block 2c + 1) | sc[8][16] u8 (6-bit scales) |
 *     m[4][16][2] u8 (m_{2i}, m_{2i+1}: zero-extended to words, the int16
 *     pairs of the min term) | d[16] fp16 | dmin[16] fp16
 *   Q5_0, per pair of blocks, 704 bytes (16 rows x 2 blocks: 704; 1.0x;
 *   an odd last block's pair is padded with a zero block):
 *     q[8][16 rows][4]    vector 4h + d, row r: block h's qs bytes 4d .. 4d+3:
 *                         low nibbles quants 4d + i (group d), high nibbles
 *                         16 + 4d + i (group 4 + d) |
 *     hb[16] u64          mask 8h + g, bit 4r + i: the high bit (qh) of quant
 *                         4g + i of row r in block h |
 *     d[2][16] fp16
 * The GEMM unpacks a quant vector with one AND (low nibbles) or one shift
 * and AND (high), and for Q5_0 adds 16 under the high-bit mask, once per
 * 64 bytes and call for up to NM_TILE_NX activation rows; scales widen by
 * one vpmovzx, fp16 converts exactly. Rows past nrows are zero (their
 * results are 0 and meant to be ignored). The packing is a pure function
 * of the rows, so tiles packed once give every later call the bits of
 * tiles packed per call.
 *
 * Activation side: nm_tile_aux derives per block what the kernel would
 * otherwise recompute for every tile (Q4_K: the bsum pairs as int16 pairs;
 * Q5_0: -16 * sum x and x.d as float), once per activation row. */
#ifndef NUMOE_KERNELS_TILE_H
#define NUMOE_KERNELS_TILE_H

#include <stddef.h>
#include <stdint.h>

#define NM_TILE_ROWS 16
#define NM_TILE_NX 8 /* activation rows per nm_tile_gemm call, at most */
/* The tile layout above; a persistent shard of tiles records it (worker/shard.c),
 * so a change here must bump it and an old segment is rebuilt, not reused. */
#define NM_TILE_LAYOUT 2

/* 1 if the type has tiles and this CPU (nm_isa_best(): NUMOE_ISA lowers it)
 * runs them: Q4_K and Q5_0 at the AVX512-VNNI level. */
int nm_tile_usable(int type);
/* Bytes of one tile of rows of n elements (a multiple of 64: tiles of a
 * matrix lie back to back); of one activation row's aux. */
size_t nm_tile_size(int type, int64_t n);
size_t nm_tile_aux_size(int type, int64_t n);

/* Packs rows 0..nrows-1 (nrows <= 16) of a row-major matrix (rows
 * row_bytes apart) into tile (nm_tile_size bytes, 64-byte aligned).
 * nm_tile_pack is the SIMD packer (only where nm_tile_usable), _ref the
 * plain C one; both write the same bytes. */
void nm_tile_pack(int type, int64_t n, const void *rows, size_t row_bytes, int nrows, void *tile);
void nm_tile_pack_ref(int type, int64_t n, const void *rows, size_t row_bytes, int nrows, void *tile);

/* A matrix of nrows rows as tiles (what kernels/moe.h calls pre-packed):
 * tile t = rows [16t, min(16t + 16, nrows)) packed as above, the tiles
 * back to back. _size is its bytes; _pack writes it with nm_tile_pack
 * (only where nm_tile_usable). */
size_t nm_tile_matrix_size(int type, int64_t n, int64_t nrows);
void nm_tile_pack_matrix(int type, int64_t n, const void *rows, size_t row_bytes, int64_t nrows, void *dst);

/* aux of one activation row x (in the type's vec_dot_type). */
void nm_tile_aux(int type, int64_t n, const void *x, void *aux);

/* out[j * 16 + r] = row r of the tile . x[j], for j < nx (1..NM_TILE_NX),
 * aux[j] = nm_tile_aux of x[j]. Only where nm_tile_usable. */
void nm_tile_gemm(int type, int64_t n, const void *tile, const void *const *x, const void *const *aux, int nx,
                  float *out);

/* out[r] = row r . x for rows 0..nrows-1 (nrows <= 16; out[r] = 0 for the
 * others) of a row-major matrix, no tile needed: the numbers of
 * nm_tile_gemm for one activation row, cheaper than packing when a tile
 * would serve a single row (decode). Only where nm_tile_usable. */
void nm_tile_gemv(int type, int64_t n, const void *rows, size_t row_bytes, int nrows, const void *x, const void *aux,
                  float *out);

/* The same number for one original row w (the scalar reference). */
float nm_tile_dot_ref(int type, int64_t n, const void *w, const void *x);

/* The SIMD half (tile_avx512.c, compiled with the VNNI flags: call only
 * where nm_isa_supported(NM_ISA_AVX512_VNNI)); NULL for other types. */
typedef void (*nm_tile_pack_fn)(int64_t n, const void *rows, size_t row_bytes, int nrows, void *tile);
typedef void (*nm_tile_gemm_fn)(int64_t n, const void *tile, const void *const *x, const void *const *aux, int nx,
                                float *out);
typedef void (*nm_tile_gemv_fn)(int64_t n, const void *rows, size_t row_bytes, int nrows, const void *x,
                                const void *aux, float *out);
nm_tile_pack_fn nm_tile_pack_vnni(int type);
nm_tile_gemv_fn nm_tile_gemv_vnni(int type);
nm_tile_gemm_fn nm_tile_gemm_vnni(int type);

/* ---- many activation rows: Intel AMX-INT8 ----------------------------------
 *
 * Prefill hands an expert tens to hundreds of tokens. nm_tile_gemm_many
 * takes up to NM_TILE_MANY activation rows at once, as rows a fixed stride
 * apart (the tile unit loads 16 rows of a strided matrix per instruction,
 * so a caller with scattered rows gathers them first: kernels/moe.c), and
 * runs on the AMX tile unit where nm_tile_amx_usable, else as nm_tile_gemm
 * calls (VNNI) in groups of NM_TILE_NX. The same tiles, the same aux, the
 * same numbers: per (row, activation row) tile.h's contract above, equal to
 * nm_tile_dot_ref bit for bit, so a caller may pick either path per call
 * (moe.c picks by token count) without changing one bit of a result.
 *
 * The AMX kernel (tile_amx.c, body tile_amx_impl.h) reads the same
 * NM_TILE_LAYOUT 2 bytes: a sub-block's 8 quant vectors, each ANDed to its
 * nibbles, are exactly 8 rows of an AMX B tile (VNNI format, 16 weight rows
 * as columns); 16 activation rows' quants are the A tile; TDPBSUD (A
 * signed, B unsigned) gives 16 x 16 integer sums. Q4_K's sub-block scales
 * enter B split as sc = lo + 8 hi (q * lo, q * hi fit a byte), so the
 * block integer I = C_lo + 8 C_hi is exact; the float steps are the VNNI
 * kernel's. */
#define NM_TILE_MANY 64 /* activation rows per nm_tile_gemm_many call, at most */

/* out[j * ldo + r] = row r of the tile . x_j for j < nx (1..NM_TILE_MANY),
 * r < 16 (ldo >= 16), where x_j = (const char *)x + j * x_stride is an
 * activation row (the type's vec_dot_type, n elements) and aux_j = (const
 * char *)aux + j * aux_stride its nm_tile_aux. Any strides (rows may
 * overlap or repeat). Only where nm_tile_usable. */
void nm_tile_gemm_many(int type, int64_t n, const void *tile, const void *x, size_t x_stride, const void *aux,
                       size_t aux_stride, int nx, float *out, size_t ldo);
/* 1 if nm_tile_gemm_many runs this type on the tile unit: Q4_K and Q5_0,
 * nm_tile_usable and nm_isa_amx() (quant.h: cpuid, XCR0, the Linux
 * permission, NUMOE_ISA), or nm_tile_amx_emulate's emulation is on. */
int nm_tile_amx_usable(int type);

typedef void (*nm_tile_many_fn)(int64_t n, const void *tile, const void *x, size_t x_stride, const void *aux,
                                size_t aux_stride, int nx, float *out, size_t ldo);
/* The AMX kernels (tile_amx.c: call only where nm_isa_amx()) and the same
 * body with the tile unit emulated in plain C (tile_amx_emu_avx512.c: call
 * only where nm_isa_supported(NM_ISA_AVX512_VNNI); slow); NULL for other
 * types. Each loads its own tile configuration per call and releases the
 * tiles at the end, so any thread may call them at any time. */
nm_tile_many_fn nm_tile_gemm_many_amx(int type);
nm_tile_many_fn nm_tile_gemm_many_amx_emu(int type);

/* Tests: on != 0 makes nm_tile_gemm_many's AMX path (and
 * nm_tile_amx_usable) the emulated kernel wherever the CPU has
 * AVX512-VNNI, so callers such as moe.c can be tested through it on a CPU
 * without AMX; 0 restores the real choice. Not for concurrent use with
 * calls in flight. nm_tile_amx_emulated_calls: calls the emulation served. */
void nm_tile_amx_emulate(int on);
long nm_tile_amx_emulated_calls(void);

/* Benchmarks: n x 4 TDPBSUD of full 16 x 64 by 64 x 16 byte tiles on
 * registers alone (no loads or stores: 131072 int8 ops per step), the tile
 * unit's peak. Only where nm_isa_amx(). */
void nm_tile_amx_spin(int64_t n);

#endif
