#include "kernels/moe.h"

#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/quant.h"
#include "kernels/tile.h"

#ifndef ROW_CHUNK
#define ROW_CHUNK 64 /* rows per work unit: long enough contiguous streams for the hardware
                       * prefetcher (16 rows decoded ~10% slower on Zen 4), short enough
                       * to balance 2..64 threads over a 1408-row expert */
#endif
#ifndef DOWN_CHUNK
#define DOWN_CHUNK 32 /* output rows per down unit of the fused schedule: a unit walks every
                       * expert, so 32 rows are ~6 x 31 KB of V2-Lite's down; finer than the
                       * staged 64 so the 2048 rows give 64 units to balance 16 threads */
#endif
#define FUSED_MAX_TOK 8 /* batches up to this many tokens take the fused schedule */
/* An expert with at least this many pairs runs its tiles through
 * nm_tile_gemm_many on the AMX tile unit (staged schedule, where
 * nm_tile_amx_usable), fewer through the VNNI tile GEMM. 16 is one full A
 * tile: below it TDPBSUD runs with empty rows. Measured on a 16-core Xeon
 * with AMX, V3's experts (7168 x 2048, Q4_K, 16 threads): 32 tokens x 8 of
 * 16 experts (16 pairs each) 7.5-8.9 ms against 9.4-10.0 by VNNI; 256
 * tokens (128 pairs each) 44-56 ms against 58-65; one expert matrix on one
 * thread at 16 tokens 1.2-1.7 ms against 1.5-2.2. Both paths give the same bits (tile.h), so
 * the threshold changes speed only. */
#define AMX_MIN_TOK 16
_Static_assert(DOWN_CHUNK <= ROW_CHUNK, "a lone pair's down unit fits lone_rows' buffer");
_Static_assert(ROW_CHUNK % NM_TILE_ROWS == 0 && DOWN_CHUNK % NM_TILE_ROWS == 0,
               "a unit is whole tiles: pre-packed tiles are found by row / 16");

void nm_moe_scratch_free(nm_moe_scratch *s) {
    free(s->buf);
    s->buf = NULL;
    s->cap = 0;
}

/* Rows of a float matrix quantised into a dot type (pass_quantize: rows
 * ith-strided). */
typedef struct {
    const float *src;
    int64_t n_rows, n_cols;
    int type;
    uint8_t *dst;
    size_t dst_row;
    int aux_type; /* weight type whose tile aux to derive (-1: none) */
    uint8_t *aux;
    size_t aux_row;
} quant_job;

typedef struct {
    const nm_moe_experts *ex;
    int64_t n_tok, n_act;       /* tokens; (expert, token) pairs */
    int n_used;                 /* distinct experts in this batch */
    const int32_t *expert;      /* [n_used] expert ids */
    const int64_t *start;       /* [n_used + 1] pair ranges per expert */
    const int32_t *pair_tok;    /* [n_act] token of each pair */
    const float *pair_w;        /* [n_act] routing weight of each pair */
    const float *x;
    const uint8_t *xq_gate, *xq_up; /* x quantised for gate's / up's dot type */
    size_t xq_gate_row, xq_up_row;
    float *h;                   /* [n_act][n_ff] silu(gate) * up */
    uint8_t *hq;                /* h quantised for down's dot type */
    size_t hq_row;
    float *out;
    /* tiles (tile.h) where every matrix of a pass has them: gate+up share
     * use_tile_gu, down use_tile_d; aux rows of the activations; per
     * thread a buffer of tbuf_per bytes (gate tile, up tile, down tile) */
    int use_tile_gu, use_tile_d;
    const uint8_t *aux_gate, *aux_up, *aux_h;
    size_t aux_gate_row, aux_up_row, aux_h_row;
    uint8_t *tbuf;
    size_t tbuf_per, tile_g_size, tile_u_size; /* scratch tiles (0 for matrices held as tiles) */
    /* AMX (staged schedule only): gate+up / down of experts with at least
     * AMX_MIN_TOK pairs through nm_tile_gemm_many. The tile unit loads
     * activation rows a fixed stride apart, so for those experts the
     * quantised x rows and their aux are copied in pair order (pass_gather;
     * the up ones only where up has rows or aux of its own); h is already
     * in pair order. */
    int amx_gu, amx_d;
    uint8_t *xp_gate, *xp_up, *ap_gate, *ap_up;
    unsigned tiled;                            /* ex->tiled: gate/up, down read as they are */
    size_t ts_g, ts_u, ts_d;                   /* bytes of one tile of gate, up, down */
    atomic_long next;
    int64_t units;
    /* the fused schedule (pass_fused): per used expert, gate+up units done
     * and whether its h rows are quantised; how to quantise them */
    atomic_int *gu_done, *ready;
    const quant_job *qh;
} moe_job;

