/* placement.c - building and checking expert placements (placement.h). */
#include "model/placement.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/hash.h"
#include "kernels/quant.h"

int nm_placement_parse_kind(const char *s) {
    if (!s) return 0;
    if (!strcmp(s, "split")) return NM_PLACE_SPLIT;
    if (!strcmp(s, "experts")) return NM_PLACE_EXPERTS;
    if (!strcmp(s, "experts-rr")) return NM_PLACE_EXPERTS_RR;
    return 0;
}

const char *nm_placement_kind_name(int kind) {
    switch (kind) {
    case NM_PLACE_SPLIT: return "split";
    case NM_PLACE_EXPERTS: return "experts";
    case NM_PLACE_EXPERTS_RR: return "experts-rr";
    case NM_PLACE_MAP: return "map";
    default: return "unknown";
    }
}

void nm_placement_free(nm_placement *p) {
    free(p->is_moe);
    free(p->align);
    free(p->n_pieces);
    free(p->pieces);
    memset(p, 0, sizeof *p);
}

int nm_placement_init(nm_placement *p, int kind, int n_workers, int64_t n_layer, const uint8_t *is_moe,
                      const int64_t *align, int64_t n_expert, int64_t n_ff, nm_err *err) {
    memset(p, 0, sizeof *p);
    if (n_workers < 1 || n_workers > 4096 || n_layer < 1 || n_expert < 1 || n_ff < 1 || n_layer > (1 << 20) ||
        n_expert > (1 << 20))
        return nm_errf(err, "placement: bad shape (%d workers, %lld layers, %lld experts, ff %lld)", n_workers,
                       (long long)n_layer, (long long)n_expert, (long long)n_ff);
    size_t cells = (size_t)(n_layer * n_expert);
    p->kind = kind, p->n_workers = n_workers, p->n_layer = n_layer, p->n_expert = n_expert, p->n_ff = n_ff;
    p->is_moe = calloc((size_t)n_layer, 1);
    p->align = calloc((size_t)n_layer, sizeof *p->align);
    p->n_pieces = calloc(cells, sizeof *p->n_pieces);
    p->pieces = calloc(cells * (size_t)n_workers, sizeof *p->pieces);
    if (!p->is_moe || !p->align || !p->n_pieces || !p->pieces) {
        nm_placement_free(p);
        return nm_errf(err, "placement: out of memory");
    }
    for (int64_t l = 0; l < n_layer; l++) {
        p->is_moe[l] = is_moe ? is_moe[l] : 1;
        p->align[l] = align && align[l] > 0 ? align[l] : 1;
    }
    return 0;
}

int nm_placement_add(nm_placement *p, int64_t layer, int64_t expert, int worker, int64_t f0, int64_t f1, nm_err *err) {
    if (layer < 0 || layer >= p->n_layer || expert < 0 || expert >= p->n_expert)
        return nm_errf(err, "placement: layer %lld expert %lld is outside the model (%lld layers, %lld experts)",
                       (long long)layer, (long long)expert, (long long)p->n_layer, (long long)p->n_expert);
    size_t c = (size_t)(layer * p->n_expert + expert);
    if (p->n_pieces[c] >= p->n_workers)
        return nm_errf(err, "placement: layer %lld expert %lld has more than %d pieces (at most one per worker)",
                       (long long)layer, (long long)expert, p->n_workers);
    p->pieces[c * (size_t)p->n_workers + (size_t)p->n_pieces[c]++] = (nm_piece){worker, f0, f1};
    return 0;
}

