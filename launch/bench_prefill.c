/* bench_prefill.c - see bench_prefill.h.
 *
 * The matrix is random valid Q4_K rows (64 distinct ones quantised from
 * random floats, repeated: the kernels' speed does not depend on the bits),
 * packed once into tiles as a worker's shard holds them; the activations
 * n_tok rows of random floats quantised to Q8_K with their aux, rows back to
 * back. Work units are (group of NM_TILE_MANY tokens, 16-row tile), every
 * tile of one group before the next group, taken from an atomic counter by
 * the pool's threads: a group's activations (64 x 8 KB) stay in L2 while
 * the tiles (68 KB each) stream past. The other order, each tile against
 * all 256 tokens (2 MB of activations, L3), ran the AMX kernel 3x slower on
 * one thread of a Xeon with AMX (64 ms against 19): the tile unit reads 4
 * KB of activations per 16 x 16 x 256 block product.
 *
 * Peak: nm_tile_amx_spin on each thread (four independent accumulators, no
 * memory operands), long enough (tens of ms) to reach the licence
 * frequency the GEMM also runs at. */
#include "launch/bench_prefill.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "kernels/quant.h"
#include "kernels/tile.h"

#define ROWS 2048 /* DeepSeek-V3: n_ff of a routed expert (the gate's rows) */
#define COLS 7168 /* its hidden size */
#define DISTINCT 64
#define SPIN_STEPS (1 << 18) /* x 4 TDPBSUD: ~17 M cycles at 16 cycles each */

typedef struct {
    const uint8_t *tiles, *x, *aux;
    size_t ts, xrow, arow;
    int n_tok, amx;
    float *out; /* [n_tok][ROWS] */
    atomic_long next;
    long units;
} prefill_job;

/* VNNI: nm_tile_gemm in groups of NM_TILE_NX, placed ROWS apart */
static void vnni_group(const prefill_job *j, const uint8_t *tile, int t0, int nx, float *out) {
    const nm_tile_gemm_fn gemm = nm_tile_gemm_vnni(NM_TYPE_Q4_K);
    for (int k0 = 0; k0 < nx; k0 += NM_TILE_NX) {
        const int g = nx - k0 < NM_TILE_NX ? nx - k0 : NM_TILE_NX;
        const void *xs[NM_TILE_NX], *as[NM_TILE_NX];
        for (int k = 0; k < g; k++)
            xs[k] = j->x + (size_t)(t0 + k0 + k) * j->xrow, as[k] = j->aux + (size_t)(t0 + k0 + k) * j->arow;
        float o[NM_TILE_NX * NM_TILE_ROWS];
        gemm(COLS, tile, xs, as, g, o);
        for (int k = 0; k < g; k++) memcpy(out + (size_t)(k0 + k) * ROWS, o + k * NM_TILE_ROWS, sizeof(float) * NM_TILE_ROWS);
    }
}

static void prefill_task(void *ctx, int ith, int nth) {
    prefill_job *j = ctx;
    (void)ith, (void)nth;
    const nm_tile_many_fn amx = j->amx ? nm_tile_gemm_many_amx(NM_TYPE_Q4_K) : NULL;
    for (long u; (u = atomic_fetch_add(&j->next, 1)) < j->units;) {
        const long ntl = ROWS / NM_TILE_ROWS, g = u / ntl, t = u % ntl;
        const int t0 = (int)g * NM_TILE_MANY, nx = j->n_tok - t0 < NM_TILE_MANY ? j->n_tok - t0 : NM_TILE_MANY;
        const uint8_t *tile = j->tiles + (size_t)t * j->ts;
        float *out = j->out + (size_t)t0 * ROWS + (size_t)t * NM_TILE_ROWS;
        if (amx)
            amx(COLS, tile, j->x + (size_t)t0 * j->xrow, j->xrow, j->aux + (size_t)t0 * j->arow, j->arow, nx, out, ROWS);
        else
            vnni_group(j, tile, t0, nx, out);
    }
}

static void spin_task(void *ctx, int ith, int nth) {
    (void)ctx, (void)ith, (void)nth;
    nm_tile_amx_spin(SPIN_STEPS);
}

/* best seconds of reps runs after one warm-up */
static double best_of(nm_pool *pool, prefill_job *j, int reps) {
    double best = 1e30;
    for (int r = 0; r <= reps; r++) {
        atomic_store(&j->next, 0);
        const double t0 = nm_now_s();
        nm_pool_run(pool, prefill_task, j);
        const double t = nm_now_s() - t0;
        if (r > 0 && t < best) best = t;
    }
    return best;
}

static double spin_best(nm_pool *pool, int reps) {
    double best = 1e30;
    for (int r = 0; r <= reps; r++) {
        const double t0 = nm_now_s();
        nm_pool_run(pool, spin_task, NULL);
        const double t = nm_now_s() - t0;
        if (r > 0 && t < best) best = t;
    }
    return best;
}

