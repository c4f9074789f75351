/* test_sampler.c - the sampling chain: greedy, seeds, the exact candidate
 * sets top-k / top-p / min-p keep, the order of the stages, the penalties,
 * and the frequencies of many draws against softmax(logits / T). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "common/clock.h"
#include "coordinator/cli/options.h"
#include "coordinator/text/sampler.h"
#include "tests/unit/check.h"

#define DEEPSEEK_VOCAB 129280

static uint64_t rng_state = 12345;
static double urand(void) { /* xorshift64*, [0, 1) */
    rng_state ^= rng_state >> 12, rng_state ^= rng_state << 25, rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) * 0x1.0p-53;
}
static float nrand(void) {
    double u = urand() + 1e-12, v = urand();
    return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v));
}

/* neutral parameters: nothing filtered, no penalties */
static nm_sampler_params neutral(float temp) {
    nm_sampler_params p = nm_sampler_params_default();
    p.temp = temp, p.top_k = 0, p.top_p = 1, p.min_p = 0;
    p.repeat_penalty = 1, p.presence_penalty = 0, p.frequency_penalty = 0;
    return p;
}

static int open_s(nm_sampler *s, const nm_sampler_params *p, int64_t n) {
    nm_err e;
    if (nm_sampler_init_params(s, p, n, &e)) {
        CHECK(0, "init: %s", e.msg);
        return -1;
    }
    return 0;
}

/* ids of the surviving candidates, in the order returned */
static int64_t cand_ids(nm_sampler *s, const float *l, int64_t n, int32_t *ids) {
    const nm_sampler_cand *c;
    int64_t k = nm_sampler_candidates(s, l, n, &c);
    for (int64_t i = 0; i < k; i++) ids[i] = c[i].id;
    return k;
}

static int same_ids(const int32_t *got, int64_t n_got, const int32_t *want, int64_t n_want) {
    if (n_got != n_want) return 0;
    for (int64_t i = 0; i < n_got; i++)
        if (got[i] != want[i]) return 0;
    return 1;
}

/* brute-force order (logit desc, id asc) of all n ids */
static const float *order_logits;
static int cmp_order(const void *x, const void *y) {
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    float la = order_logits[a], lb = order_logits[b];
    if (la != lb) return la > lb ? -1 : 1;
    return a < b ? -1 : a > b;
}
static int32_t *full_order(const float *l, int64_t n) {
    int32_t *o = malloc((size_t)n * sizeof *o);
    for (int64_t i = 0; i < n; i++) o[i] = (int32_t)i;
    order_logits = l;
    qsort(o, (size_t)n, sizeof *o, cmp_order);
    return o;
}

static void test_greedy(void) {
    float l[6] = {0.5f, 2.0f, -1.0f, 2.0f, NAN, 1.9f};
    nm_sampler s;
    nm_sampler_init(&s, 0, 1);
    for (int r = 0; r < 3; r++) CHECK(nm_sampler_sample(&s, l, 6) == 1, "greedy must take the lowest id among equal maxima");
    CHECK(s.n_cap == 0, "plain greedy needs no scratch");
    nm_sampler_free(&s);

    nm_sampler_params p = nm_sampler_params_default(); /* top-k/p, min-p set: greedy ignores them */
    p.temp = 0;
    if (open_s(&s, &p, 6)) return;
    CHECK(nm_sampler_sample(&s, l, 6) == 1, "greedy with filters configured");
    const nm_sampler_cand *c;
    int64_t k = nm_sampler_candidates(&s, l, 6, &c);
    CHECK(k == 1 && c[0].id == 1 && c[0].p == 1.0f, "greedy candidates: k=%lld", (long long)k);
    nm_sampler_free(&s);
    nm_sampler_free(&s); /* a second free is harmless */

    /* a large random vocabulary: argmax */
    int64_t n = DEEPSEEK_VOCAB;
    float *big = malloc((size_t)n * sizeof *big);
    for (int64_t i = 0; i < n; i++) big[i] = nrand();
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (big[i] > big[best]) best = i;
    nm_sampler_init(&s, 0, 99);
    CHECK(nm_sampler_sample(&s, big, n) == best, "argmax of a random vocab");
    nm_sampler_free(&s);
    free(big);

    /* everything masked: still a valid id (the lowest) */
    float m[3] = {-INFINITY, -INFINITY, -INFINITY};
    nm_sampler_init(&s, 1.0f, 5);
    CHECK(nm_sampler_sample(&s, m, 3) == 0, "all -inf");
    nm_sampler_free(&s);
}

