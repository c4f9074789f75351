/* quant.h - ggml-compatible tensor element types: block layouts, type traits,
 * row (de)quantisation and weight-row x activation dot products.
 *
 * Every layout here is bit-exact with ggml's definitions (ggml-common.h) so
 * numoe reads llama.cpp GGUF files as they are. Blocks run along a row
 * (GGUF ne[0]); a row of n elements holds n / block_size blocks.
 *
 * Dot products: a weight row of type T is multiplied with an activation row
 * already converted to T's "vec_dot_type" (Q8_0 for the 32-element legacy
 * formats, Q8_K for the 256-element K-quants, F32 for the float formats).
 * The activation is converted once per GEMV and reused for every weight row,
 * which is why the conversion is separate from the dot.
 */
#ifndef NUMOE_KERNELS_QUANT_H
#define NUMOE_KERNELS_QUANT_H

#include <assert.h>
#include <stddef.h>
#include <stdint.h>

#include "common/ggml_type.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NM_QK4_0 32
#define NM_QK4_1 32
#define NM_QK5_0 32
#define NM_QK5_1 32
#define NM_QK8_0 32
#define NM_QK_K 256
#define NM_K_SCALE_SIZE 12

/* fp16 values are stored as raw IEEE half bits; see fp16.h for conversion. */
typedef uint16_t nm_half;

typedef struct { nm_half d; uint8_t qs[NM_QK4_0 / 2]; } block_q4_0;
typedef struct { nm_half d, m; uint8_t qs[NM_QK4_1 / 2]; } block_q4_1;
typedef struct { nm_half d; uint8_t qh[4]; uint8_t qs[NM_QK5_0 / 2]; } block_q5_0;
typedef struct { nm_half d, m; uint8_t qh[4]; uint8_t qs[NM_QK5_1 / 2]; } block_q5_1;
typedef struct { nm_half d; int8_t qs[NM_QK8_0]; } block_q8_0;
typedef struct { uint8_t scales[NM_QK_K / 16]; uint8_t qs[NM_QK_K / 4]; nm_half d, dmin; } block_q2_K;
typedef struct { uint8_t hmask[NM_QK_K / 8]; uint8_t qs[NM_QK_K / 4]; uint8_t scales[12]; nm_half d; } block_q3_K;
typedef struct { nm_half d, dmin; uint8_t scales[NM_K_SCALE_SIZE]; uint8_t qs[NM_QK_K / 2]; } block_q4_K;
typedef struct { nm_half d, dmin; uint8_t scales[NM_K_SCALE_SIZE]; uint8_t qh[NM_QK_K / 8]; uint8_t qs[NM_QK_K / 2]; } block_q5_K;
typedef struct { uint8_t ql[NM_QK_K / 2]; uint8_t qh[NM_QK_K / 4]; int8_t scales[NM_QK_K / 16]; nm_half d; } block_q6_K;
/* Activation-side only (mainline ggml layout, 292 bytes); never read from files. */
typedef struct { float d; int8_t qs[NM_QK_K]; int16_t bsums[NM_QK_K / 16]; } block_q8_K;

static_assert(sizeof(block_q4_0) == 18, "block_q4_0 size");
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 size");
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 size");
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 size");
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 size");
static_assert(sizeof(block_q2_K) == 84, "block_q2_K size");
static_assert(sizeof(block_q3_K) == 110, "block_q3_K size");
static_assert(sizeof(block_q4_K) == 144, "block_q4_K size");
static_assert(sizeof(block_q5_K) == 176, "block_q5_K size");
static_assert(sizeof(block_q6_K) == 210, "block_q6_K size");
static_assert(sizeof(block_q8_K) == 292, "block_q8_K size");

/* Dot product of one weight row (n elements, type T) with one activation row
 * already in T's vec_dot_type. n is a multiple of T's block size. */
typedef float (*nm_vec_dot_fn)(int64_t n, const void *w, const void *x);


/* Row conversions. n must be a multiple of the block size. Return 0 on
 * success, -1 if the type cannot be (de)quantised by numoe. */
int nm_dequantize_row(int type, const void *src, float *dst, int64_t n);
int nm_quantize_row(int type, const float *src, void *dst, int64_t n);
/* The activation quantisers' AVX-512 paths (kernels/quantize_avx512.c), nb
 * blocks each: the scalar reference's bytes for finite inputs, bit for bit.
 * nm_quantize_row takes them where nm_isa_best() reaches AVX-512. */
