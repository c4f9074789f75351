/* test_cuda_quant.cu - GPU dequantisation and GEMV against the CPU reference.
 *
 * For every type the GPU kernels handle, on fresh random data in two forms
 *   "quant": random floats through the CPU quantiser nm_quantize_row (the
 *            blocks a real GGUF holds), and
 *   "bytes": random bytes with sane fp16 scales written over the scale
 *            fields (every bit pattern of quants/sub-scales, incl. ones the
 *            quantiser never emits; for F32/F16/BF16 any bits, NaN and inf
 *            included),
 * and for the matrix placed both 256-aligned and at an offset of 2 bytes
 * (the 2-byte-load kernel paths), it checks:
 *   dequant: GPU nm_cuda_dequantize == CPU nm_dequantize_row bit for bit;
 *   gemv:    |y_gpu - y_ref| <= 2e-5 * sum|w_i x_i| + 2e-6 * max|w| * sum|x_i|
 *            per row, y_ref a double-precision dot of the CPU-dequantised
 *            row with x (fp32 accumulation in a different order; the second
 *            term covers the d*sc*sum(qx) - dmin*m*sum(x) factoring when the
 *            two nearly cancel). "bytes" float rows (NaN/inf) are not
 *            GEMV-tested.
 * The integer GEMV (x quantised to q8, nm_cuda_gemv_q8) on the same kinds of
 * matrices: y against a double dot of the dequantised W and the GPU's own
 * dequantised q8 x (the q8 rows themselves checked: d = max|x|/127, |q d - x|
 * <= d/2, s = d sum q), with the bound above; an n-row call bit-equal to n
 * one-row calls; the pairs form bit-equal to single calls.
 * plus the API's argument checks. Then one timing line per type: GEMV over a
 * 4096 x 14336 matrix, weights rotated through enough copies to exceed 4x
 * the L2 cache, so the GB/s are from DRAM.
 *
 * Usage: test_cuda_quant [--no-bench] [--bench-only] [--bench-shape ROWS COLS]...
 *        [--bench-type TYPE]...
 * (--bench-shape replaces the default 4096 x 14336; repeatable; --bench-type
 * times only the types named)
 * Last line "<prog>: N passed, N failed"; exit 1 on failure, 77 when there
 * is no CUDA device. */
#include "kernels/cuda/cuda_quant.h"

#include "kernels/fp16.h"
#include "kernels/quant.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static const char *g_prog = "test_cuda_quant";
static int g_passed = 0, g_failed = 0;

static void report(bool ok, const char *what) {
    if (ok) g_passed++;
    else g_failed++;
    fprintf(stderr, "%s %s\n", ok ? "ok  " : "FAIL", what);
}

/* CUDA calls in the test itself: a failure here is a broken environment, not
 * a kernel result; stop with a failing exit. */
#define CK(call)                                                                                           \
    do {                                                                                                   \
        cudaError_t e_ = (call);                                                                           \
        if (e_ != cudaSuccess) {                                                                           \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));         \
            printf("%s: %d passed, %d failed\n", g_prog, g_passed, g_failed + 1);                          \
            exit(1);                                                                                       \
        }                                                                                                  \
    } while (0)

