/* test_quant.c - the quant formats: fp16/bf16 conversion, type traits, row
 * sizes, quantise/dequantise round trips and the scalar reference dots.
 *
 * Random data comes from a fixed seed (NUMOE_TEST_SEED overrides it, printed
 * on every run) so a failure can be replayed. Bounds, and why:
 *  - dot: nm_vec_dot_ref(w, quantize(x)) against the double-precision dot of
 *    dequantize(w) and dequantize(quantize(x)) must agree within
 *    DOT_REL * sum|w_i x_i|. Both sides compute the same exact products; they
 *    differ only by float rounding (the reference dots accumulate in int32
 *    per block and in float across up to 128 blocks), a few 1e-8 of sum|w x|
 *    in practice.
 *  - round trip: RMS(dequantize(quantize(x)) - x) / RMS(x) on N(0,1) data,
 *    bound per format in rt_bound() (for F16/BF16 0.6 of an ulp step; for
 *    the quant formats about 1.15x the worst value seen over 40 seeds; the
 *    run prints the observed values). A block's absmax of N(0,1) data is
 *    about 2.5, so Q8_0's error is about 2.5/127/sqrt(12) = 0.55%; it is
 *    below 0.5% only for flatter data. */
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/fp16.h"
#include "kernels/quant.h"
#include "tests/unit/check.h"

/* worst seen over 31 seeds: 4.0e-8 (Q4_1); the run prints its own per type */
#define DOT_REL 2e-7

static const int all_types[] = {
    NM_TYPE_F32,  NM_TYPE_F16,  NM_TYPE_BF16, NM_TYPE_Q4_0, NM_TYPE_Q4_1, NM_TYPE_Q5_0, NM_TYPE_Q5_1,
    NM_TYPE_Q8_0, NM_TYPE_Q2_K, NM_TYPE_Q3_K, NM_TYPE_Q4_K, NM_TYPE_Q5_K, NM_TYPE_Q6_K, NM_TYPE_Q8_K,
};
#define N_TYPES (int)(sizeof all_types / sizeof all_types[0])

/* ---- deterministic random data ------------------------------------------- */

static uint64_t rng_state = 0x6e756d6f65ull;

