/* shard.c - a worker's expert weights: copy-out (as pre-packed tiles
 * where the CPU runs them, else rows), repacking or the file's own layout,
 * compute (shard.h). */
#include "worker/shard.h"

#include <errno.h>
#include <fcntl.h>
#include <numa.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/progress.h"
#include "kernels/quant.h"
#include "kernels/tile.h"

#define ALIGN 64
#define SEG_MAGIC 0x44524148534d4e4eull /* "NNMSHARD" */
/* 3: the header records the tile layout (NM_TILE_LAYOUT) of the weights, so
 * a segment of rows (version 2, or a run with tiles unusable) or of older
 * tiles is rebuilt, never read as the wrong layout */
#define SEG_VERSION 3
#define SEG_HEAD 4096

/* The first page of a persistent shard segment; written last. */
typedef struct {
    uint64_t magic;
    uint32_t version, worker_id, n_workers, kind;
    uint64_t file_bytes, header_hash, placement_hash;
    uint64_t data_bytes, weight_bytes;
    uint32_t tile_layout, tiled; /* NM_TILE_LAYOUT and the NM_MOE_TILED_* bits of any layer; 0, 0: all rows */
} seg_header;

static void seg_expect(seg_header *h, const nm_shard_seg *seg, int worker, uint64_t data_bytes,
                       uint64_t weight_bytes, unsigned tiled) {
    memset(h, 0, sizeof *h);
    h->magic = SEG_MAGIC, h->version = SEG_VERSION, h->worker_id = (uint32_t)worker;
    h->n_workers = seg->n_workers, h->kind = seg->kind;
    h->file_bytes = seg->file_bytes, h->header_hash = seg->header_hash, h->placement_hash = seg->placement_hash;
    h->data_bytes = data_bytes, h->weight_bytes = weight_bytes;
    h->tile_layout = tiled ? NM_TILE_LAYOUT : 0, h->tiled = tiled;
}

/* The bytes of a segment holding data_bytes: the header page and the data,
 * rounded up to the file's page (a hugetlb memfd's is its huge page). */
static size_t seg_total(const struct stat *st, uint64_t data_bytes) {
    size_t blk = st->st_blksize > 0 ? (size_t)st->st_blksize : 4096;
    return (SEG_HEAD + (size_t)data_bytes + blk - 1) / blk * blk;
}

/* Maps seg->fd: read-only when it already holds a matching shard (1), else
 * sized afresh, bound to node, reserved and mapped writable (0); -1 error. */
