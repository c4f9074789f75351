/* cmd_bench_kernels.c - `numoe bench kernels`: GEMV throughput per weight
 * type next to this machine's memory bandwidth.
 *
 * Decode is memory bound: every active weight byte is read once per token,
 * so the figure that matters is weight bytes per second of a GEMV over a
 * matrix far larger than the last-level cache, against what the memory
 * delivers (a streaming read, and memcpy for comparison). Each type's
 * weights fill a buffer of --mb MiB (default 512) with valid blocks: a set
 * of distinct rows quantised from random floats by nm_quantize_row, tiled
 * over the buffer (quantising 512 MiB with the K-quant searches would take
 * minutes; the kernels' speed does not depend on which valid bits they
 * read). Times are the best of --reps runs after one warm-up. A GEMM column
 * (--gemm-tok tokens, default 32, on the first --gemm-mb MiB) gives the
 * compute-bound prefill view in GFLOP/s (2 flops per weight per token).
 * Then one expert matrix against a prefill batch through the tile GEMMs,
 * AMX next to VNNI and the AMX peak (launch/bench_prefill.c), and the
 * routed experts of one decode token through the MoE kernel
 * (launch/bench_moe.c): the CPU's part of a hybrid decode step. */
#include <emmintrin.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/opt.h"
#include "kernels/matmul.h"
#include "kernels/quant.h"
#include "kernels/threadpool.h"
#include "launch/bench_moe.h"
#include "launch/bench_prefill.h"
#include "launch/commands.h"

static const int bench_types[] = {NM_TYPE_F32,  NM_TYPE_F16,  NM_TYPE_BF16, NM_TYPE_Q8_0, NM_TYPE_Q4_0,
                                  NM_TYPE_Q4_1, NM_TYPE_Q5_0, NM_TYPE_Q5_1, NM_TYPE_Q2_K, NM_TYPE_Q3_K,
                                  NM_TYPE_Q4_K, NM_TYPE_Q5_K, NM_TYPE_Q6_K};
#define N_BENCH_TYPES ((int)(sizeof bench_types / sizeof bench_types[0]))
#define DISTINCT_ROWS 64

static void usage(FILE *f) {
    fprintf(f,
            "usage: numoe bench kernels [options]\n"
            "\n"
            "GEMV (1 token) throughput per weight type in GB/s of weight bytes, on 1 thread and on\n"
            "all threads, next to the memory bandwidth that bounds decode; plus a GEMM column.\n"
            "\n"
            "options:\n"
            "  --threads N     threads for the all-threads columns (default: the CPUs this process may use)\n"
            "  --mb SIZE       MiB of weights per type (and per expert shape), much larger than the\n"
            "                  last-level cache (default 512)\n"
            "  --types LIST    comma-separated types (default F32,F16,BF16,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,\n"
            "                  Q2_K,Q3_K,Q4_K,Q5_K,Q6_K)\n"
            "  --isa LEVEL     scalar, avx2, avx512 or avx512vnni (default: the best this CPU runs,\n"
            "                  or NUMOE_ISA)\n"
            "  --cols N        row length, a multiple of 256 (default 7168, DeepSeek-V3's hidden size)\n"
            "  --reps N        timed repetitions per figure, best kept (default 5)\n"
            "  --gemm-tok N    tokens of the GEMM column, 0 to skip it (default 32)\n"
            "  --gemm-mb SIZE  MiB of weights the GEMM runs over (default 32)\n"
            "  --prefill-tok N tokens of the prefill table (one V3 expert matrix, 2048 x 7168 Q4_K, through\n"
            "                  the AMX and VNNI tile GEMMs, next to the AMX peak), 0 to skip it (default 256)\n"
            "  --moe LIST      expert shapes of the routed-experts table (one decode token through the\n"
            "                  MoE kernel, as the in-process backend and workers run it): v2-lite, v3,\n"
            "                  comma-separated, or none (default v2-lite,v3)\n");
}

static int parse_long(const char *s, long lo, long hi, long *out) {
    long long v;
    if (nm_parse_int(s, lo, hi, &v)) return -1;
    *out = (long)v;
    return 0;
}

