/* matmul.c - see matmul.h for the contract and the blocking scheme. */
#include "kernels/matmul.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/tile.h"

/* Below this many weight bytes x tokens a call runs on the caller: a pool
 * dispatch costs a few microseconds, about what 64 KB of GEMV takes. */
#define SERIAL_WORK_BYTES (64 * 1024)
/* Activation conversion goes parallel from this many elements on. */
#define PARALLEL_QUANT_ELEMS (64 * 1024)

void nm_matmul_ctx_init(nm_matmul_ctx *ctx) {
    ctx->isa = nm_isa_best();
    ctx->tiles = 0;
    ctx->scratch = NULL;
    ctx->scratch_cap = 0;
}

void nm_matmul_ctx_free(nm_matmul_ctx *ctx) {
    free(ctx->scratch);
    ctx->scratch = NULL;
    ctx->scratch_cap = 0;
}

static int grow_scratch(nm_matmul_ctx *ctx, size_t bytes) {
    if (bytes <= ctx->scratch_cap) return 0;
    /* grow geometrically so a sequence of growing batches reallocates
     * O(log) times; aligned_alloc wants a multiple of the alignment */
    size_t cap = ctx->scratch_cap ? ctx->scratch_cap : 4096;
    while (cap < bytes) {
        if (cap > SIZE_MAX / 2) return -1;
        cap *= 2;
    }
    void *p = aligned_alloc(64, cap);
    if (!p) return -1;
    free(ctx->scratch);
    ctx->scratch = p;
    ctx->scratch_cap = cap;
    return 0;
}

struct quant_job {
    int type;
    const float *X;
    int64_t ldx, n_tok, cols;
    char *dst;
    size_t stride;
    int aux_type; /* weight type whose tile aux to derive, -1: none */
    char *aux;
    size_t aux_stride;
    atomic_int failed;
};

static void quant_task(void *p, int ith, int nth) {
    struct quant_job *j = p;
    const int64_t t0 = j->n_tok * ith / nth, t1 = j->n_tok * (ith + 1) / nth;
    for (int64_t t = t0; t < t1; t++)
        if (nm_quantize_row(j->type, j->X + t * j->ldx, j->dst + (size_t)t * j->stride, j->cols) != 0)
            atomic_store(&j->failed, 1);
        else if (j->aux_type >= 0)
            nm_tile_aux(j->aux_type, j->cols, j->dst + (size_t)t * j->stride, j->aux + (size_t)t * j->aux_stride);
}

/* Whether ctx computes weights of type on tiles (matmul.h, ctx->tiles). */
static int use_tiles(const nm_matmul_ctx *ctx, int type) {
    return ctx->tiles && ctx->isa >= NM_ISA_AVX512_VNNI && nm_tile_usable(type);
}

int nm_act_prepare(nm_matmul_ctx *ctx, nm_pool *pool, int weight_type, const float *X, int64_t ldx, int64_t n_tok,
                   int64_t cols, nm_act *act) {
    const nm_type_traits *tr = nm_type_traits_of(weight_type);
    if (!tr || !tr->can_dequantize || n_tok < 0 || cols <= 0 || ldx < cols) return -1;
    if (nm_row_size(weight_type, cols) == 0) return -1;
    const int vdt = tr->vec_dot_type;
    act->type = vdt;
    act->cols = cols;
    act->n_tok = n_tok;
    act->aux_type = -1;
    act->aux = NULL;
    act->aux_stride = 0;
    if (vdt == NM_TYPE_F32) {
        act->data = X;
        act->stride = (size_t)ldx * sizeof(float);
        return 0;
    }
    const size_t row = nm_row_size(vdt, cols);
    if (row == 0) return -1;
    /* rows start on cache lines */
    const size_t stride = (row + 63) & ~(size_t)63;
    /* the tile aux rows follow the activation rows in the same scratch */
    const int aux_type = use_tiles(ctx, weight_type) ? weight_type : -1;
    const size_t aux_stride = aux_type >= 0 ? (nm_tile_aux_size(aux_type, cols) + 63) & ~(size_t)63 : 0;
    const size_t per_tok = stride + aux_stride;
    if (n_tok > 0 && per_tok > SIZE_MAX / (size_t)n_tok) return -1;
    if (grow_scratch(ctx, per_tok * (size_t)(n_tok > 0 ? n_tok : 1)) != 0) return -1;
    char *aux = aux_type >= 0 ? (char *)ctx->scratch + stride * (size_t)n_tok : NULL;
    struct quant_job j = {vdt, X, ldx, n_tok, cols, ctx->scratch, stride, aux_type, aux, aux_stride, 0};
    if (n_tok > 1 && n_tok * cols >= PARALLEL_QUANT_ELEMS)
        nm_pool_run(pool, quant_task, &j);
    else
        quant_task(&j, 0, 1);
    if (atomic_load(&j.failed)) return -1;
    act->data = ctx->scratch;
    act->stride = stride;
    act->aux_type = aux_type;
    act->aux = aux;
    act->aux_stride = aux_stride;
    return 0;
}