static int seg_open(nm_shard *s, const nm_shard_seg *seg, const seg_header *want, int node, nm_err *err) {
    struct stat st;
    seg_header h;
    if (fstat(seg->fd, &st)) return nm_errf(err, "shard: %s: fstat: %s", seg->label, strerror(errno));
    size_t total = seg_total(&st, want->data_bytes);
    if ((size_t)st.st_size == total && pread(seg->fd, &h, sizeof h, 0) == (ssize_t)sizeof h && !memcmp(&h, want, sizeof h)) {
        void *map = mmap(NULL, total, PROT_READ, MAP_SHARED, seg->fd, 0);
        if (map == MAP_FAILED) return nm_errf(err, "shard: cannot map %s: %s", seg->label, strerror(errno));
        s->map = map, s->map_bytes = total;
        return 1;
    }
    /* anything else there (a build killed half-way, another model) goes */
    if (ftruncate(seg->fd, 0) || ftruncate(seg->fd, (off_t)total))
        return nm_errf(err, "shard: cannot size %s to %zu bytes: %s", seg->label, total, strerror(errno));
    void *map = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, seg->fd, 0);
    if (map == MAP_FAILED) return nm_errf(err, "shard: cannot map %s: %s", seg->label, strerror(errno));
    s->map = map, s->map_bytes = total;
    if (total >= (2u << 20)) madvise(map, total, MADV_HUGEPAGE); /* shmem THP: as its shmem_enabled allows */
    if (node >= 0) numa_tonode_memory(map, total, node);        /* the shared policy, before any page exists */
    /* every page now, under that policy: short memory is an error here, not
     * a SIGBUS in the middle of the copy */
    if (fallocate(seg->fd, 0, 0, (off_t)total)) {
        int e = errno;
        munmap(map, total);
        s->map = NULL, s->map_bytes = 0;
        if (ftruncate(seg->fd, 0)) { /* nothing more to do: the error below is the one to report */
        }
        long long avail = -1;
        FILE *f = fopen("/proc/meminfo", "r");
        char line[128];
        while (f && fgets(line, sizeof line, f))
            if (sscanf(line, "MemAvailable: %lld kB", &avail) == 1) break;
        if (f) fclose(f);
        int huge = (size_t)st.st_blksize > 4096;
        char where[48] = "", have[96] = "";
        if (node >= 0) snprintf(where, sizeof where, " on NUMA node %d", node);
        if (avail >= 0) snprintf(have, sizeof have, " (MemAvailable %.2f GiB)", (double)avail / 1048576.0);
        if (huge)
            return nm_errf(err, "shard: cannot reserve %.2f GiB of huge pages%s for this worker's shard (%s): %s; the "
                           "hugetlb pool is short (/proc/sys/vm/nr_hugepages), or run without NUMOE_HUGETLB",
                           (double)total / 1073741824.0, where, seg->label, strerror(e));
        return nm_errf(err, "shard: cannot reserve %.2f GiB of memory%s for this worker's shard (%s): %s%s; "
                       "--shard-memory file computes from the model file's pages instead",
                       (double)total / 1073741824.0, where, seg->label, strerror(e), have);
    }
    return 0;
}

/* One matrix of a piece: rows copied (pack_type < 0), or packed into tiles
 * (nm_tile_pack_matrix of rows of n elements, src_stride apart); row_bytes
 * is what each row counts in the progress either way. */
typedef struct {
    uint8_t *dst;
    const uint8_t *src;
    size_t rows, row_bytes, src_stride, dst_stride;
    int pack_type;
    int64_t n;
} copy_op;

typedef struct {
    copy_op *ops;
    size_t n;
    atomic_size_t next;
    nm_progress *progress;
} copy_job;

static void run_copies(void *ctx, int ith, int nth) {
    copy_job *j = ctx;
    (void)ith, (void)nth;
    for (;;) {
        size_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->n) break;
        const copy_op *o = &j->ops[i];
        if (o->pack_type >= 0)
            nm_tile_pack_matrix(o->pack_type, o->n, o->src, o->src_stride, (int64_t)o->rows, o->dst);
        else
            for (size_t r = 0; r < o->rows; r++)
                memcpy(o->dst + r * o->dst_stride, o->src + r * o->src_stride, o->row_bytes);
        nm_progress_add(j->progress, (uint64_t)o->rows * o->row_bytes);
    }
}

static size_t up64(size_t n) { return (n + ALIGN - 1) & ~(size_t)(ALIGN - 1); }

