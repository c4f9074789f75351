/* quantize.c - float32 rows to the ggml formats.
 *
 * Two kinds of quantiser live here:
 *  - bit-exact ones, which must produce the same bytes as ggml's reference
 *    quantize_row_*_ref (and gguf-py where it has one): F16, BF16, Q4_0,
 *    Q4_1, Q5_0, Q5_1, Q8_0 (the activation side of the 32-block dots and a
 *    weight format), and Q8_K (the activation side of the K-quant dots, with
 *    per-16 sums for the min terms);
 *  - quality ones for K-quant weights (Q2_K..Q6_K), which search for good
 *    sub-block scales the way ggml's *_ref quantisers do (a weighted least
 *    squares fit over a few candidate grids per sub-block, then the sub-block
 *    scales quantised against one super-block scale) but are numoe's own code
 *    and not byte-identical to ggml.
 * Rounding: roundf (half away from zero) where ggml uses roundf, and
 * round-half-even (lrintf, ggml's nearest_int) where ggml uses nearest_int. */
#include <math.h>
#include <string.h>

#include "kernels/fp16.h"
#include "kernels/quant.h"
#include "kernels/quant_unpack.h"

typedef void (*quant_fn)(const float *x, void *dst, int64_t nblocks);

/* ggml's nearest_int: round to nearest, ties to even. */
static int round_even(float v) { return (int)lrintf(v); }

/* roundf (half away from zero) for |v| < 2^31 without a libm call: v - trunc(v)
 * is exact in float, so comparing it with 0.5 decides exactly as roundf does.
 * Activations go through this once per GEMV row, so it is on the decode path. */
static int round_away(float v) {
    int i = (int)v;
    float f = v - (float)i;
    return i + (f >= 0.5f) - (f <= -0.5f);
}

static int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

static void quant_f32(const float *x, void *dst, int64_t nb) { memcpy(dst, x, (size_t)nb * sizeof(float)); }

static void quant_f16(const float *x, void *dst, int64_t nb) {
    uint16_t *h = dst;
    for (int64_t i = 0; i < nb; i++) h[i] = nm_fp32_to_fp16(x[i]);
}

static void quant_bf16(const float *x, void *dst, int64_t nb) {
    uint16_t *h = dst;
    for (int64_t i = 0; i < nb; i++) h[i] = nm_fp32_to_bf16(x[i]);
}

/* The element of largest magnitude, with its sign; the first one on ties. */
static float signed_absmax(const float *x, int n) {
    float amax = 0, vmax = 0;
    for (int j = 0; j < n; j++)
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            vmax = x[j];
        }
    return vmax;
}

static void minmax(const float *x, int n, float *lo, float *hi) {
    *lo = *hi = x[0];
    for (int j = 1; j < n; j++) {
        if (x[j] < *lo) *lo = x[j];
        if (x[j] > *hi) *hi = x[j];
    }
}

/* Stores the 32 fifth bits of Q5_0/Q5_1 little-endian. */
static void store_qh32(uint32_t h, uint8_t qh[4]) {
    for (int k = 0; k < 4; k++) qh[k] = (uint8_t)(h >> (8 * k));
}

/* Q8_0 (quantize_row_q8_0_ref): d = absmax/127, q = roundf(x/d), with the
 * reciprocal taken from the unrounded float d as ggml and gguf-py do. */
static void quant_q8_0(const float *x, void *dst, int64_t nb) {
    block_q8_0 *y = dst;
    for (int64_t i = 0; i < nb; i++, x += NM_QK8_0) {
        const float d = fabsf(signed_absmax(x, NM_QK8_0)) / 127;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        y[i].d = nm_fp32_to_fp16(d);
        for (int j = 0; j < NM_QK8_0; j++) y[i].qs[j] = (int8_t)round_away(x[j] * id);
    }
}

