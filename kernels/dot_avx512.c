/* dot_avx512.c - AVX-512 weight-row dots, in two flavours: plain AVX-512
 * F/BW/VL/DQ (NM_ISA_AVX512) and with AVX512-VNNI (NM_ISA_AVX512_VNNI).
 * Compiled with the AVX-512 + VNNI flags; cpu_isa.c enters the VNNI table
 * only on CPUs that have VNNI.
 *
 * Each format has one body, specialised for the two flavours by a constant
 * `vnni` argument; the flavours differ only in the integer steps (the two
 * below, and for Q4_K/Q5_K/Q6_K the pairing of vpdpbusd results described
 * at k_scaled_sum):
 *   mac_u8s8:  acc + sum of 4 u8*s8 products per int32 lane
 *              (VNNI: vpdpbusd; else vpmaddubsw + vpmaddwd + vpaddd)
 *   mac_s16:   acc + sum of 2 int16*int16 products per int32 lane, used to
 *              apply K-quant sub-block scales to vpmaddubsw pair sums
 *              (VNNI: vpdpwssd; else vpmaddwd + vpaddd)
 * The plain vpmaddubsw path saturates at +-32767, so unsigned operands stay
 * at most 63 (2 * 63 * 128 < 32767); signed x signed data moves the sign to
 * the activation (|w| <= 128, |x| <= 127: the Q8 quantisers never emit -128).
 *
 * The 32-element formats process two blocks per 512-bit vector (one per
 * 256-bit half) and an odd last block with the upper half zeroed. The
 * K-quants unpack their quants so that every vector covers 64 consecutive
 * elements (each 128-bit lane a 16- or half a 32-element sub-block) and the
 * activations load straight.
 *
 * Offsets and mins of unsigned quants are removed after the multiply: for
 * K-quants the offset (Q3_K's -4, Q6_K's -32) and the min (Q2_K, Q4_K,
 * Q5_K) are constant over a sub-block, so their contribution is
 * (offset or min) * (the sub-block's activation sum), and Q8_K stores those
 * sums (bsums, per 16 elements). Q8_0 stores none, so the 32-element
 * formats compute the block's activation sum with one more multiply.
 *
 * The loops over the parts of a block are unrolled (#pragma GCC unroll):
 * their shift counts and shuffle controls become immediates and the
 * unpacked vectors stay in registers instead of a stack array. */
#include <immintrin.h>

#include "kernels/dot_simd.h"

static inline float half_to_f32(nm_half h) { return _cvtsh_ss(h); }

static inline __m512i mac_u8s8(__m512i acc, __m512i u, __m512i s, int vnni) {
    if (vnni) return _mm512_dpbusd_epi32(acc, u, s);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
}

static inline __m512i mac_s16(__m512i acc, __m512i a, __m512i b, int vnni) {
    if (vnni) return _mm512_dpwssd_epi32(acc, a, b);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
}

/* Signed x signed: |a| times b carrying a's sign gives the same products. */
static inline __m512i mac_s8s8(__m512i acc, __m512i a, __m512i b, int vnni) {
    const __m512i negb = _mm512_mask_sub_epi8(b, _mm512_movepi8_mask(a), _mm512_setzero_si512(), b);
    return mac_u8s8(acc, _mm512_abs_epi8(a), negb, vnni);
}

/* Per int32 lane: sum (u - off) * s for unsigned u <= 31. */
static inline __m512i dot_u8s8_off(__m512i u, __m512i s, char off, int vnni) {
    const __m512i o = _mm512_set1_epi8(off);
    if (vnni) {
        const __m512i z = _mm512_setzero_si512();
        return _mm512_sub_epi32(_mm512_dpbusd_epi32(z, u, s), _mm512_dpbusd_epi32(z, o, s));
    }
    /* both pair sums fit int16 (31 * 127 * 2 + 16 * 128 * 2) */
    const __m512i d16 = _mm512_sub_epi16(_mm512_maddubs_epi16(u, s), _mm512_maddubs_epi16(o, s));
    return _mm512_madd_epi16(d16, _mm512_set1_epi16(1));
}

static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- float weights x F32 activations ------------------------------------ */

enum { FW_F32, FW_F16, FW_BF16 };

static inline __m512 load16_weights(const void *w, int64_t i, int fmt, __mmask16 k) {
    if (fmt == FW_F32) return _mm512_maskz_loadu_ps(k, (const float *)w + i);
    const __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t *)w + i);
    if (fmt == FW_F16) return _mm512_cvtph_ps(h);
    /* bf16 is the upper half of an f32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Four accumulators hide the FMA latency; the tail is a masked load. */
