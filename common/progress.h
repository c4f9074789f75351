/* progress.h - progress of the long start-up steps (reading the model,
 * building a worker's shard, copying weights to VRAM) on stderr, and the
 * process's load fraction that `numoe serve` reports on /health.
 *
 * Output, chosen once per process from NUMOE_PROGRESS (bar | lines | off)
 * or else by whether stderr is a terminal:
 *   bar    one line redrawn in place at most 5 times a second:
 *            "numoe: reading the model [#######.....]  61%  12.3 / 20.1 GiB  2.05 GB/s  4 s left"
 *   lines  one line per 10% crossed (a log file or a pipe keeps them all):
 *            "numoe: reading the model: 60% (12.3 / 20.1 GiB, 2.05 GB/s, 4 s left)"
 * and in both a final line "LABEL: done, X GiB in T s (R GB/s)". Steps of
 * less than NM_PROGRESS_MIN_BYTES are silent unless NUMOE_PROGRESS names a
 * mode (so tests can see the output of small models).
 *
 * nm_progress_add may be called from any number of threads at once (the
 * shard build's copy threads): the count is atomic and one thread at a
 * time prints. The grow-only load meter: every tracker adds its bytes to
 * the process total (nm_load_*); a command that knows the bytes its whole
 * start-up will touch plans them first, so the fraction only grows. */
#ifndef NUMOE_COMMON_PROGRESS_H
#define NUMOE_COMMON_PROGRESS_H

#include <stdatomic.h>
#include <stdint.h>

#define NM_PROGRESS_MIN_BYTES ((uint64_t)1 << 30)

enum { NM_PROGRESS_OFF = 0, NM_PROGRESS_BAR = 1, NM_PROGRESS_LINES = 2 };

typedef struct {
    char label[96];
    uint64_t total;
    atomic_uint_least64_t done;
    atomic_int printing;     /* try-lock: one printer at a time */
    int mode;                /* NM_PROGRESS_*, OFF for a silent step */
    int decile;              /* lines: the last 10% step printed */
    double t0, last;         /* start, last bar redraw */
} nm_progress;

/* The mode this process uses (NUMOE_PROGRESS, else bar on a terminal, lines otherwise). */
int nm_progress_mode(void);
/* Starts a step of total bytes; label without a colon ("numoe-worker 1: building its shard"). */
void nm_progress_begin(nm_progress *p, const char *label, uint64_t total);
void nm_progress_add(nm_progress *p, uint64_t bytes);
/* The final line (and the newline that ends a bar). */
void nm_progress_end(nm_progress *p);

/* The load meter: bytes planned for the whole start-up, bytes done so far.
 * nm_load_fraction is done / planned, at most 0.99 until nm_load_ready. */
void nm_load_plan(uint64_t bytes);
void nm_load_add(uint64_t bytes);
void nm_load_ready(void);
double nm_load_fraction(void);

#endif
