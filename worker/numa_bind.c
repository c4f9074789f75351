/* numa_bind.c - hwloc finds the node and binds CPUs and memory (numa_bind.h). */
#include "worker/numa_bind.h"

#include <errno.h>
#include <hwloc.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>

static void node_list(hwloc_topology_t t, char *buf, size_t len) {
    int n = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_NUMANODE);
    size_t at = 0;
    buf[0] = 0;
    for (int i = 0; i < n && at + 16 < len; i++) {
        hwloc_obj_t o = hwloc_get_obj_by_type(t, HWLOC_OBJ_NUMANODE, (unsigned)i);
        at += (size_t)snprintf(buf + at, len - at, "%s%u", i ? ", " : "", o->os_index);
    }
}

int nm_bind_node(int node, nm_binding *b, nm_err *err) {
    hwloc_topology_t t;
    memset(b, 0, sizeof *b);
    b->node = -1;
    if (hwloc_topology_init(&t) || hwloc_topology_load(t)) return nm_errf(err, "hwloc cannot read the topology");
    int rc = -1;
    hwloc_bitmap_t set = hwloc_bitmap_alloc();
    if (!set) {
        nm_errf(err, "out of memory");
        goto out;
    }
    if (node >= 0) {
        hwloc_obj_t o = hwloc_get_numanode_obj_by_os_index(t, (unsigned)node);
        if (!o) {
            char nodes[256];
            node_list(t, nodes, sizeof nodes);
            int n = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_NUMANODE);
            nm_errf(err, "NUMA node %d does not exist; this machine has %d node%s: %s", node, n, n == 1 ? "" : "s",
                    nodes);
            goto out;
        }
        if (hwloc_bitmap_iszero(o->cpuset)) {
            nm_errf(err, "NUMA node %d has no CPUs (memory-only node); bind workers to a node with cores", node);
            goto out;
        }
        /* a launcher that pinned us to a share of the node (several workers on
         * it) keeps that share: bind to the node's CPUs we may already use */
        hwloc_bitmap_t cpus = hwloc_bitmap_dup(o->cpuset), cur = hwloc_bitmap_alloc();
        if (cpus && cur && !hwloc_get_cpubind(t, cur, HWLOC_CPUBIND_PROCESS) && hwloc_bitmap_intersects(cpus, cur))
            hwloc_bitmap_and(cpus, cpus, cur);
        if (cur) hwloc_bitmap_free(cur);
        if (!cpus) {
            nm_errf(err, "out of memory");
            goto out;
        }
        int bad = hwloc_set_cpubind(t, cpus, HWLOC_CPUBIND_PROCESS);
        hwloc_bitmap_free(cpus);
        if (bad) {
            nm_errf(err, "cannot bind to the CPUs of NUMA node %d: %s", node, strerror(errno));
            goto out;
        }
        /* memory: strict binding; a machine without NUMA support (one node) may refuse, harmlessly.
         * THREAD, not PROCESS: Linux keeps a memory policy per thread (set_mempolicy) and
         * hwloc has no process-wide one there, so PROCESS fails with ENOSYS on every
         * machine with two nodes (seen first in tests/test_numa_vm.py). Threads started
         * after this (the compute pool) inherit it; the shard is bound by address
         * (worker/shard.c), so a thread started before (ZeroMQ's I/O thread) changes
         * nothing there. STRICT: without it hwloc asks Linux for MPOL_PREFERRED(_MANY),
         * which spills to the other node when this one is full, silently. */
        if (hwloc_set_membind(t, o->nodeset, HWLOC_MEMBIND_BIND,
                              HWLOC_MEMBIND_THREAD | HWLOC_MEMBIND_STRICT | HWLOC_MEMBIND_BYNODESET) &&
            hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_NUMANODE) > 1) {
            nm_errf(err, "cannot bind memory to NUMA node %d: %s", node, strerror(errno));
            goto out;
        }
        b->node = node;
    }
    if (hwloc_get_cpubind(t, set, HWLOC_CPUBIND_PROCESS)) {
        cpu_set_t cs;
        int n = sched_getaffinity(0, sizeof cs, &cs) ? 1 : CPU_COUNT(&cs);
        b->cpus = b->cores = n;
    } else {
        b->cpus = hwloc_bitmap_weight(set);
        b->cores = hwloc_get_nbobjs_inside_cpuset_by_type(t, set, HWLOC_OBJ_CORE);
        if (b->cores <= 0) b->cores = b->cpus;
    }
    rc = 0;
out:
    if (set) hwloc_bitmap_free(set);
    hwloc_topology_destroy(t);
    return rc;
}
