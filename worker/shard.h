/* shard.h - the routed-expert weights one worker holds, copied out of the
 * model mapping into memory the worker owns (allocated after the NUMA
 * binding and first touched by the worker's own threads, so it lives on the
 * worker's node), and the MoE computation over them.
 *
 * For a piece (expert e, ff rows [f0, f1)) the shard holds gate and up rows
 * [f0, f1) as they are in the file, and the down matrix repacked into n_embd
 * contiguous rows of (f1 - f0) columns (bytes [f0, f1) of each quantised row,
 * f0/f1 on block boundaries). Per layer the pieces are grouped by width;
 * each group is one nm_moe_experts table (NULL for experts held elsewhere),
 * so the shared kernel (kernels/moe.h) computes it unchanged. Groups are
 * summed in a fixed order.
 *
 * Persistence: with a segment name (nm_shard_seg) the weights live in a
 * file under /dev/shm that outlives the worker process: the first start
 * builds it under "<name>.tmp", writes a header (magic, model identity,
 * placement hash, sizes) last and renames it into place; every start then
 * maps it READ-ONLY. A restarted worker whose header matches re-maps it
 * without copying anything out of the model (s->reused = 1). The
 * coordinator removes the name at exit; a worker whose coordinator is gone
 * removes it too (worker/main.c). */
#ifndef NUMOE_WORKER_SHARD_H
#define NUMOE_WORKER_SHARD_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "model/model.h"
#include "kernels/moe.h"
#include "kernels/threadpool.h"
#include "model/placement.h"

typedef struct {
    int n_groups;
    nm_moe_experts *groups;
} nm_shard_layer;

typedef struct {
    int64_t n_layer, n_embd, n_expert;
    nm_shard_layer *layers;    /* [n_layer]; n_groups 0 = nothing held in that layer */
    const void **ptrs;         /* pointer tables of all groups */
    uint8_t *mem;              /* the weights (anonymous mmap, or inside map) */
    size_t mem_bytes;
    uint8_t *map;              /* persistent segment: header page + weights, mapped read-only */
    size_t map_bytes;
    int reused;                /* 1: an existing segment was re-mapped, nothing copied */
    uint64_t weight_bytes;     /* bytes of weights held (what the model's routed bytes split into) */
    float *tmp;                /* group partial sums */
    int64_t tmp_tok;
    nm_moe_scratch scratch;
} nm_shard;

/* Where and for what a persistent shard is kept (all fields go into its header). */
typedef struct {
    const char *name;          /* POSIX shm style name, "/numoe-<coordinator pid>-shard-<id>" */
    uint64_t file_bytes, header_hash, placement_hash;
    uint32_t n_workers, kind;
} nm_shard_seg;

/* Copies worker's pieces of p out of the mapped model using pool's threads.
 * node >= 0: the memory is bound to that NUMA node. seg != NULL: keep the
 * weights in that persistent segment (re-map it read-only if it is already
 * there and its header matches). */
int nm_shard_build(nm_shard *s, const nm_model *m, const nm_placement *p, int worker, int node, nm_pool *pool,
                   const nm_shard_seg *seg, nm_err *err);
/* out[t] = this worker's part of the layer's routed-expert output for the
 * tokens (x: [n_tok][n_embd]; ids, w: [n_tok][k]). */
int nm_shard_moe(nm_shard *s, nm_pool *pool, int layer, int64_t n_tok, const float *x, int k, const int32_t *ids,
                 const float *w, float *out, nm_err *err);
void nm_shard_free(nm_shard *s);

#endif