static int type_by_name(const char *name, size_t len) {
    for (int i = 0; i < N_BENCH_TYPES; i++) {
        const char *tn = nm_type_name(bench_types[i]);
        if (strlen(tn) == len && !strncasecmp(tn, name, len)) return bench_types[i];
    }
    return -1;
}

/* ---- memory bandwidth ---------------------------------------------------- */

/* Reads go in chunks handed out like matmul's (NM_MATMUL_CHUNK_BYTES from
 * an atomic counter), so the threads stream through nearby memory as a
 * GEMV does; on a 16-core Xeon, 16 threads each on its own far-apart slice
 * read 92-107 GB/s where the same loop over shared chunks read 132-140. */
struct bw_job {
    const uint8_t *src;
    uint8_t *dst;
    size_t bytes;
    atomic_size_t next;    /* next read chunk after each thread's first */
    uint64_t sink[64 * 8]; /* one cache line per thread */
};

static void slice(size_t bytes, int ith, int nth, size_t *lo, size_t *hi) {
    *lo = (bytes / 64 * (size_t)ith / (size_t)nth) * 64;
    *hi = (bytes / 64 * (size_t)(ith + 1) / (size_t)nth) * 64;
}

/* 16-byte loads (SSE2, in every x86-64), one 64-byte line per step, with
 * a software prefetch 4 KiB ahead: on a 16-core Xeon this read 145 GB/s
 * where 8-byte loads without prefetch read 100-108 (and a GEMV, which
 * prefetches, would seem to beat the bound); 2 KiB ahead read 134-144. */
static void read_task(void *p, int ith, int nth) {
    struct bw_job *j = p;
    const size_t chunk = NM_MATMUL_CHUNK_BYTES, n_chunks = j->bytes / chunk;
    __m128i a = _mm_setzero_si128(), b = a;
    for (size_t c = (size_t)ith; c < n_chunks; c = atomic_fetch_add(&j->next, 1)) {
        const uint8_t *w = j->src + c * chunk;
        for (size_t i = 0; i < chunk; i += 64) {
            __builtin_prefetch((const void *)((uintptr_t)(w + i) + 4096), 0, 3);
            a = _mm_add_epi64(a, _mm_load_si128((const __m128i *)(w + i)));
            b = _mm_add_epi64(b, _mm_load_si128((const __m128i *)(w + i + 16)));
            a = _mm_add_epi64(a, _mm_load_si128((const __m128i *)(w + i + 32)));
            b = _mm_add_epi64(b, _mm_load_si128((const __m128i *)(w + i + 48)));
        }
    }
    j->sink[(ith % 64) * 8] = (uint64_t)_mm_cvtsi128_si64(_mm_xor_si128(a, b));
}

static void reset_chunks(void *p, int nth) { atomic_store(&((struct bw_job *)p)->next, (size_t)nth); }

static void copy_task(void *p, int ith, int nth) {
    struct bw_job *j = p;
    size_t lo, hi;
    slice(j->bytes, ith, nth, &lo, &hi);
    memcpy(j->dst + lo, j->src + lo, hi - lo);
}

/* reset(ctx), when given, runs before each run, untimed. */
static double best_time(nm_pool *pool, nm_pool_fn fn, void *ctx, int reps, void (*reset)(void *, int)) {
    if (reset) reset(ctx, nm_pool_size(pool));
    nm_pool_run(pool, fn, ctx); /* warm-up */
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        if (reset) reset(ctx, nm_pool_size(pool));
        const double t0 = nm_now_s();
        nm_pool_run(pool, fn, ctx);
        const double t = nm_now_s() - t0;
        if (t < best) best = t;
    }
    return best;
}

/* ---- GEMV / GEMM ----------------------------------------------------------- */

/* Fills `bytes` with rows of `type`; returns the number of whole rows, 0 if
 * the type cannot be quantised. */
