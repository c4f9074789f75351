/* dot_simd.h - per-ISA tables of the SIMD weight-row dots (internal).
 *
 * dot_avx2.c and dot_avx512.c are compiled with their ISA flags, so even the
 * table lookups below may contain AVX instructions: call them only after
 * nm_isa_supported() said yes for that level (cpu_isa.c does). Each returns
 * NULL for a type that level has no path of its own for; nm_vec_dot_for then
 * falls back to the next lower level.
 *
 * Activation types are those of quant.h: F32 for F32/F16/BF16 weights, Q8_0
 * for the 32-element formats, Q8_K for the K-quants and Q8_K itself. */
#ifndef NUMOE_KERNELS_DOT_SIMD_H
#define NUMOE_KERNELS_DOT_SIMD_H

#include <stddef.h>

#include "kernels/quant.h"

nm_vec_dot_fn nm_dot_table_avx2(int type);       /* AVX2 + FMA + F16C */
nm_vec_dot_fn nm_dot_table_avx512(int type);     /* AVX-512 F/BW/VL/DQ */
nm_vec_dot_fn nm_dot_table_avx512vnni(int type); /* + AVX512-VNNI */

/* The multi-row dots (quant.h) of each level: for every type its single
 * table above has, either a kernel of its own or NM_DOT_MULTI_BY_LOOP over
 * that level's single dot, and NULL for the others, so the fallback in
 * nm_vec_dot_multi_for stops at the same level as nm_vec_dot_for. */
nm_vec_dot_multi_fn nm_dot_multi_table_avx2(int type);
nm_vec_dot_multi_fn nm_dot_multi_table_avx512(int type);
nm_vec_dot_multi_fn nm_dot_multi_table_avx512vnni(int type);

/* Defines `multi` as nx calls of the single dot `single`. */
#define NM_DOT_MULTI_BY_LOOP(multi, single)                                                                  \
    static void multi(int64_t n, const void *w, const void *const *x, int nx, float *out) {                  \
        for (int j_ = 0; j_ < nx; j_++) out[j_] = single(n, w, x[j_]);                                       \
    }

#if defined(__AVX2__) && defined(__F16C__)
/* Helpers shared by the SIMD files (both compiled with at least AVX2 + F16C;
 * this part is invisible to files without those flags). */
#include <immintrin.h>
#include <stdint.h>

/* Weight rows are streamed once per GEMV. The hardware prefetcher follows
 * the stream, but a kernel busy unpacking keeps few loads in flight;
 * prefetching a fixed distance ahead (into the next row at a row's end,
 * which the same thread reads next) keeps memory busy. Measured on a
 * 16-core Xeon: one thread reads 16.7 GB/s with it, 8.5 without; 4 KiB
 * ahead beat 2 KiB by 5-15% on one thread and tied on 16; on an EPYC, 1-4
 * KiB tied except F16 (+20%). Prefetches never fault, so running past the
 * last row is harmless; the address is formed as an integer to stay clear
 * of out-of-object pointer arithmetic. */
#ifndef NM_PREFETCH_DIST
#define NM_PREFETCH_DIST 4096 /* -DNM_PREFETCH_DIST=N for experiments */
#endif

static inline void nm_prefetch_weights(const void *p, size_t bytes) {
#pragma GCC unroll 4
    for (size_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)((uintptr_t)p + NM_PREFETCH_DIST + o), _MM_HINT_T0);
}

/* Q4_K/Q5_K: from the first 16 bytes of a block (d, dmin, scales[12]) the
 * 8 six-bit scales (bytes 0-7) and mins (bytes 8-15) of nm_k4_scale_min:
 * scales/mins 0-3 are the low 6 bits of bytes 0-3 / 4-7; 4-7 take their low
 * 4 bits from the low / high nibbles of bytes 8-11 and their top 2 bits from
 * the spare top bits of bytes 0-3 / 4-7. */
static inline __m128i nm_k4_scales_mins(__m128i head) {
    const __m128i s07 = _mm_shuffle_epi8(head, _mm_setr_epi8(4, 5, 6, 7, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    const __m128i s811 = _mm_shuffle_epi8(head, _mm_setr_epi8(12, 13, 14, 15, 12, 13, 14, 15, 12, 13, 14, 15, 12, 13, 14, 15));
    const __m128i low = _mm_and_si128(s07, _mm_set1_epi8(0x3F));
    const __m128i nib = _mm_and_si128(_mm_srlv_epi32(s811, _mm_setr_epi32(0, 4, 0, 4)), _mm_set1_epi8(0x0F));
    const __m128i high = _mm_or_si128(nib, _mm_and_si128(_mm_srli_epi16(s07, 2), _mm_set1_epi8(0x30)));
    return _mm_unpacklo_epi32(low, high);
}

/* sum_j min_j * (activation sum of 32-element sub-block j), as 8 int32
 * partial sums: the min is constant over a sub-block, so its part of the dot
 * is min * (sum of the sub-block's activations), which Q8_K already holds
 * as two 16-element bsums per sub-block; each min is paired with both.
 * nm_k4_mins16 is the weight half (each min twice, as int16), shared by the
 * multi-row kernels across rows. */
static inline __m256i nm_k4_mins16(__m128i scm) {
    const __m128i dup = _mm_shuffle_epi8(scm, _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15));
    return _mm256_cvtepu8_epi16(dup);
}

static inline __m256i nm_k4_min_dot(__m128i scm, const int16_t bsums[16]) {
    return _mm256_madd_epi16(nm_k4_mins16(scm), _mm256_loadu_si256((const __m256i *)bsums));
}

/* Q3_K: the 16 signed 6-bit scales (see nm_unpack_q3_K) from 16 bytes whose
 * bytes 4-15 are the block's scales[12]: scale s takes its low 4 bits from
 * the low (s < 8) or high nibble of byte s % 8, its top 2 bits from bit pair
 * s / 4 of byte 8 + s % 4, and is biased by 32. */
static inline __m128i nm_q3_scales(__m128i v) {
    const __m128i ab = _mm_shuffle_epi8(v, _mm_setr_epi8(4, 5, 6, 7, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    const __m128i cc = _mm_shuffle_epi8(v, _mm_setr_epi8(12, 13, 14, 15, 12, 13, 14, 15, 12, 13, 14, 15, 12, 13, 14, 15));
    const __m128i low = _mm_and_si128(_mm_srlv_epi32(ab, _mm_setr_epi32(0, 0, 4, 4)), _mm_set1_epi8(0x0F));
    const __m128i top = _mm_and_si128(_mm_srlv_epi32(cc, _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(0x03));
    return _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(top, 4)), _mm_set1_epi8(32));
}

/* The 16 bytes ending with Q3_K's scales (bytes 92-107 of its 110). */
static inline __m128i nm_q3_scales_load(const block_q3_K *b) {
    return _mm_loadu_si128((const __m128i *)((const uint8_t *)b + offsetof(block_q3_K, scales) - 4));
}
#endif

#endif
