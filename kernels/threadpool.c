/* threadpool.c - persistent workers woken by a generation counter.
 *
 * A run bumps `gen`; each worker waits for gen to differ from the last one
 * it served, runs its share, and decrements `pending`; the caller waits for
 * pending to reach 0. Both waits poll first (a wake-up through the kernel
 * costs several microseconds, more than a small GEMV) and then sleep on the
 * futex of the same word. A sleeper announces itself (sleepers / waiter)
 * before re-checking the word, and the other side checks the announcement
 * after changing the word; with sequentially consistent atomics one of the
 * two sees the other, and FUTEX_WAIT refuses to sleep if the word already
 * changed, so no wake-up is lost.
 *
 * A worker cannot miss a generation: the next run starts only after every
 * worker finished (pending == 0) the current one. */
#include "kernels/threadpool.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"

struct nm_worker {
    struct nm_pool *pool;
    int ith;
    pthread_t thread;
};

struct nm_pool {
    int n; /* threads per run, caller included */
    atomic_int spin_ns; /* read by idle workers while a caller may change it */
    struct nm_worker *workers; /* n - 1 */
    /* the job: written by the caller before gen is bumped */
    nm_pool_fn fn;
    void *ctx;
    int stop;
    int caller_cpu; /* nm_pool_pin: where the calling thread runs its share; -1 none */
    /* each futex word on its own cache line: workers poll gen while they
     * decrement pending */
    _Alignas(64) atomic_uint gen;
    atomic_int sleepers;
    _Alignas(64) atomic_uint pending;
    atomic_int waiter;
};

static void futex_wait(atomic_uint *word, unsigned expected) {
    syscall(SYS_futex, (void *)word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(atomic_uint *word, int count) {
    syscall(SYS_futex, (void *)word, FUTEX_WAKE_PRIVATE, count, NULL, NULL, 0);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Poll *word for up to spin_ns until (*word == value) == equal; returns
 * whether that happened. The clock is read only every 64 polls, and not
 * before the first 64, so a quick hand-over costs no clock read. After the
 * first few rounds each round also yields the CPU: when threads outnumber
 * the CPUs free to run them (other processes, a busy machine), the thread
 * being waited for may need this very CPU, and pure spinning would hold it
 * for the rest of the time slice. */
static int spin_for(atomic_uint *word, unsigned value, int equal, int spin_ns) {
    int64_t end = 0;
    for (int round = 0;; round++) {
        for (int i = 0; i < 64; i++) {
            if ((atomic_load_explicit(word, memory_order_acquire) == value) == equal) return 1;
            cpu_relax();
        }
        if (spin_ns <= 0) return 0;
        const int64_t t = nm_now_ns();
        if (!end)
            end = t + spin_ns;
        else if (t >= end)
            return 0;
        if (round >= 8) sched_yield();
    }
}

static void *worker_main(void *arg) {
    struct nm_worker *w = arg;
    struct nm_pool *pool = w->pool;
    unsigned seen = 0;
    for (;;) {
        if (!spin_for(&pool->gen, seen, 0, atomic_load_explicit(&pool->spin_ns, memory_order_relaxed))) {
            atomic_fetch_add(&pool->sleepers, 1);
            while (atomic_load(&pool->gen) == seen) futex_wait(&pool->gen, seen);
            atomic_fetch_sub(&pool->sleepers, 1);
        }
        seen = atomic_load(&pool->gen);
        if (pool->stop) return NULL;
        pool->fn(pool->ctx, w->ith, pool->n);
        if (atomic_fetch_sub(&pool->pending, 1) == 1 && atomic_load(&pool->waiter)) futex_wake(&pool->pending, 1);
    }
}

static int usable_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static void pin_thread(pthread_t th, int cpu) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pthread_setaffinity_np(th, sizeof one, &one);
}

int nm_pool_pin(nm_pool *pool) {
    cpu_set_t set;
    if (!pool || sched_getaffinity(0, sizeof set, &set) || CPU_COUNT(&set) < pool->n) return 0;
    int ith = 0;
    for (int c = 0; c < CPU_SETSIZE && ith < pool->n; c++) {
        if (!CPU_ISSET(c, &set)) continue;
        if (ith == 0) pool->caller_cpu = c;
        else pin_thread(pool->workers[ith - 1].thread, c);
        ith++;
    }
    return 1;
}

/* Wake every sleeping worker after gen was bumped. */
static void publish(struct nm_pool *pool) {
    atomic_fetch_add(&pool->gen, 1);
    if (atomic_load(&pool->sleepers) > 0) futex_wake(&pool->gen, INT_MAX);
}

static void stop_workers(struct nm_pool *pool, int started) {
    pool->stop = 1;
    publish(pool);
    for (int i = 0; i < started; i++) pthread_join(pool->workers[i].thread, NULL);
}

nm_pool *nm_pool_create(int n_threads) {
    if (n_threads <= 0) n_threads = usable_cpus();
    /* aligned like its 64-byte-aligned members (calloc gives only 16) */
    struct nm_pool *pool = aligned_alloc(64, (sizeof *pool + 63) & ~(size_t)63);
    if (!pool) return NULL;
    memset(pool, 0, sizeof *pool);
    pool->n = n_threads;
    pool->caller_cpu = -1;
    atomic_init(&pool->spin_ns, NM_POOL_SPIN_US * 1000);
    atomic_init(&pool->gen, 0);
    atomic_init(&pool->pending, 0);
    atomic_init(&pool->sleepers, 0);
    atomic_init(&pool->waiter, 0);
    if (n_threads > 1) {
        pool->workers = calloc((size_t)n_threads - 1, sizeof *pool->workers);
        if (!pool->workers) {
            free(pool);
            return NULL;
        }
    }
    for (int i = 0; i < n_threads - 1; i++) {
        pool->workers[i].pool = pool;
        pool->workers[i].ith = i + 1;
        if (pthread_create(&pool->workers[i].thread, NULL, worker_main, &pool->workers[i]) != 0) {
            stop_workers(pool, i);
            free(pool->workers);
            free(pool);
            return NULL;
        }
    }
    return pool;
}

void nm_pool_destroy(nm_pool *pool) {
    if (!pool) return;
    stop_workers(pool, pool->n - 1);
    free(pool->workers);
    free(pool);
}

int nm_pool_size(const nm_pool *pool) { return pool ? pool->n : 1; }

void nm_pool_set_spin_us(nm_pool *pool, int us) {
    if (pool) atomic_store(&pool->spin_ns, us > 0 ? (us > INT_MAX / 1000 ? INT_MAX : us * 1000) : 0);
}

void nm_pool_run(nm_pool *pool, nm_pool_fn fn, void *ctx) {
    /* a pinned pool pins whichever thread calls it, once (a syscall per run
     * would cost more than a small GEMV) */
    static _Thread_local const nm_pool *pinned_for;
    if (pool && pool->caller_cpu >= 0 && pinned_for != pool) {
        pin_thread(pthread_self(), pool->caller_cpu);
        pinned_for = pool;
    }
    if (!pool || pool->n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store(&pool->pending, (unsigned)(pool->n - 1));
    publish(pool);
    fn(ctx, 0, pool->n);
    if (spin_for(&pool->pending, 0, 1, atomic_load_explicit(&pool->spin_ns, memory_order_relaxed))) return;
    atomic_store(&pool->waiter, 1);
    unsigned left;
    while ((left = atomic_load(&pool->pending)) != 0) futex_wait(&pool->pending, left);
    atomic_store(&pool->waiter, 0);
}