int nm_placement_fill(nm_placement *p, nm_err *err) {
    const int N = p->n_workers;
    const int64_t E = p->n_expert;
    for (int64_t l = 0; l < p->n_layer; l++) {
        if (!p->is_moe[l]) continue;
        if (p->kind == NM_PLACE_SPLIT) {
            int64_t a = p->align[l], nb = p->n_ff / a;
            if (p->n_ff % a)
                return nm_errf(err, "placement split: layer %lld: ff dimension %lld is not a multiple of the down "
                               "type's %lld-column blocks", (long long)l, (long long)p->n_ff, (long long)a);
            if (nb < N)
                return nm_errf(err,
                               "placement split: layer %lld: ffn_down_exps rows are %lld columns in blocks of %lld, "
                               "so an expert's ff dimension has only %lld block%s and cannot be split between %d "
                               "workers at block boundaries; use --placement experts or at most %lld worker%s",
                               (long long)l, (long long)p->n_ff, (long long)a, (long long)nb, nb == 1 ? "" : "s", N,
                               (long long)nb, nb == 1 ? "" : "s");
            for (int64_t e = 0; e < E; e++)
                for (int w = 0; w < N; w++) {
                    int64_t b0 = nb * w / N, b1 = nb * (w + 1) / N;
                    if (nm_placement_add(p, l, e, w, b0 * a, b1 * a, err)) return -1;
                }
        } else if (p->kind == NM_PLACE_EXPERTS || p->kind == NM_PLACE_EXPERTS_RR) {
            if (E < N)
                return nm_errf(err, "placement %s: %lld experts per layer cannot be placed whole on %d workers "
                               "(one would hold nothing); use --placement split or at most %lld workers",
                               nm_placement_kind_name(p->kind), (long long)E, N, (long long)E);
            /* blocks: worker w holds experts [E*w/N, E*(w+1)/N); round-robin: e % N */
            for (int w = 0; w < N; w++)
                for (int64_t e = 0; e < E; e++) {
                    int in = p->kind == NM_PLACE_EXPERTS_RR ? e % N == w : e >= E * w / N && e < E * (w + 1) / N;
                    if (in && nm_placement_add(p, l, e, w, 0, p->n_ff, err)) return -1;
                }
        } else {
            return nm_errf(err, "placement: unknown kind %d", p->kind);
        }
    }
    return 0;
}

static int cmp_piece(const void *a, const void *b) {
    const nm_piece *x = a, *y = b;
    return x->f0 < y->f0 ? -1 : x->f0 > y->f0 ? 1 : x->worker - y->worker;
}

