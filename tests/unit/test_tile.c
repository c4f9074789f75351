/* test_tile.c - the tiled expert GEMM (kernels/tile.h) against its scalar
 * reference, and that reference against the exact dot.
 *
 *   test_tile_sizes          the packed layout's sizes as tile.h states them
 *                            (Q4_K 1.028x its rows, Q5_0 1.0x)
 *   test_pack_matches_ref    the SIMD packer writes the bytes of the plain C
 *                            one (nrows 1..16, Q5_0 block counts 1, 2, 3, 5, 44)
 *   test_gemm_matches_ref    nm_tile_gemm on the packed tiles (of either
 *                            packer) = nm_tile_dot_ref bit for bit, for every
 *                            nrows 1..16 and nx 1..8, several n, repeated
 *                            activation rows, zero padding rows; nm_tile_gemv
 *                            (row-major, one activation row) likewise
 *   test_ref_near_exact      nm_tile_dot_ref within a float bound of the exact
 *                            value (integers in int64, float steps in double)
 *   test_gemm_many_matches_ref  nm_tile_gemm_many's kernels = nm_tile_dot_ref
 *                            bit for bit: the AMX one with its tile unit
 *                            emulated (every CPU with AVX512-VNNI), the real
 *                            AMX one (where nm_isa_amx(); else skipped with
 *                            "AMX not available: <why>"), and the dispatcher;
 *                            nx 1..64 across the 16-token tiles and a partial
 *                            last one, strided and repeated activation rows,
 *                            activations of random bytes (quants -128..127:
 *                            the signed side of TDPBSUD), out rows ldo apart
 *                            with the gaps untouched
 *
 * Data as test_dot_simd: rows quantised from random floats and rows of random
 * bytes with random finite fp16 scales (every quant, scale and min pattern);
 * activations random floats quantised to Q8_K / Q8_0. The seed is printed;
 * NUMOE_TEST_SEED repeats a run. The SIMD tests skip (saying so) on CPUs
 * without AVX512-VNNI.
 *
 * Bound of test_ref_near_exact: per block the reference rounds the integer
 * to float, one product and two FMAs (4 roundings of at most u = 2^-24
 * relative to the block's absolute magnitude A_b), then adds the block into
 * a serial chain of nb terms. With A = sum_b A_b (A_b = |x.d| (|d| sum_j sc_j
 * sum |q x| + |dmin| sum_j m_j |B_j|) for Q4_K, |d x.d| sum |q x| for Q5_0)
 * the error is at most (nb + 4) u A (Higham's chain bound); a wrong quant
 * or scale moves the value by about A / n or more, far outside. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/fp16.h"
#include "kernels/quant.h"
#include "kernels/tile.h"
#include "tests/unit/check.h"
#include "tests/unit/rng.h"


static void random_floats(float *x, int64_t n) {
    float scale = 1, offset = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i % 32 == 0) {
            scale = exp2f(6.0f * rng_uniform() - 3.0f);
            offset = (2.0f * rng_uniform() - 1.0f) * scale;
        }
        x[i] = rng_normal() * scale + offset;
    }
}

static nm_half random_half(float lo, float hi, int neg) {
    float v = lo + (hi - lo) * rng_uniform();
    if (neg && (rng_next() & 1)) v = -v;
    return nm_fp32_to_fp16(v);
}

/* One row of n elements: quantised floats (kind 0) or random bytes (1). */
static void random_row(int type, int64_t n, void *row, int kind) {
    if (kind == 0) {
        float *f = malloc(sizeof(float) * (size_t)n);
        random_floats(f, n);
        nm_quantize_row(type, f, row, n);
        free(f);
        return;
    }
    size_t bytes = nm_row_size(type, n);
    for (size_t i = 0; i < bytes; i++) ((uint8_t *)row)[i] = (uint8_t)rng_next();
    if (type == NM_TYPE_Q4_K) {
        block_q4_K *b = row;
        for (int64_t i = 0; i < n / NM_QK_K; i++) b[i].d = random_half(0.001f, 0.05f, 0), b[i].dmin = random_half(0.001f, 0.05f, 0);
    } else {
        block_q5_0 *b = row;
        for (int64_t i = 0; i < n / NM_QK5_0; i++) b[i].d = random_half(0.01f, 0.2f, 1);
    }
}