static uint64_t rng_next(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_unit(void) { return (double)(rng_next() >> 11) * 0x1p-53; } /* [0, 1) */

static float rng_gauss(void) {
    const double u = 1.0 - rng_unit(), v = rng_unit();
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

/* A realistic scale: magnitude log-uniform in [1e-3, 1e-1], random sign. */
static float rng_scale(void) {
    const float mag = (float)(1e-3 * pow(100.0, rng_unit()));
    return (rng_next() & 1) ? -mag : mag;
}

static void rng_bytes(void *p, size_t n) {
    uint8_t *b = p;
    for (size_t i = 0; i < n; i++) b[i] = (uint8_t)rng_next();
}

static void gauss_row(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = rng_gauss();
}

/* A valid random weight row: random quant bytes, sane fp16 scales. */
static void random_row(int type, void *buf, int64_t n) {
    const int64_t nb = n / nm_type_traits_of(type)->block_size;
    rng_bytes(buf, nm_row_size(type, n));
    for (int64_t i = 0; i < nb; i++) {
        switch (type) {
        case NM_TYPE_F32: ((float *)buf)[i] = rng_gauss(); break;
        case NM_TYPE_F16: ((uint16_t *)buf)[i] = nm_fp32_to_fp16(rng_gauss()); break;
        case NM_TYPE_BF16: ((uint16_t *)buf)[i] = nm_fp32_to_bf16(rng_gauss()); break;
        case NM_TYPE_Q4_0: ((block_q4_0 *)buf)[i].d = nm_fp32_to_fp16(rng_scale()); break;
        case NM_TYPE_Q4_1:
            ((block_q4_1 *)buf)[i].d = nm_fp32_to_fp16(rng_scale());
            ((block_q4_1 *)buf)[i].m = nm_fp32_to_fp16(rng_scale());
            break;
        case NM_TYPE_Q5_0: ((block_q5_0 *)buf)[i].d = nm_fp32_to_fp16(rng_scale()); break;
        case NM_TYPE_Q5_1:
            ((block_q5_1 *)buf)[i].d = nm_fp32_to_fp16(rng_scale());
            ((block_q5_1 *)buf)[i].m = nm_fp32_to_fp16(rng_scale());
            break;
        case NM_TYPE_Q8_0: ((block_q8_0 *)buf)[i].d = nm_fp32_to_fp16(rng_scale()); break;
        case NM_TYPE_Q2_K:
            ((block_q2_K *)buf)[i].d = nm_fp32_to_fp16(rng_scale());
            ((block_q2_K *)buf)[i].dmin = nm_fp32_to_fp16(rng_scale());
            break;
        case NM_TYPE_Q3_K: ((block_q3_K *)buf)[i].d = nm_fp32_to_fp16(rng_scale()); break;
        case NM_TYPE_Q4_K:
            ((block_q4_K *)buf)[i].d = nm_fp32_to_fp16(rng_scale());
            ((block_q4_K *)buf)[i].dmin = nm_fp32_to_fp16(rng_scale());
            break;
        case NM_TYPE_Q5_K:
            ((block_q5_K *)buf)[i].d = nm_fp32_to_fp16(rng_scale());
            ((block_q5_K *)buf)[i].dmin = nm_fp32_to_fp16(rng_scale());
            break;
        case NM_TYPE_Q6_K: ((block_q6_K *)buf)[i].d = nm_fp32_to_fp16(rng_scale()); break;
        case NM_TYPE_Q8_K: {
            block_q8_K *b = &((block_q8_K *)buf)[i];
            b->d = rng_scale();
            for (int g = 0; g < 16; g++) {
                int s = 0;
                for (int l = 0; l < 16; l++) s += b->qs[16 * g + l];
                b->bsums[g] = (int16_t)s;
            }
            break;
        }
        default: break;
        }
    }
}

/* ---- fp16 / bf16 --------------------------------------------------------- */

/* The value of half h computed independently, in double. */
static double half_value(uint16_t h) {
    const int e = (h >> 10) & 31, m = h & 1023;
    const double mag = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return (h & 0x8000) ? -mag : mag;
}

static void test_fp16_decode_exhaustive(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        const float f = nm_fp16_to_fp32((uint16_t)h);
        const double want = half_value((uint16_t)h);
        if (isnan(want)) {
            /* NaN stays NaN, sign and payload kept, quiet on the way back */
            const uint16_t back = nm_fp32_to_fp16(f);
            if (!isnan(f) || (nm_f32_bits(f) >> 31) != (h >> 15) || (back & 0xfe00) != ((h & 0x8000) | 0x7e00) ||
                (back & 0x1ff) != (h & 0x1ff))
                bad++;
        } else if ((double)f != want || !signbit(f) != !signbit(want) || nm_fp32_to_fp16(f) != h) {
            if (bad++ < 5) fprintf(stderr, "  half 0x%04x -> %a (want %a)\n", (unsigned)h, (double)f, want);
        }
    }
    CHECK(bad == 0, "%d of 65536 halves decode wrong or do not round-trip", bad);
}

static void test_fp16_encode_known(void) {
    static const struct {
        float f;
        uint16_t h;
    } cases[] = {
        {0.0f, 0x0000},          {-0.0f, 0x8000},        {1.0f, 0x3c00},          {-2.0f, 0xc000},
        {65504.0f, 0x7bff},      {65519.99f, 0x7bff},    {65520.0f, 0x7c00},      {1e30f, 0x7c00},
        {INFINITY, 0x7c00},      {-INFINITY, 0xfc00},    {0x1p-14f, 0x0400},      {0x1p-24f, 0x0001},
        {0x1p-25f, 0x0000},      {0x1.8p-25f, 0x0001},   {0x1.8p-24f, 0x0002},    {0x1.4p-24f, 0x0001},
        {1.0f + 0x1p-11f, 0x3c00}, {1.0f + 0x3p-11f, 0x3c02}, {1.0f + 0x1.01p-11f, 0x3c01},
        {0x1.ffcp-15f, 0x0400},  {0x1.ff8p-15f, 0x03ff},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const uint16_t h = nm_fp32_to_fp16(cases[i].f);
        CHECK(h == cases[i].h, "fp16(%a) = 0x%04x, want 0x%04x", (double)cases[i].f, h, cases[i].h);
    }
    CHECK(nm_fp32_to_fp16(nm_f32_from_bits(0x7f800001u)) == 0x7e00, "sNaN not quieted");
    CHECK(nm_fp32_to_fp16(nm_f32_from_bits(0xffc00000u)) == 0xfe00, "negative qNaN");
}

/* Round to nearest even, checked against the neighbouring halves. */
static void test_fp16_encode_rounding(void) {
    int bad = 0;
    for (int i = 0; i < 1000000; i++) {
        /* binary32 exponents 95..145 cover zero-rounding to overflow */
        const uint32_t bits = (uint32_t)(rng_next() & 0x807fffffu) | (uint32_t)(95 + rng_next() % 51) << 23;
        const float f = nm_f32_from_bits(bits);
        const double a = fabs((double)f);
        const uint16_t h = nm_fp32_to_fp16(f), hh = h & 0x7fff;
        int ok = (h >> 15) == (bits >> 31);
        if (hh == 0x7c00) {
            ok = ok && a >= 65520.0;
        } else {
            const double err = fabs(half_value(hh) - a);
            if (hh > 0) {
                const double lo = fabs(half_value((uint16_t)(hh - 1)) - a);
                ok = ok && (err < lo || (err == lo && !(hh & 1)));
            }
            if (hh < 0x7bff) {
                const double hi = fabs(half_value((uint16_t)(hh + 1)) - a);
                ok = ok && (err < hi || (err == hi && !(hh & 1)));
            } else {
                ok = ok && a < 65520.0;
            }
        }
        if (!ok && bad++ < 5) fprintf(stderr, "  fp16(%a) = 0x%04x\n", (double)f, h);
    }
    CHECK(bad == 0, "%d of 1e6 random floats round wrongly to fp16", bad);
}

static void test_bf16(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        const float f = nm_bf16_to_fp32((uint16_t)h);
        if (nm_f32_bits(f) != h << 16) bad++;
        else if (!isnan(f) && nm_fp32_to_bf16(f) != h) bad++;
        else if (isnan(f) && nm_fp32_to_bf16(f) != (h | 64)) bad++;
    }
    CHECK(bad == 0, "%d of 65536 bf16 values do not round-trip", bad);
    CHECK(nm_fp32_to_bf16(1.0f) == 0x3f80, "bf16(1)");
    CHECK(nm_fp32_to_bf16(nm_f32_from_bits(0x3f808000u)) == 0x3f80, "tie to even (down)");
    CHECK(nm_fp32_to_bf16(nm_f32_from_bits(0x3f818000u)) == 0x3f82, "tie to even (up)");
    CHECK(nm_fp32_to_bf16(nm_f32_from_bits(0x3f808001u)) == 0x3f81, "above the tie rounds up");
    CHECK(nm_fp32_to_bf16(nm_f32_from_bits(0x7f7fffffu)) == 0x7f80, "FLT_MAX rounds to inf");
    CHECK(nm_fp32_to_bf16(nm_f32_from_bits(0x7f800001u)) == 0x7fc0, "sNaN quieted");
    CHECK(nm_fp32_to_bf16(nm_f32_from_bits(0xff800001u)) == 0xffc0, "negative sNaN quieted");
    CHECK(nm_fp32_to_bf16(nm_f32_from_bits(0x00008001u)) == 0x0001, "subnormals are rounded, not flushed");
}

