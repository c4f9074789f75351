/* dot_ref.c - scalar reference dot of one weight row with one activation row
 * already in the weight type's vec_dot_type (see quant.h).
 *
 * These are the ground truth the SIMD paths are tested against, so they are
 * written for clarity: unpack a block to small integers (quant_unpack.h),
 * multiply with the int8 activation quants in exact integer arithmetic, and
 * apply the float block scales once per block, as ggml's scalar vec_dot does.
 * Integer sums cannot overflow int32: the largest, Q6_K, is bounded by
 * 16 sub-blocks * 128 (|scale|) * 16 * 32 * 128 < 2^28.
 *
 * Float weights are dotted with float activations in double. */
#include "kernels/dot_simd.h"
#include "kernels/fp16.h"
#include "kernels/quant.h"
#include "kernels/quant_unpack.h"

static int32_t idot(const int8_t *a, const int8_t *b, int n) {
    int32_t s = 0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static int32_t isum(const int8_t *a, int n) {
    int32_t s = 0;
    for (int i = 0; i < n; i++) s += a[i];
    return s;
}

static float dot_f32(int64_t n, const void *w, const void *x) {
    const float *a = w, *b = x;
    double acc = 0;
    for (int64_t i = 0; i < n; i++) acc += (double)a[i] * b[i];
    return (float)acc;
}

static float dot_f16(int64_t n, const void *w, const void *x) {
    const uint16_t *a = w;
    const float *b = x;
    double acc = 0;
    for (int64_t i = 0; i < n; i++) acc += (double)nm_fp16_to_fp32(a[i]) * b[i];
    return (float)acc;
}

static float dot_bf16(int64_t n, const void *w, const void *x) {
    const uint16_t *a = w;
    const float *b = x;
    double acc = 0;
    for (int64_t i = 0; i < n; i++) acc += (double)nm_bf16_to_fp32(a[i]) * b[i];
    return (float)acc;
}

/* Symmetric 32-blocks against Q8_0: sum (dw q)(dx a) = dw dx sum q a. */
static float sym32(float dw, const int8_t q[32], const block_q8_0 *a) {
    return dw * nm_fp16_to_fp32(a->d) * (float)idot(q, a->qs, 32);
}

/* 32-blocks with a min against Q8_0: sum (dw q + m)(dx a)
 * = dx (dw sum q a + m sum a). ggml pairs these formats with Q8_1, which
 * carries dx * sum a; Q8_0 does not, so the activation sum is taken here from
 * the block's own quants, exactly the sum of its dequantised values / dx. */
static float min32(float dw, float m, const int8_t q[32], const block_q8_0 *a) {
    return nm_fp16_to_fp32(a->d) * (dw * (float)idot(q, a->qs, 32) + m * (float)isum(a->qs, 32));
}

static float dot_q4_0(int64_t n, const void *w, const void *x) {
    const block_q4_0 *b = w;
    const block_q8_0 *a = x;
    int8_t q[NM_QK4_0];
    float sum = 0;
    for (int64_t i = 0; i < n / NM_QK4_0; i++) {
        nm_unpack_q4_0(&b[i], q);
        sum += sym32(nm_fp16_to_fp32(b[i].d), q, &a[i]);
    }
    return sum;
}

static float dot_q4_1(int64_t n, const void *w, const void *x) {
    const block_q4_1 *b = w;
    const block_q8_0 *a = x;
    int8_t q[NM_QK4_1];
    float sum = 0;
    for (int64_t i = 0; i < n / NM_QK4_1; i++) {
        nm_unpack_q4_1(&b[i], q);
        sum += min32(nm_fp16_to_fp32(b[i].d), nm_fp16_to_fp32(b[i].m), q, &a[i]);
    }
    return sum;
}

static float dot_q5_0(int64_t n, const void *w, const void *x) {
    const block_q5_0 *b = w;
    const block_q8_0 *a = x;
    int8_t q[NM_QK5_0];
    float sum = 0;
    for (int64_t i = 0; i < n / NM_QK5_0; i++) {
        nm_unpack_q5_0(&b[i], q);
        sum += sym32(nm_fp16_to_fp32(b[i].d), q, &a[i]);
    }
    return sum;
}

static float dot_q5_1(int64_t n, const void *w, const void *x) {
    const block_q5_1 *b = w;
    const block_q8_0 *a = x;
    int8_t q[NM_QK5_1];
    float sum = 0;
    for (int64_t i = 0; i < n / NM_QK5_1; i++) {
        nm_unpack_q5_1(&b[i], q);
        sum += min32(nm_fp16_to_fp32(b[i].d), nm_fp16_to_fp32(b[i].m), q, &a[i]);
    }
    return sum;
}

static float dot_q8_0(int64_t n, const void *w, const void *x) {
    const block_q8_0 *b = w;
    const block_q8_0 *a = x;
    float sum = 0;
    for (int64_t i = 0; i < n / NM_QK8_0; i++) sum += sym32(nm_fp16_to_fp32(b[i].d), b[i].qs, &a[i]);
    return sum;
}

/* sum over sub-blocks s of sc[s] * (q . a over s): the part of a K-quant
 * super-block dot that scales with d. */
static int32_t k_scaled_dot(const int8_t *q, const int8_t *sc, int nsub, const block_q8_K *a) {
    const int len = NM_QK_K / nsub;
    int32_t s = 0;
    for (int j = 0; j < nsub; j++) s += sc[j] * idot(q + j * len, a->qs + j * len, len);
    return s;
}

/* sum over sub-blocks s of m[s] * (sum of a over s): the part that scales
 * with dmin. The min is constant over a sub-block, so it only needs the
 * activation sums, which Q8_K carries per 16 elements as bsums; a sub-block
 * of 32 takes two of them. */
static int32_t k_min_dot(const int8_t *m, int nsub, const block_q8_K *a) {
    const int per = (NM_QK_K / 16) / nsub;
    int32_t s = 0;
    for (int j = 0; j < nsub; j++)
        for (int k = 0; k < per; k++) s += m[j] * a->bsums[j * per + k];
    return s;
}

/* Super-block with mins: sum (d sc q - dmin m) (dx a)
 * = dx (d sum sc (q.a) - dmin sum m (sum a)). */
static float k_affine(float d, float dmin, const int8_t *q, const int8_t *sc, const int8_t *m, int nsub,
                      const block_q8_K *a) {
    return (d * a->d) * (float)k_scaled_dot(q, sc, nsub, a) - (dmin * a->d) * (float)k_min_dot(m, nsub, a);
}

static float dot_q2_K(int64_t n, const void *w, const void *x) {
    const block_q2_K *b = w;
    const block_q8_K *a = x;
    int8_t q[NM_QK_K], sc[16], m[16];
    float sum = 0;
    for (int64_t i = 0; i < n / NM_QK_K; i++) {
        nm_unpack_q2_K(&b[i], q, sc, m);
        sum += k_affine(nm_fp16_to_fp32(b[i].d), nm_fp16_to_fp32(b[i].dmin), q, sc, m, 16, &a[i]);
    }
    return sum;
}

static float dot_q3_K(int64_t n, const void *w, const void *x) {
    const block_q3_K *b = w;
    const block_q8_K *a = x;
    int8_t q[NM_QK_K], sc[16];
    float sum = 0;
    for (int64_t i = 0; i < n / NM_QK_K; i++) {
        nm_unpack_q3_K(&b[i], q, sc);
        sum += (nm_fp16_to_fp32(b[i].d) * a[i].d) * (float)k_scaled_dot(q, sc, 16, &a[i]);
    }
    return sum;
}

static float dot_q4_K(int64_t n, const void *w, const void *x) {
    const block_q4_K *b = w;
    const block_q8_K *a = x;
    int8_t q[NM_QK_K], sc[8], m[8];
    float sum = 0;
    for (int64_t i = 0; i < n / NM_QK_K; i++) {
        nm_unpack_q4_K(&b[i], q, sc, m);
        sum += k_affine(nm_fp16_to_fp32(b[i].d), nm_fp16_to_fp32(b[i].dmin), q, sc, m, 8, &a[i]);
    }
    return sum;
}

static float dot_q5_K(int64_t n, const void *w, const void *x) {
    const block_q5_K *b = w;
    const block_q8_K *a = x;
    int8_t q[NM_QK_K], sc[8], m[8];
    float sum = 0;
    for (int64_t i = 0; i < n / NM_QK_K; i++) {
        nm_unpack_q5_K(&b[i], q, sc, m);
        sum += k_affine(nm_fp16_to_fp32(b[i].d), nm_fp16_to_fp32(b[i].dmin), q, sc, m, 8, &a[i]);
    }
    return sum;
}

static float dot_q6_K(int64_t n, const void *w, const void *x) {
    const block_q6_K *b = w;
    const block_q8_K *a = x;
    int8_t q[NM_QK_K];
    float sum = 0;
    for (int64_t i = 0; i < n / NM_QK_K; i++) {
        nm_unpack_q6_K(&b[i], q);
        sum += (nm_fp16_to_fp32(b[i].d) * a[i].d) * (float)k_scaled_dot(q, b[i].scales, 16, &a[i]);
    }
    return sum;
}

static float dot_q8_K(int64_t n, const void *w, const void *x) {
    const block_q8_K *b = w;
    const block_q8_K *a = x;
    float sum = 0;
    for (int64_t i = 0; i < n / NM_QK_K; i++) sum += (b[i].d * a[i].d) * (float)idot(b[i].qs, a[i].qs, NM_QK_K);
    return sum;
}

nm_vec_dot_fn nm_vec_dot_ref(int type) {
    switch (type) {
    case NM_TYPE_F32: return dot_f32;
    case NM_TYPE_F16: return dot_f16;
    case NM_TYPE_BF16: return dot_bf16;
    case NM_TYPE_Q4_0: return dot_q4_0;
    case NM_TYPE_Q4_1: return dot_q4_1;
    case NM_TYPE_Q5_0: return dot_q5_0;
    case NM_TYPE_Q5_1: return dot_q5_1;
    case NM_TYPE_Q8_0: return dot_q8_0;
    case NM_TYPE_Q2_K: return dot_q2_K;
    case NM_TYPE_Q3_K: return dot_q3_K;
    case NM_TYPE_Q4_K: return dot_q4_K;
    case NM_TYPE_Q5_K: return dot_q5_K;
    case NM_TYPE_Q6_K: return dot_q6_K;
    case NM_TYPE_Q8_K: return dot_q8_K;
    default: return NULL;
    }
}

/* The scalar level has no multi-row kernels of its own: it is the ground
 * truth, so its multi dots are plain loops over the reference. */
NM_DOT_MULTI_BY_LOOP(multi_f32, dot_f32)
NM_DOT_MULTI_BY_LOOP(multi_f16, dot_f16)
NM_DOT_MULTI_BY_LOOP(multi_bf16, dot_bf16)
NM_DOT_MULTI_BY_LOOP(multi_q4_0, dot_q4_0)
NM_DOT_MULTI_BY_LOOP(multi_q4_1, dot_q4_1)
NM_DOT_MULTI_BY_LOOP(multi_q5_0, dot_q5_0)
NM_DOT_MULTI_BY_LOOP(multi_q5_1, dot_q5_1)
NM_DOT_MULTI_BY_LOOP(multi_q8_0, dot_q8_0)
NM_DOT_MULTI_BY_LOOP(multi_q2_K, dot_q2_K)
NM_DOT_MULTI_BY_LOOP(multi_q3_K, dot_q3_K)
NM_DOT_MULTI_BY_LOOP(multi_q4_K, dot_q4_K)
NM_DOT_MULTI_BY_LOOP(multi_q5_K, dot_q5_K)
NM_DOT_MULTI_BY_LOOP(multi_q6_K, dot_q6_K)
NM_DOT_MULTI_BY_LOOP(multi_q8_K, dot_q8_K)

nm_vec_dot_multi_fn nm_vec_dot_multi_ref(int type) {
    switch (type) {
    case NM_TYPE_F32: return multi_f32;
    case NM_TYPE_F16: return multi_f16;
    case NM_TYPE_BF16: return multi_bf16;
    case NM_TYPE_Q4_0: return multi_q4_0;
    case NM_TYPE_Q4_1: return multi_q4_1;
    case NM_TYPE_Q5_0: return multi_q5_0;
    case NM_TYPE_Q5_1: return multi_q5_1;
    case NM_TYPE_Q8_0: return multi_q8_0;
    case NM_TYPE_Q2_K: return multi_q2_K;
    case NM_TYPE_Q3_K: return multi_q3_K;
    case NM_TYPE_Q4_K: return multi_q4_K;
    case NM_TYPE_Q5_K: return multi_q5_K;
    case NM_TYPE_Q6_K: return multi_q6_K;
    case NM_TYPE_Q8_K: return multi_q8_K;
    default: return NULL;
    }
}
