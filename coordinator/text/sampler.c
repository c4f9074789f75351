/* sampler.c - the sampling chain described in sampler.h. */
#include "coordinator/text/sampler.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

nm_sampler_params nm_sampler_params_default(void) {
    nm_sampler_params p = {
        .temp = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f,
        .repeat_penalty = 1.0f, .presence_penalty = 0.0f, .frequency_penalty = 0.0f,
        .penalty_last_n = 64, .seed = 42,
    };
    return p;
}

static int penalties_on(const nm_sampler_params *p) {
    return p->penalty_last_n > 0 &&
           (p->repeat_penalty != 1.0f || p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f);
}

static int check_params(const nm_sampler_params *p, nm_err *e) {
    if (isnan(p->temp) || isinf(p->temp)) return nm_errf(e, "sampler: temperature must be finite");
    if (!(p->top_p >= 0 && p->top_p <= 1)) return nm_errf(e, "sampler: top-p %g outside [0, 1]", p->top_p);
    if (!(p->min_p >= 0 && p->min_p <= 1)) return nm_errf(e, "sampler: min-p %g outside [0, 1]", p->min_p);
    if (!(p->repeat_penalty > 0) || isinf(p->repeat_penalty))
        return nm_errf(e, "sampler: repeat penalty must be a positive number, got %g", p->repeat_penalty);
    if (!isfinite(p->presence_penalty) || !isfinite(p->frequency_penalty))
        return nm_errf(e, "sampler: presence / frequency penalties must be finite");
    if (p->penalty_last_n < 0)
        return nm_errf(e, "sampler: penalty window %d is negative", (int)p->penalty_last_n);
    return 0;
}

#define BUCKETS 4096 /* top-p histogram */

static int ensure_cap(nm_sampler *s, int64_t n) {
    if (!s->bkt_mass && !(s->bkt_mass = malloc(BUCKETS * sizeof *s->bkt_mass))) return -1;
    if (n <= s->n_cap) return 0;
    nm_sampler_cand *c = malloc((size_t)n * sizeof *c);
    float *lg = malloc((size_t)n * sizeof *lg);
    int32_t *cnt = calloc((size_t)n, sizeof *cnt);
    if (!c || !lg || !cnt) {
        free(c), free(lg), free(cnt);
        return -1;
    }
    free(s->cand), free(s->lg), free(s->count);
    s->cand = c, s->lg = lg, s->count = cnt, s->n_cap = n;
    return 0;
}

int nm_sampler_init_params(nm_sampler *s, const nm_sampler_params *p, int64_t n_vocab, nm_err *e) {
    memset(s, 0, sizeof *s);
    if (check_params(p, e)) return -1;
    s->par = *p;
    s->rng = p->seed;
    if (n_vocab > 0 && ensure_cap(s, n_vocab)) return nm_errf(e, "sampler: out of memory for %lld candidates", (long long)n_vocab);
    if (penalties_on(p) && !(s->hist = malloc((size_t)p->penalty_last_n * sizeof *s->hist))) {
        nm_sampler_free(s);
        return nm_errf(e, "sampler: out of memory for a penalty window of %d tokens", (int)p->penalty_last_n);
    }
    return 0;
}

void nm_sampler_init(nm_sampler *s, float temp, uint64_t seed) {
    memset(s, 0, sizeof *s);
    s->par = (nm_sampler_params){.temp = temp, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f,
                                 .repeat_penalty = 1.0f, .penalty_last_n = 0, .seed = seed};
    s->rng = seed;
}

void nm_sampler_free(nm_sampler *s) {
    free(s->cand), free(s->lg), free(s->count), free(s->hist), free(s->bkt_mass);
    s->cand = NULL, s->lg = NULL, s->count = NULL, s->hist = NULL, s->bkt_mass = NULL;
    s->n_cap = 0, s->hist_n = 0, s->hist_pos = 0;
}

void nm_sampler_accept(nm_sampler *s, int32_t token) {
    if (!s->hist) return;
    s->hist[s->hist_pos] = token;
    s->hist_pos = (s->hist_pos + 1) % s->par.penalty_last_n;
    if (s->hist_n < s->par.penalty_last_n) s->hist_n++;
}

void nm_sampler_reset(nm_sampler *s) { s->hist_n = 0, s->hist_pos = 0; }

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ---- ordering: logit descending, then id ascending (a total order) ---- */