/* ---- random ------------------------------------------------------------- */
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint64_t rnd64(void) { /* splitmix64 */
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rnd_u(void) { return (double)(rnd64() >> 11) * 0x1p-53; } /* [0, 1) */
static float rnd_pm1(void) { return (float)(2.0 * rnd_u() - 1.0); }
/* Roughly normal, with an occasional outlier, like weights. */
static float rnd_weight(void) {
    float g = (rnd_pm1() + rnd_pm1() + rnd_pm1()) * 0.6f;
    if ((rnd64() & 63) == 0) g *= 8.0f;
    return g;
}

/* ---- types under test --------------------------------------------------- */
struct tinfo {
    int type;
    const char *name;
    int halves[2]; /* byte offsets of fp16 scale fields in a block, -1 = none */
};
static const tinfo k_types[] = {
    {NM_TYPE_F32, "F32", {-1, -1}},    {NM_TYPE_F16, "F16", {-1, -1}},      {NM_TYPE_BF16, "BF16", {-1, -1}},
    {NM_TYPE_Q4_0, "Q4_0", {0, -1}},   {NM_TYPE_Q4_1, "Q4_1", {0, 2}},      {NM_TYPE_Q5_0, "Q5_0", {0, -1}},
    {NM_TYPE_Q5_1, "Q5_1", {0, 2}},    {NM_TYPE_Q8_0, "Q8_0", {0, -1}},     {NM_TYPE_Q2_K, "Q2_K", {80, 82}},
    {NM_TYPE_Q3_K, "Q3_K", {108, -1}}, {NM_TYPE_Q4_K, "Q4_K", {0, 2}},      {NM_TYPE_Q5_K, "Q5_K", {0, 2}},
    {NM_TYPE_Q6_K, "Q6_K", {208, -1}},
};

static bool is_float_type(int type) {
    return type == NM_TYPE_F32 || type == NM_TYPE_F16 || type == NM_TYPE_BF16;
}

/* A sane fp16 scale: +-[2^-12, 2^-4], so products stay normal and finite. */
static uint16_t sane_half(void) {
    const float v = (float)std::ldexp(1.0 + rnd_u(), -4 - (int)(rnd64() % 9));
    return nm_fp32_to_fp16((rnd64() & 1) ? -v : v);
}

/* rows x cols matrix of `type` in host memory; mode 0 = quantised floats,
 * 1 = random bytes with sane scales. */
static std::vector<uint8_t> make_matrix(const tinfo &t, int64_t rows, int64_t cols, int mode) {
    const size_t rb = nm_row_size(t.type, cols);
    std::vector<uint8_t> m(rb * (size_t)rows);
    if (mode == 0) {
        std::vector<float> src((size_t)cols);
        for (int64_t r = 0; r < rows; r++) {
            const float rs = (float)std::ldexp(1.0, (int)(rnd64() % 7) - 4);
            for (auto &v : src) v = rnd_weight() * rs;
            if (nm_quantize_row(t.type, src.data(), m.data() + rb * (size_t)r, cols) != 0) {
                fprintf(stderr, "nm_quantize_row(%s) failed\n", t.name);
                exit(1);
            }
        }
    } else {
        for (size_t i = 0; i < m.size(); i += 8) {
            const uint64_t v = rnd64();
            memcpy(&m[i], &v, std::min<size_t>(8, m.size() - i));
        }
        const nm_type_traits *tr = nm_type_traits_of(t.type);
        const size_t nblocks = m.size() / tr->type_size;
        for (size_t b = 0; b < nblocks; b++)
            for (int h : t.halves)
                if (h >= 0) {
                    const uint16_t s = sane_half();
                    memcpy(&m[b * tr->type_size + (size_t)h], &s, 2);
                }
    }
    return m;
}

/* ---- correctness ------------------------------------------------------------ */

struct gpu_buf {
    void *p = nullptr;
    explicit gpu_buf(size_t n) { CK(cudaMalloc(&p, n ? n : 1)); }
    ~gpu_buf() { cudaFree(p); }
    gpu_buf(const gpu_buf &) = delete;
    gpu_buf &operator=(const gpu_buf &) = delete;
    template <class T> T *as(size_t byte_off = 0) const { return reinterpret_cast<T *>((char *)p + byte_off); }
};

static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

struct case_result {
    bool ok = true;
    char detail[256] = "";
    double worst = 0; /* largest err / bound seen (gemv) */
};

static void fail_case(case_result &cr, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail_case(case_result &cr, const char *fmt, ...) {
    if (!cr.ok) return; /* keep the first message */
    cr.ok = false;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cr.detail, sizeof cr.detail, fmt, ap);
    va_end(ap);
}

/* One matrix, one placement: dequant and gemv checks. */
static void run_case(const tinfo &t, int64_t rows, int64_t cols, int mode, size_t offset, cudaStream_t st,
                     case_result &dq, case_result &gv) {
    const std::vector<uint8_t> w = make_matrix(t, rows, cols, mode);
    const int64_t n = rows * cols;
    std::vector<float> ref((size_t)n);
    const size_t rb = nm_row_size(t.type, cols);
    for (int64_t r = 0; r < rows; r++)
        if (nm_dequantize_row(t.type, w.data() + rb * (size_t)r, ref.data() + (size_t)(r * cols), cols) != 0) {
            fprintf(stderr, "nm_dequantize_row(%s) failed\n", t.name);
            exit(1);
        }

    gpu_buf dw(w.size() + offset), dy((size_t)n * 4 + 4), dx((size_t)cols * 4 + 16), dg((size_t)rows * 4);
    CK(cudaMemcpy(dw.as<char>(offset), w.data(), w.size(), cudaMemcpyHostToDevice));

    /* dequant: bit-exact */
    std::vector<float> got((size_t)n);
    /* dst 16-aligned with the aligned W, 4 bytes off with the shifted one
     * (the scalar-store kernels) */
    float *dst = dy.as<float>(offset ? 4 : 0);
    CK(cudaMemset(dy.p, 0xff, (size_t)n * 4 + 4));
    int rc = nm_cuda_dequantize(t.type, dw.as<char>(offset), dst, n, st);
    if (rc != NM_CUDA_OK) {
        fail_case(dq, "%dx%lld mode %d off %zu: rc %d: %s", (int)rows, (long long)cols, mode, offset, rc,
                  nm_cuda_last_error());
    } else {
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(got.data(), dst, (size_t)n * 4, cudaMemcpyDeviceToHost));
        for (int64_t i = 0; i < n; i++)
            if (fbits(got[(size_t)i]) != fbits(ref[(size_t)i])) {
                fail_case(dq, "%dx%lld mode %d off %zu: element %lld (row %lld col %lld): gpu %.9g (0x%08x) cpu %.9g (0x%08x)",
                          (int)rows, (long long)cols, mode, offset, (long long)i, (long long)(i / cols),
                          (long long)(i % cols), got[(size_t)i], fbits(got[(size_t)i]), ref[(size_t)i],
                          fbits(ref[(size_t)i]));
                break;
            }
    }

    /* gemv: vs a double dot over the CPU-dequantised rows */
    if (mode == 1 && is_float_type(t.type)) return; /* NaN/inf rows */
    std::vector<float> x((size_t)cols);
    for (auto &v : x) v = rnd_pm1();
    CK(cudaMemcpy(dx.p, x.data(), (size_t)cols * 4, cudaMemcpyHostToDevice));
    CK(cudaMemset(dg.p, 0xff, (size_t)rows * 4));
    rc = nm_cuda_gemv(t.type, dw.as<char>(offset), rows, cols, dx.as<float>(), dg.as<float>(), st);
    if (rc != NM_CUDA_OK) {
        fail_case(gv, "%dx%lld mode %d off %zu: rc %d: %s", (int)rows, (long long)cols, mode, offset, rc,
                  nm_cuda_last_error());
        return;
    }
    std::vector<float> y((size_t)rows);
    CK(cudaStreamSynchronize(st));
    CK(cudaMemcpy(y.data(), dg.p, (size_t)rows * 4, cudaMemcpyDeviceToHost));
    double sum_ax = 0;
    for (float v : x) sum_ax += std::fabs((double)v);
    for (int64_t r = 0; r < rows; r++) {
        const float *wr = ref.data() + (size_t)(r * cols);
        double dot = 0, sum_awx = 0, maxw = 0;
        for (int64_t c = 0; c < cols; c++) {
            const double p = (double)wr[c] * (double)x[(size_t)c];
            dot += p;
            sum_awx += std::fabs(p);
            maxw = std::max(maxw, std::fabs((double)wr[c]));
        }
        const double bound = 2e-5 * sum_awx + 2e-6 * maxw * sum_ax;
        const double err = std::fabs((double)y[(size_t)r] - dot);
        const double ratio = bound > 0 ? err / bound : (err > 0 ? INFINITY : 0);
        if (!(ratio <= 1.0)) /* also catches NaN */
            fail_case(gv, "%dx%lld mode %d off %zu: row %lld: gpu %.9g ref %.9g err %.3g bound %.3g", (int)rows,
                      (long long)cols, mode, offset, (long long)r, y[(size_t)r], dot, err, bound);
        if (ratio > gv.worst) gv.worst = ratio;
    }
}

static void test_type(const tinfo &t, cudaStream_t st) {
    const nm_type_traits *tr = nm_type_traits_of(t.type);
    const int64_t qk = tr->block_size;
    /* (rows, cols): odd row counts leave the last warp/CTA partly empty; the
     * column counts give 1, an odd number, and many blocks per row (fewer
     * blocks than a warp covers per step, and a ragged last step). */
    std::vector<std::pair<int64_t, int64_t>> shapes;
    if (qk == 1) {
        shapes = {{67, 2304}, {5, 100}, {3, 12}, {33, 14336}}; /* 100, 12: the unaligned-row kernel */
    } else {
        shapes = {{67, 9 * 256}, {3, qk}, {5, 3 * qk}, {33, 14336}};
    }
    case_result dq, gv;
    int ncases = 0;
    for (int mode = 0; mode < 2; mode++)
        for (size_t off : {(size_t)0, (size_t)2}) {
            if (off == 2 && t.type == NM_TYPE_F32) off = 4; /* F32 needs 4-byte alignment */
            for (auto &s : shapes) {
                run_case(t, s.first, s.second, mode, off, st, dq, gv);
                ncases++;
            }
        }
    char what[512];
    snprintf(what, sizeof what, "dequant %-4s bit-exact (%d cases)%s%s", t.name, ncases, dq.ok ? "" : ": ", dq.detail);
    report(dq.ok, what);
    snprintf(what, sizeof what, "gemv    %-4s (%d cases, worst err/bound %.3f)%s%s", t.name, ncases, gv.worst,
             gv.ok ? "" : ": ", gv.detail);
    report(gv.ok, what);
}