/* The next unit of pass 1 (an expert's ROW_CHUNK rows of n_ff), taken by
 * whichever thread is free: 0 once all are taken. */
static int next_unit(moe_job *j, int64_t chunks, int64_t n_ff, int64_t *ei, int64_t *r0, int64_t *r1) {
    int64_t u = atomic_fetch_add(&j->next, 1);
    if (u >= j->units) return 0;
    *ei = u / chunks, *r0 = (u % chunks) * ROW_CHUNK, *r1 = *r0 + ROW_CHUNK;
    if (*r1 > n_ff) *r1 = n_ff;
    return 1;
}

/* Gate+up unit over rows: h[pair][r] = silu(g) * u for rows [r0, r1) of
 * expert ei and all its tokens; weights rows are read from memory once per
 * unit. The expert's pairs go in groups of NM_DOT_MULTI_MAX, each group
 * against every row of the unit through the multi-row dot: a row's blocks
 * are unpacked once per group instead of once per token (prefill is bound
 * by that unpacking), and the group's activation rows stay in L1 across the
 * unit's rows while the unit's weight rows come back from L2. A lone pair
 * (every pair at decode) takes the single dot; both give the same bits. */
static void gate_up_rows(moe_job *j, int64_t ei, int64_t r0, int64_t r1) {
    const nm_moe_experts *ex = j->ex;
    nm_vec_dot_fn dg = nm_vec_dot(ex->type_gate), du = nm_vec_dot(ex->type_up);
    nm_vec_dot_multi_fn mg = nm_vec_dot_multi(ex->type_gate), mu = nm_vec_dot_multi(ex->type_up);
    int32_t e = j->expert[ei];
    const uint8_t *G = ex->gate[e], *U = ex->up[e];
    for (int64_t p = j->start[ei]; p < j->start[ei + 1];) {
        int n = j->start[ei + 1] - p < NM_DOT_MULTI_MAX ? (int)(j->start[ei + 1] - p) : NM_DOT_MULTI_MAX;
        const void *xg[NM_DOT_MULTI_MAX], *xu[NM_DOT_MULTI_MAX];
        for (int k = 0; k < n; k++) {
            int32_t t = j->pair_tok[p + k];
            xg[k] = j->xq_gate + (size_t)t * j->xq_gate_row;
            xu[k] = j->xq_up + (size_t)t * j->xq_up_row;
        }
        for (int64_t r = r0; r < r1; r++) {
            const void *gr = G + (size_t)r * ex->row_gate, *ur = U + (size_t)r * ex->row_up;
            float g[NM_DOT_MULTI_MAX], v[NM_DOT_MULTI_MAX];
            if (n == 1) {
                g[0] = dg(ex->n_embd, gr, xg[0]);
                v[0] = du(ex->n_embd, ur, xu[0]);
            } else {
                mg(ex->n_embd, gr, xg, n, g);
                mu(ex->n_embd, ur, xu, n, v);
            }
            for (int k = 0; k < n; k++) j->h[(p + k) * ex->n_ff + r] = g[k] / (1.0f + expf(-g[k])) * v[k];
        }
        p += n;
    }
}

/* out[r - r0] = row r of matrix M . x for rows [r0, r1) (r0 a multiple of
 * 16, r1 - r0 <= ROW_CHUNK): one activation row (a lone pair) against the
 * pre-packed tiles (tile_bytes each) or the rows as they are (row_bytes
 * apart); out has room for whole tiles (ROW_CHUNK floats). */
static void lone_rows(int type, int64_t n, const uint8_t *M, size_t row_bytes, size_t tile_bytes, int pre,
                      const void *x, const void *a, int64_t r0, int64_t r1, float *out) {
    for (int64_t rt = r0; rt < r1; rt += NM_TILE_ROWS) {
        const int nr = r1 - rt < NM_TILE_ROWS ? (int)(r1 - rt) : NM_TILE_ROWS;
        if (pre)
            nm_tile_gemm(type, n, M + (size_t)(rt / NM_TILE_ROWS) * tile_bytes, &x, &a, 1, out + (rt - r0));
        else
            nm_tile_gemv(type, n, M + (size_t)rt * row_bytes, row_bytes, nr, x, a, out + (rt - r0));
    }
}

/* Gate+up unit on tiles: each 16-row tile of gate and of up is packed once
 * into this thread's buffer (or, pre-packed, read where it is), then
 * applied to the expert's pairs in groups of NM_TILE_NX (VNNI), or of
 * NM_TILE_MANY on the AMX unit for an expert of AMX_MIN_TOK pairs or more;
 * the result per (row, pair) is the tile number of tile.h whatever the
 * group sizes or the path, so a batch gives the bits one token at a time
 * gives. A lone pair (decode) takes the row-major GEMV over rows, the
 * one-row tile GEMM over tiles. */