static const int types[] = {NM_TYPE_Q4_K, NM_TYPE_Q5_0};
/* row lengths per type: one block, a few, V2-Lite's 2048 / 1408; Q5_0 with
 * block counts 1, 2, 3, 5 (the packer's groups of 4 blocks, an odd last
 * block's padded pair) and 44 */
#define NLENS 5
static const int64_t lens_q4_K[NLENS] = {256, 512, 768, 1280, 2048}, lens_q5_0[NLENS] = {32, 64, 96, 160, 1408};

/* The sizes tile.h states (per 16 rows: Q4_K 2368 bytes a block, Q5_0 704 a
 * pair of blocks) and how they compare with the rows': the shard holds them. */
static void test_tile_sizes(void) {
    CHECK(nm_tile_size(NM_TYPE_Q4_K, 256) == 2368 && nm_tile_size(NM_TYPE_Q4_K, 2048) == 8 * 2368, "Q4_K tile size %zu",
          nm_tile_size(NM_TYPE_Q4_K, 256));
    CHECK(nm_tile_size(NM_TYPE_Q5_0, 64) == 704 && nm_tile_size(NM_TYPE_Q5_0, 32) == 704 &&
              nm_tile_size(NM_TYPE_Q5_0, 1408) == 22 * 704,
          "Q5_0 tile size %zu", nm_tile_size(NM_TYPE_Q5_0, 64));
    CHECK(nm_tile_matrix_size(NM_TYPE_Q4_K, 2048, 1408) == 88 * nm_tile_size(NM_TYPE_Q4_K, 2048) &&
              nm_tile_matrix_size(NM_TYPE_Q4_K, 2048, 17) == 2 * nm_tile_size(NM_TYPE_Q4_K, 2048),
          "matrix of tiles");
    const double q4 = (double)nm_tile_size(NM_TYPE_Q4_K, 2048) / (16.0 * (double)nm_row_size(NM_TYPE_Q4_K, 2048));
    const double q5 = (double)nm_tile_size(NM_TYPE_Q5_0, 1408) / (16.0 * (double)nm_row_size(NM_TYPE_Q5_0, 1408));
    CHECK(q4 < 1.03 && q5 == 1.0, "tiles / rows: Q4_K %.4f, Q5_0 %.4f", q4, q5);
    fprintf(stderr, "  tile bytes / row bytes: Q4_K %.4f, Q5_0 %.4f\n", q4, q5);
}

static int simd_ok(int type) {
    if (nm_tile_usable(type)) return 1;
    fprintf(stderr, "  skip %s: no AVX512-VNNI tiles on this CPU (isa %s)\n", nm_type_name(type), nm_isa_name(nm_isa_best()));
    return 0;
}

static void test_pack_matches_ref(void) {
    for (int ti = 0; ti < 2; ti++) {
        const int type = types[ti];
        if (!simd_ok(type)) continue;
        for (int li = 0; li < NLENS; li++) {
            const int64_t n = type == NM_TYPE_Q4_K ? lens_q4_K[li] : lens_q5_0[li];
            const size_t rb = nm_row_size(type, n), ts = nm_tile_size(type, n);
            uint8_t *rows = malloc(rb * 16);
            uint8_t *a = aligned_alloc(64, ts), *b = aligned_alloc(64, ts);
            for (int kind = 0; kind < 2; kind++)
                for (int nr = 1; nr <= 16; nr++) {
                    for (int r = 0; r < 16; r++) random_row(type, n, rows + rb * (size_t)r, kind);
                    memset(a, 0xAB, ts);
                    memset(b, 0xCD, ts);
                    nm_tile_pack(type, n, rows, rb, nr, a);
                    nm_tile_pack_ref(type, n, rows, rb, nr, b);
                    size_t i = 0;
                    while (i < ts && a[i] == b[i]) i++;
                    CHECK(i == ts, "%s n %lld nrows %d kind %d: SIMD pack differs from the reference at byte %zu of %zu",
                          nm_type_name(type), (long long)n, nr, kind, i, ts);
                }
            free(rows), free(a), free(b);
        }
    }
}