int nm_placement_validate(const nm_placement *p, nm_err *err) {
    const int N = p->n_workers;
    nm_piece *tmp = malloc((size_t)N * sizeof *tmp);
    uint8_t *holds = calloc((size_t)N, 1);
    int rc = -1;
    if (!tmp || !holds) {
        nm_errf(err, "placement: out of memory");
        goto out;
    }
    for (int64_t l = 0; l < p->n_layer; l++)
        for (int64_t e = 0; e < p->n_expert; e++) {
            size_t c = (size_t)(l * p->n_expert + e);
            int n = p->n_pieces[c];
            const nm_piece *pc = p->pieces + c * (size_t)N;
            if (!p->is_moe[l]) {
                if (n) {
                    nm_errf(err, "placement: layer %lld is not a MoE layer but expert %lld has pieces on it",
                            (long long)l, (long long)e);
                    goto out;
                }
                continue;
            }
            if (!n) {
                nm_errf(err, "placement: layer %lld expert %lld is on no worker", (long long)l, (long long)e);
                goto out;
            }
            for (int i = 0; i < n; i++) {
                const nm_piece *q = &pc[i];
                if (q->worker < 0 || q->worker >= N) {
                    nm_errf(err, "placement: layer %lld expert %lld: worker %d does not exist (%d workers)",
                            (long long)l, (long long)e, q->worker, N);
                    goto out;
                }
                if (q->f0 < 0 || q->f1 > p->n_ff || q->f0 >= q->f1) {
                    nm_errf(err, "placement: layer %lld expert %lld: ff range [%lld, %lld) on worker %d is empty or "
                            "outside [0, %lld)", (long long)l, (long long)e, (long long)q->f0, (long long)q->f1,
                            q->worker, (long long)p->n_ff);
                    goto out;
                }
                if (q->f0 % p->align[l] || (q->f1 % p->align[l] && q->f1 != p->n_ff)) {
                    nm_errf(err, "placement: layer %lld expert %lld: ff range [%lld, %lld) on worker %d does not "
                            "start and end on %lld-column blocks of the down type", (long long)l, (long long)e,
                            (long long)q->f0, (long long)q->f1, q->worker, (long long)p->align[l]);
                    goto out;
                }
                tmp[i] = *q;
            }
            qsort(tmp, (size_t)n, sizeof *tmp, cmp_piece);
            int64_t at = 0;
            for (int i = 0; i < n; i++) {
                for (int j = 0; j < i; j++)
                    if (tmp[j].worker == tmp[i].worker) {
                        nm_errf(err, "placement: layer %lld expert %lld: worker %d holds two pieces of it; merge them",
                                (long long)l, (long long)e, tmp[i].worker);
                        goto out;
                    }
                if (tmp[i].f0 > at) {
                    nm_errf(err, "placement: layer %lld expert %lld: ff rows [%lld, %lld) are on no worker",
                            (long long)l, (long long)e, (long long)at, (long long)tmp[i].f0);
                    goto out;
                }
                if (tmp[i].f0 < at) {
                    int prev = i > 0 ? tmp[i - 1].worker : -1;
                    int64_t end = tmp[i].f1 < at ? tmp[i].f1 : at;
                    if (tmp[i].f0 == 0 && end == p->n_ff)
                        nm_errf(err, "placement: layer %lld expert %lld is on two workers (%d and %d)",
                                (long long)l, (long long)e, prev, tmp[i].worker);
                    else
                        nm_errf(err, "placement: layer %lld expert %lld: ff rows [%lld, %lld) are on two workers "
                                "(%d and %d)", (long long)l, (long long)e, (long long)tmp[i].f0, (long long)end,
                                prev, tmp[i].worker);
                    goto out;
                }
                at = tmp[i].f1;
                holds[tmp[i].worker] = 1;
            }
            if (at != p->n_ff) {
                nm_errf(err, "placement: layer %lld expert %lld: ff rows [%lld, %lld) are on no worker", (long long)l,
                        (long long)e, (long long)at, (long long)p->n_ff);
                goto out;
            }
        }
    for (int w = 0; w < N; w++)
        if (!holds[w]) {
            nm_errf(err, "placement: worker %d holds no expert weights (%d workers for this model are too many)", w,
                    N);
            goto out;
        }
    rc = 0;
out:
    free(tmp);
    free(holds);
    return rc;
}

uint64_t nm_placement_hash(const nm_placement *p) {
    uint64_t h = NM_FNV_OFFSET;
    int64_t head[5] = {p->kind, p->n_workers, p->n_layer, p->n_expert, p->n_ff};
    h = nm_fnv1a64(h, head, sizeof head);
    for (int64_t l = 0; l < p->n_layer; l++)
        for (int64_t e = 0; e < p->n_expert; e++) {
            size_t c = (size_t)(l * p->n_expert + e);
            const nm_piece *pc = p->pieces + c * (size_t)p->n_workers;
            /* canonical order: by worker, whatever order they were added in */
            for (int w = 0; w < p->n_workers; w++)
                for (int i = 0; i < p->n_pieces[c]; i++)
                    if (pc[i].worker == w) {
                        int64_t v[5] = {l, e, w, pc[i].f0, pc[i].f1};
                        h = nm_fnv1a64(h, v, sizeof v);
                    }
        }
    return h;
}

int nm_placement_model_shape(const nm_model *m, uint8_t **is_moe_out, int64_t **align_out, nm_err *err) {
    const nm_hparams *hp = &m->hp;
    uint8_t *is_moe = calloc((size_t)hp->n_layer, 1);
    int64_t *align = calloc((size_t)hp->n_layer, sizeof *align);
    if (!is_moe || !align) {
        free(is_moe), free(align);
        return nm_errf(err, "placement: out of memory");
    }
    for (int64_t l = 0; l < hp->n_layer; l++) {
        const nm_layer *L = &m->layers[l];
        is_moe[l] = (uint8_t)L->is_moe;
        if (!L->is_moe) continue;
        const nm_type_traits *td = nm_type_traits_of(L->down_exps.type);
        const nm_type_traits *tv = td ? nm_type_traits_of(td->vec_dot_type) : NULL;
        int64_t a = td ? td->block_size : 1;
        if (tv && tv->block_size > a) a = tv->block_size;
        align[l] = a;
    }
    *is_moe_out = is_moe, *align_out = align;
    return 0;
}