/* bf16 of a float, nearest even (NaN stays a NaN) */
static uint16_t bf16_bits(float f) {
    const uint32_t u = fbits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* nm_cuda_dequantize_bf16 = nm_cuda_dequantize rounded to bf16, bit for bit
 * (aligned and 2-byte-offset outputs: the vector and scalar stores), and
 * nm_cuda_rows_to_bf16 of strided rows. */
static void test_bf16(const tinfo &t, cudaStream_t st) {
    const nm_type_traits *tr = nm_type_traits_of(t.type);
    const int64_t rows = 33, cols = tr->block_size == 1 ? 2304 : 9 * tr->block_size, n = rows * cols;
    std::vector<uint8_t> w = make_matrix(t, rows, cols, 0);
    gpu_buf dw(w.size()), df((size_t)n * 4), dh((size_t)n * 2 + 16);
    CK(cudaMemcpy(dw.p, w.data(), w.size(), cudaMemcpyHostToDevice));
    std::vector<float> f((size_t)n);
    std::vector<uint16_t> h((size_t)n);
    bool ok = nm_cuda_dequantize(t.type, dw.p, df.as<float>(), n, st) == NM_CUDA_OK;
    char why[200] = "";
    for (size_t off : {(size_t)0, (size_t)2}) {
        ok = ok && nm_cuda_dequantize_bf16(t.type, dw.p, dh.as<char>(off), n, st) == NM_CUDA_OK &&
             cudaStreamSynchronize(st) == cudaSuccess;
        ok = ok && cudaMemcpy(f.data(), df.p, (size_t)n * 4, cudaMemcpyDeviceToHost) == cudaSuccess &&
             cudaMemcpy(h.data(), dh.as<char>(off), (size_t)n * 2, cudaMemcpyDeviceToHost) == cudaSuccess;
        for (int64_t i = 0; ok && i < n; i++)
            if (h[(size_t)i] != bf16_bits(f[(size_t)i]) &&
                !(std::isnan(f[(size_t)i]) && (h[(size_t)i] & 0x7fffu) > 0x7f80u)) {
                snprintf(why, sizeof why, ": offset %zu element %lld: 0x%04x, expected 0x%04x (%g)", off, (long long)i,
                         h[(size_t)i], bf16_bits(f[(size_t)i]), f[(size_t)i]);
                ok = false;
            }
    }
    if (!ok && !*why) snprintf(why, sizeof why, ": %s", nm_cuda_last_error());
    char what[300];
    snprintf(what, sizeof what, "dequant %-4s to bf16 = rounded float dequant, bit for bit%s", t.name, why);
    report(ok, what);
}

static void test_rows_bf16(cudaStream_t st) {
    const int64_t n = 7, cols = 300, ldx = 333;
    std::vector<float> x((size_t)(n * ldx));
    for (float &v : x) v = rnd_pm1() * 1000.0f;
    gpu_buf dx(x.size() * 4), dh((size_t)(n * cols) * 2);
    std::vector<uint16_t> h((size_t)(n * cols));
    CK(cudaMemcpy(dx.p, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    bool ok = nm_cuda_rows_to_bf16(dx.as<float>(), ldx, n, cols, dh.p, st) == NM_CUDA_OK &&
              cudaStreamSynchronize(st) == cudaSuccess &&
              cudaMemcpy(h.data(), dh.p, h.size() * 2, cudaMemcpyDeviceToHost) == cudaSuccess;
    for (int64_t r = 0; ok && r < n; r++)
        for (int64_t c = 0; ok && c < cols; c++) ok = h[(size_t)(r * cols + c)] == bf16_bits(x[(size_t)(r * ldx + c)]);
    report(ok && nm_cuda_rows_to_bf16(dx.as<float>(), 10, 1, 11, dh.p, st) == NM_CUDA_EINVAL,
           "rows to bf16: strided rows rounded to nearest even; ldx < cols refused");
}

/* nm_cuda_gemv_pairs against one nm_cuda_gemv per pair: a stack of S
 * matrices, pairs naming them in any order, some skipped (-1), x shared by
 * x_div consecutive pairs. The same kernel computes both, so every written
 * y must be bit-identical and every skipped one untouched. */
static void test_pairs(const tinfo &t, cudaStream_t st) {
    const nm_type_traits *tr = nm_type_traits_of(t.type);
    const int64_t rows = 37, cols = tr->block_size == 1 ? 512 : 4 * tr->block_size;
    const int S = 5, k = 3, n_tok = 3, P = n_tok * k;
    const size_t mb = nm_row_size(t.type, cols) * (size_t)rows;
    std::vector<uint8_t> stack;
    for (int s = 0; s < S; s++) {
        std::vector<uint8_t> m = make_matrix(t, rows, cols, 0);
        stack.insert(stack.end(), m.begin(), m.end());
    }
    const int32_t mat[P] = {4, -1, 0, 2, 2, -1, -1, 1, 3};
    const int64_t ldx = cols + 4, ldy = rows + 3;
    std::vector<float> x((size_t)(n_tok * ldx));
    for (auto &v : x) v = rnd_pm1();
    gpu_buf dw(stack.size()), dx(x.size() * 4), dm(sizeof mat), dy((size_t)(P * ldy) * 4), dr((size_t)rows * 4);
    CK(cudaMemcpy(dw.p, stack.data(), stack.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dx.p, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dm.p, mat, sizeof mat, cudaMemcpyHostToDevice));
    CK(cudaMemset(dy.p, 0xff, (size_t)(P * ldy) * 4)); /* NaN: what must stay */
    int rc = nm_cuda_gemv_pairs(t.type, dw.p, mb, rows, cols, dm.as<int32_t>(), P, dx.as<float>(), ldx, k,
                                dy.as<float>(), ldy, st);
    std::vector<float> y((size_t)(P * ldy)), r((size_t)rows);
    CK(cudaStreamSynchronize(st));
    CK(cudaMemcpy(y.data(), dy.p, y.size() * 4, cudaMemcpyDeviceToHost));
    bool ok = rc == NM_CUDA_OK;
    char what[256];
    snprintf(what, sizeof what, "gemv pairs %-4s (%d of %d pairs, stack of %d)", t.name, 6, P, S);
    for (int p = 0; ok && p < P; p++) {
        const uint32_t *yp = reinterpret_cast<const uint32_t *>(y.data() + (size_t)p * ldy);
        if (mat[p] < 0) {
            for (int64_t i = 0; i < ldy && ok; i++) ok = yp[i] == 0xffffffffu;
            if (!ok) snprintf(what + strlen(what), sizeof what - strlen(what), ": skipped pair %d was written", p);
            continue;
        }
        rc = nm_cuda_gemv(t.type, dw.as<char>((size_t)mat[p] * mb), rows, cols, dx.as<float>((size_t)(p / k * ldx) * 4),
                          dr.as<float>(), st);
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(r.data(), dr.p, r.size() * 4, cudaMemcpyDeviceToHost));
        ok = rc == NM_CUDA_OK && !memcmp(r.data(), yp, r.size() * 4);
        for (int64_t i = rows; i < ldy && ok; i++) ok = yp[i] == 0xffffffffu;
        if (!ok) snprintf(what + strlen(what), sizeof what - strlen(what), ": pair %d differs from nm_cuda_gemv", p);
    }
    report(ok, what);
}

/* ---- integer GEMV (x quantised to q8) ---------------------------------------- */

static bool q8_type(int type) { return nm_cuda_supports_gemv_q8(type) != 0; }

/* n rows of random x (ldx floats apart) quantised on the GPU into dxq; the
 * q8 rows come back checked (d = max|x| / 127, |q| <= 127, |q d - x| <= d/2
 * plus rounding, s = d * sum q) and dequantised into xd (n x cols). */
static bool quantize_checked(int64_t n, int64_t cols, const gpu_buf &dxq, std::vector<double> &xd, cudaStream_t st,
                             char *why, size_t whyn) {
    const int64_t ldx = cols + 4;
    std::vector<float> x((size_t)(n * ldx));
    for (auto &v : x) v = rnd_pm1() * (float)std::ldexp(1.0, (int)(rnd64() % 5) - 2);
    for (int64_t c = 0; c < cols; c += 97) x[(size_t)c] = 0.0f;              /* zeros ... */
    if (cols >= 64) for (int64_t c = 32; c < 64; c++) x[(size_t)c] = 0.0f;  /* ... and an all-zero block */
    gpu_buf dx(x.size() * 4);
    CK(cudaMemcpy(dx.p, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    const size_t rb = nm_cuda_q8_row_bytes(cols);
    int rc = nm_cuda_quantize_q8(dx.as<float>(), ldx, n, cols, dxq.p, st);
    if (rc != NM_CUDA_OK) {
        snprintf(why, whyn, "quantize rc %d: %s", rc, nm_cuda_last_error());
        return false;
    }
    std::vector<uint8_t> q((size_t)n * rb);
    CK(cudaStreamSynchronize(st));
    CK(cudaMemcpy(q.data(), dxq.p, q.size(), cudaMemcpyDeviceToHost));
    xd.assign((size_t)(n * cols), 0.0);
    for (int64_t t = 0; t < n; t++)
        for (int64_t b = 0; b < cols / 32; b++) {
            const int8_t *qs = reinterpret_cast<const int8_t *>(q.data() + (size_t)t * rb) + 32 * b;
            float ds[2];
            memcpy(ds, q.data() + (size_t)t * rb + (size_t)cols + 8 * (size_t)b, 8);
            float amax = 0;
            for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(x[(size_t)(t * ldx + 32 * b + i)]));
            int sum = 0;
            for (int i = 0; i < 32; i++) {
                const double xv = x[(size_t)(t * ldx + 32 * b + i)], qd = (double)qs[i] * ds[0];
                sum += qs[i];
                if (qs[i] < -127 || std::fabs(qd - xv) > 0.5 * ds[0] * (1 + 1e-5) + 1e-30) {
                    snprintf(why, whyn, "row %lld element %lld: x %.9g -> q %d, d %.9g", (long long)t,
                             (long long)(32 * b + i), xv, qs[i], ds[0]);
                    return false;
                }
                xd[(size_t)(t * cols + 32 * b + i)] = qd;
            }
            if (ds[0] != amax / 127.0f || ds[1] != ds[0] * (float)sum) {
                snprintf(why, whyn, "row %lld block %lld: d %.9g (want %.9g), s %.9g (want %.9g)", (long long)t,
                         (long long)b, ds[0], amax / 127.0f, ds[1], ds[0] * (float)sum);
                return false;
            }
        }
    return true;
}

/* One matrix: n-row q8 GEMV against a double dot of the dequantised W and
 * the dequantised q8 x, and every row bit-equal to a one-row call. */
static void run_case_q8(const tinfo &t, int64_t rows, int64_t cols, int mode, size_t offset, int64_t n,
                        cudaStream_t st, case_result &gv) {
    const std::vector<uint8_t> w = make_matrix(t, rows, cols, mode);
    const size_t rb = nm_row_size(t.type, cols);
    std::vector<float> ref((size_t)(rows * cols));
    for (int64_t r = 0; r < rows; r++) nm_dequantize_row(t.type, w.data() + rb * (size_t)r, ref.data() + (size_t)(r * cols), cols);
    /* W ends exactly at the end of its allocation: the ragged last chunk
     * must be read without touching a byte past it (compute-sanitizer) */
    gpu_buf dw(w.size() + offset), dxq(nm_cuda_q8_row_bytes(cols) * (size_t)n);
    CK(cudaMemcpy(dw.as<char>(offset), w.data(), w.size(), cudaMemcpyHostToDevice));
    std::vector<double> xd;
    char why[256];
    if (!quantize_checked(n, cols, dxq, xd, st, why, sizeof why)) {
        fail_case(gv, "%dx%lld: %s", (int)rows, (long long)cols, why);
        return;
    }
    const int64_t ldy = rows + 5;
    gpu_buf dy((size_t)(n * ldy) * 4), d1((size_t)rows * 4);
    CK(cudaMemset(dy.p, 0xff, (size_t)(n * ldy) * 4));
    int rc = nm_cuda_gemv_q8(t.type, dw.as<char>(offset), rows, cols, dxq.p, n, dy.as<float>(), ldy, st);
    if (rc != NM_CUDA_OK) {
        fail_case(gv, "%dx%lld n %lld: rc %d: %s", (int)rows, (long long)cols, (long long)n, rc, nm_cuda_last_error());
        return;
    }
    std::vector<float> y((size_t)(n * ldy)), y1((size_t)rows);
    CK(cudaStreamSynchronize(st));
    CK(cudaMemcpy(y.data(), dy.p, y.size() * 4, cudaMemcpyDeviceToHost));
    for (int64_t j = 0; j < n; j++) {
        const double *xj = xd.data() + (size_t)(j * cols);
        double sum_ax = 0;
        for (int64_t c = 0; c < cols; c++) sum_ax += std::fabs(xj[c]);
        for (int64_t r = 0; r < rows; r++) {
            const float *wr = ref.data() + (size_t)(r * cols);
            double dot = 0, sum_awx = 0, maxw = 0;
            for (int64_t c = 0; c < cols; c++) {
                const double p = (double)wr[c] * xj[c];
                dot += p;
                sum_awx += std::fabs(p);
                maxw = std::max(maxw, std::fabs((double)wr[c]));
            }
            const double bound = 2e-5 * sum_awx + 2e-6 * maxw * sum_ax;
            const double err = std::fabs((double)y[(size_t)(j * ldy + r)] - dot);
            const double ratio = bound > 0 ? err / bound : (err > 0 ? INFINITY : 0);
            if (!(ratio <= 1.0))
                fail_case(gv, "%dx%lld mode %d n %lld: x row %lld, row %lld: gpu %.9g ref %.9g err %.3g bound %.3g",
                          (int)rows, (long long)cols, mode, (long long)n, (long long)j, (long long)r,
                          y[(size_t)(j * ldy + r)], dot, err, bound);
            if (ratio > gv.worst) gv.worst = ratio;
        }
        for (int64_t r = rows; r < ldy && j + 1 < n; r++)
            if (fbits(y[(size_t)(j * ldy + r)]) != 0xffffffffu)
                fail_case(gv, "%dx%lld n %lld: y row %lld written past rows", (int)rows, (long long)cols, (long long)n,
                          (long long)j);
        /* the same x row alone: the same bits */
        rc = nm_cuda_gemv_q8(t.type, dw.as<char>(offset), rows, cols, dxq.as<char>(nm_cuda_q8_row_bytes(cols) * (size_t)j),
                             1, d1.as<float>(), rows, st);
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(y1.data(), d1.p, y1.size() * 4, cudaMemcpyDeviceToHost));
        if (rc != NM_CUDA_OK || memcmp(y1.data(), y.data() + (size_t)(j * ldy), (size_t)rows * 4))
            fail_case(gv, "%dx%lld n %lld: x row %lld alone differs from the %lld-row call", (int)rows, (long long)cols,
                      (long long)n, (long long)j, (long long)n);
    }
}

static void test_type_q8(const tinfo &t, cudaStream_t st) {
    const int64_t qk = nm_type_traits_of(t.type)->block_size;
    /* rows odd (a CTA's 4 rows partly empty), 1..many warp steps per row,
     * ragged last steps, and for 32-blocks V2-Lite's 1408 (rows that start
     * off 16 bytes, the matrix ending mid-chunk) */
    std::vector<std::pair<int64_t, int64_t>> shapes = {{67, 9 * 256}, {3, qk}, {5, 3 * qk}, {33, 14336}, {6, 7168}};
    if (qk == 32) {
        shapes.push_back({37, 1408});
        shapes.push_back({9, 96});
    }
    case_result gv;
    int ncases = 0;
    const int64_t ns[] = {1, 2, 3, 8}; /* 4, 2 and 1 rows per warp */
    for (int mode = 0; mode < 2; mode++)
        for (size_t off : {(size_t)0, (size_t)16})
            for (auto &s : shapes) {
                run_case_q8(t, s.first, s.second, mode, off, ns[ncases % 4], st, gv);
                ncases++;
            }
    char what[512];
    snprintf(what, sizeof what, "gemv_q8 %-4s (%d cases, worst err/bound %.3f, n-row calls bit-equal to 1-row)%s%s",
             t.name, ncases, gv.worst, gv.ok ? "" : ": ", gv.detail);
    report(gv.ok, what);
}

/* nm_cuda_gemv_q8_pairs against one nm_cuda_gemv_q8 per pair (bit-equal,
 * skipped pairs untouched), as test_pairs. */
static void test_pairs_q8(const tinfo &t, cudaStream_t st) {
    const int64_t qk = nm_type_traits_of(t.type)->block_size;
    const int64_t rows = 37, cols = qk == 32 ? 1408 : 4 * qk;
    const int S = 5, k = 3, n_tok = 3, P = n_tok * k;
    const size_t mb0 = nm_row_size(t.type, cols) * (size_t)rows, mb = (mb0 + 15) & ~(size_t)15;
    std::vector<uint8_t> stack(mb * S, 0);
    for (int s = 0; s < S; s++) {
        std::vector<uint8_t> m = make_matrix(t, rows, cols, 0);
        memcpy(stack.data() + (size_t)s * mb, m.data(), m.size());
    }
    const int32_t mat[P] = {4, -1, 0, 2, 2, -1, -1, 1, 3};
    const int64_t ldy = rows + 3;
    gpu_buf dw(stack.size()), dxq(nm_cuda_q8_row_bytes(cols) * n_tok), dm(sizeof mat), dy((size_t)(P * ldy) * 4),
        dr((size_t)rows * 4);
    std::vector<double> xd;
    char why[256] = "";
    bool ok = quantize_checked(n_tok, cols, dxq, xd, st, why, sizeof why);
    CK(cudaMemcpy(dw.p, stack.data(), stack.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dm.p, mat, sizeof mat, cudaMemcpyHostToDevice));
    CK(cudaMemset(dy.p, 0xff, (size_t)(P * ldy) * 4));
    int rc = nm_cuda_gemv_q8_pairs(t.type, dw.p, mb, rows, cols, dm.as<int32_t>(), P, dxq.p, k, dy.as<float>(), ldy, st);
    std::vector<float> y((size_t)(P * ldy)), r((size_t)rows);
    CK(cudaStreamSynchronize(st));
    CK(cudaMemcpy(y.data(), dy.p, y.size() * 4, cudaMemcpyDeviceToHost));
    ok = ok && rc == NM_CUDA_OK;
    if (rc != NM_CUDA_OK) snprintf(why, sizeof why, "rc %d: %s", rc, nm_cuda_last_error());
    for (int p = 0; ok && p < P; p++) {
        const uint32_t *yp = reinterpret_cast<const uint32_t *>(y.data() + (size_t)p * ldy);
        if (mat[p] < 0) {
            for (int64_t i = 0; i < ldy && ok; i++) ok = yp[i] == 0xffffffffu;
            if (!ok) snprintf(why, sizeof why, "skipped pair %d was written", p);
            continue;
        }
        rc = nm_cuda_gemv_q8(t.type, dw.as<char>((size_t)mat[p] * mb), rows, cols,
                             dxq.as<char>(nm_cuda_q8_row_bytes(cols) * (size_t)(p / k)), 1, dr.as<float>(), rows, st);
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(r.data(), dr.p, r.size() * 4, cudaMemcpyDeviceToHost));
        ok = rc == NM_CUDA_OK && !memcmp(r.data(), yp, r.size() * 4);
        for (int64_t i = rows; i < ldy && ok; i++) ok = yp[i] == 0xffffffffu;
        if (!ok) snprintf(why, sizeof why, "pair %d differs from nm_cuda_gemv_q8", p);
    }
    char what[400];
    snprintf(what, sizeof what, "gemv_q8 pairs %-4s (6 of %d pairs, stack of %d)%s%s", t.name, P, S, ok ? "" : ": ", why);
    report(ok, what);
}

static void test_api_errors_q8(void) {
    gpu_buf a(8192), b(8192);
    bool ok = true;
    char msg[256] = "";
    auto expect = [&](int got, int want, const char *what) {
        if (got != want && ok) {
            ok = false;
            snprintf(msg, sizeof msg, "%s: got %d (%s) want %d", what, got, nm_cuda_last_error(), want);
        }
    };
    float *y = b.as<float>();
    const int32_t *dm = b.as<int32_t>(4096);
    expect(nm_cuda_gemv_q8(NM_TYPE_Q2_K, a.p, 4, 256, a.p, 1, y, 4, nullptr), NM_CUDA_ETYPE, "q8 Q2_K");
    expect(nm_cuda_gemv_q8(NM_TYPE_F32, a.p, 4, 256, a.p, 1, y, 4, nullptr), NM_CUDA_ETYPE, "q8 F32");
    expect(nm_cuda_gemv_q8(NM_TYPE_Q4_K, a.p, 4, 100, a.p, 1, y, 4, nullptr), NM_CUDA_EINVAL, "q8 cols % 256");
    expect(nm_cuda_gemv_q8(NM_TYPE_Q8_0, a.p, 4, 32, a.p, 9, y, 4, nullptr), NM_CUDA_EINVAL, "q8 n 9");
    expect(nm_cuda_gemv_q8(NM_TYPE_Q8_0, a.p, 4, 32, a.p, 2, y, 3, nullptr), NM_CUDA_EINVAL, "q8 ldy < rows");
    expect(nm_cuda_gemv_q8(NM_TYPE_Q8_0, a.as<char>(2), 4, 32, a.p, 1, y, 4, nullptr), NM_CUDA_EALIGN, "q8 W % 16");
    expect(nm_cuda_gemv_q8(NM_TYPE_Q8_0, a.p, 4, 32, a.as<char>(8), 1, y, 4, nullptr), NM_CUDA_EALIGN, "q8 xq % 16");
    expect(nm_cuda_gemv_q8(NM_TYPE_Q8_0, a.p, 4, 32, nullptr, 1, y, 4, nullptr), NM_CUDA_EINVAL, "q8 NULL xq");
    expect(nm_cuda_gemv_q8_pairs(NM_TYPE_Q8_0, a.p, 34 * 4, 4, 32, dm, 2, a.p, 1, y, 4, nullptr), NM_CUDA_EINVAL,
           "q8 pairs matrix bytes % 16");
    expect(nm_cuda_gemv_q8_pairs(NM_TYPE_Q8_0, a.p, 160, 4, 32, dm, 70000, a.p, 1, y, 4, nullptr), NM_CUDA_EINVAL,
           "q8 pairs > 65535");
    expect(nm_cuda_gemv_q8_pairs(NM_TYPE_Q8_0, a.p, 160, 4, 32, nullptr, 2, a.p, 1, y, 4, nullptr), NM_CUDA_EINVAL,
           "q8 pairs NULL mat");
    expect(nm_cuda_quantize_q8(a.as<float>(), 40, 2, 40, b.p, nullptr), NM_CUDA_EINVAL, "quantize cols % 32");
    expect(nm_cuda_quantize_q8(a.as<float>(), 30, 2, 32, b.p, nullptr), NM_CUDA_EINVAL, "quantize ldx < cols");
    expect(nm_cuda_quantize_q8(a.as<float>(1), 32, 2, 32, b.p, nullptr), NM_CUDA_EALIGN, "quantize x % 16");
    expect(nm_cuda_quantize_q8(a.as<float>(), 32, 0, 32, b.p, nullptr), NM_CUDA_OK, "quantize n 0");
    if (ok && (nm_cuda_q8_row_bytes(32) != 48 || nm_cuda_q8_row_bytes(1408) != 1760 || nm_cuda_q8_row_bytes(0) != 0)) {
        ok = false;
        snprintf(msg, sizeof msg, "q8 row bytes 32 -> %zu, 1408 -> %zu", nm_cuda_q8_row_bytes(32), nm_cuda_q8_row_bytes(1408));
    }
    int nq8 = 0;
    for (const tinfo &t : k_types) nq8 += q8_type(t.type);
    if (ok && nq8 != 6) {
        ok = false;
        snprintf(msg, sizeof msg, "%d types with q8 GEMV, want 6", nq8);
    }
    char what[300];
    snprintf(what, sizeof what, "gemv_q8 api argument checks%s%s", ok ? "" : ": ", msg);
    report(ok, what);
}

/* Exact values: F16 specials through the dequantiser. */
static void test_f16_specials(cudaStream_t st) {
    std::vector<uint16_t> h;
    const uint16_t specials[] = {0x0000, 0x8000, 0x0001, 0x8001, 0x03ff, 0x0400, 0x7bff, 0xfbff,
                                 0x7c00, 0xfc00, 0x7c01, 0x7e00, 0xfe01, 0x7fff, 0x3c00, 0x3555};
    for (uint32_t v = 0; v < 65536; v++) h.push_back((uint16_t)v); /* every half */
    for (uint16_t v : specials) h.push_back(v);
    const int64_t n = (int64_t)h.size();
    gpu_buf ds((size_t)n * 2), dd((size_t)n * 4);
    CK(cudaMemcpy(ds.p, h.data(), (size_t)n * 2, cudaMemcpyHostToDevice));
    bool ok = nm_cuda_dequantize(NM_TYPE_F16, ds.p, dd.as<float>(), n, st) == NM_CUDA_OK;
    std::vector<float> got((size_t)n);
    CK(cudaStreamSynchronize(st));
    CK(cudaMemcpy(got.data(), dd.p, (size_t)n * 4, cudaMemcpyDeviceToHost));
    int bad = -1;
    for (int64_t i = 0; ok && i < n; i++)
        if (fbits(got[(size_t)i]) != fbits(nm_fp16_to_fp32(h[(size_t)i]))) {
            bad = (int)i;
            ok = false;
        }
    char what[256];
    snprintf(what, sizeof what, "dequant F16 all 65536 halves bit-exact%s", bad >= 0 ? " (mismatch)" : "");
    if (bad >= 0)
        snprintf(what, sizeof what, "dequant F16 all halves: 0x%04x -> gpu 0x%08x cpu 0x%08x", h[(size_t)bad],
                 fbits(got[(size_t)bad]), fbits(nm_fp16_to_fp32(h[(size_t)bad])));
    report(ok, what);
}

static void test_api_errors(void) {
    gpu_buf a(4096), b(4096);
    float *f = a.as<float>();
    bool ok = true;
    char msg[256] = "";
    auto expect = [&](int got, int want, const char *what) {
        if (got != want && ok) {
            ok = false;
            snprintf(msg, sizeof msg, "%s: got %d (%s) want %d", what, got, nm_cuda_last_error(), want);
        }
    };
    expect(nm_cuda_gemv(99, a.p, 4, 32, f, b.as<float>(), nullptr), NM_CUDA_ETYPE, "gemv unknown type");
    expect(nm_cuda_gemv(NM_TYPE_Q8_K, a.p, 4, 256, f, b.as<float>(), nullptr), NM_CUDA_ETYPE, "gemv Q8_K");
    expect(nm_cuda_gemv(NM_TYPE_Q4_K, a.p, 4, 100, f, b.as<float>(), nullptr), NM_CUDA_EINVAL, "gemv cols % 256");
    expect(nm_cuda_gemv(NM_TYPE_Q8_0, a.p, -1, 32, f, b.as<float>(), nullptr), NM_CUDA_EINVAL, "gemv rows < 0");
    expect(nm_cuda_gemv(NM_TYPE_Q8_0, a.p, 4, 32, nullptr, b.as<float>(), nullptr), NM_CUDA_EINVAL, "gemv NULL x");
    expect(nm_cuda_gemv(NM_TYPE_Q8_0, a.p, 4, 32, f + 1, b.as<float>(), nullptr), NM_CUDA_EALIGN, "gemv x % 16");
    expect(nm_cuda_gemv(NM_TYPE_Q8_0, a.as<char>(1), 4, 32, f, b.as<float>(), nullptr), NM_CUDA_EALIGN,
           "gemv W odd");
    expect(nm_cuda_gemv(NM_TYPE_F32, a.as<char>(2), 4, 32, f, b.as<float>(), nullptr), NM_CUDA_EALIGN,
           "gemv F32 W % 4");
    expect(nm_cuda_gemv(NM_TYPE_Q8_0, a.p, 0, 32, f, b.as<float>(), nullptr), NM_CUDA_OK, "gemv rows 0");
    expect(nm_cuda_dequantize(NM_TYPE_Q6_K, a.p, f, 255, nullptr), NM_CUDA_EINVAL, "dequant n % 256");
    expect(nm_cuda_dequantize(NM_TYPE_Q6_K, a.p, f, -256, nullptr), NM_CUDA_EINVAL, "dequant n < 0");
    expect(nm_cuda_dequantize(NM_TYPE_Q6_K, a.p, f, 0, nullptr), NM_CUDA_OK, "dequant n 0");
    expect(nm_cuda_dequantize(31, a.p, f, 32, nullptr), NM_CUDA_ETYPE, "dequant unknown type");
    expect(nm_cuda_dequantize(NM_TYPE_Q4_0, nullptr, f, 32, nullptr), NM_CUDA_EINVAL, "dequant NULL");
    /* cols = 0: y = 0 */
    CK(cudaMemset(b.p, 0xff, 64));
    expect(nm_cuda_gemv(NM_TYPE_Q4_K, a.p, 16, 0, f, b.as<float>(), nullptr), NM_CUDA_OK, "gemv cols 0");
    {
        const int32_t *dm = a.as<int32_t>();
        expect(nm_cuda_gemv_pairs(NM_TYPE_Q8_0, a.p, 34, 1, 32, dm, 65536, f, 32, 1, b.as<float>(), 1, nullptr),
               NM_CUDA_EINVAL, "gemv pairs > 65535");
        expect(nm_cuda_gemv_pairs(NM_TYPE_Q8_0, a.p, 34, 1, 32, dm, 2, f, 30, 1, b.as<float>(), 1, nullptr),
               NM_CUDA_EALIGN, "gemv pairs ldx % 4");
        expect(nm_cuda_gemv_pairs(NM_TYPE_Q8_0, a.p, 34, 2, 32, dm, 2, f, 32, 1, b.as<float>(), 1, nullptr),
               NM_CUDA_EINVAL, "gemv pairs ldy < rows");
        expect(nm_cuda_gemv_pairs(NM_TYPE_Q8_0, a.p, 34, 1, 32, nullptr, 2, f, 32, 1, b.as<float>(), 1, nullptr),
               NM_CUDA_EINVAL, "gemv pairs NULL mat");
    }
    float y0[16];
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(y0, b.p, sizeof y0, cudaMemcpyDeviceToHost));
    for (float v : y0)
        if (v != 0.0f && ok) {
            ok = false;
            snprintf(msg, sizeof msg, "gemv cols 0: y = %g, want 0", v);
        }
    if (ok && (!nm_cuda_strerror(NM_CUDA_EALIGN) || !*nm_cuda_last_error())) {
        ok = false;
        snprintf(msg, sizeof msg, "strerror/last_error empty");
    }
    for (const tinfo &t : k_types)
        if (ok && (!nm_cuda_supports_gemv(t.type) || !nm_cuda_supports_dequantize(t.type))) {
            ok = false;
            snprintf(msg, sizeof msg, "supports(%s) = 0", t.name);
        }
    if (ok && (nm_cuda_supports_gemv(NM_TYPE_Q8_K) || nm_cuda_supports_dequantize(20))) {
        ok = false;
        snprintf(msg, sizeof msg, "supports(Q8_K / IQ4_NL) = 1");
    }
    char what[300];
    snprintf(what, sizeof what, "api argument checks%s%s", ok ? "" : ": ", msg);
    report(ok, what);
}

