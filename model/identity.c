/* identity.c - what the coordinator and a worker compare to know they opened
 * the same model (identity.h). */
#include "model/identity.h"

#include <string.h>

#include "common/hash.h"

static int is_routed(const char *name) { return strstr(name, "_exps.") != NULL; }

void nm_model_identity(const nm_gguf *g, uint64_t *file_bytes, uint64_t *header_hash) {
    uint64_t bytes = 0, h = NM_FNV_OFFSET;
    for (int i = 0; i < g->n_files; i++) bytes += g->files[i].size;
    /* the whole header of the first part: metadata and every tensor's name, type, shape, offset */
    h = nm_fnv1a64(h, g->files[0].map, g->files[0].data_offset);
    /* and a sample of the routed weights themselves (files of one generator
     * with different seeds share the header) */
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const nm_gguf_tensor *t = &g->tensors[i];
        if (!is_routed(t->name)) continue;
        size_t n = t->nbytes < 4096 ? t->nbytes : 4096;
        h = nm_fnv1a64(h, t->data, n);
        h = nm_fnv1a64(h, (const uint8_t *)t->data + t->nbytes - n, n);
    }
    *file_bytes = bytes;
    *header_hash = h;
}

uint64_t nm_routed_expert_bytes(const nm_gguf *g) {
    uint64_t b = 0;
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (is_routed(g->tensors[i].name)) b += g->tensors[i].nbytes;
    return b;
}
