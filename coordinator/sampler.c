#include "coordinator/sampler.h"

#include <math.h>

void nm_sampler_init(nm_sampler *s, float temp, uint64_t seed) {
    s->temp = temp;
    s->state = seed;
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

int32_t nm_sampler_sample(nm_sampler *s, const float *logits, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    if (s->temp <= 0) return (int32_t)best;
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += exp((double)(logits[i] - logits[best]) / s->temp);
    double r = (double)(splitmix64(&s->state) >> 11) * 0x1.0p-53 * sum, acc = 0;
    for (int64_t i = 0; i < n; i++) {
        acc += exp((double)(logits[i] - logits[best]) / s->temp);
        if (acc > r) return (int32_t)i;
    }
    return (int32_t)best;
}
