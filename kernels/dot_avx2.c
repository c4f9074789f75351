/* dot_avx2.c - AVX2 + FMA + F16C weight-row dots (compiled with -mavx2
 * -mfma -mf16c; entered only after cpu_isa.c checked the CPU).
 *
 * Integer formats follow one pattern: unpack the weight quants of 32
 * elements into bytes, multiply with the int8 activation bytes using
 * vpmaddubsw (unsigned x signed bytes -> int16 pair sums), widen to int32
 * with vpmaddwd (which also applies a per-sub-block int16 scale for free),
 * keep the block's sum in int32 and turn it into float once per block with
 * the block's float scales.
 *
 * vpmaddubsw saturates at +-32767: every caller keeps the unsigned operand
 * at most 63 (2 * 63 * 128 < 32767), or, for signed x signed data, moves the
 * sign onto the activation (|w| <= 128, |x| <= 127 since the Q8 quantisers
 * never emit -128).
 *
 * K-quant weights with an offset (Q3_K's q - 4, Q6_K's q - 32) are
 * multiplied as unsigned and the offset is removed afterwards: the offset
 * (and the min of Q2_K/Q4_K/Q5_K) is constant over a sub-block,
 * so its contribution is offset * (sum of the sub-block's activations),
 * and Q8_K already carries those sums (bsums, per 16 elements).
 *
 * The loops over the parts of a block are unrolled (#pragma GCC unroll):
 * their shift counts and shuffle controls become immediates and the
 * unpacked vectors stay in registers instead of a stack array. */
#include <immintrin.h>
#include <string.h>

#include "kernels/dot_simd.h"

