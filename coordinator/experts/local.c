/* local.c - the in-process expert backend (local.h): points the shared MoE
 * kernel at each layer's stacked expert tensors in the mapping. The pool is
 * the engine's own, so nothing can run beside the experts: submit only takes
 * the layer down and wait computes it (after the engine computed its shared
 * experts, which changes no result: they go to separate buffers). */
#include "coordinator/experts/local.h"

#include <stdlib.h>

#include "kernels/moe.h"

typedef struct {
    nm_expert_backend base;
    const nm_model *m;
    nm_pool *pool;
    nm_moe_experts *layers;  /* [n_layer], valid for MoE layers */
    const void **ptrs;       /* 3 * n_expert pointers per layer */
    nm_moe_scratch scratch;
    int layer, k;           /* what was submitted; layer -1: nothing */
    int64_t n_tok;
} local_backend;

static int local_submit(nm_expert_backend *b, int layer, int64_t n_tok, int k, nm_err *err) {
    local_backend *lb = (local_backend *)b;
    if (layer < 0 || layer >= lb->m->hp.n_layer || !lb->m->layers[layer].is_moe)
        return nm_errf(err, "expert backend: layer %d is not a MoE layer", layer);
    if (nm_experts_check(b, n_tok, k, err)) return -1;
    lb->layer = layer, lb->n_tok = n_tok, lb->k = k;
    return 0;
}

static int local_wait(nm_expert_backend *b, float *out, nm_err *err) {
    local_backend *lb = (local_backend *)b;
    int layer = lb->layer;
    char msg[256];
    if (layer < 0) return nm_errf(err, "expert backend: wait without a submit");
    lb->layer = -1;
    if (nm_moe_forward(lb->pool, &lb->scratch, &lb->layers[layer], lb->n_tok, b->in.x, lb->k, b->in.ids, b->in.w, out,
                       msg, sizeof msg))
        return nm_errf(err, "layer %d: routed experts: %s", layer, msg);
    return 0;
}

static void local_destroy(nm_expert_backend *b) {
    local_backend *lb = (local_backend *)b;
    nm_expert_input_free(&b->in);
    nm_moe_scratch_free(&lb->scratch);
    free(lb->layers);
    free(lb->ptrs);
    free(lb);
}

nm_expert_backend *nm_experts_local_create(const nm_model *m, nm_pool *pool, int64_t max_tok, int max_k, nm_err *err) {
    const nm_hparams *hp = &m->hp;
    int64_t E = hp->n_expert;
    local_backend *lb = calloc(1, sizeof *lb);
    if (!lb || !(lb->layers = calloc((size_t)hp->n_layer, sizeof *lb->layers)) ||
        !(lb->ptrs = calloc((size_t)(hp->n_layer * 3 * E), sizeof *lb->ptrs))) {
        if (lb) free(lb->layers), free(lb);
        nm_errf(err, "out of memory creating the expert backend");
        return NULL;
    }
    lb->base.submit = local_submit;
    lb->base.wait = local_wait;
    lb->base.destroy = local_destroy;
    lb->m = m;
    lb->pool = pool;
    lb->layer = -1;
    if (nm_expert_input_alloc(&lb->base.in, hp->n_embd, max_tok, max_k, err)) {
        local_destroy(&lb->base);
        return NULL;
    }
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
