/* dequant.c - rows of any numoe-computable type to float32.
 *
 * Bit-exact with ggml's dequantize_row_* (ggml-quants.c) and gguf-py's numpy
 * dequantize: every output is computed with the same float operations in the
 * same order, each rounded once in binary32:
 *   symmetric formats   y = d * q            (Q4_0, Q5_0, Q8_0, Q8_K)
 *   with a block min    y = d * q + m        (Q4_1, Q5_1)
 *   K-quants            y = (d * sc) * q - (dmin * m)   (Q2_K, Q4_K, Q5_K)
 *                       y = (d * sc) * q                 (Q3_K, Q6_K)
 * where q, sc, m are small integers converted exactly to float. This relies
 * on no fused multiply-add: gcc's -std=c11 implies -ffp-contract=off, and
 * this file gets no FMA ISA flags. */
#include <string.h>

#include "kernels/fp16.h"
#include "kernels/quant.h"
#include "kernels/quant_unpack.h"

typedef void (*dequant_fn)(const void *src, float *y, int64_t nblocks);

static void dequant_f32(const void *src, float *y, int64_t nb) { memcpy(y, src, (size_t)nb * sizeof(float)); }

static void dequant_f16(const void *src, float *y, int64_t nb) {
    const uint16_t *h = src;
    for (int64_t i = 0; i < nb; i++) y[i] = nm_fp16_to_fp32(h[i]);
}

static void dequant_bf16(const void *src, float *y, int64_t nb) {
    const uint16_t *h = src;
    for (int64_t i = 0; i < nb; i++) y[i] = nm_bf16_to_fp32(h[i]);
}

/* y = d*q over n elements. */
static void scale_q(float d, const int8_t *q, int n, float *y) {
    for (int j = 0; j < n; j++) y[j] = d * q[j];
}

/* y = d*q + m over n elements. */
static void scale_q_add(float d, float m, const int8_t *q, int n, float *y) {
    for (int j = 0; j < n; j++) y[j] = d * q[j] + m;
}

static void dequant_q4_0(const void *src, float *y, int64_t nb) {
    const block_q4_0 *b = src;
    int8_t q[NM_QK4_0];
    for (int64_t i = 0; i < nb; i++, y += NM_QK4_0) {
        nm_unpack_q4_0(&b[i], q);
        scale_q(nm_fp16_to_fp32(b[i].d), q, NM_QK4_0, y);
    }
}

static void dequant_q4_1(const void *src, float *y, int64_t nb) {
    const block_q4_1 *b = src;
    int8_t q[NM_QK4_1];
    for (int64_t i = 0; i < nb; i++, y += NM_QK4_1) {
        nm_unpack_q4_1(&b[i], q);
        scale_q_add(nm_fp16_to_fp32(b[i].d), nm_fp16_to_fp32(b[i].m), q, NM_QK4_1, y);
    }
}

static void dequant_q5_0(const void *src, float *y, int64_t nb) {
    const block_q5_0 *b = src;
    int8_t q[NM_QK5_0];
    for (int64_t i = 0; i < nb; i++, y += NM_QK5_0) {
        nm_unpack_q5_0(&b[i], q);
        scale_q(nm_fp16_to_fp32(b[i].d), q, NM_QK5_0, y);
    }
}

static void dequant_q5_1(const void *src, float *y, int64_t nb) {
    const block_q5_1 *b = src;
    int8_t q[NM_QK5_1];
    for (int64_t i = 0; i < nb; i++, y += NM_QK5_1) {
        nm_unpack_q5_1(&b[i], q);
        scale_q_add(nm_fp16_to_fp32(b[i].d), nm_fp16_to_fp32(b[i].m), q, NM_QK5_1, y);
    }
}

static void dequant_q8_0(const void *src, float *y, int64_t nb) {
    const block_q8_0 *b = src;
    for (int64_t i = 0; i < nb; i++, y += NM_QK8_0) scale_q(nm_fp16_to_fp32(b[i].d), b[i].qs, NM_QK8_0, y);
}

static void dequant_q8_K(const void *src, float *y, int64_t nb) {
    const block_q8_K *b = src;
    for (int64_t i = 0; i < nb; i++, y += NM_QK_K) scale_q(b[i].d, b[i].qs, NM_QK_K, y);
}

/* K-quant super-block with per-sub-block scale and min:
 * y = (d*sc[s]) * q - (dmin*m[s]), ggml's dl/ml. */
