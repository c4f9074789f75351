/* bench_moe.h - the routed experts of one decode token through
 * nm_moe_forward (kernels/moe.h), as the coordinator's in-process backend
 * and every worker run them: the part of a hybrid decode step the CPU
 * owns. Part of `numoe bench kernels` (cmd_bench_kernels.c). */
#ifndef NUMOE_LAUNCH_BENCH_MOE_H
#define NUMOE_LAUNCH_BENCH_MOE_H

#include "kernels/threadpool.h"

#include <stddef.h>

/* Prints a table: per expert shape in the comma-separated list shapes
 * ("v2-lite", "v3"), per layout (rows as in the GGUF, tiles as a worker's
 * shard holds them) and schedule (moe.h), microseconds per call and GB/s of
 * expert bytes read, against read_gbs (the all-threads read bandwidth).
 * Each shape holds as many experts as budget bytes take (twice: rows and
 * tiles); llc (bytes, <= 0 unknown) flags a budget too small to defeat the
 * last-level cache. Returns 0, 1 if memory or a call fails, 2 for an
 * unknown shape. */
int nm_bench_moe_decode(nm_pool *pool, const char *shapes, int reps, double read_gbs, size_t budget, long llc);

#endif
