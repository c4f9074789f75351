/* test_matmul.c - the thread pool and the multi-threaded GEMV/GEMM.
 *
 * Pool: every ith runs exactly once per nm_pool_run, with the right nth,
 * over thousands of repeated runs, with spinning and with immediate
 * sleeping (the futex paths), and with more threads than CPUs.
 *
 * Matmul: nm_matmul / nm_matmul_act against a naive loop of the scalar
 * reference dot over the same quantised activations, for several weight
 * types, 1-3 threads, n_tok 1, 3, 17, odd row counts (not divisible by the
 * thread count, not a multiple of the chunk), padded ldx/ldy, every ISA
 * level this CPU runs, token gathers and expert slabs; padding of Y must
 * stay untouched. The GEMM path (multi-row dots) must also equal one
 * single dot per (row, token) bit for bit (test_gemm_equals_single_dots),
 * and so must the routed-expert FFN (test_moe_equals_single_dots). With
 * ctx.tiles the tile types must equal nm_tile_dot_ref bit for bit, one
 * token or many (test_tiles_equal_tile_ref).
 *
 * Bound: the kernels themselves are checked against the reference to their
 * rounding bound in test_dot_simd (below 3.2e-5 * M at these lengths, where
 * M = sum |w_i x_i|; observed ~1e-7 * M). Here the question is indexing: a
 * wrong row, token, stride or chunk boundary gives an unrelated dot, off by
 * the order of M itself, and one wrong element of a row by about M / cols
 * (2e-3 * M at 512 columns). The check is |y - y_ref| <= 1e-6 * M per output:
 * the worst seen over 36 random seeds, every ISA level, is 9.8e-8 * M (the
 * run prints its own worst). */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/matmul.h"
#include "kernels/moe.h"
#include "kernels/tile.h"
#include "kernels/quant.h"
#include "kernels/threadpool.h"
#include "tests/unit/check.h"
#include "tests/unit/rng.h"


/* ---- thread pool ---------------------------------------------------------- */

#define MAX_T 8

struct count_ctx {
    atomic_int hits[MAX_T];
    atomic_int bad_nth;
    int expect_nth;
    int slow_ith; /* this ith sleeps a little, so the caller has to wait */
};

static void count_task(void *p, int ith, int nth) {
    struct count_ctx *c = p;
    if (nth != c->expect_nth || ith < 0 || ith >= MAX_T) {
        atomic_fetch_add(&c->bad_nth, 1);
        return;
    }
    if (ith == c->slow_ith) usleep(200);
    atomic_fetch_add(&c->hits[ith], 1);
}

static void pool_rounds(nm_pool *pool, int rounds, int slow_ith) {
    struct count_ctx c;
    memset(&c, 0, sizeof c);
    c.expect_nth = nm_pool_size(pool);
    c.slow_ith = slow_ith;
    for (int r = 0; r < rounds; r++) {
        nm_pool_run(pool, count_task, &c);
        /* after each run every ith has run exactly r + 1 times */
        for (int i = 0; i < c.expect_nth; i++)
            if (atomic_load(&c.hits[i]) != r + 1) {
                CHECK(0, "nth %d round %d: ith %d ran %d times", c.expect_nth, r, i, atomic_load(&c.hits[i]));
                return;
            }
    }
    CHECK(atomic_load(&c.bad_nth) == 0, "wrong nth or ith seen %d times", atomic_load(&c.bad_nth));
}

static void test_pool_runs_each_ith_once(void) {
    pool_rounds(NULL, 10, -1);
    CHECK(nm_pool_size(NULL) == 1, "NULL pool size");
    for (int n = 1; n <= 5; n++) {
        nm_pool *pool = nm_pool_create(n);
        CHECK(pool != NULL, "create %d", n);
        if (!pool) continue;
        CHECK(nm_pool_size(pool) == n, "size %d", nm_pool_size(pool));
        pool_rounds(pool, 2000, -1);       /* spinning */
        pool_rounds(pool, 50, n - 1);      /* caller waits on a slow worker */
        nm_pool_set_spin_us(pool, 0);      /* every wait goes to the futex */
        pool_rounds(pool, 500, -1);
        pool_rounds(pool, 20, 0);          /* slow caller: workers finish first */
        usleep(2000);                      /* workers asleep before the next run */
        pool_rounds(pool, 5, -1);
        nm_pool_destroy(pool);
    }
    nm_pool *pool = nm_pool_create(0);
    CHECK(pool && nm_pool_size(pool) >= 1, "create(0) uses the CPUs");
    nm_pool_destroy(pool);
    nm_pool_destroy(NULL);
}

/* ---- matmul ---------------------------------------------------------------- */

static const int mm_types[] = {NM_TYPE_F32, NM_TYPE_F16, NM_TYPE_Q8_0, NM_TYPE_Q4_0,
                               NM_TYPE_Q2_K, NM_TYPE_Q4_K, NM_TYPE_Q6_K};
#define N_MM_TYPES ((int)(sizeof mm_types / sizeof mm_types[0]))