static void k_affine(float d, float dmin, const int8_t *q, const int8_t *sc, const int8_t *m, int nsub, float *y) {
    const int len = NM_QK_K / nsub;
    for (int s = 0; s < nsub; s++) {
        const float dl = d * sc[s], ml = dmin * m[s];
        for (int l = 0; l < len; l++) y[s * len + l] = dl * q[s * len + l] - ml;
    }
}

/* K-quant super-block with signed sub-block scales: y = (d*sc[s]) * q. */
static void k_symmetric(float d, const int8_t *q, const int8_t *sc, int nsub, float *y) {
    const int len = NM_QK_K / nsub;
    for (int s = 0; s < nsub; s++) scale_q(d * sc[s], q + s * len, len, y + s * len);
}

static void dequant_q2_K(const void *src, float *y, int64_t nb) {
    const block_q2_K *b = src;
    int8_t q[NM_QK_K], sc[16], m[16];
    for (int64_t i = 0; i < nb; i++, y += NM_QK_K) {
        nm_unpack_q2_K(&b[i], q, sc, m);
        k_affine(nm_fp16_to_fp32(b[i].d), nm_fp16_to_fp32(b[i].dmin), q, sc, m, 16, y);
    }
}

static void dequant_q3_K(const void *src, float *y, int64_t nb) {
    const block_q3_K *b = src;
    int8_t q[NM_QK_K], sc[16];
    for (int64_t i = 0; i < nb; i++, y += NM_QK_K) {
        nm_unpack_q3_K(&b[i], q, sc);
        k_symmetric(nm_fp16_to_fp32(b[i].d), q, sc, 16, y);
    }
}

static void dequant_q4_K(const void *src, float *y, int64_t nb) {
    const block_q4_K *b = src;
    int8_t q[NM_QK_K], sc[8], m[8];
    for (int64_t i = 0; i < nb; i++, y += NM_QK_K) {
        nm_unpack_q4_K(&b[i], q, sc, m);
        k_affine(nm_fp16_to_fp32(b[i].d), nm_fp16_to_fp32(b[i].dmin), q, sc, m, 8, y);
    }
}

static void dequant_q5_K(const void *src, float *y, int64_t nb) {
    const block_q5_K *b = src;
    int8_t q[NM_QK_K], sc[8], m[8];
    for (int64_t i = 0; i < nb; i++, y += NM_QK_K) {
        nm_unpack_q5_K(&b[i], q, sc, m);
        k_affine(nm_fp16_to_fp32(b[i].d), nm_fp16_to_fp32(b[i].dmin), q, sc, m, 8, y);
    }
}

static void dequant_q6_K(const void *src, float *y, int64_t nb) {
    const block_q6_K *b = src;
    int8_t q[NM_QK_K];
    for (int64_t i = 0; i < nb; i++, y += NM_QK_K) {
        nm_unpack_q6_K(&b[i], q);
        k_symmetric(nm_fp16_to_fp32(b[i].d), q, b[i].scales, 16, y);
    }
}

static dequant_fn dequant_for(int type) {
    switch (type) {
    case NM_TYPE_F32: return dequant_f32;
    case NM_TYPE_F16: return dequant_f16;
    case NM_TYPE_BF16: return dequant_bf16;
    case NM_TYPE_Q4_0: return dequant_q4_0;
    case NM_TYPE_Q4_1: return dequant_q4_1;
    case NM_TYPE_Q5_0: return dequant_q5_0;
    case NM_TYPE_Q5_1: return dequant_q5_1;
    case NM_TYPE_Q8_0: return dequant_q8_0;
    case NM_TYPE_Q2_K: return dequant_q2_K;
    case NM_TYPE_Q3_K: return dequant_q3_K;
    case NM_TYPE_Q4_K: return dequant_q4_K;
    case NM_TYPE_Q5_K: return dequant_q5_K;
    case NM_TYPE_Q6_K: return dequant_q6_K;
    case NM_TYPE_Q8_K: return dequant_q8_K;
    default: return NULL;
    }
}

/* -1 also for n that is negative or not a whole number of blocks. */
int nm_dequantize_row(int type, const void *src, float *dst, int64_t n) {
    const nm_type_traits *t = nm_type_traits_of(type);
    const dequant_fn fn = dequant_for(type);
    if (!t || !fn || n < 0 || n % t->block_size) return -1;
    if (n > 0) fn(src, dst, n / t->block_size);
    return 0;
}
