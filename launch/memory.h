/* memory.h - the memory a run's workers may use, and the shard memory mode
 * it leads to (worker/shard.h: ram = a copy in a memfd the launcher holds,
 * file = computing from the model file's pages).
 *
 * "May use" is the smallest of: the machine's MemAvailable; for each memory
 * cgroup from this process's up to the root (v2 memory.max, v1
 * memory.limit_in_bytes), the limit less what is charged plus the page cache
 * charged there (reclaimable); with a NUMA node named, that node's MemFree
 * plus its file pages. Auto picks file when the workers' shards together
 * (or those on one node) exceed 90% of it: the coordinator's own weights,
 * KV cache and slots need the rest. */
#ifndef NUMOE_LAUNCH_MEMORY_H
#define NUMOE_LAUNCH_MEMORY_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"
#include "model/placement.h"

enum { NM_SHARD_MEMORY_AUTO = 0, NM_SHARD_MEMORY_RAM = 1, NM_SHARD_MEMORY_FILE = 2 };

typedef struct {
    uint64_t bytes;    /* what may be used; UINT64_MAX: nothing known */
    char what[1000];   /* which limit that is ("cgroup memory limit /a/b: 4.00 GiB, 1.20 GiB in use") */
} nm_mem_avail;

/* node < 0: the machine and the cgroups; node >= 0: that node as well. */
void nm_mem_available(int node, nm_mem_avail *out);
/* Bytes of routed-expert weights worker holds under p (as its shard counts them). */
uint64_t nm_mem_shard_bytes(const nm_model *m, const nm_placement *p, int worker);

#endif
