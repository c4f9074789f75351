/* backend.h - where routed experts are computed. The engine hands over
 * normalised hidden states plus per-token expert ids and weights and gets
 * back the weighted per-token sums; it does not know whether the experts run
 * in this process (local.h), in NUMA workers or on other hosts (remote.h).
 *
 * The call is split in two so the caller can compute something else while
 * the experts run (the CPU engine computes the shared experts there, a GPU
 * engine would go on with its own work):
 *
 *   in = the backend's input region (b->in): the caller writes the n_tok
 *        rows of x and the n_tok * k ids and weights (token t's at t*k) of
 *        the next layer there;
 *   submit(layer, n_tok, k)  hands them over and returns as soon as the
 *        work is under way (for workers: once every worker has been handed
 *        its request);
 *   wait(out)  returns when out[t][:] = sum_j w[t*k+j] * expert_{ids[t*k+j]}
 *        (x[t]) for every t, summed in a fixed order (deterministic).
 *        An id < 0 is a pick computed elsewhere (-1 - e for expert e: the
 *        GPU engine's experts resident in VRAM, gpu_hot.cuh) and adds
 *        nothing here; ids below -n_expert are refused like ids >= n_expert.
 *
 * The region belongs to the backend so it can be memory the experts read
 * directly - shared memory the workers map, pinned memory a GPU copies its
 * device buffers into once - instead of a copy the backend makes. From
 * submit until wait returns the caller must not write it (workers may be
 * reading it; a worker restarted mid-layer is handed the same inputs again).
 * After a successful submit the caller calls wait exactly once, whatever
 * else fails meanwhile. A failed submit or wait is reported with err and
 * leaves nothing in flight; a remote backend then refuses further calls
 * until its health call finds it usable again.
 *
 * An implementation embeds nm_expert_backend as its first member. */
#ifndef NUMOE_COORDINATOR_EXPERTS_BACKEND_H
#define NUMOE_COORDINATOR_EXPERTS_BACKEND_H

#include <stdint.h>

#include "common/error.h"

/* The input region: room for max_tok tokens of max_k experts each. */
typedef struct {
    float *x;       /* [max_tok][n_embd] */
    int32_t *ids;   /* [max_tok * k] for the k of the submit */
    float *w;       /* [max_tok * k] */
    int64_t n_embd, max_tok;
    int max_k;
} nm_expert_input;

/* What health reports. */
typedef struct {
    int ok;             /* the next submit can work */
    char why[400];      /* with ok 0: why not ("worker 1 ...; waiting for it to come back") */
    uint64_t restarts;  /* workers that came back after a failure, since creation */
    uint64_t give_ups;  /* times the launcher reported a worker given up for a while */
} nm_expert_health;

typedef struct nm_expert_backend nm_expert_backend;
struct nm_expert_backend {
    nm_expert_input in;
    /* layer < 0 with n_tok 0: an empty round trip (remote backends; `numoe
     * bench ipc` times the hand-off with it) */
    int (*submit)(nm_expert_backend *b, int layer, int64_t n_tok, int k, nm_err *err);
    int (*wait)(nm_expert_backend *b, float *out, nm_err *err);
    void (*destroy)(nm_expert_backend *b);
    /* Optional (NULL: a backend that cannot fail that way, always usable).
     * Called by the thread that drives the backend, between a wait and the
     * next submit, never while a layer is in flight: a backend that failed
     * re-arms itself here once it can work again (remote: every worker has
     * registered again and is idle), and says how it stands. Must not block
     * for long (a few ms). */
    void (*health)(nm_expert_backend *b, nm_expert_health *out);
};

static inline int nm_experts_submit(nm_expert_backend *b, int layer, int64_t n_tok, int k, nm_err *err) {
    return b->submit(b, layer, n_tok, k, err);
}
static inline int nm_experts_wait(nm_expert_backend *b, float *out, nm_err *err) { return b->wait(b, out, err); }

/* Checks a submit's size against the region: n_tok <= max_tok, 1 <= k <=
 * max_k (the layer is each backend's to check). 0, or -1 with err. */
int nm_experts_check(const nm_expert_backend *b, int64_t n_tok, int k, nm_err *err);

/* The whole round for inputs the caller holds elsewhere: copies x / ids / w
 * into the region (in chunks of max_tok tokens), submits and waits. For
 * callers with nothing to overlap (benchmarks). 0, or -1 with err. */
int nm_experts_run(nm_expert_backend *b, int layer, int64_t n_tok, const float *x, int k, const int32_t *ids,
                   const float *w, float *out, nm_err *err);

/* The region of max_tok tokens and max_k experts, in one page-aligned block
 * starting at x (x, then ids, then w), freed with nm_expert_input_free. 0,
 * or -1 with err. */
int nm_expert_input_alloc(nm_expert_input *in, int64_t n_embd, int64_t max_tok, int max_k, nm_err *err);
void nm_expert_input_free(nm_expert_input *in);

#endif