static int64_t fill_weights(int type, int64_t cols, uint8_t *buf, size_t bytes, unsigned *seed) {
    const size_t rb = nm_row_size(type, cols);
    float *f = malloc(sizeof(float) * (size_t)cols);
    if (!f) return 0;
    const int64_t rows = (int64_t)(bytes / rb);
    const int64_t distinct = rows < DISTINCT_ROWS ? rows : DISTINCT_ROWS;
    for (int64_t r = 0; r < distinct; r++) {
        for (int64_t k = 0; k < cols; k++) f[k] = (float)rand_r(seed) / (float)RAND_MAX * 2.0f - 1.0f;
        if (nm_quantize_row(type, f, buf + (size_t)r * rb, cols) != 0) {
            free(f);
            return 0;
        }
    }
    free(f);
    for (int64_t r = distinct; r < rows; r += distinct) {
        const int64_t n = rows - r < distinct ? rows - r : distinct;
        memcpy(buf + (size_t)r * rb, buf, (size_t)n * rb);
    }
    return rows;
}

struct mm_bench {
    nm_matmul_ctx *ctx;
    nm_pool *pool;
    int type;
    const void *W;
    int64_t rows, cols, n_tok;
    const float *X;
    float *Y;
    int failed;
};

static void mm_task(void *p, int ith, int nth) {
    (void)ith;
    (void)nth;
    struct mm_bench *b = p;
    if (nm_matmul(b->ctx, b->pool, b->type, b->W, b->rows, b->cols, b->X, b->cols, b->n_tok, b->Y, b->rows) != 0)
        b->failed = 1;
}

/* The matmul runs on b->pool; timing goes through a NULL pool so the
 * harness adds no dispatch of its own. */
static double time_matmul(struct mm_bench *b, int reps) { return best_time(NULL, mm_task, b, reps, NULL); }

/* sysfs first: glibc's sysconf derives L3 from cpuid, which on some AMD
 * parts (and VMs) reports the whole socket's L3 rather than the slice a
 * core can fill. */
static long llc_bytes(void) {
    long kib = 0;
    FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    if (f) {
        if (fscanf(f, "%ldK", &kib) != 1) kib = 0;
        fclose(f);
    }
    if (kib > 0) return kib * 1024;
#ifdef _SC_LEVEL3_CACHE_SIZE
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l3 > 0) return l3;
#endif
    return 0;
}

static void cpu_model(char *buf, size_t n) {
    snprintf(buf, n, "unknown cpu");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10)) continue;
        const char *v = strchr(line, ':');
        if (!v) break;
        v++;
        while (*v == ' ') v++;
        snprintf(buf, n, "%s", v);
        buf[strcspn(buf, "\n")] = 0;
        break;
    }
    fclose(f);
}

