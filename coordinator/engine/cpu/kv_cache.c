/* kv_cache.c - allocation of one sequence's latent cache (see kv_cache.h). */
#include "coordinator/engine/cpu/kv_cache.h"

#include <string.h>
#include <sys/mman.h>

int nm_kv_cache_alloc(nm_kv_cache *c, int64_t n_layer, int64_t n_ctx, int64_t width, nm_err *err) {
    memset(c, 0, sizeof *c);
    if (n_layer < 1 || n_ctx < 1 || width < 1) return nm_errf(err, "KV cache: bad shape");
    size_t bytes = (size_t)n_layer * (size_t)n_ctx * (size_t)width * sizeof(float);
    /* pages are touched only as positions fill, so a request reserving a long
     * context costs memory only for what it uses */
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return nm_errf(err, "cannot allocate the KV cache: %lld positions x %lld layers x %lld floats (%zu MiB)",
                       (long long)n_ctx, (long long)n_layer, (long long)width, bytes >> 20);
    *c = (nm_kv_cache){n_layer, n_ctx, width, 0, p, bytes};
    return 0;
}

void nm_kv_cache_free(nm_kv_cache *c) {
    if (c->data) munmap(c->data, c->bytes);
    memset(c, 0, sizeof *c);
}
