/* memory.c - memory the workers may use (memory.h). */
#include "launch/memory.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/ggml_type.h"

static void take(nm_mem_avail *o, uint64_t bytes, const char *what) {
    if (bytes < o->bytes) o->bytes = bytes, snprintf(o->what, sizeof o->what, "%s", what);
}

/* One number from a file, "max" as UINT64_MAX; 0 if unreadable. */
static int read_u64(const char *path, uint64_t *v) {
    FILE *f = fopen(path, "r");
    char buf[64];
    int ok = f && fgets(buf, sizeof buf, f);
    if (f) fclose(f);
    if (!ok) return 0;
    if (!strncmp(buf, "max", 3)) *v = UINT64_MAX;
    else *v = strtoull(buf, NULL, 10);
    return 1;
}

/* The value of "key N" in a memory.stat style file, 0 if absent. */
static uint64_t stat_key(const char *path, const char *key) {
    FILE *f = fopen(path, "r");
    char line[256];
    uint64_t v = 0;
    size_t kl = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, kl) && line[kl] == ' ') {
            v = strtoull(line + kl + 1, NULL, 10);
            break;
        }
    if (f) fclose(f);
    return v;
}

/* Every memory cgroup from this process's up to the root. */
static void cgroup_limits(nm_mem_avail *o) {
    FILE *f = fopen("/proc/self/cgroup", "r");
    char line[1024];
    while (f && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2) continue;
        int v2 = c1[1] == ':';
        if (!v2 && strncmp(c1 + 1, "memory:", 7)) continue;
        char base[64];
        if (v2) {
            if (access("/sys/fs/cgroup/cgroup.controllers", R_OK)) continue; /* not the unified mount */
            snprintf(base, sizeof base, "/sys/fs/cgroup");
        } else {
            snprintf(base, sizeof base, "/sys/fs/cgroup/memory");
        }
        char rel[800];
        snprintf(rel, sizeof rel, "%s", c2 + 1);
        for (;;) {
            char dir[1000], p[1100];
            snprintf(dir, sizeof dir, "%s%s", base, rel);
            uint64_t lim = UINT64_MAX, use = 0, cache;
            snprintf(p, sizeof p, "%s/%s", dir, v2 ? "memory.max" : "memory.limit_in_bytes");
            int have = read_u64(p, &lim);
            snprintf(p, sizeof p, "%s/%s", dir, v2 ? "memory.current" : "memory.usage_in_bytes");
            read_u64(p, &use);
            snprintf(p, sizeof p, "%s/memory.stat", dir);
            cache = stat_key(p, v2 ? "file" : "total_cache");
            /* v1 writes "no limit" as a page-rounded LONG_MAX */
            if (have && lim < ((uint64_t)1 << 60)) {
                uint64_t free_ = lim > use ? lim - use : 0;
                char what[1000];
                snprintf(what, sizeof what, "cgroup memory limit %.60s: %.2f GiB, %.2f GiB in use of which %.2f GiB "
                         "page cache", rel[0] ? rel : "/", (double)lim / 1073741824.0, (double)use / 1073741824.0,
                         (double)cache / 1073741824.0);
                take(o, free_ + (cache < use ? cache : use), what);
            }
            if (!rel[0] || !strcmp(rel, "/")) break; /* the root was the last */
            char *slash = strrchr(rel, '/');
            if (!slash) break;
            if (slash == rel) rel[1] = 0;
            else *slash = 0;
        }
    }
    if (f) fclose(f);
}

void nm_mem_available(int node, nm_mem_avail *o) {
    o->bytes = UINT64_MAX;
    snprintf(o->what, sizeof o->what, "no limit known");
    unsigned long long kb;
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
            char what[64];
            snprintf(what, sizeof what, "MemAvailable %.2f GiB", (double)kb / 1048576.0);
            take(o, (uint64_t)kb * 1024, what);
        }
    if (f) fclose(f);
    cgroup_limits(o);
    if (node >= 0) {
        char p[96];
        snprintf(p, sizeof p, "/sys/devices/system/node/node%d/meminfo", node);
        unsigned long long fr = 0, fp = 0;
        int n = 0;
        f = fopen(p, "r");
        while (f && fgets(line, sizeof line, f)) {
            int id;
            n += sscanf(line, "Node %d MemFree: %llu kB", &id, &fr) == 2;
            n += sscanf(line, "Node %d FilePages: %llu kB", &id, &fp) == 2;
        }
        if (f) fclose(f);
        if (n == 2) {
            char what[96];
            snprintf(what, sizeof what, "NUMA node %d: %.2f GiB free + %.2f GiB page cache", node,
                     (double)fr / 1048576.0, (double)fp / 1048576.0);
            take(o, (uint64_t)(fr + fp) * 1024, what);
        }
    }
}

uint64_t nm_mem_shard_bytes(const nm_model *m, const nm_placement *p, int worker) {
    uint64_t b = 0;
    for (int64_t l = 0; l < m->hp.n_layer; l++) {
        const nm_layer *L = &m->layers[l];
        if (!L->is_moe) continue;
        for (int64_t e = 0; e < p->n_expert; e++) {
            size_t c = (size_t)(l * p->n_expert + e);
            for (int i = 0; i < p->n_pieces[c]; i++) {
                const nm_piece *q = &p->pieces[c * (size_t)p->n_workers + (size_t)i];
                if (q->worker != worker) continue;
                uint64_t wd = (uint64_t)(q->f1 - q->f0);
                b += wd * (L->gate_exps.row_bytes + L->up_exps.row_bytes) +
                     (uint64_t)m->hp.n_embd * nm_row_size(L->down_exps.type, (int64_t)wd);
            }
        }
    }
    return b;
}
