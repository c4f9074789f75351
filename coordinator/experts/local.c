/* experts_local.c - the in-process expert backend (`--workers 0`): points the
 * shared MoE kernel at each layer's stacked expert tensors in the mapping. */
#include <stdlib.h>

#include "coordinator/experts/backend.h"
#include "kernels/moe.h"

typedef struct {
    nm_expert_backend base;
    const nm_model *m;
    nm_pool *pool;
    nm_moe_experts *layers;  /* [n_layer], valid for MoE layers */
    const void **ptrs;       /* 3 * n_expert pointers per layer */
    nm_moe_scratch scratch;
} local_backend;

static int local_moe(nm_expert_backend *b, int layer, int64_t n_tok, const float *x, int k, const int32_t *ids,
                     const float *w, float *out, nm_err *err) {
    local_backend *lb = (local_backend *)b;
    char msg[256];
    if (layer < 0 || layer >= lb->m->hp.n_layer || !lb->m->layers[layer].is_moe)
        return nm_errf(err, "expert backend: layer %d is not a MoE layer", layer);
    if (nm_moe_forward(lb->pool, &lb->scratch, &lb->layers[layer], n_tok, x, k, ids, w, out, msg, sizeof msg))
        return nm_errf(err, "layer %d: routed experts: %s", layer, msg);
    return 0;
}

static void local_destroy(nm_expert_backend *b) {
    local_backend *lb = (local_backend *)b;
    nm_moe_scratch_free(&lb->scratch);
    free(lb->layers);
    free(lb->ptrs);
    free(lb);
}

nm_expert_backend *nm_experts_local_create(const nm_model *m, nm_pool *pool, nm_err *err) {
    const nm_hparams *hp = &m->hp;
    int64_t E = hp->n_expert;
    local_backend *lb = calloc(1, sizeof *lb);
    if (!lb || !(lb->layers = calloc((size_t)hp->n_layer, sizeof *lb->layers)) ||
        !(lb->ptrs = calloc((size_t)(hp->n_layer * 3 * E), sizeof *lb->ptrs))) {
        if (lb) free(lb->layers), free(lb);
        nm_errf(err, "out of memory creating the expert backend");
        return NULL;
    }
    lb->base.moe = local_moe;
    lb->base.destroy = local_destroy;
    lb->m = m;
    lb->pool = pool;
    for (int il = 0; il < hp->n_layer; il++) {
        const nm_layer *L = &m->layers[il];
        if (!L->is_moe) continue;
        const void **g = lb->ptrs + (size_t)il * 3 * (size_t)E, **u = g + E, **d = u + E;
        for (int64_t e = 0; e < E; e++) {
            g[e] = nm_mat_row(&L->gate_exps, e, 0);
            u[e] = nm_mat_row(&L->up_exps, e, 0);
            d[e] = nm_mat_row(&L->down_exps, e, 0);
        }
        lb->layers[il] = (nm_moe_experts){
            .n_embd = hp->n_embd, .n_ff = hp->n_ff_exp, .n_expert = E,
            .type_gate = L->gate_exps.type, .type_up = L->up_exps.type, .type_down = L->down_exps.type,
            .row_gate = L->gate_exps.row_bytes, .row_up = L->up_exps.row_bytes, .row_down = L->down_exps.row_bytes,
            .gate = g, .up = u, .down = d};
    }
    return &lb->base;
}
