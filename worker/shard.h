/* shard.h - the routed-expert weights one worker holds, copied out of the
 * model mapping into memory the worker owns (allocated after the NUMA
 * binding and first touched by the worker's own threads, so it lives on the
 * worker's node), and the MoE computation over them.
 *
 * For a piece (expert e, ff rows [f0, f1)) the shard holds gate and up rows
 * [f0, f1) as they are in the file, and the down matrix repacked into n_embd
 * contiguous rows of (f1 - f0) columns (bytes [f0, f1) of each quantised row,
 * f0/f1 on block boundaries). In RAM mode, a matrix whose type has tiles
 * this CPU runs (nm_tile_usable, kernels/tile.h) is held instead as those
 * rows packed into tiles, once, at build (nm_moe_experts.tiled): 16 rows of
 * gate/up (n_embd columns) or of the repacked down (f1 - f0 columns) a tile,
 * about the rows' bytes (Q4_K 1.028x, Q5_0 1.0x), computed with no packing
 * per call and the bits of the rows packed per call. weight_bytes still
 * counts the rows (what the model's routed bytes split into); mem_bytes is
 * what is held. Per layer the pieces are grouped by width;
 * each group is one nm_moe_experts table (NULL for experts held elsewhere),
 * so the shared kernel (kernels/moe.h) computes it unchanged. Groups are
 * summed in a fixed order.
 *
 * Two memory modes (nm_shard_build's mode):
 *   NM_SHARD_RAM   the copy above, in memory the worker owns: a memfd the
 *                  launcher created and holds (nm_shard_seg.fd, inherited),
 *                  so the shard outlives a worker process and is not bound
 *                  by /dev/shm's size; the pages are bound to the worker's
 *                  node, reserved with fallocate before anything is copied
 *                  (a clear error, not a SIGBUS, when memory is short) and
 *                  asked for as transparent huge pages (madvise; shmem's
 *                  THP setting decides) or, for a hugetlb memfd, explicit
 *                  ones. Without a seg: anonymous memory, gone with the
 *                  process.
 *   NM_SHARD_FILE  nothing copied: the tables point into the model's
 *                  read-only mapping (the caller keeps it open while the
 *                  shard lives), the file's own layout (down keeps its full
 *                  row stride: row_down is the stride in kernels/moe.c). The
 *                  page cache is shared with every other process mapping the
 *                  file, pages are evicted under pressure and read back on
 *                  the next touch; nm_shard_moe asks for the routed experts'
 *                  byte ranges (MADV_WILLNEED) before it computes.
 *
 * Persistence (RAM with a seg): the first start sizes the memfd, copies,
 * and writes a header (magic, model identity, placement hash, sizes, tile
 * layout) last;
 * every start then maps it READ-ONLY. A restarted worker whose header
 * matches re-maps it without copying anything out of the model
 * (s->reused = 1); one killed half-way left no header, so the next start
 * rebuilds. The memory goes when the launcher and the workers have closed
 * the fd (nothing to remove by name). */
#ifndef NUMOE_WORKER_SHARD_H
#define NUMOE_WORKER_SHARD_H

#include <stddef.h>
#include <stdint.h>

#include <pthread.h>
#include <stdatomic.h>

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
    const uint8_t *p;
    size_t n;
} nm_shard_span;

typedef struct {
    int64_t n_layer, n_embd, n_expert;
    nm_shard_layer *layers;    /* [n_layer]; n_groups 0 = nothing held in that layer */
    const void **ptrs;         /* pointer tables of all groups */
    int mode;                  /* NM_SHARD_RAM or NM_SHARD_FILE */
    uint8_t *mem;              /* the weights (anonymous mmap, or inside map); NULL in FILE mode */
    size_t mem_bytes;
    uint8_t *map;              /* persistent segment: header page + weights, mapped read-only */
    size_t map_bytes;
    int reused;                /* 1: an existing segment was re-mapped, nothing copied */
    uint64_t weight_bytes;     /* bytes of weights held (what the model's routed bytes split into) */
    uint64_t tiled_bytes;      /* of mem_bytes, those holding matrices as pre-packed tiles (RAM mode) */
    float *tmp;                /* group partial sums */
    int64_t tmp_tok;
    nm_moe_scratch scratch;
    nm_shard_span *spans;      /* FILE: [n_layer][n_expert][3] gate, up, down bytes in the mapping
                                * ({NULL, 0}: held elsewhere), for the read-ahead advice */
    /* the thread that maps the read-only segment's pages in after a build or
     * a restart (shard.c populate_task); nm_shard_free stops and joins it */
    pthread_t populate;
    int populating;
    atomic_int populate_stop;
} nm_shard;

enum { NM_SHARD_RAM = 0, NM_SHARD_FILE = 1 };

/* Where and for what a persistent shard is kept (all fields but fd and
 * label go into its header). */
typedef struct {
    int fd;                    /* a memfd (or any shmem / hugetlbfs file) the launcher holds */
    const char *label;         /* how messages name it ("memfd numoe-<launcher pid>-shard-<id>") */
    uint64_t file_bytes, header_hash, placement_hash;
    uint32_t n_workers, kind;
} nm_shard_seg;

/* RAM: copies worker's pieces of p out of the mapped model using pool's
 * threads, with progress on stderr labelled label (common/progress.h).
 * node >= 0: the memory is bound to that NUMA node. seg != NULL: keep the
 * weights in that persistent segment (re-map it read-only if it already
 * holds them). FILE: points into m's mapping (seg, node unused). */
int nm_shard_build(nm_shard *s, const nm_model *m, const nm_placement *p, int worker, int node, nm_pool *pool,
                   int mode, const nm_shard_seg *seg, const char *label, nm_err *err);
/* out[t] = this worker's part of the layer's routed-expert output for the
 * tokens (x: [n_tok][n_embd]; ids, w: [n_tok][k]). */
int nm_shard_moe(nm_shard *s, nm_pool *pool, int layer, int64_t n_tok, const float *x, int k, const int32_t *ids,
                 const float *w, float *out, nm_err *err);
void nm_shard_free(nm_shard *s);

#endif