static inline float half_to_f32(nm_half h) { return _cvtsh_ss(h); }

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Per int32 lane: sum of 4 adjacent u8 * s8 products (u <= 63, see top). */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* Signed x signed: |a| * (b with a's sign) has the same products. */
static inline __m256i dot_s8s8(__m256i a, __m256i b) {
    return dot_u8s8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

static inline __m256i load256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* ---- float weights x F32 activations ------------------------------------ */

enum { FW_F32, FW_F16, FW_BF16 };

static inline __m256 load8_weights(const void *w, int64_t i, int fmt) {
    if (fmt == FW_F32) return _mm256_loadu_ps((const float *)w + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (fmt == FW_F16) return _mm256_cvtph_ps(h);
    /* bf16 is the upper half of an f32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float load1_weight(const void *w, int64_t i, int fmt) {
    if (fmt == FW_F32) return ((const float *)w)[i];
    const uint16_t h = ((const uint16_t *)w)[i];
    if (fmt == FW_F16) return _cvtsh_ss(h);
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Four accumulators hide the FMA latency; the tail is scalar. */
static inline __attribute__((always_inline)) float dot_float(int64_t n, const void *w, const float *x, int fmt) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        nm_prefetch_weights((const char *)w + i * (fmt == FW_F32 ? 4 : 2), fmt == FW_F32 ? 128 : 64);
        s0 = _mm256_fmadd_ps(load8_weights(w, i, fmt), _mm256_loadu_ps(x + i), s0);
        s1 = _mm256_fmadd_ps(load8_weights(w, i + 8, fmt), _mm256_loadu_ps(x + i + 8), s1);
        s2 = _mm256_fmadd_ps(load8_weights(w, i + 16, fmt), _mm256_loadu_ps(x + i + 16), s2);
        s3 = _mm256_fmadd_ps(load8_weights(w, i + 24, fmt), _mm256_loadu_ps(x + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(load8_weights(w, i, fmt), _mm256_loadu_ps(x + i), s0);
    float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) sum += load1_weight(w, i, fmt) * x[i];
    return sum;
}

static float dot_f32(int64_t n, const void *w, const void *x) { return dot_float(n, w, x, FW_F32); }
static float dot_f16(int64_t n, const void *w, const void *x) { return dot_float(n, w, x, FW_F16); }
static float dot_bf16(int64_t n, const void *w, const void *x) { return dot_float(n, w, x, FW_BF16); }

/* ---- 32-element formats x Q8_0 ------------------------------------------ */

/* 16 packed bytes -> 32 nibbles in element order (low nibbles are elements
 * 0-15, high nibbles 16-31). */
static inline __m256i nibbles32(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
}

/* 32 bits -> 32 bytes, 0xFF where bit i of the little-endian word is set. */
static inline __m256i bits_to_bytes(const uint8_t qh[4]) {
    uint32_t bits;
    memcpy(&bits, qh, sizeof bits);
    /* byte i takes source byte i / 8, then keeps its own bit i % 8 */
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int)bits),
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

enum { L_Q8_0, L_Q4_0, L_Q4_1, L_Q5_0, L_Q5_1 };

/* Per int32 lane, block i's sum of weight quant * activation quant. Q4_0 and
 * Q5_0 become signed bytes: q - 8 directly; q - 16 is the nibble itself
 * when the fifth bit is set and nibble - 16 (the nibble with 0xF0 on top)
 * when not. Q4_1 and Q5_1 stay unsigned, their min is added separately. */
static inline __m256i legacy_sumi(const void *w, int64_t i, __m256i y, int fmt) {
    switch (fmt) {
    case L_Q8_0: return dot_s8s8(load256(((const block_q8_0 *)w)[i].qs), y);
    case L_Q4_0: return dot_s8s8(_mm256_sub_epi8(nibbles32(((const block_q4_0 *)w)[i].qs), _mm256_set1_epi8(8)), y);
    case L_Q4_1: return dot_u8s8(nibbles32(((const block_q4_1 *)w)[i].qs), y);
    case L_Q5_0: {
        const block_q5_0 *b = &((const block_q5_0 *)w)[i];
        const __m256i hi = _mm256_andnot_si256(bits_to_bytes(b->qh), _mm256_set1_epi8((char)0xF0));
        return dot_s8s8(_mm256_or_si256(nibbles32(b->qs), hi), y);
    }
    default: {
        const block_q5_1 *b = &((const block_q5_1 *)w)[i];
        const __m256i hi = _mm256_and_si256(bits_to_bytes(b->qh), _mm256_set1_epi8(0x10));
        return dot_u8s8(_mm256_or_si256(nibbles32(b->qs), hi), y);
    }
    }
}

static inline size_t legacy_size(int fmt) {
    switch (fmt) {
    case L_Q8_0: return sizeof(block_q8_0);
    case L_Q4_0: return sizeof(block_q4_0);
    case L_Q4_1: return sizeof(block_q4_1);
    case L_Q5_0: return sizeof(block_q5_0);
    default: return sizeof(block_q5_1);
    }
}

/* Every 32-element block starts with its fp16 d; Q4_1/Q5_1 follow it with m. */
static inline nm_half legacy_half(const void *w, int64_t i, int which, int fmt) {
    nm_half h;
    memcpy(&h, (const uint8_t *)w + (size_t)i * legacy_size(fmt) + sizeof(nm_half) * (size_t)which, sizeof h);
    return h;
}

/* [a0*x0, a1*x1, ..] from four fp16 values, gathered in a general register
 * and converted with one vcvtph2ps (instead of four scalar conversions:
 * these formats are bound by instruction count). */
static inline __m128 pair_scales(nm_half a0, nm_half a1, nm_half x0, nm_half x1) {
    const uint64_t h = (uint64_t)a0 | (uint64_t)a1 << 16 | (uint64_t)x0 << 32 | (uint64_t)x1 << 48;
    const __m128 f = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h));
    return _mm_mul_ps(f, _mm_movehl_ps(f, f));
}

/* acc + block i's dot, given its d*dx (and m*dx) broadcast. d*q + m needs
 * the block's activation sum for the m part, which Q8_0 does not store;
 * one more vpmaddubsw against ones computes it. */
static inline __m256 legacy_block(__m256 acc, const void *w, int64_t i, const block_q8_0 *bx, __m256 sd, __m256 sm,
                                  int fmt) {
    const __m256i y = load256(bx[i].qs);
    acc = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(legacy_sumi(w, i, y, fmt)), acc);
    if (fmt == L_Q4_1 || fmt == L_Q5_1)
        acc = _mm256_fmadd_ps(sm, _mm256_cvtepi32_ps(dot_u8s8(_mm256_set1_epi8(1), y)), acc);
    return acc;
}

/* Two blocks per step share the scale conversion; two accumulators let
 * the FMAs of consecutive blocks overlap. */