void nm_matmul_rows(nm_vec_dot_fn dot, const void *W, size_t row_bytes, int64_t r0, int64_t r1, const nm_act *act,
                    const int32_t *tok, int64_t n_sel, float *Y, int64_t ldy) {
    nm_matmul_rows_multi(dot, NULL, W, row_bytes, r0, r1, act, tok, n_sel, Y, ldy);
}

void nm_matmul_rows_multi(nm_vec_dot_fn dot, nm_vec_dot_multi_fn multi, const void *W, size_t row_bytes, int64_t r0,
                          int64_t r1, const nm_act *act, const int32_t *tok, int64_t n_sel, float *Y, int64_t ldy) {
    const char *w = W, *x = act->data;
    const int64_t cols = act->cols;
    if (multi && n_sel > 1) {
        /* Groups of NM_DOT_MULTI_MAX tokens, each against every row of the
         * range: the group's activation rows stay in L1 for all the rows,
         * and the range (a chunk of NM_MATMUL_CHUNK_BYTES) comes back from
         * L2 once per group; per (row, token) that is row_bytes / group
         * bytes from L2 instead of a whole activation row. A lone last
         * token takes the single dot. */
        for (int64_t t = 0; t < n_sel;) {
            const int g = n_sel - t < NM_DOT_MULTI_MAX ? (int)(n_sel - t) : NM_DOT_MULTI_MAX;
            const void *xs[NM_DOT_MULTI_MAX];
            for (int j = 0; j < g; j++) xs[j] = x + (size_t)(tok ? tok[t + j] : t + j) * act->stride;
            for (int64_t r = r0; r < r1; r++) {
                const void *wr = w + (size_t)r * row_bytes;
                if (g == 1) {
                    Y[t * ldy + r] = dot(cols, wr, xs[0]);
                    continue;
                }
                float out[NM_DOT_MULTI_MAX];
                multi(cols, wr, xs, g, out);
                for (int j = 0; j < g; j++) Y[(t + j) * ldy + r] = out[j];
            }
            t += g;
        }
        return;
    }
    int64_t tile = (int64_t)(NM_MATMUL_TILE_BYTES / act->stride);
    if (tile < 1) tile = 1;
    for (int64_t t0 = 0; t0 < n_sel; t0 += tile) {
        const int64_t t1 = t0 + tile < n_sel ? t0 + tile : n_sel;
        for (int64_t r = r0; r < r1; r++) {
            const void *wr = w + (size_t)r * row_bytes;
            for (int64_t t = t0; t < t1; t++) {
                const int64_t src = tok ? tok[t] : t;
                Y[t * ldy + r] = dot(cols, wr, x + (size_t)src * act->stride);
            }
        }
    }
}

/* One product's rows handed to the pool in chunks (both paths below): a
 * thread starts at the chunk of its own index, then takes `next`'s. */
struct mm_chunks {
    const void *W;
    size_t row_bytes;
    int64_t rows, rows_per_chunk, n_chunks;
    const nm_act *act;
    const int32_t *tok;
    int64_t n_sel;
    float *Y;
    int64_t ldy;
    atomic_llong next; /* next chunk to hand out after each thread's first */
};

/* Rows [*r0, *r1) of chunk c. */
static void chunk_rows(const struct mm_chunks *k, int64_t c, int64_t *r0, int64_t *r1) {
    *r0 = c * k->rows_per_chunk;
    *r1 = *r0 + k->rows_per_chunk < k->rows ? *r0 + k->rows_per_chunk : k->rows;
}

/* Rows per chunk: ~CHUNK_BYTES of rows, but at least one chunk per thread
 * where the rows allow (each path rounds it to its own unit). */
static int64_t chunk_size(size_t row_bytes, int64_t rows, int nth) {
    int64_t per = (int64_t)(NM_MATMUL_CHUNK_BYTES / row_bytes);
    const int64_t even = (rows + nth - 1) / nth;
    return per > even ? even : per;
}