int nm_cmd_bench_kernels(int argc, char **argv) {
    long threads = 0, mb = 512, cols = 7168, reps = 5, gemm_tok = 32, gemm_mb = 32, prefill_tok = 256;
    const char *moe = "v2-lite,v3";
    nm_isa isa = nm_isa_best();
    int types[N_BENCH_TYPES], n_types = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "numoe bench kernels: unknown option or missing value: %s\n\n", a);
            usage(stderr);
            return 2;
        }
        const char *v = argv[++i];
        int bad = 0;
        if (!strcmp(a, "--threads")) bad = parse_long(v, 1, 4096, &threads);
        else if (!strcmp(a, "--mb")) bad = parse_long(v, 1, 1L << 20, &mb);
        else if (!strcmp(a, "--cols")) bad = parse_long(v, 256, 1L << 24, &cols) || cols % 256;
        else if (!strcmp(a, "--reps")) bad = parse_long(v, 1, 1000, &reps);
        else if (!strcmp(a, "--gemm-tok")) bad = parse_long(v, 0, 4096, &gemm_tok);
        else if (!strcmp(a, "--gemm-mb")) bad = parse_long(v, 1, 1L << 20, &gemm_mb);
        else if (!strcmp(a, "--prefill-tok")) bad = parse_long(v, 0, 65536, &prefill_tok);
        else if (!strcmp(a, "--moe")) moe = strcmp(v, "none") ? v : "";
        else if (!strcmp(a, "--isa")) {
            bad = 1;
            for (int l = 0; l < NM_ISA_COUNT; l++)
                if (!strcasecmp(v, nm_isa_name((nm_isa)l))) {
                    isa = (nm_isa)l;
                    bad = 0;
                }
            if (!bad && !nm_isa_supported(isa)) {
                fprintf(stderr, "numoe bench kernels: --isa %s: this CPU does not support it\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--types")) {
            n_types = 0;
            for (const char *p = v; *p;) {
                const size_t len = strcspn(p, ",");
                const int t = type_by_name(p, len);
                int seen = 0;
                for (int k = 0; k < n_types; k++) seen |= types[k] == t;
                if (t < 0 || seen) {
                    fprintf(stderr, "numoe bench kernels: --types: unknown or repeated type '%.*s'\n", (int)len, p);
                    return 2;
                }
                types[n_types++] = t;
                p += len + (p[len] == ',');
            }
        } else {
            fprintf(stderr, "numoe bench kernels: unknown option %s\n\n", a);
            usage(stderr);
            return 2;
        }
        if (bad) {
            fprintf(stderr, "numoe bench kernels: bad value for %s: '%s'\n", a, v);
            return 2;
        }
    }
    if (n_types == 0) {
        memcpy(types, bench_types, sizeof bench_types);
        n_types = N_BENCH_TYPES;
    }

    nm_pool *pool = nm_pool_create((int)threads);
    if (!pool) {
        fprintf(stderr, "numoe bench kernels: cannot start %ld threads\n", threads);
        return 1;
    }
    const int nth = nm_pool_size(pool);
    const size_t bytes = (size_t)mb << 20;
    /* 2 MiB alignment lets the kernel back the buffer with huge pages, so
     * the figures measure the kernels and memory rather than TLB misses;
     * aligned_alloc wants the size a multiple of the alignment (--mb 1) */
    const size_t huge = (size_t)1 << 21;
    uint8_t *buf = aligned_alloc(huge, (bytes + huge - 1) & ~(huge - 1));
    float *X = malloc(sizeof(float) * (size_t)cols * (size_t)(gemm_tok > 1 ? gemm_tok : 1));
    /* Y holds one row per weight row (GEMV) or gemm_tok rows of the GEMM slice */
    size_t y_elems = 1;
    for (int i = 0; i < n_types; i++) {
        const size_t rb = nm_row_size(types[i], cols), gb = (size_t)gemm_mb << 20;
        const size_t gemv = bytes / rb, gemm = ((gb < bytes ? gb : bytes) / rb + 1) * (size_t)gemm_tok;
        if (gemv > y_elems) y_elems = gemv;
        if (gemm > y_elems) y_elems = gemm;
    }
    float *Y = malloc(sizeof(float) * y_elems);
    if (!buf || !X || !Y) {
        fprintf(stderr, "numoe bench kernels: cannot allocate %ld MiB of weights\n", mb);
        free(buf);
        free(X);
        free(Y);
        nm_pool_destroy(pool);
        return 1;
    }
    madvise(buf, bytes, MADV_HUGEPAGE);
    unsigned seed = 12345;
    for (long i = 0; i < cols * (gemm_tok > 1 ? gemm_tok : 1); i++) X[i] = (float)rand_r(&seed) / (float)RAND_MAX - 0.5f;

    char cpu[256];
    cpu_model(cpu, sizeof cpu);
    const long llc = llc_bytes();
    printf("numoe bench kernels\n");
    printf("  cpu      %s, %d threads, isa %s (best on this cpu: %s)\n", cpu, nth, nm_isa_name(isa),
           nm_isa_name(nm_isa_best()));
    printf("  weights  %ld MiB per type (last-level cache %s%.0f MiB%s), rows of %ld; best of %ld reps\n", mb,
           llc > 0 ? "" : "size unknown", llc / 1048576.0, llc > 0 && (long)bytes < 8 * llc ? ": TOO SMALL, use --mb" : "",
           cols, reps);
    if (llc <= 0) printf("           (could not read the cache size)\n");

    /* memory: read the whole buffer; copy its first half onto its second */
    memset(buf, 1, bytes);
    struct bw_job *bw = calloc(1, sizeof *bw);
    if (!bw) {
        fprintf(stderr, "numoe bench kernels: out of memory\n");
        free(buf);
        free(X);
        free(Y);
        nm_pool_destroy(pool);
        return 1;
    }
    bw->src = buf;
    bw->bytes = bytes;
    const double rd_bytes = (double)(bytes / NM_MATMUL_CHUNK_BYTES * NM_MATMUL_CHUNK_BYTES);
    const double rd1 = rd_bytes / best_time(NULL, read_task, bw, (int)reps, reset_chunks) / 1e9;
    const double rdn = rd_bytes / best_time(pool, read_task, bw, (int)reps, reset_chunks) / 1e9;
    bw->dst = buf + bytes / 2;
    bw->bytes = bytes / 2;
    const double cp1 = (bytes / 2) / best_time(NULL, copy_task, bw, (int)reps, NULL) / 1e9;
    const double cpn = (bytes / 2) / best_time(pool, copy_task, bw, (int)reps, NULL) / 1e9;
    free(bw);
    printf("\nmemory bandwidth, GB/s (1e9 bytes/s)      1 thread  %3d threads\n", nth);
    printf("  read  (the bound for decode GEMV)       %8.1f  %11.1f\n", rd1, rdn);
    printf("  memcpy (bytes copied; 2x on the bus)    %8.1f  %11.1f\n", cp1, cpn);

    nm_matmul_ctx ctx;
    nm_matmul_ctx_init(&ctx);
    ctx.isa = isa;
    printf("\nGEMV, n_tok = 1: GB/s of weight bytes; %% = share of the %d-thread read bandwidth", nth);
    if (gemm_tok > 0) printf(";\nGEMM, n_tok = %ld on %ld MiB, %d threads: GFLOP/s (2 per weight per token)", gemm_tok,
                             gemm_mb, nth);
    printf("\n\n  %-5s %-10s %9s %9s %6s", "type", "dot", "1 thread", "threads", "%");
    if (gemm_tok > 0) printf(" %10s", "GEMM");
    printf("\n");
    int rc = 0;
    for (int i = 0; i < n_types; i++) {
        const int type = types[i];
        const size_t rb = nm_row_size(type, cols);
        const int64_t rows = fill_weights(type, cols, buf, bytes, &seed);
        if (rows == 0) {
            fprintf(stderr, "numoe bench kernels: cannot make %s rows of %ld\n", nm_type_name(type), cols);
            rc = 1;
            continue;
        }
        const double wbytes = (double)rows * (double)rb;
        struct mm_bench b = {&ctx, NULL, type, buf, rows, cols, 1, X, Y, 0};
        const double g1 = wbytes / time_matmul(&b, (int)reps) / 1e9;
        b.pool = pool;
        const double gn = wbytes / time_matmul(&b, (int)reps) / 1e9;
        const nm_vec_dot_fn dot = nm_vec_dot_for(type, isa);
        /* the lowest level handing out the same function owns it */
        const char *level = "scalar";
        for (int l = (int)isa; l > NM_ISA_SCALAR && dot == nm_vec_dot_for(type, (nm_isa)l); l--)
            level = nm_isa_name((nm_isa)l);
        printf("  %-5s %-10s %9.1f %9.1f %5.0f%%", nm_type_name(type), level, g1, gn, 100.0 * gn / rdn);
        if (gemm_tok > 0) {
            const size_t gb = (size_t)gemm_mb << 20;
            b.rows = (int64_t)((gb < bytes ? gb : bytes) / rb);
            if (b.rows < 1) b.rows = 1;
            b.n_tok = gemm_tok;
            const int greps = reps < 3 ? (int)reps : 3;
            const double t = time_matmul(&b, greps);
            printf(" %10.1f", 2.0 * (double)b.rows * (double)cols * (double)gemm_tok / t / 1e9);
        }
        printf("\n");
        fflush(stdout);
        if (b.failed) {
            fprintf(stderr, "numoe bench kernels: matmul failed for %s\n", nm_type_name(type));
            rc = 1;
        }
    }
    nm_matmul_ctx_free(&ctx);
    free(buf);
    free(X);
    free(Y);
    if (prefill_tok > 0) {
        const int prc = nm_bench_prefill(pool, (int)prefill_tok, (int)(reps < 3 ? reps : 3), isa >= NM_ISA_AVX512_VNNI);
        if (prc) rc = prc;
    }
    if (*moe) {
        const int mrc = nm_bench_moe_decode(pool, moe, (int)reps, rdn, bytes, llc);
        if (mrc) rc = mrc;
    }
    nm_pool_destroy(pool);
    return rc;
}
