/* test_dot_simd.c - every SIMD dot (AVX2, AVX-512, AVX512-VNNI: each level
 * this CPU runs) against the scalar reference nm_vec_dot_ref, on fresh
 * random rows of several lengths, plus the ISA selection in cpu_isa.c.
 *
 * Data: two kinds of weight rows per case, (a) random floats with varied
 * per-block scale and offset put through nm_quantize_row (what real files
 * hold) and (b) random bytes with random finite fp16 scales (every bit
 * pattern of quants, sub-block scales and mins, including ones no quantiser
 * emits). Activations are random floats quantised to the type's
 * vec_dot_type, as matmul does. The seed is printed; NUMOE_TEST_SEED
 * repeats a run.
 *
 * Bound. Integer parts are exact on both sides, so the paths differ only in
 * float rounding: the products of block scales and the order in which the
 * per-block float terms are summed. By the standard summation error bound
 * (Higham, |fl(sum t_i) - sum t_i| <= (k-1) u sum |t_i| for a chain of k
 * additions, u = 2^-24) each side is within (chain + a few) * u * M of the
 * exact value, where M = sum over elements of |w_i x_i| with the min/offset
 * part counted separately: M = sum (|scale part_i| + |min part_i|) * |x_i|
 * (every per-block term is bounded by its share of M). The reference sums
 * its nb block terms serially (chain nb; float weights in double: chain 1);
 * the SIMD paths keep 8-16 lanes, so their chains are shorter than nb + 8
 * (float weights: n / 8 + 8). The test therefore checks
 *     |simd - ref| <= (chain_ref + chain_simd + 16) * u * M,
 * a worst-case bound that holds for any data: e.g. 1.7e-5 * M for Q8_0 at
 * n = 4096 (128 blocks), 3.2e-5 * M for F32 at n = 4096, 1.5e-6 * M for a
 * single K-quant block. A wrong quant bit moves the result by about
 * M / n or more (2.4e-4 * M at n = 4096), well outside. The observed
 * largest relative errors are printed.
 *
 * The multi-row dots (several activation rows per call) are checked against
 * the single dot of the same level, bit for bit; see test_multi_matches_single. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kernels/dot_simd.h"
#include "kernels/fp16.h"
#include "kernels/quant.h"
#include "tests/unit/check.h"
#include "tests/unit/rng.h"


static const int all_types[] = {NM_TYPE_F32,  NM_TYPE_F16,  NM_TYPE_BF16, NM_TYPE_Q4_0, NM_TYPE_Q4_1,
                                NM_TYPE_Q5_0, NM_TYPE_Q5_1, NM_TYPE_Q8_0, NM_TYPE_Q2_K, NM_TYPE_Q3_K,
                                NM_TYPE_Q4_K, NM_TYPE_Q5_K, NM_TYPE_Q6_K, NM_TYPE_Q8_K};
#define N_TYPES ((int)(sizeof all_types / sizeof all_types[0]))

static int is_float_type(int type) { return type == NM_TYPE_F32 || type == NM_TYPE_F16 || type == NM_TYPE_BF16; }

/* Random floats whose magnitude and offset change every 32 elements, so
 * blocks get different scales and (for the affine formats) nonzero mins. */
static void random_floats(float *x, int64_t n, int with_offset) {
    float scale = 1, offset = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i % 32 == 0) {
            scale = exp2f(6.0f * rng_uniform() - 3.0f);
            offset = with_offset ? (2.0f * rng_uniform() - 1.0f) * scale : 0.0f;
        }
        x[i] = rng_normal() * scale + offset;
    }
}

static nm_half random_half(float lo, float hi, int allow_negative) {
    float v = lo + (hi - lo) * rng_uniform();
    if (allow_negative && (rng_next() & 1)) v = -v;
    return nm_fp32_to_fp16(v);
}

/* Random bytes with every fp16 (or float) scale field replaced by a random
 * finite value: the quant bits, sub-block scales and mins stay random. */