/* Reference Y (n_tok x rows, dense) and per-output M from naive loops. */
static void naive(int type, const void *W, int64_t rows, int64_t cols, const float *X, int64_t ldx, int64_t n_tok,
                  float *yref, double *mag) {
    const int vdt = nm_type_traits_of(type)->vec_dot_type;
    const size_t rb = nm_row_size(type, cols), xb = nm_row_size(vdt, cols);
    const nm_vec_dot_fn ref = nm_vec_dot_ref(type);
    uint8_t *xq = malloc(xb);
    float *wd = malloc(sizeof(float) * (size_t)cols), *xd = malloc(sizeof(float) * (size_t)cols);
    for (int64_t t = 0; t < n_tok; t++) {
        CHECK(nm_quantize_row(vdt, X + t * ldx, xq, cols) == 0, "quantize");
        CHECK(nm_dequantize_row(vdt, xq, xd, cols) == 0, "dequantize act");
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *wr = (const uint8_t *)W + (size_t)r * rb;
            yref[t * rows + r] = ref(cols, wr, xq);
            CHECK(nm_dequantize_row(type, wr, wd, cols) == 0, "dequantize w");
            double m = 0;
            for (int64_t k = 0; k < cols; k++) m += fabs((double)wd[k] * xd[k]);
            mag[t * rows + r] = m;
        }
    }
    free(xq);
    free(wd);
    free(xd);
}

static void *random_weights(int type, int64_t rows, int64_t cols) {
    const size_t rb = nm_row_size(type, cols);
    uint8_t *w = malloc(rb * (size_t)rows);
    float *f = malloc(sizeof(float) * (size_t)cols);
    for (int64_t r = 0; r < rows; r++) {
        const float s = 0.1f + (float)(rng_next() % 100) / 50.0f;
        for (int64_t k = 0; k < cols; k++) f[k] = rng_sym() * s;
        CHECK(nm_quantize_row(type, f, w + (size_t)r * rb, cols) == 0, "quantize weights %s", nm_type_name(type));
    }
    free(f);
    return w;
}

static const float SENTINEL = -12345.0f;

/* |y - y_ref| <= MM_REL * M per output (see the header comment); the worst
 * figure seen is printed at the end of the run. */
#define MM_REL 1e-6
static double mm_worst;

static int within(double got, double want, double mag) {
    const double e = fabs(got - want) / (mag > 0 ? mag : 1);
    if (e > mm_worst) mm_worst = e;
    return fabs(got - want) <= MM_REL * mag;
}

/* Y (n_sel rows, ldy apart) against yref rows picked by tok; padding columns
 * [rows, ldy) must hold the sentinel. Returns failures. */
static int compare(const char *what, const float *Y, int64_t ldy, const float *yref, const double *mag, int64_t rows,
                   const int32_t *tok, int64_t n_sel) {
    int bad = 0;
    for (int64_t i = 0; i < n_sel; i++) {
        const int64_t t = tok ? tok[i] : i;
        for (int64_t r = 0; r < rows; r++) {
            const double want = yref[t * rows + r], got = Y[i * ldy + r], tol = MM_REL * mag[t * rows + r];
            if (!within(got, want, mag[t * rows + r]) && bad++ < 3)
                CHECK(0, "%s: Y[%lld][%lld] = %.9g, reference %.9g (tol %.3g)", what, (long long)i, (long long)r, got,
                      want, tol);
        }
        for (int64_t r = rows; r < ldy; r++)
            if (Y[i * ldy + r] != SENTINEL && bad++ < 3) CHECK(0, "%s: padding Y[%lld][%lld] written", what, (long long)i, (long long)r);
    }
    return bad;
}

static void fill(float *y, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = SENTINEL;
}

static void test_matmul_matches_naive(void) {
    const int64_t shapes[][2] = {{37, 256}, {1001, 1024}}; /* rows, cols */
    const int64_t ntoks[] = {1, 3, 17};
    const int threads[] = {1, 2, 3};
    nm_pool *pools[3];
    for (int p = 0; p < 3; p++) pools[p] = nm_pool_create(threads[p]);
    nm_matmul_ctx ctx;
    nm_matmul_ctx_init(&ctx);
    const nm_isa best = ctx.isa;
    int checked = 0;
    for (int ti = 0; ti < N_MM_TYPES; ti++) {
        const int type = mm_types[ti];
        for (int si = 0; si < 2; si++) {
            const int64_t rows = shapes[si][0], cols = shapes[si][1];
            const int64_t ldx = cols + 7, ldy = rows + 5, max_tok = 17;
            void *W = random_weights(type, rows, cols);
            float *X = malloc(sizeof(float) * (size_t)(ldx * max_tok));
            for (int64_t i = 0; i < ldx * max_tok; i++) X[i] = rng_sym() * 3.0f;
            float *yref = malloc(sizeof(float) * (size_t)(rows * max_tok));
            double *mag = malloc(sizeof(double) * (size_t)(rows * max_tok));
            float *Y = malloc(sizeof(float) * (size_t)(ldy * max_tok));
            naive(type, W, rows, cols, X, ldx, max_tok, yref, mag);
            for (int ni = 0; ni < 3; ni++)
                for (int p = 0; p < 3; p++)
                    for (int lvl = NM_ISA_SCALAR; lvl <= (int)best; lvl++) {
                        /* every level on the GEMM case, the best one elsewhere */
                        if (lvl != (int)best && !(ntoks[ni] == 17 && p == 2)) continue;
                        char what[128];
                        snprintf(what, sizeof what, "%s %lldx%lld n_tok %lld threads %d isa %s", nm_type_name(type),
                                 (long long)rows, (long long)cols, (long long)ntoks[ni], threads[p],
                                 nm_isa_name((nm_isa)lvl));
                        ctx.isa = (nm_isa)lvl;
                        fill(Y, (size_t)(ldy * max_tok));
                        CHECK(nm_matmul(&ctx, pools[p], type, W, rows, cols, X, ldx, ntoks[ni], Y, ldy) == 0, "%s", what);
                        compare(what, Y, ldy, yref, mag, rows, NULL, ntoks[ni]);
                        checked++;
                    }
            ctx.isa = best;
            free(W);
            free(X);
            free(yref);
            free(mag);
            free(Y);
        }
    }
    fprintf(stderr, "  %d matmul configurations checked\n", checked);
    nm_matmul_ctx_free(&ctx);
    for (int p = 0; p < 3; p++) nm_pool_destroy(pools[p]);
}