/* Q4_0 (quantize_row_q4_0_ref): d = vmax/-8 maps the largest-magnitude
 * element to -8, the end of [-8, 7] with room; q = trunc(x/d + 8.5). */
static void quant_q4_0(const float *x, void *dst, int64_t nb) {
    block_q4_0 *y = dst;
    for (int64_t i = 0; i < nb; i++, x += NM_QK4_0) {
        const float d = signed_absmax(x, NM_QK4_0) / -8;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        y[i].d = nm_fp32_to_fp16(d);
        for (int j = 0; j < 16; j++) {
            const int q0 = clampi((int)(x[j] * id + 8.5f), 0, 15);
            const int q1 = clampi((int)(x[j + 16] * id + 8.5f), 0, 15);
            y[i].qs[j] = (uint8_t)(q0 | q1 << 4);
        }
    }
}

/* Q4_1 (quantize_row_q4_1_ref): d = (max-min)/15, m = min,
 * q = trunc((x-min)/d + 0.5). */
static void quant_q4_1(const float *x, void *dst, int64_t nb) {
    block_q4_1 *y = dst;
    for (int64_t i = 0; i < nb; i++, x += NM_QK4_1) {
        float lo, hi;
        minmax(x, NM_QK4_1, &lo, &hi);
        const float d = (hi - lo) / 15;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        y[i].d = nm_fp32_to_fp16(d);
        y[i].m = nm_fp32_to_fp16(lo);
        for (int j = 0; j < 16; j++) {
            const int q0 = clampi((int)((x[j] - lo) * id + 0.5f), 0, 15);
            const int q1 = clampi((int)((x[j + 16] - lo) * id + 0.5f), 0, 15);
            y[i].qs[j] = (uint8_t)(q0 | q1 << 4);
        }
    }
}

/* Q5_0 (quantize_row_q5_0_ref): as Q4_0 with d = vmax/-16 and 5 bits. */
static void quant_q5_0(const float *x, void *dst, int64_t nb) {
    block_q5_0 *y = dst;
    for (int64_t i = 0; i < nb; i++, x += NM_QK5_0) {
        const float d = signed_absmax(x, NM_QK5_0) / -16;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        uint32_t qh = 0;
        y[i].d = nm_fp32_to_fp16(d);
        for (int j = 0; j < 16; j++) {
            const int q0 = clampi((int)(x[j] * id + 16.5f), 0, 31);
            const int q1 = clampi((int)(x[j + 16] * id + 16.5f), 0, 31);
            y[i].qs[j] = (uint8_t)((q0 & 0x0F) | (q1 & 0x0F) << 4);
            qh |= (uint32_t)(q0 >> 4) << j | (uint32_t)(q1 >> 4) << (j + 16);
        }
        store_qh32(qh, y[i].qh);
    }
}

/* Q5_1 (quantize_row_q5_1_ref): as Q4_1 with d = (max-min)/31 and 5 bits. */
static void quant_q5_1(const float *x, void *dst, int64_t nb) {
    block_q5_1 *y = dst;
    for (int64_t i = 0; i < nb; i++, x += NM_QK5_1) {
        float lo, hi;
        minmax(x, NM_QK5_1, &lo, &hi);
        const float d = (hi - lo) / 31;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        uint32_t qh = 0;
        y[i].d = nm_fp32_to_fp16(d);
        y[i].m = nm_fp32_to_fp16(lo);
        for (int j = 0; j < 16; j++) {
            const int q0 = clampi((int)((x[j] - lo) * id + 0.5f), 0, 31);
            const int q1 = clampi((int)((x[j + 16] - lo) * id + 0.5f), 0, 31);
            y[i].qs[j] = (uint8_t)((q0 & 0x0F) | (q1 & 0x0F) << 4);
            qh |= (uint32_t)(q0 >> 4) << j | (uint32_t)(q1 >> 4) << (j + 16);
        }
        store_qh32(qh, y[i].qh);
    }
}