static void random_block_bytes(int type, void *row, int64_t nb) {
    const size_t ts = nm_type_traits_of(type)->type_size;
    uint8_t *p = row;
    for (size_t i = 0; i < ts * (size_t)nb; i++) p[i] = (uint8_t)rng_next();
    for (int64_t b = 0; b < nb; b++) {
        void *blk = p + ts * (size_t)b;
        switch (type) {
        case NM_TYPE_Q4_0: ((block_q4_0 *)blk)->d = random_half(0.01f, 0.2f, 1); break;
        case NM_TYPE_Q5_0: ((block_q5_0 *)blk)->d = random_half(0.01f, 0.2f, 1); break;
        case NM_TYPE_Q8_0: ((block_q8_0 *)blk)->d = random_half(0.001f, 0.02f, 1); break;
        case NM_TYPE_Q4_1:
            ((block_q4_1 *)blk)->d = random_half(0.01f, 0.2f, 0);
            ((block_q4_1 *)blk)->m = random_half(0.01f, 2.0f, 1);
            break;
        case NM_TYPE_Q5_1:
            ((block_q5_1 *)blk)->d = random_half(0.01f, 0.2f, 0);
            ((block_q5_1 *)blk)->m = random_half(0.01f, 2.0f, 1);
            break;
        case NM_TYPE_Q2_K:
            ((block_q2_K *)blk)->d = random_half(0.001f, 0.05f, 0);
            ((block_q2_K *)blk)->dmin = random_half(0.001f, 0.05f, 0);
            break;
        case NM_TYPE_Q3_K: ((block_q3_K *)blk)->d = random_half(0.001f, 0.05f, 1); break;
        case NM_TYPE_Q4_K:
            ((block_q4_K *)blk)->d = random_half(0.001f, 0.05f, 0);
            ((block_q4_K *)blk)->dmin = random_half(0.001f, 0.05f, 0);
            break;
        case NM_TYPE_Q5_K:
            ((block_q5_K *)blk)->d = random_half(0.001f, 0.05f, 0);
            ((block_q5_K *)blk)->dmin = random_half(0.001f, 0.05f, 0);
            break;
        case NM_TYPE_Q6_K: ((block_q6_K *)blk)->d = random_half(0.0005f, 0.01f, 1); break;
        case NM_TYPE_Q8_K: ((block_q8_K *)blk)->d = 0.001f + 0.02f * rng_uniform(); break;
        default: break;
        }
    }
}

/* Zero the min (which = 1) or the scale (which = 0) field of every block of
 * an affine format, so dequantising yields only the other part. Returns 0
 * for formats without a min. */
static int split_affine(int type, void *row, int64_t nb, int which) {
    const size_t ts = nm_type_traits_of(type)->type_size;
    for (int64_t b = 0; b < nb; b++) {
        void *blk = (uint8_t *)row + ts * (size_t)b;
        nm_half *d, *m;
        switch (type) {
        case NM_TYPE_Q4_1: d = &((block_q4_1 *)blk)->d, m = &((block_q4_1 *)blk)->m; break;
        case NM_TYPE_Q5_1: d = &((block_q5_1 *)blk)->d, m = &((block_q5_1 *)blk)->m; break;
        case NM_TYPE_Q2_K: d = &((block_q2_K *)blk)->d, m = &((block_q2_K *)blk)->dmin; break;
        case NM_TYPE_Q4_K: d = &((block_q4_K *)blk)->d, m = &((block_q4_K *)blk)->dmin; break;
        case NM_TYPE_Q5_K: d = &((block_q5_K *)blk)->d, m = &((block_q5_K *)blk)->dmin; break;
        default: return 0;
        }
        *(which ? m : d) = 0;
    }
    return 1;
}