/* ---- traits and sizes ---------------------------------------------------- */

static void test_traits(void) {
    static const struct {
        int type;
        size_t size;
    } blocks[] = {
        {NM_TYPE_Q4_0, sizeof(block_q4_0)}, {NM_TYPE_Q4_1, sizeof(block_q4_1)}, {NM_TYPE_Q5_0, sizeof(block_q5_0)},
        {NM_TYPE_Q5_1, sizeof(block_q5_1)}, {NM_TYPE_Q8_0, sizeof(block_q8_0)}, {NM_TYPE_Q2_K, sizeof(block_q2_K)},
        {NM_TYPE_Q3_K, sizeof(block_q3_K)}, {NM_TYPE_Q4_K, sizeof(block_q4_K)}, {NM_TYPE_Q5_K, sizeof(block_q5_K)},
        {NM_TYPE_Q6_K, sizeof(block_q6_K)}, {NM_TYPE_Q8_K, sizeof(block_q8_K)},
    };
    for (size_t i = 0; i < sizeof blocks / sizeof blocks[0]; i++)
        CHECK(nm_type_traits_of(blocks[i].type)->type_size == blocks[i].size, "%s type_size",
              nm_type_name(blocks[i].type));
    float x[NM_QK_K] = {0}, y[NM_QK_K];
    uint8_t buf[sizeof(block_q8_K)] = {0};
    int known = 0;
    for (int t = -2; t < NM_TYPE_COUNT + 2; t++) {
        const nm_type_traits *tr = nm_type_traits_of(t);
        if (!tr) {
            CHECK(strcmp(nm_type_name(t), "unknown") == 0, "name of unknown id %d", t);
            CHECK(nm_vec_dot_ref(t) == NULL && nm_dequantize_row(t, buf, y, 0) == -1, "id %d", t);
            continue;
        }
        known++;
        CHECK(strcmp(nm_type_name(t), tr->name) == 0, "name of %d", t);
        CHECK(tr->block_size > 0 && tr->type_size > 0, "%s geometry", tr->name);
        const int64_t n = tr->block_size;
        /* the flags say exactly what the functions do */
        CHECK(tr->can_dequantize == (nm_dequantize_row(t, buf, y, n) == 0), "%s can_dequantize", tr->name);
        CHECK(tr->can_quantize == (nm_quantize_row(t, x, buf, n) == 0), "%s can_quantize", tr->name);
        CHECK(tr->can_dequantize == (nm_vec_dot_ref(t) != NULL), "%s has a dot iff computable", tr->name);
        if (tr->can_dequantize) {
            const nm_type_traits *vd = nm_type_traits_of(tr->vec_dot_type);
            CHECK(vd && vd->can_quantize && tr->block_size % vd->block_size == 0, "%s vec_dot_type %s", tr->name,
                  nm_type_name(tr->vec_dot_type));
        }
    }
    CHECK(known == 32, "%d known type ids, want the 32 current ggml ids below 40", known);
    for (int i = 0; i < N_TYPES; i++) CHECK(nm_type_traits_of(all_types[i])->can_dequantize, "%d", all_types[i]);
}