static void test_gemm_matches_ref(void) {
    for (int ti = 0; ti < 2; ti++) {
        const int type = types[ti];
        if (!simd_ok(type)) continue;
        const int vt = nm_type_traits_of(type)->vec_dot_type;
        for (int li = 0; li < NLENS; li++) {
            const int64_t n = type == NM_TYPE_Q4_K ? lens_q4_K[li] : lens_q5_0[li];
            const size_t rb = nm_row_size(type, n), ts = nm_tile_size(type, n);
            const size_t xb = nm_row_size(vt, n), ab = nm_tile_aux_size(type, n);
            uint8_t *rows = malloc(rb * 16), *tile = aligned_alloc(64, ts);
            uint8_t *xs = malloc(xb * NM_TILE_NX), *auxs = malloc(ab * NM_TILE_NX);
            float *f = malloc(sizeof(float) * (size_t)n);
            for (int kind = 0; kind < 2; kind++)
            for (int nr = 1; nr <= 16; nr++) {
                for (int r = 0; r < 16; r++) random_row(type, n, rows + rb * (size_t)r, kind);
                /* the scalar packer's tile on odd nrows, the SIMD one's on even: equal bytes
                 * (test_pack_matches_ref), both fed to the GEMM */
                if (nr % 2)
                    nm_tile_pack_ref(type, n, rows, rb, nr, tile);
                else
                    nm_tile_pack(type, n, rows, rb, nr, tile);
                for (int j = 0; j < NM_TILE_NX; j++) {
                    random_floats(f, n);
                    nm_quantize_row(vt, f, xs + xb * (size_t)j, n);
                    nm_tile_aux(type, n, xs + xb * (size_t)j, auxs + ab * (size_t)j);
                }
                for (int nx = 1; nx <= NM_TILE_NX; nx++) {
                    const void *x[NM_TILE_NX], *aux[NM_TILE_NX];
                    for (int j = 0; j < nx; j++) {
                        const int src = j == 3 ? 0 : j; /* a repeated row */
                        x[j] = xs + xb * (size_t)src, aux[j] = auxs + ab * (size_t)src;
                    }
                    float out[NM_TILE_NX * NM_TILE_ROWS];
                    nm_tile_gemm(type, n, tile, x, aux, nx, out);
                    if (nx == 1) { /* the row-major one-row kernel, into out's first 16 */
                        float g[NM_TILE_ROWS];
                        nm_tile_gemv(type, n, rows, rb, nr, x[0], aux[0], g);
                        for (int r = 0; r < NM_TILE_ROWS; r++) {
                            const float want = r < nr ? nm_tile_dot_ref(type, n, rows + rb * (size_t)r, x[0]) : 0.0f;
                            CHECK(memcmp(&g[r], &want, sizeof want) == 0, "%s n %lld kind %d gemv: row %d = %.9g, reference %.9g",
                                  nm_type_name(type), (long long)n, kind, r, g[r], want);
                        }
                    }
                    int bad = 0;
                    for (int j = 0; j < nx; j++)
                        for (int r = 0; r < NM_TILE_ROWS; r++) {
                            const float want = r < nr ? nm_tile_dot_ref(type, n, rows + rb * (size_t)r, x[j]) : 0.0f;
                            if (memcmp(&out[j * NM_TILE_ROWS + r], &want, sizeof want) != 0 && bad++ < 3)
                                CHECK(0, "%s n %lld kind %d nrows %d nx %d: row %d x %d = %.9g, reference %.9g",
                                      nm_type_name(type), (long long)n, kind, nr, nx, r, j, out[j * NM_TILE_ROWS + r], want);
                        }
                }
            }
            free(rows), free(tile), free(xs), free(auxs), free(f);
        }
    }
}