#define FOR_EACH_CHUNK(k, ith, c, r0, r1)                                                       \
    for (int64_t c = (ith), r0, r1; c < (k)->n_chunks && (chunk_rows((k), c, &r0, &r1), 1); \
         c = atomic_fetch_add(&(k)->next, 1))

struct mm_job {
    nm_vec_dot_fn dot;
    nm_vec_dot_multi_fn multi;
    struct mm_chunks k;
};

static void mm_task(void *p, int ith, int nth) {
    (void)nth;
    struct mm_job *j = p;
    struct mm_chunks *k = &j->k;
    FOR_EACH_CHUNK(k, ith, c, r0, r1)
    nm_matmul_rows_multi(j->dot, j->multi, k->W, k->row_bytes, r0, r1, k->act, k->tok, k->n_sel, k->Y, k->ldy);
}

/* The tile path (matmul.h, ctx->tiles): chunks of whole 16-row tiles handed
 * out as in mm_task. One token: nm_tile_gemv straight from the rows (a tile
 * would serve one row only). More: the chunk's tiles are packed into the
 * thread's buffer once, then groups of NM_TILE_NX tokens run against every
 * tile of the chunk, so the group's activation rows stay in L1 and the
 * packed chunk in L2, as the multi-row path blocks. Per (row, token) the
 * value is tile.h's number whatever the grouping. */
struct tile_job {
    int type;
    size_t tile_bytes;
    atomic_int failed;
    struct mm_chunks k;
};

static void tile_task(void *p, int ith, int nth) {
    (void)nth;
    struct tile_job *j = p;
    struct mm_chunks *ck = &j->k;
    const char *w = ck->W, *x = ck->act->data, *aux = ck->act->aux;
    const int64_t cols = ck->act->cols;
    const size_t stride = ck->act->stride, aux_stride = ck->act->aux_stride;
    const size_t row_bytes = ck->row_bytes;
    const int32_t *tok = ck->tok;
    const int64_t n_sel = ck->n_sel, ldy = ck->ldy;
    float *Y = ck->Y;
    uint8_t *buf = NULL; /* the packed chunk, allocated on the first chunk that needs it */
    FOR_EACH_CHUNK(ck, ith, c, r0, r1) {
        if (n_sel == 1) {
            const int64_t src = tok ? tok[0] : 0;
            const void *xs = x + (size_t)src * stride, *as = aux + (size_t)src * aux_stride;
            for (int64_t r = r0; r < r1; r += NM_TILE_ROWS) {
                const int nr = r1 - r < NM_TILE_ROWS ? (int)(r1 - r) : NM_TILE_ROWS;
                float out[NM_TILE_ROWS];
                nm_tile_gemv(j->type, cols, w + (size_t)r * row_bytes, row_bytes, nr, xs, as, out);
                memcpy(Y + r, out, (size_t)nr * sizeof(float));
            }
            continue;
        }
        /* aligned_alloc wants a multiple of the alignment: tile_bytes is one */
        if (!buf && !(buf = aligned_alloc(64, j->tile_bytes * (size_t)(ck->rows_per_chunk / NM_TILE_ROWS)))) {
            atomic_store(&j->failed, 1);
            return;
        }
        int64_t nt = 0;
        for (int64_t r = r0; r < r1; r += NM_TILE_ROWS, nt++) {
            const int nr = r1 - r < NM_TILE_ROWS ? (int)(r1 - r) : NM_TILE_ROWS;
            nm_tile_pack(j->type, cols, w + (size_t)r * row_bytes, row_bytes, nr, buf + (size_t)nt * j->tile_bytes);
        }
        for (int64_t t = 0; t < n_sel; t += NM_TILE_NX) {
            const int g = n_sel - t < NM_TILE_NX ? (int)(n_sel - t) : NM_TILE_NX;
            const void *xs[NM_TILE_NX], *as[NM_TILE_NX];
            for (int k = 0; k < g; k++) {
                const int64_t src = tok ? tok[t + k] : t + k;
                xs[k] = x + (size_t)src * stride;
                as[k] = aux + (size_t)src * aux_stride;
            }
            for (int64_t i = 0; i < nt; i++) {
                const int64_t r = r0 + i * NM_TILE_ROWS;
                const int nr = r1 - r < NM_TILE_ROWS ? (int)(r1 - r) : NM_TILE_ROWS;
                float out[NM_TILE_NX * NM_TILE_ROWS];
                nm_tile_gemm(j->type, cols, buf + (size_t)i * j->tile_bytes, xs, as, g, out);
                for (int k = 0; k < g; k++)
                    memcpy(Y + (t + k) * ldy + r, out + k * NM_TILE_ROWS, (size_t)nr * sizeof(float));
            }
        }
    }
    free(buf);
}