static void test_row_size(void) {
    CHECK(nm_row_size(NM_TYPE_Q4_K, 4096) == 16 * 144, "Q4_K 4096");
    CHECK(nm_row_size(NM_TYPE_Q8_0, 64) == 68, "Q8_0 64");
    CHECK(nm_row_size(NM_TYPE_F32, 3) == 12, "F32 3");
    CHECK(nm_row_size(NM_TYPE_BF16, 7) == 14, "BF16 7");
    CHECK(nm_row_size(NM_TYPE_Q6_K, 0) == 0, "empty row");
    CHECK(nm_row_size(NM_TYPE_Q4_K, 100) == 0, "not a multiple of 256");
    CHECK(nm_row_size(NM_TYPE_Q4_0, 33) == 0, "not a multiple of 32");
    CHECK(nm_row_size(NM_TYPE_Q4_0, -32) == 0, "negative n");
    CHECK(nm_row_size(31, 32) == 0 && nm_row_size(-1, 32) == 0 && nm_row_size(NM_TYPE_COUNT, 32) == 0,
          "unknown types");
    CHECK(nm_row_size(NM_TYPE_F32, INT64_MAX) == 0, "n * 4 overflows size_t");
    CHECK(nm_row_size(20 /* IQ4_NL */, 64) == 36, "size-only types are sized");
    if (sizeof(size_t) == 8)
        CHECK(nm_row_size(NM_TYPE_F32, INT64_MAX / 4) == (size_t)(INT64_MAX / 4) * 4, "largest F32 row");
}

