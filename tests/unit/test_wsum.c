/* test_wsum.c - weighted sums of rows (kernels/wsum.h): every path equals
 * the plain loop bit for bit.
 *
 *   test_ref_is_the_plain_loop  nm_wsum_ref = o = 0; for p: o += w*r (the
 *                               order attention used before it)
 *   test_avx512_equals_ref      nm_wsum_avx512 = nm_wsum_ref bit for bit
 *                               for nv 1..16, column counts with every tail
 *                               (1..40, 512, 513), 1..300 rows, strided
 *                               rows / weights / outputs, values spanning
 *                               magnitudes (so a different summation order
 *                               or an FMA would show)
 *
 * The seed is printed; NUMOE_TEST_SEED repeats a run. The AVX-512 test
 * skips (saying so) where the CPU lacks AVX-512. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/quant.h"
#include "kernels/wsum.h"
#include "tests/unit/check.h"
#include "tests/unit/rng.h"

/* random floats over several decades, both signs */
static float val(void) { return (float)((rng_double() - 0.5) * pow(10.0, 6 * rng_double() - 3)); }

static void fill(float *a, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] = val();
}

static void test_ref_is_the_plain_loop(void) {
    const int64_t n_rows = 37, cols = 19, ldr = 23, ldw = 41;
    const int nv = 3;
    float *w = malloc(sizeof(float) * (size_t)(nv * ldw)), *r = malloc(sizeof(float) * (size_t)(n_rows * ldr));
    float out[3 * 19];
    fill(w, (size_t)(nv * ldw)), fill(r, (size_t)(n_rows * ldr));
    nm_wsum_ref(n_rows, nv, w, ldw, r, ldr, cols, out, cols);
    int bad = 0;
    for (int v = 0; v < nv; v++)
        for (int64_t c = 0; c < cols; c++) {
            volatile float o = 0;
            for (int64_t p = 0; p < n_rows; p++) {
                volatile float prod = w[v * ldw + p] * r[p * ldr + c];
                o = o + prod;
            }
            bad += memcmp((const void *)&o, &out[v * cols + c], 4) != 0;
        }
    CHECK(bad == 0, "reference = the plain loop (%d of %d differ)", bad, nv * (int)cols);
    free(w), free(r);
}

static void test_avx512_equals_ref(void) {
    if (!nm_isa_supported(NM_ISA_AVX512)) {
        printf("  skipped: this CPU has no AVX-512\n");
        return;
    }
    const int64_t col_cases[] = {1, 2, 7, 15, 16, 17, 31, 33, 40, 512, 513};
    int cases = 0, bad_cases = 0;
    for (int nv = 1; nv <= NM_WSUM_MAX_V; nv++)
        for (size_t ci = 0; ci < sizeof col_cases / sizeof *col_cases; ci++) {
            const int64_t cols = col_cases[ci], n_rows = 1 + (int64_t)(rng_double() * 300), ldr = cols + (int64_t)(rng_double() * 9);
            const int64_t ldw = n_rows + (int64_t)(rng_double() * 5), ldo = cols + (int64_t)(rng_double() * 3);
            float *w = malloc(sizeof(float) * (size_t)(nv * ldw)), *r = malloc(sizeof(float) * (size_t)(n_rows * ldr));
            float *a = malloc(sizeof(float) * (size_t)(nv * ldo)), *b = malloc(sizeof(float) * (size_t)(nv * ldo));
            fill(w, (size_t)(nv * ldw)), fill(r, (size_t)(n_rows * ldr));
            for (int64_t i = 0; i < nv * ldo; i++) a[i] = b[i] = 12345.0f; /* what lies between rows stays */
            nm_wsum_ref(n_rows, nv, w, ldw, r, ldr, cols, a, ldo);
            nm_wsum_avx512(n_rows, nv, w, ldw, r, ldr, cols, b, ldo);
            cases++;
            bad_cases += memcmp(a, b, sizeof(float) * (size_t)(nv * ldo)) != 0;
            free(w), free(r), free(a), free(b);
        }
    CHECK(bad_cases == 0, "AVX-512 = reference bit for bit in %d of %d cases (outputs and what lies between them)",
          cases - bad_cases, cases);
    CHECK(nm_wsum() == (nm_isa_best() >= NM_ISA_AVX512 ? nm_wsum_avx512 : nm_wsum_ref), "nm_wsum picks by nm_isa_best");
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    rng_seed(NULL);
    RUN(test_ref_is_the_plain_loop);
    RUN(test_avx512_equals_ref);
    return check_summary();
}