/* ---- benchmark ---------------------------------------------------------------- */

/* The device's achievable DRAM rate, measured: a device-to-device copy of
 * 1 GiB (read + write bytes over time), the best of 5. The GEMV lines quote
 * their GB/s as a share of it (the H200's nominal figure is 4.8 TB/s). */
static double g_copy_gbs = 0;
static void measure_copy_rate(void) {
    const size_t n = (size_t)1 << 30;
    gpu_buf a(n), b(n);
    CK(cudaMemset(a.p, 1, n));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    double best = 0;
    for (int i = 0; i < 5; i++) {
        CK(cudaEventRecord(e0));
        CK(cudaMemcpyAsync(b.p, a.p, n, cudaMemcpyDeviceToDevice));
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        best = std::max(best, 2.0 * n / (ms * 1e-3) / 1e9);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    g_copy_gbs = best;
    printf("bench device-to-device copy: %.0f GB/s (read + write, 1 GiB, best of 5)\n", best);
}

static void bench_type(const tinfo &t, int64_t rows, int64_t cols, size_t l2) {
    const size_t rb = nm_row_size(t.type, cols);
    const size_t bytes = rb * (size_t)rows;
    /* enough copies that a pass over all of them is >= 4x L2 (no cache hits) */
    size_t copies = std::max<size_t>(1, (4 * l2 + bytes - 1) / bytes);
    copies = std::min<size_t>(copies, 256);
    const size_t stride = (bytes + 255) & ~(size_t)255;
    std::vector<uint8_t> h;
    if (is_float_type(t.type)) {
        h.resize(bytes);
        for (size_t i = 0; i < bytes / (t.type == NM_TYPE_F32 ? 4 : 2); i++) {
            const float v = rnd_weight() * 0.05f;
            if (t.type == NM_TYPE_F32) memcpy(&h[4 * i], &v, 4);
            else {
                const uint16_t b = t.type == NM_TYPE_F16 ? nm_fp32_to_fp16(v) : nm_fp32_to_bf16(v);
                memcpy(&h[2 * i], &b, 2);
            }
        }
    } else {
        h = make_matrix(t, rows, cols, 1);
    }
    gpu_buf dw(stride * copies), dx((size_t)cols * 4), dy((size_t)rows * 4);
    for (size_t c = 0; c < copies; c++) CK(cudaMemcpy(dw.as<char>(c * stride), h.data(), bytes, cudaMemcpyHostToDevice));
    std::vector<float> x((size_t)cols);
    for (auto &v : x) v = rnd_pm1();
    CK(cudaMemcpy(dx.p, x.data(), (size_t)cols * 4, cudaMemcpyHostToDevice));

    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 5; i++) /* warm-up: module load, clocks */
        if (nm_cuda_gemv(t.type, dw.as<char>((i % copies) * stride), rows, cols, dx.as<float>(), dy.as<float>(),
                         nullptr) != NM_CUDA_OK) {
            char what[300];
            snprintf(what, sizeof what, "bench gemv %s: %s", t.name, nm_cuda_last_error());
            report(false, what);
            return;
        }
    const int iters = 100, reps = 7;
    /* median over reps of the mean us per call of iters calls of run(i) */
    auto median_us = [&](auto run) {
        std::vector<float> us;
        for (int r = 0; r < reps; r++) {
            CK(cudaEventRecord(e0));
            for (int i = 0; i < iters; i++) run(i);
            CK(cudaEventRecord(e1));
            CK(cudaEventSynchronize(e1));
            float ms = 0;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            us.push_back(ms * 1000.0f / iters);
        }
        std::sort(us.begin(), us.end());
        return (double)us[us.size() / 2];
    };
    const double med = median_us([&](int i) {
        nm_cuda_gemv(t.type, dw.as<char>(((size_t)i % copies) * stride), rows, cols, dx.as<float>(), dy.as<float>(),
                     nullptr);
    });

    /* dequant of the same matrix: bytes read + float bytes written */
    gpu_buf dd((size_t)rows * (size_t)cols * 4);
    const int dq_iters = 10;
    nm_cuda_dequantize(t.type, dw.p, dd.as<float>(), rows * cols, nullptr);
    CK(cudaEventRecord(e0));
    for (int i = 0; i < dq_iters; i++)
        nm_cuda_dequantize(t.type, dw.as<char>(((size_t)i % copies) * stride), dd.as<float>(), rows * cols, nullptr);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float dq_ms = 0;
    CK(cudaEventElapsedTime(&dq_ms, e0, e1));
    const double dq_us = dq_ms * 1000.0 / dq_iters;
    CK(cudaGetLastError());

    /* the integer GEMV on the same copies (x quantised once, outside the
     * loop: a forward pass quantises an activation once for its GEMVs), and
     * the quantisation on its own */
    double q8_us = 0, qz_us = 0;
    if (q8_type(t.type)) {
        gpu_buf dxq(nm_cuda_q8_row_bytes(cols));
        if (nm_cuda_quantize_q8(dx.as<float>(), cols, 1, cols, dxq.p, nullptr) != NM_CUDA_OK) {
            report(false, "bench quantize_q8");
            return;
        }
        for (int i = 0; i < 5; i++)
            nm_cuda_gemv_q8(t.type, dw.as<char>((i % copies) * stride), rows, cols, dxq.p, 1, dy.as<float>(), rows,
                            nullptr);
        q8_us = median_us([&](int i) {
            nm_cuda_gemv_q8(t.type, dw.as<char>(((size_t)i % copies) * stride), rows, cols, dxq.p, 1, dy.as<float>(),
                            rows, nullptr);
        });
        qz_us = median_us([&](int) { nm_cuda_quantize_q8(dx.as<float>(), cols, 1, cols, dxq.p, nullptr); });
        CK(cudaGetLastError());
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);

    printf("bench gemv %-4s %lldx%lld: %7.2f MB weights, %8.2f us, %7.1f GB/s (median of %d x %d, %zu copies)"
           "   | dequant %8.1f us, %7.1f GB/s in+out\n",
           t.name, (long long)rows, (long long)cols, bytes / 1e6, med, bytes / (med * 1e-6) / 1e9, reps, iters, copies,
           dq_us, (bytes + (double)rows * cols * 4) / (dq_us * 1e-6) / 1e9);
    if (q8_us > 0)
        printf("bench gemv_q8 %-4s %lldx%lld: %8.2f us, %7.1f GB/s = %5.1f%% of the measured copy rate %.0f GB/s "
               "(fp32-x kernel: %.1f GB/s; quantising x: %.2f us)\n",
               t.name, (long long)rows, (long long)cols, q8_us, bytes / (q8_us * 1e-6) / 1e9,
               100.0 * bytes / (q8_us * 1e-6) / 1e9 / g_copy_gbs, g_copy_gbs, bytes / (med * 1e-6) / 1e9, qz_us);
    fflush(stdout);
}