/* M of the bound above. */
static double magnitude(int type, const void *w, size_t wbytes, int act_type, const void *x, int64_t n) {
    float *wd = malloc(sizeof(float) * (size_t)n), *xd = malloc(sizeof(float) * (size_t)n);
    void *tmp = malloc(wbytes);
    double m = 0;
    CHECK(nm_dequantize_row(act_type, x, xd, n) == 0, "dequantize %s", nm_type_name(act_type));
    const int64_t nb = n / nm_type_traits_of(type)->block_size;
    memcpy(tmp, w, wbytes);
    if (split_affine(type, tmp, nb, 1)) {
        for (int which = 0; which < 2; which++) {
            memcpy(tmp, w, wbytes);
            split_affine(type, tmp, nb, which);
            CHECK(nm_dequantize_row(type, tmp, wd, n) == 0, "dequantize %s", nm_type_name(type));
            for (int64_t i = 0; i < n; i++) m += fabs((double)wd[i] * xd[i]);
        }
    } else {
        CHECK(nm_dequantize_row(type, w, wd, n) == 0, "dequantize %s", nm_type_name(type));
        for (int64_t i = 0; i < n; i++) m += fabs((double)wd[i] * xd[i]);
    }
    free(wd);
    free(xd);
    free(tmp);
    return m;
}

static double bound_units(int type, int64_t n) {
    const int64_t bs = nm_type_traits_of(type)->block_size;
    if (is_float_type(type)) return 1.0 + (double)(n / 8 + 8) + 16.0;
    const double nb = (double)(n / bs);
    return nb + (nb + 8) + 16.0;
}

/* Row lengths: odd block counts, single blocks, several blocks, tails. */
static const int64_t lens_float[] = {1, 5, 8, 15, 16, 17, 31, 33, 64, 100, 257, 1000, 4099};
static const int64_t lens_32[] = {32, 64, 96, 160, 1024, 32 * 37, 4096};
static const int64_t lens_256[] = {256, 512, 768, 256 * 11, 4096};

static const char *level_name(int lvl) { return nm_isa_name((nm_isa)lvl); }

static const float SENTINEL_OUT = -98765.0f;

static nm_vec_dot_fn level_table(int lvl, int type) {
    switch (lvl) {
    case NM_ISA_AVX2: return nm_dot_table_avx2(type);
    case NM_ISA_AVX512: return nm_dot_table_avx512(type);
    case NM_ISA_AVX512_VNNI: return nm_dot_table_avx512vnni(type);
    default: return NULL;
    }
}

static double worst_rel[NM_ISA_COUNT][NM_TYPE_COUNT];
static int cases_run[NM_ISA_COUNT];

static void check_type(int type) {
    const nm_type_traits *tr = nm_type_traits_of(type);
    const int act_type = tr->vec_dot_type;
    const nm_vec_dot_fn ref = nm_vec_dot_ref(type);
    CHECK(ref != NULL, "%s has no reference dot", tr->name);
    if (!ref) return;
    const int64_t *lens = tr->block_size == 1 ? lens_float : tr->block_size == 32 ? lens_32 : lens_256;
    const int n_lens = tr->block_size == 1    ? (int)(sizeof lens_float / sizeof *lens_float)
                       : tr->block_size == 32 ? (int)(sizeof lens_32 / sizeof *lens_32)
                                              : (int)(sizeof lens_256 / sizeof *lens_256);
    for (int li = 0; li < n_lens; li++) {
        const int64_t n = lens[li];
        const size_t wbytes = nm_row_size(type, n), xbytes = nm_row_size(act_type, n);
        void *w = malloc(wbytes), *x = malloc(xbytes);
        float *f = malloc(sizeof(float) * (size_t)n);
        for (int trial = 0; trial < 6; trial++) {
            const int from_bytes = !is_float_type(type) && (trial & 1);
            if (from_bytes) {
                random_block_bytes(type, w, n / tr->block_size);
            } else {
                random_floats(f, n, trial & 2);
                CHECK(nm_quantize_row(type, f, w, n) == 0, "quantize %s", tr->name);
            }
            random_floats(f, n, 0);
            CHECK(nm_quantize_row(act_type, f, x, n) == 0, "quantize %s", nm_type_name(act_type));
            const double m = magnitude(type, w, wbytes, act_type, x, n);
            CHECK(m > 0, "%s n=%lld: all-zero test data", tr->name, (long long)n);
            const double r = ref(n, w, x);
            const double tol = bound_units(type, n) * 0x1p-24 * m;
            for (int lvl = NM_ISA_AVX2; lvl < NM_ISA_COUNT; lvl++) {
                if (!nm_isa_supported((nm_isa)lvl)) continue;
                const nm_vec_dot_fn fn = level_table(lvl, type);
                if (!fn) continue;
                const double s = fn(n, w, x);
                const double err = fabs(s - r);
                cases_run[lvl]++;
                if (err / m > worst_rel[lvl][type]) worst_rel[lvl][type] = err / m;
                CHECK(err <= tol, "%s %s n=%lld trial %d (%s): simd %.9g ref %.9g |diff| %.3g > bound %.3g (M %.4g)",
                      level_name(lvl), tr->name, (long long)n, trial, from_bytes ? "random bytes" : "quantised", s,
                      r, err, tol, m);
            }
        }
        free(w);
        free(x);
        free(f);
    }
}