/* One activation conversion shared by two weight matrices; a token gather
 * with repeats; an expert slab and a row range of a stacked tensor. */
static void test_prepared_gather_and_slabs(void) {
    const int type = NM_TYPE_Q4_K;
    const int64_t n_exp = 3, rows = 75, cols = 512, n_tok = 9;
    const size_t rb = nm_row_size(type, cols);
    uint8_t *stack = random_weights(type, n_exp * rows, cols);
    float *X = malloc(sizeof(float) * (size_t)(n_tok * cols));
    for (int64_t i = 0; i < n_tok * cols; i++) X[i] = rng_sym();
    float *yref = malloc(sizeof(float) * (size_t)(n_exp * rows * n_tok));
    double *mag = malloc(sizeof(double) * (size_t)(n_exp * rows * n_tok));
    naive(type, stack, n_exp * rows, cols, X, cols, n_tok, yref, mag);

    nm_pool *pool = nm_pool_create(3);
    nm_matmul_ctx ctx;
    nm_matmul_ctx_init(&ctx);
    nm_act act;
    CHECK(nm_act_prepare(&ctx, pool, type, X, cols, n_tok, cols, &act) == 0, "prepare");
    CHECK(act.type == NM_TYPE_Q8_K && act.n_tok == n_tok && act.cols == cols, "act fields");

    const int32_t tok[] = {8, 0, 3, 3, 5};
    const int64_t n_sel = 5, ldy = rows + 3;
    float *Y = malloc(sizeof(float) * (size_t)(n_sel * ldy));
    for (int e = 0; e < n_exp; e++) {
        fill(Y, (size_t)(n_sel * ldy));
        CHECK(nm_matmul_act(&ctx, pool, type, stack + (size_t)e * rows * rb, rows, &act, tok, n_sel, Y, ldy) == 0,
              "expert %d", e);
        /* the reference for expert e is columns [e*rows, (e+1)*rows) of yref */
        for (int64_t i = 0; i < n_sel; i++)
            for (int64_t r = 0; r < rows; r++) {
                const int64_t k = tok[i] * n_exp * rows + e * rows + r;
                CHECK(within(Y[i * ldy + r], yref[k], mag[k]), "expert %d tok %d row %lld", e, tok[i],
                      (long long)r);
            }
    }
    /* row range [10, 40) of expert 2, written to the matching Y columns */
    fill(Y, (size_t)(n_sel * ldy));
    const int64_t r0 = 10, r1 = 40;
    CHECK(nm_matmul_act(&ctx, pool, type, stack + (size_t)(2 * rows + r0) * rb, r1 - r0, &act, NULL, n_sel, Y + r0,
                        ldy) == 0,
          "row range");
    for (int64_t i = 0; i < n_sel; i++)
        for (int64_t r = 0; r < rows; r++) {
            const int64_t k = i * n_exp * rows + 2 * rows + r;
            if (r >= r0 && r < r1)
                CHECK(within(Y[i * ldy + r], yref[k], mag[k]), "range tok %lld row %lld", (long long)i,
                      (long long)r);
            else
                CHECK(Y[i * ldy + r] == SENTINEL, "outside the range written: %lld %lld", (long long)i, (long long)r);
        }
    /* the single-threaded core over the whole stack, as a pool task would,
     * with one dot per (row, token) and with the multi-row dots */
    float *Yall = malloc(sizeof(float) * (size_t)(n_tok * n_exp * rows));
    nm_matmul_rows(nm_vec_dot_for(type, ctx.isa), stack, rb, 0, n_exp * rows, &act, NULL, n_tok, Yall, n_exp * rows);
    compare("nm_matmul_rows", Yall, n_exp * rows, yref, mag, n_exp * rows, NULL, n_tok);
    nm_matmul_rows_multi(nm_vec_dot_for(type, ctx.isa), nm_vec_dot_multi_for(type, ctx.isa), stack, rb, 0,
                         n_exp * rows, &act, NULL, n_tok, Yall, n_exp * rows);
    compare("nm_matmul_rows_multi", Yall, n_exp * rows, yref, mag, n_exp * rows, NULL, n_tok);

    /* misuse is refused */
    CHECK(nm_matmul_act(&ctx, pool, NM_TYPE_Q8_0, stack, rows, &act, NULL, 1, Y, ldy) == -1, "act type mismatch");
    const int32_t bad_tok[] = {0, 9};
    CHECK(nm_matmul_act(&ctx, pool, type, stack, rows, &act, bad_tok, 2, Y, ldy) == -1, "token out of range");
    CHECK(nm_matmul_act(&ctx, pool, type, stack, rows, &act, NULL, n_tok + 1, Y, ldy) == -1, "too many tokens");
    CHECK(nm_matmul_act(&ctx, pool, type, stack, rows, &act, NULL, 2, Y, rows - 1) == -1, "ldy < rows");
    CHECK(nm_act_prepare(&ctx, pool, type, X, cols, n_tok, cols - 32, &act) == -1, "cols not a multiple of 256");
    CHECK(nm_act_prepare(&ctx, pool, NM_TYPE_Q8_1, X, cols, n_tok, cols, &act) == -1, "type without a dot");
    CHECK(nm_act_prepare(&ctx, pool, type, X, cols - 1, 2, cols, &act) == -1, "ldx < cols");

    nm_matmul_ctx_free(&ctx);
    nm_pool_destroy(pool);
    free(stack);
    free(X);
    free(yref);
    free(mag);
    free(Y);
    free(Yall);
}