/* Q8_K (quantize_row_q8_K_ref): a float d = vmax/-127 per 256, so the
 * largest element lands on -127 and nothing needs -128; q rounds half to
 * even; bsums[g] = sum of q over elements 16g..16g+15, which the K-quant dots
 * use for their min terms. An all-zero block gets d = 0 and zero sums. */
static void quant_q8_K(const float *x, void *dst, int64_t nb) {
    block_q8_K *y = dst;
    for (int64_t i = 0; i < nb; i++, x += NM_QK_K) {
        const float vmax = signed_absmax(x, NM_QK_K);
        memset(&y[i], 0, sizeof y[i]);
        if (vmax == 0) continue;
        const float iscale = -127.f / vmax;
        for (int j = 0; j < NM_QK_K; j++) {
            const int v = round_even(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
            y[i].bsums[j / 16] = (int16_t)(y[i].bsums[j / 16] + y[i].qs[j]);
        }
        y[i].d = 1 / iscale;
    }
}

/* ---- K-quant weights ------------------------------------------------------ */

#define FIT_MAX 32 /* longest sub-block */

/* Candidate grids of the affine fit: scales (rmin + rdelta*k + nmax)/(max-min)
 * for k = 0..nstep (ggml make_qkx2_quants' parameters). */
typedef struct {
    float rmin, rdelta;
    int nstep;
} fit_grid;

static void round_to_grid(int n, int nmax, const float *x, float lo, float iscale, uint8_t *L) {
    for (int i = 0; i < n; i++) L[i] = (uint8_t)clampi(round_even(iscale * (x[i] - lo)), 0, nmax);
}

static float affine_error(int n, const float *x, const float *w, const uint8_t *L, float scale, float lo) {
    float err = 0;
    for (int i = 0; i < n; i++) {
        const float diff = scale * L[i] + lo - x[i];
        err += w[i] * diff * diff;
    }
    return err;
}

/* Weighted least squares for x ~ scale*L + lo given L, with lo <= 0 (the
 * format stores the offset as -dmin*m with m >= 0). 0 if degenerate. */
static int lsq_affine(int n, const float *x, const float *w, const uint8_t *L, float *scale, float *lo) {
    float sw = 0, sl = 0, sll = 0, sx = 0, sxl = 0;
    for (int i = 0; i < n; i++) {
        sw += w[i];
        sl += w[i] * L[i];
        sll += w[i] * L[i] * L[i];
        sx += w[i] * x[i];
        sxl += w[i] * L[i] * x[i];
    }
    const float det = sw * sll - sl * sl;
    if (det <= 0) return 0;
    *scale = (sw * sxl - sx * sl) / det;
    *lo = (sll * sx - sl * sxl) / det;
    if (*lo > 0) { /* best offset is positive: pin it at 0, refit the scale */
        *lo = 0;
        *scale = sxl / sll;
    }
    return *scale >= 0;
}

/* Fits x[i] ~ scale*L[i] - *neg_lo, L in [0, nmax], minimising the
 * w-weighted squared error: round x to each candidate grid spanning
 * [min(x,0), max(x)], solve the best scale and offset for that rounding, keep
 * the best. Returns scale >= 0; *neg_lo >= 0. */
static float fit_affine(int n, int nmax, const float *x, const float *w, fit_grid g, uint8_t *L, float *neg_lo) {
    float lo, hi;
    minmax(x, n, &lo, &hi);
    if (lo > 0) lo = 0;
    if (hi == lo) {
        memset(L, 0, (size_t)n);
        *neg_lo = -lo;
        return 0;
    }
    float best_scale = (hi - lo) / nmax, best_lo = lo;
    round_to_grid(n, nmax, x, lo, nmax / (hi - lo), L);
    float best_err = affine_error(n, x, w, L, best_scale, best_lo);
    for (int k = 0; k <= g.nstep; k++) {
        uint8_t trial[FIT_MAX];
        float scale, tlo;
        round_to_grid(n, nmax, x, lo, (g.rmin + g.rdelta * k + nmax) / (hi - lo), trial);
        if (!lsq_affine(n, x, w, trial, &scale, &tlo)) continue;
        const float err = affine_error(n, x, w, trial, scale, tlo);
        if (err < best_err) {
            memcpy(L, trial, (size_t)n);
            best_err = err;
            best_scale = scale;
            best_lo = tlo;
        }
    }
    *neg_lo = -best_lo;
    return best_scale;
}

/* Fits x[i] ~ scale*L[i], L in [-nmax, nmax-1], weighted by x[i]^2 (ggml
 * make_qx_quants, rmse_type 1): the base grid maps the largest-magnitude
 * element to -nmax (using the asymmetric range's extra step); 18 more grids
 * 1%..9% finer and coarser are tried; for each rounding the optimal scale is
 * sum(w x L)/sum(w L^2), whose error reduction (sum w x L)^2/sum(w L^2) picks
 * the winner (the base grid wins ties). */
static float fit_symmetric(int n, int nmax, const float *x, int8_t *L) {
    const float vmax = signed_absmax(x, n);
    if (fabsf(vmax) < 1e-15f) {
        memset(L, 0, (size_t)n);
        return 0;
    }
    float best_scale = 0, best_gain = 0;
    for (int k = 0; k <= 18; k++) {
        const int step = k == 0 ? 0 : k <= 9 ? k - 10 : k - 9; /* 0, -9..-1, 1..9 */
        const float iscale = -(nmax + 0.1f * step) / vmax;
        int8_t trial[FIT_MAX];
        float sxl = 0, sll = 0;
        for (int i = 0; i < n; i++) {
            trial[i] = (int8_t)clampi(round_even(iscale * x[i]), -nmax, nmax - 1);
            const float w = x[i] * x[i];
            sxl += w * x[i] * trial[i];
            sll += w * trial[i] * trial[i];
        }
        if (sll > 0 && sxl * sxl > best_gain * sll) {
            memcpy(L, trial, (size_t)n);
            best_scale = sxl / sll;
            best_gain = best_scale * sxl;
        }
    }
    return best_scale;
}

/* Quantises non-negative sub-block values v[] (scales or mins) to integers
 * 0..qmax against one super-block step, returned as the fp16 it is stored
 * as; the largest value maps to qmax. */
static nm_half quantize_steps(const float *v, int n, int qmax, uint8_t *out) {
    float vmax = 0;
    for (int j = 0; j < n; j++)
        if (v[j] > vmax) vmax = v[j];
    const float inv = vmax > 0 ? qmax / vmax : 0;
    for (int j = 0; j < n; j++) out[j] = (uint8_t)clampi(round_even(inv * v[j]), 0, qmax);
    return nm_fp32_to_fp16(vmax / qmax);
}

/* Re-rounds x against the stored (quantised) sub-block scale and min:
 * q = round((x + dmin*m) / (d*sc)) in [0, nmax]; all 0 where d*sc is 0. */
static void requant_affine(const float *x, int len, float dl, float ml, int nmax, uint8_t *L) {
    for (int i = 0; i < len; i++) L[i] = dl == 0 ? 0 : (uint8_t)clampi(round_even((x[i] + ml) / dl), 0, nmax);
}

/* Same for symmetric sub-blocks: q = round(x / (d*sc)) in [-nmax, nmax-1]. */
static void requant_symmetric(const float *x, int len, float dl, int nmax, int8_t *L) {
    for (int i = 0; i < len; i++) L[i] = dl == 0 ? 0 : (int8_t)clampi(round_even(x[i] / dl), -nmax, nmax - 1);
}

/* ggml's sub-block weights for the affine fits of Q4_K/Q5_K: the sub-block's
 * RMS plus |x|, favouring large elements without ignoring small ones. */
static void rms_abs_weights(const float *x, int n, float *w) {
    float ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float rms = sqrtf(ss / n);
    for (int i = 0; i < n; i++) w[i] = rms + fabsf(x[i]);
}

/* Inverse of nm_k4_scale_min: 8 six-bit scales and mins into 12 bytes. */
static void pack_k4_scales(const uint8_t ls[8], const uint8_t lm[8], uint8_t s[12]) {
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)((ls[j] & 63) | (ls[j + 4] >> 4) << 6);
        s[j + 4] = (uint8_t)((lm[j] & 63) | (lm[j + 4] >> 4) << 6);
        s[j + 8] = (uint8_t)((ls[j + 4] & 15) | (lm[j + 4] & 15) << 4);
    }
}