static void test_dots_match_reference(void) {
    for (int i = 0; i < N_TYPES; i++) check_type(all_types[i]);
    for (int lvl = NM_ISA_AVX2; lvl < NM_ISA_COUNT; lvl++) {
        if (!nm_isa_supported((nm_isa)lvl)) {
            fprintf(stderr, "  %-10s not supported by this CPU: skipped\n", level_name(lvl));
            continue;
        }
        fprintf(stderr, "  %-10s %d cases; largest |simd - ref| / M:", level_name(lvl), cases_run[lvl]);
        for (int i = 0; i < N_TYPES; i++)
            if (level_table(lvl, all_types[i]))
                fprintf(stderr, " %s %.1e", nm_type_name(all_types[i]), worst_rel[lvl][all_types[i]]);
        fputc('\n', stderr);
    }
}

/* ---- multi-row dots ----------------------------------------------------------
 *
 * nm_vec_dot_multi_for(type, lvl) against nx calls of nm_vec_dot_for(type,
 * lvl), for every type, every level this CPU runs (scalar included) and
 * every nx = 1..NM_DOT_MULTI_MAX, on fresh weights (both kinds above) and nx
 * fresh activation rows per case. The rows are packed at the alignment
 * their fields need, off cache lines (as moe.c's rows are), and one case
 * repeats a row.
 *
 * Bound: 0. The multi kernels compute the same exact integer sums and, per
 * row, the same float operations in the same order as the single dot (see
 * quant.h), so every output must equal the single dot's bit for bit; any
 * difference, even in the last place, means a row got another row's data
 * or a different scale product. */

static const int64_t multi_lens_float[] = {1, 17, 33, 257, 1000};
static const int64_t multi_lens_32[] = {32, 64, 96, 32 * 37, 1408};
static const int64_t multi_lens_256[] = {256, 768, 2048};