int nm_bench_prefill(nm_pool *pool, int n_tok, int reps, int vnni) {
    printf("\nprefill GEMM of one expert matrix: %d tokens x %d x %d Q4_K (DeepSeek-V3's gate), pre-packed tiles;\n"
           "TOPS = 1e12 int8 ops/s (2 per multiply-add); %% = share of the AMX peak on as many threads\n\n",
           n_tok, ROWS, COLS);
    if (!vnni || !nm_tile_usable(NM_TYPE_Q4_K)) {
        printf("  no tile GEMM here: it needs avx512vnni (isa %s%s)\n", nm_isa_name(nm_isa_best()),
               vnni ? "" : ", --isa below it");
        return 0;
    }
    const int nth = nm_pool_size(pool), amx = nm_isa_amx();
    const size_t rb = nm_row_size(NM_TYPE_Q4_K, COLS), ts = nm_tile_size(NM_TYPE_Q4_K, COLS);
    const size_t xrow = nm_row_size(NM_TYPE_Q8_K, COLS), arow = nm_tile_aux_size(NM_TYPE_Q4_K, COLS);
    uint8_t *rows = malloc(rb * ROWS), *tiles = aligned_alloc(64, ts * (ROWS / NM_TILE_ROWS));
    uint8_t *x = malloc(xrow * (size_t)n_tok), *aux = malloc(arow * (size_t)n_tok);
    float *f = malloc(sizeof(float) * COLS), *out_amx = malloc(sizeof(float) * ROWS * (size_t)n_tok);
    float *out_vnni = malloc(sizeof(float) * ROWS * (size_t)n_tok);
    int rc = 0;
    if (!rows || !tiles || !x || !aux || !f || !out_amx || !out_vnni) {
        fprintf(stderr, "numoe bench kernels: out of memory for the prefill GEMM\n");
        rc = 1;
        goto done;
    }
    unsigned seed = 11;
    for (int r = 0; r < DISTINCT; r++) {
        for (int c = 0; c < COLS; c++) f[c] = (float)rand_r(&seed) / (float)RAND_MAX * 2.0f - 1.0f;
        nm_quantize_row(NM_TYPE_Q4_K, f, rows + (size_t)r * rb, COLS);
    }
    for (int r = DISTINCT; r < ROWS; r += DISTINCT) memcpy(rows + (size_t)r * rb, rows, DISTINCT * rb);
    nm_tile_pack_matrix(NM_TYPE_Q4_K, COLS, rows, rb, ROWS, tiles);
    for (int t = 0; t < n_tok; t++) {
        for (int c = 0; c < COLS; c++) f[c] = (float)rand_r(&seed) / (float)RAND_MAX - 0.5f;
        nm_quantize_row(NM_TYPE_Q8_K, f, x + (size_t)t * xrow, COLS);
        nm_tile_aux(NM_TYPE_Q4_K, COLS, x + (size_t)t * xrow, aux + (size_t)t * arow);
    }
    const double ops = 2.0 * n_tok * (double)ROWS * COLS;
    double peak1 = 0, peakn = 0;
    if (amx) {
        const double spin_ops = (double)SPIN_STEPS * 4 * 16 * 16 * 64 * 2;
        peak1 = spin_ops / spin_best(NULL, reps) / 1e12;
        peakn = spin_ops * nth / spin_best(pool, reps) / 1e12;
    }
    printf("    %-36s %7s %9s %7s %6s\n", "path", "threads", "ms", "TOPS", "%");
    prefill_job j = {tiles, x, aux, ts, xrow, arow, n_tok, 0, NULL, 0, (long)(ROWS / NM_TILE_ROWS) *
                                                                         ((n_tok + NM_TILE_MANY - 1) / NM_TILE_MANY)};
    for (int path = amx ? 0 : 1; path < 2; path++) {
        j.amx = path == 0, j.out = path == 0 ? out_amx : out_vnni;
        for (int all = 0; all < 2; all++) {
            const double t = best_of(all ? pool : NULL, &j, reps), tops = ops / t / 1e12;
            const double peak = all ? peakn : peak1;
            char pct[16] = "-";
            if (peak > 0) snprintf(pct, sizeof pct, "%.0f%%", 100.0 * tops / peak);
            printf("    %-36s %7d %9.2f %7.3f %6s\n",
                   path == 0 ? "AMX tiles (nm_tile_gemm_many)" : "VNNI tiles (nm_tile_gemm, 8 tokens)", all ? nth : 1,
                   t * 1e3, tops, pct);
            fflush(stdout);
        }
    }
    if (amx) {
        printf("    %-36s %7d %9s %7.3f %6s\n", "AMX peak: TDPBSUD on registers", 1, "-", peak1, "100%");
        printf("    %-36s %7d %9s %7.3f %6s\n", "AMX peak: TDPBSUD on registers", nth, "-", peakn, "100%");
        const int same = !memcmp(out_amx, out_vnni, sizeof(float) * ROWS * (size_t)n_tok);
        printf("  AMX and VNNI outputs bit-identical: %s\n", same ? "yes" : "NO (a bug: tile.h's contract)");
        if (!same) rc = 1;
    } else {
        printf("  AMX not available on this CPU: %s\n", nm_isa_amx_why_not());
    }
done:
    free(rows), free(tiles), free(x), free(aux), free(f), free(out_amx), free(out_vnni);
    return rc;
}