static void test_bad_lengths(void) {
    float x[300] = {0}, y[300];
    uint8_t buf[1024];
    CHECK(nm_quantize_row(NM_TYPE_Q4_K, x, buf, 100) == -1, "Q4_K n=100 quantised");
    CHECK(nm_quantize_row(NM_TYPE_Q8_0, x, buf, 33) == -1, "Q8_0 n=33 quantised");
    CHECK(nm_quantize_row(NM_TYPE_Q8_K, x, buf, -256) == -1, "negative n quantised");
    CHECK(nm_dequantize_row(NM_TYPE_Q6_K, buf, y, 255) == -1, "Q6_K n=255 dequantised");
    CHECK(nm_dequantize_row(NM_TYPE_Q5_1, buf, y, 48) == -1, "Q5_1 n=48 dequantised");
    CHECK(nm_dequantize_row(NM_TYPE_Q8_1, buf, y, 32) == -1, "Q8_1 is not computable");
    CHECK(nm_quantize_row(16 /* IQ2_XXS */, x, buf, 256) == -1, "IQ2_XXS is not computable");
    CHECK(nm_dequantize_row(NM_TYPE_Q4_0, NULL, NULL, 0) == 0, "an empty row is fine");
}

/* ---- quantisers ---------------------------------------------------------- */

static void test_q8_0_quantize(void) {
    float x[64];
    block_q8_0 b[2];
    gauss_row(x, 64);
    x[5] = -7.5f; /* the block's absmax, negative */
    CHECK(nm_quantize_row(NM_TYPE_Q8_0, x, b, 64) == 0, "quantize");
    CHECK(b[0].qs[5] == -127, "absmax maps to -127, got %d", b[0].qs[5]);
    CHECK(b[0].d == nm_fp32_to_fp16(7.5f / 127), "d = absmax/127");
    for (int i = 0; i < 2; i++) {
        const float d = nm_fp16_to_fp32(b[i].d);
        float worst = 0;
        for (int j = 0; j < 32; j++) worst = fmaxf(worst, fabsf(b[i].qs[j] * d - x[32 * i + j]));
        /* half a step, plus the step's own fp16 rounding over 127 steps */
        CHECK(worst <= d * (0.5f + 127 * 0x1p-11f), "block %d: error %g > d/2, d = %g", i, worst, d);
    }
}

static void test_q8_K_bsums(void) {
    enum { NB = 8 };
    float x[NB * NM_QK_K];
    block_q8_K b[NB];
    gauss_row(x, NB * NM_QK_K);
    for (int j = 0; j < NM_QK_K; j++) x[3 * NM_QK_K + j] = 0; /* an all-zero block */
    CHECK(nm_quantize_row(NM_TYPE_Q8_K, x, b, NB * NM_QK_K) == 0, "quantize");
    for (int i = 0; i < NB; i++) {
        int min_q = 0;
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) {
                s += b[i].qs[16 * g + l];
                if (b[i].qs[16 * g + l] < min_q) min_q = b[i].qs[16 * g + l];
            }
            CHECK(b[i].bsums[g] == s, "block %d bsums[%d] = %d, want %d", i, g, b[i].bsums[g], s);
        }
        CHECK(min_q >= -127, "block %d uses -128", i);
        if (i == 3) {
            CHECK(b[i].d == 0, "zero block d = %g", (double)b[i].d);
            continue;
        }
        for (int j = 0; j < NM_QK_K; j++) {
            const float err = fabsf(b[i].d * b[i].qs[j] - x[i * NM_QK_K + j]);
            if (err > fabsf(b[i].d) * 0.5001f) {
                CHECK(0, "block %d elem %d error %g, d %g", i, j, err, (double)b[i].d);
                break;
            }
        }
    }
}