/* The GEMM path (n_sel > 1) goes through the multi-row dots, tokens in
 * groups of NM_DOT_MULTI_MAX against every row of a chunk, the lone last
 * token through the single dot. Its outputs must equal one single dot per
 * (row, token) at the same level bit for bit (see quant.h): n_sel 2..19
 * covers every partial group size and the lone token, a gather repeats and
 * reorders tokens, 1-3 threads split the rows. Bound: 0. */
static void test_gemm_equals_single_dots(void) {
    static const int types[] = {NM_TYPE_Q8_0, NM_TYPE_Q4_0, NM_TYPE_Q5_0, NM_TYPE_Q4_1, NM_TYPE_Q4_K,
                                NM_TYPE_Q5_K, NM_TYPE_Q6_K, NM_TYPE_Q2_K, NM_TYPE_F16,  NM_TYPE_BF16};
    const int64_t rows = 45, cols = 512, max_tok = 19;
    const int32_t gather[] = {4, 18, 0, 4, 7, 7, 1, 12, 3, 9, 2}; /* 11 = 8 + 3 */
    const int64_t n_gather = (int64_t)(sizeof gather / sizeof *gather);
    nm_pool *pools[3] = {NULL, nm_pool_create(2), nm_pool_create(3)};
    nm_matmul_ctx ctx;
    nm_matmul_ctx_init(&ctx);
    const nm_isa best = ctx.isa;
    float *X = malloc(sizeof(float) * (size_t)(cols * max_tok));
    float *Y = malloc(sizeof(float) * (size_t)(rows * max_tok));
    int checked = 0, bad = 0;
    for (size_t ti = 0; ti < sizeof types / sizeof *types; ti++) {
        const int type = types[ti];
        const size_t rb = nm_row_size(type, cols);
        uint8_t *W = random_weights(type, rows, cols);
        for (int64_t i = 0; i < cols * max_tok; i++) X[i] = rng_sym() * 2.0f;
        nm_act act;
        CHECK(nm_act_prepare(&ctx, pools[1], type, X, cols, max_tok, cols, &act) == 0, "prepare %s",
              nm_type_name(type));
        for (int lvl = NM_ISA_SCALAR; lvl <= (int)best; lvl++) {
            ctx.isa = (nm_isa)lvl;
            const nm_vec_dot_fn dot = nm_vec_dot_for(type, (nm_isa)lvl);
            for (int64_t n_sel = 2; n_sel <= max_tok + 1; n_sel++) {
                /* n_sel == max_tok + 1 stands for the gather */
                const int32_t *tok = n_sel > max_tok ? gather : NULL;
                const int64_t n = tok ? n_gather : n_sel;
                nm_pool *pool = pools[n_sel % 3];
                CHECK(nm_matmul_act(&ctx, pool, type, W, rows, &act, tok, n, Y, rows) == 0, "%s", nm_type_name(type));
                for (int64_t i = 0; i < n; i++)
                    for (int64_t r = 0; r < rows; r++) {
                        const int64_t t = tok ? tok[i] : i;
                        const char *xr = (const char *)act.data + (size_t)t * act.stride;
                        const float want = dot(cols, W + (size_t)r * rb, xr);
                        checked++;
                        if (memcmp(&Y[i * rows + r], &want, sizeof want) != 0 && bad++ < 5)
                            CHECK(0, "%s isa %s n_sel %lld%s: Y[%lld][%lld] = %.9g, single dot %.9g",
                                  nm_type_name(type), nm_isa_name((nm_isa)lvl), (long long)n, tok ? " (gather)" : "",
                                  (long long)i, (long long)r, Y[i * rows + r], want);
                    }
            }
        }
        ctx.isa = best;
        free(W);
    }
    CHECK(bad == 0, "%d outputs differ from the single dot", bad);
    fprintf(stderr, "  %d GEMM outputs, all bit-identical to the single dot\n", checked);
    nm_matmul_ctx_free(&ctx);
    for (int p = 1; p < 3; p++) nm_pool_destroy(pools[p]);
    free(X);
    free(Y);
}

/* nm_moe_forward hands each expert's (token, slot) pairs to the multi-row
 * dots in groups; the result must equal, bit for bit, the same computation
 * done one pair and one single dot at a time: h = silu(gate . x) * (up . x)
 * per pair, h quantised for down, out[t] += w * (down . h), added in
 * (expert, pair) order. Two type mixes (V2-Lite's Q4_K/Q4_K/Q5_0 and an
 * all-Q8_0 one, and one with gate and up of different types), experts not
 * held here (NULL), picks computed elsewhere (id -1 - e), a token routed
 * twice to one expert, skewed routing (an
 * expert with many pairs, some with one), 1 and 3 threads, and a 1-token
 * batch (every group a lone pair: the decode path). Bound: 0. The same
 * experts as pre-packed tiles (moe.h's tiled: gate/up, down, both) give
 * the bits of the per-call packing; tiles of a type without them are
 * refused. */
static float tile_dot_q4_K(int64_t n, const void *w, const void *x) { return nm_tile_dot_ref(NM_TYPE_Q4_K, n, w, x); }
static float tile_dot_q5_0(int64_t n, const void *w, const void *x) { return nm_tile_dot_ref(NM_TYPE_Q5_0, n, w, x); }

/* The per-pair dot nm_moe_forward's numbers follow for a weight type. */
static nm_vec_dot_fn moe_dot(int type) {
    if (nm_tile_usable(type)) return type == NM_TYPE_Q4_K ? tile_dot_q4_K : tile_dot_q5_0;
    return nm_vec_dot(type);
}