static void check_multi_type(int type, int *cases) {
    const nm_type_traits *tr = nm_type_traits_of(type);
    const int act_type = tr->vec_dot_type;
    const int64_t *lens = tr->block_size == 1    ? multi_lens_float
                          : tr->block_size == 32 ? multi_lens_32
                                                 : multi_lens_256;
    const int n_lens = tr->block_size == 1    ? (int)(sizeof multi_lens_float / sizeof *multi_lens_float)
                       : tr->block_size == 32 ? (int)(sizeof multi_lens_32 / sizeof *multi_lens_32)
                                              : (int)(sizeof multi_lens_256 / sizeof *multi_lens_256);
    for (int li = 0; li < n_lens; li++) {
        const int64_t n = lens[li];
        const size_t wbytes = nm_row_size(type, n), xbytes = nm_row_size(act_type, n);
        /* row j at offset a + j * (xbytes + a), a the alignment the row's
         * fields need (fp16 d of Q8_0: 2; floats: 4): packed like moe.c's
         * rows, not on cache lines */
        const size_t a = act_type == NM_TYPE_Q8_0 ? 2 : 4, xstride = (xbytes + a - 1) / a * a + a;
        void *w = malloc(wbytes);
        uint8_t *xbuf = malloc(xstride * NM_DOT_MULTI_MAX + a);
        float *f = malloc(sizeof(float) * (size_t)n);
        const void *xs[NM_DOT_MULTI_MAX];
        for (int nx = 1; nx <= NM_DOT_MULTI_MAX; nx++) {
            const int from_bytes = !is_float_type(type) && (nx & 1);
            if (from_bytes) {
                random_block_bytes(type, w, n / tr->block_size);
            } else {
                random_floats(f, n, nx & 2);
                CHECK(nm_quantize_row(type, f, w, n) == 0, "quantize %s", tr->name);
            }
            for (int j = 0; j < nx; j++) {
                random_floats(f, n, 0);
                xs[j] = xbuf + (size_t)j * xstride + a;
                CHECK(nm_quantize_row(act_type, f, xbuf + (size_t)j * xstride + a, n) == 0, "quantize act");
            }
            if (nx == 5) xs[3] = xs[1]; /* a repeated row */
            for (int lvl = NM_ISA_SCALAR; lvl < NM_ISA_COUNT; lvl++) {
                if (!nm_isa_supported((nm_isa)lvl)) continue;
                const nm_vec_dot_fn one = nm_vec_dot_for(type, (nm_isa)lvl);
                const nm_vec_dot_multi_fn multi = nm_vec_dot_multi_for(type, (nm_isa)lvl);
                CHECK(one && multi, "%s %s: dot %p multi %p", level_name(lvl), tr->name, (void *)one, (void *)multi);
                if (!one || !multi) continue;
                float got[NM_DOT_MULTI_MAX + 1];
                got[nx] = SENTINEL_OUT;
                multi(n, w, xs, nx, got);
                CHECK(got[nx] == SENTINEL_OUT, "%s %s nx=%d wrote past out[nx - 1]", level_name(lvl), tr->name, nx);
                for (int j = 0; j < nx; j++) {
                    const float want = one(n, w, xs[j]);
                    (*cases)++;
                    CHECK(memcmp(&got[j], &want, sizeof want) == 0,
                          "%s %s n=%lld nx=%d row %d (%s): multi %.9g single %.9g", level_name(lvl), tr->name,
                          (long long)n, nx, j, from_bytes ? "random bytes" : "quantised", got[j], want);
                }
            }
        }
        free(w);
        free(xbuf);
        free(f);
    }
}

static void test_multi_matches_single(void) {
    int cases = 0;
    for (int i = 0; i < N_TYPES; i++) check_multi_type(all_types[i], &cases);
    fprintf(stderr, "  %d multi-row outputs, all bit-identical to the single dot\n", cases);
}

/* A multi dot exists exactly where a single one does, and the formats real
 * DeepSeek mixes use most have kernels of their own at AVX-512 (not the
 * loops, which would show up as the same function in both flavours). */
static void test_multi_tables(void) {
    for (int i = 0; i < N_TYPES; i++) {
        const int t = all_types[i];
        for (int lvl = NM_ISA_SCALAR; lvl < NM_ISA_COUNT; lvl++)
            CHECK((nm_vec_dot_multi_for(t, (nm_isa)lvl) != NULL) == (nm_vec_dot_for(t, (nm_isa)lvl) != NULL),
                  "multi and single disagree on %s at %s", nm_type_name(t), level_name(lvl));
        CHECK(nm_vec_dot_multi_for(t, NM_ISA_SCALAR) == nm_vec_dot_multi_ref(t), "scalar multi of %s", nm_type_name(t));
        if (nm_isa_supported(NM_ISA_AVX2))
            CHECK(nm_dot_multi_table_avx2(t) != NULL, "avx2 multi lacks %s", nm_type_name(t));
        if (nm_isa_supported(NM_ISA_AVX512))
            CHECK(nm_dot_multi_table_avx512(t) != NULL, "avx512 multi lacks %s", nm_type_name(t));
        if (nm_isa_supported(NM_ISA_AVX512_VNNI))
            CHECK((nm_dot_multi_table_avx512vnni(t) != NULL) == (nm_dot_table_avx512vnni(t) != NULL),
                  "avx512vnni multi entry for %s", nm_type_name(t));
    }
    static const int own[] = {NM_TYPE_Q4_0, NM_TYPE_Q5_0, NM_TYPE_Q8_0, NM_TYPE_Q4_K, NM_TYPE_Q5_K, NM_TYPE_Q6_K};
    if (nm_isa_supported(NM_ISA_AVX512_VNNI))
        for (size_t i = 0; i < sizeof own / sizeof *own; i++)
            CHECK(nm_dot_multi_table_avx512vnni(own[i]) != nm_dot_multi_table_avx512(own[i]),
                  "%s has no multi kernel of its own", nm_type_name(own[i]));
    CHECK(nm_vec_dot_multi_for(NM_TYPE_Q8_1, NM_ISA_AVX512_VNNI) == NULL, "Q8_1 has no multi dot");
    CHECK(nm_vec_dot_multi_for(999, NM_ISA_AVX2) == NULL, "unknown type has no multi dot");
    CHECK(nm_vec_dot_multi(NM_TYPE_Q4_K) == nm_vec_dot_multi_for(NM_TYPE_Q4_K, nm_isa_best()), "nm_vec_dot_multi");
}

