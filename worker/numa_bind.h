/* numa_bind.h - binding a worker's threads and memory to one NUMA node. */
#ifndef NUMOE_WORKER_NUMA_BIND_H
#define NUMOE_WORKER_NUMA_BIND_H

#include "common/error.h"

typedef struct {
    int node;  /* bound node, -1 = not bound */
    int cpus;  /* logical CPUs the process may run on afterwards */
    int cores; /* physical cores among them */
} nm_binding;

/* node >= 0: binds the whole process (all its threads) to the CPUs of that
 * node, and the memory allocations of the calling thread and of the threads
 * it starts afterwards to that node, strictly (Linux keeps memory policy per
 * thread: call it before starting threads that allocate).
 * A node that does not exist, or has no CPUs, is a clear error naming the
 * nodes that do. node < 0: no binding; only fills in the counts. */
int nm_bind_node(int node, nm_binding *b, nm_err *err);

#endif