static int matmul_tiles(const nm_matmul_ctx *ctx, nm_pool *pool, int type, const void *W, int64_t rows,
                        const nm_act *act, const int32_t *tok, int64_t n_sel, float *Y, int64_t ldy) {
    (void)ctx;
    const size_t row_bytes = nm_row_size(type, act->cols), tile_bytes = nm_tile_size(type, act->cols);
    const int nth = nm_pool_size(pool);
    /* chunks of whole tiles, ~CHUNK_BYTES of rows but at least one tile, and
     * at least one chunk per thread where the rows allow */
    int64_t per = chunk_size(row_bytes, rows, nth);
    per = (per + NM_TILE_ROWS - 1) / NM_TILE_ROWS * NM_TILE_ROWS;
    if (per < NM_TILE_ROWS) per = NM_TILE_ROWS;
    struct tile_job j = {.type = type, .tile_bytes = tile_bytes, .failed = 0,
                         .k = {W, row_bytes, rows, per, (rows + per - 1) / per, act, tok, n_sel, Y, ldy, nth}};
    if (nth == 1 || j.k.n_chunks == 1 || (double)rows * (double)row_bytes * (double)n_sel < SERIAL_WORK_BYTES) {
        atomic_store(&j.k.next, 1);
        tile_task(&j, 0, 1);
    } else {
        nm_pool_run(pool, tile_task, &j);
    }
    return atomic_load(&j.failed) ? -1 : 0;
}

int nm_matmul_act(const nm_matmul_ctx *ctx, nm_pool *pool, int type, const void *W, int64_t rows, const nm_act *act,
                  const int32_t *tok, int64_t n_sel, float *Y, int64_t ldy) {
    const nm_type_traits *tr = nm_type_traits_of(type);
    if (!tr || !tr->can_dequantize || (int)tr->vec_dot_type != act->type || rows < 0 || n_sel < 0) return -1;
    const size_t row_bytes = nm_row_size(type, act->cols);
    if (row_bytes == 0 || (n_sel > 1 && ldy < rows)) return -1;
    if (tok) {
        for (int64_t i = 0; i < n_sel; i++)
            if (tok[i] < 0 || tok[i] >= act->n_tok) return -1;
    } else if (n_sel > act->n_tok) {
        return -1;
    }
    const nm_vec_dot_fn dot = nm_vec_dot_for(type, ctx->isa);
    const nm_vec_dot_multi_fn multi = nm_vec_dot_multi_for(type, ctx->isa);
    if (!dot || !multi) return -1;
    if (rows == 0 || n_sel == 0) return 0;
    if (use_tiles(ctx, type)) {
        if (act->aux_type != type || !act->aux) return -1;
        return matmul_tiles(ctx, pool, type, W, rows, act, tok, n_sel, Y, ldy);
    }

    const int nth = nm_pool_size(pool);
    if (nth == 1 || (double)rows * (double)row_bytes * (double)n_sel < SERIAL_WORK_BYTES) {
        nm_matmul_rows_multi(dot, multi, W, row_bytes, 0, rows, act, tok, n_sel, Y, ldy);
        return 0;
    }
    /* chunks of ~CHUNK_BYTES, but at least one per thread; multiples of 16
     * rows keep neighbouring threads' Y writes on different cache lines */
    int64_t per = chunk_size(row_bytes, rows, nth);
    if (per >= 32) per &= ~(int64_t)15;
    if (per < 1) per = 1;
    struct mm_job j = {dot, multi, {W, row_bytes, rows, per, (rows + per - 1) / per, act, tok, n_sel, Y, ldy, nth}};
    nm_pool_run(pool, mm_task, &j);
    return 0;
}

int nm_matmul(nm_matmul_ctx *ctx, nm_pool *pool, int type, const void *W, int64_t rows, int64_t cols, const float *X,
              int64_t ldx, int64_t n_tok, float *Y, int64_t ldy) {
    nm_act act;
    if (nm_act_prepare(ctx, pool, type, X, ldx, n_tok, cols, &act) != 0) return -1;
    return nm_matmul_act(ctx, pool, type, W, rows, &act, NULL, n_tok, Y, ldy);
}