static void draw_seq(uint64_t seed, const float *l, int64_t n, int32_t *out, int cnt, const nm_sampler_params *base) {
    nm_sampler_params p = *base;
    p.seed = seed;
    nm_sampler s;
    if (open_s(&s, &p, n)) return;
    for (int i = 0; i < cnt; i++) out[i] = nm_sampler_sample(&s, l, n);
    nm_sampler_free(&s);
}

static void test_seed(void) {
    int64_t n = DEEPSEEK_VOCAB;
    float *l = malloc((size_t)n * sizeof *l);
    for (int64_t i = 0; i < n; i++) l[i] = 2.0f * nrand();
    enum { CNT = 300 };
    int32_t a[CNT], b[CNT], c[CNT];
    nm_sampler_params ps[3] = {neutral(1.0f), nm_sampler_params_default(), neutral(0.7f)};
    ps[2].top_p = 0.9f, ps[2].repeat_penalty = 1.3f, ps[2].presence_penalty = 0.5f;
    for (int v = 0; v < 3; v++) {
        draw_seq(7, l, n, a, CNT, &ps[v]);
        draw_seq(7, l, n, b, CNT, &ps[v]);
        draw_seq(8, l, n, c, CNT, &ps[v]);
        int same = 1, diff = 0, valid = 1;
        for (int i = 0; i < CNT; i++) {
            same &= a[i] == b[i];
            diff += a[i] != c[i];
            valid &= a[i] >= 0 && a[i] < n;
        }
        CHECK(valid, "variant %d: ids in range", v);
        CHECK(same, "variant %d: the same seed must give the same tokens", v);
        CHECK(diff > CNT / 10, "variant %d: different seeds should differ (only %d of %d differ)", v, diff, CNT);
    }
    /* the compatibility initialiser is seeded too */
    nm_sampler s1, s2;
    nm_sampler_init(&s1, 1.0f, 3);
    nm_sampler_init(&s2, 1.0f, 3);
    int same = 1;
    for (int i = 0; i < 50; i++) same &= nm_sampler_sample(&s1, l, n) == nm_sampler_sample(&s2, l, n);
    CHECK(same, "nm_sampler_init: same seed, same tokens");
    nm_sampler_free(&s1);
    nm_sampler_free(&s2);
    free(l);
}