/* The shared half of Q4_K and Q5_K: fit each 32-sub-block, quantise the 8
 * scales and 8 mins to 6 bits against fp16 d and dmin, and round every
 * element against the scales as stored, giving L in [0, nmax]. */
static void quant_k4_super(const float *x, int nmax, fit_grid g, nm_half *d, nm_half *dmin, uint8_t scales[12],
                           uint8_t L[NM_QK_K]) {
    float scale[8], neg_lo[8], w[32];
    uint8_t ls[8], lm[8];
    int8_t sc[8], m[8];
    for (int j = 0; j < 8; j++) {
        rms_abs_weights(x + 32 * j, 32, w);
        scale[j] = fit_affine(32, nmax, x + 32 * j, w, g, L + 32 * j, &neg_lo[j]);
    }
    *d = quantize_steps(scale, 8, 63, ls);
    *dmin = quantize_steps(neg_lo, 8, 63, lm);
    pack_k4_scales(ls, lm, scales);
    nm_k4_scale_min(scales, sc, m);
    const float fd = nm_fp16_to_fp32(*d), fdmin = nm_fp16_to_fp32(*dmin);
    for (int j = 0; j < 8; j++) requant_affine(x + 32 * j, 32, fd * sc[j], fdmin * m[j], nmax, L + 32 * j);
}