static inline __attribute__((always_inline)) float dot_legacy(int64_t n, const void *w, const void *x, int fmt) {
    const block_q8_0 *bx = x;
    const int affine = fmt == L_Q4_1 || fmt == L_Q5_1;
    const int64_t nb = n / 32;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, sm0 = acc0, sm1 = acc0;
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        nm_prefetch_weights((const uint8_t *)w + (size_t)i * legacy_size(fmt), 2 * legacy_size(fmt));
        const __m128 sd = pair_scales(legacy_half(w, i, 0, fmt), legacy_half(w, i + 1, 0, fmt), bx[i].d, bx[i + 1].d);
        if (affine) {
            const __m128 sm = pair_scales(legacy_half(w, i, 1, fmt), legacy_half(w, i + 1, 1, fmt), bx[i].d, bx[i + 1].d);
            sm0 = _mm256_broadcastss_ps(sm);
            sm1 = _mm256_broadcastss_ps(_mm_movehdup_ps(sm));
        }
        acc0 = legacy_block(acc0, w, i, bx, _mm256_broadcastss_ps(sd), sm0, fmt);
        acc1 = legacy_block(acc1, w, i + 1, bx, _mm256_broadcastss_ps(_mm_movehdup_ps(sd)), sm1, fmt);
    }
    if (i < nb) {
        const __m128 sd = pair_scales(legacy_half(w, i, 0, fmt), 0, bx[i].d, 0);
        if (affine) sm0 = _mm256_broadcastss_ps(pair_scales(legacy_half(w, i, 1, fmt), 0, bx[i].d, 0));
        acc0 = legacy_block(acc0, w, i, bx, _mm256_broadcastss_ps(sd), sm0, fmt);
    }
    return hsum_ps(_mm256_add_ps(acc0, acc1));
}

static float dot_q8_0(int64_t n, const void *w, const void *x) { return dot_legacy(n, w, x, L_Q8_0); }
static float dot_q4_0(int64_t n, const void *w, const void *x) { return dot_legacy(n, w, x, L_Q4_0); }
static float dot_q4_1(int64_t n, const void *w, const void *x) { return dot_legacy(n, w, x, L_Q4_1); }
static float dot_q5_0(int64_t n, const void *w, const void *x) { return dot_legacy(n, w, x, L_Q5_0); }
static float dot_q5_1(int64_t n, const void *w, const void *x) { return dot_legacy(n, w, x, L_Q5_1); }

/* ---- K-quants x Q8_K ------------------------------------------------------ */

/* vpshufb control that broadcasts int16 word a to the low 128-bit lane and
 * word b to the high one (the source holds the same 8 words in both lanes). */
static inline __m256i word_pair_ctrl(int a, int b) {
    /* sixteen explicit words fold into one constant in memory (a
     * set_m128i of two set1s was rebuilt in registers each iteration) */
    const short wa = (short)(0x0100 + 0x0202 * a), wb = (short)(0x0100 + 0x0202 * b);
    return _mm256_setr_epi16(wa, wa, wa, wa, wa, wa, wa, wa, wb, wb, wb, wb, wb, wb, wb, wb);
}

/* The same 8 int16 values in both 128-bit lanes. */
static inline __m256i bcast_words(__m128i w8) { return _mm256_broadcastsi128_si256(w8); }

