/* placement.c - building and checking expert placements (placement.h). */
#include "worker/placement.h"

#include <stdlib.h>
#include <string.h>

#include "kernels/quant.h"
#include "proto/wire.h"

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

int nm_placement_for_model(nm_placement *p, const nm_model *m, int kind, int n_workers, nm_err *err) {
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
    int rc = nm_placement_init(p, kind, n_workers, hp->n_layer, is_moe, align, hp->n_expert, hp->n_ff_exp, err);
    free(is_moe), free(align);
    if (rc) return -1;
    if (nm_placement_fill(p, err) || nm_placement_validate(p, err)) {
        nm_placement_free(p);
        return -1;
    }
    return 0;
}