/* Every weight type has its own path at AVX2 and AVX-512; VNNI has one for
 * each integer format; the float formats fall back to plain AVX-512. */
static void test_tables_complete(void) {
    for (int i = 0; i < N_TYPES; i++) {
        const int t = all_types[i];
        if (nm_isa_supported(NM_ISA_AVX2)) CHECK(nm_dot_table_avx2(t) != NULL, "avx2 lacks %s", nm_type_name(t));
        if (nm_isa_supported(NM_ISA_AVX512))
            CHECK(nm_dot_table_avx512(t) != NULL, "avx512 lacks %s", nm_type_name(t));
        if (nm_isa_supported(NM_ISA_AVX512_VNNI)) {
            CHECK((nm_dot_table_avx512vnni(t) != NULL) == !is_float_type(t), "avx512vnni entry for %s",
                  nm_type_name(t));
            const nm_vec_dot_fn want = is_float_type(t) ? nm_dot_table_avx512(t) : nm_dot_table_avx512vnni(t);
            CHECK(nm_vec_dot_for(t, NM_ISA_AVX512_VNNI) == want, "vnni fallback for %s", nm_type_name(t));
        }
        CHECK(nm_vec_dot_for(t, NM_ISA_SCALAR) == nm_vec_dot_ref(t), "scalar level of %s", nm_type_name(t));
    }
    /* types without any dot */
    CHECK(nm_vec_dot_for(NM_TYPE_Q8_1, NM_ISA_AVX512_VNNI) == NULL, "Q8_1 has no dot");
    CHECK(nm_vec_dot_for(999, NM_ISA_AVX2) == NULL, "unknown type has no dot");
}

static void test_isa_levels(void) {
    CHECK(nm_isa_supported(NM_ISA_SCALAR), "scalar always runs");
    CHECK(!strcmp(nm_isa_name(NM_ISA_SCALAR), "scalar") && !strcmp(nm_isa_name(NM_ISA_AVX2), "avx2") &&
              !strcmp(nm_isa_name(NM_ISA_AVX512), "avx512") && !strcmp(nm_isa_name(NM_ISA_AVX512_VNNI), "avx512vnni"),
          "isa names");
    /* cumulative: a supported level implies all below it */
    for (int lvl = 1; lvl < NM_ISA_COUNT; lvl++)
        if (nm_isa_supported((nm_isa)lvl)) CHECK(nm_isa_supported((nm_isa)(lvl - 1)), "level %d without %d", lvl, lvl - 1);
    CHECK(nm_isa_supported(nm_isa_best()), "best level is supported");
    /* asking for more than the CPU has never hands out an unrunnable path */
    for (int i = 0; i < N_TYPES; i++) {
        const nm_vec_dot_fn fn = nm_vec_dot_for(all_types[i], NM_ISA_AVX512_VNNI);
        int found = fn == nm_vec_dot_ref(all_types[i]);
        for (int lvl = NM_ISA_AVX2; lvl < NM_ISA_COUNT; lvl++)
            if (nm_isa_supported((nm_isa)lvl) && fn == level_table(lvl, all_types[i])) found = 1;
        CHECK(found, "nm_vec_dot_for(%s) is not a supported level's path", nm_type_name(all_types[i]));
    }
}

static nm_isa hw_top(void) {
    nm_isa top = NM_ISA_SCALAR;
    for (int lvl = 1; lvl < NM_ISA_COUNT; lvl++)
        if (nm_isa_supported((nm_isa)lvl)) top = (nm_isa)lvl;
    return top;
}