static void moe_check(int tg, int tu, int td, int64_t n_tok, nm_pool *pool, int schedule) {
    const int64_t n_embd = 512, n_ff = 224, E = 7;
    const int k = 3;
    const size_t rg = nm_row_size(tg, n_embd), ru = nm_row_size(tu, n_embd), rd = nm_row_size(td, n_ff);
    void *gate[7], *up[7], *down[7];
    for (int e = 0; e < E; e++) {
        gate[e] = random_weights(tg, n_ff, n_embd);
        up[e] = random_weights(tu, n_ff, n_embd);
        down[e] = random_weights(td, n_embd, n_ff);
    }
    const void *G[7], *U[7], *D[7];
    for (int e = 0; e < E; e++) {
        const int held = e != 2 && e != 5; /* a worker's shard */
        G[e] = held ? gate[e] : NULL, U[e] = held ? up[e] : NULL, D[e] = held ? down[e] : NULL;
    }
    nm_moe_experts ex = {n_embd, n_ff, E, tg, tu, td, rg, ru, rd, G, U, D, 0};
    float *x = malloc(sizeof(float) * (size_t)(n_tok * n_embd));
    float *out = malloc(sizeof(float) * (size_t)(n_tok * n_embd));
    float *ref = calloc((size_t)(n_tok * n_embd), sizeof(float));
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(n_tok * k));
    float *w = malloc(sizeof(float) * (size_t)(n_tok * k));
    for (int64_t i = 0; i < n_tok * n_embd; i++) x[i] = rng_sym();
    for (int64_t i = 0; i < n_tok * k; i++) {
        /* skewed, so some experts get many tokens and some one or none */
        const uint64_t r = rng_next() % 16;
        ids[i] = (int32_t)(r < 8 ? 0 : r < 11 ? 3 : r < 13 ? 1 : (int64_t)(r % (uint64_t)E));
        w[i] = 0.1f + (float)(rng_next() % 100) / 100.0f;
    }
    if (n_tok > 1) ids[1] = ids[0]; /* token 0 routed to one expert twice */
    /* picks computed elsewhere (-1 - e: the GPU's resident experts) add nothing */
    for (int64_t i = 2; i < n_tok * k; i += 5) ids[i] = -1 - ids[i];
    CHECK(rg && ru && rd, "row sizes");

    char err[128];
    nm_moe_scratch sc = {.schedule = schedule};
    CHECK(nm_moe_forward(pool, &sc, &ex, n_tok, x, k, ids, w, out, err, sizeof err) == 0, "moe: %s", err);
    {
        const int32_t keep = ids[0];
        ids[0] = (int32_t)-E - 1; /* below -1 - (E - 1): refused like an id >= E */
        CHECK(nm_moe_forward(pool, &sc, &ex, n_tok, x, k, ids, w, ref, err, sizeof err) != 0 && strstr(err, "range"),
              "moe: id %d accepted", ids[0]);
        ids[0] = keep;
        memset(ref, 0, sizeof(float) * (size_t)(n_tok * n_embd));
    }

    /* the reference: one pair, one single dot at a time */
    const int vg = nm_type_traits_of(tg)->vec_dot_type, vu = nm_type_traits_of(tu)->vec_dot_type;
    const int vd = nm_type_traits_of(td)->vec_dot_type;
    /* nm_moe_forward computes a matrix with tiles (tile.h) wherever its type has them, one pair or many */
    const nm_vec_dot_fn dg = moe_dot(tg), du = moe_dot(tu), dd = moe_dot(td);
    uint8_t *xg = malloc(nm_row_size(vg, n_embd)), *xu = malloc(nm_row_size(vu, n_embd));
    uint8_t *hq = malloc(nm_row_size(vd, n_ff));
    float *h = malloc(sizeof(float) * (size_t)n_ff);
    for (int e = 0; e < E; e++) {
        if (!G[e]) continue;
        for (int64_t i = 0; i < n_tok * k; i++) {
            if (ids[i] != e) continue;
            const int64_t t = i / k;
            CHECK(nm_quantize_row(vg, x + t * n_embd, xg, n_embd) == 0 &&
                      nm_quantize_row(vu, x + t * n_embd, xu, n_embd) == 0,
                  "quantize %s / %s activations", nm_type_name(vg), nm_type_name(vu));
            for (int64_t r = 0; r < n_ff; r++) {
                const float g = dg(n_embd, (const uint8_t *)G[e] + (size_t)r * rg, xg);
                const float v = du(n_embd, (const uint8_t *)U[e] + (size_t)r * ru, xu);
                h[r] = g / (1.0f + expf(-g)) * v;
            }
            CHECK(nm_quantize_row(vd, h, hq, n_ff) == 0, "quantize %s hidden", nm_type_name(vd));
            for (int64_t r = 0; r < n_embd; r++)
                ref[t * n_embd + r] += w[i] * dd(n_ff, (const uint8_t *)D[e] + (size_t)r * rd, hq);
        }
    }
    int bad = 0;
    for (int64_t i = 0; i < n_tok * n_embd; i++)
        if (memcmp(&out[i], &ref[i], sizeof out[i]) != 0 && bad++ < 3)
            CHECK(0, "moe %s/%s/%s n_tok %lld threads %d schedule %d: out[%lld][%lld] = %.9g, per-pair %.9g",
                  nm_type_name(tg), nm_type_name(tu), nm_type_name(td), (long long)n_tok, nm_pool_size(pool), schedule,
                  (long long)(i / n_embd),
                  (long long)(i % n_embd), out[i], ref[i]);

    /* the same experts held as pre-packed tiles (every tileable matrix, as a
     * worker's shard holds them): the same bits, nothing packed per call */
    const int tgu = nm_tile_usable(tg) && nm_tile_usable(tu), tdn = nm_tile_usable(td);
    if (tgu || tdn) {
        void *tiles[7][3] = {{0}};
        const void *TG[7], *TU[7], *TD[7];
        for (int e = 0; e < E; e++) {
            TG[e] = G[e], TU[e] = U[e], TD[e] = D[e];
            if (!G[e]) continue;
            if (tgu) {
                tiles[e][0] = aligned_alloc(64, nm_tile_matrix_size(tg, n_embd, n_ff));
                tiles[e][1] = aligned_alloc(64, nm_tile_matrix_size(tu, n_embd, n_ff));
                nm_tile_pack_matrix(tg, n_embd, G[e], rg, n_ff, tiles[e][0]);
                nm_tile_pack_matrix(tu, n_embd, U[e], ru, n_ff, tiles[e][1]);
                TG[e] = tiles[e][0], TU[e] = tiles[e][1];
            }
            if (tdn) {
                tiles[e][2] = aligned_alloc(64, nm_tile_matrix_size(td, n_ff, n_embd));
                nm_tile_pack_matrix(td, n_ff, D[e], rd, n_embd, tiles[e][2]);
                TD[e] = tiles[e][2];
            }
        }
        const unsigned flags_list[] = {NM_MOE_TILED_GATE_UP, NM_MOE_TILED_DOWN,
                                       NM_MOE_TILED_GATE_UP | NM_MOE_TILED_DOWN};
        float *out2 = malloc(sizeof(float) * (size_t)(n_tok * n_embd));
        for (int fi = 0; fi < 3; fi++) {
            const unsigned fl = flags_list[fi] & ((tgu ? NM_MOE_TILED_GATE_UP : 0u) | (tdn ? NM_MOE_TILED_DOWN : 0u));
            if (fl != flags_list[fi]) continue;
            nm_moe_experts et = ex;
            et.tiled = fl;
            et.gate = (fl & NM_MOE_TILED_GATE_UP) ? TG : G, et.up = (fl & NM_MOE_TILED_GATE_UP) ? TU : U;
            et.down = (fl & NM_MOE_TILED_DOWN) ? TD : D;
            CHECK(nm_moe_forward(pool, &sc, &et, n_tok, x, k, ids, w, out2, err, sizeof err) == 0, "moe tiled: %s", err);
            int bad2 = 0;
            for (int64_t i = 0; i < n_tok * n_embd; i++)
                if (memcmp(&out[i], &out2[i], sizeof out[i]) != 0 && bad2++ < 3)
                    CHECK(0, "moe %s/%s/%s tiled %u n_tok %lld: out[%lld][%lld] = %.9g, packed per call %.9g",
                          nm_type_name(tg), nm_type_name(tu), nm_type_name(td), fl, (long long)n_tok,
                          (long long)(i / n_embd), (long long)(i % n_embd), out2[i], out[i]);
        }
        free(out2);
        for (int e = 0; e < E; e++) free(tiles[e][0]), free(tiles[e][1]), free(tiles[e][2]);
    } else {
        /* tiles asked for where they cannot run: refused, not computed wrong */
        nm_moe_experts et = ex;
        et.tiled = NM_MOE_TILED_GATE_UP;
        CHECK(nm_moe_forward(pool, &sc, &et, n_tok, x, k, ids, w, out, err, sizeof err) != 0 && strstr(err, "tiles"),
              "moe: tiles of %s accepted", nm_type_name(tg));
    }
    nm_moe_scratch_free(&sc);
    for (int e = 0; e < E; e++) free(gate[e]), free(up[e]), free(down[e]);
    free(x), free(out), free(ref), free(ids), free(w), free(xg), free(xu), free(hq), free(h);
}