int nm_placement_for_model(nm_placement *p, const nm_model *m, int kind, int n_workers, nm_err *err) {
    const nm_hparams *hp = &m->hp;
    uint8_t *is_moe;
    int64_t *align;
    if (nm_placement_model_shape(m, &is_moe, &align, err)) return -1;
    int rc = nm_placement_init(p, kind, n_workers, hp->n_layer, is_moe, align, hp->n_expert, hp->n_ff_exp, err);
    free(is_moe), free(align);
    if (rc) return -1;
    if (nm_placement_fill(p, err) || nm_placement_validate(p, err)) {
        nm_placement_free(p);
        return -1;
    }
    return 0;
}

int nm_placement_for_model_spec(nm_placement *p, const nm_model *m, const char *spec, int n_workers, nm_err *err) {
    int kind = nm_placement_parse_kind(spec);
    if (kind) return nm_placement_for_model(p, m, kind, n_workers, err);
    if (!spec || !*spec) return nm_errf(err, "placement: empty --placement (split, experts, experts-rr or a map file)");
    const nm_hparams *hp = &m->hp;
    uint8_t *is_moe;
    int64_t *align;
    if (nm_placement_model_shape(m, &is_moe, &align, err)) return -1;
    int rc = nm_placement_load_map(p, spec, n_workers, hp->n_layer, is_moe, align, hp->n_expert, hp->n_ff_exp, err);
    free(is_moe), free(align);
    return rc;
}

/* ---- map files ---- */

typedef struct {
    int64_t layer, expert, f0, f1;
    int32_t worker, line;
} map_entry;

typedef struct {
    map_entry *v;
    size_t n, cap;
} map_list;

static int map_push(map_list *ml, map_entry e) {
    if (ml->n == ml->cap) {
        size_t cap = ml->cap ? ml->cap * 2 : 256;
        map_entry *v = realloc(ml->v, cap * sizeof *v);
        if (!v) return -1;
        ml->v = v, ml->cap = cap;
    }
    ml->v[ml->n++] = e;
    return 0;
}

/* Next whitespace-separated token of [*s, end) within one line. */
static int next_tok(const char **s, const char *end, const char **t0, size_t *tn) {
    const char *c = *s;
    while (c < end && (*c == ' ' || *c == '\t' || *c == '\r')) c++;
    if (c >= end) return 0;
    const char *b = c;
    while (c < end && *c != ' ' && *c != '\t' && *c != '\r') c++;
    *t0 = b, *tn = (size_t)(c - b), *s = c;
    return 1;
}

/* A non-negative integer token; "-" gives dash_value when dash_value >= 0. */
static int tok_int(const char *t, size_t n, int64_t dash_value, int64_t *out) {
    if (n == 1 && t[0] == '-' && dash_value >= 0) {
        *out = dash_value;
        return 0;
    }
    if (n == 0 || n > 18) return -1;
    int64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (t[i] < '0' || t[i] > '9') return -1;
        v = v * 10 + (t[i] - '0');
    }
    *out = v;
    return 0;
}