static void test_top_k(void) {
    nm_sampler s;
    nm_sampler_params p = neutral(1.0f);
    int32_t ids[16];
    /* ties at the boundary: the lower ids win */
    float l[8] = {1.0f, 3.0f, 3.0f, 3.0f, 0.0f, 5.0f, -2.0f, 3.0f};
    p.top_k = 3;
    if (open_s(&s, &p, 8)) return;
    int64_t k = cand_ids(&s, l, 8, ids);
    CHECK(same_ids(ids, k, (int32_t[]){5, 1, 2}, 3), "top-3 of crafted logits (k=%lld: %d %d %d)", (long long)k, ids[0], ids[1], ids[2]);
    nm_sampler_free(&s);
    p.top_k = 1;
    if (open_s(&s, &p, 8)) return;
    k = cand_ids(&s, l, 8, ids);
    CHECK(same_ids(ids, k, (int32_t[]){5}, 1), "top-1");
    nm_sampler_free(&s);
    p.top_k = 100; /* larger than the vocab: off */
    if (open_s(&s, &p, 8)) return;
    CHECK(cand_ids(&s, l, 8, ids) == 8, "top-k > vocab keeps all");
    nm_sampler_free(&s);

    /* probabilities are renormalised over the kept set */
    float l2[4] = {0.0f, logf(2.0f), logf(3.0f), logf(4.0f)};
    p.top_k = 2;
    if (open_s(&s, &p, 4)) return;
    const nm_sampler_cand *c;
    k = nm_sampler_candidates(&s, l2, 4, &c);
    CHECK(k == 2 && c[0].id == 3 && c[1].id == 2 && fabsf(c[0].p - 4.0f / 7) < 1e-6f && fabsf(c[1].p - 3.0f / 7) < 1e-6f,
          "top-2 probabilities");
    nm_sampler_free(&s);

    /* a DeepSeek-sized vocabulary with many ties, against a full sort */
    int64_t n = DEEPSEEK_VOCAB;
    float *big = malloc((size_t)n * sizeof *big);
    int32_t *got = malloc((size_t)n * sizeof *got);
    for (int64_t i = 0; i < n; i++) big[i] = (float)floor(nrand() * 20) / 4; /* coarse: lots of ties */
    int32_t *ord = full_order(big, n);
    int ks[] = {1, 2, 40, 1000, 50000};
    for (size_t j = 0; j < sizeof ks / sizeof *ks; j++) {
        p.top_k = ks[j];
        if (open_s(&s, &p, n)) break;
        k = cand_ids(&s, big, n, got);
        CHECK(same_ids(got, k, ord, ks[j]), "top-%d of %lld random logits (got %lld)", ks[j], (long long)n, (long long)k);
        nm_sampler_free(&s);
    }
    /* sorted and reverse-sorted inputs (quickselect pivots) */
    for (int64_t i = 0; i < n; i++) big[i] = (float)i;
    p.top_k = 7;
    if (open_s(&s, &p, n)) return;
    k = cand_ids(&s, big, n, got);
    int ok = k == 7;
    for (int64_t i = 0; ok && i < 7; i++) ok = got[i] == n - 1 - i;
    CHECK(ok, "top-7 of ascending logits");
    for (int64_t i = 0; i < n; i++) big[i] = (float)(n - i);
    k = cand_ids(&s, big, n, got);
    ok = k == 7;
    for (int64_t i = 0; ok && i < 7; i++) ok = got[i] == i;
    CHECK(ok, "top-7 of descending logits");
    for (int64_t i = 0; i < n; i++) big[i] = 1.0f; /* all equal */
    k = cand_ids(&s, big, n, got);
    ok = k == 7;
    for (int64_t i = 0; ok && i < 7; i++) ok = got[i] == i;
    CHECK(ok, "top-7 of equal logits = the 7 lowest ids");
    nm_sampler_free(&s);
    free(ord);
    free(got);
    free(big);
}

/* logits = log(prob) so the softmax is the given distribution */
static void logits_of(const double *prob, int n, float *l) {
    for (int i = 0; i < n; i++) l[i] = (float)log(prob[i]);
}

static void test_top_p(void) {
    nm_sampler s;
    nm_sampler_params p = neutral(1.0f);
    int32_t ids[16];
    /* id:   0     1     2     3     4     5 */
    double pr[6] = {0.10, 0.40, 0.05, 0.25, 0.15, 0.05};
    float l[6];
    logits_of(pr, 6, l);
    struct { float top_p; int n; int32_t want[6]; } cases[] = {
        {0.30f, 1, {1}},                 /* 0.40 >= 0.30 */
        {0.60f, 2, {1, 3}},              /* 0.65 */
        {0.70f, 3, {1, 3, 4}},           /* 0.80 */
        {0.85f, 4, {1, 3, 4, 0}},        /* 0.90 */
        {0.93f, 5, {1, 3, 4, 0, 2}},     /* 0.95: of the equal 0.05s the lower id */
        {0.99f, 6, {1, 3, 4, 0, 2, 5}},
        {0.0f, 1, {1}},                  /* keeps at least one */
    };
    for (size_t j = 0; j < sizeof cases / sizeof *cases; j++) {
        p.top_p = cases[j].top_p;
        if (open_s(&s, &p, 6)) return;
        int64_t k = cand_ids(&s, l, 6, ids);
        CHECK(same_ids(ids, k, cases[j].want, cases[j].n), "top-p %.2f: k=%lld want %d", cases[j].top_p, (long long)k,
              cases[j].n);
        nm_sampler_free(&s);
    }

    /* a DeepSeek-sized vocabulary without top-k (the histogram path), against a
     * full sort: smooth logits, coarse ones (ties across the cut), some masked */
    int64_t n = DEEPSEEK_VOCAB;
    float *big = malloc((size_t)n * sizeof *big);
    int32_t *got = malloc((size_t)n * sizeof *got);
    for (int variant = 0; variant < 3; variant++) {
        for (int64_t i = 0; i < n; i++) {
            float x = 3.0f * nrand();
            big[i] = variant == 0 ? x : variant == 1 ? (float)floor(x * 2) / 2 : (i % 7 == 3 ? -INFINITY : x);
        }
        int32_t *ord = full_order(big, n);
        double m = big[ord[0]], z = 0;
        for (int64_t i = 0; i < n; i++) z += exp(big[i] - m);
        float tps[] = {0.05f, 0.5f, 0.9f, 0.99f};
        for (size_t j = 0; j < sizeof tps / sizeof *tps; j++) {
            double cum = 0;
            int64_t want = n, margin_ok = 1;
            for (int64_t i = 0; i < n; i++) {
                cum += exp(big[ord[i]] - m) / z;
                if (cum >= tps[j]) {
                    want = i + 1;
                    margin_ok = cum - tps[j] > 1e-9 && tps[j] - (cum - exp(big[ord[i]] - m) / z) > 1e-9;
                    break;
                }
            }
            CHECK(margin_ok, "test data too close to the top-p boundary");
            p.top_p = tps[j];
            if (open_s(&s, &p, n)) break;
            int64_t k = cand_ids(&s, big, n, got);
            CHECK(same_ids(got, k, ord, want), "variant %d: top-p %.2f over %lld logits: kept %lld, want %lld", variant,
                  tps[j], (long long)n, (long long)k, (long long)want);
            nm_sampler_free(&s);
        }
        free(ord);
    }
    free(got);
    free(big);
}