static float dot_q8_K(int64_t n, const void *w, const void *x) {
    const block_q8_K *bw = w, *bx = x;
    const int64_t nb = n / NM_QK_K;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        nm_prefetch_weights(&bw[i], sizeof bw[i]);
        __m256i sumi = _mm256_setzero_si256();
        #pragma GCC unroll 8
        for (int k = 0; k < NM_QK_K; k += 32)
            sumi = _mm256_add_epi32(sumi, dot_s8s8(load256(bw[i].qs + k), load256(bx[i].qs + k)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(bw[i].d * bx[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc);
}

/* Q4_K and Q5_K (has_qh): qs[32c + l] holds element 64c + l (low nibble,
 * sub-block 2c) and 64c + 32 + l (high nibble, sub-block 2c + 1); Q5_K's
 * fifth bits are bit 2c / 2c + 1 of qh[l]. value d*sc*q - dmin*m. */
static inline __attribute__((always_inline)) float dot_k4_body(int64_t n, const void *w, const void *x, int has_qh) {
    const block_q4_K *b4 = w;
    const block_q5_K *b5 = w;
    const block_q8_K *bx = x;
    const int64_t nb = n / NM_QK_K;
    const __m256i m4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps(), accm = acc;
    for (int64_t i = 0; i < nb; i++) {
        const void *blk = has_qh ? (const void *)&b5[i] : (const void *)&b4[i];
        nm_prefetch_weights(blk, has_qh ? sizeof b5[i] : sizeof b4[i]);
        /* d, dmin and the scales are the block's first 16 bytes */
        const __m128i head = _mm_loadu_si128((const __m128i *)blk);
        const __m128 dd = _mm_mul_ps(_mm_cvtph_ps(head), _mm_set1_ps(bx[i].d)); /* d*dx, dmin*dx */
        const __m128i scm = nm_k4_scales_mins(head);
        accm = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)),
                               _mm256_cvtepi32_ps(nm_k4_min_dot(scm, bx[i].bsums)), accm);
        const __m256i sc = bcast_words(_mm_cvtepu8_epi16(scm));
        const uint8_t *qs = has_qh ? b5[i].qs : b4[i].qs;
        const int8_t *y = bx[i].qs;
        /* shifting qh right by 2 per chunk brings bits 2c / 2c+1 to 0 / 1 */
        __m256i h = has_qh ? load256(b5[i].qh) : _mm256_setzero_si256();
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int c = 0; c < 4; c++) {
            const __m256i q = load256(qs + 32 * c);
            __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if (has_qh) {
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(h, 4), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(h, 3), bit4));
                h = _mm256_srli_epi16(h, 2);
            }
            const __m256i slo = _mm256_shuffle_epi8(sc, word_pair_ctrl(2 * c, 2 * c));
            const __m256i shi = _mm256_shuffle_epi8(sc, word_pair_ctrl(2 * c + 1, 2 * c + 1));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load256(y + 64 * c)), slo));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load256(y + 64 * c + 32)), shi));
        }
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc) - hsum_ps(accm);
}

static float dot_q4_K(int64_t n, const void *w, const void *x) { return dot_k4_body(n, w, x, 0); }
static float dot_q5_K(int64_t n, const void *w, const void *x) { return dot_k4_body(n, w, x, 1); }

/* Q6_K: unsigned q in [0, 63] (= stored q + 32). Each 32-byte vector spans
 * two 16-element sub-blocks, one per 128-bit lane. */
static float dot_q6_K(int64_t n, const void *w, const void *x) {
    const block_q6_K *bw = w;
    const block_q8_K *bx = x;
    const int64_t nb = n / NM_QK_K;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        nm_prefetch_weights(&bw[i], sizeof bw[i]);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)bw[i].scales);
        /* the -32 offset: sum_s sc_s * bsums_s, bsums covering exactly the
         * 16-element sub-blocks */
        const __m256i off = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8), load256(bx[i].bsums));
        __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 5));
        const __m256i scs[2] = {bcast_words(_mm_cvtepi8_epi16(sc8)), bcast_words(_mm_cvtepi8_epi16(_mm_srli_si128(sc8, 8)))};
        #pragma GCC unroll 8
        for (int h = 0; h < 2; h++) {
            const __m256i sc = scs[h];
            const __m256i qla = load256(bw[i].ql + 64 * h), qlb = load256(bw[i].ql + 64 * h + 32);
            const __m256i qh = load256(bw[i].qh + 32 * h);
            const int8_t *y = bx[i].qs + 128 * h;
            const __m256i u0 = _mm256_or_si256(_mm256_and_si256(qla, m4),
                                               _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4));
            const __m256i u1 = _mm256_or_si256(_mm256_and_si256(qlb, m4),
                                               _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2));
            const __m256i u2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qla, 4), m4),
                                               _mm256_and_si256(qh, _mm256_set1_epi8(0x30)));
            const __m256i u3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlb, 4), m4),
                                               _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8((char)0xC0)), 2));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(u0, load256(y)),
                                                            _mm256_shuffle_epi8(sc, word_pair_ctrl(0, 1))));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(u1, load256(y + 32)),
                                                            _mm256_shuffle_epi8(sc, word_pair_ctrl(2, 3))));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(u2, load256(y + 64)),
                                                            _mm256_shuffle_epi8(sc, word_pair_ctrl(4, 5))));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(u3, load256(y + 96)),
                                                            _mm256_shuffle_epi8(sc, word_pair_ctrl(6, 7))));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_f32(bw[i].d) * bx[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc);
}

