/* gguf.h - read-only GGUF (v2, v3) reader over mmap, split models included.
 *
 * Ownership: nm_gguf_open allocates one nm_gguf that owns the mappings, the
 * key/value table and the tensor table; nm_gguf_close frees all of it.
 * String values and tensor data point into the mapping (no copies), so they
 * live exactly as long as the nm_gguf.
 *
 * Trust: the file is untrusted. Every count, length, offset and size is
 * checked against the bytes actually present before it is used, allocations
 * are bounded by the file size, and every failure names the file and the
 * field (see tests/fuzz/ for the fuzz target that holds us to that). */
#ifndef NUMOE_COMMON_GGUF_H
#define NUMOE_COMMON_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#define NM_GGUF_MAX_DIMS 4
#define NM_GGUF_DEFAULT_ALIGNMENT 32

typedef enum {
    NM_GGUF_U8 = 0, NM_GGUF_I8 = 1, NM_GGUF_U16 = 2, NM_GGUF_I16 = 3,
    NM_GGUF_U32 = 4, NM_GGUF_I32 = 5, NM_GGUF_F32 = 6, NM_GGUF_BOOL = 7,
    NM_GGUF_STRING = 8, NM_GGUF_ARRAY = 9, NM_GGUF_U64 = 10, NM_GGUF_I64 = 11,
    NM_GGUF_F64 = 12, NM_GGUF_TYPE_COUNT
} nm_gguf_vtype;

/* A string inside the mapping: not NUL-terminated. */
typedef struct {
    const char *ptr;
    uint64_t len;
} nm_str;

typedef struct {
    char *key;          /* NUL-terminated copy */
    nm_gguf_vtype type;
    /* scalars: the value widened; for bools u64 is 0/1 */
    union { uint64_t u64; int64_t i64; double f64; } v;
    nm_str str;         /* type == STRING */
    /* type == ARRAY */
    nm_gguf_vtype arr_type;
    uint64_t arr_n;
    const uint8_t *arr_data; /* element bytes in the file (non-string arrays) */
    nm_str *arr_str;         /* allocated table of arr_n strings (string arrays) */
} nm_gguf_kv;

typedef struct {
    char *name;            /* NUL-terminated copy */
    int n_dims;
    int64_t ne[NM_GGUF_MAX_DIMS]; /* ne[0] contiguous; unused dims are 1 */
    int type;              /* ggml type id (kernels/quant.h) */
    uint64_t offset;       /* from the start of its file's data section */
    size_t nbytes;
    int file;              /* index of the split part holding it */
    const void *data;      /* into the mapping */
} nm_gguf_tensor;

typedef struct {
    char *path;
    void *map;
    size_t size;
    size_t data_offset;    /* start of the tensor data section */
    uint32_t version;
} nm_gguf_file;

typedef struct nm_gguf {
    int n_files;
    nm_gguf_file *files;
    uint32_t alignment;
    uint64_t n_kv;          /* from the first part */
    nm_gguf_kv *kv;
    uint64_t n_tensors;     /* over all parts */
    nm_gguf_tensor *tensors;
    uint64_t *kv_index;     /* open-addressing hash: slot -> kv index + 1 */
    uint64_t kv_index_cap;
    uint64_t *tensor_index; /* same for tensor names */
    uint64_t tensor_index_cap;
} nm_gguf;

/* Opens PATH. If it is part 1 of a split model (split.count > 1) the other
 * parts (PREFIX-0000k-of-0000N.gguf next to it) are opened too and their
 * tensors joined. Returns 0 and *out, or -1 with err filled. */
int nm_gguf_open(const char *path, nm_gguf **out, nm_err *err);
/* Parses a GGUF held in memory (not copied; buf must outlive the result).
 * Used by the fuzz target and the tests; no split handling. */
int nm_gguf_parse_buffer(const void *buf, size_t size, const char *name,
                         nm_gguf **out, nm_err *err);
void nm_gguf_close(nm_gguf *g);
/* Reads every page of the mapping in now (MADV_POPULATE_READ, or touching
 * each page on kernels without it), so the first tokens do not pay for page
 * faults; llama.cpp does the same with MAP_POPULATE. With progress set, files
 * over 1 GiB report their progress on stderr. Returns seconds spent. */
double nm_gguf_prefault(const nm_gguf *g, int progress);

const nm_gguf_kv *nm_gguf_find(const nm_gguf *g, const char *key);
const nm_gguf_tensor *nm_gguf_tensor_find(const nm_gguf *g, const char *name);

/* Typed getters. Integer getters accept any integer (or bool) value type
 * whose value fits; missing key -> returns 1 and leaves *out unchanged (so
 * callers can preset a default); wrong type or out of range -> -1 with err.
 * 0 on success. */
int nm_gguf_get_u32(const nm_gguf *g, const char *key, uint32_t *out, nm_err *err);
int nm_gguf_get_i64(const nm_gguf *g, const char *key, int64_t *out, nm_err *err);
int nm_gguf_get_f32(const nm_gguf *g, const char *key, float *out, nm_err *err);
int nm_gguf_get_bool(const nm_gguf *g, const char *key, int *out, nm_err *err);
/* *out points into the mapping, *len its byte length (not NUL-terminated). */
int nm_gguf_get_str(const nm_gguf *g, const char *key, nm_str *out, nm_err *err);

/* Array element access for numeric arrays (any integer type widened). */
int64_t nm_gguf_arr_i64(const nm_gguf_kv *kv, uint64_t i);
double nm_gguf_arr_f64(const nm_gguf_kv *kv, uint64_t i);

const char *nm_gguf_vtype_name(int t);
/* True if s equals the NUL-terminated c. */
int nm_str_eq(nm_str s, const char *c);

#endif