/* Round-trip bounds for N(0,1) data (see the header comment). */
static double rt_bound(int type) {
    switch (type) {
    case NM_TYPE_F32: return 0;
    case NM_TYPE_F16: return 0x1p-11 * 0.6;  /* half an ulp, RMS over values */
    case NM_TYPE_BF16: return 0x1p-8 * 0.6;
    case NM_TYPE_Q8_0: return 0.0063;
    case NM_TYPE_Q8_K: return 0.0082;
    case NM_TYPE_Q6_K: return 0.0205;
    case NM_TYPE_Q5_0: return 0.050;
    case NM_TYPE_Q5_1: return 0.044;
    case NM_TYPE_Q5_K: return 0.042;
    case NM_TYPE_Q4_0: return 0.100;
    case NM_TYPE_Q4_1: return 0.092;
    case NM_TYPE_Q4_K: return 0.083;
    case NM_TYPE_Q3_K: return 0.178;
    case NM_TYPE_Q2_K: return 0.334;
    default: return 0;
    }
}

static void test_roundtrip_rms(void) {
    enum { N = 64 * NM_QK_K };
    float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y);
    void *q = malloc(N * sizeof(float));
    gauss_row(x, N);
    for (int i = 0; i < N_TYPES; i++) {
        const int t = all_types[i];
        CHECK(nm_quantize_row(t, x, q, N) == 0 && nm_dequantize_row(t, q, y, N) == 0, "%s", nm_type_name(t));
        double se = 0, sx = 0;
        for (int j = 0; j < N; j++) {
            se += ((double)y[j] - x[j]) * ((double)y[j] - x[j]);
            sx += (double)x[j] * x[j];
        }
        const double rel = sqrt(se / sx);
        fprintf(stderr, "  %-5s round-trip rms error %.5f of rms (bound %.5f)\n", nm_type_name(t), rel, rt_bound(t));
        CHECK(rel <= rt_bound(t), "%s round-trip error %.5f > %.5f", nm_type_name(t), rel, rt_bound(t));
    }
    free(x);
    free(y);
    free(q);
}

/* All-zero rows come back exactly and rows of one repeated value as exactly as
 * an fp16 scale allows, from every quantiser. */
static void test_degenerate_rows(void) {
    float x[NM_QK_K], y[NM_QK_K];
    uint8_t q[sizeof(float) * NM_QK_K];
    for (int i = 0; i < N_TYPES; i++) {
        const int t = all_types[i];
        for (int pass = 0; pass < 2; pass++) {
            const float v = pass ? 0.75f : 0.0f;
            for (int j = 0; j < NM_QK_K; j++) x[j] = v;
            CHECK(nm_quantize_row(t, x, q, NM_QK_K) == 0 && nm_dequantize_row(t, q, y, NM_QK_K) == 0, "%s",
                  nm_type_name(t));
            float worst = 0;
            for (int j = 0; j < NM_QK_K; j++) worst = fmaxf(worst, isfinite(y[j]) ? fabsf(y[j] - v) : INFINITY);
            /* at most the rounding of one fp16 scale (2^-11 relative; seen: 2^-12 for Q2_K and Q4_K,
             * 1.8e-4 Q5_K, 6.1e-5 Q8_0, exact for the others) */
            CHECK(worst <= 0x1p-11f * v, "%s: constant %g comes back off by %g", nm_type_name(t), (double)v, worst);
        }
    }
}

/* ---- reference dots ------------------------------------------------------ */

static void test_dot_matches_dequant(void) {
    enum { N = 16 * NM_QK_K, ROWS = 8 };
    float *x = malloc(N * sizeof *x), *xd = malloc(N * sizeof *xd), *wd = malloc(N * sizeof *wd);
    void *w = malloc(N * sizeof(float)), *xq = malloc(N * sizeof(float));
    for (int i = 0; i < N_TYPES; i++) {
        const int t = all_types[i];
        const nm_type vdt = nm_type_traits_of(t)->vec_dot_type;
        const nm_vec_dot_fn dot = nm_vec_dot_ref(t);
        double worst = 0;
        for (int r = 0; r < ROWS; r++) {
            random_row(t, w, N);
            gauss_row(x, N);
            CHECK(nm_quantize_row(vdt, x, xq, N) == 0 && nm_dequantize_row(vdt, xq, xd, N) == 0 &&
                      nm_dequantize_row(t, w, wd, N) == 0,
                  "%s / %s rows", nm_type_name(t), nm_type_name(vdt));
            double ref = 0, mag = 0;
            for (int j = 0; j < N; j++) {
                ref += (double)wd[j] * xd[j];
                mag += fabs((double)wd[j] * xd[j]);
            }
            const double rel = fabs(dot(N, w, xq) - ref) / mag;
            if (rel > worst) worst = rel;
        }
        fprintf(stderr, "  %-5s dot vs dequantised dot: worst error %.2e of sum|w*x| (bound %.0e)\n", nm_type_name(t),
                worst, DOT_REL);
        CHECK(worst <= DOT_REL, "%s dot off by %.3e of sum|w*x|", nm_type_name(t), worst);
        CHECK(dot(0, w, xq) == 0, "%s empty dot", nm_type_name(t));
    }
    free(x);
    free(xd);
    free(wd);
    free(w);
    free(xq);
}