static void gate_up_tiles(moe_job *j, int ith, int64_t ei, int64_t r0, int64_t r1) {
    const nm_moe_experts *ex = j->ex;
    uint8_t *bg = j->tbuf + (size_t)ith * j->tbuf_per, *bu = bg + j->tile_g_size;
    const int pre = (j->tiled & NM_MOE_TILED_GATE_UP) != 0;
    int32_t e = j->expert[ei];
    const uint8_t *G = ex->gate[e], *U = ex->up[e];
    if (j->start[ei + 1] - j->start[ei] == 1) { /* a lone pair (decode): the rows or tiles as they are */
        int64_t p = j->start[ei];
        int32_t t = j->pair_tok[p];
        const void *xg = j->xq_gate + (size_t)t * j->xq_gate_row, *xu = j->xq_up + (size_t)t * j->xq_up_row;
        const void *ag = j->aux_gate + (size_t)t * j->aux_gate_row, *au = j->aux_up + (size_t)t * j->aux_up_row;
        /* the unit's gate rows, then its up rows: one contiguous stream at a
         * time (gate and up tile by tile, two interleaved streams, read at
         * about half the rate on one Zen 4 thread) */
        float g[ROW_CHUNK], v[ROW_CHUNK];
        lone_rows(ex->type_gate, ex->n_embd, G, ex->row_gate, j->ts_g, pre, xg, ag, r0, r1, g);
        lone_rows(ex->type_up, ex->n_embd, U, ex->row_up, j->ts_u, pre, xu, au, r0, r1, v);
        float *hr = j->h + p * ex->n_ff + r0;
        for (int64_t r = 0; r < r1 - r0; r++) hr[r] = g[r] / (1.0f + expf(-g[r])) * v[r];
        return;
    }
    const int many = j->amx_gu && j->start[ei + 1] - j->start[ei] >= AMX_MIN_TOK;
    const int group = many ? NM_TILE_MANY : NM_TILE_NX;
    for (int64_t rt = r0; rt < r1; rt += NM_TILE_ROWS) {
        int nr = r1 - rt < NM_TILE_ROWS ? (int)(r1 - rt) : NM_TILE_ROWS;
        const uint8_t *tg, *tu;
        if (pre) {
            tg = G + (size_t)(rt / NM_TILE_ROWS) * j->ts_g, tu = U + (size_t)(rt / NM_TILE_ROWS) * j->ts_u;
        } else {
            nm_tile_pack(ex->type_gate, ex->n_embd, G + (size_t)rt * ex->row_gate, ex->row_gate, nr, bg);
            nm_tile_pack(ex->type_up, ex->n_embd, U + (size_t)rt * ex->row_up, ex->row_up, nr, bu);
            tg = bg, tu = bu;
        }
        for (int64_t p = j->start[ei]; p < j->start[ei + 1];) {
            int n = j->start[ei + 1] - p < group ? (int)(j->start[ei + 1] - p) : group;
            float g[NM_TILE_MANY * NM_TILE_ROWS], v[NM_TILE_MANY * NM_TILE_ROWS];
            if (many) { /* the gathered rows, pair p onwards */
                nm_tile_gemm_many(ex->type_gate, ex->n_embd, tg, j->xp_gate + (size_t)p * j->xq_gate_row,
                                  j->xq_gate_row, j->ap_gate + (size_t)p * j->aux_gate_row, j->aux_gate_row, n, g,
                                  NM_TILE_ROWS);
                nm_tile_gemm_many(ex->type_up, ex->n_embd, tu, j->xp_up + (size_t)p * j->xq_up_row, j->xq_up_row,
                                  j->ap_up + (size_t)p * j->aux_up_row, j->aux_up_row, n, v, NM_TILE_ROWS);
            } else {
                const void *xg[NM_TILE_NX], *xu[NM_TILE_NX], *ag[NM_TILE_NX], *au[NM_TILE_NX];
                for (int k = 0; k < n; k++) {
                    int32_t t = j->pair_tok[p + k];
                    xg[k] = j->xq_gate + (size_t)t * j->xq_gate_row;
                    xu[k] = j->xq_up + (size_t)t * j->xq_up_row;
                    ag[k] = j->aux_gate + (size_t)t * j->aux_gate_row;
                    au[k] = j->aux_up + (size_t)t * j->aux_up_row;
                }
                nm_tile_gemm(ex->type_gate, ex->n_embd, tg, xg, ag, n, g);
                nm_tile_gemm(ex->type_up, ex->n_embd, tu, xu, au, n, v);
            }
            for (int k = 0; k < n; k++) {
                float *hr = j->h + (p + k) * ex->n_ff + rt;
                for (int r = 0; r < nr; r++) {
                    float gg = g[k * NM_TILE_ROWS + r];
                    hr[r] = gg / (1.0f + expf(-gg)) * v[k * NM_TILE_ROWS + r];
                }
            }
            p += n;
        }
    }
}

