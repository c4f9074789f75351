/* numa_vm_probe.c - where the pages of a mapping or a file sit, for the
 * two-node VM test (tests/numa_vm_init.sh, tests/test_numa_vm.py).
 *
 *   numa_vm_probe file PATH
 *       maps PATH read-only, faults every page in (a file under /dev/shm is
 *       tmpfs: its pages already exist, reading them allocates nothing) and
 *       asks move_pages(2) where each one is: the placement of the whole file,
 *       whoever touched it.
 *   numa_vm_probe pid PID MATCH [RANGES]
 *       the pages of PID's mappings whose path contains MATCH that are
 *       present in PID's page tables, and their nodes (move_pages on PID:
 *       nothing is faulted in). RANGES: a file of "offset length" lines (byte
 *       ranges of the mapped file); then only the pages wholly inside one of
 *       them count (the expert tensors of a model, whose pages the
 *       coordinator must not hold).
 *
 * Prints one line: "maps=M pages=N present=P n0=A n1=B ..." (nK: present
 * pages on node K, for every K up to the highest seen). Exit 0, or 1 with a
 * message on stderr. Test-only tool: it is built by tests/numa_vm.sh, not by
 * the Makefile. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_NODE 64
#define MAX_RANGES 4096

typedef struct {
    uint64_t off, len;
} range;

static long page;

/* Nodes of n pages of pid (0 = this process) at addrs: adds to count[], returns present pages or -1. */
static long locate(int pid, void **addrs, size_t n, long *count) {
    int *status = malloc((n ? n : 1) * sizeof *status);
    if (!status) return fprintf(stderr, "numa_vm_probe: out of memory\n"), -1;
    if (n && syscall(SYS_move_pages, pid, (unsigned long)n, addrs, NULL, status, 0) < 0) {
        fprintf(stderr, "numa_vm_probe: move_pages(%d, %zu pages): %s\n", pid, n, strerror(errno));
        free(status);
        return -1;
    }
    long present = 0;
    for (size_t i = 0; i < n; i++)
        if (status[i] >= 0 && status[i] < MAX_NODE) count[status[i]]++, present++;
    free(status);
    return present;
}

static void report(int maps, size_t pages, long present, const long *count) {
    int top = -1;
    for (int k = 0; k < MAX_NODE; k++)
        if (count[k]) top = k;
    if (top < 1) top = 1; /* always n0 and n1: the VM has two nodes */
    printf("maps=%d pages=%zu present=%ld", maps, pages, present);
    for (int k = 0; k <= top; k++) printf(" n%d=%ld", k, count[k]);
    printf("\n");
}

static int probe_file(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) return fprintf(stderr, "numa_vm_probe: %s: %s\n", path, strerror(errno)), 1;
    size_t n = ((size_t)st.st_size + (size_t)page - 1) / (size_t)page;
    uint8_t *map = n ? mmap(NULL, n * (size_t)page, PROT_READ, MAP_SHARED, fd, 0) : NULL;
    close(fd);
    if (map == MAP_FAILED) return fprintf(stderr, "numa_vm_probe: mmap %s: %s\n", path, strerror(errno)), 1;
    void **addrs = malloc((n ? n : 1) * sizeof *addrs);
    if (!addrs) return fprintf(stderr, "numa_vm_probe: out of memory\n"), 1;
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < n; i++) addrs[i] = map + i * (size_t)page, sink ^= map[i * (size_t)page];
    (void)sink;
    long count[MAX_NODE] = {0}, present = locate(0, addrs, n, count);
    free(addrs);
    if (present < 0) return 1;
    report(1, n, present, count);
    return 0;
}

static int load_ranges(const char *path, range *r, int *n) {
    FILE *f = fopen(path, "r");
    if (!f) return fprintf(stderr, "numa_vm_probe: %s: %s\n", path, strerror(errno)), -1;
    unsigned long long off, len;
    *n = 0;
    while (*n < MAX_RANGES && fscanf(f, "%llu %llu", &off, &len) == 2) r[(*n)++] = (range){off, len};
    fclose(f);
    if (!*n) return fprintf(stderr, "numa_vm_probe: no ranges in %s\n", path), -1;
    return 0;
}

/* The page at file offset fo (page-aligned) lies wholly inside one of the ranges. */
static int inside(const range *r, int nr, uint64_t fo) {
    for (int i = 0; i < nr; i++)
        if (fo >= r[i].off && fo + (uint64_t)page <= r[i].off + r[i].len) return 1;
    return 0;
}

static int probe_pid(int pid, const char *match, const char *ranges_path) {
    static range r[MAX_RANGES];
    int nr = 0;
    if (ranges_path && load_ranges(ranges_path, r, &nr)) return 1;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *f = fopen(path, "r");
    if (!f) return fprintf(stderr, "numa_vm_probe: %s: %s\n", path, strerror(errno)), 1;
    size_t cap = 0, n = 0;
    void **addrs = NULL;
    int maps = 0;
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        unsigned long long a, b, off;
        int name_at = 0;
        if (sscanf(line, "%llx-%llx %*s %llx %*s %*s %n", &a, &b, &off, &name_at) < 3 || !name_at) continue;
        if (!strstr(line + name_at, match)) continue;
        maps++;
        for (unsigned long long v = a; v < b; v += (unsigned long long)page) {
            if (nr && !inside(r, nr, off + (v - a))) continue;
            if (n == cap) {
                void **t = realloc(addrs, (cap = cap ? 2 * cap : 1024) * sizeof *t);
                if (!t) return fprintf(stderr, "numa_vm_probe: out of memory\n"), fclose(f), 1;
                addrs = t;
            }
            addrs[n++] = (void *)(uintptr_t)v;
        }
    }
    fclose(f);
    long count[MAX_NODE] = {0}, present = locate(pid, addrs, n, count);
    free(addrs);
    if (present < 0) return 1;
    report(maps, n, present, count);
    return 0;
}

int main(int argc, char **argv) {
    page = sysconf(_SC_PAGESIZE);
    if (argc == 3 && !strcmp(argv[1], "file")) return probe_file(argv[2]);
    if ((argc == 4 || argc == 5) && !strcmp(argv[1], "pid")) return probe_pid(atoi(argv[2]), argv[3], argc == 5 ? argv[4] : NULL);
    fprintf(stderr, "usage: numa_vm_probe file PATH | numa_vm_probe pid PID MATCH [RANGES]\n");
    return 2;
}
