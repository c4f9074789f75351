/* bench_moe.c - see bench_moe.h.
 *
 * Each shape is a MoE layer of random valid blocks (a set of distinct rows
 * quantised from random floats, repeated, as cmd_bench_kernels.c fills its
 * buffers: the kernels' speed does not depend on the bits). A call routes
 * one token to k experts; consecutive calls take the next k experts in
 * turn, so an expert is read again only after E / k calls (hundreds of MB
 * later: from memory, as in a real step, not from the last-level cache).
 * The figure is the best over reps of the mean of a run of calls. The
 * experts held per shape are what --mb's budget holds (up to 256), so that
 * they exceed the last-level cache as the GEMV table's weights do. */
#include "launch/bench_moe.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "common/clock.h"
#include "kernels/moe.h"
#include "kernels/quant.h"
#include "kernels/tile.h"

typedef struct {
    const char *name;
    int64_t n_embd, n_ff;
    int k, type_gate, type_up, type_down;
} moe_shape;

#define MAX_EXPERTS 256 /* held per shape at most (the budget decides below that) */

/* DeepSeek-V2-Lite's experts as its Q4_K_M files hold them (1408 is no
 * multiple of 256: down falls back to Q5_0), and V3's (all Q4_K) */
static const moe_shape shapes_known[] = {
    {"v2-lite", 2048, 1408, 6, NM_TYPE_Q4_K, NM_TYPE_Q4_K, NM_TYPE_Q5_0},
    {"v3", 7168, 2048, 8, NM_TYPE_Q4_K, NM_TYPE_Q4_K, NM_TYPE_Q4_K},
};

#define DISTINCT 64

/* rows x cols of type into a fresh 2-MiB-aligned buffer (huge pages where
 * the kernel gives them) */
static uint8_t *random_matrix(int type, int64_t rows, int64_t cols, unsigned *seed) {
    const size_t rb = nm_row_size(type, cols), bytes = (size_t)rows * rb, huge = (size_t)1 << 21;
    uint8_t *m = aligned_alloc(huge, (bytes + huge - 1) & ~(huge - 1));
    float *f = malloc(sizeof(float) * (size_t)cols);
    if (!m || !f) {
        free(m);
        free(f);
        return NULL;
    }
    madvise(m, bytes, MADV_HUGEPAGE);
    const int64_t distinct = rows < DISTINCT ? rows : DISTINCT;
    for (int64_t r = 0; r < distinct; r++) {
        for (int64_t c = 0; c < cols; c++) f[c] = (float)rand_r(seed) / (float)RAND_MAX * 2.0f - 1.0f;
        nm_quantize_row(type, f, m + (size_t)r * rb, cols);
    }
    for (int64_t r = distinct; r < rows; r += distinct)
        memcpy(m + (size_t)r * rb, m, (size_t)(rows - r < distinct ? rows - r : distinct) * rb);
    free(f);
    return m;
}

/* The same matrices, E of rows x cols each, as tiles (tile.h); NULL where
 * the type has none here */
static uint8_t *as_tiles(int type, const uint8_t *m, int64_t E, int64_t rows, int64_t cols) {
    if (!nm_tile_usable(type)) return NULL;
    const size_t rb = nm_row_size(type, cols), ts = nm_tile_matrix_size(type, cols, rows);
    uint8_t *t = aligned_alloc(64, (size_t)E * ts);
    if (!t) return NULL;
    for (int64_t e = 0; e < E; e++) nm_tile_pack_matrix(type, cols, m + (size_t)e * (size_t)rows * rb, rb, rows, t + (size_t)e * ts);
    return t;
}

