/* sampler.h - next-token choice from logits.
 *
 * The chain, in llama.cpp's default order (common/sampling.cpp), each stage
 * working on the candidates the previous one left:
 *
 *   1. penalties    over the last penalty_last_n accepted tokens (a ring of
 *                   recent ids, prompt tokens included if the caller accepts
 *                   them): for every id t seen c > 0 times in the window
 *                     logit = logit > 0 ? logit / repeat_penalty
 *                                       : logit * repeat_penalty
 *                     logit -= c * frequency_penalty + presence_penalty
 *   2. top-k        keep the k largest logits (one pass with a k-entry heap,
 *                   no sort of the vocabulary)
 *   3. top-p        softmax over what is left; keep the smallest prefix, in
 *                   descending logit order, whose probability mass reaches p
 *                   (the token that crosses p is kept). Found with a histogram
 *                   of the logits; only the bucket where the mass crosses p is
 *                   sorted.
 *   4. min-p        keep tokens with prob >= min_p * max prob, i.e.
 *                   logit >= max_logit + ln(min_p)
 *   5. temperature  logits / temp; temp <= 0 keeps only the argmax (of the
 *                   penalised logits, as llama.cpp's temp sampler does)
 *   6. sample       draw from softmax of what is left with the seeded
 *                   generator (splitmix64), or take the argmax when temp <= 0
 *
 * Each stage keeps at least one token. Ordering ties are broken by the lower
 * token id (logit descending, id ascending is a total order), so greedy picks
 * the lowest id among equal maxima and the filters keep an exact, reproducible
 * set. NaN logits count as -inf, +inf as the largest float. Unlike llama.cpp
 * a window of -1 ("whole context") is not supported. Filtering is done without temperature, as in
 * llama.cpp, so top-p / min-p sets do not depend on temp.
 *
 * The same seed, parameters and inputs give the same tokens on every run.
 *
 * Ownership: the sampler owns its scratch (candidate, logit and count arrays
 * of n_vocab entries, a histogram, the penalty ring); nm_sampler_free
 * releases it and leaves the struct safe to free again. Not thread-safe: one
 * sampler per sequence. */
#ifndef NUMOE_COORDINATOR_TEXT_SAMPLER_H
#define NUMOE_COORDINATOR_TEXT_SAMPLER_H

#include <stdint.h>

#include "common/error.h"

typedef struct {
    float temp;              /* <= 0: greedy */
    int32_t top_k;           /* <= 0: off */
    float top_p;             /* >= 1: off; (0, 1] */
    float min_p;             /* <= 0: off; [0, 1] */
    float repeat_penalty;    /* 1: off; > 0 */
    float presence_penalty;  /* 0: off */
    float frequency_penalty; /* 0: off */
    int32_t penalty_last_n;  /* window of recent tokens the penalties see; 0: off */
    uint64_t seed;
} nm_sampler_params;

/* One candidate as the filter stages leave it. */
typedef struct {
    int32_t id;
    float logit; /* after the penalties, before the temperature */
    float p;     /* probability the final draw gives it (after temperature) */
} nm_sampler_cand;

typedef struct {
    nm_sampler_params par;
    uint64_t rng;            /* splitmix64 state */
    /* owned scratch */
    nm_sampler_cand *cand;   /* n_cap entries */
    float *lg;               /* n_cap entries: the penalised logits */
    int32_t *count;          /* n_cap entries, all zero between calls */
    int64_t n_cap;
    double *bkt_mass;        /* top-p histogram of probability mass */
    int32_t *hist;           /* ring of the last penalty_last_n accepted ids */
    int32_t hist_n, hist_pos;
} nm_sampler;

/* llama.cpp's defaults: temp 0.8, top-k 40, top-p 0.95, min-p 0.05,
 * penalties off (repeat 1, presence 0, frequency 0, window 64), seed 42. */
nm_sampler_params nm_sampler_params_default(void);

/* Full initialisation; allocates scratch for n_vocab (a later call with a
 * larger vocabulary grows it). Validates the parameters. 0, or -1 with e. */
int nm_sampler_init_params(nm_sampler *s, const nm_sampler_params *p, int64_t n_vocab, nm_err *e);

/* Plain softmax(logits / temp) sampling (no top-k/p, min-p or penalties),
 * greedy at temp <= 0; scratch is allocated on the first sampled draw.
 * nm_sampler_free must still be called. */
void nm_sampler_init(nm_sampler *s, float temp, uint64_t seed);

void nm_sampler_free(nm_sampler *s);

/* Pushes a token into the penalty window (prompt tokens, forced tokens).
 * No-op when the penalty window is off. */
void nm_sampler_accept(nm_sampler *s, int32_t token);
/* Empties the penalty window (new conversation). */
void nm_sampler_reset(nm_sampler *s);

/* Runs the chain and returns the chosen id, which is also accepted into the
 * penalty window. Returns -1 only if scratch for a larger n_vocab than
 * allocated cannot be had (never after init_params with this n_vocab, nor
 * in greedy mode without penalties, which needs no scratch). */
int32_t nm_sampler_sample(nm_sampler *s, const float *logits, int64_t n_vocab);

/* Runs stages 1-5 without drawing or accepting anything (the generator state
 * is untouched) and points *out at the surviving candidates, sorted by logit
 * descending (id ascending on ties), with the probabilities the draw would
 * use. In greedy mode the single argmax is returned with p = 1. The array is
 * the sampler's scratch: valid until the next call. Returns the count, or -1
 * on allocation failure. */
int64_t nm_sampler_candidates(nm_sampler *s, const float *logits, int64_t n_vocab,
                              const nm_sampler_cand **out);

#endif