static void gate_up_unit(moe_job *j, int ith, int64_t ei, int64_t r0, int64_t r1) {
    if (j->use_tile_gu)
        gate_up_tiles(j, ith, ei, r0, r1);
    else
        gate_up_rows(j, ei, r0, r1);
}

/* Pass 1 of the staged schedule: every (expert, row chunk) unit. */
static void pass_gate_up(void *ctx, int ith, int nth) {
    moe_job *j = ctx;
    int64_t chunks = (j->ex->n_ff + ROW_CHUNK - 1) / ROW_CHUNK, ei, r0, r1;
    (void)nth;
    while (next_unit(j, chunks, j->ex->n_ff, &ei, &r0, &r1)) gate_up_unit(j, ith, ei, r0, r1);
}


/* Before pass 1 where AMX serves gate+up: the quantised x rows (and aux)
 * of the pairs of experts with AMX_MIN_TOK pairs or more, copied in pair
 * order, pairs ith-strided. The copies are the bytes the VNNI path reads
 * through pointers, so the numbers do not change. */
static void pass_gather(void *ctx, int ith, int nth) {
    const moe_job *j = ctx;
    for (int ei = 0; ei < j->n_used; ei++) {
        if (j->start[ei + 1] - j->start[ei] < AMX_MIN_TOK) continue;
        for (int64_t p = j->start[ei] + ith; p < j->start[ei + 1]; p += nth) {
            const size_t t = (size_t)j->pair_tok[p];
            memcpy(j->xp_gate + (size_t)p * j->xq_gate_row, j->xq_gate + t * j->xq_gate_row, j->xq_gate_row);
            memcpy(j->ap_gate + (size_t)p * j->aux_gate_row, j->aux_gate + t * j->aux_gate_row, j->aux_gate_row);
            if (j->xp_up != j->xp_gate)
                memcpy(j->xp_up + (size_t)p * j->xq_up_row, j->xq_up + t * j->xq_up_row, j->xq_up_row);
            if (j->ap_up != j->ap_gate)
                memcpy(j->ap_up + (size_t)p * j->aux_up_row, j->aux_up + t * j->aux_up_row, j->aux_up_row);
        }
    }
}

static void quantize_row_of(const quant_job *q, int64_t r) {
    nm_quantize_row(q->type, q->src + r * q->n_cols, q->dst + (size_t)r * q->dst_row, q->n_cols);
    if (q->aux_type >= 0)
        nm_tile_aux(q->aux_type, q->n_cols, q->dst + (size_t)r * q->dst_row, q->aux + (size_t)r * q->aux_row);
}

static void pass_quantize(void *ctx, int ith, int nth) {
    quant_job *q = ctx;
    for (int64_t r = ith; r < q->n_rows; r += nth) quantize_row_of(q, r);
}

/* Down for expert ei over output rows [r0, r1): out[tok][r] += w * (down .
 * h) for each of its pairs, in pair order. Pairs go through the multi-row
 * dot in groups as in gate_up_rows. */
static void down_rows(moe_job *j, int64_t ei, int64_t r0, int64_t r1) {
    const nm_moe_experts *ex = j->ex;
    nm_vec_dot_fn dd = nm_vec_dot(ex->type_down);
    nm_vec_dot_multi_fn md = nm_vec_dot_multi(ex->type_down);
    const uint8_t *D = ex->down[j->expert[ei]];
    for (int64_t p = j->start[ei]; p < j->start[ei + 1];) {
        int n = j->start[ei + 1] - p < NM_DOT_MULTI_MAX ? (int)(j->start[ei + 1] - p) : NM_DOT_MULTI_MAX;
        const void *xs[NM_DOT_MULTI_MAX];
        for (int k = 0; k < n; k++) xs[k] = j->hq + (size_t)(p + k) * j->hq_row;
        for (int64_t r = r0; r < r1; r++) {
            const void *dr = D + (size_t)r * ex->row_down;
            float d[NM_DOT_MULTI_MAX];
            if (n == 1)
                d[0] = dd(ex->n_ff, dr, xs[0]);
            else
                md(ex->n_ff, dr, xs, n, d);
            for (int k = 0; k < n; k++) j->out[(size_t)j->pair_tok[p + k] * ex->n_embd + r] += j->pair_w[p + k] * d[k];
        }
        p += n;
    }
}

/* The same on tiles: each 16-row tile of down packed once (or read where it
 * is, pre-packed), applied to the expert's pairs in groups (of NM_TILE_MANY
 * on the AMX unit as in gate_up_tiles: h rows are in pair order already);
 * a lone pair as in gate_up_tiles. */