static void quant_q4_K(const float *x, void *dst, int64_t nb) {
    static const fit_grid grid = {-1.0f, 0.1f, 20}; /* quantize_row_q4_K_ref */
    block_q4_K *y = dst;
    uint8_t L[NM_QK_K];
    for (int64_t i = 0; i < nb; i++, x += NM_QK_K) {
        quant_k4_super(x, 15, grid, &y[i].d, &y[i].dmin, y[i].scales, L);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) y[i].qs[32 * c + l] = (uint8_t)(L[64 * c + l] | L[64 * c + 32 + l] << 4);
    }
}

static void quant_q5_K(const float *x, void *dst, int64_t nb) {
    static const fit_grid grid = {-0.5f, 0.1f, 15}; /* quantize_row_q5_K_ref */
    block_q5_K *y = dst;
    uint8_t L[NM_QK_K];
    for (int64_t i = 0; i < nb; i++, x += NM_QK_K) {
        quant_k4_super(x, 31, grid, &y[i].d, &y[i].dmin, y[i].scales, L);
        memset(y[i].qh, 0, sizeof y[i].qh);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                const int lo = L[64 * c + l], hi = L[64 * c + 32 + l];
                y[i].qs[32 * c + l] = (uint8_t)((lo & 15) | (hi & 15) << 4);
                y[i].qh[l] |= (uint8_t)((lo >> 4) << (2 * c) | (hi >> 4) << (2 * c + 1));
            }
    }
}

/* Inverse of nm_unpack_2bit256: element 128n + 32j + l into bits 2j of
 * qs[32n + l]. */
static void pack_2bit256(const uint8_t L[NM_QK_K], uint8_t qs[64]) {
    for (int n = 0; n < 2; n++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *e = L + 128 * n + l;
            qs[32 * n + l] = (uint8_t)((e[0] & 3) | (e[32] & 3) << 2 | (e[64] & 3) << 4 | (e[96] & 3) << 6);
        }
}