static inline __attribute__((always_inline)) float dot_float(int64_t n, const void *w, const float *x, int fmt) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    const __mmask16 all = 0xFFFF;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        nm_prefetch_weights((const char *)w + i * (fmt == FW_F32 ? 4 : 2), fmt == FW_F32 ? 256 : 128);
        s0 = _mm512_fmadd_ps(load16_weights(w, i, fmt, all), _mm512_loadu_ps(x + i), s0);
        s1 = _mm512_fmadd_ps(load16_weights(w, i + 16, fmt, all), _mm512_loadu_ps(x + i + 16), s1);
        s2 = _mm512_fmadd_ps(load16_weights(w, i + 32, fmt, all), _mm512_loadu_ps(x + i + 32), s2);
        s3 = _mm512_fmadd_ps(load16_weights(w, i + 48, fmt, all), _mm512_loadu_ps(x + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(load16_weights(w, i, fmt, all), _mm512_loadu_ps(x + i), s0);
    if (i < n) {
        const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        s1 = _mm512_fmadd_ps(load16_weights(w, i, fmt, k), _mm512_maskz_loadu_ps(k, x + i), s1);
    }
    return hsum512(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

static float dot_f32(int64_t n, const void *w, const void *x) { return dot_float(n, w, x, FW_F32); }
static float dot_f16(int64_t n, const void *w, const void *x) { return dot_float(n, w, x, FW_F16); }
static float dot_bf16(int64_t n, const void *w, const void *x) { return dot_float(n, w, x, FW_BF16); }

/* ---- 32-element formats x Q8_0, two blocks per vector --------------------- */

/* 32 bytes at p0 in the low half, 32 at p1 (or zeros when !two) high. */
static inline __m512i load_2x32(const void *p0, const void *p1, int two) {
    const __m256i lo = _mm256_loadu_si256((const __m256i *)p0);
    if (!two) return _mm512_zextsi256_si512(lo);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_loadu_si256((const __m256i *)p1), 1);
}

/* Two blocks' 16 packed bytes -> their 2 x 32 nibbles in element order:
 * [q0 low, q0 high | q1 low, q1 high]. */
static inline __m512i nibbles_2x32(const uint8_t *q0, const uint8_t *q1, int two) {
    const __m128i a = _mm_loadu_si128((const __m128i *)q0);
    const __m128i b = two ? _mm_loadu_si128((const __m128i *)q1) : _mm_setzero_si128();
    const __m256i t = _mm256_set_m128i(b, a);
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(t), _mm256_srli_epi16(t, 4), 1);
    return _mm512_and_si512(_mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(0x0F));
}

/* The 32 fifth bits of each block, one mask bit per byte of the vector. */
static inline __mmask64 bits_2x32(const uint8_t *h0, const uint8_t *h1, int two) {
    uint32_t a, b = 0;
    __builtin_memcpy(&a, h0, 4);
    if (two) __builtin_memcpy(&b, h1, 4);
    return (__mmask64)((uint64_t)b << 32 | a);
}

/* dw0*dx0 on the low 8 lanes, dw1*dx1 on the high 8. The four halves are
 * gathered in a general register and converted with one vcvtph2ps: per
 * pair of blocks that is 5 vector instructions instead of 13 with four
 * scalar conversions, and these formats are limited by instruction count. */
static inline __m512 scales_2(nm_half dw0, nm_half dw1, nm_half dx0, nm_half dx1) {
    const uint64_t h = (uint64_t)dw0 | (uint64_t)dw1 << 16 | (uint64_t)dx0 << 32 | (uint64_t)dx1 << 48;
    const __m128 f = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h));
    const __m128 s = _mm_mul_ps(f, _mm_movehl_ps(f, f));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(s));
}

static inline __attribute__((always_inline)) float dot_q8_0_body(int64_t n, const void *w, const void *x, int vnni) {
    const block_q8_0 *bw = w, *bx = x;
    const int64_t nb = n / NM_QK8_0;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i += 2) {
        nm_prefetch_weights(&bw[i], 2 * sizeof bw[i]);
        const int two = i + 1 < nb;
        const block_q8_0 *w1 = two ? &bw[i + 1] : &bw[i], *x1 = two ? &bx[i + 1] : &bx[i];
        const __m512i sumi = mac_s8s8(_mm512_setzero_si512(), load_2x32(bw[i].qs, w1->qs, two),
                                      load_2x32(bx[i].qs, x1->qs, two), vnni);
        const __m512 sc = scales_2(bw[i].d, two ? w1->d : 0, bx[i].d, two ? x1->d : 0);
        acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(sumi), acc);
    }
    return hsum512(acc);
}

static inline __attribute__((always_inline)) float dot_q4_0_body(int64_t n, const void *w, const void *x, int vnni) {
    const block_q4_0 *bw = w;
    const block_q8_0 *bx = x;
    const int64_t nb = n / NM_QK4_0;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i += 2) {
        nm_prefetch_weights(&bw[i], 2 * sizeof bw[i]);
        const int two = i + 1 < nb;
        const block_q4_0 *w1 = two ? &bw[i + 1] : &bw[i];
        const block_q8_0 *x1 = two ? &bx[i + 1] : &bx[i];
        const __m512i u = nibbles_2x32(bw[i].qs, w1->qs, two);
        const __m512i sumi = dot_u8s8_off(u, load_2x32(bx[i].qs, x1->qs, two), 8, vnni);
        const __m512 sc = scales_2(bw[i].d, two ? w1->d : 0, bx[i].d, two ? x1->d : 0);
        acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(sumi), acc);
    }
    return hsum512(acc);
}

static inline __attribute__((always_inline)) float dot_q5_0_body(int64_t n, const void *w, const void *x, int vnni) {
    const block_q5_0 *bw = w;
    const block_q8_0 *bx = x;
    const int64_t nb = n / NM_QK5_0;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i += 2) {
        nm_prefetch_weights(&bw[i], 2 * sizeof bw[i]);
        const int two = i + 1 < nb;
        const block_q5_0 *w1 = two ? &bw[i + 1] : &bw[i];
        const block_q8_0 *x1 = two ? &bx[i + 1] : &bx[i];
        __m512i u = nibbles_2x32(bw[i].qs, w1->qs, two);
        u = _mm512_mask_add_epi8(u, bits_2x32(bw[i].qh, w1->qh, two), u, _mm512_set1_epi8(16));
        const __m512i sumi = dot_u8s8_off(u, load_2x32(bx[i].qs, x1->qs, two), 16, vnni);
        const __m512 sc = scales_2(bw[i].d, two ? w1->d : 0, bx[i].d, two ? x1->d : 0);
        acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(sumi), acc);
    }
    return hsum512(acc);
}

