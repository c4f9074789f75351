/* cmd_topology.c - `numoe topology [--workers N]`: the NUMA nodes hwloc
 * sees (cores, CPUs, memory, GPUs), the CUDA GPUs with where each sits (NUMA
 * node, PCIe link) and how each pair is linked, and, for N expert workers
 * (default one per node), the numactl command line that binds each one. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/opt.h"
#include "coordinator/engine/gpu/gpu_engine.h"
#include "launch/commands.h"
#include "launch/topology.h"

static int usage(FILE *f) {
    fprintf(f,
            "usage: numoe topology [--workers N] [--synthetic DESC] [--model M.gguf] [--placement P]\n"
            "\n"
            "  --workers N       workers to bind (default: one per NUMA node; more than the nodes splits\n"
            "                    each node's cores between its workers)\n"
            "  --synthetic DESC  an hwloc synthetic machine instead of this one, e.g.\n"
            "                    \"pack:2 numa:1 core:8 pu:2\" (also: $HWLOC_SYNTHETIC)\n"
            "  --model, --placement  filled into the printed numoe-worker command lines\n"
            "\n"
            "Also lists the CUDA GPUs (none with --synthetic): name, VRAM (free now), compute capability,\n"
            "SMs, PCI address, NUMA node and PCIe link (from sysfs; \"not reported\" where the platform\n"
            "hides them), and for each pair whether one maps the other's memory (peer access, over NVLink\n"
            "or PCIe) and CUDA's rank of the link (0 = the best on this machine).\n");
    return f == stdout ? 0 : 2;
}

static void print_bytes(uint64_t b) {
    if (!b) printf("memory unknown");
    else if (b >= (1ull << 30)) printf("%.1f GiB", (double)b / (double)(1ull << 30));
    else printf("%.1f MiB", (double)b / (double)(1ull << 20));
}

/* The CUDA GPUs, one line each, then one line per pair. A GPU the runtime
 * lists but cannot describe gets its error on its line. */
static void print_gpus(void) {
    char why[512];
    const int n = nm_gpu_usable(why, sizeof why);
    if (n <= 0) {
        printf("\nGPUs (CUDA): none usable (%s)\n", why);
        return;
    }
    printf("\nGPUs (CUDA): %d\n", n);
    for (int d = 0; d < n; d++) {
        nm_gpu_info g;
        nm_err err = {{0}};
        if (nm_gpu_info_of(d, &g, &err)) {
            printf("  gpu %d: %s\n", d, err.msg);
            continue;
        }
        const double GiB = 1024.0 * 1024.0 * 1024.0;
        printf("  gpu %d: %s, %.1f GiB (%.1f free), sm_%d%d, %d SMs; PCI %s, ", d, g.dev.name, (double)g.dev.vram / GiB,
               (double)g.dev.vram_free / GiB, g.dev.cc_major, g.dev.cc_minor, g.dev.n_sm, g.dev.pci);
        if (g.numa_node >= 0) printf("NUMA node %d, ", g.numa_node);
        else printf("NUMA node not reported, ");
        if (g.pcie_gen > 0 && g.pcie_width > 0) printf("PCIe %d.0 x%d\n", g.pcie_gen, g.pcie_width);
        else printf("PCIe link not reported\n");
    }
    for (int a = 0; a < n; a++)
        for (int b = a + 1; b < n; b++) {
            nm_gpu_peer ab, ba;
            nm_err err = {{0}};
            if (nm_gpu_link_of(a, b, &ab, &err) || nm_gpu_link_of(b, a, &ba, &err)) {
                printf("  gpu %d <-> gpu %d: %s\n", a, b, err.msg);
                continue;
            }
            if (ab.access && ba.access)
                printf("  gpu %d <-> gpu %d: peer access%s, link rank %d\n", a, b,
                       ab.atomics && ba.atomics ? " with native atomics" : "", ab.rank);
            else
                printf("  gpu %d <-> gpu %d: no peer access (copies go through host memory)\n", a, b);
        }
}

int nm_cmd_topology(int argc, char **argv) {
    const char *synthetic = NULL, *model = "M.gguf", *placement = "split";
    long workers = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return usage(stdout);
        if (i + 1 >= argc) {
            fprintf(stderr, "numoe topology: %s needs a value\n", a);
            return usage(stderr);
        }
        const char *v = argv[++i];
        if (!strcmp(a, "--synthetic")) synthetic = v;
        else if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--placement")) placement = v;
        else if (!strcmp(a, "--workers")) {
            long long x;
            if (nm_parse_int(v, 1, 4096, &x)) {
                fprintf(stderr, "numoe topology: bad value '%s' for --workers\n", v);
                return 2;
            }
            workers = (long)x;
        } else {
            fprintf(stderr, "numoe topology: unknown option %s\n", a);
            return usage(stderr);
        }
    }
    nm_topology t;
    nm_err err = {{0}};
    if (nm_topology_discover(&t, synthetic, 1, &err)) {
        fprintf(stderr, "numoe topology: %s\n", err.msg);
        return 1;
    }
    int cores = 0, pus = 0;
    for (int i = 0; i < t.n_nodes; i++) cores += t.nodes[i].n_cores, pus += t.nodes[i].n_pus;
    printf("%s: %d NUMA node%s, %d cores, %d CPUs\n", t.synthetic ? "synthetic machine" : "this machine", t.n_nodes,
           t.n_nodes == 1 ? "" : "s", cores, pus);
    for (int i = 0; i < t.n_nodes; i++) {
        const nm_numa_node *n = &t.nodes[i];
        printf("  node %d: %d cores, %d CPUs (", n->os_index, n->n_cores, n->n_pus);
        for (int j = 0; j < n->n_pus; j++) { /* ranges, as numactl writes them */
            int k = j;
            while (k + 1 < n->n_pus && n->pus[k + 1] == n->pus[k] + 1) k++;
            printf(k > j ? "%s%d-%d" : "%s%d", j ? "," : "", n->pus[j], n->pus[k]);
            j = k;
        }
        printf("), ");
        print_bytes(n->memory);
        for (int g = 0; g < n->n_gpus; g++) printf("%s%s", g ? ", " : "; GPUs: ", n->gpus[g]);
        printf("\n");
    }
    if (!t.synthetic) print_gpus();
    int N = workers ? (int)workers : t.n_nodes, rc = 0;
    printf("\n%d worker%s (%s):\n", N, N == 1 ? "" : "s",
           N == t.n_nodes ? "one per NUMA node"
           : N > t.n_nodes ? "each NUMA node's cores split between its workers"
                           : "each worker spans several NUMA nodes");
    for (int w = 0; w < N; w++) {
        char bind[8192];
        int node;
        if (nm_topology_worker_binding(&t, N, w, bind, sizeof bind, &node, &err)) {
            fprintf(stderr, "numoe topology: %s\n", err.msg);
            rc = 1;
            break;
        }
        (void)node; /* numactl binds; the worker runs unbound inside that (no --node) */
        printf("numactl %s numoe-worker --model %s --worker-id %d --workers %d --placement %s\n", bind, model, w, N,
               placement);
    }
    nm_topology_free(&t);
    return rc;
}
