/* clock.h - the one monotonic clock every part of numoe measures time with
 * (timings, timeouts, back-off, histograms). CLOCK_MONOTONIC: never jumps
 * with the wall clock, so deadlines and durations stay right across NTP
 * steps; its epoch is arbitrary (only differences mean something). */
#ifndef NUMOE_COMMON_CLOCK_H
#define NUMOE_COMMON_CLOCK_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Seconds and nanoseconds of the monotonic clock. */
double nm_now_s(void);
int64_t nm_now_ns(void);

#ifdef __cplusplus
}
#endif

#endif
