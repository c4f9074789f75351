/* ggml_type.c - the table of ggml element types: names, block geometry and
 * what numoe can do with each.
 *
 * Every ggml type id below NM_TYPE_COUNT that current ggml defines is listed
 * with its block size and bytes per block (ggml.c type_traits; gguf-py's
 * GGML_QUANT_SIZES agrees except for Q8_1, which it still sizes at an old 40
 * bytes where ggml's block_q8_1 {half d, s; int8 qs[32]} is 36), so the GGUF
 * reader can size and skip tensors of any type a file may hold. Only the types with can_dequantize set can be
 * computed with; for the others vec_dot_type is the type itself (numoe has no
 * dot for them). Ids ggml removed (31-33, 36-38: the old Q4_0_4_4-style
 * repacks) are unknown.
 *
 * This file depends on nothing but libc: the GGUF reader and its fuzz target
 * use it without the kernels. Block sizes are the bytes of ggml's block
 * structs (kernels/quant.h asserts its structs have exactly these sizes). */
#include "common/ggml_type.h"

#include <stdint.h>

/* ggml ids without an nm_type name (known sizes, no numoe compute). */
enum {
    ID_IQ2_XXS = 16, ID_IQ2_XS = 17, ID_IQ3_XXS = 18, ID_IQ1_S = 19, ID_IQ4_NL = 20,
    ID_IQ3_S = 21, ID_IQ2_S = 22, ID_IQ4_XS = 23, ID_I8 = 24, ID_I16 = 25, ID_I32 = 26,
    ID_I64 = 27, ID_F64 = 28, ID_IQ1_M = 29, ID_TQ1_0 = 34, ID_TQ2_0 = 35, ID_MXFP4 = 39,
};

/* A type numoe computes with: dequantise always, quantise if q, dot in vdt. */
#define COMPUTE(id, nm, bs, ts, q, vdt) [id] = {nm, bs, ts, 1, q, vdt}
/* A type numoe only knows the size of. */
#define SIZE_ONLY(id, nm, bs, ts) [id] = {nm, bs, ts, 0, 0, (nm_type)(id)}

static const nm_type_traits traits[NM_TYPE_COUNT] = {
    COMPUTE(NM_TYPE_F32, "F32", 1, 4, 1, NM_TYPE_F32),
    COMPUTE(NM_TYPE_F16, "F16", 1, 2, 1, NM_TYPE_F32),
    COMPUTE(NM_TYPE_BF16, "BF16", 1, 2, 1, NM_TYPE_F32),
    COMPUTE(NM_TYPE_Q4_0, "Q4_0", 32, 18, 1, NM_TYPE_Q8_0),
    COMPUTE(NM_TYPE_Q4_1, "Q4_1", 32, 20, 1, NM_TYPE_Q8_0),
    COMPUTE(NM_TYPE_Q5_0, "Q5_0", 32, 22, 1, NM_TYPE_Q8_0),
    COMPUTE(NM_TYPE_Q5_1, "Q5_1", 32, 24, 1, NM_TYPE_Q8_0),
    COMPUTE(NM_TYPE_Q8_0, "Q8_0", 32, 34, 1, NM_TYPE_Q8_0),
    COMPUTE(NM_TYPE_Q2_K, "Q2_K", 256, 84, 1, NM_TYPE_Q8_K),
    COMPUTE(NM_TYPE_Q3_K, "Q3_K", 256, 110, 1, NM_TYPE_Q8_K),
    COMPUTE(NM_TYPE_Q4_K, "Q4_K", 256, 144, 1, NM_TYPE_Q8_K),
    COMPUTE(NM_TYPE_Q5_K, "Q5_K", 256, 176, 1, NM_TYPE_Q8_K),
    COMPUTE(NM_TYPE_Q6_K, "Q6_K", 256, 210, 1, NM_TYPE_Q8_K),
    COMPUTE(NM_TYPE_Q8_K, "Q8_K", 256, 292, 1, NM_TYPE_Q8_K),
    SIZE_ONLY(NM_TYPE_Q8_1, "Q8_1", 32, 36),
    SIZE_ONLY(ID_IQ2_XXS, "IQ2_XXS", 256, 66),
    SIZE_ONLY(ID_IQ2_XS, "IQ2_XS", 256, 74),
    SIZE_ONLY(ID_IQ3_XXS, "IQ3_XXS", 256, 98),
    SIZE_ONLY(ID_IQ1_S, "IQ1_S", 256, 50),
    SIZE_ONLY(ID_IQ4_NL, "IQ4_NL", 32, 18),
    SIZE_ONLY(ID_IQ3_S, "IQ3_S", 256, 110),
    SIZE_ONLY(ID_IQ2_S, "IQ2_S", 256, 82),
    SIZE_ONLY(ID_IQ4_XS, "IQ4_XS", 256, 136),
    SIZE_ONLY(ID_I8, "I8", 1, 1),
    SIZE_ONLY(ID_I16, "I16", 1, 2),
    SIZE_ONLY(ID_I32, "I32", 1, 4),
    SIZE_ONLY(ID_I64, "I64", 1, 8),
    SIZE_ONLY(ID_F64, "F64", 1, 8),
    SIZE_ONLY(ID_IQ1_M, "IQ1_M", 256, 56),
    SIZE_ONLY(ID_TQ1_0, "TQ1_0", 256, 54),
    SIZE_ONLY(ID_TQ2_0, "TQ2_0", 256, 66),
    SIZE_ONLY(ID_MXFP4, "MXFP4", 32, 17),
};

const nm_type_traits *nm_type_traits_of(int type) {
    if (type < 0 || type >= NM_TYPE_COUNT || !traits[type].name) return NULL;
    return &traits[type];
}

const char *nm_type_name(int type) {
    const nm_type_traits *t = nm_type_traits_of(type);
    return t ? t->name : "unknown";
}

size_t nm_row_size(int type, int64_t n) {
    const nm_type_traits *t = nm_type_traits_of(type);
    if (!t || n < 0 || n % t->block_size) return 0;
    /* blocks * type_size may exceed size_t (n comes from files) */
    const uint64_t blocks = (uint64_t)(n / t->block_size);
    if (blocks > SIZE_MAX / t->type_size) return 0;
    return (size_t)blocks * t->type_size;
}