static void test_min_p(void) {
    nm_sampler s;
    nm_sampler_params p = neutral(1.0f);
    int32_t ids[16];
    /* relative to the max (id 2): ratios e^0, e^-0.5, e^-1, e^-2, e^-3, e^-1.2 */
    float l[7] = {-1.0f, -0.5f, 0.0f, -2.0f, -3.0f, -1.2f, -0.5f};
    struct { float min_p; int n; int32_t want[7]; } cases[] = {
        {0.35f, 4, {2, 1, 6, 0}},        /* e^-1 = 0.368 kept, e^-1.2 = 0.301 not */
        {0.30f, 5, {2, 1, 6, 0, 5}},
        {0.5f, 3, {2, 1, 6}},            /* e^-0.5 = 0.607 */
        {1.0f, 1, {2}},
        {0.01f, 7, {2, 1, 6, 0, 5, 3, 4}},
    };
    for (size_t j = 0; j < sizeof cases / sizeof *cases; j++) {
        p.min_p = cases[j].min_p;
        if (open_s(&s, &p, 7)) return;
        int64_t k = cand_ids(&s, l, 7, ids);
        CHECK(same_ids(ids, k, cases[j].want, cases[j].n), "min-p %.2f: k=%lld want %d", cases[j].min_p, (long long)k,
              cases[j].n);
        nm_sampler_free(&s);
    }
}

