/* gguf.c - GGUF reader. Layout (gguf-py gguf_writer.py, ggml gguf.cpp):
 *   u32 magic "GGUF", u32 version, u64 n_tensors, u64 n_kv,
 *   n_kv x (string key, u32 type, value),
 *   n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset),
 *   zero padding to general.alignment, tensor data.
 * Strings are u64 length + bytes. All little-endian.
 *
 * Every read goes through a bounds-checked cursor; counts are bounded by the
 * bytes left before anything is allocated, so a hostile header cannot make
 * us allocate more than a small multiple of the file size. */
#include "common/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

#include "common/clock.h"
#include "common/progress.h"
#include "common/ggml_type.h"

#define GGUF_MAGIC 0x46554747u /* "GGUF" read as little-endian u32 */
#define MAX_NAME_LEN 255       /* ggml allows 63; be a little generous */
#define MAX_SPLITS 9999

typedef struct {
    const uint8_t *base;
    size_t size, pos;
    const char *name;
    nm_err *err;
} cursor;

static int need(cursor *c, size_t n, const char *what) {
    if (c->size - c->pos < n)
        return nm_errf(c->err, "%s: truncated: %s needs %zu bytes at offset %zu, file has %zu",
                       c->name, what, n, c->pos, c->size);
    return 0;
}

static int rd(cursor *c, void *dst, size_t n, const char *what) {
    if (need(c, n, what)) return -1;
    memcpy(dst, c->base + c->pos, n);
    c->pos += n;
    return 0;
}

static int rd_u32(cursor *c, uint32_t *v, const char *what) { return rd(c, v, 4, what); }
static int rd_u64(cursor *c, uint64_t *v, const char *what) { return rd(c, v, 8, what); }

static int rd_str(cursor *c, nm_str *s, const char *what) {
    uint64_t len;
    if (rd_u64(c, &len, what)) return -1;
    if (len > c->size - c->pos)
        return nm_errf(c->err, "%s: %s: string length %" PRIu64 " at offset %zu exceeds the %zu bytes left",
                       c->name, what, len, c->pos - 8, c->size - c->pos);
    s->ptr = (const char *)c->base + c->pos;
    s->len = len;
    c->pos += (size_t)len;
    return 0;
}

static char *str_dup(nm_str s) {
    char *p = malloc((size_t)s.len + 1);
    if (!p) return NULL;
    memcpy(p, s.ptr, (size_t)s.len);
    p[s.len] = 0;
    return p;
}

int nm_str_eq(nm_str s, const char *c) {
    size_t n = strlen(c);
    return s.len == n && memcmp(s.ptr, c, n) == 0;
}

static const size_t vtype_size[NM_GGUF_TYPE_COUNT] = {
    [NM_GGUF_U8] = 1, [NM_GGUF_I8] = 1, [NM_GGUF_U16] = 2, [NM_GGUF_I16] = 2,
    [NM_GGUF_U32] = 4, [NM_GGUF_I32] = 4, [NM_GGUF_F32] = 4, [NM_GGUF_BOOL] = 1,
    [NM_GGUF_U64] = 8, [NM_GGUF_I64] = 8, [NM_GGUF_F64] = 8,
};