static int bench_shape(nm_pool *pool, const moe_shape *sh, int reps, double read_gbs, size_t budget, long llc) {
    unsigned seed = 7;
    const int64_t H = sh->n_embd, F = sh->n_ff;
    const size_t rg = nm_row_size(sh->type_gate, H), ru = nm_row_size(sh->type_up, H), rd = nm_row_size(sh->type_down, F);
    /* as many experts as the budget holds (each once as rows, once as tiles), at least one call's */
    const double expert_bytes = (double)F * (double)(rg + ru) + (double)H * (double)rd;
    int64_t E = (int64_t)((double)budget / expert_bytes);
    E = E < sh->k ? sh->k : E > MAX_EXPERTS ? MAX_EXPERTS : E;
    uint8_t *G = random_matrix(sh->type_gate, E * F, H, &seed), *U = random_matrix(sh->type_up, E * F, H, &seed);
    uint8_t *D = random_matrix(sh->type_down, E * H, F, &seed);
    uint8_t *TG = G ? as_tiles(sh->type_gate, G, E, F, H) : NULL, *TU = U ? as_tiles(sh->type_up, U, E, F, H) : NULL;
    uint8_t *TD = D ? as_tiles(sh->type_down, D, E, H, F) : NULL;
    const void **ptr = calloc((size_t)E * 6, sizeof *ptr);
    float *x = malloc(sizeof(float) * (size_t)H), *out = malloc(sizeof(float) * (size_t)H);
    int32_t ids[64];
    float w[64];
    int rc = 0;
    if (!G || !U || !D || !ptr || !x || !out) {
        fprintf(stderr, "numoe bench kernels: out of memory for the %s experts\n", sh->name);
        rc = 1;
        goto done;
    }
    for (int64_t c = 0; c < H; c++) x[c] = (float)rand_r(&seed) / (float)RAND_MAX - 0.5f;
    const size_t tsg = TG ? nm_tile_matrix_size(sh->type_gate, H, F) : 0, tsu = TU ? nm_tile_matrix_size(sh->type_up, H, F) : 0;
    const size_t tsd = TD ? nm_tile_matrix_size(sh->type_down, F, H) : 0;
    for (int64_t e = 0; e < E; e++) {
        ptr[e] = G + (size_t)e * (size_t)F * rg, ptr[E + e] = U + (size_t)e * (size_t)F * ru;
        ptr[2 * E + e] = D + (size_t)e * (size_t)H * rd;
        ptr[3 * E + e] = TG ? TG + (size_t)e * tsg : ptr[e];
        ptr[4 * E + e] = TU ? TU + (size_t)e * tsu : ptr[E + e];
        ptr[5 * E + e] = TD ? TD + (size_t)e * tsd : ptr[2 * E + e];
    }
    const int calls = (int)(2 * E / sh->k) > 8 ? (int)(2 * E / sh->k) : 8;
    printf("  %-7s %5lld x %-5lld %s/%s/%s, %d of %lld experts a call (%.2f MB read, %.0f MB held%s)\n", sh->name,
           (long long)H, (long long)F, nm_type_name(sh->type_gate), nm_type_name(sh->type_up),
           nm_type_name(sh->type_down), sh->k, (long long)E, sh->k * expert_bytes / 1e6, E * expert_bytes / 1e6,
           llc > 0 && E * expert_bytes < 4.0 * (double)llc ? ": under 4x the last-level cache, raise --mb" : "");
    for (int layout = 0; layout < 2; layout++) {
        nm_moe_experts ex = {H, F, E, sh->type_gate, sh->type_up, sh->type_down, rg, ru, rd, ptr, ptr + E, ptr + 2 * E, 0};
        if (layout == 1) {
            ex.tiled = (TG && TU ? NM_MOE_TILED_GATE_UP : 0u) | (TD ? NM_MOE_TILED_DOWN : 0u);
            if (!ex.tiled) continue;
            if (ex.tiled & NM_MOE_TILED_GATE_UP) ex.gate = ptr + 3 * E, ex.up = ptr + 4 * E;
            if (ex.tiled & NM_MOE_TILED_DOWN) ex.down = ptr + 5 * E;
        }
        for (int sch = NM_MOE_STAGED; sch <= NM_MOE_FUSED; sch++) {
            nm_moe_scratch sc = {.schedule = sch};
            char msg[256];
            double best = 1e30;
            int64_t next = 0;
            for (int r = 0; r <= reps && !rc; r++) { /* r = 0 warms up */
                const double t0 = nm_now_s();
                for (int c = 0; c < calls && !rc; c++) {
                    for (int j = 0; j < sh->k; j++) ids[j] = (int32_t)((next + j) % E), w[j] = 1.0f / (float)sh->k;
                    next += sh->k;
                    if (nm_moe_forward(pool, &sc, &ex, 1, x, sh->k, ids, w, out, msg, sizeof msg)) {
                        fprintf(stderr, "numoe bench kernels: %s experts: %s\n", sh->name, msg);
                        rc = 1;
                    }
                }
                const double t = (nm_now_s() - t0) / calls;
                if (r > 0 && t < best) best = t;
            }
            nm_moe_scratch_free(&sc);
            if (rc) break;
            const double gbs = sh->k * expert_bytes / best / 1e9;
            printf("    %-30s %-7s %9.1f %8.1f %5.0f%%\n",
                   layout ? (ex.tiled == (NM_MOE_TILED_GATE_UP | NM_MOE_TILED_DOWN) ? "tiles (a worker's shard)"
                                                                                   : "tiles where the type has them")
                          : "rows (the GGUF's, in process)",
                   sch == NM_MOE_STAGED ? "staged" : "fused", best * 1e6, gbs, 100.0 * gbs / read_gbs);
            fflush(stdout);
        }
    }
done:
    free(G), free(U), free(D), free(TG), free(TU), free(TD), free(ptr), free(x), free(out);
    return rc;
}

int nm_bench_moe_decode(nm_pool *pool, const char *shapes, int reps, double read_gbs, size_t budget, long llc) {
    const int n_known = (int)(sizeof shapes_known / sizeof shapes_known[0]);
    for (const char *p = shapes; *p;) { /* every name first, before any allocation */
        const size_t len = strcspn(p, ",");
        int found = 0;
        for (int i = 0; i < n_known; i++) found |= strlen(shapes_known[i].name) == len && !strncmp(p, shapes_known[i].name, len);
        if (!found) {
            fprintf(stderr, "numoe bench kernels: --moe: unknown shape '%.*s' (v2-lite, v3, none)\n", (int)len, p);
            return 2;
        }
        p += len + (p[len] == ',');
    }
    printf("\nrouted experts of one decode token (nm_moe_forward), %d threads: us per call, GB/s of expert bytes,\n"
           "%% = share of the read bandwidth\n\n", nm_pool_size(pool));
    printf("    %-30s %-7s %9s %8s %6s\n", "layout", "order", "us", "GB/s", "%");
    int rc = 0;
    for (const char *p = shapes; *p && !rc;) {
        const size_t len = strcspn(p, ",");
        for (int i = 0; i < n_known; i++)
            if (strlen(shapes_known[i].name) == len && !strncmp(p, shapes_known[i].name, len))
                rc = bench_shape(pool, &shapes_known[i], reps, read_gbs, budget, llc);
        p += len + (p[len] == ',');
    }
    return rc;
}
