/* cmd_placement.c - `numoe placement`: check a placement map file, or build
 * one that balances the routed experts' expected load per worker from a
 * routing profile (`numoe generate --dump-routing FILE`).
 *
 * The profile is int32 records {position, layer, k expert ids}, one per
 * token and MoE layer. Per layer it counts how often each expert is active
 * (f_e, per token) and how often two experts are active for the same token
 * (c_ab). With whole experts per worker, worker w computes sum_{e on w} f_e
 * active experts per token on average, but a token waits for the busiest
 * worker, so co-activated experts belong on different workers. The greedy:
 * experts by decreasing f_e, each to the worker (with room: E/N experts
 * each) minimising  load_w + sum_{a on w} c_ea / tokens. The figure of merit,
 * printed before (contiguous blocks, `--placement experts`) and after, is
 * the mean over the profile's records of the busiest worker's active experts
 * (a split expert counts by the share of its ff rows).
 *
 * The greedy only sees pairs, and on a real profile (the trained demo
 * model's, tests/test_trained_routing.py) it lands no better than
 * round-robin: the bias balancing keeps f_e flat, what is peaked is which
 * experts come together. So a local search follows it (refine_layer): swaps
 * of two experts between workers, judged on the figure itself (per token, the
 * busiest worker's count), kept when they strictly lower it. Swaps keep
 * every worker's expert count (E/N, so its memory) as the greedy set it, and
 * since only strict improvements are kept the result is never worse than
 * the greedy start. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/gguf.h"
#include "common/opt.h"
#include "launch/commands.h"
#include "model/model.h"
#include "model/placement.h"
#include "model/routing_profile.h"

static int usage(FILE *f) {
    fprintf(f,
            "usage: numoe placement (--model M.gguf | SHAPE) --workers N --profile ROUTING.bin -o MAP.txt\n"
            "       numoe placement (--model M.gguf | SHAPE) [--workers N] --check MAP.txt [--profile ROUTING.bin]\n"
            "       numoe placement (--model M.gguf | SHAPE) --profile ROUTING.bin --gpu-experts N\n"
            "\n"
            "  --profile FILE   routing records from `numoe generate --dump-routing FILE`\n"
            "  -o FILE          write a map that balances the expected active experts per worker and\n"
            "                   spreads co-activated experts (whole experts, E/N per worker)\n"
            "  --check FILE     parse and validate a map file (configs/README.md); prints its hash\n"
            "                   and, with --profile, its expected busiest-worker load\n"
            "  --workers N      number of workers (with --check: default from the map)\n"
            "  --gpu-experts N  the share of the profile's picks that N experts of every MoE layer in\n"
            "                   VRAM would take off the CPU, per layer and in all: placed by the profile\n"
            "                   (`numoe ... --gpu-experts N --gpu-experts-profile ROUTING.bin`) and by id\n"
            "  SHAPE (instead of --model, for tests): --n-layer L --n-expert E --k K\n"
            "                   [--n-dense D (first D layers dense, default 0)] [--n-ff F (default 1)]\n");
    return f == stdout ? 0 : 2;
}

typedef struct {
    int64_t n_layer, n_expert, k, n_ff;
    uint8_t *is_moe;
    int64_t *align;
} shape;

typedef nm_routing_profile profile;

static int load_profile(profile *pr, const char *path, const shape *sh, nm_err *err) {
    return nm_routing_profile_load(pr, path, sh->n_layer, sh->is_moe, sh->n_expert, sh->k, err);
}

/* Mean over records of the busiest worker's active experts; *per_layer_worst
 * gets the worst layer's mean. */