/* Every case in each schedule (moe.h: staged, fused, and auto, which is
 * fused for the 1- and 2-token batches and staged for 29), 1 and 3 threads;
 * 6 threads over the 3 cases' experts leave threads waiting in the fused
 * schedule's down units for experts still in gate+up. */
static void test_moe_equals_single_dots(void) {
    nm_pool *pool = nm_pool_create(3), *pool6 = nm_pool_create(6);
    const int64_t ntoks[] = {1, 2, 29};
    for (int sch = NM_MOE_AUTO; sch <= NM_MOE_FUSED; sch++) {
        for (int i = 0; i < 3; i++) {
            moe_check(NM_TYPE_Q4_K, NM_TYPE_Q4_K, NM_TYPE_Q5_0, ntoks[i], NULL, sch);
            moe_check(NM_TYPE_Q4_K, NM_TYPE_Q4_K, NM_TYPE_Q5_0, ntoks[i], pool, sch);
            moe_check(NM_TYPE_Q8_0, NM_TYPE_Q8_0, NM_TYPE_Q8_0, ntoks[i], pool6, sch);
        }
        moe_check(NM_TYPE_Q6_K, NM_TYPE_Q5_K, NM_TYPE_Q4_0, 29, pool, sch); /* gate and up of different types */
        moe_check(NM_TYPE_Q6_K, NM_TYPE_Q5_K, NM_TYPE_Q4_0, 2, pool6, sch);
    }
    nm_pool_destroy(pool);
    nm_pool_destroy(pool6);
}

/* The AMX path of the staged schedule (moe.c: experts of 16 pairs or more
 * through nm_tile_gemm_many, their x rows gathered in pair order) with the
 * tile unit emulated (tile.h: nm_tile_amx_emulate), so it runs on any CPU
 * with AVX512-VNNI: the same bits as one pair and one dot at a time, rows
 * or pre-packed tiles, 1 and 3 threads. With 29 and 64 tokens (k = 3,
 * skewed) expert 0 gets about 45 and 96 pairs (full 16-token tiles, a
 * partial one, two calls of NM_TILE_MANY), expert 3 about 16, the rest
 * fewer (the VNNI path beside it). The emulation must have served calls. */