/* Q2_K: q in [0, 3]; in half h, bit pair 2j of qs[32h + l] is element
 * 128h + 32j + l, so one 32-byte load feeds four vectors of 32 elements,
 * each spanning sub-blocks 8h + 2j (low lane) and 8h + 2j + 1 (high). */
static float dot_q2_K(int64_t n, const void *w, const void *x) {
    const block_q2_K *bw = w;
    const block_q8_K *bx = x;
    const int64_t nb = n / NM_QK_K;
    const __m256i m2 = _mm256_set1_epi8(0x03);
    __m256 acc = _mm256_setzero_ps(), accm = acc;
    for (int64_t i = 0; i < nb; i++) {
        nm_prefetch_weights(&bw[i], sizeof bw[i]);
        /* d and dmin are adjacent halves */
        uint32_t dpair;
        memcpy(&dpair, &bw[i].d, sizeof dpair);
        const __m128 dd = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int)dpair)), _mm_set1_ps(bx[i].d));
        const __m128i raw = _mm_loadu_si128((const __m128i *)bw[i].scales);
        const __m128i sc8 = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
        const __m128i m8 = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
        /* the mins are per 16-element sub-block, exactly what bsums sum */
        accm = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)),
                               _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_cvtepu8_epi16(m8), load256(bx[i].bsums))),
                               accm);
        __m256i sumi = _mm256_setzero_si256();
        const __m256i scs[2] = {bcast_words(_mm_cvtepu8_epi16(sc8)), bcast_words(_mm_cvtepu8_epi16(_mm_srli_si128(sc8, 8)))};
        #pragma GCC unroll 8
        for (int h = 0; h < 2; h++) {
            const __m256i sc = scs[h];
            const __m256i q = load256(bw[i].qs + 32 * h);
            const int8_t *y = bx[i].qs + 128 * h;
            #pragma GCC unroll 8
            for (int j = 0; j < 4; j++) {
                const __m256i u = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), m2);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(u, load256(y + 32 * j)),
                                                                _mm256_shuffle_epi8(sc, word_pair_ctrl(2 * j, 2 * j + 1))));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc) - hsum_ps(accm);
}

/* Q3_K: unsigned q = low 2 bits + 4 * hmask bit in [0, 7] (= stored q + 4);
 * element 128h + 32j + l takes its high bit from bit 4h + j of hmask[l]. */
static float dot_q3_K(int64_t n, const void *w, const void *x) {
    const block_q3_K *bw = w;
    const block_q8_K *bx = x;
    const int64_t nb = n / NM_QK_K;
    const __m256i m2 = _mm256_set1_epi8(0x03), bit2 = _mm256_set1_epi8(0x04);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        nm_prefetch_weights(&bw[i], sizeof bw[i]);
        const __m128i sc8 = nm_q3_scales(nm_q3_scales_load(&bw[i]));
        /* the -4 offset, per 16-element sub-block as bsums */
        const __m256i off = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8), load256(bx[i].bsums));
        __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 2));
        /* shifted right by 4h + j, hmask has the wanted bit at bit 0 */
        __m256i hm = load256(bw[i].hmask);
        const __m256i scs[2] = {bcast_words(_mm_cvtepi8_epi16(sc8)), bcast_words(_mm_cvtepi8_epi16(_mm_srli_si128(sc8, 8)))};
        #pragma GCC unroll 8
        for (int h = 0; h < 2; h++) {
            const __m256i sc = scs[h];
            const __m256i q = load256(bw[i].qs + 32 * h);
            const int8_t *y = bx[i].qs + 128 * h;
            #pragma GCC unroll 8
            for (int j = 0; j < 4; j++) {
                const __m256i u = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 2 * j), m2),
                                                  _mm256_and_si256(_mm256_slli_epi16(hm, 2), bit2));
                hm = _mm256_srli_epi16(hm, 1);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(u, load256(y + 32 * j)),
                                                                _mm256_shuffle_epi8(sc, word_pair_ctrl(2 * j, 2 * j + 1))));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_f32(bw[i].d) * bx[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc);
}