void nm_quant_q8_K_avx512(const float *x, void *dst, int64_t nb);
void nm_quant_q8_0_avx512(const float *x, void *dst, int64_t nb);
/* The scalar reference of nm_quantize_row, whatever the CPU (tests). */
int nm_quantize_row_ref(int type, const float *src, void *dst, int64_t n);

/* Scalar reference dot for a weight type (NULL if none). */
nm_vec_dot_fn nm_vec_dot_ref(int type);

/* Instruction-set levels with their own dot paths. */
typedef enum {
    NM_ISA_SCALAR = 0,
    NM_ISA_AVX2 = 1,        /* AVX2 + FMA + F16C */
    NM_ISA_AVX512 = 2,      /* AVX-512 F/BW/VL/DQ */
    NM_ISA_AVX512_VNNI = 3, /* + AVX512-VNNI */
    NM_ISA_COUNT
} nm_isa;

const char *nm_isa_name(nm_isa isa);
/* Best level this CPU supports (cpuid), lowered by env NUMOE_ISA=scalar|avx2|avx512|avx512vnni|amx
 * (amx: the avx512vnni level plus the AMX tiles below; an unknown or unsupported value is
 * reported on stderr with the level used instead). */
nm_isa nm_isa_best(void);
/* NULL, or one line naming an NUMOE_ISA value that is no level at all (a typo): the commands
 * refuse to start on it (launch/main.c), where the library only warns and runs the best level. */
const char *nm_isa_env_error(void);
/* Intel AMX-INT8 (the tile GEMM of kernels/tile.h, nm_tile_gemm_many) is no level of its own
 * (the dot tables stop at avx512vnni) but a unit beside it: 1 where this process may run tile
 * instructions: cpuid 7.0 EDX bits 24, 25 (AMX-TILE, AMX-INT8), the OS enables the tile state
 * (XCR0 bits 17, 18: XTILECFG, XTILEDATA), the CPU reaches avx512vnni, Linux granted the
 * process the tile data (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked once,
 * here, before any thread uses a tile) and NUMOE_ISA is unset, empty or amx: naming any
 * lower level turns AMX off. nm_isa_amx_why_not: NULL where nm_isa_amx() is 1, else why not
 * (one line, for messages: "AMX not available: ..."). */
int nm_isa_amx(void);
const char *nm_isa_amx_why_not(void);
/* Whether the running CPU can execute code for this level. */
int nm_isa_supported(nm_isa isa);
/* Dot for a weight type at a given level; falls back to the next lower level
 * that has a path for this type. NULL only if the type has no dot at all. */
nm_vec_dot_fn nm_vec_dot_for(int type, nm_isa isa);
/* nm_vec_dot_for(type, nm_isa_best()), cached. */
nm_vec_dot_fn nm_vec_dot(int type);

/* Several activation rows per weight row: out[j] = dot(w, x[j]) for j < nx,
 * 1 <= nx <= NM_DOT_MULTI_MAX, each x[j] a row in the weight type's
 * vec_dot_type (anywhere at its fields' natural alignment; rows may repeat,
 * as the single dot allows). A GEMM spends most of its
 * time unpacking weight blocks (nibbles, 6-bit scales and mins, fp16
 * scales); the multi kernels unpack each block once and apply it to all nx
 * rows, keeping one accumulator per row in registers.
 *
 * Results are bit-identical to nx calls of the single dot that
 * nm_vec_dot_for returns for the same type and level: the integer parts are
 * exact, and the float operations per row are the same ones in the same
 * order (test_dot_simd checks this). Where a level has no specialised
 * kernel for a type, its multi is a loop over that level's single dot, so
 * nm_vec_dot_multi_for(type, isa) exists exactly when nm_vec_dot_for(type,
 * isa) does. For one row the single dot is the fast path (decode). */
#define NM_DOT_MULTI_MAX 8
typedef void (*nm_vec_dot_multi_fn)(int64_t n, const void *w, const void *const *x, int nx, float *out);

/* Scalar reference: a loop over nm_vec_dot_ref (NULL if the type has none). */
nm_vec_dot_multi_fn nm_vec_dot_multi_ref(int type);
/* The multi dot matching nm_vec_dot_for(type, isa); NULL where that is NULL. */
nm_vec_dot_multi_fn nm_vec_dot_multi_for(int type, nm_isa isa);
/* nm_vec_dot_multi_for(type, nm_isa_best()). */
nm_vec_dot_multi_fn nm_vec_dot_multi(int type);

#ifdef __cplusplus
}
#endif

#endif
