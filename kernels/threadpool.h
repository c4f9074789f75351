/* threadpool.h - a persistent pool of threads for data-parallel kernels.
 *
 * nm_pool_run(pool, fn, ctx) calls fn(ctx, ith, nth) once for every ith in
 * [0, nth), nth = nm_pool_size(pool): ith 0 on the calling thread, the others
 * on the pool's workers, and returns when all calls have returned. Decode
 * runs it hundreds of times per token, so idle workers spin for a short
 * while (nm_pool_set_spin_us, default NM_POOL_SPIN_US) before they block on
 * a futex; the caller likewise spins, then blocks, while it waits.
 *
 * A pool serves one caller at a time: nm_pool_run must not be entered
 * concurrently or from inside fn on the same pool. Work splitting is up to
 * fn (see matmul.c for dynamic chunking). A NULL pool runs fn(ctx, 0, 1) on
 * the caller, so single-threaded callers need no pool. */
#ifndef NUMOE_KERNELS_THREADPOOL_H
#define NUMOE_KERNELS_THREADPOOL_H

typedef struct nm_pool nm_pool;

typedef void (*nm_pool_fn)(void *ctx, int ith, int nth);

#define NM_POOL_SPIN_US 200

/* n_threads counts the caller; <= 0 means one per CPU this process may run
 * on (its affinity mask, so numactl/taskset bindings are respected). NULL
 * if a thread or memory could not be had. */
nm_pool *nm_pool_create(int n_threads);
/* Stops and joins the workers. NULL is accepted. */
void nm_pool_destroy(nm_pool *pool);
/* Threads per run, caller included (1 for a NULL pool). */
int nm_pool_size(const nm_pool *pool);
void nm_pool_run(nm_pool *pool, nm_pool_fn fn, void *ctx);
/* How long idle threads poll before they sleep; 0 = sleep at once. */
void nm_pool_set_spin_us(nm_pool *pool, int us);
/* Keeps thread ith on the ith CPU this process may use (the caller's share
 * on the first one, pinned when it first calls nm_pool_run), so threads do
 * not migrate onto a core another polling thread holds: with a coordinator
 * and workers polling on the same node this turned 44-111 tok/s of decode
 * into a steady 88-112 (docs/NUMA.md). Does nothing (returns 0) when the
 * process may use fewer CPUs than the pool has threads. The caller decides
 * when it pays (coordinator/cli/session.c). */
int nm_pool_pin(nm_pool *pool);

#endif