/* the stages run in the documented order and temperature does not move the sets */
static void test_chain_order(void) {
    nm_sampler s;
    int32_t ids[16];
    double pr[5] = {0.4, 0.3, 0.2, 0.06, 0.04};
    float l[5];
    logits_of(pr, 5, l);
    nm_sampler_params p = neutral(1.0f);
    /* top-p alone at 0.5: 0.4 < 0.5 so two tokens */
    p.top_p = 0.5f;
    if (open_s(&s, &p, 5)) return;
    CHECK(same_ids(ids, cand_ids(&s, l, 5, ids), (int32_t[]){0, 1}, 2), "top-p alone");
    nm_sampler_free(&s);
    /* top-k 2 first renormalises to 4/7, 3/7: top-p 0.5 then keeps one */
    p.top_k = 2;
    if (open_s(&s, &p, 5)) return;
    CHECK(same_ids(ids, cand_ids(&s, l, 5, ids), (int32_t[]){0}, 1), "top-k before top-p");
    nm_sampler_free(&s);
    /* top-p 0.95 keeps {0,1,2,3}; min-p 0.16 then drops 3 (0.06 < 0.16 * 0.4) */
    p = neutral(1.0f);
    p.top_p = 0.95f, p.min_p = 0.16f;
    if (open_s(&s, &p, 5)) return;
    CHECK(same_ids(ids, cand_ids(&s, l, 5, ids), (int32_t[]){0, 1, 2}, 3), "top-p then min-p");
    nm_sampler_free(&s);
    /* penalties come first: a penalised token can fall out of the top-k */
    p = neutral(1.0f);
    p.top_k = 2, p.presence_penalty = 1.0f, p.penalty_last_n = 4;
    if (open_s(&s, &p, 5)) return;
    nm_sampler_accept(&s, 0);
    CHECK(same_ids(ids, cand_ids(&s, l, 5, ids), (int32_t[]){1, 2}, 2), "penalties before top-k");
    nm_sampler_free(&s);
    /* temperature changes the probabilities, not the set */
    float temps[] = {0.2f, 1.0f, 5.0f};
    for (int t = 0; t < 3; t++) {
        p = neutral(temps[t]);
        p.top_p = 0.85f, p.min_p = 0.1f;
        if (open_s(&s, &p, 5)) return;
        const nm_sampler_cand *c;
        int64_t k = nm_sampler_candidates(&s, l, 5, &c);
        CHECK(k == 3 && c[0].id == 0 && c[1].id == 1 && c[2].id == 2, "temp %.1f: set", temps[t]);
        double z = 0;
        for (int i = 0; i < 3; i++) z += pow(pr[i], 1.0 / temps[t]);
        for (int i = 0; i < k; i++)
            CHECK(fabs(c[i].p - pow(pr[c[i].id], 1.0 / temps[t]) / z) < 1e-5, "temp %.1f: p[%d] = %g", temps[t], i, c[i].p);
        nm_sampler_free(&s);
    }
}

static void test_penalties(void) {
    nm_sampler s;
    float l[8] = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 0.0f, 1.0f, -INFINITY};
    nm_sampler_params p = neutral(1.0f);
    p.repeat_penalty = 2.0f, p.presence_penalty = 0.25f, p.frequency_penalty = 0.5f, p.penalty_last_n = 6;
    if (open_s(&s, &p, 8)) return;
    /* 3 falls out of the 6-token window; then 0 twice, 1, 5, 7 once, 99 is outside the vocab */
    int32_t hist[] = {3, 0, 1, 0, 99, 7, 5};
    for (size_t i = 0; i < sizeof hist / sizeof *hist; i++) nm_sampler_accept(&s, hist[i]);
    const nm_sampler_cand *c;
    int64_t k = nm_sampler_candidates(&s, l, 8, &c);
    float want[8];
    for (int i = 0; i < 8; i++) want[i] = l[i];
    want[0] = 2.0f / 2 - (2 * 0.5f + 0.25f);  /* positive: divided */
    want[1] = -1.0f * 2 - (1 * 0.5f + 0.25f); /* negative: multiplied */
    want[5] = 0.0f * 2 - (1 * 0.5f + 0.25f);  /* zero counts as non-positive */
    /* 3 (out of the window), 2, 4, 6 untouched; 7 stays -inf */
    CHECK(k == 8, "no filters: all kept");
    for (int64_t i = 0; i < k; i++) {
        int32_t id = c[i].id;
        if (isinf(want[id])) CHECK(isinf(c[i].logit) && c[i].logit < 0, "id 7 stays masked");
        else CHECK(fabsf(c[i].logit - want[id]) < 1e-6f, "id %d: logit %g, want %g", id, c[i].logit, want[id]);
    }
    /* sampling accepts its token into the window */
    nm_sampler_reset(&s);
    float one[8] = {0, 0, 0, 9, 0, 0, 0, 0};
    p.temp = 0;
    nm_sampler_free(&s);
    if (open_s(&s, &p, 8)) return;
    CHECK(nm_sampler_sample(&s, one, 8) == 3, "first draw");
    k = nm_sampler_candidates(&s, one, 8, &c);
    CHECK(k == 1 && c[0].id == 3, "greedy still 3");
    p.temp = 1.0f;
    nm_sampler_free(&s);
    if (open_s(&s, &p, 8)) return;
    nm_sampler_accept(&s, 3);
    k = nm_sampler_candidates(&s, one, 8, &c);
    int found = 0;
    for (int64_t i = 0; i < k; i++)
        if (c[i].id == 3) {
            found = 1;
            CHECK(fabsf(c[i].logit - (9.0f / 2 - 0.75f)) < 1e-6f, "accepted token penalised: %g", c[i].logit);
        }
    CHECK(found, "id 3 present");
    nm_sampler_reset(&s);
    k = nm_sampler_candidates(&s, one, 8, &c);
    CHECK(c[0].id == 3 && c[0].logit == 9.0f, "reset empties the window");
    nm_sampler_free(&s);

    /* penalties can change the greedy choice; with the window off nothing changes */
    float g[3] = {1.0f, 1.5f, 0.2f};
    p = neutral(0);
    p.repeat_penalty = 2.0f, p.penalty_last_n = 8;
    if (open_s(&s, &p, 3)) return;
    nm_sampler_accept(&s, 1);
    CHECK(nm_sampler_sample(&s, g, 3) == 0, "greedy after penalising 1 (1.5/2 < 1)");
    nm_sampler_free(&s);
    p.penalty_last_n = 0;
    if (open_s(&s, &p, 3)) return;
    nm_sampler_accept(&s, 1);
    CHECK(nm_sampler_sample(&s, g, 3) == 1, "window 0 = no penalties");
    nm_sampler_free(&s);
}