static double expected_max(const nm_placement *p, const profile *pr, int64_t k, double *worst_layer) {
    const int N = p->n_workers;
    double *load = calloc((size_t)N, sizeof *load);
    double *lsum = calloc((size_t)p->n_layer, sizeof *lsum);
    size_t *lcnt = calloc((size_t)p->n_layer, sizeof *lcnt);
    double total = 0;
    if (!load || !lsum || !lcnt) {
        free(load), free(lsum), free(lcnt);
        return -1;
    }
    for (size_t r = 0; r < pr->n; r++) {
        const int32_t *q = pr->rec + r * (size_t)(k + 2);
        int64_t l = q[1];
        memset(load, 0, (size_t)N * sizeof *load);
        for (int64_t j = 0; j < k; j++) {
            size_t c = (size_t)(l * p->n_expert + q[2 + j]);
            for (int i = 0; i < p->n_pieces[c]; i++) {
                const nm_piece *pc = &p->pieces[c * (size_t)N + (size_t)i];
                load[pc->worker] += (double)(pc->f1 - pc->f0) / (double)p->n_ff;
            }
        }
        double mx = 0;
        for (int w = 0; w < N; w++)
            if (load[w] > mx) mx = load[w];
        total += mx, lsum[l] += mx, lcnt[l]++;
    }
    double worst = 0;
    for (int64_t l = 0; l < p->n_layer; l++)
        if (lcnt[l] && lsum[l] / (double)lcnt[l] > worst) worst = lsum[l] / (double)lcnt[l];
    if (worst_layer) *worst_layer = worst;
    free(load), free(lsum), free(lcnt);
    return total / (double)pr->n;
}

