/* ggml_type.h - the ggml element types a GGUF tensor may have: ids, names,
 * block geometry and what numoe can compute with each (common/ggml_type.c).
 *
 * The table lives here, below the kernels, because the GGUF reader needs the
 * sizes to check and skip tensors and must not depend on the compute code;
 * the block layouts themselves are in kernels/quant.h, whose static asserts
 * tie each block struct to the byte size listed here. */
#ifndef NUMOE_COMMON_GGML_TYPE_H
#define NUMOE_COMMON_GGML_TYPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ggml_type ids as stored in GGUF tensor infos. */
typedef enum {
    NM_TYPE_F32 = 0,
    NM_TYPE_F16 = 1,
    NM_TYPE_Q4_0 = 2,
    NM_TYPE_Q4_1 = 3,
    NM_TYPE_Q5_0 = 6,
    NM_TYPE_Q5_1 = 7,
    NM_TYPE_Q8_0 = 8,
    NM_TYPE_Q8_1 = 9,
    NM_TYPE_Q2_K = 10,
    NM_TYPE_Q3_K = 11,
    NM_TYPE_Q4_K = 12,
    NM_TYPE_Q5_K = 13,
    NM_TYPE_Q6_K = 14,
    NM_TYPE_Q8_K = 15,
    NM_TYPE_BF16 = 30,
    NM_TYPE_COUNT = 40 /* ids below this are "known to ggml"; see nm_type_traits_of */
} nm_type;

typedef struct {
    const char *name;       /* "Q4_K" ... as ggml/gguf names it */
    int64_t block_size;     /* elements per block */
    size_t type_size;       /* bytes per block */
    int can_dequantize;     /* numoe can turn it into float */
    int can_quantize;       /* nm_quantize_row supports it */
    nm_type vec_dot_type;   /* activation type its dot expects */
} nm_type_traits;

/* NULL for ids numoe does not know (callers report "unsupported type N"). */
const nm_type_traits *nm_type_traits_of(int type);
const char *nm_type_name(int type); /* "type#N" style string for unknown ids (static buffer-free: returns "unknown") */

/* Bytes of a row of n elements; 0 if type is unknown or n is not a multiple of
 * the block size. Callers that read files must check for 0 (and overflow,
 * see nm_tensor_bytes in common/gguf.c). */
size_t nm_row_size(int type, int64_t n);

#ifdef __cplusplus
}
#endif

#endif