/* d*q + m: the m part multiplies the block's activation sum. */
static inline __attribute__((always_inline)) float dot_q4_1_body(int64_t n, const void *w, const void *x, int vnni) {
    const block_q4_1 *bw = w;
    const block_q8_0 *bx = x;
    const int64_t nb = n / NM_QK4_1;
    const __m512i ones = _mm512_set1_epi8(1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i += 2) {
        nm_prefetch_weights(&bw[i], 2 * sizeof bw[i]);
        const int two = i + 1 < nb;
        const block_q4_1 *w1 = two ? &bw[i + 1] : &bw[i];
        const block_q8_0 *x1 = two ? &bx[i + 1] : &bx[i];
        const __m512i y = load_2x32(bx[i].qs, x1->qs, two);
        const __m512i su = mac_u8s8(_mm512_setzero_si512(), nibbles_2x32(bw[i].qs, w1->qs, two), y, vnni);
        const __m512i sy = mac_u8s8(_mm512_setzero_si512(), ones, y, vnni);
        const nm_half dx1 = two ? x1->d : 0;
        acc = _mm512_fmadd_ps(scales_2(bw[i].d, w1->d, bx[i].d, dx1), _mm512_cvtepi32_ps(su), acc);
        acc = _mm512_fmadd_ps(scales_2(bw[i].m, w1->m, bx[i].d, dx1), _mm512_cvtepi32_ps(sy), acc);
    }
    return hsum512(acc);
}

static inline __attribute__((always_inline)) float dot_q5_1_body(int64_t n, const void *w, const void *x, int vnni) {
    const block_q5_1 *bw = w;
    const block_q8_0 *bx = x;
    const int64_t nb = n / NM_QK5_1;
    const __m512i ones = _mm512_set1_epi8(1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i += 2) {
        nm_prefetch_weights(&bw[i], 2 * sizeof bw[i]);
        const int two = i + 1 < nb;
        const block_q5_1 *w1 = two ? &bw[i + 1] : &bw[i];
        const block_q8_0 *x1 = two ? &bx[i + 1] : &bx[i];
        const __m512i y = load_2x32(bx[i].qs, x1->qs, two);
        __m512i u = nibbles_2x32(bw[i].qs, w1->qs, two);
        u = _mm512_mask_add_epi8(u, bits_2x32(bw[i].qh, w1->qh, two), u, _mm512_set1_epi8(16));
        const __m512i su = mac_u8s8(_mm512_setzero_si512(), u, y, vnni);
        const __m512i sy = mac_u8s8(_mm512_setzero_si512(), ones, y, vnni);
        const nm_half dx1 = two ? x1->d : 0;
        acc = _mm512_fmadd_ps(scales_2(bw[i].d, w1->d, bx[i].d, dx1), _mm512_cvtepi32_ps(su), acc);
        acc = _mm512_fmadd_ps(scales_2(bw[i].m, w1->m, bx[i].d, dx1), _mm512_cvtepi32_ps(sy), acc);
    }
    return hsum512(acc);
}

/* ---- K-quants x Q8_K ------------------------------------------------------ */

/* vpermw index spreading int16 word a over 128-bit lane 0, b over lane 1,
 * c over lane 2 and d over lane 3: one sub-block scale per lane, ready to
 * multiply the lane's vpmaddubsw pair sums. */
static inline __m512i lane_words(int a, int b, int c, int d) {
#define W2(w) ((int)((unsigned)(w) * 0x00010001u))
    return _mm512_set_epi32(W2(d), W2(d), W2(d), W2(d), W2(c), W2(c), W2(c), W2(c), W2(b), W2(b), W2(b), W2(b),
                            W2(a), W2(a), W2(a), W2(a));
#undef W2
}

/* The scales of sub-blocks a, b, c, d (words of `words`, < 16) per lane. */
static inline __m512i lane_scales(__m512i idx, __m256i words) {
    return _mm512_permutexvar_epi16(idx, _mm512_castsi256_si512(words));
}

/* Byte mask selecting bit a in the low 32 bytes and bit b in the high 32. */
static inline __m512i bit_pair(int a, int b) {
    return _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << a)), _mm256_set1_epi8((char)(1 << b)), 1);
}

static inline __attribute__((always_inline)) float dot_q8_K_body(int64_t n, const void *w, const void *x, int vnni) {
    const block_q8_K *bw = w, *bx = x;
    const int64_t nb = n / NM_QK_K;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        nm_prefetch_weights(&bw[i], sizeof bw[i]);
        __m512i sumi = _mm512_setzero_si512();
        #pragma GCC unroll 8
        for (int k = 0; k < NM_QK_K; k += 64)
            sumi = mac_s8s8(sumi, _mm512_loadu_si512(bw[i].qs + k), _mm512_loadu_si512(bx[i].qs + k), vnni);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(bw[i].d * bx[i].d), _mm512_cvtepi32_ps(sumi), acc);
    }
    return hsum512(acc);
}

/* Q4_K, Q5_K and Q6_K are written for NX activation rows at once (the
 * multi-row dots, see below); their single dots are the NX = 1 instances,
 * so both give the same bits by construction. Per block, the weight side
 * (unpacked quants, sub-block scales spread over lanes, fp16 scales) is
 * made once; per row only the multiplies and the block's FMA remain.
 *
 * Their integer step with VNNI: vpdpbusd per 64 elements gives int32 sums
 * of 4 products, small enough for int16 (at most 4 * 63 * 128 = 32256), so
 * vpackssdw packs two such vectors without saturating and one vpdpwssd
 * applies the sub-block scales of both: 6 multiplies per block instead of
 * 8 with vpmaddubsw + vpdpwssd. After the pack, 128-bit lane L holds 4
 * words of the first vector's lane L, then 4 of the second's; pack_words
 * spreads the scales to match. Plain AVX-512 keeps vpmaddubsw pair sums
 * times the scales (vpmaddwd): emulating vpdpbusd would cost more. */

/* vpermw index: 128-bit lane L holds word a_L four times, then b_L. */
static inline __m512i pack_words(int a0, int b0, int a1, int b1, int a2, int b2, int a3, int b3) {
#define W2(w) ((int)((unsigned)(w) * 0x00010001u))
    return _mm512_set_epi32(W2(b3), W2(b3), W2(a3), W2(a3), W2(b2), W2(b2), W2(a2), W2(a2), W2(b1), W2(b1), W2(a1),
                            W2(a1), W2(b0), W2(b0), W2(a0), W2(a0));
#undef W2
}

