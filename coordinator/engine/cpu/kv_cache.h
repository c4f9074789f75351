/* kv_cache.h - the MLA latent cache of one sequence: per layer and position
 * only the compressed KV c (kv_lora values, after its RMSNorm) and the shared
 * rope key k_pe (d_rope values, after RoPE), i.e. [c | k_pe] as mainline
 * llama.cpp orders it: 576 floats per token per layer on V3 instead of 128
 * heads x (192 + 128) for full K/V (docs/MODEL.md §5.1).
 *
 * Ownership: whoever calls nm_kv_cache_alloc frees with nm_kv_cache_free (the
 * forward state owns the single-sequence cache; the server's scheduler one
 * per request). The data is its own anonymous mapping, so a freed cache goes
 * back to the kernel at once instead of lingering in the malloc heap: a
 * server that ends thousands of requests keeps a flat RSS. */
#ifndef NUMOE_COORDINATOR_ENGINE_CPU_KV_CACHE_H
#define NUMOE_COORDINATOR_ENGINE_CPU_KV_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

typedef struct {
    int64_t n_layer, n_ctx, width; /* width = kv_lora + d_rope */
    int64_t n_pos;                 /* positions filled */
    float *data;                   /* [n_layer][n_ctx][width] */
    size_t bytes;                  /* of the mapping */
} nm_kv_cache;

static inline float *nm_kv_row(const nm_kv_cache *c, int64_t layer, int64_t pos) {
    return c->data + ((size_t)layer * (size_t)c->n_ctx + (size_t)pos) * (size_t)c->width;
}

/* Room for n_ctx positions of n_layer layers of width floats. 0, or -1 with err. */
int nm_kv_cache_alloc(nm_kv_cache *c, int64_t n_layer, int64_t n_ctx, int64_t width, nm_err *err);
void nm_kv_cache_free(nm_kv_cache *c);

#endif