/* Exact value and magnitude A of one row . x, from the integers. */
static void exact_dot(int type, int64_t n, const void *w, const void *x, double *val, double *mag) {
    double v = 0, a = 0;
    if (type == NM_TYPE_Q4_K) {
        const block_q4_K *bw = w;
        const block_q8_K *bx = x;
        for (int64_t b = 0; b < n / NM_QK_K; b++) {
            /* the quants, scales and mins as nm_dequantize_row reads them */
            const uint8_t *s = bw[b].scales;
            int sc[8], m[8];
            for (int j = 0; j < 4; j++) {
                sc[j] = s[j] & 63, m[j] = s[j + 4] & 63;
                sc[j + 4] = (s[j + 8] & 0x0F) | (s[j] >> 6) << 4;
                m[j + 4] = (s[j + 8] >> 4) | (s[j + 4] >> 6) << 4;
            }
            int64_t I = 0, M = 0, Ia = 0, Ma = 0;
            for (int c = 0; c < 4; c++)
                for (int l = 0; l < 32; l++) {
                    const int lo = bw[b].qs[32 * c + l] & 0x0F, hi = bw[b].qs[32 * c + l] >> 4;
                    const int e0 = 64 * c + l, e1 = 64 * c + 32 + l;
                    I += (int64_t)sc[2 * c] * lo * bx[b].qs[e0] + (int64_t)sc[2 * c + 1] * hi * bx[b].qs[e1];
                    Ia += (int64_t)sc[2 * c] * lo * llabs(bx[b].qs[e0]) + (int64_t)sc[2 * c + 1] * hi * llabs(bx[b].qs[e1]);
                }
            for (int j = 0; j < 8; j++) {
                const int64_t B = bx[b].bsums[2 * j] + bx[b].bsums[2 * j + 1];
                M += m[j] * B, Ma += m[j] * llabs(B);
            }
            const double d = nm_fp16_to_fp32(bw[b].d), dm = nm_fp16_to_fp32(bw[b].dmin), dy = bx[b].d;
            v += dy * (d * (double)I - dm * (double)M);
            a += fabs(dy) * (fabs(d) * (double)Ia + fabs(dm) * (double)Ma);
        }
    } else {
        const block_q5_0 *bw = w;
        const block_q8_0 *bx = x;
        for (int64_t b = 0; b < n / NM_QK5_0; b++) {
            uint32_t h;
            memcpy(&h, bw[b].qh, 4);
            int64_t S = 0, Sa = 0;
            for (int l = 0; l < 16; l++) {
                const int q0 = ((bw[b].qs[l] & 0x0F) | ((h >> l) & 1) << 4) - 16;
                const int q1 = ((bw[b].qs[l] >> 4) | ((h >> (l + 16)) & 1) << 4) - 16;
                S += q0 * bx[b].qs[l] + q1 * bx[b].qs[l + 16];
                Sa += llabs((int64_t)q0 * bx[b].qs[l]) + llabs((int64_t)q1 * bx[b].qs[l + 16]);
            }
            const double d = (double)nm_fp16_to_fp32(bw[b].d) * nm_fp16_to_fp32(bx[b].d);
            v += d * (double)S;
            a += fabs(d) * (double)Sa;
        }
    }
    *val = v, *mag = a;
}

static void test_ref_near_exact(void) {
    for (int ti = 0; ti < 2; ti++) {
        const int type = types[ti];
        const int vt = nm_type_traits_of(type)->vec_dot_type;
        double worst = 0;
        for (int li = 0; li < NLENS; li++) {
            const int64_t n = type == NM_TYPE_Q4_K ? lens_q4_K[li] : lens_q5_0[li];
            const int64_t nb = n / (type == NM_TYPE_Q4_K ? NM_QK_K : NM_QK5_0);
            uint8_t *w = malloc(nm_row_size(type, n)), *x = malloc(nm_row_size(vt, n));
            float *f = malloc(sizeof(float) * (size_t)n);
            for (int rep = 0; rep < 40; rep++) {
                random_row(type, n, w, rep & 1);
                random_floats(f, n);
                nm_quantize_row(vt, f, x, n);
                double val, mag;
                exact_dot(type, n, w, x, &val, &mag);
                const double got = nm_tile_dot_ref(type, n, w, x), err = fabs(got - val);
                const double bound = (double)(nb + 4) * 0x1p-24 * mag;
                if (mag > 0 && err / mag > worst) worst = err / mag;
                CHECK(err <= bound, "%s n %lld rep %d: ref %.9g, exact %.9g, error %.3g > bound %.3g", nm_type_name(type),
                      (long long)n, rep, got, val, err, bound);
            }
            free(w), free(x), free(f);
        }
        fprintf(stderr, "  %s: largest |ref - exact| / A: %.3g\n", nm_type_name(type), worst);
    }
}

