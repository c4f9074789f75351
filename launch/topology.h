/* topology.h - the machine as numoe places workers on it: NUMA nodes with
 * their CPUs (PUs, OS numbering), cores and memory, and the GPUs hwloc sees
 * next to each node (hwloc; a synthetic description, e.g.
 * "pack:2 numa:1 core:8 pu:2", stands in for the real machine in tests). */
#ifndef NUMOE_LAUNCH_TOPOLOGY_H
#define NUMOE_LAUNCH_TOPOLOGY_H

#include <stdint.h>

#include "common/error.h"

typedef struct {
    int os_index;      /* NUMA node number (numactl --membind) */
    int n_cores;       /* cores with at least one PU in this node */
    int n_pus;
    int *core_pu0;     /* [n_cores + 1]: PUs of core c are pus[core_pu0[c] .. core_pu0[c+1]) */
    int *pus;          /* [n_pus] OS indices, grouped by core */
    uint64_t memory;   /* bytes local to the node (0 if unknown) */
    int n_gpus;
    char **gpus;       /* [n_gpus] names ("cuda0", "nvidia0", ...) */
} nm_numa_node;

typedef struct {
    int n_nodes;
    nm_numa_node *nodes;
    int synthetic;     /* built from a synthetic description */
} nm_topology;

/* synthetic NULL: the machine (or $HWLOC_SYNTHETIC / $HWLOC_XMLFILE when set).
 * with_gpus 0 skips the I/O (PCI) discovery: no GPU lists, and faster. */
int nm_topology_discover(nm_topology *t, const char *synthetic, int with_gpus, nm_err *err);
void nm_topology_free(nm_topology *t);

/* The numactl options binding worker w of n_workers: one worker per node
 * when n_workers == nodes; n_workers > nodes splits each node's cores
 * (--physcpubind=<its cores' PUs> --membind=<node>); n_workers < nodes gives
 * each worker a group of nodes (--cpunodebind=a,b --membind=a,b). Writes
 * into buf; *node gets the worker's first node. */
int nm_topology_worker_binding(const nm_topology *t, int n_workers, int w, char *buf, size_t size, int *node,
                               nm_err *err);

/* The CPUs (PUs, OS numbering) of worker w when there are more workers than
 * nodes and it shares its node: a contiguous share of the node's whole
 * cores. Returns how many were written to cpus[max] (0: the worker gets
 * whole nodes, see above), or -1 with err set; *node gets its node. */
int nm_topology_worker_cpus(const nm_topology *t, int n_workers, int w, int *cpus, int max, int *node, nm_err *err);

#endif