/* The piece of expert e in layer l that worker holds, or NULL. */
static const nm_piece *piece_of(const nm_placement *p, int64_t l, int64_t e, int worker) {
    size_t c = (size_t)(l * p->n_expert + e);
    for (int i = 0; i < p->n_pieces[c]; i++)
        if (p->pieces[c * (size_t)p->n_workers + (size_t)i].worker == worker)
            return &p->pieces[c * (size_t)p->n_workers + (size_t)i];
    return NULL;
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux 5.14 */
#endif

/* A segment mapped read-only (re-mapped after its build, or found by a
 * restarted worker) starts with no page-table entries, so the first call
 * that reads an expert takes one fault per 4 KiB page: measured on the
 * 8-layer file (2.6 GB shard, 2-core VM), the first pp512 after start ran at
 * 132-150 tok/s against ~230 after. This thread maps them in, 64 MiB at a
 * time, while the worker already serves (a call meanwhile faults only on
 * what is not mapped yet), so a restart still recovers at once. The pages
 * themselves are the segment's: nothing is allocated or copied. */
static void *populate_task(void *arg) {
    nm_shard *s = arg;
    const size_t step = (size_t)64 << 20, page = (size_t)sysconf(_SC_PAGESIZE);
    for (size_t off = 0; off < s->map_bytes && !atomic_load(&s->populate_stop); off += step) {
        size_t len = s->map_bytes - off < step ? s->map_bytes - off : step;
        const volatile uint8_t *p = s->map + off;
        if (madvise((void *)(s->map + off), len, MADV_POPULATE_READ) != 0) /* older kernels: touch each page */
            for (size_t b = 0; b < len; b += page) (void)p[b];
    }
    return NULL;
}

static void populate_start(nm_shard *s) {
    atomic_init(&s->populate_stop, 0);
    /* no thread (out of resources): the pages fault in on first use instead */
    s->populating = s->map && pthread_create(&s->populate, NULL, populate_task, s) == 0;
}

void nm_shard_free(nm_shard *s) {
    if (s->populating) {
        atomic_store(&s->populate_stop, 1);
        pthread_join(s->populate, NULL);
    }
    if (s->layers)
        for (int64_t l = 0; l < s->n_layer; l++) free(s->layers[l].groups);
    free(s->layers);
    free(s->ptrs);
    free(s->spans);
    if (s->map) munmap(s->map, s->map_bytes);
    else if (s->mem && s->mode == NM_SHARD_RAM) munmap(s->mem, s->mem_bytes);
    free(s->tmp);
    nm_moe_scratch_free(&s->scratch);
    memset(s, 0, sizeof *s);
}

int nm_shard_build(nm_shard *s, const nm_model *m, const nm_placement *p, int worker, int node, nm_pool *pool,
                   int mode, const nm_shard_seg *seg, const char *label, nm_err *err) {
    const nm_hparams *hp = &m->hp;
    const int64_t E = hp->n_expert, H = hp->n_embd;
    const int file = mode == NM_SHARD_FILE;
    memset(s, 0, sizeof *s);
    s->n_layer = hp->n_layer, s->n_embd = H, s->n_expert = E, s->mode = file ? NM_SHARD_FILE : NM_SHARD_RAM;
    if (file) seg = NULL;
    if (p->n_layer != hp->n_layer || p->n_expert != E || p->n_ff != hp->n_ff_exp)
        return nm_errf(err, "shard: the placement's shape does not match the model");
    int64_t *widths = malloc((size_t)(E > 0 ? E : 1) * sizeof *widths);
    s->layers = calloc((size_t)hp->n_layer, sizeof *s->layers);
    if (!widths || !s->layers) {
        free(widths);
        nm_shard_free(s);
        return nm_errf(err, "shard: out of memory");
    }
    /* pass 1: groups (distinct piece widths per layer, widest first) and sizes.
     * RAM mode holds a matrix as pre-packed tiles (kernels/moe.h) wherever
     * this CPU runs its type's tiles: the GEMM then reads it with no packing
     * per call, and decode reads the same bytes, so the rows are not kept
     * too; elsewhere (FILE mode, other types, NUMOE_ISA below the tiles) rows. */
    size_t bytes = 0, n_ptr = 0, n_ops = 0;
    unsigned tiled_any = 0;
    for (int64_t l = 0; l < hp->n_layer; l++) {
        const nm_layer *L = &m->layers[l];
        if (!L->is_moe) continue;
        unsigned tl = 0;
        if (!file && nm_tile_usable(L->gate_exps.type) && nm_tile_usable(L->up_exps.type)) tl |= NM_MOE_TILED_GATE_UP;
        if (!file && nm_tile_usable(L->down_exps.type)) tl |= NM_MOE_TILED_DOWN;
        int nw = 0;
        for (int64_t e = 0; e < E; e++) {
            const nm_piece *q = piece_of(p, l, e, worker);
            if (!q) continue;
            int64_t wd = q->f1 - q->f0;
            int seen = 0;
            for (int i = 0; i < nw; i++) seen |= widths[i] == wd;
            if (!seen) widths[nw++] = wd;
            size_t down_row = nm_row_size(L->down_exps.type, wd);
            if (!down_row) {
                free(widths);
                nm_shard_free(s);
                return nm_errf(err, "shard: layer %lld expert %lld: %lld ff columns are not whole %s blocks",
                               (long long)l, (long long)e, (long long)wd, nm_type_name(L->down_exps.type));
            }
            if (tl & NM_MOE_TILED_GATE_UP) {
                const size_t t = nm_tile_matrix_size(L->gate_exps.type, H, wd) + nm_tile_matrix_size(L->up_exps.type, H, wd);
                bytes += t, s->tiled_bytes += t;
            } else {
                bytes += up64((size_t)wd * L->gate_exps.row_bytes) + up64((size_t)wd * L->up_exps.row_bytes);
            }
            if (tl & NM_MOE_TILED_DOWN) {
                const size_t t = nm_tile_matrix_size(L->down_exps.type, wd, H);
                bytes += t, s->tiled_bytes += t;
            } else {
                bytes += up64((size_t)H * down_row);
            }
            s->weight_bytes += (uint64_t)wd * (L->gate_exps.row_bytes + L->up_exps.row_bytes) + (uint64_t)H * down_row;
            n_ops += 3;
        }
        for (int i = 0; i < nw; i++) /* widest first */
            for (int j = i + 1; j < nw; j++)
                if (widths[j] > widths[i]) {
                    int64_t t = widths[i];
                    widths[i] = widths[j], widths[j] = t;
                }
        nm_shard_layer *SL = &s->layers[l];
        SL->n_groups = nw;
        if (nw) tiled_any |= tl;
        if (nw && !(SL->groups = calloc((size_t)nw, sizeof *SL->groups))) {
            free(widths);
            nm_shard_free(s);
            return nm_errf(err, "shard: out of memory");
        }
        for (int i = 0; i < nw; i++)
            SL->groups[i] = (nm_moe_experts){
                .n_embd = H, .n_ff = widths[i], .n_expert = E, .type_gate = L->gate_exps.type,
                .type_up = L->up_exps.type, .type_down = L->down_exps.type, .row_gate = L->gate_exps.row_bytes,
                .row_up = L->up_exps.row_bytes,
                /* the stride of down's rows: repacked, a row is the piece's columns; in the
                 * file it is the whole row, of which the piece reads its columns */
                .row_down = file ? L->down_exps.row_bytes : nm_row_size(L->down_exps.type, widths[i]), .tiled = tl};
        n_ptr += (size_t)nw * 3 * (size_t)E;
    }
    free(widths);
    if (file) bytes = 0; /* nothing of its own: the tables point into the mapping */
    copy_op *ops = calloc(n_ops ? n_ops : 1, sizeof *ops);
    s->ptrs = calloc(n_ptr ? n_ptr : 1, sizeof *s->ptrs);
    if (file) s->spans = calloc((size_t)(hp->n_layer * E * 3 + 1), sizeof *s->spans);
    if (!ops || !s->ptrs || (file && !s->spans)) {
        free(ops);
        nm_shard_free(s);
        return nm_errf(err, "shard: out of memory");
    }
    if (seg) {
        seg_header want;
        seg_expect(&want, seg, worker, bytes, s->weight_bytes, tiled_any);
        int r = seg_open(s, seg, &want, node, err);
        if (r < 0) {
            free(ops);
            nm_shard_free(s);
            return -1;
        }
        s->reused = r;
        s->mem = s->map + SEG_HEAD, s->mem_bytes = bytes;
    } else if (bytes) {
        s->mem_bytes = bytes;
        void *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) {
            s->mem_bytes = 0;
            free(ops);
            nm_shard_free(s);
            return nm_errf(err, "shard: cannot allocate %zu bytes for the expert weights", bytes);
        }
        s->mem = mem;
        if (bytes >= (2u << 20)) madvise(mem, bytes, MADV_HUGEPAGE);
        if (node >= 0) numa_tonode_memory(mem, bytes, node); /* before the first touch */
    }
    /* pass 2: pointer tables and copy operations */
    uint8_t *cur = s->mem;
    const void **pt = s->ptrs;
    size_t k = 0;
    for (int64_t l = 0; l < hp->n_layer; l++) {
        const nm_layer *L = &m->layers[l];
        nm_shard_layer *SL = &s->layers[l];
        for (int g = 0; g < SL->n_groups; g++) {
            nm_moe_experts *G = &SL->groups[g];
            const void **gate = pt, **up = pt + E, **down = pt + 2 * E;
            pt += 3 * E;
            G->gate = gate, G->up = up, G->down = down;
            for (int64_t e = 0; e < E; e++) {
                const nm_piece *q = piece_of(p, l, e, worker);
                if (!q || q->f1 - q->f0 != G->n_ff) continue;
                size_t wd = (size_t)G->n_ff, gb = wd * G->row_gate, ub = wd * G->row_up;
                size_t col0 = nm_row_size(L->down_exps.type, q->f0); /* bytes before column f0 (whole blocks) */
                if (q->f0 && !col0) {
                    free(ops);
                    nm_shard_free(s);
                    return nm_errf(err, "shard: layer %lld expert %lld: column %lld is not on a %s block boundary",
                                   (long long)l, (long long)e, (long long)q->f0, nm_type_name(L->down_exps.type));
                }
                if (file) { /* the file's own layout; what to read ahead for this expert */
                    nm_shard_span *sp = &s->spans[(size_t)(l * E + e) * 3];
                    gate[e] = sp[0].p = nm_mat_row(&L->gate_exps, e, q->f0), sp[0].n = gb;
                    up[e] = sp[1].p = nm_mat_row(&L->up_exps, e, q->f0), sp[1].n = ub;
                    sp[2].p = nm_mat_row(&L->down_exps, e, 0), sp[2].n = (size_t)H * L->down_exps.row_bytes;
                    down[e] = sp[2].p + col0;
                    continue;
                }
                /* gate/up: rows [f0, f1), contiguous in the file; tiles of those rows */
                const uint8_t *gsrc = nm_mat_row(&L->gate_exps, e, q->f0), *usrc = nm_mat_row(&L->up_exps, e, q->f0);
                if (G->tiled & NM_MOE_TILED_GATE_UP) {
                    ops[k++] = (copy_op){cur, gsrc, wd, G->row_gate, G->row_gate, 0, G->type_gate, H};
                    gate[e] = cur, cur += nm_tile_matrix_size(G->type_gate, H, G->n_ff);
                    ops[k++] = (copy_op){cur, usrc, wd, G->row_up, G->row_up, 0, G->type_up, H};
                    up[e] = cur, cur += nm_tile_matrix_size(G->type_up, H, G->n_ff);
                } else {
                    ops[k++] = (copy_op){cur, gsrc, 1, gb, 0, 0, -1, 0};
                    gate[e] = cur, cur += up64(gb);
                    ops[k++] = (copy_op){cur, usrc, 1, ub, 0, 0, -1, 0};
                    up[e] = cur, cur += up64(ub);
                }
                /* down: columns [f0, f1) of each of the n_embd rows, repacked, or
                 * packed straight from the file's rows into tiles of f1 - f0 columns */
                const uint8_t *dsrc = (const uint8_t *)nm_mat_row(&L->down_exps, e, 0) + col0;
                if (G->tiled & NM_MOE_TILED_DOWN) {
                    ops[k++] = (copy_op){cur, dsrc, (size_t)H, G->row_down, L->down_exps.row_bytes, 0, G->type_down,
                                         G->n_ff};
                    down[e] = cur, cur += nm_tile_matrix_size(G->type_down, G->n_ff, H);
                } else {
                    ops[k++] = (copy_op){cur, dsrc, (size_t)H, G->row_down, L->down_exps.row_bytes, G->row_down, -1, 0};
                    down[e] = cur, cur += up64((size_t)H * G->row_down);
                }
            }
        }
    }
    if (s->reused || file) { /* already there, or read from the mapping: nothing to copy */
        free(ops);
        if (s->reused) populate_start(s);
        return 0;
    }
    nm_progress prog;
    nm_progress_begin(&prog, label ? label : "numoe-worker: building its shard", s->weight_bytes);
    copy_job job = {.ops = ops, .n = k, .progress = &prog};
    atomic_init(&job.next, 0);
    nm_pool_run(pool, run_copies, &job);
    nm_progress_end(&prog);
    free(ops);
    if (seg) {
        /* header last, then re-map the finished segment read-only at the same
         * address, so the pointer tables stay valid; the writable mapping goes */
        seg_header h;
        seg_expect(&h, seg, worker, bytes, s->weight_bytes, tiled_any);
        memcpy(s->map, &h, sizeof h);
        void *map = mmap(s->map, s->map_bytes, PROT_READ, MAP_SHARED | MAP_FIXED, seg->fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            nm_shard_free(s);
            return nm_errf(err, "shard: cannot re-map %s read-only: %s", seg->label, strerror(e));
        }
        populate_start(s);
    }
    return 0;
}

