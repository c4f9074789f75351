/* routing_profile.c - reading routing records (routing_profile.h). */
#include "model/routing_profile.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int nm_routing_profile_load(nm_routing_profile *pr, const char *path, int64_t n_layer, const uint8_t *is_moe,
                            int64_t n_expert, int64_t k, nm_err *err) {
    memset(pr, 0, sizeof *pr);
    FILE *f = fopen(path, "rb");
    if (!f) return nm_errf(err, "cannot read %s: %s", path, strerror(errno));
    size_t rl = (size_t)(k + 2) * sizeof(int32_t), cap = 0, n = 0;
    int32_t *v = NULL;
    for (;;) {
        if (n == cap) {
            cap = cap ? cap * 2 : 4096;
            int32_t *nv = realloc(v, cap * rl);
            if (!nv) {
                free(v), fclose(f);
                return nm_errf(err, "%s: out of memory", path);
            }
            v = nv;
        }
        size_t r = fread((char *)v + n * rl, 1, rl, f);
        if (r == 0) break;
        if (r != rl) {
            free(v), fclose(f);
            return nm_errf(err, "%s: ends inside a record (records are %zu bytes: position, layer and %lld expert "
                           "ids; is --k / the model's expert_used_count right?)", path, rl, (long long)k);
        }
        const int32_t *q = v + n * (size_t)(k + 2);
        if (q[1] < 0 || q[1] >= n_layer || !is_moe[q[1]]) {
            nm_errf(err, "%s: record %zu (position %d): layer %d is not a MoE layer of this model", path, n, q[0],
                    q[1]);
            free(v), fclose(f);
            return -1;
        }
        for (int64_t j = 0; j < k; j++)
            if (q[2 + j] < 0 || q[2 + j] >= n_expert) {
                nm_errf(err, "%s: record %zu (position %d, layer %d): expert %d is outside [0, %lld)", path, n, q[0],
                        q[1], q[2 + j], (long long)n_expert);
                free(v), fclose(f);
                return -1;
            }
        n++;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(v);
        return nm_errf(err, "%s: read error", path);
    }
    if (!n) {
        free(v);
        return nm_errf(err, "%s: no routing records", path);
    }
    pr->rec = v, pr->n = n, pr->k = k;
    return 0;
}

void nm_routing_profile_free(nm_routing_profile *pr) {
    free(pr->rec);
    memset(pr, 0, sizeof *pr);
}

void nm_routing_profile_count(const nm_routing_profile *pr, int64_t n_layer, int64_t n_expert, uint32_t *counts) {
    memset(counts, 0, (size_t)(n_layer * n_expert) * sizeof *counts);
    for (size_t i = 0; i < pr->n; i++) {
        const int32_t *q = pr->rec + i * (size_t)(pr->k + 2);
        for (int64_t j = 0; j < pr->k; j++) counts[q[1] * n_expert + q[2 + j]]++;
    }
}
