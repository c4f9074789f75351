/* cmd_inspect.c - `numoe inspect MODEL.gguf`: what is in a GGUF, in the
 * order a user asks about it: what model, what shape, what tokenizer, which
 * tensors, and how many bytes are routed experts (the part that goes to the
 * workers) versus everything else (the part the coordinator keeps). */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/gguf.h"
#include "kernels/quant.h"
#include "launch/commands.h"

static void print_escaped(const char *s, uint64_t len, uint64_t max) {
    uint64_t n = len < max ? len : max;
    for (uint64_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '\n') fputs("\\n", stdout);
        else if (ch == '\t') fputs("\\t", stdout);
        else if (ch == '"' || ch == '\\') printf("\\%c", ch);
        else if (ch < 0x20 || ch == 0x7f) printf("\\x%02x", ch);
        else putchar(ch);
    }
    if (len > max) fputs("...", stdout);
}

static void print_value(const nm_gguf_kv *kv) {
    switch (kv->type) {
    case NM_GGUF_STRING:
        putchar('"');
        print_escaped(kv->str.ptr, kv->str.len, 72);
        putchar('"');
        break;
    case NM_GGUF_BOOL: fputs(kv->v.u64 ? "true" : "false", stdout); break;
    case NM_GGUF_F32: case NM_GGUF_F64: printf("%g", kv->v.f64); break;
    case NM_GGUF_U8: case NM_GGUF_U16: case NM_GGUF_U32: case NM_GGUF_U64: printf("%" PRIu64, kv->v.u64); break;
    case NM_GGUF_I8: case NM_GGUF_I16: case NM_GGUF_I32: case NM_GGUF_I64: printf("%" PRId64, kv->v.i64); break;
    case NM_GGUF_ARRAY: {
        printf("[%" PRIu64 " x %s]", kv->arr_n, nm_gguf_vtype_name(kv->arr_type));
        uint64_t show = kv->arr_n < 6 ? kv->arr_n : 6;
        fputs(" [", stdout);
        for (uint64_t i = 0; i < show; i++) {
            if (i) fputs(", ", stdout);
            if (kv->arr_type == NM_GGUF_STRING) {
                putchar('"');
                print_escaped(kv->arr_str[i].ptr, kv->arr_str[i].len, 40);
                putchar('"');
            } else if (kv->arr_type == NM_GGUF_F32 || kv->arr_type == NM_GGUF_F64) {
                printf("%g", nm_gguf_arr_f64(kv, i));
            } else {
                printf("%" PRId64, nm_gguf_arr_i64(kv, i));
            }
        }
        fputs(kv->arr_n > show ? ", ...]" : "]", stdout);
        break;
    }
    default: fputs("?", stdout);
    }
}

static int has_prefix(const char *s, const char *p) { return strncmp(s, p, strlen(p)) == 0; }

static void fmt_bytes(char *buf, size_t n, double b) {
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (b >= 1024 && i < 4) b /= 1024, i++;
    snprintf(buf, n, i ? "%.2f %s" : "%.0f %s", b, u[i]);
}

/* Routed experts are the stacked 3-D *_exps tensors (ffn_{gate,up,down}_exps,
 * optional fused ffn_gate_up_exps); shared experts (*_shexp) are dense. */
static int is_routed_expert(const char *name) { return strstr(name, "_exps.") != NULL; }

static void print_section(const char *title) { printf("\n== %s ==\n", title); }

static void print_keys_with_prefix(const nm_gguf *g, const char *prefix, int *shown) {
    for (uint64_t i = 0; i < g->n_kv; i++) {
        if (shown[i] || !has_prefix(g->kv[i].key, prefix)) continue;
        shown[i] = 1;
        printf("  %-44s = ", g->kv[i].key);
        print_value(&g->kv[i]);
        putchar('\n');
    }
}