static void test_moe_amx_emulated(void) {
    if (!nm_tile_usable(NM_TYPE_Q4_K) || !nm_tile_usable(NM_TYPE_Q5_0)) {
        fprintf(stderr, "  skip: no AVX512-VNNI tiles on this CPU (isa %s)\n", nm_isa_name(nm_isa_best()));
        return;
    }
    nm_pool *pool = nm_pool_create(3);
    nm_tile_amx_emulate(1);
    const long before = nm_tile_amx_emulated_calls();
    CHECK(nm_tile_amx_usable(NM_TYPE_Q4_K) && nm_tile_amx_usable(NM_TYPE_Q5_0), "emulated AMX not usable");
    moe_check(NM_TYPE_Q4_K, NM_TYPE_Q4_K, NM_TYPE_Q5_0, 29, NULL, NM_MOE_STAGED);
    moe_check(NM_TYPE_Q4_K, NM_TYPE_Q4_K, NM_TYPE_Q5_0, 29, pool, NM_MOE_STAGED);
    moe_check(NM_TYPE_Q4_K, NM_TYPE_Q4_K, NM_TYPE_Q5_0, 64, pool, NM_MOE_AUTO);
    const long calls = nm_tile_amx_emulated_calls() - before;
    nm_tile_amx_emulate(0);
    CHECK(calls > 0, "moe never took the AMX path");
    fprintf(stderr, "  %ld nm_tile_gemm_many calls on the emulated tile unit\n", calls);
    nm_pool_destroy(pool);
}

/* The scratch grows with the batch and is reused; F32 weights read X in
 * place. */
/* ctx.tiles (matmul.h): the types with tiles give nm_tile_dot_ref's number
 * per (row, token) bit for bit, for 1..19 tokens and a gather (every token
 * count the same bits: decode equals prefill), 1-3 threads, row counts that
 * are not whole tiles or chunks, a Q5_0 row of an odd block count (the
 * padded pair), padded ldy left untouched. Below the VNNI level the same
 * ctx falls back to the single dot's numbers; an act prepared without the
 * aux for the tile type is refused rather than computed with other numbers.
 * Bound: 0. */
static void test_tiles_equal_tile_ref(void) {
    if (!nm_tile_usable(NM_TYPE_Q4_K) || !nm_tile_usable(NM_TYPE_Q5_0)) {
        fprintf(stderr, "  no tiles on this CPU/ISA: skipped\n");
        return;
    }
    static const struct { int type; int64_t rows, cols; } cases[] = {
        {NM_TYPE_Q4_K, 45, 512}, {NM_TYPE_Q4_K, 200, 768}, {NM_TYPE_Q5_0, 45, 480}, {NM_TYPE_Q5_0, 77, 512}};
    const int64_t max_tok = 19, pad = 3;
    const int32_t gather[] = {4, 18, 0, 4, 7, 7, 1, 12, 3, 9, 2}; /* 11 = 8 + 3 */
    const int64_t n_gather = (int64_t)(sizeof gather / sizeof *gather);
    nm_pool *pools[3] = {NULL, nm_pool_create(2), nm_pool_create(3)};
    nm_matmul_ctx ctx;
    nm_matmul_ctx_init(&ctx);
    ctx.tiles = 1;
    int checked = 0, bad = 0;
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        const int type = cases[ci].type;
        const int64_t rows = cases[ci].rows, cols = cases[ci].cols, ldy = rows + pad;
        const size_t rb = nm_row_size(type, cols);
        uint8_t *W = random_weights(type, rows, cols);
        float *X = malloc(sizeof(float) * (size_t)(cols * max_tok));
        float *Y = malloc(sizeof(float) * (size_t)(ldy * max_tok));
        float *want = malloc(sizeof(float) * (size_t)(rows * max_tok));
        for (int64_t i = 0; i < cols * max_tok; i++) X[i] = rng_sym() * 2.0f;
        nm_act act;
        CHECK(nm_act_prepare(&ctx, pools[1], type, X, cols, max_tok, cols, &act) == 0, "prepare %s",
              nm_type_name(type));
        CHECK(act.aux_type == type && act.aux != NULL, "%s: aux derived", nm_type_name(type));
        for (int64_t t = 0; t < max_tok; t++)
            for (int64_t r = 0; r < rows; r++)
                want[t * rows + r] = nm_tile_dot_ref(type, cols, W + (size_t)r * rb,
                                                     (const char *)act.data + (size_t)t * act.stride);
        for (int64_t n_sel = 1; n_sel <= max_tok + 1; n_sel++) {
            const int32_t *tok = n_sel > max_tok ? gather : NULL; /* max_tok + 1: the gather */
            const int64_t n = tok ? n_gather : n_sel;
            for (int p = 0; p < 3; p++) {
                fill(Y, (size_t)(ldy * max_tok));
                CHECK(nm_matmul_act(&ctx, pools[p], type, W, rows, &act, tok, n, Y, ldy) == 0, "%s n %lld",
                      nm_type_name(type), (long long)n);
                for (int64_t i = 0; i < n; i++) {
                    const int64_t t = tok ? tok[i] : i;
                    for (int64_t r = 0; r < rows; r++, checked++)
                        if (memcmp(&Y[i * ldy + r], &want[t * rows + r], sizeof(float)) != 0 && bad++ < 5)
                            CHECK(0, "%s rows %lld n %lld%s threads %d: Y[%lld][%lld] = %.9g, tile ref %.9g",
                                  nm_type_name(type), (long long)rows, (long long)n, tok ? " (gather)" : "", p + 1,
                                  (long long)i, (long long)r, Y[i * ldy + r], want[t * rows + r]);
                    for (int64_t r = rows; r < ldy; r++)
                        if (Y[i * ldy + r] != SENTINEL && bad++ < 5)
                            CHECK(0, "%s: padding Y[%lld][%lld] written", nm_type_name(type), (long long)i,
                                  (long long)r);
                }
            }
        }
        /* decode as its own call: each token prepared alone gives the batch's bits */
        for (int64_t t = 0; t < max_tok; t += 5) {
            nm_act one;
            CHECK(nm_act_prepare(&ctx, NULL, type, X + t * cols, cols, 1, cols, &one) == 0, "prepare one");
            fill(Y, (size_t)ldy);
            CHECK(nm_matmul_act(&ctx, pools[2], type, W, rows, &one, NULL, 1, Y, ldy) == 0, "one token");
            for (int64_t r = 0; r < rows; r++, checked++)
                if (memcmp(&Y[r], &want[t * rows + r], sizeof(float)) != 0 && bad++ < 5)
                    CHECK(0, "%s token %lld alone: Y[%lld] = %.9g, in the batch %.9g", nm_type_name(type),
                          (long long)t, (long long)r, Y[r], want[t * rows + r]);
        }
        /* an act without the aux (prepared with tiles off) is refused */
        ctx.tiles = 0;
        CHECK(nm_act_prepare(&ctx, NULL, type, X, cols, 2, cols, &act) == 0 && act.aux_type == -1, "prepare, no aux");
        ctx.tiles = 1;
        CHECK(nm_matmul_act(&ctx, NULL, type, W, rows, &act, NULL, 2, Y, ldy) == -1, "%s: act without aux refused",
              nm_type_name(type));
        /* below VNNI: the single dot's numbers, tiles or not */
        ctx.isa = NM_ISA_AVX2;
        CHECK(nm_act_prepare(&ctx, NULL, type, X, cols, 3, cols, &act) == 0 && act.aux_type == -1, "prepare avx2");
        CHECK(nm_matmul_act(&ctx, pools[1], type, W, rows, &act, NULL, 3, Y, ldy) == 0, "avx2 matmul");
        const nm_vec_dot_fn dot = nm_vec_dot_for(type, NM_ISA_AVX2);
        for (int64_t i = 0; i < 3; i++)
            for (int64_t r = 0; r < rows; r++, checked++) {
                const float d = dot(cols, W + (size_t)r * rb, (const char *)act.data + (size_t)i * act.stride);
                if (memcmp(&Y[i * ldy + r], &d, sizeof d) != 0 && bad++ < 5)
                    CHECK(0, "%s avx2: Y[%lld][%lld] = %.9g, single dot %.9g", nm_type_name(type), (long long)i,
                          (long long)r, Y[i * ldy + r], d);
            }
        ctx.isa = nm_isa_best();
        free(W);
        free(X);
        free(Y);
        free(want);
    }
    CHECK(bad == 0, "%d outputs differ", bad);
    fprintf(stderr, "  %d tile-path outputs, all bit-identical to their reference\n", checked);
    nm_matmul_ctx_free(&ctx);
    for (int p = 1; p < 3; p++) nm_pool_destroy(pools[p]);
}

