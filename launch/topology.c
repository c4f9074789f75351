/* topology.c - hwloc discovery of NUMA nodes, cores, memory and GPUs
 * (topology.h). */
#include "launch/topology.h"

#include <hwloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void nm_topology_free(nm_topology *t) {
    for (int i = 0; i < t->n_nodes; i++) {
        nm_numa_node *n = &t->nodes[i];
        free(n->core_pu0), free(n->pus);
        for (int g = 0; g < n->n_gpus; g++) free(n->gpus[g]);
        free(n->gpus);
    }
    free(t->nodes);
    memset(t, 0, sizeof *t);
}

static int add_gpu(nm_numa_node *n, const char *name) {
    char **g = realloc(n->gpus, (size_t)(n->n_gpus + 1) * sizeof *g);
    if (!g) return -1;
    n->gpus = g;
    if (!(g[n->n_gpus] = strdup(name ? name : "gpu"))) return -1;
    n->n_gpus++;
    return 0;
}

int nm_topology_discover(nm_topology *t, const char *synthetic, int with_gpus, nm_err *err) {
    memset(t, 0, sizeof *t);
    hwloc_topology_t topo;
    if (hwloc_topology_init(&topo)) return nm_errf(err, "hwloc: cannot initialise a topology");
    if (!synthetic) synthetic = getenv("HWLOC_SYNTHETIC");
    if (synthetic && *synthetic) {
        if (hwloc_topology_set_synthetic(topo, synthetic)) {
            hwloc_topology_destroy(topo);
            return nm_errf(err, "hwloc: bad synthetic topology '%s'", synthetic);
        }
        t->synthetic = 1;
    }
    hwloc_topology_set_io_types_filter(topo, with_gpus ? HWLOC_TYPE_FILTER_KEEP_IMPORTANT : HWLOC_TYPE_FILTER_KEEP_NONE);
    if (hwloc_topology_load(topo)) {
        hwloc_topology_destroy(topo);
        return nm_errf(err, "hwloc: cannot load the topology");
    }
    int nn = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
    if (nn < 1) nn = 1;
    int rc = -1;
    t->nodes = calloc((size_t)nn, sizeof *t->nodes);
    if (!t->nodes) goto oom;
    t->n_nodes = nn;
    int ncores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
    for (int i = 0; i < nn; i++) {
        nm_numa_node *n = &t->nodes[i];
        hwloc_obj_t numa = hwloc_get_obj_by_type(topo, HWLOC_OBJ_NUMANODE, (unsigned)i);
        hwloc_const_cpuset_t cs = numa ? numa->cpuset : hwloc_topology_get_topology_cpuset(topo);
        n->os_index = numa ? (int)numa->os_index : 0;
        n->memory = numa ? numa->attr->numanode.local_memory : 0;
        int npu = hwloc_bitmap_weight(cs);
        n->pus = calloc((size_t)(npu > 0 ? npu : 1), sizeof *n->pus);
        n->core_pu0 = calloc((size_t)(ncores > 0 ? ncores : npu) + 2, sizeof *n->core_pu0);
        if (!n->pus || !n->core_pu0) goto oom;
        if (ncores > 0) {
            for (int c = 0; c < ncores; c++) {
                hwloc_obj_t core = hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, (unsigned)c);
                if (!hwloc_bitmap_intersects(core->cpuset, cs)) continue;
                n->core_pu0[n->n_cores] = n->n_pus;
                int pu;
                hwloc_bitmap_foreach_begin(pu, core->cpuset) {
                    if (hwloc_bitmap_isset(cs, (unsigned)pu) && n->n_pus < npu) n->pus[n->n_pus++] = pu;
                }
                hwloc_bitmap_foreach_end();
                n->n_cores++;
            }
        } else { /* no cores reported: one PU, one core */
            int pu;
            hwloc_bitmap_foreach_begin(pu, cs) {
                if (n->n_pus < npu) n->core_pu0[n->n_cores++] = n->n_pus, n->pus[n->n_pus++] = pu;
            }
            hwloc_bitmap_foreach_end();
        }
        n->core_pu0[n->n_cores] = n->n_pus;
    }
    /* GPUs: OS devices of type GPU or co-processor, under the node whose
     * CPUs are closest (their first non-I/O ancestor's nodeset). */
    for (hwloc_obj_t o = hwloc_get_next_osdev(topo, NULL); o; o = hwloc_get_next_osdev(topo, o)) {
        if (o->attr->osdev.type != HWLOC_OBJ_OSDEV_GPU && o->attr->osdev.type != HWLOC_OBJ_OSDEV_COPROC) continue;
        hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(topo, o);
        int at = 0;
        for (int i = 0; anc && anc->nodeset && i < nn; i++)
            if (hwloc_bitmap_isset(anc->nodeset, (unsigned)t->nodes[i].os_index)) {
                at = i;
                break;
            }
        if (add_gpu(&t->nodes[at], o->name)) goto oom;
    }
    rc = 0;
    goto done;