int nm_placement_parse_map(nm_placement *p, const char *text, size_t len, const char *name, int n_workers,
                           int64_t n_layer, const uint8_t *is_moe, const int64_t *align, int64_t n_expert,
                           int64_t n_ff, nm_err *err) {
    memset(p, 0, sizeof *p);
    if (n_layer < 1 || n_expert < 1 || n_ff < 1 || n_layer > (1 << 20) || n_expert > (1 << 20))
        return nm_errf(err, "%s: bad model shape (%lld layers, %lld experts, ff %lld)", name, (long long)n_layer,
                       (long long)n_expert, (long long)n_ff);
    map_list ml = {0};
    int32_t *layer_line = calloc((size_t)n_layer, sizeof *layer_line); /* first line placing the layer */
    int32_t *cell_line = calloc((size_t)(n_layer * n_expert), sizeof *cell_line);
    int rc = -1, declared = 0, max_w = -1, line = 0;
    if (!layer_line || !cell_line) {
        nm_errf(err, "%s: out of memory", name);
        goto out;
    }
    const char *s = text, *end = text + len;
    while (s < end) {
        const char *eol = memchr(s, '\n', (size_t)(end - s));
        if (!eol) eol = end;
        const char *hash = memchr(s, '#', (size_t)(eol - s));
        const char *le = hash ? hash : eol, *c = s;
        line++;
        s = eol < end ? eol + 1 : end;
        const char *t;
        size_t tn;
        if (!next_tok(&c, le, &t, &tn)) continue;
        if (tn == 7 && !memcmp(t, "workers", 7)) {
            int64_t v;
            if (!next_tok(&c, le, &t, &tn) || tok_int(t, tn, -1, &v) || v < 1 || v > 4096 || next_tok(&c, le, &t, &tn)) {
                nm_errf(err, "%s:%d: expected \"workers N\" with 1 <= N <= 4096", name, line);
                goto out;
            }
            if (declared || ml.n) {
                nm_errf(err, "%s:%d: \"workers\" must come once, before the placement lines", name, line);
                goto out;
            }
            if (n_workers > 0 && v != n_workers) {
                nm_errf(err, "%s:%d: the map is for %lld workers, %d were asked for", name, line, (long long)v,
                        n_workers);
                goto out;
            }
            declared = (int)v;
            continue;
        }
        int wlimit = declared ? declared : n_workers > 0 ? n_workers : 4096;
        if (tn == 5 && !memcmp(t, "layer", 5)) {
            int64_t l;
            const char *t2;
            size_t tn2;
            /* "layer L:" or "layer L :" */
            if (!next_tok(&c, le, &t2, &tn2)) {
                nm_errf(err, "%s:%d: expected \"layer L: W0 W1 ...\"", name, line);
                goto out;
            }
            int colon = tn2 > 1 && t2[tn2 - 1] == ':';
            if (tok_int(t2, colon ? tn2 - 1 : tn2, -1, &l)) {
                nm_errf(err, "%s:%d: bad layer number '%.*s'", name, line, (int)tn2, t2);
                goto out;
            }
            if (!colon && (!next_tok(&c, le, &t2, &tn2) || tn2 != 1 || t2[0] != ':')) {
                nm_errf(err, "%s:%d: expected ':' after \"layer %lld\"", name, line, (long long)l);
                goto out;
            }
            if (l >= n_layer) {
                nm_errf(err, "%s:%d: layer %lld does not exist (the model has %lld layers)", name, line, (long long)l,
                        (long long)n_layer);
                goto out;
            }
            if (is_moe && !is_moe[l]) {
                nm_errf(err, "%s:%d: layer %lld is not a MoE layer (it has no routed experts)", name, line,
                        (long long)l);
                goto out;
            }
            if (layer_line[l]) {
                nm_errf(err, "%s:%d: layer %lld is listed twice (first at line %d)", name, line, (long long)l,
                        layer_line[l]);
                goto out;
            }
            layer_line[l] = line;
            int64_t e = 0;
            while (next_tok(&c, le, &t2, &tn2)) {
                int64_t w;
                if (tok_int(t2, tn2, -1, &w)) {
                    nm_errf(err, "%s:%d: layer %lld expert %lld: bad worker id '%.*s'", name, line, (long long)l,
                            (long long)e, (int)tn2, t2);
                    goto out;
                }
                if (w >= wlimit) {
                    nm_errf(err, "%s:%d: layer %lld expert %lld: worker %lld does not exist (%d workers)", name, line,
                            (long long)l, (long long)e, (long long)w, wlimit);
                    goto out;
                }
                if (e >= n_expert) {
                    nm_errf(err, "%s:%d: layer %lld lists more than %lld experts (the model has %lld per layer)", name,
                            line, (long long)l, (long long)n_expert, (long long)n_expert);
                    goto out;
                }
                size_t cell = (size_t)(l * n_expert + e);
                if (cell_line[cell]) {
                    nm_errf(err, "%s:%d: layer %lld expert %lld is placed twice (first at line %d)", name, line,
                            (long long)l, (long long)e, cell_line[cell]);
                    goto out;
                }
                cell_line[cell] = line;
                if (map_push(&ml, (map_entry){l, e, 0, n_ff, (int32_t)w, line})) {
                    nm_errf(err, "%s: out of memory", name);
                    goto out;
                }
                if (w > max_w) max_w = (int)w;
                e++;
            }
            if (e < n_expert) {
                nm_errf(err, "%s:%d: layer %lld lists %lld experts, the model has %lld: expert %lld is missing", name,
                        line, (long long)l, (long long)e, (long long)n_expert, (long long)e);
                goto out;
            }
            continue;
        }
        /* piece: L E W F0 F1 */
        int64_t v[5];
        const char *what[5] = {"layer", "expert", "worker", "f0", "f1"};
        int k = 0;
        do {
            if (k == 5 || tok_int(t, tn, k == 4 ? n_ff : -1, &v[k])) {
                if (k == 5)
                    nm_errf(err, "%s:%d: too many fields (expected \"layer expert worker f0 f1\")", name, line);
                else
                    nm_errf(err, "%s:%d: bad %s '%.*s' (expected \"layer expert worker f0 f1\", \"layer L: ...\" or "
                            "\"workers N\")", name, line, what[k], (int)tn, t);
                goto out;
            }
            k++;
        } while (next_tok(&c, le, &t, &tn));
        if (k != 5) {
            nm_errf(err, "%s:%d: %d fields, expected 5 (layer expert worker f0 f1)", name, line, k);
            goto out;
        }
        if (v[0] >= n_layer || v[1] >= n_expert) {
            nm_errf(err, "%s:%d: layer %lld expert %lld is outside the model (%lld layers, %lld experts)", name, line,
                    (long long)v[0], (long long)v[1], (long long)n_layer, (long long)n_expert);
            goto out;
        }
        if (is_moe && !is_moe[v[0]]) {
            nm_errf(err, "%s:%d: layer %lld is not a MoE layer (it has no routed experts)", name, line,
                    (long long)v[0]);
            goto out;
        }
        if (v[2] >= wlimit) {
            nm_errf(err, "%s:%d: layer %lld expert %lld: worker %lld does not exist (%d workers)", name, line,
                    (long long)v[0], (long long)v[1], (long long)v[2], wlimit);
            goto out;
        }
        if (v[3] >= v[4] || v[4] > n_ff) {
            nm_errf(err, "%s:%d: layer %lld expert %lld: ff range [%lld, %lld) is empty or outside [0, %lld)", name,
                    line, (long long)v[0], (long long)v[1], (long long)v[3], (long long)v[4], (long long)n_ff);
            goto out;
        }
        for (size_t i = 0; i < ml.n; i++) {
            const map_entry *q = &ml.v[i];
            if (q->layer == v[0] && q->expert == v[1] && q->f0 < v[4] && v[3] < q->f1) {
                if (q->f0 == 0 && q->f1 == n_ff && v[3] == 0 && v[4] == n_ff)
                    nm_errf(err, "%s:%d: layer %lld expert %lld is placed twice (first at line %d)", name, line,
                            (long long)v[0], (long long)v[1], q->line);
                else
                    nm_errf(err, "%s:%d: layer %lld expert %lld: ff rows [%lld, %lld) overlap [%lld, %lld) on "
                            "worker %d (line %d)", name, line, (long long)v[0], (long long)v[1], (long long)v[3],
                            (long long)v[4], (long long)q->f0, (long long)q->f1, q->worker, q->line);
                goto out;
            }
        }
        cell_line[v[0] * n_expert + v[1]] = line;
        if (map_push(&ml, (map_entry){v[0], v[1], v[3], v[4], (int32_t)v[2], line})) {
            nm_errf(err, "%s: out of memory", name);
            goto out;
        }
        if (v[2] > max_w) max_w = (int)v[2];
    }
    for (int64_t l = 0; l < n_layer; l++) {
        if (is_moe && !is_moe[l]) continue;
        int64_t placed = 0;
        for (int64_t e = 0; e < n_expert && !layer_line[l]; e++) placed += cell_line[l * n_expert + e] != 0;
        if (!layer_line[l] && !placed) {
            nm_errf(err, "%s: MoE layer %lld is not in the map", name, (long long)l);
            goto out;
        }
        for (int64_t e = 0; e < n_expert; e++)
            if (!cell_line[l * n_expert + e]) {
                nm_errf(err, "%s: layer %lld expert %lld is missing (on no worker)", name, (long long)l,
                        (long long)e);
                goto out;
            }
    }
    int nw = declared ? declared : n_workers > 0 ? n_workers : max_w + 1;
    if (nw < 1) {
        nm_errf(err, "%s: the map places nothing", name);
        goto out;
    }
    if (nm_placement_init(p, NM_PLACE_MAP, nw, n_layer, is_moe, align, n_expert, n_ff, err)) {
        nm_err_prefix(err, "%s", name);
        goto out;
    }
    for (size_t i = 0; i < ml.n; i++) {
        const map_entry *q = &ml.v[i];
        if (nm_placement_add(p, q->layer, q->expert, q->worker, q->f0, q->f1, err)) {
            nm_err_prefix(err, "%s:%d", name, q->line);
            goto fail;
        }
    }
    if (nm_placement_validate(p, err)) {
        nm_err_prefix(err, "%s", name);
        goto fail;
    }
    rc = 0;
    goto out;
fail:
    nm_placement_free(p);
out:
    free(ml.v);
    free(layer_line);
    free(cell_line);
    return rc;
}