nm_vec_dot_fn nm_dot_table_avx2(int type) {
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

/* ---- several activation rows per weight row -------------------------------- *
 *
 * As in dot_avx512.c, the kernels below do the weight side of a block once
 * for NX activation rows (NX a constant, 2..8); per row the float
 * operations are exactly those of the single dots above (integer sums are
 * exact in any order), so the results are the same bits. The loops run one
 * part of a block (a 32-byte chunk, or a 32-element block, unpacked once)
 * over all rows at a time, each row keeping its running sums. At NX = 8
 * that is more than the 16 ymm registers hold and some accumulators live
 * in L1; measured on a Zen 4 in AVX2 mode this still beat two passes of 4
 * rows (which unpack every block twice): Q5_0 30.6 vs 35.8 ns per row and
 * token at 1408 elements, single dot 57.4. */
/* Q4_K and Q5_K, the steps of dot_k4_body: per block the mins' part of
 * every row first, then each 32-byte chunk unpacked once (two sub-blocks)
 * and applied to every row, the d part added once the rows' sums are whole. */
static inline __attribute__((always_inline)) void dot_k4_multi(int NX, int64_t n, const void *w,
                                                               const void *const *x, float *out, int has_qh) {
    const block_q4_K *b4 = w;
    const block_q5_K *b5 = w;
    const block_q8_K *bx[NM_DOT_MULTI_MAX];
    __m256 acc[NM_DOT_MULTI_MAX], accm[NM_DOT_MULTI_MAX];
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) bx[j] = x[j], acc[j] = _mm256_setzero_ps(), accm[j] = _mm256_setzero_ps();
    const int64_t nb = n / NM_QK_K;
    const __m256i m4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    for (int64_t i = 0; i < nb; i++) {
        const void *blk = has_qh ? (const void *)&b5[i] : (const void *)&b4[i];
        nm_prefetch_weights(blk, has_qh ? sizeof b5[i] : sizeof b4[i]);
        const __m128i head = _mm_loadu_si128((const __m128i *)blk);
        const __m128 dw = _mm_cvtph_ps(head);
        const __m128i scm = nm_k4_scales_mins(head);
        const __m256i mins = nm_k4_mins16(scm);
        __m256i sumi[NM_DOT_MULTI_MAX];
#pragma GCC unroll 8
        for (int j = 0; j < NX; j++) {
            const __m128 dd = _mm_mul_ps(dw, _mm_set1_ps(bx[j][i].d));
            const __m256i md = _mm256_madd_epi16(mins, load256(bx[j][i].bsums));
            accm[j] = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)), _mm256_cvtepi32_ps(md), accm[j]);
            sumi[j] = _mm256_setzero_si256();
        }
        const __m256i sc = bcast_words(_mm_cvtepu8_epi16(scm));
        const uint8_t *qs = has_qh ? b5[i].qs : b4[i].qs;
        __m256i h = has_qh ? load256(b5[i].qh) : _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int c = 0; c < 4; c++) {
            const __m256i q = load256(qs + 32 * c);
            __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if (has_qh) {
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(h, 4), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(h, 3), bit4));
                h = _mm256_srli_epi16(h, 2);
            }
            const __m256i slo = _mm256_shuffle_epi8(sc, word_pair_ctrl(2 * c, 2 * c));
            const __m256i shi = _mm256_shuffle_epi8(sc, word_pair_ctrl(2 * c + 1, 2 * c + 1));
#pragma GCC unroll 8
            for (int j = 0; j < NX; j++) {
                const int8_t *y = bx[j][i].qs + 64 * c;
                sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load256(y)), slo));
                sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load256(y + 32)), shi));
            }
        }
#pragma GCC unroll 8
        for (int j = 0; j < NX; j++) {
            const __m128 dd = _mm_mul_ps(dw, _mm_set1_ps(bx[j][i].d));
            acc[j] = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) out[j] = hsum_ps(acc[j]) - hsum_ps(accm[j]);
}

/* Q6_K, the steps of dot_q6_K, half a block (four 32-byte vectors) at a
 * time over all rows. */