/* FILE mode: the kernel is asked for exactly the byte ranges of the experts
 * this call routes to (asynchronous read-ahead, so a page evicted since the
 * last call comes back in large reads instead of one fault at a time); the
 * rest of the file around them is other experts, not worth reading. */
static void read_ahead(const nm_shard *s, int layer, int64_t n, const int32_t *ids) {
    uint8_t *seen = calloc((size_t)s->n_expert, 1);
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    for (int64_t i = 0; seen && i < n; i++) {
        if (ids[i] < 0 || seen[ids[i]]) continue; /* < 0: computed elsewhere */
        seen[ids[i]] = 1;
        const nm_shard_span *sp = &s->spans[((size_t)layer * (size_t)s->n_expert + (size_t)ids[i]) * 3];
        for (int j = 0; j < 3; j++) {
            if (!sp[j].n) continue;
            uintptr_t a = (uintptr_t)sp[j].p & ~(page - 1), b = (uintptr_t)sp[j].p + sp[j].n;
            madvise((void *)a, b - a, MADV_WILLNEED); /* advice: a failure only costs speed */
        }
    }
    free(seen);
}

int nm_shard_moe(nm_shard *s, nm_pool *pool, int layer, int64_t n_tok, const float *x, int k, const int32_t *ids,
                 const float *w, float *out, nm_err *err) {
    if (layer < 0 || layer >= s->n_layer) return nm_errf(err, "no such layer (%lld layers)", (long long)s->n_layer);
    const nm_shard_layer *SL = &s->layers[layer];
    size_t n = (size_t)n_tok * (size_t)s->n_embd;
    for (int64_t i = 0; i < n_tok * k; i++)
        if (ids[i] < -s->n_expert || ids[i] >= s->n_expert) /* -1 - e: computed elsewhere (backend.h) */
            return nm_errf(err, "expert id %d out of range 0..%lld", ids[i], (long long)s->n_expert - 1);
    if (SL->n_groups == 0) {
        memset(out, 0, n * sizeof *out);
        return 0;
    }
    if (s->spans) read_ahead(s, layer, n_tok * k, ids);
    if (SL->n_groups > 1 && s->tmp_tok < n_tok) {
        float *t = realloc(s->tmp, n * sizeof *t);
        if (!t) return nm_errf(err, "out of memory");
        s->tmp = t, s->tmp_tok = n_tok;
    }
    char msg[256];
    for (int g = 0; g < SL->n_groups; g++) {
        float *dst = g == 0 ? out : s->tmp;
        if (nm_moe_forward(pool, &s->scratch, &SL->groups[g], n_tok, x, k, ids, w, dst, msg, sizeof msg))
            return nm_errf(err, "%s", msg);
        if (g > 0)
            for (size_t i = 0; i < n; i++) out[i] += dst[i];
    }
    return 0;
}