/* sum over the four 64-element vectors u[k] of their products with the
 * activations at y + 64k, each 128-bit lane weighted by its sub-block scale:
 * s[k] from lane_words (plain) or s[0..1] from pack_words (VNNI, pairs
 * (0, 1) and (2, 3)); added to sumi. */
static inline __m512i k_scaled_sum(__m512i sumi, const __m512i u[4], const __m512i s[4], const int8_t *y, int vnni) {
    if (vnni) {
#pragma GCC unroll 8
        for (int k = 0; k < 4; k += 2) {
            const __m512i z = _mm512_setzero_si512();
            const __m512i p0 = _mm512_dpbusd_epi32(z, u[k], _mm512_loadu_si512(y + 64 * k));
            const __m512i p1 = _mm512_dpbusd_epi32(z, u[k + 1], _mm512_loadu_si512(y + 64 * k + 64));
            sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(p0, p1), s[k / 2]);
        }
        return sumi;
    }
#pragma GCC unroll 8
    for (int k = 0; k < 4; k++)
        sumi = mac_s16(sumi, _mm512_maddubs_epi16(u[k], _mm512_loadu_si512(y + 64 * k)), s[k], 0);
    return sumi;
}

/* Q4_K and Q5_K (has_qh): qs[32c + l] holds elements 64c + l (low nibble,
 * sub-block 2c) and 64c + 32 + l (high, sub-block 2c + 1). Chunk c is
 * broadcast to both halves of a vector and shifted by 0 / 4 (vpsrlvw),
 * giving its 64 elements in order (lanes 0-1 sub-block 2c, 2-3 sub-block
 * 2c + 1). Q5_K's fifth bits: bit 2c of qh[l] for element 64c + l, bit
 * 2c + 1 for 64c + 32 + l.
 *
 * Float step: the d part's 16 int32 lanes fold to 8 (the halves added) and
 * the 8 min products (mins x bsums) fill the other half of the same
 * vector, so one conversion and one FMA with dx * [d x 8 | -dmin x 8] add
 * the block's whole contribution to the row's one accumulator. */
static inline __attribute__((always_inline)) void dot_k4_body(int NX, int64_t n, const void *w,
                                                              const void *const *x, float *out, int vnni,
                                                              int has_qh) {
    const block_q4_K *b4 = w;
    const block_q5_K *b5 = w;
    const block_q8_K *bx[NM_DOT_MULTI_MAX];
    __m512 acc[NM_DOT_MULTI_MAX];
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) bx[j] = x[j], acc[j] = _mm512_setzero_ps();
    const int64_t nb = n / NM_QK_K;
    const __m512i m4 = _mm512_set1_epi8(0x0F), five = _mm512_set1_epi8(16);
    const __m512i nib_shift = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(4), 1);
    const __m512i ctl[4] = {vnni ? pack_words(0, 2, 0, 2, 1, 3, 1, 3) : lane_words(0, 0, 1, 1),
                            vnni ? pack_words(4, 6, 4, 6, 5, 7, 5, 7) : lane_words(2, 2, 3, 3),
                            lane_words(4, 4, 5, 5), lane_words(6, 6, 7, 7)};
    const __m512i hsel[4] = {bit_pair(0, 1), bit_pair(2, 3), bit_pair(4, 5), bit_pair(6, 7)};
    const __m512i dm_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512 dm_sign = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int64_t i = 0; i < nb; i++) {
        const void *blk = has_qh ? (const void *)&b5[i] : (const void *)&b4[i];
        nm_prefetch_weights(blk, has_qh ? sizeof b5[i] : sizeof b4[i]);
        const uint8_t *qs = has_qh ? b5[i].qs : b4[i].qs;
        /* d, dmin and the scales are the block's first 16 bytes */
        const __m128i head = _mm_loadu_si128((const __m128i *)blk);
        const __m512 dd8 = _mm512_permutexvar_ps(dm_idx, _mm512_castps128_ps512(_mm_cvtph_ps(head)));
        const __m512 dm = _mm512_mul_ps(dd8, dm_sign); /* d x 8, -dmin x 8 */
        const __m128i scm = nm_k4_scales_mins(head);
        const __m256i mins = nm_k4_mins16(scm);
        const __m256i sc = _mm256_castsi128_si256(_mm_cvtepu8_epi16(scm));
        const __m512i qh = has_qh ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)b5[i].qh))
                                  : _mm512_setzero_si512();
        __m512i u[4], s[4];
#pragma GCC unroll 8
        for (int c = 0; c < 4; c++) {
            const __m512i qq = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * c)));
            u[c] = _mm512_and_si512(_mm512_srlv_epi16(qq, nib_shift), m4);
            if (has_qh) u[c] = _mm512_mask_add_epi8(u[c], _mm512_test_epi8_mask(qh, hsel[c]), u[c], five);
            if (!vnni || c < 2) s[c] = lane_scales(ctl[c], sc);
        }
#pragma GCC unroll 8
        for (int j = 0; j < NX; j++) {
            const block_q8_K *y = &bx[j][i];
            const __m512i sumi = k_scaled_sum(_mm512_setzero_si512(), u, s, y->qs, vnni);
            const __m256i md = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *)y->bsums));
            /* [sumi lanes 8-15 | md], then lanes 0-7 += sumi lanes 0-7 */
            const __m512i t = _mm512_shuffle_i64x2(sumi, _mm512_castsi256_si512(md), _MM_SHUFFLE(1, 0, 3, 2));
            const __m512i folded = _mm512_mask_add_epi32(t, 0x00FF, t, sumi);
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(folded), _mm512_mul_ps(dm, _mm512_set1_ps(y->d)), acc[j]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) out[j] = hsum512(acc[j]);
}