static void down_tiles(moe_job *j, int ith, int64_t ei, int64_t r0, int64_t r1) {
    const nm_moe_experts *ex = j->ex;
    uint8_t *bd = j->tbuf + (size_t)ith * j->tbuf_per + j->tile_g_size + j->tile_u_size;
    const int pre = (j->tiled & NM_MOE_TILED_DOWN) != 0;
    const uint8_t *D = ex->down[j->expert[ei]];
    if (j->start[ei + 1] - j->start[ei] == 1) { /* a lone pair: the rows as they are */
        int64_t p = j->start[ei];
        const void *xs = j->hq + (size_t)p * j->hq_row, *as = j->aux_h + (size_t)p * j->aux_h_row;
        float *o = j->out + (size_t)j->pair_tok[p] * ex->n_embd, d[ROW_CHUNK];
        lone_rows(ex->type_down, ex->n_ff, D, ex->row_down, j->ts_d, pre, xs, as, r0, r1, d);
        for (int64_t r = r0; r < r1; r++) o[r] += j->pair_w[p] * d[r - r0];
        return;
    }
    const int many = j->amx_d && j->start[ei + 1] - j->start[ei] >= AMX_MIN_TOK;
    const int group = many ? NM_TILE_MANY : NM_TILE_NX;
    for (int64_t rt = r0; rt < r1; rt += NM_TILE_ROWS) {
        int nr = r1 - rt < NM_TILE_ROWS ? (int)(r1 - rt) : NM_TILE_ROWS;
        const uint8_t *td = D + (size_t)(rt / NM_TILE_ROWS) * j->ts_d;
        if (!pre) {
            nm_tile_pack(ex->type_down, ex->n_ff, D + (size_t)rt * ex->row_down, ex->row_down, nr, bd);
            td = bd;
        }
        for (int64_t p = j->start[ei]; p < j->start[ei + 1];) {
            int n = j->start[ei + 1] - p < group ? (int)(j->start[ei + 1] - p) : group;
            float d[NM_TILE_MANY * NM_TILE_ROWS];
            if (many) {
                nm_tile_gemm_many(ex->type_down, ex->n_ff, td, j->hq + (size_t)p * j->hq_row, j->hq_row,
                                  j->aux_h + (size_t)p * j->aux_h_row, j->aux_h_row, n, d, NM_TILE_ROWS);
            } else {
                const void *xs[NM_TILE_NX], *as[NM_TILE_NX];
                for (int k = 0; k < n; k++) {
                    xs[k] = j->hq + (size_t)(p + k) * j->hq_row;
                    as[k] = j->aux_h + (size_t)(p + k) * j->aux_h_row;
                }
                nm_tile_gemm(ex->type_down, ex->n_ff, td, xs, as, n, d);
            }
            for (int k = 0; k < n; k++) {
                float *o = j->out + (size_t)j->pair_tok[p + k] * ex->n_embd + rt;
                for (int r = 0; r < nr; r++) o[r] += j->pair_w[p + k] * d[k * NM_TILE_ROWS + r];
            }
            p += n;
        }
    }
}

static void down_unit(moe_job *j, int ith, int64_t ei, int64_t r0, int64_t r1) {
    if (j->use_tile_d)
        down_tiles(j, ith, ei, r0, r1);
    else
        down_rows(j, ei, r0, r1);
}

/* Pass 2 of the staged schedule: output rows are split between threads
 * (units of ROW_CHUNK rows of n_embd), each unit walks every expert, so no
 * two threads write one element and each element receives its products in
 * (expert, pair) order, as one dot at a time gave them. */
static void pass_down(void *ctx, int ith, int nth) {
    moe_job *j = ctx;
    (void)nth;
    for (;;) {
        int64_t u = atomic_fetch_add(&j->next, 1);
        if (u >= j->units) break;
        int64_t r0 = u * ROW_CHUNK, r1 = r0 + ROW_CHUNK;
        if (r1 > j->ex->n_embd) r1 = j->ex->n_embd;
        for (int64_t ei = 0; ei < j->n_used; ei++) down_unit(j, ith, ei, r0, r1);
    }
}

/* Waits for *flag to be set by another thread of the same run. The thread
 * that sets it is running a unit it has taken (units are taken in order, so
 * every unit waited for is already someone's), so this ends; past a short
 * spin it yields, for when the threads outnumber the free CPUs. */
static void wait_flag(const atomic_int *flag) {
    for (int spins = 0; !atomic_load_explicit(flag, memory_order_acquire); spins++) {
        if (spins < 256) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } else {
            sched_yield();
        }
    }
}