/* Q2_K: affine fit per 16-sub-block weighted by |x| (ggml's weights too,
 * though ggml scores candidates by absolute rather than squared error),
 * 4-bit scales and mins against fp16 d and dmin. */
static void quant_q2_K(const float *x, void *dst, int64_t nb) {
    static const fit_grid grid = {-0.5f, 0.1f, 15}; /* quantize_row_q2_K_ref */
    block_q2_K *y = dst;
    uint8_t L[NM_QK_K], ls[16], lm[16];
    float scale[16], neg_lo[16], w[16];
    for (int64_t i = 0; i < nb; i++, x += NM_QK_K) {
        for (int s = 0; s < 16; s++) {
            for (int l = 0; l < 16; l++) w[l] = fabsf(x[16 * s + l]);
            scale[s] = fit_affine(16, 3, x + 16 * s, w, grid, L + 16 * s, &neg_lo[s]);
        }
        y[i].d = quantize_steps(scale, 16, 15, ls);
        y[i].dmin = quantize_steps(neg_lo, 16, 15, lm);
        const float fd = nm_fp16_to_fp32(y[i].d), fdmin = nm_fp16_to_fp32(y[i].dmin);
        for (int s = 0; s < 16; s++) {
            y[i].scales[s] = (uint8_t)(ls[s] | lm[s] << 4);
            requant_affine(x + 16 * s, 16, fd * ls[s], fdmin * lm[s], 3, L + 16 * s);
        }
        pack_2bit256(L, y[i].qs);
    }
}

/* Signed sub-block scales against one super-block step: the largest-
 * magnitude scale maps to -qneg (the end of [-qneg, qneg-1] with room);
 * returns the step (1/iscale) as stored in fp16, 0 if all scales are 0. */
static nm_half quantize_signed_steps(const float *v, int n, int qneg, int8_t *out) {
    const float vmax = signed_absmax(v, n);
    if (vmax == 0) {
        memset(out, 0, (size_t)n);
        return 0;
    }
    const float iscale = -qneg / vmax;
    for (int j = 0; j < n; j++) out[j] = (int8_t)clampi(round_even(iscale * v[j]), -qneg, qneg - 1);
    return nm_fp32_to_fp16(1 / iscale);
}

/* Q3_K: symmetric fit per 16-sub-block, q in [-4, 3] (the make_qx_quants
 * search; ggml's Q3_K uses its own make_q3_quants), 6-bit signed scales
 * (stored +32: low nibbles in bytes 0-7, top 2 bits in bytes 8-11). */
static void quant_q3_K(const float *x, void *dst, int64_t nb) {
    block_q3_K *y = dst;
    int8_t L[NM_QK_K], ls[16];
    uint8_t u[NM_QK_K];
    float scale[16];
    for (int64_t i = 0; i < nb; i++, x += NM_QK_K) {
        for (int s = 0; s < 16; s++) scale[s] = fit_symmetric(16, 4, x + 16 * s, L + 16 * s);
        memset(y[i].scales, 0, sizeof y[i].scales);
        memset(y[i].hmask, 0, sizeof y[i].hmask);
        y[i].d = quantize_signed_steps(scale, 16, 32, ls);
        for (int s = 0; s < 16; s++) {
            const int v = ls[s] + 32;
            y[i].scales[s % 8] |= (uint8_t)((v & 15) << (s < 8 ? 0 : 4));
            y[i].scales[8 + s % 4] |= (uint8_t)((v >> 4) << (2 * (s / 4)));
        }
        const float fd = nm_fp16_to_fp32(y[i].d);
        for (int s = 0; s < 16; s++) requant_symmetric(x + 16 * s, 16, fd * ls[s], 4, L + 16 * s);
        /* store q + 4 in [0, 7]: low 2 bits in the planes, bit 2 in hmask
         * (set means "no -4"), element e at bit e/32 of hmask[e%32] */
        for (int e = 0; e < NM_QK_K; e++) {
            u[e] = (uint8_t)(L[e] + 4);
            y[i].hmask[e % 32] |= (uint8_t)((u[e] >> 2) << (e / 32));
        }
        pack_2bit256(u, y[i].qs);
    }
}

