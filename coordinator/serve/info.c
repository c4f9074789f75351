/* info.c - the served model name and the /api/tags figures. */
#include "coordinator/serve/info.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "kernels/quant.h"

static void copy_out(char *out, size_t cap, const char *s, size_t n) {
    if (!cap) return;
    if (n >= cap) n = cap - 1;
    memcpy(out, s, n);
    out[n] = 0;
}

/* Length of a "-DIGITS-of-DIGITS" suffix ending at s + n, or 0. */
static size_t split_suffix_len(const char *s, size_t n) {
    size_t i = n, d2 = 0, d1 = 0;
    while (i > 0 && isdigit((unsigned char)s[i - 1])) i--, d2++;
    if (!d2 || i < 4 || memcmp(s + i - 4, "-of-", 4)) return 0;
    i -= 4;
    while (i > 0 && isdigit((unsigned char)s[i - 1])) i--, d1++;
    if (!d1 || i < 1 || s[i - 1] != '-') return 0;
    return n - (i - 1);
}

char *nm_serve_model_name(const char *path, char *out, size_t cap) {
    if (!path || !*path) {
        copy_out(out, cap, "model", 5);
        return out;
    }
    size_t plen = strlen(path);
    while (plen > 1 && path[plen - 1] == '/') plen--; /* "dir/" names the directory */
    const char *base = path;
    for (size_t i = 0; i < plen; i++)
        if (path[i] == '/' && i + 1 < plen) base = path + i + 1;
    size_t n = plen - (size_t)(base - path);
    if (n == 1 && base[0] == '/') {
        copy_out(out, cap, "model", 5);
        return out;
    }
    size_t full = n;
    if (n > 5 && !strncasecmp(base + n - 5, ".gguf", 5)) n -= 5;
    n -= split_suffix_len(base, n);
    if (!n) n = full; /* "-00001-of-00002.gguf" alone: keep what there is */
    copy_out(out, cap, base, n);
    return out;
}

char *nm_serve_params_str(uint64_t n, char *out, size_t cap) {
    static const char unit[] = {0, 'K', 'M', 'B', 'T'};
    double x = (double)n;
    int u = 0;
    while (x >= 999.5 && u < 4) x /= 1000, u++;
    if (!u) {
        snprintf(out, cap, "%llu", (unsigned long long)n);
        return out;
    }
    /* three significant digits: 15.7B, 236M, 1.5T; 671.0 -> 671 */
    char num[32];
    if (x >= 99.95) snprintf(num, sizeof num, "%.0f", x);
    else if (x >= 9.995) snprintf(num, sizeof num, "%.1f", x);
    else snprintf(num, sizeof num, "%.2f", x);
    size_t k = strlen(num);
    if (strchr(num, '.')) {
        while (k && num[k - 1] == '0') num[--k] = 0;
        if (k && num[k - 1] == '.') num[--k] = 0;
    }
    snprintf(out, cap, "%s%c", num, unit[u]);
    return out;
}

void nm_serve_model_facts_of(const nm_gguf *g, nm_serve_model_facts *out) {
    memset(out, 0, sizeof *out);
    for (int i = 0; i < g->n_files; i++) out->size_bytes += (int64_t)g->files[i].size;
    /* bytes per ggml type; type ids are small (ggml has < 64) */
    uint64_t bytes[256] = {0};
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const nm_gguf_tensor *t = &g->tensors[i];
        uint64_t ne = 1;
        for (int d = 0; d < t->n_dims; d++) ne *= (uint64_t)t->ne[d];
        out->n_params += ne;
        if (t->type >= 0 && t->type < 256) bytes[t->type] += t->nbytes;
    }
    int best = -1;
    for (int t = 0; t < 256; t++)
        if (bytes[t] && (best < 0 || bytes[t] > bytes[best])) best = t;
    const char *qn = best >= 0 ? nm_type_name(best) : "unknown";
    copy_out(out->quant, sizeof out->quant, qn, strlen(qn));
    nm_str arch;
    if (!nm_gguf_get_str(g, "general.architecture", &arch, NULL))
        copy_out(out->family, sizeof out->family, arch.ptr, (size_t)arch.len);
}