/* Q6_K: unsigned q = stored q + 32 in [0, 63]. In half h, ql[64h .. +63]
 * low nibbles are elements 128h + 0..63 and high nibbles 128h + 64..127, in
 * order; the top bit pairs come from qh[32h + l] (pairs 0, 1 for the low
 * nibbles of ql[l], ql[l+32], pairs 2, 3 for the high ones). Each 128-bit
 * lane of a 64-element vector is one 16-element sub-block. The -32 offset
 * is sum_s (-32 sc_s) * bsums_s, which starts the row's integer sum. */
static inline __attribute__((always_inline)) void dot_q6_K_body(int NX, int64_t n, const void *w,
                                                                const void *const *x, float *out, int vnni,
                                                                int unused) {
    (void)unused; /* keeps the argument list of the other bodies */
    const block_q6_K *bw = w;
    const block_q8_K *bx[NM_DOT_MULTI_MAX];
    __m512 acc[NM_DOT_MULTI_MAX];
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) bx[j] = x[j], acc[j] = _mm512_setzero_ps();
    const int64_t nb = n / NM_QK_K;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i hmask_lo = _mm512_inserti64x4(_mm512_set1_epi8(0x03), _mm256_set1_epi8(0x0C), 1);
    const __m512i hshift_lo = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i hmask_hi = _mm512_inserti64x4(_mm512_set1_epi8(0x30), _mm256_set1_epi8((char)0xC0), 1);
    const __m512i hshift_hi = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
    const __m512i ctl[4] = {vnni ? pack_words(0, 4, 1, 5, 2, 6, 3, 7) : lane_words(0, 1, 2, 3),
                            vnni ? pack_words(8, 12, 9, 13, 10, 14, 11, 15) : lane_words(4, 5, 6, 7),
                            lane_words(8, 9, 10, 11), lane_words(12, 13, 14, 15)};
    for (int64_t i = 0; i < nb; i++) {
        nm_prefetch_weights(&bw[i], sizeof bw[i]);
        const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)bw[i].scales));
        const __m256i off_sc = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(sc, 5)); /* |.| <= 4096 */
        const float d = half_to_f32(bw[i].d);
        __m512i u[4], s[4]; /* u[2h] / u[2h + 1]: elements 128h + 0..63 / 64..127 */
#pragma GCC unroll 8
        for (int h = 0; h < 2; h++) {
            const __m512i ql = _mm512_loadu_si512(bw[i].ql + 64 * h);
            const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(bw[i].qh + 32 * h)));
            const __m512i top_lo = _mm512_sllv_epi16(_mm512_and_si512(qh, hmask_lo), hshift_lo);
            const __m512i top_hi = _mm512_srlv_epi16(_mm512_and_si512(qh, hmask_hi), hshift_hi);
            /* 0xEA: (a & b) | c */
            u[2 * h] = _mm512_ternarylogic_epi32(ql, m4, top_lo, 0xEA);
            u[2 * h + 1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), m4, top_hi, 0xEA);
        }
#pragma GCC unroll 8
        for (int k = 0; k < 4; k++)
            if (!vnni || k < 2) s[k] = lane_scales(ctl[k], sc);
#pragma GCC unroll 8
        for (int j = 0; j < NX; j++) {
            const block_q8_K *y = &bx[j][i];
            const __m256i off = _mm256_madd_epi16(off_sc, _mm256_loadu_si256((const __m256i *)y->bsums));
            const __m512i sumi = k_scaled_sum(_mm512_zextsi256_si512(off), u, s, y->qs, vnni);
            acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(d * y->d), _mm512_cvtepi32_ps(sumi), acc[j]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) out[j] = hsum512(acc[j]);
}

/* Q2_K and Q3_K (is_q3) share the 2-bit planes: bit pair 2j of qs[32h + l]
 * is element 128h + 32j + l. Each 32-byte half h of qs is broadcast to both
 * halves of a vector and shifted by 2j in the low and 2j + 2 in the high
 * half (vpsrlvw), which yields 64 consecutive elements per vector, each
 * 128-bit lane one 16-element sub-block. Q2_K: value d*sc*q - dmin*m with
 * q in [0, 3]. Q3_K: unsigned q = low bits + 4 * (bit 4h + j of hmask[l])
 * in [0, 7], offset -4, signed 6-bit scales. */
static inline __attribute__((always_inline)) float dot_k2_body(int64_t n, const void *w, const void *x, int vnni,
                                                               int is_q3) {
    const block_q2_K *b2 = w;
    const block_q3_K *b3 = w;
    const block_q8_K *bx = x;
    const int64_t nb = n / NM_QK_K;
    const __m512i m2 = _mm512_set1_epi8(0x03), four = _mm512_set1_epi8(4);
    const __m512i shift[2] = {_mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1),
                              _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1)};
    const __m512i ctl[4] = {lane_words(0, 1, 2, 3), lane_words(4, 5, 6, 7), lane_words(8, 9, 10, 11),
                            lane_words(12, 13, 14, 15)};
    const __m512i hsel[4] = {bit_pair(0, 1), bit_pair(2, 3), bit_pair(4, 5), bit_pair(6, 7)};
    __m512 acc = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        nm_prefetch_weights(is_q3 ? (const void *)&b3[i] : (const void *)&b2[i], is_q3 ? sizeof b3[i] : sizeof b2[i]);
        const __m256i bsums = _mm256_loadu_si256((const __m256i *)bx[i].bsums);
        __m256i sc16;
        __m512i sumi;
        __m512 d;
        if (is_q3) {
            sc16 = _mm256_cvtepi8_epi16(nm_q3_scales(nm_q3_scales_load(&b3[i])));
            const __m256i off = _mm256_madd_epi16(sc16, bsums);
            sumi = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 2)));
            d = _mm512_set1_ps(half_to_f32(b3[i].d) * bx[i].d);
        } else {
            const __m128i raw = _mm_loadu_si128((const __m128i *)b2[i].scales);
            sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, _mm_set1_epi8(0x0F)));
            const __m256i mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F)));
            /* d and dmin are adjacent halves */
            uint32_t dpair;
            __builtin_memcpy(&dpair, &b2[i].d, sizeof dpair);
            const __m128 dd = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int)dpair)), _mm_set1_ps(bx[i].d));
            /* the mins are per 16-element sub-block, exactly what bsums sum */
            accm = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)),
                                   _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bsums)), accm);
            sumi = _mm512_setzero_si512();
            d = _mm512_broadcastss_ps(dd);
        }
        const uint8_t *qs = is_q3 ? b3[i].qs : b2[i].qs;
        const __m512i hm = is_q3 ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)b3[i].hmask))
                                 : _mm512_setzero_si512();
        #pragma GCC unroll 8
        for (int v = 0; v < 4; v++) {
            const __m512i qq = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * (v / 2))));
            __m512i u = _mm512_and_si512(_mm512_srlv_epi16(qq, shift[v % 2]), m2);
            if (is_q3) u = _mm512_mask_add_epi8(u, _mm512_test_epi8_mask(hm, hsel[v]), u, four);
            const __m512i p = _mm512_maddubs_epi16(u, _mm512_loadu_si512(bx[i].qs + 64 * v));
            sumi = mac_s16(sumi, p, lane_scales(ctl[v], sc16), vnni);
        }
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
    }
    return hsum512(acc) - hsum256(accm);
}