/* Q6_K: symmetric fit per 16-sub-block, q in [-32, 31], int8 scales. */
static void quant_q6_K(const float *x, void *dst, int64_t nb) {
    block_q6_K *y = dst;
    int8_t L[NM_QK_K];
    float scale[16];
    for (int64_t i = 0; i < nb; i++, x += NM_QK_K) {
        for (int s = 0; s < 16; s++) scale[s] = fit_symmetric(16, 32, x + 16 * s, L + 16 * s);
        /* -128 is a valid int8 scale, so the largest maps there */
        y[i].d = quantize_signed_steps(scale, 16, 128, y[i].scales);
        const float fd = nm_fp16_to_fp32(y[i].d);
        for (int s = 0; s < 16; s++) requant_symmetric(x + 16 * s, 16, fd * y[i].scales[s], 32, L + 16 * s);
        /* inverse of nm_unpack_q6_K on q + 32 in [0, 63] */
        for (int n = 0; n < 2; n++)
            for (int l = 0; l < 32; l++) {
                const int8_t *e = L + 128 * n + l;
                const int a = e[0] + 32, b = e[32] + 32, c = e[64] + 32, d = e[96] + 32;
                y[i].ql[64 * n + l] = (uint8_t)((a & 15) | (c & 15) << 4);
                y[i].ql[64 * n + 32 + l] = (uint8_t)((b & 15) | (d & 15) << 4);
                y[i].qh[32 * n + l] = (uint8_t)(a >> 4 | (b >> 4) << 2 | (c >> 4) << 4 | (d >> 4) << 6);
            }
    }
}

static quant_fn quant_for(int type) {
    switch (type) {
    case NM_TYPE_F32: return quant_f32;
    case NM_TYPE_F16: return quant_f16;
    case NM_TYPE_BF16: return quant_bf16;
    case NM_TYPE_Q4_0: return quant_q4_0;
    case NM_TYPE_Q4_1: return quant_q4_1;
    case NM_TYPE_Q5_0: return quant_q5_0;
    case NM_TYPE_Q5_1: return quant_q5_1;
    case NM_TYPE_Q8_0: return quant_q8_0;
    case NM_TYPE_Q2_K: return quant_q2_K;
    case NM_TYPE_Q3_K: return quant_q3_K;
    case NM_TYPE_Q4_K: return quant_q4_K;
    case NM_TYPE_Q5_K: return quant_q5_K;
    case NM_TYPE_Q6_K: return quant_q6_K;
    case NM_TYPE_Q8_K: return quant_q8_K;
    default: return NULL;
    }
}

static int quantize_with(int type, quant_fn fn, const float *src, void *dst, int64_t n) {
    const nm_type_traits *t = nm_type_traits_of(type);
    if (!t || !fn || n < 0 || n % t->block_size) return -1;
    if (n > 0) fn(src, dst, n / t->block_size);
    return 0;
}

/* -1 also for n that is negative or not a whole number of blocks. */
int nm_quantize_row(int type, const float *src, void *dst, int64_t n) {
    quant_fn fn = quant_for(type);
    /* the activation types every quantised matmul converts its input to */
    if ((type == NM_TYPE_Q8_K || type == NM_TYPE_Q8_0) && nm_isa_best() >= NM_ISA_AVX512)
        fn = type == NM_TYPE_Q8_K ? nm_quant_q8_K_avx512 : nm_quant_q8_0_avx512;
    return quantize_with(type, fn, src, dst, n);
}

int nm_quantize_row_ref(int type, const float *src, void *dst, int64_t n) {
    return quantize_with(type, quant_for(type), src, dst, n);
}
