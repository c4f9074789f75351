/* backend.c - what every expert backend shares (backend.h). */
#include "coordinator/experts/backend.h"

#include <stdlib.h>
#include <string.h>

int nm_experts_check(const nm_expert_backend *b, int64_t n_tok, int k, nm_err *err) {
    if (n_tok < 0 || n_tok > b->in.max_tok)
        return nm_errf(err, "expert backend: %lld tokens, the input region holds at most %lld", (long long)n_tok,
                       (long long)b->in.max_tok);
    if (k < 1 || k > b->in.max_k)
        return nm_errf(err, "expert backend: %d experts per token, the worker slots hold at most %d", k, b->in.max_k);
    return 0;
}

int nm_experts_run(nm_expert_backend *b, int layer, int64_t n_tok, const float *x, int k, const int32_t *ids,
                   const float *w, float *out, nm_err *err) {
    const nm_expert_input *in = &b->in;
    int64_t done = 0;
    do {
        int64_t c = n_tok - done < in->max_tok ? n_tok - done : in->max_tok;
        memcpy(in->x, x + done * in->n_embd, (size_t)(c * in->n_embd) * sizeof *x);
        memcpy(in->ids, ids + done * k, (size_t)(c * k) * sizeof *ids);
        memcpy(in->w, w + done * k, (size_t)(c * k) * sizeof *w);
        if (nm_experts_submit(b, layer, c, k, err) || nm_experts_wait(b, out + done * in->n_embd, err)) return -1;
        done += c;
    } while (done < n_tok);
    return 0;
}

int nm_expert_input_alloc(nm_expert_input *in, int64_t n_embd, int64_t max_tok, int max_k, nm_err *err) {
    memset(in, 0, sizeof *in);
    if (n_embd < 1 || max_tok < 1 || max_k < 1) return nm_errf(err, "expert input region: bad shape");
    size_t nx = (size_t)(max_tok * n_embd), nk = (size_t)(max_tok * max_k);
    /* one block: x, then ids, then weights (all 4-byte elements), on its own
     * pages so an engine can pin it (cudaHostRegister) */
    float *p = NULL;
    if (posix_memalign((void **)&p, 4096, (nx + 2 * nk) * sizeof(float))) p = NULL;
    if (!p)
        return nm_errf(err, "out of memory for the expert inputs of %lld tokens (%zu MiB)", (long long)max_tok,
                       (nx + 2 * nk) * sizeof(float) >> 20);
    *in = (nm_expert_input){.x = p, .ids = (int32_t *)(p + nx), .w = p + nx + nk, .n_embd = n_embd,
                            .max_tok = max_tok, .max_k = max_k};
    return 0;
}

void nm_expert_input_free(nm_expert_input *in) {
    free(in->x);
    memset(in, 0, sizeof *in);
}
