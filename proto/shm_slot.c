/* shm_slot.c - creating, attaching and ringing the coordinator <-> worker
 * shared-memory slot (layout and protocol: shm_slot.h). */
#include "proto/shm_slot.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "proto/wire.h"

static uint64_t page_up(uint64_t n) { return (n + NM_SLOT_PAGE - 1) & ~(uint64_t)(NM_SLOT_PAGE - 1); }

/* Offsets of the regions; 0 on overflow. */
static uint64_t layout(int64_t n_embd, int64_t max_tok, int64_t max_k, uint64_t off[4]) {
    if (n_embd <= 0 || max_tok <= 0 || max_k <= 0 || n_embd > (1 << 24) || max_tok > (1 << 24) || max_k > 4096)
        return 0;
    uint64_t xb = (uint64_t)max_tok * (uint64_t)n_embd * 4, kb = (uint64_t)max_tok * (uint64_t)max_k * 4;
    off[0] = NM_SLOT_PAGE;
    off[1] = off[0] + page_up(xb);
    off[2] = off[1] + page_up(kb);
    off[3] = off[2] + page_up(kb);
    return off[3] + page_up(xb);
}

size_t nm_slot_bytes(int64_t n_embd, int64_t max_tok, int64_t max_k) {
    uint64_t off[4];
    return (size_t)layout(n_embd, max_tok, max_k, off);
}

static void bind_regions(nm_slot *s) {
    char *b = (char *)s->h;
    s->x = (float *)(b + s->h->off_x);
    s->ids = (int32_t *)(b + s->h->off_ids);
    s->w = (float *)(b + s->h->off_w);
    s->out = (float *)(b + s->h->off_out);
}

int nm_slot_create(nm_slot *s, const char *name, uint32_t worker_id, int64_t n_embd, int64_t max_tok, int64_t max_k,
                   nm_err *err) {
    memset(s, 0, sizeof *s);
    uint64_t off[4], bytes = layout(n_embd, max_tok, max_k, off);
    if (!bytes)
        return nm_errf(err, "shm slot: bad size (n_embd %lld, %lld tokens, k %lld)", (long long)n_embd,
                       (long long)max_tok, (long long)max_k);
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return nm_errf(err, "shm slot /dev/shm%s: cannot create: %s", name, strerror(errno));
    if (ftruncate(fd, (off_t)bytes)) {
        int e = errno;
        close(fd);
        shm_unlink(name);
        return nm_errf(err, "shm slot /dev/shm%s: cannot size it to %llu bytes: %s", name,
                       (unsigned long long)bytes, strerror(e));
    }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED) {
        shm_unlink(name);
        return nm_errf(err, "shm slot /dev/shm%s: cannot map %llu bytes: %s", name, (unsigned long long)bytes,
                       strerror(e));
    }
    nm_slot_header *h = p;
    /* ftruncate gave zeroed pages: the atomics start at 0 */
    h->layout = NM_SLOT_LAYOUT;
    h->protocol = NM_PROTOCOL_VERSION;
    h->bytes = bytes;
    h->n_embd = n_embd, h->max_tok = max_tok, h->max_k = max_k;
    h->off_x = off[0], h->off_ids = off[1], h->off_w = off[2], h->off_out = off[3];
    h->worker_id = worker_id;
    atomic_store(&h->req.seq, 0);
    atomic_store(&h->done.seq, 0);
    atomic_store(&h->req.cpu, -1);
    atomic_store(&h->done.cpu, -1);
    __atomic_store_n(&h->magic, NM_SLOT_MAGIC, __ATOMIC_RELEASE);
    s->h = h, s->bytes = bytes;
    bind_regions(s);
    return 0;
}

