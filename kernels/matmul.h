/* matmul.h - multi-threaded GEMV / GEMM over quantised weight rows.
 *
 *   Y[i][r] = sum_k W[r][k] * X[t_i][k]     r < rows, i < n_sel
 *
 * W: rows x cols of any weight type with a dot (quant.h), rows stored
 * contiguously, nm_row_size(type, cols) bytes apart. To multiply by one
 * expert of a stacked [n_expert][rows][cols] tensor pass W = base +
 * e * rows * row_size; a row range [r0, r1) is W + r0 * row_size with
 * rows = r1 - r0 (and Y + r0). X: float32 rows, ldx floats apart. Y: float32
 * rows, ldy floats apart (ldy >= rows); Y must not overlap W or X.
 *
 * The activations are converted once per call into the weight type's
 * vec_dot_type (Q8_0 / Q8_K; F32 types use X in place). Two steps let
 * several weight matrices share one conversion (an expert's gate and up,
 * or every expert at decode):
 *
 *   nm_act a;
 *   nm_act_prepare(&ctx, pool, NM_TYPE_Q4_K, X, ldx, n_tok, cols, &a);
 *   nm_matmul_act(&ctx, pool, NM_TYPE_Q4_K, W_gate, rows, &a, NULL, n_tok, G, ldg);
 *   nm_matmul_act(&ctx, pool, NM_TYPE_Q4_K, W_up, rows, &a, tok_ids, n, U, ldu);
 *
 * Ownership: an nm_matmul_ctx owns one growable scratch buffer (64-byte
 * aligned) that holds the converted activations. An nm_act borrows it (or X
 * itself for F32 types): it stays valid until the next nm_act_prepare or
 * nm_matmul on the same ctx, or nm_matmul_ctx_free, and X must outlive it.
 * A ctx serves one thread at a time; give each concurrent caller its own.
 *
 * Threads: rows are split into chunks of about NM_MATMUL_CHUNK_BYTES of
 * weights, handed out dynamically (each thread starts on its own chunk, then
 * takes the next free one). Within a chunk, several tokens (a GEMM) go in
 * groups of NM_DOT_MULTI_MAX through the multi-row dot (quant.h), the
 * group loop outside the row loop: a row's blocks are unpacked once per
 * group rather than once per token, the group's activation rows stay in L1
 * for all the chunk's rows, and the chunk is read from memory once per call
 * and from L2 by the next groups. One token (decode) takes the single dot,
 * row by row; so does a NULL multi (nm_matmul_rows), with tokens in tiles
 * of about NM_MATMUL_TILE_BYTES of activations outside the row loop. A NULL
 * pool runs on the caller. Small problems run on the caller too, where a
 * dispatch would cost more than the work. */
#ifndef NUMOE_KERNELS_MATMUL_H
#define NUMOE_KERNELS_MATMUL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/quant.h"
#include "kernels/threadpool.h"

#define NM_MATMUL_CHUNK_BYTES (64 * 1024)
#define NM_MATMUL_TILE_BYTES (64 * 1024)

typedef struct {
    nm_isa isa;         /* dot level; nm_matmul_ctx_init sets nm_isa_best(), callers may lower it */
    /* 1: weight types with tiles (tile.h: nm_tile_usable, and isa at the
     * AVX512-VNNI level) take the tile numbers instead of nm_vec_dot's, for
     * every token count (one token: nm_tile_gemv on the rows; more: each
     * 16-row tile packed once per call into per-thread scratch, then the
     * tile GEMM over groups of NM_TILE_NX tokens). The numbers then equal
     * nm_tile_dot_ref per (row, token), still independent of the batch.
     * nm_matmul_ctx_init sets 0 (nm_vec_dot's numbers); set it before the
     * first nm_act_prepare, it decides what that derives. */
    int tiles;
    void *scratch;      /* owned, see above */
    size_t scratch_cap; /* bytes */
} nm_matmul_ctx;

/* Activation rows in some weight type's vec_dot_type. */
typedef struct {
    int type;          /* the vec_dot_type */
    int64_t cols;      /* elements per row */
    int64_t n_tok;     /* rows */
    const void *data;  /* row t starts at (const char *)data + t * stride */
    size_t stride;     /* bytes */
    /* tile aux (tile.h nm_tile_aux) of each row for weights of aux_type,
     * aux_stride bytes apart; aux_type -1 (no aux) unless ctx->tiles and
     * the prepared weight type has usable tiles */
    int aux_type;
    const void *aux;
    size_t aux_stride;
} nm_act;

void nm_matmul_ctx_init(nm_matmul_ctx *ctx);
void nm_matmul_ctx_free(nm_matmul_ctx *ctx);

/* Converts X (n_tok rows of cols floats, ldx apart) for weights of
 * weight_type, in parallel over tokens when worth it. Returns 0, or -1 if
 * the type has no dot, cols is not a multiple of its block size, ldx < cols,
 * or the scratch cannot grow. */
int nm_act_prepare(nm_matmul_ctx *ctx, nm_pool *pool, int weight_type, const float *X, int64_t ldx, int64_t n_tok,
                   int64_t cols, nm_act *act);

/* Y[i][r] = W[r] . act[tok ? tok[i] : i] for i < n_sel. Returns 0, or -1 if
 * act is not in the type's vec_dot_type, a token index is out of range,
 * ldy < rows (when n_sel > 1), the type has no dot, ctx->tiles asks for
 * tiles of this type but act was prepared without its aux (prepared for
 * another weight type: mixing numbers would break batch independence), or
 * tile scratch cannot be allocated. */
int nm_matmul_act(const nm_matmul_ctx *ctx, nm_pool *pool, int type, const void *W, int64_t rows, const nm_act *act,
                  const int32_t *tok, int64_t n_sel, float *Y, int64_t ldy);

/* nm_act_prepare + nm_matmul_act over all n_tok tokens. */
int nm_matmul(nm_matmul_ctx *ctx, nm_pool *pool, int type, const void *W, int64_t rows, int64_t cols, const float *X,
              int64_t ldx, int64_t n_tok, float *Y, int64_t ldy);

/* The single-threaded core, for callers that split work themselves (for
 * example one pool task per expert): rows [r0, r1) of W (row_bytes apart)
 * against the selected tokens, Y[i * ldy + r] for absolute row r. No
 * argument checks: dot must be the weight type's dot (nm_vec_dot_for),
 * multi its multi-row dot at the same level (nm_vec_dot_multi_for) and act
 * in their vec_dot_type. Tokens go in groups of NM_DOT_MULTI_MAX through
 * multi, each group against all rows (see the top of this file); a lone
 * token goes through dot. Results equal one dot per (row, token) bit for
 * bit (see quant.h). A NULL multi uses dot throughout, which is all
 * nm_matmul_rows does. */
void nm_matmul_rows_multi(nm_vec_dot_fn dot, nm_vec_dot_multi_fn multi, const void *W, size_t row_bytes, int64_t r0,
                          int64_t r1, const nm_act *act, const int32_t *tok, int64_t n_sel, float *Y, int64_t ldy);
void nm_matmul_rows(nm_vec_dot_fn dot, const void *W, size_t row_bytes, int64_t r0, int64_t r1, const nm_act *act,
                    const int32_t *tok, int64_t n_sel, float *Y, int64_t ldy);

#endif