/* frequencies of many draws against softmax(logits / T) */
static void check_freq(const char *what, const float *l, int n, const nm_sampler_params *p, const double *want) {
    enum { DRAWS = 200000 };
    nm_sampler s;
    if (open_s(&s, p, n)) return;
    long cnt[16] = {0};
    for (int i = 0; i < DRAWS; i++) {
        int32_t t = nm_sampler_sample(&s, l, n);
        if (t >= 0 && t < n) cnt[t]++;
    }
    double chi2 = 0;
    int dof = -1;
    for (int i = 0; i < n; i++) {
        double f = (double)cnt[i] / DRAWS, sd = sqrt(want[i] * (1 - want[i]) / DRAWS);
        if (want[i] == 0) {
            CHECK(cnt[i] == 0, "%s: id %d must never be drawn (%ld times)", what, i, cnt[i]);
            continue;
        }
        CHECK(fabs(f - want[i]) <= 5 * sd + 1e-9, "%s: id %d frequency %.5f, softmax %.5f (5 sd = %.5f)", what, i, f, want[i],
              5 * sd);
        chi2 += (cnt[i] - DRAWS * want[i]) * (cnt[i] - DRAWS * want[i]) / (DRAWS * want[i]);
        dof++;
    }
    /* loose chi-square bound: mean dof, sd sqrt(2 dof) */
    CHECK(chi2 < dof + 6 * sqrt(2.0 * dof), "%s: chi2 %.2f with %d dof", what, chi2, dof);
    nm_sampler_free(&s);
}

static void test_distribution(void) {
    float l[8] = {1.0f, 0.2f, -0.5f, 2.0f, 0.0f, -1.5f, 1.2f, 0.7f};
    float temps[] = {0.5f, 1.0f, 1.7f};
    double want[8];
    for (int t = 0; t < 3; t++) {
        double z = 0;
        for (int i = 0; i < 8; i++) z += want[i] = exp(l[i] / temps[t]);
        for (int i = 0; i < 8; i++) want[i] /= z;
        nm_sampler_params p = neutral(temps[t]);
        char what[64];
        snprintf(what, sizeof what, "softmax T=%.1f", temps[t]);
        check_freq(what, l, 8, &p, want);
    }
    /* with top-k 4 the mass goes to the four best, renormalised */
    {
        int top[4] = {3, 6, 0, 7};
        double z = 0;
        for (int i = 0; i < 8; i++) want[i] = 0;
        for (int i = 0; i < 4; i++) z += want[top[i]] = exp(l[top[i]] / 0.8);
        for (int i = 0; i < 8; i++) want[i] /= z;
        nm_sampler_params p = neutral(0.8f);
        p.top_k = 4;
        check_freq("top-k 4, T=0.8", l, 8, &p, want);
    }
    /* the compatibility path (nm_sampler_init) samples the same distribution */
    {
        double z = 0;
        for (int i = 0; i < 8; i++) z += want[i] = exp(l[i] / 1.3);
        for (int i = 0; i < 8; i++) want[i] /= z;
        nm_sampler s;
        nm_sampler_init(&s, 1.3f, 77);
        long cnt[8] = {0};
        for (int i = 0; i < 100000; i++) cnt[nm_sampler_sample(&s, l, 8)]++;
        for (int i = 0; i < 8; i++) {
            double f = cnt[i] / 100000.0;
            CHECK(fabs(f - want[i]) <= 5 * sqrt(want[i] * (1 - want[i]) / 100000), "init(): id %d %.4f vs %.4f", i, f,
                  want[i]);
        }
        nm_sampler_free(&s);
    }
}