/* ---- the two flavours ------------------------------------------------------ */

#define FLAVOURS(name, body)                                                                                 \
    static float name##_avx512(int64_t n, const void *w, const void *x) { return body(n, w, x, 0); }          \
    static float name##_vnni(int64_t n, const void *w, const void *x) { return body(n, w, x, 1); }
/* Bodies shared by two formats take the format as a last constant. */
#define FLAVOURS_OF(name, body, fmt)                                                                         \
    static float name##_avx512(int64_t n, const void *w, const void *x) { return body(n, w, x, 0, fmt); }     \
    static float name##_vnni(int64_t n, const void *w, const void *x) { return body(n, w, x, 1, fmt); }

FLAVOURS(dot_q8_0, dot_q8_0_body)
FLAVOURS(dot_q4_0, dot_q4_0_body)
FLAVOURS(dot_q4_1, dot_q4_1_body)
FLAVOURS(dot_q5_0, dot_q5_0_body)
FLAVOURS(dot_q5_1, dot_q5_1_body)
FLAVOURS(dot_q8_K, dot_q8_K_body)
FLAVOURS_OF(dot_q2_K, dot_k2_body, 0)
FLAVOURS_OF(dot_q3_K, dot_k2_body, 1)
/* single dots that are the one-row case of a multi-row body */
#define FLAVOURS_OF_MULTI(name, body, fmt)                                                                   \
    static float name##_avx512(int64_t n, const void *w, const void *x) {                                    \
        float r;                                                                                             \
        body(1, n, w, &x, &r, 0, fmt);                                                                       \
        return r;                                                                                            \
    }                                                                                                        \
    static float name##_vnni(int64_t n, const void *w, const void *x) {                                      \
        float r;                                                                                             \
        body(1, n, w, &x, &r, 1, fmt);                                                                       \
        return r;                                                                                            \
    }
FLAVOURS_OF_MULTI(dot_q4_K, dot_k4_body, 0)
FLAVOURS_OF_MULTI(dot_q5_K, dot_k4_body, 1)
FLAVOURS_OF_MULTI(dot_q6_K, dot_q6_K_body, 0)

nm_vec_dot_fn nm_dot_table_avx512(int type) {
    switch (type) {
    case NM_TYPE_F32: return dot_f32;
    case NM_TYPE_F16: return dot_f16;
    case NM_TYPE_BF16: return dot_bf16;
    case NM_TYPE_Q4_0: return dot_q4_0_avx512;
    case NM_TYPE_Q4_1: return dot_q4_1_avx512;
    case NM_TYPE_Q5_0: return dot_q5_0_avx512;
    case NM_TYPE_Q5_1: return dot_q5_1_avx512;
    case NM_TYPE_Q8_0: return dot_q8_0_avx512;
    case NM_TYPE_Q2_K: return dot_q2_K_avx512;
    case NM_TYPE_Q3_K: return dot_q3_K_avx512;
    case NM_TYPE_Q4_K: return dot_q4_K_avx512;
    case NM_TYPE_Q5_K: return dot_q5_K_avx512;
    case NM_TYPE_Q6_K: return dot_q6_K_avx512;
    case NM_TYPE_Q8_K: return dot_q8_K_avx512;
    default: return NULL;
    }
}

/* The float formats have no integer step, so they fall back to the plain
 * AVX-512 table through nm_vec_dot_for. */
nm_vec_dot_fn nm_dot_table_avx512vnni(int type) {
    switch (type) {
    case NM_TYPE_Q4_0: return dot_q4_0_vnni;
    case NM_TYPE_Q4_1: return dot_q4_1_vnni;
    case NM_TYPE_Q5_0: return dot_q5_0_vnni;
    case NM_TYPE_Q5_1: return dot_q5_1_vnni;
    case NM_TYPE_Q8_0: return dot_q8_0_vnni;
    case NM_TYPE_Q2_K: return dot_q2_K_vnni;
    case NM_TYPE_Q3_K: return dot_q3_K_vnni;
    case NM_TYPE_Q4_K: return dot_q4_K_vnni;
    case NM_TYPE_Q5_K: return dot_q5_K_vnni;
    case NM_TYPE_Q6_K: return dot_q6_K_vnni;
    case NM_TYPE_Q8_K: return dot_q8_K_vnni;
    default: return NULL;
    }
}