/* The AVX-512 activation quantisers equal the scalar reference byte for
 * byte: gaussian rows at many scales, rows whose products land on .5 ties
 * (integers and halves times a power-of-two scale), the largest magnitude
 * repeated with both signs (the first one sets Q8_K's sign), zero blocks and
 * single non-zero elements. */
static void test_avx512_quantisers(void) {
    if (nm_isa_best() < NM_ISA_AVX512) {
        printf("  (no AVX-512 here: nm_quantize_row is the reference itself)\n");
        return;
    }
    enum { N = 4 * 256 };
    static float x[N];
    static uint8_t a[N * 2], b[N * 2];
    const int types[2] = {NM_TYPE_Q8_K, NM_TYPE_Q8_0};
    int bad = 0, cases = 0;
    for (int kind = 0; kind < 5; kind++)
        for (int rep = 0; rep < 200; rep++) {
            const float sc = ldexpf(1.0f, (int)(rng_next() % 40) - 20);
            for (int j = 0; j < N; j++) {
                switch (kind) {
                case 0: x[j] = rng_gauss() * sc; break;
                case 1: x[j] = (float)((int)(rng_next() % 511) - 255) * 0.5f * sc; break; /* halves: ties */
                case 2: x[j] = (rng_next() & 1 ? 1.0f : -1.0f) * (float)(rng_next() % 4) * sc; break;
                case 3: x[j] = 0.0f; break;
                default: x[j] = (rng_next() % 97 == 0) ? rng_gauss() * sc : 0.0f; break;
                }
            }
            if (kind == 3 && rep % 2) x[rng_next() % N] = -sc; /* one element in a zero row */
            for (int t = 0; t < 2; t++) {
                const int64_t rs = nm_row_size(types[t], N);
                memset(a, 0xAA, sizeof a), memset(b, 0x55, sizeof b);
                CHECK(nm_quantize_row(types[t], x, a, N) == 0 && nm_quantize_row_ref(types[t], x, b, N) == 0,
                      "quantize %s", nm_type_name(types[t]));
                cases++;
                if (memcmp(a, b, (size_t)rs) != 0) {
                    if (bad++ < 3)
                        fprintf(stderr, "  %s kind %d rep %d scale %g: AVX-512 bytes differ from the reference\n",
                                nm_type_name(types[t]), kind, rep, (double)sc);
                }
            }
        }
    CHECK(bad == 0, "%d of %d rows quantised differently by the AVX-512 path", bad, cases);
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    const char *seed = getenv("NUMOE_TEST_SEED");
    if (seed) rng_state = strtoull(seed, NULL, 0);
    fprintf(stderr, "seed 0x%" PRIx64 "\n", rng_state);
    RUN(test_fp16_decode_exhaustive);
    RUN(test_fp16_encode_known);
    RUN(test_fp16_encode_rounding);
    RUN(test_bf16);
    RUN(test_traits);
    RUN(test_row_size);
    RUN(test_bad_lengths);
    RUN(test_q8_0_quantize);
    RUN(test_q8_K_bsums);
    RUN(test_avx512_quantisers);
    RUN(test_roundtrip_rms);
    RUN(test_degenerate_rows);
    RUN(test_dot_matches_dequant);
    return check_summary();
}