static void print_tokenizer(const nm_gguf *g) {
    nm_str s;
    const nm_gguf_kv *tokens = nm_gguf_find(g, "tokenizer.ggml.tokens");
    const nm_gguf_kv *merges = nm_gguf_find(g, "tokenizer.ggml.merges");
    if (nm_gguf_get_str(g, "tokenizer.ggml.model", &s, NULL) == 0)
        printf("  model %.*s", (int)s.len, s.ptr);
    else
        printf("  model (none)");
    if (nm_gguf_get_str(g, "tokenizer.ggml.pre", &s, NULL) == 0) printf(", pre-tokenizer %.*s", (int)s.len, s.ptr);
    uint64_t n_tok = tokens && tokens->type == NM_GGUF_ARRAY && tokens->arr_type == NM_GGUF_STRING ? tokens->arr_n : 0;
    printf(", %" PRIu64 " tokens", n_tok);
    if (merges && merges->type == NM_GGUF_ARRAY) printf(", %" PRIu64 " merges", merges->arr_n);
    putchar('\n');
    const char *ids[] = {"bos", "eos", "padding", "unknown"};
    for (size_t k = 0; k < sizeof ids / sizeof *ids; k++) {
        char key[64];
        uint32_t id;
        snprintf(key, sizeof key, "tokenizer.ggml.%s_token_id", ids[k]);
        if (nm_gguf_get_u32(g, key, &id, NULL) != 0) continue;
        printf("  %-8s %u", ids[k], id);
        if (id < n_tok) {
            fputs(" \"", stdout);
            print_escaped(tokens->arr_str[id].ptr, tokens->arr_str[id].len, 40);
            putchar('"');
        } else {
            fputs(" (outside the vocabulary!)", stdout);
        }
        putchar('\n');
    }
    const nm_gguf_kv *types = nm_gguf_find(g, "tokenizer.ggml.token_type");
    if (types && types->type == NM_GGUF_ARRAY && types->arr_data) {
        uint64_t count[8] = {0};
        for (uint64_t i = 0; i < types->arr_n; i++) {
            int64_t t = nm_gguf_arr_i64(types, i);
            count[t >= 1 && t <= 6 ? t : 0]++;
        }
        printf("  token types: %" PRIu64 " normal, %" PRIu64 " control, %" PRIu64 " user-defined, %" PRIu64
               " byte, %" PRIu64 " unknown/unused/other\n",
               count[1], count[3], count[4], count[6], count[2] + count[5] + count[0]);
    }
    if (nm_gguf_get_str(g, "tokenizer.chat_template", &s, NULL) == 0)
        printf("  chat template: %" PRIu64 " bytes\n", s.len);
}

static int usage(FILE *f) {
    fprintf(f,
            "usage: numoe inspect MODEL.gguf [--keys] [--no-tensors]\n"
            "  MODEL.gguf     a GGUF file; for a split model its first part (*-00001-of-0000N.gguf)\n"
            "  --keys         also list every metadata key (tokenizer arrays summarised)\n"
            "  --no-tensors   skip the per-tensor table\n");
    return f == stdout ? 0 : 2;
}

