/* bench_prefill.h - the compute-bound side of a routed expert: one
 * expert's matrix against a prefill batch through the tile GEMMs
 * (kernels/tile.h), on the AMX tile unit and through VNNI, next to the
 * unit's peak. Part of `numoe bench kernels` (cmd_bench_kernels.c). */
#ifndef NUMOE_LAUNCH_BENCH_PREFILL_H
#define NUMOE_LAUNCH_BENCH_PREFILL_H

#include "kernels/threadpool.h"

/* Prints a table: n_tok tokens x DeepSeek-V3's gate of one expert (2048
 * rows of 7168, Q4_K, pre-packed tiles), per path (AMX nm_tile_gemm_many,
 * VNNI nm_tile_gemm) on 1 thread and on the pool's: milliseconds, int8
 * TOPS (2 per multiply-add) and the share of the AMX peak measured by a
 * register-only TDPBSUD loop on as many threads; whether both paths gave
 * the same bits. Where AMX is absent, one line says why ("AMX not available
 * on this CPU: ..."); where the VNNI tiles are too (or vnni is 0: --isa
 * below avx512vnni), one line and nothing else. Best of reps after a
 * warm-up. Returns 0, 1 if memory fails or the paths' bits differ. */
int nm_bench_prefill(nm_pool *pool, int n_tok, int reps, int vnni);

#endif