/* ---- several activation rows per weight row (nm_vec_dot_multi_fn) --------- *
 *
 * A GEMM calls the dot once per (weight row, token), and the single dots
 * above spend most of their instructions on the weight side: unpacking
 * nibbles and fifth/sixth bits, decoding the 6-bit sub-block scales and
 * spreading them over lanes, converting fp16 scales. The kernels below are
 * those dots turned inside out: per weight block, first everything that
 * depends on the weights only, then for each of NX activation rows only the
 * part that depends on the row (its multiplies and its scale), into that
 * row's own accumulator. NX is a compile-time constant (the entry points
 * switch over nx), so the loops over rows unroll and every accumulator
 * lives in a register: at NX = 8 the K-quants hold 4 unpacked vectors, 2-4
 * spread scale vectors, 8 accumulators and a few temporaries, within the
 * 32 zmm registers (the init and final loops over rows are unrolled too:
 * otherwise the accumulators are arrays in memory, zeroed per call).
 *
 * Bit-identical to the single dots: the K-quants' single dots are the
 * NX = 1 instances of the bodies above; the 32-element formats below
 * compute the same exact integer sums as their single dots and, per row,
 * the same float operations in the same order (block scale products, one
 * FMA per pair of blocks into the same lane layout, the same reduction).
 *
 * Measured on the 2-core EPYC (Zen 4) this was tuned on, one thread, rows
 * of DeepSeek-V2-Lite's shapes, ns per (row, token): Q4_K (2048) single
 * 28.8 before the K-quant rework / 25.7 now, 12.5 at NX = 8; Q5_0 (1408)
 * 36.1 single, 18.3 at NX = 8; Q8_0 (2048) 38.4, 20.5; Q6_K (2048) 23.8,
 * 12.0. */

enum { MULTI_Q8_0, MULTI_Q4_0, MULTI_Q5_0 };

/* Blocks i and i + 1 (upper half zero when !two) of a symmetric
 * 32-element format as signed bytes, q - 8 / q - 16 for Q4_0 / Q5_0 (the
 * padding half of a lone block is -8 / -16, which meets zero activations). */
static inline __m512i legacy_signed_2x32(const void *w, int64_t i, int two, int fmt) {
    if (fmt == MULTI_Q8_0) {
        const block_q8_0 *b = w;
        return load_2x32(b[i].qs, b[i + two].qs, two);
    }
    if (fmt == MULTI_Q4_0) {
        const block_q4_0 *b = w;
        return _mm512_sub_epi8(nibbles_2x32(b[i].qs, b[i + two].qs, two), _mm512_set1_epi8(8));
    }
    const block_q5_0 *b = w;
    __m512i u = nibbles_2x32(b[i].qs, b[i + two].qs, two);
    u = _mm512_mask_add_epi8(u, bits_2x32(b[i].qh, b[i + two].qh, two), u, _mm512_set1_epi8(16));
    return _mm512_sub_epi8(u, _mm512_set1_epi8(16));
}

static inline size_t legacy_multi_size(int fmt) {
    return fmt == MULTI_Q8_0 ? sizeof(block_q8_0) : fmt == MULTI_Q4_0 ? sizeof(block_q4_0) : sizeof(block_q5_0);
}

/* Q8_0, Q4_0, Q5_0 (all start with their fp16 d), two blocks per vector
 * as in their single dots. The weights become signed bytes once per pair
 * of blocks, split into |q| and a sign mask; each row then costs one
 * masked negate and one multiply (mac_s8s8 with the weight half hoisted;
 * Q4_0/Q5_0's single dots subtract the offset's product instead, the same
 * exact integer). The scales dw * dx of rows j and j + 1 come from one
 * conversion of their four fp16 dx and one multiply, each row's pair then
 * spread over its lanes as scales_2 does: the same products. */
static inline __attribute__((always_inline)) void dot_legacy_multi(int NX, int64_t n, const void *w,
                                                                   const void *const *x, float *out, int vnni,
                                                                   int fmt) {
    const block_q8_0 *bx[NM_DOT_MULTI_MAX];
    __m512 acc[NM_DOT_MULTI_MAX];
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) bx[j] = x[j], acc[j] = _mm512_setzero_ps();
    const __m512i spread[2] = {_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                               _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3)};
    const size_t bs = legacy_multi_size(fmt);
    const int64_t nb = n / NM_QK8_0;
    for (int64_t i = 0; i < nb; i += 2) {
        const uint8_t *blk = (const uint8_t *)w + (size_t)i * bs;
        nm_prefetch_weights(blk, 2 * bs);
        const int two = i + 1 < nb;
        const __m512i q = legacy_signed_2x32(w, i, two, fmt);
        const __m512i aq = _mm512_abs_epi8(q);
        const __mmask64 neg = _mm512_movepi8_mask(q);
        nm_half d0, d1 = 0;
        __builtin_memcpy(&d0, blk, sizeof d0);
        if (two) __builtin_memcpy(&d1, blk + bs, sizeof d1);
        const uint64_t dd = (uint64_t)d0 | (uint64_t)d1 << 16;
        const __m128 wf = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)(dd | dd << 32))); /* dw0 dw1 dw0 dw1 */
#pragma GCC unroll 8
        for (int j = 0; j < NX; j += 2) {
            const int rows = j + 1 < NX ? 2 : 1;
            uint64_t h = 0; /* dx0, dx1 of row j, then of row j + 1 */
#pragma GCC unroll 2
            for (int k = 0; k < rows; k++) {
                const block_q8_0 *x0 = &bx[j + k][i];
                h |= ((uint64_t)x0->d | (uint64_t)(two ? x0[1].d : 0) << 16) << (32 * k);
            }
            const __m128 sc = _mm_mul_ps(wf, _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h)));
#pragma GCC unroll 2
            for (int k = 0; k < rows; k++) {
                const block_q8_0 *x0 = &bx[j + k][i], *x1 = two ? x0 + 1 : x0;
                const __m512i y = load_2x32(x0->qs, x1->qs, two);
                const __m512i sy = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
                const __m512i sumi = mac_u8s8(_mm512_setzero_si512(), aq, sy, vnni);
                acc[j + k] = _mm512_fmadd_ps(_mm512_permutexvar_ps(spread[k], _mm512_castps128_ps512(sc)),
                                             _mm512_cvtepi32_ps(sumi), acc[j + k]);
            }
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NX; j++) out[j] = hsum512(acc[j]);
}