int nm_cmd_inspect(int argc, char **argv) {
    const char *path = NULL;
    int all_keys = 0, tensors = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return usage(stdout);
        else if (!strcmp(argv[i], "--keys")) all_keys = 1;
        else if (!strcmp(argv[i], "--no-tensors")) tensors = 0;
        else if (argv[i][0] == '-') {
            fprintf(stderr, "numoe inspect: unknown option %s\n", argv[i]);
            return usage(stderr);
        } else if (!path) path = argv[i];
        else return usage(stderr);
    }
    if (!path) return usage(stderr);

    nm_err err;
    nm_gguf *g;
    if (nm_gguf_open(path, &g, &err)) {
        fprintf(stderr, "numoe inspect: %s\n", err.msg);
        return 1;
    }
    int *shown = calloc(g->n_kv + 1, sizeof *shown);
    if (!shown) {
        nm_gguf_close(g);
        fprintf(stderr, "numoe inspect: out of memory\n");
        return 1;
    }
    printf("file: %s", path);
    if (g->n_files > 1) printf(" (+%d more parts)", g->n_files - 1);
    printf("\nGGUF v%u, alignment %u, %" PRIu64 " tensors, %" PRIu64 " metadata keys\n", g->files[0].version,
           g->alignment, g->n_tensors, g->n_kv);

    nm_str arch = {"", 0};
    nm_gguf_get_str(g, "general.architecture", &arch, NULL);
    print_section("general");
    print_keys_with_prefix(g, "general.", shown);

    char prefix[128];
    snprintf(prefix, sizeof prefix, "%.*s.", (int)(arch.len < 100 ? arch.len : 100), arch.ptr);
    print_section("hyper-parameters");
    if (arch.len) print_keys_with_prefix(g, prefix, shown);
    else printf("  (no general.architecture)\n");

    print_section("tokenizer");
    print_tokenizer(g);
    if (all_keys) print_keys_with_prefix(g, "tokenizer.", shown);
    else
        for (uint64_t i = 0; i < g->n_kv; i++)
            if (has_prefix(g->kv[i].key, "tokenizer.")) shown[i] = 1;

    int header = 0;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        if (shown[i]) continue;
        if (!header) print_section("other metadata"), header = 1;
        printf("  %-44s = ", g->kv[i].key);
        print_value(&g->kv[i]);
        putchar('\n');
    }

    uint64_t routed = 0, dense = 0, n_routed = 0;
    uint64_t type_bytes[NM_TYPE_COUNT] = {0}, type_count[NM_TYPE_COUNT] = {0};
    if (tensors) {
        print_section("tensors");
        printf("  %5s  %-36s %-6s %-26s %12s%s\n", "#", "name", "type", "shape (ne)", "bytes",
               g->n_files > 1 ? "  part" : "");
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const nm_gguf_tensor *t = &g->tensors[i];
        if (is_routed_expert(t->name)) routed += t->nbytes, n_routed++;
        else dense += t->nbytes;
        if (t->type >= 0 && t->type < NM_TYPE_COUNT) type_bytes[t->type] += t->nbytes, type_count[t->type]++;
        if (!tensors) continue;
        char shape[96];
        int n = snprintf(shape, sizeof shape, "[");
        for (int d = 0; d < t->n_dims; d++)
            n += snprintf(shape + n, sizeof shape - (size_t)n, "%s%" PRId64, d ? ", " : "", t->ne[d]);
        snprintf(shape + n, sizeof shape - (size_t)n, "]");
        printf("  %5" PRIu64 "  %-36s %-6s %-26s %12zu", i, t->name, nm_type_name(t->type), shape, t->nbytes);
        if (g->n_files > 1) printf("  %d", t->file + 1);
        putchar('\n');
    }

    char b1[32], b2[32], b3[32];
    print_section("totals");
    fmt_bytes(b1, sizeof b1, (double)routed);
    fmt_bytes(b2, sizeof b2, (double)dense);
    fmt_bytes(b3, sizeof b3, (double)(routed + dense));
    printf("  routed experts : %12" PRIu64 " bytes (%s) in %" PRIu64 " tensors, %.1f%%\n", routed, b1, n_routed,
           routed + dense ? 100.0 * (double)routed / (double)(routed + dense) : 0.0);
    printf("  dense / other  : %12" PRIu64 " bytes (%s) in %" PRIu64 " tensors\n", dense, b2, g->n_tensors - n_routed);
    printf("  total          : %12" PRIu64 " bytes (%s)\n", routed + dense, b3);
    printf("  by type        :");
    for (int t = 0; t < NM_TYPE_COUNT; t++)
        if (type_count[t]) {
            fmt_bytes(b1, sizeof b1, (double)type_bytes[t]);
            printf(" %s %" PRIu64 " (%s);", nm_type_name(t), type_count[t], b1);
        }
    putchar('\n');
    free(shown);
    nm_gguf_close(g);
    return 0;
}