static inline int before(const nm_sampler_cand *a, const nm_sampler_cand *b) {
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static int cmp_cand(const void *x, const void *y) {
    const nm_sampler_cand *a = x, *b = y;
    return before(a, b) ? -1 : before(b, a) ? 1 : 0;
}

static inline void swap_c(nm_sampler_cand *a, int64_t i, int64_t j) {
    nm_sampler_cand t = a[i];
    a[i] = a[j], a[j] = t;
}

/* ---- the stages ---- */

/* Stage 1, on s->lg (indexed by id). */
static void apply_penalties(nm_sampler *s, int64_t n) {
    const nm_sampler_params *p = &s->par;
    if (!s->hist || !s->hist_n) return;
    for (int32_t j = 0; j < s->hist_n; j++) {
        int32_t t = s->hist[j];
        if (t >= 0 && t < n) s->count[t]++;
    }
    for (int32_t j = 0; j < s->hist_n; j++) {
        int32_t t = s->hist[j];
        if (t < 0 || t >= n || !s->count[t]) continue;
        float l = s->lg[t];
        if (l != -INFINITY) { /* a masked token stays masked */
            l = l <= 0 ? l * p->repeat_penalty : l / p->repeat_penalty;
            s->lg[t] = l - ((float)s->count[t] * p->frequency_penalty + p->presence_penalty);
        }
        s->count[t] = 0; /* each id once; leaves the array zeroed */
    }
}

/* Stage 2: the k first of lg[0..n) in the order into c[0..k), via a heap
 * whose root is the last of the kept ones. Ids arrive in ascending order, so
 * a newcomer beats the root only with a strictly larger logit. */
static void heap_down(nm_sampler_cand *h, int64_t k, int64_t i) {
    for (;;) {
        int64_t w = i, a = 2 * i + 1, b = a + 1;
        if (a < k && before(&h[w], &h[a])) w = a;
        if (b < k && before(&h[w], &h[b])) w = b;
        if (w == i) return;
        swap_c(h, i, w);
        i = w;
    }
}

static int64_t top_k_heap(const float *lg, int64_t n, int64_t k, nm_sampler_cand *h) {
    for (int64_t i = 0; i < k; i++) h[i].id = (int32_t)i, h[i].logit = lg[i], h[i].p = 0;
    for (int64_t i = k / 2 - 1; i >= 0; i--) heap_down(h, k, i);
    for (int64_t i = k; i < n; i++) {
        if (!(lg[i] > h[0].logit)) continue;
        h[0].id = (int32_t)i, h[0].logit = lg[i];
        heap_down(h, k, 0);
    }
    return k;
}

/* Histogram bucket of a logit: monotone in the logit (a larger logit never
 * lands in a later bucket), -inf in the last. */
static inline int bucket_of(float l, double m, double scale) {
    if (l == -INFINITY) return BUCKETS - 1;
    double x = (m - (double)l) * scale;
    return x < BUCKETS - 1 ? (int)x : BUCKETS - 1;
}

/* Stage 3 on c[0..n): returns how many to keep (moved to the front). Tokens
 * are bucketed by (max - logit); buckets above the one where the mass
 * crosses p are kept whole, that one is sorted and cut. *sorted is set when
 * the kept tokens end up in order. */
static int64_t top_p_cut(nm_sampler *s, nm_sampler_cand *c, int64_t n, double top_p, int *sorted) {
    double m = -INFINITY, lo = INFINITY, z = 0;
    for (int64_t i = 0; i < n; i++) {
        double l = c[i].logit;
        if (l > m) m = l;
        if (l < lo && l != -INFINITY) lo = l;
    }
    int small = n <= 256 || !(m - lo > 0);
    double scale = small ? 0 : (BUCKETS - 1) / (m - lo);
    if (!small) {
        for (int b = 0; b < BUCKETS; b++) s->bkt_mass[b] = 0;
        for (int64_t i = 0; i < n; i++) {
            double w = exp((double)c[i].logit - m);
            int b = bucket_of(c[i].logit, m, scale);
            s->bkt_mass[b] += w;
            z += w;
        }
    } else {
        for (int64_t i = 0; i < n; i++) z += exp((double)c[i].logit - m);
    }
    double target = top_p * z, cum = 0;
    int64_t front = 0, len = n;
    if (!small) {
        int b = 0;
        for (; b < BUCKETS - 1; b++) {
            if (cum + s->bkt_mass[b] >= target) break;
            cum += s->bkt_mass[b];
        }
        /* buckets < b to the front, then bucket b */
        for (int64_t i = 0; i < n; i++)
            if (bucket_of(c[i].logit, m, scale) < b) swap_c(c, i, front++);
        len = 0;
        for (int64_t i = front; i < n; i++)
            if (bucket_of(c[i].logit, m, scale) == b) swap_c(c, i, front + len++);
        *sorted = front == 0;
    } else {
        *sorted = 1;
    }
    qsort(c + front, (size_t)len, sizeof *c, cmp_cand);
    for (int64_t i = front; i < front + len; i++) {
        cum += exp((double)c[i].logit - m);
        if (cum >= target) return i + 1;
    }
    return front + len > 0 ? front + len : 1; /* rounding left p uncovered: keep what was looked at */
}

/* Loads the logits and runs stages 1-4 (greedy: 1 and the argmax). Returns
 * the number of survivors at s->cand; *sorted says whether they are in order. */
static int64_t run_filters(nm_sampler *s, const float *logits, int64_t n, int *sorted) {
    const nm_sampler_params *p = &s->par;
    nm_sampler_cand *c = s->cand;
    float *lg = s->lg;
    *sorted = 0;
    for (int64_t i = 0; i < n; i++) {
        float l = logits[i];
        lg[i] = isnan(l) ? -INFINITY : l > FLT_MAX ? FLT_MAX : l; /* +inf -> largest finite: exp() stays finite */
    }
    apply_penalties(s, n);

    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (lg[i] > lg[best]) best = i;
    if (p->temp <= 0 || lg[best] == -INFINITY) { /* greedy, or nothing can be weighed: the argmax */
        c[0].id = (int32_t)best, c[0].logit = lg[best], c[0].p = 0;
        *sorted = 1;
        return 1;
    }

    if (p->top_k > 0 && p->top_k < n) {
        n = top_k_heap(lg, n, p->top_k, c);
    } else {
        for (int64_t i = 0; i < n; i++) c[i].id = (int32_t)i, c[i].logit = lg[i], c[i].p = 0;
    }

    if (p->top_p < 1.0f && n > 1) n = top_p_cut(s, c, n, p->top_p, sorted);

    if (p->min_p > 0.0f && n > 1) {
        double m = -INFINITY, thr = log((double)p->min_p);
        for (int64_t i = 0; i < n; i++)
            if (c[i].logit > m) m = c[i].logit;
        int64_t k = 0;
        for (int64_t i = 0; i < n; i++)
            if ((double)c[i].logit - m >= thr) c[k++] = c[i]; /* order kept; the maximum always passes */
        n = k;
    }
    return n;
}

/* Sum of c[0..n).p with independent partial sums (no serial add chain). */
static double sum_p(const nm_sampler_cand *c, int64_t n) {
    double a[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) a[0] += c[i].p, a[1] += c[i + 1].p, a[2] += c[i + 2].p, a[3] += c[i + 3].p;
    for (; i < n; i++) a[0] += c[i].p;
    return (a[0] + a[1]) + (a[2] + a[3]);
}

/* Stage 5: c[i].p = exp((logit - max) / temp) (unnormalised); returns the sum. */
static double weigh(nm_sampler_cand *c, int64_t n, float temp) {
    if (temp <= 0 || n == 1) {
        for (int64_t i = 0; i < n; i++) c[i].p = i == 0 ? 1.0f : 0.0f;
        return 1.0;
    }
    float m = -INFINITY, inv = 1.0f / temp;
    for (int64_t i = 0; i < n; i++)
        if (c[i].logit > m) m = c[i].logit;
    for (int64_t i = 0; i < n; i++) c[i].p = expf((c[i].logit - m) * inv);
    return sum_p(c, n);
}

/* Stage 6: the candidate where the running sum of weights passes r (in
 * [0, z)); whole blocks are skipped by their sums first. */
static int32_t draw(const nm_sampler_cand *c, int64_t n, double r) {
    enum { BLK = 64 };
    double acc = 0;
    int64_t i = 0;
    for (; i + BLK <= n; i += BLK) {
        double b = sum_p(c + i, BLK);
        if (acc + b > r) break;
        acc += b;
    }
    int32_t tok = c[0].id;
    for (; i < n; i++) {
        if (c[i].p <= 0) continue;
        tok = c[i].id; /* the last one with weight, if rounding leaves r uncovered */
        acc += c[i].p;
        if (acc > r) break;
    }
    return tok;
}

static int32_t argmax(const float *logits, int64_t n) {
    int64_t best = 0;
    float bl = isnan(logits[0]) ? -INFINITY : logits[0];
    for (int64_t i = 1; i < n; i++)
        if (logits[i] > bl) best = i, bl = logits[i];
    return (int32_t)best;
}

int32_t nm_sampler_sample(nm_sampler *s, const float *logits, int64_t n) {
    int32_t tok;
    if (n <= 0) return -1;
    if (s->par.temp <= 0 && !(s->hist && s->hist_n)) {
        tok = argmax(logits, n); /* nothing to filter: no scratch needed */
    } else {
        if (ensure_cap(s, n)) return -1;
        int sorted;
        int64_t k = run_filters(s, logits, n, &sorted);
        if (s->par.temp <= 0) {
            tok = s->cand[0].id; /* greedy after the penalties */
        } else {
            double z = weigh(s->cand, k, s->par.temp);
            tok = draw(s->cand, k, (double)(splitmix64(&s->rng) >> 11) * 0x1.0p-53 * z);
        }
    }
    nm_sampler_accept(s, tok);
    return tok;
}

int64_t nm_sampler_candidates(nm_sampler *s, const float *logits, int64_t n, const nm_sampler_cand **out) {
    *out = NULL;
    if (n <= 0) return 0;
    if (ensure_cap(s, n)) return -1;
    int sorted;
    int64_t k = run_filters(s, logits, n, &sorted);
    if (!sorted) qsort(s->cand, (size_t)k, sizeof *s->cand, cmp_cand);
    double z = weigh(s->cand, k, s->par.temp);
    for (int64_t i = 0; i < k; i++) s->cand[i].p = (float)(s->cand[i].p / z);
    *out = s->cand;
    return k;
}