/* nx (2..NM_DOT_MULTI_MAX) as a constant for the body; one row takes the
 * format's single dot (for the K-quants the same body at NX = 1; the
 * legacy formats' own single dots need fewer instructions per block). */
#define MULTI_NX(single, body, ...)                                                                            \
    switch (nx) {                                                                                              \
    case 1: out[0] = single(n, w, x[0]); break;                                                                \
    case 2: body(2, __VA_ARGS__); break;                                                                       \
    case 3: body(3, __VA_ARGS__); break;                                                                       \
    case 4: body(4, __VA_ARGS__); break;                                                                       \
    case 5: body(5, __VA_ARGS__); break;                                                                       \
    case 6: body(6, __VA_ARGS__); break;                                                                       \
    case 7: body(7, __VA_ARGS__); break;                                                                       \
    case 8: body(8, __VA_ARGS__); break;                                                                       \
    default: break;                                                                                            \
    }
static_assert(NM_DOT_MULTI_MAX == 8, "MULTI_NX lists every nx up to NM_DOT_MULTI_MAX");

#define MULTI_FLAVOURS_OF(name, single, body, fmt)                                                             \
    static void name##_avx512(int64_t n, const void *w, const void *const *x, int nx, float *out) {           \
        MULTI_NX(single##_avx512, body, n, w, x, out, 0, fmt)                                                  \
    }                                                                                                          \
    static void name##_vnni(int64_t n, const void *w, const void *const *x, int nx, float *out) {             \
        MULTI_NX(single##_vnni, body, n, w, x, out, 1, fmt)                                                    \
    }

MULTI_FLAVOURS_OF(multi_q8_0, dot_q8_0, dot_legacy_multi, MULTI_Q8_0)
MULTI_FLAVOURS_OF(multi_q4_0, dot_q4_0, dot_legacy_multi, MULTI_Q4_0)
MULTI_FLAVOURS_OF(multi_q5_0, dot_q5_0, dot_legacy_multi, MULTI_Q5_0)
MULTI_FLAVOURS_OF(multi_q4_K, dot_q4_K, dot_k4_body, 0)
MULTI_FLAVOURS_OF(multi_q5_K, dot_q5_K, dot_k4_body, 1)
MULTI_FLAVOURS_OF(multi_q6_K, dot_q6_K, dot_q6_K_body, 0)

/* The rest loop over their single dots. */
NM_DOT_MULTI_BY_LOOP(multi_f32, dot_f32)
NM_DOT_MULTI_BY_LOOP(multi_f16, dot_f16)
NM_DOT_MULTI_BY_LOOP(multi_bf16, dot_bf16)
NM_DOT_MULTI_BY_LOOP(multi_q4_1_avx512, dot_q4_1_avx512)
NM_DOT_MULTI_BY_LOOP(multi_q4_1_vnni, dot_q4_1_vnni)
NM_DOT_MULTI_BY_LOOP(multi_q5_1_avx512, dot_q5_1_avx512)
NM_DOT_MULTI_BY_LOOP(multi_q5_1_vnni, dot_q5_1_vnni)
NM_DOT_MULTI_BY_LOOP(multi_q2_K_avx512, dot_q2_K_avx512)
NM_DOT_MULTI_BY_LOOP(multi_q2_K_vnni, dot_q2_K_vnni)
NM_DOT_MULTI_BY_LOOP(multi_q3_K_avx512, dot_q3_K_avx512)
NM_DOT_MULTI_BY_LOOP(multi_q3_K_vnni, dot_q3_K_vnni)
NM_DOT_MULTI_BY_LOOP(multi_q8_K_avx512, dot_q8_K_avx512)
NM_DOT_MULTI_BY_LOOP(multi_q8_K_vnni, dot_q8_K_vnni)

nm_vec_dot_multi_fn nm_dot_multi_table_avx512(int type) {
    switch (type) {
    case NM_TYPE_F32: return multi_f32;
    case NM_TYPE_F16: return multi_f16;
    case NM_TYPE_BF16: return multi_bf16;
    case NM_TYPE_Q4_0: return multi_q4_0_avx512;
    case NM_TYPE_Q4_1: return multi_q4_1_avx512;
    case NM_TYPE_Q5_0: return multi_q5_0_avx512;
    case NM_TYPE_Q5_1: return multi_q5_1_avx512;
    case NM_TYPE_Q8_0: return multi_q8_0_avx512;
    case NM_TYPE_Q2_K: return multi_q2_K_avx512;
    case NM_TYPE_Q3_K: return multi_q3_K_avx512;
    case NM_TYPE_Q4_K: return multi_q4_K_avx512;
    case NM_TYPE_Q5_K: return multi_q5_K_avx512;
    case NM_TYPE_Q6_K: return multi_q6_K_avx512;
    case NM_TYPE_Q8_K: return multi_q8_K_avx512;
    default: return NULL;
    }
}

nm_vec_dot_multi_fn nm_dot_multi_table_avx512vnni(int type) {
    switch (type) {
    case NM_TYPE_Q4_0: return multi_q4_0_vnni;
    case NM_TYPE_Q4_1: return multi_q4_1_vnni;
    case NM_TYPE_Q5_0: return multi_q5_0_vnni;
    case NM_TYPE_Q5_1: return multi_q5_1_vnni;
    case NM_TYPE_Q8_0: return multi_q8_0_vnni;
    case NM_TYPE_Q2_K: return multi_q2_K_vnni;
    case NM_TYPE_Q3_K: return multi_q3_K_vnni;
    case NM_TYPE_Q4_K: return multi_q4_K_vnni;
    case NM_TYPE_Q5_K: return multi_q5_K_vnni;
    case NM_TYPE_Q6_K: return multi_q6_K_vnni;
    case NM_TYPE_Q8_K: return multi_q8_K_vnni;
    default: return NULL;
    }
}
