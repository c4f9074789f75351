/* kv_cache.h - the MLA latent cache: per layer and position only the
 * compressed KV c (kv_lora values, after its RMSNorm) and the shared rope key
 * k_pe (d_rope values, after RoPE), i.e. [c | k_pe] as mainline llama.cpp
 * orders it: 576 floats per token per layer on V3 instead of 128 heads x
 * (192 + 128) for full K/V (reference §5.1). Owned by the forward state. */
#ifndef NUMOE_COORDINATOR_KV_CACHE_H
#define NUMOE_COORDINATOR_KV_CACHE_H

#include <stdint.h>

typedef struct {
    int64_t n_layer, n_ctx, width; /* width = kv_lora + d_rope */
    int64_t n_pos;                 /* positions filled */
    float *data;                   /* [n_layer][n_ctx][width] */
} nm_kv_cache;

static inline float *nm_kv_row(const nm_kv_cache *c, int64_t layer, int64_t pos) {
    return c->data + ((size_t)layer * (size_t)c->n_ctx + (size_t)pos) * (size_t)c->width;
}

#endif