/* An activation row of random bytes in the type's vec_dot_type: every
 * quant -128..127 (the quantisers stop at -127), a random scale; Q8_K's
 * bsums the sums of its quants, as the quantiser writes them (the contract
 * reads them for the min term). */
static void random_act_bytes(int vt, int64_t n, void *row) {
    if (vt == NM_TYPE_Q8_K) {
        block_q8_K *b = row;
        for (int64_t i = 0; i < n / NM_QK_K; i++) {
            b[i].d = (2.0f * rng_uniform() - 1.0f) * 0.05f;
            for (int l = 0; l < NM_QK_K; l++) b[i].qs[l] = (int8_t)(uint8_t)rng_next();
            for (int g = 0; g < NM_QK_K / 16; g++) {
                int s = 0;
                for (int l = 0; l < 16; l++) s += b[i].qs[16 * g + l];
                b[i].bsums[g] = (int16_t)s;
            }
        }
    } else {
        block_q8_0 *b = row;
        for (int64_t i = 0; i < n / NM_QK8_0; i++) {
            b[i].d = random_half(0.001f, 0.05f, 1);
            for (int l = 0; l < NM_QK8_0; l++) b[i].qs[l] = (int8_t)(uint8_t)rng_next();
        }
    }
}

/* One many-row kernel against the reference on nx activation rows x_stride
 * apart (the aux aux_stride apart), out rows ldo apart (the gaps must stay
 * as they were). Returns the mismatches; reports the first few. */
static int check_many(const char *path, nm_tile_many_fn fn, int type, int64_t n, const uint8_t *rows, size_t rb,
                      int nr, const uint8_t *tile, const uint8_t *xs, size_t x_stride, const uint8_t *auxs,
                      size_t aux_stride, int nx, size_t ldo, const char *what) {
    float *out = malloc(sizeof(float) * ldo * (size_t)nx);
    for (size_t i = 0; i < ldo * (size_t)nx; i++) out[i] = -7.0f;
    if (fn)
        fn(n, tile, xs, x_stride, auxs, aux_stride, nx, out, ldo);
    else
        nm_tile_gemm_many(type, n, tile, xs, x_stride, auxs, aux_stride, nx, out, ldo);
    int bad = 0;
    for (int j = 0; j < nx; j++)
        for (size_t r = 0; r < ldo; r++) {
            const float got = out[(size_t)j * ldo + r];
            const float want = r >= NM_TILE_ROWS ? -7.0f
                               : (int)r < nr ? nm_tile_dot_ref(type, n, rows + rb * r, xs + (size_t)j * x_stride)
                                             : 0.0f;
            if (memcmp(&got, &want, sizeof got) != 0 && bad++ < 3)
                CHECK(0, "%s %s n %lld %s nrows %d nx %d ldo %zu: row %zu x %d = %.9g, reference %.9g", path,
                      nm_type_name(type), (long long)n, what, nr, nx, ldo, r, j, got, want);
        }
    free(out);
    return bad;
}

