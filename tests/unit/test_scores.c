/* test_scores.c - attention scores of a block (kernels/scores.h).
 *
 *   test_ref_is_a_dot         nm_scores_ref is the dot of its two rows within
 *                             float rounding (against float64: |err| <= 8 n
 *                             eps sum |q k|), for n 1..40, 192, 193, 576
 *   test_avx512_equals_ref    nm_scores_avx512 and nm_scores_avx2 =
 *                             nm_scores_ref bit for bit,
 *                             same n, values spanning magnitudes (so another
 *                             summation order or a missing FMA would show)
 *   test_pair_alone           a pair's score does not depend on the other
 *                             rows of its block (what lets a caller pad a
 *                             block with repeated rows), on the chosen path
 *
 * The seed is printed; NUMOE_TEST_SEED repeats a run. The AVX-512 test
 * skips (saying so) where the CPU lacks AVX-512. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/quant.h"
#include "kernels/scores.h"
#include "tests/unit/check.h"
#include "tests/unit/rng.h"

static float val(void) { return (float)((rng_double() - 0.5) * pow(10.0, 4 * rng_double() - 2)); }

static const int64_t ns[] = {1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 40, 192, 193, 576};
#define N_NS ((int)(sizeof ns / sizeof ns[0]))

/* 8 random rows of n: q = rows 0..3, k = rows 4..7 */
static float *rows8(int64_t n, const float *q[4], const float *k[4]) {
    float *r = malloc(sizeof(float) * (size_t)(8 * n));
    for (int64_t i = 0; i < 8 * n; i++) r[i] = val();
    for (int j = 0; j < 4; j++) q[j] = r + j * n, k[j] = r + (4 + j) * n;
    return r;
}

static void test_ref_is_a_dot(void) {
    int bad = 0;
    for (int t = 0; t < N_NS; t++) {
        const int64_t n = ns[t];
        const float *q[4], *k[4];
        float *r = rows8(n, q, k), out[16];
        nm_scores_ref(n, q, k, out);
        for (int g = 0; g < 4; g++)
            for (int i = 0; i < 4; i++) {
                double d = 0, a = 0;
                for (int64_t c = 0; c < n; c++) d += (double)q[g][c] * k[i][c], a += fabs((double)q[g][c] * k[i][c]);
                if (fabs(out[g * 4 + i] - d) > 8.0 * (double)n * FLT_EPSILON * a && bad++ < 3)
                    CHECK(0, "n %lld pair %d,%d: %.9g, float64 %.9g", (long long)n, g, i, out[g * 4 + i], d);
            }
        free(r);
    }
    CHECK(bad == 0, "reference = the dots within float rounding (%d pairs off)", bad);
}

static void test_avx512_equals_ref(void) {
    if (!nm_isa_supported(NM_ISA_AVX512)) {
        printf("  skipped: this CPU has no AVX-512\n");
        return;
    }
    int bad = 0, cases = 0;
    for (int rep = 0; rep < 20; rep++)
        for (int t = 0; t < N_NS; t++) {
            const float *q[4], *k[4];
            float *r = rows8(ns[t], q, k), a[16], b[16], c[16];
            nm_scores_ref(ns[t], q, k, a);
            nm_scores_avx512(ns[t], q, k, b);
            nm_scores_avx2(ns[t], q, k, c);
            cases++;
            bad += memcmp(a, b, sizeof a) != 0 || memcmp(a, c, sizeof a) != 0;
            free(r);
        }
    CHECK(bad == 0, "AVX-512 and AVX2 = reference bit for bit in %d of %d blocks", cases - bad, cases);
    const nm_isa isa = nm_isa_best();
    CHECK(nm_scores() == (isa >= NM_ISA_AVX512 ? nm_scores_avx512 : isa >= NM_ISA_AVX2 ? nm_scores_avx2 : nm_scores_ref),
          "nm_scores picks by nm_isa_best");
}

static void test_pair_alone(void) {
    const nm_scores_fn fn = nm_scores();
    int bad = 0;
    for (int t = 0; t < N_NS; t++) {
        const int64_t n = ns[t];
        const float *q[4], *k[4];
        float *r = rows8(n, q, k), full[16], pad[16];
        fn(n, q, k, full);
        /* each pair again in a block of copies of its own two rows */
        for (int g = 0; g < 4; g++)
            for (int i = 0; i < 4; i++) {
                const float *qq[4] = {q[g], q[g], q[g], q[g]}, *kk[4] = {k[i], k[i], k[i], k[i]};
                fn(n, qq, kk, pad);
                bad += memcmp(&full[g * 4 + i], &pad[5], sizeof(float)) != 0;
            }
        free(r);
    }
    CHECK(bad == 0, "a pair's score alone = in a mixed block (%d of %d differ)", bad, 16 * N_NS);
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    rng_seed(NULL);
    RUN(test_ref_is_a_dot);
    RUN(test_avx512_equals_ref);
    RUN(test_pair_alone);
    return check_summary();
}