static inline __attribute__((always_inline)) void dot_q6_K_multi(int NX, int64_t n, const void *w,
                                                                 const void *const *x, float *out, int unused) {
    (void)unused;
    const block_q6_K *bw = w;
    const block_q8_K *bx[NM_DOT_MULTI_MAX];
    __m256 acc[NM_DOT_MULTI_MAX];
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) bx[j] = x[j], acc[j] = _mm256_setzero_ps();
    const int64_t nb = n / NM_QK_K;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t i = 0; i < nb; i++) {
        nm_prefetch_weights(&bw[i], sizeof bw[i]);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)bw[i].scales);
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        __m256i sumi[NM_DOT_MULTI_MAX];
#pragma GCC unroll 8
        for (int j = 0; j < NX; j++) {
            const __m256i off = _mm256_madd_epi16(sc16, load256(bx[j][i].bsums));
            sumi[j] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 5));
        }
#pragma GCC unroll 8
        for (int h = 0; h < 2; h++) {
            const __m256i sc = bcast_words(_mm_cvtepi8_epi16(h ? _mm_srli_si128(sc8, 8) : sc8));
            const __m256i qla = load256(bw[i].ql + 64 * h), qlb = load256(bw[i].ql + 64 * h + 32);
            const __m256i qh = load256(bw[i].qh + 32 * h);
            const __m256i top[4] = {_mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4),
                                    _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2),
                                    _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
                                    _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8((char)0xC0)), 2)};
            const __m256i u[4] = {_mm256_or_si256(_mm256_and_si256(qla, m4), top[0]),
                                  _mm256_or_si256(_mm256_and_si256(qlb, m4), top[1]),
                                  _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qla, 4), m4), top[2]),
                                  _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlb, 4), m4), top[3])};
#pragma GCC unroll 8
            for (int k = 0; k < 4; k++) {
                const __m256i s = _mm256_shuffle_epi8(sc, word_pair_ctrl(2 * k, 2 * k + 1));
#pragma GCC unroll 8
                for (int j = 0; j < NX; j++) {
                    const int8_t *y = bx[j][i].qs + 128 * h + 32 * k;
                    sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(_mm256_maddubs_epi16(u[k], load256(y)), s));
                }
            }
        }
        const float d = half_to_f32(bw[i].d);
#pragma GCC unroll 8
        for (int j = 0; j < NX; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * bx[j][i].d), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) out[j] = hsum_ps(acc[j]);
}

/* Q8_0, Q4_0, Q5_0: the float steps of dot_legacy (even blocks into acc0,
 * odd ones into acc1, one pair_scales product per block). Per block the
 * weights become signed bytes once (with |w| for vpmaddubsw); per row that
 * leaves moving the sign onto the activation, two multiplies and the FMA.
 * The scale products of rows j and j + 1 come from one conversion. */
static inline __attribute__((always_inline)) void dot_legacy_multi(int NX, int64_t n, const void *w,
                                                                   const void *const *x, float *out, int fmt) {
    const block_q8_0 *bx[NM_DOT_MULTI_MAX];
    __m256 acc0[NM_DOT_MULTI_MAX], acc1[NM_DOT_MULTI_MAX];
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) bx[j] = x[j], acc0[j] = _mm256_setzero_ps(), acc1[j] = _mm256_setzero_ps();
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; i += 2) {
        nm_prefetch_weights((const uint8_t *)w + (size_t)i * legacy_size(fmt), 2 * legacy_size(fmt));
        const int two = i + 1 < nb;
        const uint64_t dw =
            (uint64_t)legacy_half(w, i, 0, fmt) | (uint64_t)(two ? legacy_half(w, i + 1, 0, fmt) : 0) << 16;
        const __m128 wf = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)(dw | dw << 32))); /* dw0 dw1 dw0 dw1 */
        __m128 sc[NM_DOT_MULTI_MAX]; /* row j: dw0 * dx0 in lane 0, dw1 * dx1 in lane 1 */
#pragma GCC unroll 8
        for (int j = 0; j < NX; j += 2) {
            const int rows = j + 1 < NX ? 2 : 1;
            uint64_t h = 0;
#pragma GCC unroll 2
            for (int k = 0; k < rows; k++)
                h |= ((uint64_t)bx[j + k][i].d | (uint64_t)(two ? bx[j + k][i + 1].d : 0) << 16) << (32 * k);
            const __m128 s = _mm_mul_ps(wf, _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h)));
            sc[j] = s;
            if (rows == 2) sc[j + 1] = _mm_movehl_ps(s, s);
        }