static void test_gemm_many_matches_ref(void) {
    static const int nxs[] = {1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64};
    const int n_nx = (int)(sizeof nxs / sizeof nxs[0]);
    const int amx = nm_isa_amx();
    if (!amx) fprintf(stderr, "  AMX not available: %s (the real AMX kernel is not run here)\n", nm_isa_amx_why_not());
    for (int ti = 0; ti < 2; ti++) {
        const int type = types[ti];
        if (!simd_ok(type)) continue;
        const nm_tile_many_fn emu = nm_tile_gemm_many_amx_emu(type), real = amx ? nm_tile_gemm_many_amx(type) : NULL;
        CHECK(emu != NULL && (!amx || real != NULL), "%s: no AMX kernel", nm_type_name(type));
        if (!emu) continue;
        const int vt = nm_type_traits_of(type)->vec_dot_type;
        long cases = 0, bad = 0;
        for (int li = 0; li < NLENS; li++) {
            const int64_t n = type == NM_TYPE_Q4_K ? lens_q4_K[li] : lens_q5_0[li];
            const size_t rb = nm_row_size(type, n), ts = nm_tile_size(type, n);
            const size_t xb = nm_row_size(vt, n), ab = nm_tile_aux_size(type, n);
            /* rows a stride apart that is no multiple of 64 (tileloadd takes any) */
            const size_t x_stride = xb + 36, aux_stride = ab + 8;
            uint8_t *rows = malloc(rb * 16), *tile = aligned_alloc(64, ts);
            uint8_t *xs = malloc(x_stride * NM_TILE_MANY), *auxs = malloc(aux_stride * NM_TILE_MANY);
            float *f = malloc(sizeof(float) * (size_t)n);
            static const int nrs[] = {1, 7, 16};
            for (int kind = 0; kind < 2; kind++)
                for (int ni = 0; ni < 3; ni++) {
                    const int nr = nrs[ni];
                    for (int r = 0; r < 16; r++) random_row(type, n, rows + rb * (size_t)r, kind);
                    nm_tile_pack_ref(type, n, rows, rb, nr, tile);
                    for (int j = 0; j < NM_TILE_MANY; j++) {
                        uint8_t *xj = xs + x_stride * (size_t)j;
                        if (kind == 0 || j % 3 == 0) {
                            random_floats(f, n);
                            nm_quantize_row(vt, f, xj, n);
                        } else {
                            random_act_bytes(vt, n, xj);
                        }
                        memset(xj + xb, 0x5A, x_stride - xb); /* the gap between rows: never read as data */
                        nm_tile_aux(type, n, xj, auxs + aux_stride * (size_t)j);
                    }
                    const char *what = kind ? "random-byte rows" : "quantised rows";
                    for (int k = 0; k < n_nx; k++) {
                        const int nx = nxs[k];
                        const size_t ldo = k % 2 ? 16 : 19;
                        bad += check_many("AMX (emulated)", emu, type, n, rows, rb, nr, tile, xs, x_stride, auxs,
                                          aux_stride, nx, ldo, what);
                        if (real)
                            bad += check_many("AMX", real, type, n, rows, rb, nr, tile, xs, x_stride, auxs, aux_stride,
                                              nx, ldo, what);
                        bad += check_many("nm_tile_gemm_many", NULL, type, n, rows, rb, nr, tile, xs, x_stride, auxs,
                                          aux_stride, nx, ldo, what);
                        cases++;
                    }
                    /* one activation row 40 times over (stride 0) */
                    bad += check_many("AMX (emulated)", emu, type, n, rows, rb, nr, tile, xs, 0, auxs, 0, 40, 16,
                                      "stride 0");
                    if (real)
                        bad += check_many("AMX", real, type, n, rows, rb, nr, tile, xs, 0, auxs, 0, 40, 16, "stride 0");
                }
            free(rows), free(tile), free(xs), free(auxs), free(f);
        }
        fprintf(stderr, "  %s: %ld many-row cases: emulated AMX%s and nm_tile_gemm_many (%s): %ld outputs differ from the reference\n",
                nm_type_name(type), cases, real ? ", real AMX" : "", nm_tile_amx_usable(type) ? "AMX" : "VNNI", bad);
    }
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    char seed_extra[64];
    snprintf(seed_extra, sizeof seed_extra, "best isa %s", nm_isa_name(nm_isa_best()));
    rng_seed(seed_extra);
    RUN(test_tile_sizes);
    RUN(test_pack_matches_ref);
    RUN(test_gemm_matches_ref);
    RUN(test_ref_near_exact);
    RUN(test_gemm_many_matches_ref);
    return check_summary();
}