static const double *sort_key;
static int cmp_freq_desc(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    if (sort_key[x] != sort_key[y]) return sort_key[x] > sort_key[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

/* Change of one token's busiest-worker count when d units (expert slots) move
 * from worker f to worker t; c is the token's per-worker counts, m its
 * maximum and nm how many workers have it. d == 1 (distinct expert ids, the
 * router's case) is O(1); else the counts are rescanned. */
static int32_t move_delta(const int32_t *c, int N, int32_t m, int32_t nm, int f, int t, int32_t d) {
    if (d == 1) {
        if (c[t] + 1 > m) return 1;
        if (c[f] == m && nm == 1 && c[t] + 1 < m) return -1;
        return 0;
    }
    int32_t nx = 0;
    for (int w = 0; w < N; w++) {
        int32_t v = c[w] - (w == f ? d : 0) + (w == t ? d : 0);
        if (v > nx) nx = v;
    }
    return nx - m;
}

static void move_apply(int32_t *c, int N, int32_t *m, int32_t *nm, int f, int t, int32_t d) {
    c[f] -= d, c[t] += d, *m = 0, *nm = 0;
    for (int w = 0; w < N; w++)
        if (c[w] > *m) *m = c[w], *nm = 1;
        else if (c[w] == *m) (*nm)++;
}

/* Bounds of the local search, per layer: at most REFINE_PASSES passes over
 * all pairs of experts on different workers, and at most REFINE_WORK token
 * visits in all (judging a swap of a and b visits the tokens of a and of b
 * twice at most). A pass costs about 1.5 E T k (1 - 1/N) visits for T tokens
 * of k experts each, so the cap bites only on large profiles of large
 * layers; it counts work, not time, so the map stays deterministic. On
 * DeepSeek-V3's shape (256 experts, k 8, 8 workers, 58 MoE layers) a pass of
 * a 4096-token profile is about 11M visits, so the cap stops it inside its
 * first pass: measured on a synthetic profile of that size (random routing,
 * 2 shared cores), 0.27 s greedy alone (2.431), 3.3 s with the refinement
 * (2.348), and the cap keeps that bound whatever the profile's size. */
enum { REFINE_PASSES = 16 };
#define REFINE_WORK ((uint64_t)1 << 23)

/* Swap refinement of one layer's whole-expert map `where` on its T tokens
 * (tok[t]: k expert ids). Returns 0, -1 when out of memory, -2 when the
 * figure recomputed from the final map is not the start's plus the kept
 * deltas (a bookkeeping bug: refused rather than written as a worse map). */
static int refine_layer(int32_t *where, int64_t E, int N, int64_t k, const int32_t *const *tok, size_t T) {
    size_t *off = calloc((size_t)E + 1, sizeof *off);
    uint32_t *tt = malloc(T * (size_t)k * sizeof *tt);      /* tokens of each expert (CSR over off) */
    int32_t *mu = malloc(T * (size_t)k * sizeof *mu);       /* the expert's count in that token */
    int32_t *cnt = calloc(T * (size_t)N, sizeof *cnt);      /* per token: experts on each worker */
    int32_t *mx = calloc(T, sizeof *mx), *nmx = calloc(T, sizeof *nmx);
    uint64_t *mark = calloc(T, sizeof *mark);               /* 2 g: holds b, 2 g + 1: holds a and b */
    int32_t *mb = calloc(T, sizeof *mb);
    int rc = -1;
    if (!off || !tt || !mu || !cnt || !mx || !nmx || !mark || !mb) goto out;
    for (size_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            int first = 1;
            for (int64_t i = 0; i < j; i++) first &= tok[t][i] != tok[t][j];
            off[tok[t][j] + 1] += first;
            cnt[t * (size_t)N + (size_t)where[tok[t][j]]]++;
        }
    for (int64_t e = 0; e < E; e++) off[e + 1] += off[e];
    {
        size_t *fill = calloc((size_t)E, sizeof *fill);
        if (!fill) goto out;
        for (size_t t = 0; t < T; t++) {
            move_apply(cnt + t * (size_t)N, N, &mx[t], &nmx[t], 0, 0, 0);
            for (int64_t j = 0; j < k; j++) {
                int32_t e = tok[t][j], n = 0, first = 1;
                for (int64_t i = 0; i < k; i++) n += tok[t][i] == e, first &= i >= j || tok[t][i] != e;
                if (!first) continue;
                size_t at = off[e] + fill[e]++;
                tt[at] = (uint32_t)t, mu[at] = n;
            }
        }
        free(fill);
    }
    uint64_t work = 0, gen = 0;
    int64_t start = 0, gained = 0;
    for (size_t t = 0; t < T; t++) start += mx[t];
    for (int pass = 0; pass < REFINE_PASSES && work < REFINE_WORK; pass++) {
        int improved = 0;
        for (int64_t a = 0; a < E && work < REFINE_WORK; a++)
            for (int64_t b = a + 1; b < E && work < REFINE_WORK; b++) {
                int wa = where[a], wb = where[b];
                if (wa == wb) continue;
                gen++;
                work += 2 * (off[b + 1] - off[b]) + (off[a + 1] - off[a]);
                for (size_t i = off[b]; i < off[b + 1]; i++) mark[tt[i]] = 2 * gen, mb[tt[i]] = mu[i];
                /* the swap moves a from wa to wb and b from wb to wa: a token
                 * holding both moves the difference of their counts */
                int64_t delta = 0;
                for (size_t i = off[a]; i < off[a + 1]; i++) {
                    uint32_t t = tt[i];
                    int32_t d = mu[i];
                    if (mark[t] == 2 * gen) d -= mb[t], mark[t] = 2 * gen + 1;
                    const int32_t *c = cnt + (size_t)t * (size_t)N;
                    if (d > 0) delta += move_delta(c, N, mx[t], nmx[t], wa, wb, d);
                    else if (d < 0) delta += move_delta(c, N, mx[t], nmx[t], wb, wa, -d);
                }
                for (size_t i = off[b]; i < off[b + 1]; i++) {
                    uint32_t t = tt[i];
                    if (mark[t] == 2 * gen)
                        delta += move_delta(cnt + (size_t)t * (size_t)N, N, mx[t], nmx[t], wb, wa, mu[i]);
                }
                if (delta >= 0) continue;
                for (size_t i = off[a]; i < off[a + 1]; i++) {
                    uint32_t t = tt[i];
                    int32_t d = mu[i] - (mark[t] == 2 * gen + 1 ? mb[t] : 0);
                    if (d > 0) move_apply(cnt + (size_t)t * (size_t)N, N, &mx[t], &nmx[t], wa, wb, d);
                    else if (d < 0) move_apply(cnt + (size_t)t * (size_t)N, N, &mx[t], &nmx[t], wb, wa, -d);
                }
                for (size_t i = off[b]; i < off[b + 1]; i++)
                    if (mark[tt[i]] == 2 * gen)
                        move_apply(cnt + (size_t)tt[i] * (size_t)N, N, &mx[tt[i]], &nmx[tt[i]], wb, wa, mu[i]);
                where[a] = wb, where[b] = wa, improved = 1, gained += delta;
                work += 2 * (off[b + 1] - off[b]) + (off[a + 1] - off[a]);
            }
        if (!improved) break;
    }
    {
        int64_t end = 0;
        int32_t *c = cnt; /* reused: counts from scratch, token by token */
        for (size_t t = 0; t < T; t++) {
            int32_t m = 0;
            memset(c, 0, (size_t)N * sizeof *c);
            for (int64_t j = 0; j < k; j++) c[where[tok[t][j]]]++;
            for (int w = 0; w < N; w++) m = c[w] > m ? c[w] : m;
            end += m;
        }
        rc = end == start + gained && end <= start ? 0 : -2;
    }
out:
    free(off), free(tt), free(mu), free(cnt), free(mx), free(nmx), free(mark), free(mb);
    return rc;
}

static int balance(nm_placement *p, const shape *sh, const profile *pr, int N, nm_err *err) {
    const int64_t E = sh->n_expert, k = sh->k;
    if (E < N)
        return nm_errf(err, "%lld experts per layer cannot be placed whole on %d workers", (long long)E, N);
    if (nm_placement_init(p, NM_PLACE_MAP, N, sh->n_layer, sh->is_moe, sh->align, E, sh->n_ff, err)) return -1;
    double *freq = calloc((size_t)E, sizeof *freq);
    double *co = calloc((size_t)(E * E), sizeof *co);
    double *load = calloc((size_t)N, sizeof *load);
    int64_t *room = calloc((size_t)N, sizeof *room);
    int64_t *order = calloc((size_t)E, sizeof *order);
    int32_t *where = calloc((size_t)E, sizeof *where);
    const int32_t **tok = malloc((pr->n ? pr->n : 1) * sizeof *tok);
    int rc = -1;
    if (!freq || !co || !load || !room || !order || !where || !tok) {
        nm_errf(err, "out of memory");
        goto out;
    }
    for (int64_t l = 0; l < sh->n_layer; l++) {
        if (!sh->is_moe[l]) continue;
        memset(freq, 0, (size_t)E * sizeof *freq);
        memset(co, 0, (size_t)(E * E) * sizeof *co);
        size_t tokens = 0;
        for (size_t r = 0; r < pr->n; r++) {
            const int32_t *q = pr->rec + r * (size_t)(k + 2);
            if (q[1] != l) continue;
            tok[tokens++] = q + 2;
            for (int64_t a = 0; a < k; a++) {
                freq[q[2 + a]] += 1;
                for (int64_t b = 0; b < k; b++)
                    if (q[2 + b] != q[2 + a]) co[q[2 + a] * E + q[2 + b]] += 1;
            }
        }
        double inv = tokens ? 1.0 / (double)tokens : 0;
        for (int64_t e = 0; e < E; e++) freq[e] *= inv, order[e] = e, where[e] = -1;
        for (int64_t i = 0; i < E * E; i++) co[i] *= inv;
        sort_key = freq;
        qsort(order, (size_t)E, sizeof *order, cmp_freq_desc);
        for (int w = 0; w < N; w++) load[w] = 0, room[w] = E * (w + 1) / N - E * w / N;
        for (int64_t i = 0; i < E; i++) {
            int64_t e = order[i];
            int best = -1;
            double best_s = 0;
            for (int w = 0; w < N; w++) {
                if (!room[w]) continue;
                double s = load[w];
                for (int64_t a = 0; a < E; a++)
                    if (where[a] == w) s += co[e * E + a];
                if (best < 0 || s < best_s - 1e-12) best = w, best_s = s;
            }
            where[e] = best, room[best]--, load[best] += freq[e];
        }
        int rr = tokens ? refine_layer(where, E, N, k, tok, tokens) : 0;
        if (rr) {
            nm_errf(err, "layer %lld: %s", (long long)l,
                    rr == -1 ? "out of memory refining the placement"
                             : "internal error: the refined placement's figure does not match its bookkeeping");
            goto out;
        }
        for (int64_t e = 0; e < E; e++)
            if (nm_placement_add(p, l, e, where[e], 0, sh->n_ff, err)) goto out;
    }
    rc = nm_placement_validate(p, err);
out:
    if (rc) nm_placement_free(p);
    free(freq), free(co), free(load), free(room), free(order), free(where), free(tok);
    return rc;
}

/* --gpu-experts N: per MoE layer the share of the profile's picks that its
 * N most used experts take (what --gpu-experts N with this profile keeps in
 * VRAM, gpu_hot.cuh's choice), and that experts 0..N-1 take (the choice
 * without a profile); then both over all layers. */
static int print_coverage(const profile *pr, const shape *sh, long long n) {
    const int64_t L = sh->n_layer, E = sh->n_expert;
    uint32_t *counts = calloc((size_t)(L * E), sizeof *counts);
    uint32_t *sorted = calloc((size_t)E, sizeof *sorted);
    if (!counts || !sorted) {
        free(counts), free(sorted);
        fprintf(stderr, "numoe placement: out of memory\n");
        return 1;
    }
    nm_routing_profile_count(pr, L, E, counts);
    if (n > E) n = E;
    printf("profile: %zu routing records; %lld of %lld experts per MoE layer in VRAM (%.1f%% of their bytes)\n",
           pr->n, n, (long long)E, 100.0 * (double)n / (double)E);
    printf("layer  picks  by profile  by id\n");
    uint64_t all = 0, top_all = 0, id_all = 0;
    for (int64_t l = 0; l < L; l++) {
        if (!sh->is_moe[l]) continue;
        uint64_t tot = 0, top = 0, ids = 0;
        for (int64_t e = 0; e < E; e++) {
            sorted[e] = counts[l * E + e];
            tot += sorted[e];
            if (e < n) ids += sorted[e];
        }
        /* the n largest counts (insertion into a descending prefix: E is small) */
        for (int64_t i = 1; i < E; i++)
            for (int64_t j = i; j > 0 && sorted[j] > sorted[j - 1]; j--) {
                uint32_t t = sorted[j];
                sorted[j] = sorted[j - 1], sorted[j - 1] = t;
            }
        for (int64_t e = 0; e < n; e++) top += sorted[e];
        if (!tot) continue;
        printf("%5lld  %5llu  %9.1f%%  %5.1f%%\n", (long long)l, (unsigned long long)tot, 100.0 * (double)top / tot,
               100.0 * (double)ids / tot);
        all += tot, top_all += top, id_all += ids;
    }
    if (all)
        printf("all    %5llu  %9.1f%%  %5.1f%%\n", (unsigned long long)all, 100.0 * (double)top_all / all,
               100.0 * (double)id_all / all);
    free(counts), free(sorted);
    return 0;
}

int nm_cmd_placement(int argc, char **argv) {
    const char *model = NULL, *prof_path = NULL, *out_path = NULL, *check = NULL;
    long long workers = 0, n_layer = 0, n_expert = 0, k = 0, n_dense = 0, n_ff = 1, gpu_experts = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return usage(stdout);
        if (i + 1 >= argc) {
            fprintf(stderr, "numoe placement: %s needs a value\n", a);
            return usage(stderr);
        }
        const char *v = argv[++i];
        long long *num = NULL;
        if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--profile")) prof_path = v;
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) out_path = v;
        else if (!strcmp(a, "--check")) check = v;
        else if (!strcmp(a, "--workers")) num = &workers;
        else if (!strcmp(a, "--gpu-experts")) num = &gpu_experts;
        else if (!strcmp(a, "--n-layer")) num = &n_layer;
        else if (!strcmp(a, "--n-expert")) num = &n_expert;
        else if (!strcmp(a, "--k")) num = &k;
        else if (!strcmp(a, "--n-dense")) num = &n_dense;
        else if (!strcmp(a, "--n-ff")) num = &n_ff;
        else {
            fprintf(stderr, "numoe placement: unknown option %s\n", a);
            return usage(stderr);
        }
        if (num) {
            if (nm_parse_int(v, 0, 1 << 24, num)) {
                fprintf(stderr, "numoe placement: bad value '%s' for %s\n", v, a);
                return 2;
            }
        }
    }
    const int coverage = gpu_experts >= 0;
    if ((coverage ? check || out_path || !prof_path : !!check == !!out_path) ||
        (out_path && (!prof_path || workers < 1)) || (!model && (!n_layer || !n_expert)) || (model && n_layer)) {
        fprintf(stderr, "numoe placement: give --model or a SHAPE, and either --check MAP, or --profile, --workers "
                        "and -o, or --profile and --gpu-experts N\n");
        return usage(stderr);
    }
    nm_err err = {{0}};
    shape sh = {0};
    nm_gguf *g = NULL;
    nm_model m;
    int have_model = 0, rc = 1;
    nm_placement p = {0};
    profile pr = {0};
    if (model) {
        if (nm_gguf_open(model, &g, &err) || nm_model_load(&m, g, &err)) goto out;
        have_model = 1;
        if (!m.hp.n_expert) {
            nm_errf(&err, "%s has no routed experts", model);
            goto out;
        }
        sh.n_layer = m.hp.n_layer, sh.n_expert = m.hp.n_expert, sh.k = k ? k : m.hp.n_expert_used,
        sh.n_ff = m.hp.n_ff_exp;
        if (nm_placement_model_shape(&m, &sh.is_moe, &sh.align, &err)) goto out;
    } else {
        sh.n_layer = n_layer, sh.n_expert = n_expert, sh.k = k, sh.n_ff = n_ff ? n_ff : 1;
        sh.is_moe = calloc((size_t)n_layer, 1);
        sh.align = calloc((size_t)n_layer, sizeof *sh.align);
        if (!sh.is_moe || !sh.align) {
            nm_errf(&err, "out of memory");
            goto out;
        }
        for (int64_t l = 0; l < n_layer; l++) sh.is_moe[l] = l >= n_dense, sh.align[l] = 1;
    }
    if (prof_path) {
        if (sh.k < 1) {
            nm_errf(&err, "the routing profile needs --k (experts per token)");
            goto out;
        }
        if (load_profile(&pr, prof_path, &sh, &err)) goto out;
    }
    if (coverage) {
        rc = print_coverage(&pr, &sh, gpu_experts);
        goto out;
    }
    if (check) {
        if (nm_placement_load_map(&p, check, (int)workers, sh.n_layer, sh.is_moe, sh.align, sh.n_expert, sh.n_ff,
                                  &err))
            goto out;
        printf("%s: valid placement map for %d workers (%lld layers, %lld experts), hash %016llx\n", check,
               p.n_workers, (long long)sh.n_layer, (long long)sh.n_expert,
               (unsigned long long)nm_placement_hash(&p));
        if (prof_path) {
            double worst, mean = expected_max(&p, &pr, sh.k, &worst);
            printf("expected busiest-worker active experts per token: %.3f (worst layer %.3f; ideal %.3f)\n", mean,
                   worst, (double)sh.k / p.n_workers);
        }
        rc = 0;
        goto out;
    }
    nm_placement before;
    if (nm_placement_init(&before, NM_PLACE_EXPERTS, (int)workers, sh.n_layer, sh.is_moe, sh.align, sh.n_expert,
                          sh.n_ff, &err) ||
        nm_placement_fill(&before, &err))
        goto out;
    double wb, b = expected_max(&before, &pr, sh.k, &wb);
    nm_placement_free(&before);
    if (balance(&p, &sh, &pr, (int)workers, &err)) goto out;
    double wa, a = expected_max(&p, &pr, sh.k, &wa);
    FILE *f = fopen(out_path, "w");
    if (!f) {
        nm_errf(&err, "cannot write %s: %s", out_path, strerror(errno));
        goto out;
    }
    int werr = nm_placement_write_map(&p, f);
    if (fclose(f) || werr) {
        nm_errf(&err, "writing %s failed", out_path);
        goto out;
    }
    printf("profile %s: %zu routing records (k=%lld, %lld experts, %d workers)\n", prof_path, pr.n, (long long)sh.k,
           (long long)sh.n_expert, (int)workers);
    printf("expected busiest-worker active experts per token (ideal %.3f):\n", (double)sh.k / (double)workers);
    printf("  contiguous blocks: %.3f (worst layer %.3f)\n", b, wb);
    printf("  balanced:          %.3f (worst layer %.3f)\n", a, wa);
    printf("wrote %s (hash %016llx); use it with --placement %s\n", out_path,
           (unsigned long long)nm_placement_hash(&p), out_path);
    rc = 0;
out:
    if (rc) fprintf(stderr, "numoe placement: %s\n", err.msg);
    nm_placement_free(&p);
    free(pr.rec);
    free(sh.is_moe), free(sh.align);
    if (have_model) nm_model_free(&m);
    if (g) nm_gguf_close(g);
    return rc;
}
