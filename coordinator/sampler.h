/* sampler.h - next-token choice from logits. Greedy at temperature 0 (ties
 * to the lowest id, so runs are reproducible); otherwise softmax(logits/T)
 * sampled with a seeded generator. */
#ifndef NUMOE_COORDINATOR_SAMPLER_H
#define NUMOE_COORDINATOR_SAMPLER_H

#include <stdint.h>

typedef struct {
    float temp;
    uint64_t state; /* splitmix64 */
} nm_sampler;

void nm_sampler_init(nm_sampler *s, float temp, uint64_t seed);
int32_t nm_sampler_sample(nm_sampler *s, const float *logits, int64_t n_vocab);

#endif