int nm_slot_attach(nm_slot *s, const char *name, uint64_t expect_bytes, int64_t n_embd, nm_err *err) {
    memset(s, 0, sizeof *s);
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) return nm_errf(err, "shm slot /dev/shm%s: cannot open: %s", name, strerror(errno));
    shm_unlink(name); /* the mapping keeps it alive; nothing is left in /dev/shm */
    struct stat st;
    if (fstat(fd, &st) || (uint64_t)st.st_size != expect_bytes || expect_bytes < NM_SLOT_PAGE) {
        close(fd);
        return nm_errf(err, "shm slot /dev/shm%s: %lld bytes, the coordinator announced %llu", name,
                       (long long)st.st_size, (unsigned long long)expect_bytes);
    }
    void *p = mmap(NULL, expect_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED)
        return nm_errf(err, "shm slot /dev/shm%s: cannot map: %s", name, strerror(e));
    nm_slot_header *h = p;
    uint64_t off[4];
    const char *bad = NULL;
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != NM_SLOT_MAGIC) bad = "bad magic";
    else if (h->layout != NM_SLOT_LAYOUT) bad = "slot layout version differs";
    else if (h->bytes != expect_bytes || h->n_embd != n_embd) bad = "size or width differs from the model";
    else if (layout(h->n_embd, h->max_tok, h->max_k, off) != h->bytes || off[0] != h->off_x ||
             off[1] != h->off_ids || off[2] != h->off_w || off[3] != h->off_out)
        bad = "inconsistent region offsets";
    if (bad) {
        int rc = nm_errf(err, "shm slot /dev/shm%s: %s (layout %u, this build %d; width %lld, model %lld)", name,
                         bad, h->layout, NM_SLOT_LAYOUT, (long long)h->n_embd, (long long)n_embd);
        munmap(p, expect_bytes);
        return rc;
    }
    s->h = h, s->bytes = expect_bytes;
    bind_regions(s);
    return 0;
}

void nm_slot_unmap(nm_slot *s) {
    if (s->h) munmap(s->h, s->bytes);
    memset(s, 0, sizeof *s);
}

/* ---- doorbell ---- */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

void nm_doorbell_ring(nm_doorbell *d, unsigned value) {
    atomic_store_explicit(&d->cpu, sched_getcpu(), memory_order_relaxed);
    atomic_store(&d->seq, value);
    if (atomic_load(&d->sleeping)) syscall(SYS_futex, (void *)&d->seq, FUTEX_WAKE, 1, NULL, NULL, 0);
}

int nm_doorbell_wait(nm_doorbell *d, unsigned old, int64_t spin_ns, int64_t timeout_ns) {
    atomic_uint *word = &d->seq;
    int64_t t0 = 0, end_spin = 0;
    if (spin_ns > 0 && atomic_load_explicit(&d->cpu, memory_order_relaxed) == sched_getcpu()) spin_ns = 0;
    /* poll: the clock is read every 64 polls; after the first rounds each
     * round yields, so a waiter on an oversubscribed machine does not hold
     * the CPU the other side needs */
    for (int round = 0; spin_ns >= 0; round++) {
        for (int i = 0; i < 64; i++) {
            if (atomic_load_explicit(word, memory_order_acquire) != old) return 0;
            cpu_relax();
        }
        if (spin_ns <= 0) break;
        int64_t t = nm_now_ns();
        if (!t0) t0 = t, end_spin = t + spin_ns;
        else if (t >= end_spin) break;
        if (round >= 8) sched_yield();
    }
    if (!t0) t0 = nm_now_ns();
    atomic_store(&d->sleeping, 1);
    int rc = 0;
    while (atomic_load(word) == old) {
        struct timespec ts, *tp = NULL;
        if (timeout_ns >= 0) {
            int64_t left = t0 + timeout_ns - nm_now_ns();
            if (left <= 0) {
                rc = 1;
                break;
            }
            ts.tv_sec = left / 1000000000, ts.tv_nsec = left % 1000000000;
            tp = &ts;
        }
        if (syscall(SYS_futex, (void *)word, FUTEX_WAIT, old, tp, NULL, 0) && errno == EINTR) {
            rc = atomic_load(word) == old;
            break;
        }
    }
    atomic_store(&d->sleeping, 0);
    return rc;
}

int nm_slot_sweep_stale(void) {
    DIR *d = opendir("/dev/shm");
    if (!d) return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (strncmp(de->d_name, "numoe-", 6)) continue;
        char *end;
        long pid = strtol(de->d_name + 6, &end, 10);
        if (end == de->d_name + 6 || *end != '-' || pid <= 0) continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue; /* alive (or not ours to judge) */
        char name[300];
        snprintf(name, sizeof name, "/%s", de->d_name);
        if (!shm_unlink(name)) n++;
    }
    closedir(d);
    return n;
}