int nm_placement_load_map(nm_placement *p, const char *path, int n_workers, int64_t n_layer, const uint8_t *is_moe,
                          const int64_t *align, int64_t n_expert, int64_t n_ff, nm_err *err) {
    memset(p, 0, sizeof *p);
    FILE *f = fopen(path, "rb");
    if (!f) return nm_errf(err, "cannot read placement map %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf) break;
        if (n == cap) {
            char *b = cap < ((size_t)1 << 30) ? realloc(buf, cap * 2) : NULL;
            if (!b) {
                free(buf), buf = NULL;
                break;
            }
            buf = b, cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf || bad) {
        free(buf);
        return nm_errf(err, "cannot read placement map %s: %s", path, buf ? "read error" : "out of memory or too big");
    }
    int rc = nm_placement_parse_map(p, buf, n, path, n_workers, n_layer, is_moe, align, n_expert, n_ff, err);
    free(buf);
    return rc;
}

int nm_placement_write_map(const nm_placement *p, FILE *f) {
    const int N = p->n_workers;
    fprintf(f, "# numoe placement v1: \"layer L: worker of each expert\" or \"layer expert worker f0 f1\"\n");
    fprintf(f, "workers %d\n", N);
    for (int64_t l = 0; l < p->n_layer; l++) {
        if (!p->is_moe[l]) continue;
        int whole = 1;
        for (int64_t e = 0; e < p->n_expert && whole; e++) {
            size_t c = (size_t)(l * p->n_expert + e);
            whole = p->n_pieces[c] == 1 && p->pieces[c * (size_t)N].f0 == 0 && p->pieces[c * (size_t)N].f1 == p->n_ff;
        }
        if (whole) {
            fprintf(f, "layer %lld:", (long long)l);
            for (int64_t e = 0; e < p->n_expert; e++)
                fprintf(f, " %d", p->pieces[(size_t)(l * p->n_expert + e) * (size_t)N].worker);
            fputc('\n', f);
            continue;
        }
        for (int64_t e = 0; e < p->n_expert; e++) {
            size_t c = (size_t)(l * p->n_expert + e);
            for (int i = 0; i < p->n_pieces[c]; i++) {
                const nm_piece *q = &p->pieces[c * (size_t)N + (size_t)i];
                if (q->f1 == p->n_ff)
                    fprintf(f, "%lld %lld %d %lld -\n", (long long)l, (long long)e, q->worker, (long long)q->f0);
                else
                    fprintf(f, "%lld %lld %d %lld %lld\n", (long long)l, (long long)e, q->worker, (long long)q->f0,
                            (long long)q->f1);
            }
        }
    }
    return ferror(f) ? -1 : 0;
}
