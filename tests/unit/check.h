/* check.h - the smallest test harness that reports what failed and where.
 *
 * A test file defines functions `static void test_x(void)` and lists them in
 * main with RUN(test_x). CHECK records a failure and goes on, so one run shows
 * every broken case; main returns check_summary(), which prints
 * "<prog>: N passed, N failed" and exits non-zero on any failure. */
#ifndef NUMOE_TESTS_CHECK_H
#define NUMOE_TESTS_CHECK_H

#include <stdio.h>
#include <string.h>

static int check_failures_ = 0, check_tests_failed_ = 0, check_tests_passed_ = 0;
static const char *check_prog_ = "test";

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            check_failures_++;                                                 \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__,   \
                    #cond);                                                    \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
        }                                                                      \
    } while (0)

#define RUN(fn)                                                                \
    do {                                                                       \
        int before_ = check_failures_;                                         \
        fn();                                                                  \
        if (check_failures_ == before_) {                                      \
            check_tests_passed_++;                                             \
            fprintf(stderr, "ok   %s\n", #fn);                                 \
        } else {                                                               \
            check_tests_failed_++;                                             \
            fprintf(stderr, "FAIL %s\n", #fn);                                 \
        }                                                                      \
    } while (0)

static inline void check_init(const char *argv0) {
    const char *s = strrchr(argv0, '/');
    check_prog_ = s ? s + 1 : argv0;
}

static inline int check_summary(void) {
    printf("%s: %d passed, %d failed\n", check_prog_, check_tests_passed_,
           check_tests_failed_);
    return check_tests_failed_ ? 1 : 0;
}

#endif