/* The fused schedule (small batches: decode), one pool run for the layer
 * instead of four. Units are taken from one counter: first every gate+up
 * unit (expert-major), then the down units (DOWN_CHUNK output rows, every
 * expert in order, as pass_down). The thread that finishes an expert's last
 * gate+up unit quantises that expert's h rows and marks it ready; a down
 * unit waits for each expert's mark before its rows. So threads left
 * without gate+up units start on down at once instead of waiting at a
 * barrier for the slowest, and the stages' tails overlap. The numbers are
 * the staged schedule's: the same unit functions, the same quantisation per
 * row, each output element summed in (expert, pair) order. x is quantised
 * by the caller before the run (a few rows). */
static void pass_fused(void *ctx, int ith, int nth) {
    moe_job *j = ctx;
    const nm_moe_experts *ex = j->ex;
    const int64_t chunks = (ex->n_ff + ROW_CHUNK - 1) / ROW_CHUNK, gu = (int64_t)j->n_used * chunks;
    (void)nth;
    for (;;) {
        int64_t u = atomic_fetch_add(&j->next, 1);
        if (u < gu) {
            int64_t ei = u / chunks, r0 = (u % chunks) * ROW_CHUNK, r1 = r0 + ROW_CHUNK < ex->n_ff ? r0 + ROW_CHUNK : ex->n_ff;
            gate_up_unit(j, ith, ei, r0, r1);
            if (atomic_fetch_add(&j->gu_done[ei], 1) == chunks - 1) {
                for (int64_t p = j->start[ei]; p < j->start[ei + 1]; p++) quantize_row_of(j->qh, p);
                atomic_store_explicit(&j->ready[ei], 1, memory_order_release);
            }
        } else if (u < gu + j->units) {
            int64_t r0 = (u - gu) * DOWN_CHUNK, r1 = r0 + DOWN_CHUNK < ex->n_embd ? r0 + DOWN_CHUNK : ex->n_embd;
            for (int64_t ei = 0; ei < j->n_used; ei++) {
                wait_flag(&j->ready[ei]);
                down_unit(j, ith, ei, r0, r1);
            }
        } else {
            break;
        }
    }
}

/* NUMOE_MOE_SCHEDULE: an NM_MOE_* value, -1 for a name that is none
 * (read once: every layer of every step asks) */
static int schedule_from_env(void) {
    static atomic_int cached = -2;
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v != -2) return v;
    const char *e = getenv("NUMOE_MOE_SCHEDULE");
    v = !e || !*e || !strcmp(e, "auto") ? NM_MOE_AUTO
        : !strcmp(e, "staged")          ? NM_MOE_STAGED
        : !strcmp(e, "fused")           ? NM_MOE_FUSED
                                        : -1;
    atomic_store_explicit(&cached, v, memory_order_relaxed);
    return v;
}

static void *carve(uint8_t **cur, size_t bytes) {
    void *p = *cur;
    *cur += (bytes + 63) & ~(size_t)63;
    return p;
}