#pragma GCC unroll 2
        for (int b = 0; b < 1 + two; b++) {
            const int64_t ib = i + b;
            __m256i q; /* block ib as signed bytes, as legacy_sumi makes them */
            if (fmt == L_Q8_0) {
                q = load256(((const block_q8_0 *)w)[ib].qs);
            } else if (fmt == L_Q4_0) {
                q = _mm256_sub_epi8(nibbles32(((const block_q4_0 *)w)[ib].qs), _mm256_set1_epi8(8));
            } else {
                const block_q5_0 *blk = &((const block_q5_0 *)w)[ib];
                const __m256i hi = _mm256_andnot_si256(bits_to_bytes(blk->qh), _mm256_set1_epi8((char)0xF0));
                q = _mm256_or_si256(nibbles32(blk->qs), hi);
            }
            const __m256i aq = _mm256_sign_epi8(q, q);
#pragma GCC unroll 8
            for (int j = 0; j < NX; j++) {
                const __m256i sumi = dot_u8s8(aq, _mm256_sign_epi8(load256(bx[j][ib].qs), q));
                if (b == 0)
                    acc0[j] = _mm256_fmadd_ps(_mm256_broadcastss_ps(sc[j]), _mm256_cvtepi32_ps(sumi), acc0[j]);
                else
                    acc1[j] = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(sc[j])), _mm256_cvtepi32_ps(sumi),
                                              acc1[j]);
            }
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) out[j] = hsum_ps(_mm256_add_ps(acc0[j], acc1[j]));
}

/* nx as a constant for the body; one row takes the single dot. */
#define MULTI_NX(single, body, ...)                                                                            \
    switch (nx) {                                                                                              \
    case 1: out[0] = single(n, w, x[0]); break;                                                                \
    case 2: body(2, n, w, x, out, __VA_ARGS__); break;                                                         \
    case 3: body(3, n, w, x, out, __VA_ARGS__); break;                                                         \
    case 4: body(4, n, w, x, out, __VA_ARGS__); break;                                                         \
    case 5: body(5, n, w, x, out, __VA_ARGS__); break;                                                         \
    case 6: body(6, n, w, x, out, __VA_ARGS__); break;                                                         \
    case 7: body(7, n, w, x, out, __VA_ARGS__); break;                                                         \
    case 8: body(8, n, w, x, out, __VA_ARGS__); break;                                                         \
    default: break;                                                                                            \
    }
static_assert(NM_DOT_MULTI_MAX == 8, "MULTI_NX lists every nx up to NM_DOT_MULTI_MAX");

static void multi_q4_K(int64_t n, const void *w, const void *const *x, int nx, float *out) {
    MULTI_NX(dot_q4_K, dot_k4_multi, 0)
}
static void multi_q5_K(int64_t n, const void *w, const void *const *x, int nx, float *out) {
    MULTI_NX(dot_q5_K, dot_k4_multi, 1)
}

static void multi_q6_K(int64_t n, const void *w, const void *const *x, int nx, float *out) {
    MULTI_NX(dot_q6_K, dot_q6_K_multi, 0)
}
static void multi_q8_0(int64_t n, const void *w, const void *const *x, int nx, float *out) {
    MULTI_NX(dot_q8_0, dot_legacy_multi, L_Q8_0)
}
static void multi_q4_0(int64_t n, const void *w, const void *const *x, int nx, float *out) {
    MULTI_NX(dot_q4_0, dot_legacy_multi, L_Q4_0)
}
static void multi_q5_0(int64_t n, const void *w, const void *const *x, int nx, float *out) {
    MULTI_NX(dot_q5_0, dot_legacy_multi, L_Q5_0)
}

/* The rest loop over the single dots above. */
NM_DOT_MULTI_BY_LOOP(multi_f32, dot_f32)
NM_DOT_MULTI_BY_LOOP(multi_f16, dot_f16)
NM_DOT_MULTI_BY_LOOP(multi_bf16, dot_bf16)
NM_DOT_MULTI_BY_LOOP(multi_q4_1, dot_q4_1)
NM_DOT_MULTI_BY_LOOP(multi_q5_1, dot_q5_1)
NM_DOT_MULTI_BY_LOOP(multi_q2_K, dot_q2_K)
NM_DOT_MULTI_BY_LOOP(multi_q3_K, dot_q3_K)
NM_DOT_MULTI_BY_LOOP(multi_q8_K, dot_q8_K)

nm_vec_dot_multi_fn nm_dot_multi_table_avx2(int type) {
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
