/* matmul.c - see matmul.h for the contract and the blocking scheme. */
#include "kernels/matmul.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Below this many weight bytes x tokens a call runs on the caller: a pool
 * dispatch costs a few microseconds, about what 64 KB of GEMV takes. */
#define SERIAL_WORK_BYTES (64 * 1024)
/* Activation conversion goes parallel from this many elements on. */
#define PARALLEL_QUANT_ELEMS (64 * 1024)

void nm_matmul_ctx_init(nm_matmul_ctx *ctx) {
    ctx->isa = nm_isa_best();
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
    atomic_int failed;
};

static void quant_task(void *p, int ith, int nth) {
    struct quant_job *j = p;
    const int64_t t0 = j->n_tok * ith / nth, t1 = j->n_tok * (ith + 1) / nth;
    for (int64_t t = t0; t < t1; t++)
        if (nm_quantize_row(j->type, j->X + t * j->ldx, j->dst + (size_t)t * j->stride, j->cols) != 0)
            atomic_store(&j->failed, 1);
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
    if (vdt == NM_TYPE_F32) {
        act->data = X;
        act->stride = (size_t)ldx * sizeof(float);
        return 0;
    }
    const size_t row = nm_row_size(vdt, cols);
    if (row == 0) return -1;
    /* rows start on cache lines */
    const size_t stride = (row + 63) & ~(size_t)63;
    if (n_tok > 0 && stride > SIZE_MAX / (size_t)n_tok) return -1;
    if (grow_scratch(ctx, stride * (size_t)(n_tok > 0 ? n_tok : 1)) != 0) return -1;
    struct quant_job j = {vdt, X, ldx, n_tok, cols, ctx->scratch, stride, 0};
    if (n_tok > 1 && n_tok * cols >= PARALLEL_QUANT_ELEMS)
        nm_pool_run(pool, quant_task, &j);
    else
        quant_task(&j, 0, 1);
    if (atomic_load(&j.failed)) return -1;
    act->data = ctx->scratch;
    act->stride = stride;
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

struct mm_job {
    nm_vec_dot_fn dot;
    nm_vec_dot_multi_fn multi;
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

static void mm_task(void *p, int ith, int nth) {
    struct mm_job *j = p;
    for (int64_t c = ith; c < j->n_chunks; c = atomic_fetch_add(&j->next, 1)) {
        const int64_t r0 = c * j->rows_per_chunk;
        const int64_t r1 = r0 + j->rows_per_chunk < j->rows ? r0 + j->rows_per_chunk : j->rows;
        nm_matmul_rows_multi(j->dot, j->multi, j->W, j->row_bytes, r0, r1, j->act, j->tok, j->n_sel, j->Y, j->ldy);
    }
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

    const int nth = nm_pool_size(pool);
    if (nth == 1 || (double)rows * (double)row_bytes * (double)n_sel < SERIAL_WORK_BYTES) {
        nm_matmul_rows_multi(dot, multi, W, row_bytes, 0, rows, act, tok, n_sel, Y, ldy);
        return 0;
    }
    /* chunks of ~CHUNK_BYTES, but at least one per thread; multiples of 16
     * rows keep neighbouring threads' Y writes on different cache lines */
    int64_t per = (int64_t)(NM_MATMUL_CHUNK_BYTES / row_bytes);
    const int64_t even = (rows + nth - 1) / nth;
    if (per > even) per = even;
    if (per >= 32) per &= ~(int64_t)15;
    if (per < 1) per = 1;
    struct mm_job j = {dot, multi, W, row_bytes, rows, per, (rows + per - 1) / per, act, tok, n_sel, Y, ldy, nth};
    nm_pool_run(pool, mm_task, &j);
    return 0;
}

int nm_matmul(nm_matmul_ctx *ctx, nm_pool *pool, int type, const void *W, int64_t rows, int64_t cols, const float *X,
              int64_t ldx, int64_t n_tok, float *Y, int64_t ldy) {
    nm_act act;
    if (nm_act_prepare(ctx, pool, type, X, ldx, n_tok, cols, &act) != 0) return -1;
    return nm_matmul_act(ctx, pool, type, W, rows, &act, NULL, n_tok, Y, ldy);
}