oom:
    nm_errf(err, "topology: out of memory");
    nm_topology_free(t);
done:
    hwloc_topology_destroy(topo);
    return rc;
}

/* "0-3,8,10-11" from a sorted copy of v[0..n) */
static int cmp_int(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static void list_ranges(const int *v0, int n, char *buf, size_t size) {
    int *v = malloc((size_t)(n > 0 ? n : 1) * sizeof *v);
    size_t at = 0;
    buf[0] = 0;
    if (!v) return;
    memcpy(v, v0, (size_t)n * sizeof *v);
    qsort(v, (size_t)n, sizeof *v, cmp_int);
    for (int i = 0; i < n && at < size;) {
        int j = i;
        while (j + 1 < n && v[j + 1] == v[j] + 1) j++;
        int r = j > i ? snprintf(buf + at, size - at, "%s%d-%d", at ? "," : "", v[i], v[j])
                      : snprintf(buf + at, size - at, "%s%d", at ? "," : "", v[i]);
        if (r < 0) break;
        at += (size_t)r;
        i = j + 1;
    }
    free(v);
}

int nm_topology_worker_binding(const nm_topology *t, int n_workers, int w, char *buf, size_t size, int *node,
                               nm_err *err) {
    const int nn = t->n_nodes;
    if (n_workers < 1 || w < 0 || w >= n_workers || nn < 1)
        return nm_errf(err, "topology: worker %d of %d on %d NUMA nodes", w, n_workers, nn);
    if (n_workers <= nn) { /* worker w gets nodes [nn*w/N, nn*(w+1)/N) */
        int a = nn * w / n_workers, b = nn * (w + 1) / n_workers;
        int ids[4096], k = 0;
        for (int i = a; i < b && k < 4096; i++) ids[k++] = t->nodes[i].os_index;
        char nodes[1024];
        list_ranges(ids, k, nodes, sizeof nodes);
        snprintf(buf, size, "--cpunodebind=%s --membind=%s", nodes, nodes);
        *node = t->nodes[a].os_index;
        return 0;
    }
    int cpus[4096], n = nm_topology_worker_cpus(t, n_workers, w, cpus, 4096, node, err);
    if (n < 0) return -1;
    char list[4096];
    list_ranges(cpus, n, list, sizeof list);
    snprintf(buf, size, "--physcpubind=%s --membind=%d", list, *node);
    return 0;
}

int nm_topology_worker_cpus(const nm_topology *t, int n_workers, int w, int *cpus, int max, int *node, nm_err *err) {
    const int nn = t->n_nodes;
    if (n_workers < 1 || w < 0 || w >= n_workers || nn < 1)
        return nm_errf(err, "topology: worker %d of %d on %d NUMA nodes", w, n_workers, nn);
    if (n_workers <= nn) return 0;
    /* more workers than nodes: node i runs workers [N*i/nn, N*(i+1)/nn), each on
     * a contiguous share of its cores (whole cores: hyper-threads stay together) */
    int i = 0;
    while (i + 1 < nn && w >= (int)((int64_t)n_workers * (i + 1) / nn)) i++;
    int w0 = (int)((int64_t)n_workers * i / nn), w1 = (int)((int64_t)n_workers * (i + 1) / nn), per = w1 - w0;
    const nm_numa_node *nd = &t->nodes[i];
    if (nd->n_cores < per)
        return nm_errf(err, "topology: NUMA node %d has %d cores, fewer than its %d workers", nd->os_index,
                       nd->n_cores, per);
    int c0 = nd->n_cores * (w - w0) / per, c1 = nd->n_cores * (w - w0 + 1) / per;
    int n = nd->core_pu0[c1] - nd->core_pu0[c0];
    if (n > max) n = max;
    memcpy(cpus, nd->pus + nd->core_pu0[c0], (size_t)n * sizeof *cpus);
    *node = nd->os_index;
    return n;
}