static void test_scratch_reuse(void) {
    nm_matmul_ctx ctx;
    nm_matmul_ctx_init(&ctx);
    const int64_t cols = 256;
    float *X = malloc(sizeof(float) * (size_t)(64 * cols));
    for (int64_t i = 0; i < 64 * cols; i++) X[i] = rng_sym();
    nm_act act;
    CHECK(nm_act_prepare(&ctx, NULL, NM_TYPE_Q8_0, X, cols, 2, cols, &act) == 0, "prepare 2");
    const size_t cap2 = ctx.scratch_cap;
    CHECK(cap2 >= 2 * nm_row_size(NM_TYPE_Q8_0, cols), "scratch holds 2 rows");
    CHECK(((uintptr_t)act.data & 63) == 0 && act.stride % 64 == 0, "rows on cache lines");
    CHECK(nm_act_prepare(&ctx, NULL, NM_TYPE_Q8_0, X, cols, 64, cols, &act) == 0, "prepare 64");
    CHECK(ctx.scratch_cap >= 64 * nm_row_size(NM_TYPE_Q8_0, cols) && ctx.scratch_cap >= cap2, "scratch grew");
    const size_t cap64 = ctx.scratch_cap;
    CHECK(nm_act_prepare(&ctx, NULL, NM_TYPE_Q8_0, X, cols, 3, cols, &act) == 0, "prepare 3");
    CHECK(ctx.scratch_cap == cap64, "scratch kept");
    CHECK(nm_act_prepare(&ctx, NULL, NM_TYPE_BF16, X, cols, 3, cols, &act) == 0 && act.data == X &&
              act.type == NM_TYPE_F32 && act.stride == cols * sizeof(float),
          "F32 activations used in place");
    nm_matmul_ctx_free(&ctx);
    CHECK(ctx.scratch == NULL && ctx.scratch_cap == 0, "freed");
    free(X);
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    rng_seed(NULL);
    RUN(test_pool_runs_each_ith_once);
    RUN(test_matmul_matches_naive);
    RUN(test_prepared_gather_and_slabs);
    RUN(test_gemm_equals_single_dots);
    RUN(test_moe_equals_single_dots);
    RUN(test_moe_amx_emulated);
    RUN(test_tiles_equal_tile_ref);
    RUN(test_scratch_reuse);
    fprintf(stderr, "  largest |y - y_ref| / M: %.2e (bound %.0e)\n", mm_worst, MM_REL);
    return check_summary();
}