int nm_moe_forward(nm_pool *pool, nm_moe_scratch *s, const nm_moe_experts *ex, int64_t n_tok, const float *x, int k,
                   const int32_t *ids, const float *w, float *out, char *errbuf, size_t errlen) {
    int64_t E = ex->n_expert, n_pairs = n_tok * k;
    memset(out, 0, (size_t)(n_tok * ex->n_embd) * sizeof *out);
    /* an id < 0 is a pick computed elsewhere (-1 - e: the GPU's resident
     * experts, coordinator/experts/backend.h): skipped like an expert not held */
    for (int64_t i = 0; i < n_pairs; i++)
        if (ids[i] < -E || ids[i] >= E) {
            if (errbuf) snprintf(errbuf, errlen, "expert id %d out of range 0..%lld", ids[i], (long long)E - 1);
            return -1;
        }
    int tg = nm_type_traits_of(ex->type_gate)->vec_dot_type, tu = nm_type_traits_of(ex->type_up)->vec_dot_type;
    int td = nm_type_traits_of(ex->type_down)->vec_dot_type;
    size_t xg_row = nm_row_size(tg, ex->n_embd), xu_row = nm_row_size(tu, ex->n_embd);
    size_t hq_row = nm_row_size(td, ex->n_ff);
    int use_gu = nm_tile_usable(ex->type_gate) && nm_tile_usable(ex->type_up), use_d = nm_tile_usable(ex->type_down);
    if (((ex->tiled & NM_MOE_TILED_GATE_UP) && !use_gu) || ((ex->tiled & NM_MOE_TILED_DOWN) && !use_d)) {
        if (errbuf)
            snprintf(errbuf, errlen, "experts held as tiles (%s/%s/%s, flags %u) that this CPU (isa %s) cannot compute",
                     nm_type_name(ex->type_gate), nm_type_name(ex->type_up), nm_type_name(ex->type_down), ex->tiled,
                     nm_isa_name(nm_isa_best()));
        return -1;
    }
    if (ex->tiled & ~(unsigned)(NM_MOE_TILED_GATE_UP | NM_MOE_TILED_DOWN)) {
        if (errbuf) snprintf(errbuf, errlen, "unknown tiled flags %u", ex->tiled);
        return -1;
    }
    const int pre_gu = (ex->tiled & NM_MOE_TILED_GATE_UP) != 0, pre_d = (ex->tiled & NM_MOE_TILED_DOWN) != 0;
    size_t ag_row = use_gu ? nm_tile_aux_size(ex->type_gate, ex->n_embd) : 0;
    size_t au_row = use_gu && ex->type_up != ex->type_gate ? nm_tile_aux_size(ex->type_up, ex->n_embd) : 0;
    size_t ah_row = use_d ? nm_tile_aux_size(ex->type_down, ex->n_ff) : 0;
    size_t ts_g = use_gu ? nm_tile_size(ex->type_gate, ex->n_embd) : 0;
    size_t ts_u = use_gu ? nm_tile_size(ex->type_up, ex->n_embd) : 0;
    size_t ts_d = use_d ? nm_tile_size(ex->type_down, ex->n_ff) : 0;
    /* per-thread tiles to pack into, for the matrices held as rows */
    size_t tg_size = pre_gu ? 0 : ts_g, tu_size = pre_gu ? 0 : ts_u;
    size_t tbuf_per = (tg_size + tu_size + (pre_d ? 0 : ts_d) + 63) & ~(size_t)63;
    int schedule = s->schedule ? s->schedule : schedule_from_env();
    if (schedule < 0) {
        if (errbuf) snprintf(errbuf, errlen, "NUMOE_MOE_SCHEDULE=%s: expected auto, staged or fused",
                             getenv("NUMOE_MOE_SCHEDULE"));
        return -1;
    }
    if (schedule == NM_MOE_AUTO) schedule = n_tok <= FUSED_MAX_TOK ? NM_MOE_FUSED : NM_MOE_STAGED;
    /* AMX in the staged schedule (the fused one serves a few tokens: no expert
     * reaches AMX_MIN_TOK pairs but by repeated routing); the gathered rows */
    const int amx_gu = schedule == NM_MOE_STAGED && use_gu && nm_tile_amx_usable(ex->type_gate) &&
                       nm_tile_amx_usable(ex->type_up);
    const int amx_d = schedule == NM_MOE_STAGED && use_d && nm_tile_amx_usable(ex->type_down);
    const size_t xp_g = amx_gu ? xg_row : 0, xp_u = amx_gu && tg != tu ? xu_row : 0;
    const size_t ap_g = amx_gu ? ag_row : 0, ap_u = amx_gu ? au_row : 0;
    int nth = nm_pool_size(pool);
    size_t need = 64 * 22 + (size_t)n_pairs * (xp_g + xp_u + ap_g + ap_u) + (size_t)E * 2 * sizeof(atomic_int) + (size_t)nth * tbuf_per + (size_t)n_tok * (ag_row + au_row) + (size_t)n_pairs * ah_row + (size_t)(E + 1) * sizeof(int64_t) * 2 + (size_t)E * sizeof(int32_t) +
                  (size_t)n_pairs * (sizeof(int32_t) + sizeof(float) + (size_t)ex->n_ff * sizeof(float) + hq_row) +
                  (size_t)n_tok * (xg_row + (tg == tu ? 0 : xu_row));
    if (need > s->cap) {
        void *nb = realloc(s->buf, need);
        if (!nb) {
            if (errbuf) snprintf(errbuf, errlen, "out of memory (%zu bytes of MoE scratch)", need);
            return -1;
        }
        s->buf = nb, s->cap = need;
    }
    uint8_t *cur = s->buf;
    int64_t *count = carve(&cur, (size_t)(E + 1) * sizeof *count);
    int64_t *start = carve(&cur, (size_t)(E + 1) * sizeof *start);
    int32_t *expert = carve(&cur, (size_t)E * sizeof *expert);
    int32_t *pair_tok = carve(&cur, (size_t)n_pairs * sizeof *pair_tok);
    float *pair_w = carve(&cur, (size_t)n_pairs * sizeof *pair_w);
    float *h = carve(&cur, (size_t)(n_pairs * ex->n_ff) * sizeof *h);
    uint8_t *hq = carve(&cur, (size_t)n_pairs * hq_row);
    uint8_t *xq_gate = carve(&cur, (size_t)n_tok * xg_row);
    uint8_t *xq_up = tg == tu ? xq_gate : carve(&cur, (size_t)n_tok * xu_row);
    uint8_t *tbuf = carve(&cur, (size_t)nth * tbuf_per);
    uint8_t *aux_g = carve(&cur, (size_t)n_tok * ag_row);
    uint8_t *aux_u = au_row ? carve(&cur, (size_t)n_tok * au_row) : aux_g;
    uint8_t *aux_h = carve(&cur, (size_t)n_pairs * ah_row);
    atomic_int *gu_done = carve(&cur, (size_t)E * sizeof *gu_done), *ready = carve(&cur, (size_t)E * sizeof *ready);
    uint8_t *xp_gate = carve(&cur, (size_t)n_pairs * xp_g), *ap_gate = carve(&cur, (size_t)n_pairs * ap_g);
    uint8_t *xp_up = xp_u ? carve(&cur, (size_t)n_pairs * xp_u) : xp_gate;
    uint8_t *ap_up = ap_u ? carve(&cur, (size_t)n_pairs * ap_u) : ap_gate;

    /* counting sort of (token, slot) pairs by expert, keeping only held experts */
    memset(count, 0, (size_t)(E + 1) * sizeof *count);
    for (int64_t i = 0; i < n_pairs; i++)
        if (ids[i] >= 0 && ex->gate[ids[i]]) count[ids[i]]++;
    int n_used = 0;
    int64_t acc = 0;
    for (int64_t e = 0; e < E; e++) {
        if (!count[e]) continue;
        expert[n_used] = (int32_t)e;
        start[n_used++] = acc;
        acc += count[e];
        count[e] = start[n_used - 1]; /* becomes the fill cursor */
    }
    start[n_used] = acc;
    for (int64_t i = 0; i < n_pairs; i++) {
        int32_t e = ids[i];
        if (e < 0 || !ex->gate[e]) continue;
        int64_t p = count[e]++;
        pair_tok[p] = (int32_t)(i / k);
        pair_w[p] = w[i];
    }
    if (n_used == 0) return 0;

    quant_job qg = {x, n_tok, ex->n_embd, tg, xq_gate, xg_row, use_gu ? ex->type_gate : -1, aux_g, ag_row};
    /* the up rows again when up has its own dot type or its own aux (the
     * same quantised rows when only the aux differs) */
    const int up_again = tg != tu || au_row;
    quant_job qu = {x, n_tok, ex->n_embd, tu, tg == tu ? xq_gate : xq_up, xu_row, use_gu ? ex->type_up : -1, aux_u,
                    au_row};
    quant_job qh = {h, acc, ex->n_ff, td, hq, hq_row, use_d ? ex->type_down : -1, aux_h, ah_row};
    moe_job j = {.ex = ex, .n_tok = n_tok, .n_act = acc, .n_used = n_used, .expert = expert, .start = start,
                 .pair_tok = pair_tok, .pair_w = pair_w, .x = x, .xq_gate = xq_gate, .xq_up = xq_up,
                 .xq_gate_row = xg_row, .xq_up_row = xu_row, .h = h, .hq = hq, .hq_row = hq_row, .out = out,
                 .use_tile_gu = use_gu, .use_tile_d = use_d, .aux_gate = aux_g, .aux_up = aux_u, .aux_h = aux_h,
                 .aux_gate_row = ag_row, .aux_up_row = au_row ? au_row : ag_row, .aux_h_row = ah_row,
                 .tbuf = tbuf, .tbuf_per = tbuf_per, .tile_g_size = tg_size, .tile_u_size = tu_size,
                 .tiled = ex->tiled, .ts_g = ts_g, .ts_u = ts_u, .ts_d = ts_d, .gu_done = gu_done, .ready = ready,
                 .qh = &qh, .amx_gu = amx_gu, .amx_d = amx_d, .xp_gate = xp_gate, .xp_up = xp_up,
                 .ap_gate = ap_gate, .ap_up = ap_up};
    atomic_init(&j.next, 0);
    if (schedule == NM_MOE_FUSED) {
        for (int64_t r = 0; r < n_tok; r++) {
            quantize_row_of(&qg, r);
            if (up_again) quantize_row_of(&qu, r);
        }
        for (int i = 0; i < n_used; i++) atomic_init(&gu_done[i], 0), atomic_init(&ready[i], 0);
        j.units = (ex->n_embd + DOWN_CHUNK - 1) / DOWN_CHUNK;
        nm_pool_run(pool, pass_fused, &j);
        return 0;
    }
    nm_pool_run(pool, pass_quantize, &qg);
    if (up_again) nm_pool_run(pool, pass_quantize, &qu);
    if (amx_gu) {
        int big = 0;
        for (int i = 0; i < n_used; i++) big |= start[i + 1] - start[i] >= AMX_MIN_TOK;
        if (big) nm_pool_run(pool, pass_gather, &j);
    }
    j.units = (int64_t)n_used * ((ex->n_ff + ROW_CHUNK - 1) / ROW_CHUNK);
    nm_pool_run(pool, pass_gate_up, &j);
    nm_pool_run(pool, pass_quantize, &qh);
    atomic_store(&j.next, 0);
    j.units = (ex->n_embd + ROW_CHUNK - 1) / ROW_CHUNK;
    nm_pool_run(pool, pass_down, &j);
    return 0;
}