int main(int argc, char **argv) {
    const char *s = strrchr(argv[0], '/');
    g_prog = s ? s + 1 : argv[0];
    bool bench = true, tests = true;
    std::vector<std::pair<int64_t, int64_t>> shapes;
    std::vector<std::string> only; /* --bench-type: these types only */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--no-bench")) bench = false;
        else if (!strcmp(argv[i], "--bench-only")) tests = false;
        else if (!strcmp(argv[i], "--bench-shape") && i + 2 < argc && atoll(argv[i + 1]) > 0 &&
                 atoll(argv[i + 2]) > 0 && atoll(argv[i + 2]) % 256 == 0) {
            shapes.emplace_back(atoll(argv[i + 1]), atoll(argv[i + 2]));
            i += 2;
        } else if (!strcmp(argv[i], "--bench-type") && i + 1 < argc) {
            only.push_back(argv[++i]);
        } else {
            fprintf(stderr, "usage: %s [--no-bench] [--bench-only] [--bench-shape ROWS COLS(multiple of 256)]... "
                    "[--bench-type TYPE]...\n", g_prog);
            return 2;
        }
    }
    if (shapes.empty()) shapes.emplace_back(4096, 14336);
    char msg[512];
    if (nm_cuda_available(msg, sizeof msg) <= 0) {
        printf("%s: no CUDA device: skipped (%s)\n", g_prog, msg);
        return 77;
    }
    printf("%s: %s\n", g_prog, msg);
    fflush(stdout);

    if (tests) {
        cudaStream_t st;
        CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
        test_api_errors();
        test_f16_specials(st);
        for (const tinfo &t : k_types) test_type(t, st);
        for (const tinfo &t : k_types) test_bf16(t, st);
        test_rows_bf16(st);
        for (const tinfo &t : k_types) test_pairs(t, st);
        test_api_errors_q8();
        for (const tinfo &t : k_types)
            if (q8_type(t.type)) test_type_q8(t, st);
        for (const tinfo &t : k_types)
            if (q8_type(t.type)) test_pairs_q8(t, st);
        CK(cudaStreamDestroy(st));
    }
    if (bench) {
        int dev = 0;
        cudaDeviceProp p;
        CK(cudaGetDevice(&dev));
        CK(cudaGetDeviceProperties(&p, dev));
        measure_copy_rate();
        for (auto &sh : shapes)
            for (const tinfo &t : k_types)
                if (only.empty() || std::find(only.begin(), only.end(), t.name) != only.end())
                    bench_type(t, sh.first, sh.second, (size_t)p.l2CacheSize);
    }
    printf("%s: %d passed, %d failed\n", g_prog, g_passed, g_failed);
    return g_failed ? 1 : 0;
}