const char *nm_gguf_vtype_name(int t) {
    static const char *names[NM_GGUF_TYPE_COUNT] = {
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
    return (t >= 0 && t < NM_GGUF_TYPE_COUNT) ? names[t] : "invalid";
}

/* Widens one scalar of type t at p into the kv's union. */
static void load_scalar(nm_gguf_kv *kv, int t, const uint8_t *p) {
    switch (t) {
    case NM_GGUF_U8: kv->v.u64 = p[0]; break;
    case NM_GGUF_BOOL: kv->v.u64 = p[0] != 0; break;
    case NM_GGUF_I8: kv->v.i64 = (int8_t)p[0]; break;
    case NM_GGUF_U16: { uint16_t x; memcpy(&x, p, 2); kv->v.u64 = x; } break;
    case NM_GGUF_I16: { int16_t x; memcpy(&x, p, 2); kv->v.i64 = x; } break;
    case NM_GGUF_U32: { uint32_t x; memcpy(&x, p, 4); kv->v.u64 = x; } break;
    case NM_GGUF_I32: { int32_t x; memcpy(&x, p, 4); kv->v.i64 = x; } break;
    case NM_GGUF_U64: memcpy(&kv->v.u64, p, 8); break;
    case NM_GGUF_I64: memcpy(&kv->v.i64, p, 8); break;
    case NM_GGUF_F32: { float x; memcpy(&x, p, 4); kv->v.f64 = x; } break;
    case NM_GGUF_F64: memcpy(&kv->v.f64, p, 8); break;
    default: break;
    }
}

static int rd_value(cursor *c, nm_gguf_kv *kv) {
    uint32_t t;
    if (rd_u32(c, &t, "value type")) return -1;
    if (t >= NM_GGUF_TYPE_COUNT)
        return nm_errf(c->err, "%s: key '%s': invalid value type %u", c->name, kv->key, t);
    kv->type = (nm_gguf_vtype)t;
    if (t == NM_GGUF_STRING) return rd_str(c, &kv->str, kv->key);
    if (t != NM_GGUF_ARRAY) {
        if (need(c, vtype_size[t], kv->key)) return -1;
        load_scalar(kv, (int)t, c->base + c->pos);
        c->pos += vtype_size[t];
        return 0;
    }
    uint32_t et;
    uint64_t n;
    if (rd_u32(c, &et, "array element type") || rd_u64(c, &n, "array length")) return -1;
    if (et >= NM_GGUF_TYPE_COUNT || et == NM_GGUF_ARRAY)
        return nm_errf(c->err, "%s: key '%s': invalid array element type %u%s", c->name, kv->key, et,
                       et == NM_GGUF_ARRAY ? " (nested arrays are not supported)" : "");
    kv->arr_type = (nm_gguf_vtype)et;
    kv->arr_n = n;
    size_t left = c->size - c->pos;
    if (et != NM_GGUF_STRING) {
        if (n > left / vtype_size[et])
            return nm_errf(c->err, "%s: key '%s': array of %" PRIu64 " %s exceeds the %zu bytes left",
                           c->name, kv->key, n, nm_gguf_vtype_name((int)et), left);
        kv->arr_data = c->base + c->pos;
        c->pos += (size_t)n * vtype_size[et];
        return 0;
    }
    /* each string costs at least its 8-byte length: bounds the allocation */
    if (n > left / 8)
        return nm_errf(c->err, "%s: key '%s': array of %" PRIu64 " strings cannot fit in the %zu bytes left",
                       c->name, kv->key, n, left);
    kv->arr_str = malloc((n ? (size_t)n : 1) * sizeof(nm_str));
    if (!kv->arr_str) return nm_errf(c->err, "%s: key '%s': out of memory", c->name, kv->key);
    for (uint64_t i = 0; i < n; i++) {
        char what[320];
        snprintf(what, sizeof what, "%s[%" PRIu64 "]", kv->key, i);
        if (rd_str(c, &kv->arr_str[i], what)) return -1;
    }
    return 0;
}

int64_t nm_gguf_arr_i64(const nm_gguf_kv *kv, uint64_t i) {
    nm_gguf_kv tmp = {0};
    if (!kv->arr_data || i >= kv->arr_n) return 0;
    load_scalar(&tmp, kv->arr_type, kv->arr_data + i * vtype_size[kv->arr_type]);
    switch (kv->arr_type) {
    case NM_GGUF_F32: case NM_GGUF_F64: return (int64_t)tmp.v.f64;
    default: return tmp.v.i64;
    }
}

double nm_gguf_arr_f64(const nm_gguf_kv *kv, uint64_t i) {
    nm_gguf_kv tmp = {0};
    if (!kv->arr_data || i >= kv->arr_n) return 0;
    load_scalar(&tmp, kv->arr_type, kv->arr_data + i * vtype_size[kv->arr_type]);
    switch (kv->arr_type) {
    case NM_GGUF_F32: case NM_GGUF_F64: return tmp.v.f64;
    case NM_GGUF_U64: return (double)tmp.v.u64;
    case NM_GGUF_U8: case NM_GGUF_U16: case NM_GGUF_U32: case NM_GGUF_BOOL: return (double)tmp.v.u64;
    default: return (double)tmp.v.i64;
    }
}

/* ---- name index: FNV-1a, open addressing, slots hold index + 1 ---- */

static uint64_t fnv1a(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

/* Builds an index over n names (name(i) via stride/offset into an array of
 * structs); fails on a duplicate, reporting its position. */
static int build_index(const void *items, size_t stride, size_t name_off, uint64_t n,
                       uint64_t **out, uint64_t *out_cap, uint64_t *dup) {
    uint64_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    uint64_t *slots = calloc((size_t)cap, sizeof *slots);
    if (!slots) return -2;
    for (uint64_t i = 0; i < n; i++) {
        const char *name = *(char *const *)((const char *)items + i * stride + name_off);
        uint64_t s = fnv1a(name) & (cap - 1);
        while (slots[s]) {
            const char *other = *(char *const *)((const char *)items + (slots[s] - 1) * stride + name_off);
            if (strcmp(other, name) == 0) {
                free(slots);
                *dup = i;
                return -1;
            }
            s = (s + 1) & (cap - 1);
        }
        slots[s] = i + 1;
    }
    *out = slots;
    *out_cap = cap;
    return 0;
}

static uint64_t index_find(const uint64_t *slots, uint64_t cap, const void *items, size_t stride,
                           size_t name_off, const char *name) {
    if (!slots) return 0;
    uint64_t s = fnv1a(name) & (cap - 1);
    while (slots[s]) {
        const char *other = *(char *const *)((const char *)items + (slots[s] - 1) * stride + name_off);
        if (strcmp(other, name) == 0) return slots[s];
        s = (s + 1) & (cap - 1);
    }
    return 0;
}

const nm_gguf_kv *nm_gguf_find(const nm_gguf *g, const char *key) {
    uint64_t i = index_find(g->kv_index, g->kv_index_cap, g->kv, sizeof *g->kv,
                            offsetof(nm_gguf_kv, key), key);
    return i ? &g->kv[i - 1] : NULL;
}

const nm_gguf_tensor *nm_gguf_tensor_find(const nm_gguf *g, const char *name) {
    uint64_t i = index_find(g->tensor_index, g->tensor_index_cap, g->tensors, sizeof *g->tensors,
                            offsetof(nm_gguf_tensor, name), name);
    return i ? &g->tensors[i - 1] : NULL;
}

/* ---- one file ---- */

typedef struct {
    uint64_t n_kv;
    nm_gguf_kv *kv;
    uint64_t n_tensors;
    nm_gguf_tensor *tensors;
    uint32_t version, alignment;
    size_t data_offset;
} part;

static void free_kvs(nm_gguf_kv *kv, uint64_t n) {
    if (!kv) return;
    for (uint64_t i = 0; i < n; i++) {
        free(kv[i].key);
        free(kv[i].arr_str);
    }
    free(kv);
}

static void free_tensors(nm_gguf_tensor *t, uint64_t n) {
    if (!t) return;
    for (uint64_t i = 0; i < n; i++) free(t[i].name);
    free(t);
}

static int part_find_kv(const part *p, const char *key) {
    for (uint64_t i = 0; i < p->n_kv; i++)
        if (strcmp(p->kv[i].key, key) == 0) return (int)i;
    return -1;
}

static int cmp_offset(const void *a, const void *b) {
    const nm_gguf_tensor *x = *(nm_gguf_tensor *const *)a, *y = *(nm_gguf_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int rd_tensor_info(cursor *c, nm_gguf_tensor *t, uint64_t idx) {
    nm_str name;
    char what[64];
    snprintf(what, sizeof what, "tensor #%" PRIu64 " name", idx);
    if (rd_str(c, &name, what)) return -1;
    if (name.len == 0 || name.len > MAX_NAME_LEN || memchr(name.ptr, 0, (size_t)name.len))
        return nm_errf(c->err, "%s: tensor #%" PRIu64 ": invalid name (length %" PRIu64 ")", c->name, idx,
                       name.len);
    if (!(t->name = str_dup(name))) return nm_errf(c->err, "%s: out of memory", c->name);
    uint32_t n_dims, type;
    if (rd_u32(c, &n_dims, t->name)) return -1;
    if (n_dims < 1 || n_dims > NM_GGUF_MAX_DIMS)
        return nm_errf(c->err, "%s: tensor '%s': n_dims %u outside 1..%d", c->name, t->name, n_dims,
                       NM_GGUF_MAX_DIMS);
    t->n_dims = (int)n_dims;
    uint64_t nel = 1;
    for (int d = 0; d < NM_GGUF_MAX_DIMS; d++) {
        uint64_t ne = 1;
        if (d < (int)n_dims && rd_u64(c, &ne, t->name)) return -1;
        if (ne == 0 || ne > (uint64_t)INT64_MAX || nel > (uint64_t)INT64_MAX / ne)
            return nm_errf(c->err, "%s: tensor '%s': dimension %d = %" PRIu64 " is zero or overflows", c->name,
                           t->name, d, ne);
        nel *= ne;
        t->ne[d] = (int64_t)ne;
    }
    if (rd_u32(c, &type, t->name) || rd_u64(c, &t->offset, t->name)) return -1;
    const nm_type_traits *tr = nm_type_traits_of((int)type);
    if (!tr)
        return nm_errf(c->err, "%s: tensor '%s': unsupported ggml type %u", c->name, t->name, type);
    t->type = (int)type;
    if (t->ne[0] % tr->block_size)
        return nm_errf(c->err, "%s: tensor '%s': row length %" PRId64 " is not a multiple of the %s block size %" PRId64,
                       c->name, t->name, t->ne[0], tr->name, tr->block_size);
    size_t row = nm_row_size((int)type, t->ne[0]);
    uint64_t rows = nel / (uint64_t)t->ne[0];
    if (row == 0 || rows > SIZE_MAX / row)
        return nm_errf(c->err, "%s: tensor '%s': byte size overflows", c->name, t->name);
    t->nbytes = row * (size_t)rows;
    return 0;
}

static int parse_part(const uint8_t *base, size_t size, const char *name, part *p, nm_err *err) {
    cursor c = {base, size, 0, name, err};
    uint32_t magic;
    uint64_t n_tensors, n_kv;
    memset(p, 0, sizeof *p);
    if (rd_u32(&c, &magic, "magic")) return -1;
    if (magic != GGUF_MAGIC)
        return nm_errf(err, "%s: not a GGUF file (magic 0x%08x, expected \"GGUF\")", name, magic);
    if (rd_u32(&c, &p->version, "version")) return -1;
    if (p->version == 1)
        return nm_errf(err, "%s: GGUF version 1 is not supported (convert it with a current llama.cpp)", name);
    if ((p->version & 0xffff) == 0 && (p->version >> 16) != 0)
        return nm_errf(err, "%s: big-endian GGUF files are not supported", name);
    if (p->version != 2 && p->version != 3)
        return nm_errf(err, "%s: unsupported GGUF version %u (numoe reads 2 and 3)", name, p->version);
    if (rd_u64(&c, &n_tensors, "tensor count") || rd_u64(&c, &n_kv, "metadata count")) return -1;
    /* minimal encoded sizes: kv 8+1+4+1 bytes, tensor info 8+1+4+8+4+8 */
    if (n_kv > (size - c.pos) / 14)
        return nm_errf(err, "%s: metadata count %" PRIu64 " cannot fit in a %zu-byte file", name, n_kv, size);
    if (n_tensors > (size - c.pos) / 33)
        return nm_errf(err, "%s: tensor count %" PRIu64 " cannot fit in a %zu-byte file", name, n_tensors, size);

    p->kv = calloc(n_kv ? (size_t)n_kv : 1, sizeof *p->kv);
    p->tensors = calloc(n_tensors ? (size_t)n_tensors : 1, sizeof *p->tensors);
    if (!p->kv || !p->tensors) return nm_errf(err, "%s: out of memory", name);

    p->alignment = NM_GGUF_DEFAULT_ALIGNMENT;
    for (uint64_t i = 0; i < n_kv; i++) {
        nm_str key;
        char what[64];
        snprintf(what, sizeof what, "metadata #%" PRIu64 " key", i);
        if (rd_str(&c, &key, what)) return -1;
        if (key.len == 0 || memchr(key.ptr, 0, (size_t)key.len))
            return nm_errf(err, "%s: metadata #%" PRIu64 ": invalid key", name, i);
        if (!(p->kv[i].key = str_dup(key))) return nm_errf(err, "%s: out of memory", name);
        p->n_kv = i + 1;
        if (rd_value(&c, &p->kv[i])) return -1;
        if (strcmp(p->kv[i].key, "general.alignment") == 0) {
            uint64_t a = p->kv[i].v.u64;
            if (p->kv[i].type != NM_GGUF_U32 || a == 0 || (a & (a - 1)))
                return nm_errf(err, "%s: general.alignment must be a non-zero power of two u32", name);
            p->alignment = (uint32_t)a;
        }
    }
    for (uint64_t i = 0; i < n_tensors; i++) {
        p->n_tensors = i + 1;
        if (rd_tensor_info(&c, &p->tensors[i], i)) return -1;
    }
    size_t data = c.pos + (p->alignment - c.pos % p->alignment) % p->alignment;
    /* writers omit the padding when no tensor data follows (vocabulary-only files) */
    if (data > size && n_tensors == 0) data = size;
    if (data > size)
        return nm_errf(err, "%s: truncated: data section would start at %zu, file has %zu bytes", name, data, size);
    p->data_offset = data;
    size_t avail = size - data;

    /* bounds and overlap, in offset order */
    nm_gguf_tensor **order = malloc((n_tensors ? (size_t)n_tensors : 1) * sizeof *order);
    if (!order) return nm_errf(err, "%s: out of memory", name);
    for (uint64_t i = 0; i < n_tensors; i++) {
        nm_gguf_tensor *t = &p->tensors[i];
        if (t->offset % p->alignment || t->offset > avail || t->nbytes > avail - t->offset) {
            nm_errf(err, "%s: tensor '%s': data [%" PRIu64 ", +%zu) %s (data section is %zu bytes, alignment %u)",
                    name, t->name, t->offset, t->nbytes,
                    t->offset % p->alignment ? "is misaligned" : "lies outside the file", avail, p->alignment);
            free(order);
            return -1;
        }
        t->data = base + data + t->offset;
        order[i] = t;
    }
    qsort(order, (size_t)n_tensors, sizeof *order, cmp_offset);
    for (uint64_t i = 1; i < n_tensors; i++) {
        if (order[i - 1]->offset + order[i - 1]->nbytes > order[i]->offset) {
            nm_errf(err, "%s: tensors '%s' and '%s' overlap at offset %" PRIu64, name, order[i - 1]->name,
                    order[i]->name, order[i]->offset);
            free(order);
            return -1;
        }
    }
    free(order);
    return 0;
}

static void part_free(part *p) {
    free_kvs(p->kv, p->n_kv);
    free_tensors(p->tensors, p->n_tensors);
    memset(p, 0, sizeof *p);
}

static int map_file(const char *path, nm_gguf_file *f, nm_err *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return nm_errf(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return nm_errf(err, "%s: not a regular file", path);
    }
    f->size = (size_t)st.st_size;
    if (f->size == 0) {
        close(fd);
        return nm_errf(err, "%s: empty file", path);
    }
    f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        return nm_errf(err, "%s: mmap failed: %s", path, strerror(errno));
    }
    return 0;
}

void nm_gguf_close(nm_gguf *g) {
    if (!g) return;
    for (int i = 0; i < g->n_files; i++) {
        if (g->files[i].map) munmap(g->files[i].map, g->files[i].size);
        free(g->files[i].path);
    }
    free(g->files);
    free_kvs(g->kv, g->n_kv);
    free_tensors(g->tensors, g->n_tensors);
    free(g->kv_index);
    free(g->tensor_index);
    free(g);
}

/* Moves the part's tensors into g (tagging them with file index fi). */
static int append_tensors(nm_gguf *g, part *p, int fi, nm_err *err) {
    nm_gguf_tensor *t = realloc(g->tensors, (size_t)(g->n_tensors + p->n_tensors + 1) * sizeof *t);
    if (!t) return nm_errf(err, "out of memory");
    g->tensors = t;
    for (uint64_t i = 0; i < p->n_tensors; i++) {
        p->tensors[i].file = fi;
        g->tensors[g->n_tensors++] = p->tensors[i];
    }
    free(p->tensors);
    p->tensors = NULL;
    p->n_tensors = 0;
    return 0;
}

static int finish_index(nm_gguf *g, nm_err *err) {
    uint64_t dup;
    int r = build_index(g->kv, sizeof *g->kv, offsetof(nm_gguf_kv, key), g->n_kv, &g->kv_index,
                        &g->kv_index_cap, &dup);
    if (r == -1) return nm_errf(err, "%s: duplicate metadata key '%s'", g->files[0].path, g->kv[dup].key);
    if (r) return nm_errf(err, "out of memory");
    r = build_index(g->tensors, sizeof *g->tensors, offsetof(nm_gguf_tensor, name), g->n_tensors,
                    &g->tensor_index, &g->tensor_index_cap, &dup);
    if (r == -1)
        return nm_errf(err, "%s: duplicate tensor name '%s'", g->files[g->tensors[dup].file].path,
                       g->tensors[dup].name);
    if (r) return nm_errf(err, "out of memory");
    return 0;
}

int nm_gguf_parse_buffer(const void *buf, size_t size, const char *name, nm_gguf **out, nm_err *err) {
    *out = NULL;
    nm_gguf *g = calloc(1, sizeof *g);
    part p;
    if (!g || !(g->files = calloc(1, sizeof *g->files))) {
        free(g);
        return nm_errf(err, "out of memory");
    }
    g->n_files = 1;
    g->files[0].path = strdup(name);
    if (parse_part(buf, size, name, &p, err)) {
        part_free(&p);
        nm_gguf_close(g);
        return -1;
    }
    g->files[0].size = size;
    g->files[0].data_offset = p.data_offset;
    g->files[0].version = p.version;
    g->alignment = p.alignment;
    g->kv = p.kv, g->n_kv = p.n_kv;
    p.kv = NULL, p.n_kv = 0;
    if (append_tensors(g, &p, 0, err) || finish_index(g, err)) {
        part_free(&p);
        nm_gguf_close(g);
        return -1;
    }
    *out = g;
    return 0;
}

/* Reads an integer split.* key from a part (any integer type). */
static int part_split_key(const part *p, const char *path, const char *key, int64_t *v, nm_err *err) {
    int i = part_find_kv(p, key);
    if (i < 0) return 1;
    const nm_gguf_kv *kv = &p->kv[i];
    switch (kv->type) {
    case NM_GGUF_U8: case NM_GGUF_U16: case NM_GGUF_U32: case NM_GGUF_U64:
        if (kv->v.u64 > (uint64_t)INT32_MAX) break;
        *v = (int64_t)kv->v.u64;
        return 0;
    case NM_GGUF_I8: case NM_GGUF_I16: case NM_GGUF_I32: case NM_GGUF_I64:
        *v = kv->v.i64;
        return 0;
    default: break;
    }
    return nm_errf(err, "%s: %s has type %s / value out of range", path, key, nm_gguf_vtype_name(kv->type));
}

/* "dir/name-00001-of-00009.gguf" -> prefix length (up to "-00001-of-00009.gguf"), or 0. */
static size_t split_prefix_len(const char *path, int count) {
    char suffix[64];
    snprintf(suffix, sizeof suffix, "-%05d-of-%05d.gguf", 1, count);
    size_t n = strlen(path), s = strlen(suffix);
    if (n <= s || strcmp(path + n - s, suffix) != 0) return 0;
    return n - s;
}

static int open_part(nm_gguf *g, const char *path, part *p, nm_err *err) {
    nm_gguf_file *f = &g->files[g->n_files];
    memset(f, 0, sizeof *f);
    if (!(f->path = strdup(path))) return nm_errf(err, "out of memory");
    g->n_files++;
    if (map_file(path, f, err)) return -1;
    if (parse_part(f->map, f->size, path, p, err)) return -1;
    f->data_offset = p->data_offset;
    f->version = p->version;
    return 0;
}

int nm_gguf_open(const char *path, nm_gguf **out, nm_err *err) {
    *out = NULL;
    nm_gguf *g = calloc(1, sizeof *g);
    part p = {0};
    char *other = NULL;
    if (!g || !(g->files = calloc(1, sizeof *g->files))) {
        free(g);
        return nm_errf(err, "out of memory");
    }
    if (open_part(g, path, &p, err)) goto fail;
    g->alignment = p.alignment;

    int64_t count = 1, no = 0, total = -1;
    if (part_split_key(&p, path, "split.count", &count, err) < 0 ||
        part_split_key(&p, path, "split.no", &no, err) < 0 ||
        part_split_key(&p, path, "split.tensors.count", &total, err) < 0)
        goto fail;
    if (count < 1 || count > MAX_SPLITS) {
        nm_errf(err, "%s: split.count %" PRId64 " outside 1..%d", path, count, MAX_SPLITS);
        goto fail;
    }
    if (count > 1 && no != 0) {
        nm_errf(err, "%s: this is part %" PRId64 " of a %" PRId64 "-part split model; open the first part (-00001-of-%05d.gguf)",
                path, no + 1, count, (int)count);
        goto fail;
    }
    g->kv = p.kv, g->n_kv = p.n_kv;
    p.kv = NULL, p.n_kv = 0;
    if (append_tensors(g, &p, 0, err)) goto fail;

    if (count > 1) {
        size_t pre = split_prefix_len(path, (int)count);
        if (!pre) {
            nm_errf(err, "%s: split.count is %" PRId64 " but the name does not end in -00001-of-%05d.gguf, so the other parts cannot be found",
                    path, count, (int)count);
            goto fail;
        }
        nm_gguf_file *files = realloc(g->files, (size_t)count * sizeof *files);
        if (!files || !(other = malloc(pre + 32))) {
            if (files) g->files = files;
            nm_errf(err, "out of memory");
            goto fail;
        }
        g->files = files;
        for (int64_t k = 1; k < count; k++) {
            memcpy(other, path, pre);
            snprintf(other + pre, 32, "-%05d-of-%05d.gguf", (int)k + 1, (int)count);
            int64_t kc = 0, kn = -1;
            if (open_part(g, other, &p, err)) goto fail;
            if (part_split_key(&p, other, "split.count", &kc, err) < 0 ||
                part_split_key(&p, other, "split.no", &kn, err) < 0)
                goto fail;
            if (kc != count || kn != k) {
                nm_errf(err, "%s: split.count/split.no are %" PRId64 "/%" PRId64 ", expected %" PRId64 "/%" PRId64
                        " (parts from different models?)", other, kc, kn, count, k);
                goto fail;
            }
            if (append_tensors(g, &p, (int)k, err)) goto fail;
            part_free(&p);
        }
    }
    if (total >= 0 && (uint64_t)total != g->n_tensors) {
        nm_errf(err, "%s: split.tensors.count says %" PRId64 " tensors, the %d part(s) hold %" PRIu64, path, total,
                g->n_files, g->n_tensors);
        goto fail;
    }
    if (finish_index(g, err)) goto fail;
    free(other);
    *out = g;
    return 0;
fail:
    free(other);
    part_free(&p);
    nm_gguf_close(g);
    return -1;
}

/* ---- typed getters ---- */

static int get_int(const nm_gguf *g, const char *key, int64_t lo, uint64_t hi, uint64_t *out_u, int64_t *out_i,
                   nm_err *err) {
    const nm_gguf_kv *kv = nm_gguf_find(g, key);
    if (!kv) return 1;
    switch (kv->type) {
    case NM_GGUF_U8: case NM_GGUF_U16: case NM_GGUF_U32: case NM_GGUF_U64: case NM_GGUF_BOOL:
        if (kv->v.u64 > hi) break;
        if (out_u) *out_u = kv->v.u64;
        if (out_i) *out_i = (int64_t)kv->v.u64;
        return 0;
    case NM_GGUF_I8: case NM_GGUF_I16: case NM_GGUF_I32: case NM_GGUF_I64:
        if (kv->v.i64 < lo || (kv->v.i64 >= 0 && (uint64_t)kv->v.i64 > hi)) break;
        if (out_u) *out_u = (uint64_t)kv->v.i64;
        if (out_i) *out_i = kv->v.i64;
        return 0;
    default:
        return nm_errf(err, "%s: key %s has type %s, expected an integer", g->files[0].path, key,
                       kv->type == NM_GGUF_ARRAY ? "array" : nm_gguf_vtype_name(kv->type));
    }
    return nm_errf(err, "%s: key %s: value out of range", g->files[0].path, key);
}

int nm_gguf_get_u32(const nm_gguf *g, const char *key, uint32_t *out, nm_err *err) {
    uint64_t v = 0;
    int r = get_int(g, key, 0, UINT32_MAX, &v, NULL, err);
    if (r == 0) *out = (uint32_t)v;
    return r;
}

int nm_gguf_get_i64(const nm_gguf *g, const char *key, int64_t *out, nm_err *err) {
    return get_int(g, key, INT64_MIN, INT64_MAX, NULL, out, err);
}

int nm_gguf_get_bool(const nm_gguf *g, const char *key, int *out, nm_err *err) {
    uint64_t v = 0;
    int r = get_int(g, key, 0, 1, &v, NULL, err);
    if (r == 0) *out = (int)v;
    return r;
}

int nm_gguf_get_f32(const nm_gguf *g, const char *key, float *out, nm_err *err) {
    const nm_gguf_kv *kv = nm_gguf_find(g, key);
    if (!kv) return 1;
    if (kv->type == NM_GGUF_F32 || kv->type == NM_GGUF_F64) {
        *out = (float)kv->v.f64;
        return 0;
    }
    int64_t i = 0;
    int r = get_int(g, key, INT64_MIN, INT64_MAX, NULL, &i, err);
    if (r == 0) *out = (float)i;
    return r;
}

int nm_gguf_get_str(const nm_gguf *g, const char *key, nm_str *out, nm_err *err) {
    const nm_gguf_kv *kv = nm_gguf_find(g, key);
    if (!kv) return 1;
    if (kv->type != NM_GGUF_STRING)
        return nm_errf(err, "%s: key %s has type %s, expected a string", g->files[0].path, key,
                       nm_gguf_vtype_name(kv->type));
    *out = kv->str;
    return 0;
}

double nm_gguf_prefault(const nm_gguf *g, int progress) {
    double t0 = nm_now_s();
    size_t total = 0, step = (size_t)1 << 28;
    for (int i = 0; i < g->n_files; i++) total += g->files[i].map ? g->files[i].size : 0;
    long page = sysconf(_SC_PAGESIZE);
    nm_progress pr;
    nm_progress_begin(&pr, "numoe: reading the model", total);
    if (!progress) pr.mode = NM_PROGRESS_OFF; /* still counted in the load meter */
    for (int i = 0; i < g->n_files; i++) {
        const nm_gguf_file *f = &g->files[i];
        if (!f->map) continue; /* parsed from a caller's buffer */
        for (size_t off = 0; off < f->size; off += step) {
            size_t len = f->size - off < step ? f->size - off : step;
            char *p = (char *)f->map + off;
            if (madvise(p, len, MADV_POPULATE_READ) != 0) {
                volatile char sink = 0;
                for (size_t b = 0; b < len; b += (size_t)page) sink ^= p[b];
                (void)sink;
            }
            nm_progress_add(&pr, len);
        }
    }
    nm_progress_end(&pr);
    return nm_now_s() - t0;
}
