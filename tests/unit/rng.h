/* rng.h - the seeded random numbers of the kernel unit tests (one copy for
 * all of them). xorshift64*; rng_seed() takes NUMOE_TEST_SEED when set, else
 * the time and pid, and prints the seed so a failing run can be repeated. */
#ifndef NUMOE_TESTS_RNG_H
#define NUMOE_TESTS_RNG_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static uint64_t rng_state;

static inline uint64_t rng_next(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static inline float rng_uniform(void) { return (float)(rng_next() >> 40) / (float)(1u << 24); } /* [0, 1) */
static inline float rng_sym(void) { return (float)(rng_next() >> 40) / (float)(1u << 23) - 1.0f; } /* [-1, 1) */
static inline double rng_double(void) { return (double)(rng_next() >> 11) * 0x1p-53; }               /* [0, 1) */

/* Roughly normal (Irwin-Hall of 4, unit variance). */
static inline float rng_normal(void) {
    return (rng_uniform() + rng_uniform() + rng_uniform() + rng_uniform() - 2.0f) * 1.7320508f;
}

/* Seeds the generator and prints "seed N (NUMOE_TEST_SEED repeats it)" plus
 * extra (may be NULL) on stderr. */
static inline void rng_seed(const char *extra) {
    const char *seed_env = getenv("NUMOE_TEST_SEED");
    rng_state = seed_env ? strtoull(seed_env, NULL, 0) : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    if (!rng_state) rng_state = 1;
    fprintf(stderr, "seed %llu (NUMOE_TEST_SEED repeats it)%s%s\n", (unsigned long long)rng_state, extra ? "; " : "",
            extra ? extra : "");
}

#endif
