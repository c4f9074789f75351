/* moe.h - routed-expert FFN for a batch of tokens over the experts one
 * process holds (the coordinator's in-process backend and every worker run
 * this same code).
 *
 *   out[t] = sum_j w[t][j] * down_e( silu(gate_e x[t]) * up_e x[t] ),  e = ids[t][j]
 *
 * (DeepSeek-V2 eq. for the routed part of h'_t; the shared experts and the
 * residual are the caller's.) Experts whose pointers are NULL are not held
 * here and are skipped, so a worker computes a partial sum over its shard.
 *
 * Work is grouped by expert: each expert's weight rows are read once per call
 * and applied to all the tokens routed to it, so prefill is matrix-matrix and
 * decode is a few GEMVs: gate+up, then down, in thread-pool passes whose
 * order is the schedule below. Where the types have tiles (kernels/tile.h)
 * the products are the tile numbers, and in the staged schedule an expert
 * with 16 or more pairs runs them on the AMX tile unit where this process
 * may use it (nm_tile_amx_usable): the same bits, so out does not depend on
 * the CPU's AMX either. */
#ifndef NUMOE_KERNELS_MOE_H
#define NUMOE_KERNELS_MOE_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/threadpool.h"

/* nm_moe_experts.tiled: which matrices are held as pre-packed tiles */
enum {
    NM_MOE_TILED_GATE_UP = 1, /* gate[e] and up[e] */
    NM_MOE_TILED_DOWN = 2,    /* down[e] */
};

/* Pre-packed tiles (tiled): a matrix flagged there is not rows but
 * nm_tile_pack_matrix of them (kernels/tile.h): gate[e] and up[e] hold
 * ceil(n_ff / 16) tiles of nm_tile_size(type, n_embd) bytes, tile t =
 * rows [16t, 16t + 16); down[e] ceil(n_embd / 16) tiles of
 * nm_tile_size(type_down, n_ff) bytes; row_* of those matrices is unused.
 * Set a flag only where nm_tile_usable of its types (both of gate and up)
 * holds, else nm_moe_forward refuses the call. The numbers are those of
 * the rows packed per call (tile.h's contract): the flag changes where the
 * packing happens, not one bit of out. Prefill then reads each expert's
 * tiles as they are; decode (one token per expert) runs the tile GEMM for
 * one activation row over the same bytes, so whoever holds tiles need not
 * hold the rows as well. */
typedef struct {
    int64_t n_embd;   /* model width: gate/up row length, down row count */
    int64_t n_ff;     /* rows of gate/up (= row length of down) held per expert */
    int64_t n_expert; /* size of the pointer tables */
    int type_gate, type_up, type_down;
    size_t row_gate, row_up, row_down;     /* bytes per row */
    const void *const *gate, *const *up, *const *down; /* [n_expert]; NULL = not held here */
    unsigned tiled;   /* NM_MOE_TILED_* bits: those matrices are pre-packed tiles (above); 0 = rows */
} nm_moe_experts;

/* How a call's work is ordered between the pool's threads (moe.c):
 * STAGED: four pool runs (x quantised; gate+up; h quantised; down), for
 * batches; FUSED: one run in which down units wait per expert for its
 * gate+up units, for a few tokens (decode), where the stages' barriers and
 * tails cost more than the work between them. Both give the same bits.
 * AUTO: FUSED up to 8 tokens, else STAGED; NUMOE_MOE_SCHEDULE=auto|staged|
 * fused picks one for every call whose scratch says AUTO. */
enum { NM_MOE_AUTO = 0, NM_MOE_STAGED = 1, NM_MOE_FUSED = 2 };

/* Growable buffers reused across calls; the caller owns it (zero-init, then
 * nm_moe_scratch_free). Not shared between concurrent calls. schedule: an
 * NM_MOE_* value (0: AUTO). */
typedef struct {
    void *buf;
    size_t cap;
    int schedule;
} nm_moe_scratch;

void nm_moe_scratch_free(nm_moe_scratch *s);

/* x, out: [n_tok][n_embd] float32; ids, w: [n_tok][k]. out is overwritten.
 * Returns 0, or -1 if the scratch cannot grow, an expert id is out of range,
 * tiled asks for tiles this CPU or type cannot run or NUMOE_MOE_SCHEDULE
 * names no schedule (message in errbuf when non-NULL). */
int nm_moe_forward(nm_pool *pool, nm_moe_scratch *s, const nm_moe_experts *ex, int64_t n_tok, const float *x, int k,
                   const int32_t *ids, const float *w, float *out, char *errbuf, size_t errlen);

#endif