/* nm_isa_best is computed once per process, so each NUMOE_ISA value runs in
 * a child; the child reports the level (amx: nm_isa_amx(), after writing
 * nm_isa_amx_why_not() to stderr) as its exit status and its stderr comes
 * back through a pipe. */
static int child_with_env(const char *value, int amx, char *err, size_t errlen) {
    int fd[2];
    if (pipe(fd) != 0) return -1;
    const pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        dup2(fd[1], 2);
        setenv("NUMOE_ISA", value, 1);
        if (amx) {
            const int on = nm_isa_amx();
            fprintf(stderr, "why not: %s", on ? "(on)" : nm_isa_amx_why_not());
            _exit(on);
        }
        _exit((int)nm_isa_best());
    }
    close(fd[1]);
    size_t len = 0;
    ssize_t got;
    while (len + 1 < errlen && (got = read(fd[0], err + len, errlen - 1 - len)) > 0) len += (size_t)got;
    err[len] = 0;
    close(fd[0]);
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
    return WEXITSTATUS(status);
}

static int best_with_env(const char *value, char *err, size_t errlen) { return child_with_env(value, 0, err, errlen); }

static void test_isa_env(void) {
    char err[512];
    const nm_isa top = hw_top();
    CHECK(best_with_env("scalar", err, sizeof err) == NM_ISA_SCALAR && !err[0], "NUMOE_ISA=scalar: %s", err);
    CHECK(best_with_env("", err, sizeof err) == (int)top && !err[0], "empty NUMOE_ISA: %s", err);
    if (top >= NM_ISA_AVX2)
        CHECK(best_with_env("AVX2", err, sizeof err) == NM_ISA_AVX2 && !err[0], "NUMOE_ISA=AVX2: %s", err);
    /* a typo is reported with the value and the level actually used */
    CHECK(best_with_env("avx-512", err, sizeof err) == (int)top, "typo falls back to the best level");
    CHECK(strstr(err, "avx-512") && strstr(err, nm_isa_name(top)), "typo warning names value and level: '%s'", err);
    if (top < NM_ISA_AVX512_VNNI) {
        CHECK(best_with_env("avx512vnni", err, sizeof err) == (int)top, "unsupported level falls back");
        CHECK(strstr(err, "avx512vnni") != NULL, "unsupported level warning: '%s'", err);
    }
    /* amx: the best level; AMX on where the CPU has it, else a warning saying why */
    CHECK(best_with_env("amx", err, sizeof err) == (int)top, "NUMOE_ISA=amx level");
    const int amx = child_with_env("amx", 1, err, sizeof err);
    CHECK(amx == 1 ? strstr(err, "warning") == NULL : amx == 0 && strstr(err, "AMX not available: ") != NULL,
          "NUMOE_ISA=amx: amx %d, '%s'", amx, err);
    fprintf(stderr, "  AMX: %s\n", amx == 1 ? "available" : strstr(err, "why not: ") ? strstr(err, "why not: ") : err);
    /* naming a level turns AMX off, and says so */
    CHECK(child_with_env("avx2", 1, err, sizeof err) == 0 && strstr(err, "NUMOE_ISA=avx2 turns it off"),
          "NUMOE_ISA=avx2 leaves AMX on: '%s'", err);
    CHECK(child_with_env("AVX512VNNI", 1, err, sizeof err) == 0 && strstr(err, "NUMOE_ISA=AVX512VNNI turns it off"),
          "NUMOE_ISA=avx512vnni leaves AMX on: '%s'", err);
    /* a typo keeps the best, AMX included */
    CHECK(child_with_env("amx2", 1, err, sizeof err) == amx && strstr(err, "amx2"), "NUMOE_ISA=amx2: '%s'", err);
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    char seed_extra[64];
    snprintf(seed_extra, sizeof seed_extra, "best isa %s", nm_isa_name(hw_top()));
    rng_seed(seed_extra);
    RUN(test_isa_env);
    RUN(test_isa_levels);
    RUN(test_tables_complete);
    RUN(test_dots_match_reference);
    RUN(test_multi_tables);
    RUN(test_multi_matches_single);
    return check_summary();
}
