/* progress.c - start-up progress on stderr and the load meter (progress.h). */
#include "common/progress.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"

#define BAR_WIDTH 30
#define BAR_REDRAW_S 0.2

static int env_mode(void) { /* -1: not set */
    const char *e = getenv("NUMOE_PROGRESS");
    if (!e || !*e) return -1;
    if (!strcmp(e, "bar")) return NM_PROGRESS_BAR;
    if (!strcmp(e, "lines")) return NM_PROGRESS_LINES;
    return NM_PROGRESS_OFF; /* "off", or anything else: say nothing rather than guess */
}

int nm_progress_mode(void) {
    int m = env_mode();
    if (m >= 0) return m;
    return isatty(STDERR_FILENO) ? NM_PROGRESS_BAR : NM_PROGRESS_LINES;
}

void nm_progress_begin(nm_progress *p, const char *label, uint64_t total) {
    memset(p, 0, sizeof *p);
    snprintf(p->label, sizeof p->label, "%s", label);
    p->total = total;
    atomic_init(&p->done, 0);
    atomic_init(&p->printing, 0);
    p->mode = nm_progress_mode();
    if (total == 0 || (total < NM_PROGRESS_MIN_BYTES && env_mode() < 0)) p->mode = NM_PROGRESS_OFF;
    p->t0 = p->last = nm_now_s();
}

static void figures(const nm_progress *p, uint64_t d, char *buf, size_t len) {
    double el = nm_now_s() - p->t0, rate = el > 0 ? (double)d / el : 0;
    char left[32] = "";
    if (rate > 0 && d < p->total) snprintf(left, sizeof left, ", %.0f s left", (double)(p->total - d) / rate);
    snprintf(buf, len, "%.1f / %.1f GiB, %.2f GB/s%s", (double)d / 1073741824.0, (double)p->total / 1073741824.0,
             rate / 1e9, left);
}

static void draw_bar(nm_progress *p, uint64_t d) {
    int pct = (int)(d * 100 / p->total), fill = (int)(d * BAR_WIDTH / p->total);
    char bar[BAR_WIDTH + 1], fig[128];
    for (int i = 0; i < BAR_WIDTH; i++) bar[i] = i < fill ? '#' : '.';
    bar[BAR_WIDTH] = 0;
    figures(p, d, fig, sizeof fig);
    fprintf(stderr, "\r%s [%s] %3d%%  %s\033[K", p->label, bar, pct, fig);
    fflush(stderr);
}

void nm_progress_add(nm_progress *p, uint64_t bytes) {
    uint64_t old = atomic_fetch_add(&p->done, bytes), d = old + bytes;
    nm_load_add(bytes);
    if (p->mode == NM_PROGRESS_OFF) return;
    if (d > p->total) d = p->total;
    if (p->mode == NM_PROGRESS_BAR) { /* a redraw missed is no loss: the next one shows it */
        if (atomic_exchange(&p->printing, 1)) return;
        double t = nm_now_s();
        if (t - p->last >= BAR_REDRAW_S) p->last = t, draw_bar(p, d);
        atomic_store(&p->printing, 0);
        return;
    }
    /* lines: the call that crosses a 10% step prints it (at most 9 times a
     * step, so waiting for the printer is cheap), every step once, in order */
    if (old * 10 / p->total == d * 10 / p->total) return;
    while (atomic_exchange(&p->printing, 1))
        ;
    uint64_t now = atomic_load(&p->done);
    if (now > p->total) now = p->total;
    int dec = (int)(now * 10 / p->total);
    char fig[128];
    figures(p, now, fig, sizeof fig);
    for (int i = p->decile + 1; i <= dec && i < 10; i++) /* 100% is the final line's */
        fprintf(stderr, "%s: %d%% (%s)\n", p->label, i * 10, fig);
    if (dec > p->decile) p->decile = dec;
    atomic_store(&p->printing, 0);
}

void nm_progress_end(nm_progress *p) {
    if (p->mode == NM_PROGRESS_OFF) return;
    uint64_t d = atomic_load(&p->done);
    double el = nm_now_s() - p->t0;
    if (p->mode == NM_PROGRESS_BAR) fputs("\r\033[K", stderr);
    fprintf(stderr, "%s: done, %.2f GiB in %.1f s (%.2f GB/s)\n", p->label, (double)d / 1073741824.0, el,
            el > 0 ? (double)d / el / 1e9 : 0.0);
    p->mode = NM_PROGRESS_OFF;
}

static atomic_uint_least64_t g_planned, g_done;
static atomic_int g_ready;

void nm_load_plan(uint64_t bytes) { atomic_store(&g_planned, bytes); }
void nm_load_add(uint64_t bytes) { atomic_fetch_add(&g_done, bytes); }
void nm_load_ready(void) { atomic_store(&g_ready, 1); }

double nm_load_fraction(void) {
    if (atomic_load(&g_ready)) return 1.0;
    uint64_t pl = atomic_load(&g_planned), d = atomic_load(&g_done);
    if (!pl) return 0.0;
    double f = (double)d / (double)pl;
    return f > 0.99 ? 0.99 : f;
}