/* timings on a DeepSeek-sized vocabulary (printed, not asserted: ASan runs here too) */
static void test_speed(void) {
    int64_t n = DEEPSEEK_VOCAB;
    float *l = malloc((size_t)n * sizeof *l);
    for (int64_t i = 0; i < n; i++) l[i] = 2.5f * nrand();
    struct { const char *name; nm_sampler_params p; } v[4] = {
        {"greedy", neutral(0)}, {"defaults (top-k 40)", nm_sampler_params_default()},
        {"top-p 0.95 only", neutral(0.8f)}, {"softmax only", neutral(1.0f)},
    };
    v[2].p.top_p = 0.95f;
    v[1].p.repeat_penalty = 1.1f;
    for (int j = 0; j < 4; j++) {
        nm_sampler s;
        if (open_s(&s, &v[j].p, n)) break;
        for (int i = 0; i < 64; i++) nm_sampler_accept(&s, (int32_t)(i * 977 % n));
        int reps = 50;
        double t0 = nm_now_s();
        int32_t sink = 0;
        for (int r = 0; r < reps; r++) sink ^= nm_sampler_sample(&s, l, n);
        double dt = (nm_now_s() - t0) / reps;
        CHECK(sink >= 0, "ids");
        fprintf(stderr, "     %-22s %8.1f us per token (vocab %lld)\n", v[j].name, dt * 1e6, (long long)n);
        nm_sampler_free(&s);
    }
    free(l);
}

static void test_params(void) {
    nm_sampler s;
    nm_err e;
    nm_sampler_params p = nm_sampler_params_default();
    p.top_p = 1.5f;
    CHECK(nm_sampler_init_params(&s, &p, 10, &e) == -1 && strstr(e.msg, "top-p"), "top-p > 1 rejected");
    p = nm_sampler_params_default();
    p.repeat_penalty = 0;
    CHECK(nm_sampler_init_params(&s, &p, 10, &e) == -1 && strstr(e.msg, "repeat"), "repeat penalty 0 rejected");
    p = nm_sampler_params_default();
    p.temp = NAN;
    CHECK(nm_sampler_init_params(&s, &p, 10, &e) == -1, "NaN temp rejected");

    char *argv[] = {"x", "--top-k", "7", "--top-p", "0.5", "--min-p", "0.1", "--temp", "0.3", "--repeat-penalty", "1.2",
                    "--presence-penalty", "0.4", "--frequency-penalty", "-0.1", "--repeat-last-n", "32", "--seed", "123",
                    "--other", "--top-p", "2"};
    int argc = (int)(sizeof argv / sizeof *argv), i = 1, r;
    p = nm_sampler_params_default();
    while (i < argc && (r = nm_sampler_parse_opt(&p, argc, argv, &i, "test")) == 1) i++;
    CHECK(i == 19, "stopped at --other (i=%d)", i);
    CHECK(p.top_k == 7 && p.top_p == 0.5f && p.min_p == 0.1f && p.temp == 0.3f && p.repeat_penalty == 1.2f &&
              p.presence_penalty == 0.4f && p.frequency_penalty == -0.1f && p.penalty_last_n == 32 && p.seed == 123,
          "parsed values");
    CHECK(nm_sampler_parse_opt(&p, argc, argv, &i, "test") == 0, "--other is not ours");
    i = 20;
    CHECK(nm_sampler_parse_opt(&p, argc, argv, &i, "test (expected message)") == -1, "--top-p 2 rejected");
    CHECK(strstr(nm_sampler_opts_help, "--min-p") != NULL, "help lists the options");
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    RUN(test_greedy);
    RUN(test_seed);
    RUN(test_top_k);
    RUN(test_top_p);
    RUN(test_min_p);
    RUN(test_chain_order);
    RUN(test_penalties);
    RUN(test_distribution);
    RUN(test_params);
    RUN(test_speed);
    return check_summary();
}
