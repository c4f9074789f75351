/* gpu_experts.cu - routed experts of long chunks on the GPU with their
 * weights streamed over PCIe (the contract and the why: gpu_experts.cuh). */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <new>
#include <vector>

#include "coordinator/engine/gpu/gpu_experts.cuh"
#include "coordinator/engine/gpu/gpu_kernels.cuh"
#include "kernels/cuda/cuda_quant.h"
#include "kernels/quant.h"
extern "C" {
#include "common/clock.h"
#include "kernels/threadpool.h"
}

namespace numoe_gpu {
namespace {

/* One stacked expert tensor as the host holds it and where it lands in a
 * staging buffer. */
struct stack {
    const uint8_t *host = nullptr;
    size_t bytes = 0, off = 0, slab = 0, row_bytes = 0;
    int type = 0;
    int64_t rows = 0, cols = 0;
    const char *name = "";
};

struct moe_layer {
    int il = -1;
    stack s[3]; /* gate, up, down */
    size_t bytes = 0;
    /* the whole layer already in VRAM (moe_stream_set_resident): the three
     * stacks in the file's layout; nothing is copied for it */
    const uint8_t *res[3] = {nullptr, nullptr, nullptr};
};

constexpr size_t ALIGN = 256;
constexpr int BOUNCE_N = 4;                     /* pinned chunks in the ring */
constexpr size_t BOUNCE_BYTES = (size_t)32 << 20; /* bytes per chunk */
constexpr int BOUNCE_THREADS_MAX = 16;
constexpr int QUEUE = 4;                        /* copy requests in flight (2 at most are used) */

/* How the host side of a copy is read. */
enum copy_mode { COPY_BOUNCE, COPY_PAGEABLE, COPY_REGISTER };

struct copy_part {
    uint8_t *dst;
    const uint8_t *src;
    size_t n;
};

/* One thread's share of a parallel memcpy (nm_pool_run): one thread reads a
 * few GB/s from the page cache, the PCIe link takes tens. */
void copy_part_run(void *arg, int ith, int nth) {
    const copy_part *c = static_cast<const copy_part *>(arg);
    const size_t step = (c->n / (size_t)nth + 63) & ~(size_t)63, o = (size_t)ith * step;
    if (o < c->n) memcpy(c->dst + o, c->src + o, o + step < c->n ? step : c->n - o);
}

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

__global__ void k_gather(float *xp, const float *a, const int32_t *pair_tok, int64_t n_pairs, int64_t H) {
    const int64_t p = blockIdx.x;
    if (p >= n_pairs) return;
    const float *src = a + (int64_t)pair_tok[p] * H;
    float *dst = xp + p * H;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) dst[i] = src[i];
}

/* out[t][i] = sum over c < k of w[l] * y[l][i], l = tok_list[t * k + c]
 * (ascending expert order; -1 ends a shorter list: a split pass's token
 * with picks on the CPU), from 0, each product and sum rounded alone. */
__global__ void k_combine(float *out, const float *y, const int32_t *tok_list, const float *pair_w, int k, int64_t H) {
    const int64_t t = blockIdx.x;
    const int32_t *l = tok_list + t * k;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
        float v = 0.0f;
        for (int c = 0; c < k && l[c] >= 0; c++) v = __fadd_rn(v, __fmul_rn(pair_w[l[c]], y[(int64_t)l[c] * H + i]));
        out[t * H + i] = v;
    }
}

#define fail_cuda(err, e, ...) cuda_errf(err, e, "GPU experts", __VA_ARGS__)

#define CUDA_OK(call, ...)                                                       \
    do {                                                                         \
        cudaError_t e_ = (call);                                                 \
        if (e_ != cudaSuccess) return fail_cuda(err, e_, __VA_ARGS__);           \
    } while (0)

/* MemAvailable of /proc/meminfo in bytes (0 when unreadable). */
size_t mem_available(void) {
    FILE *fp = fopen("/proc/meminfo", "r");
    if (!fp) return 0;
    char line[256];
    size_t kb = 0;
    while (fgets(line, sizeof line, fp))
        if (sscanf(line, "MemAvailable: %zu kB", &kb) == 1) break;
    fclose(fp);
    return kb * 1024;
}

} /* namespace */

struct moe_stream {
    const nm_model *m = nullptr;
    int k = 0;
    int64_t n_batch = 0;
    cudaStream_t cs = nullptr; /* the caller's compute stream */
    cudaStream_t copy = nullptr;
    cublasHandle_t cb = nullptr;
    cublasComputeType_t ct = CUBLAS_COMPUTE_32F;
    std::vector<moe_layer> layers; /* MoE layers in order */
    std::vector<int> slot_of;      /* layer index -> position in layers, -1 for dense */
    size_t max_bytes = 0;
    uint8_t *stage[2] = {nullptr, nullptr};
    int staged[2] = {-1, -1};      /* position in layers held (or being copied) by each buffer */
    int staged_e[2] = {0, 0};      /* ... and how many of its experts (ids 0..staged_e) */
    int pass_e = 0;                /* experts 0..pass_e of each layer are computed here this pass */
    int next_fetch = 0;            /* position in layers of the next copy to queue */
    cudaEvent_t ev_ready[2] = {}, ev_free[2] = {};
    std::vector<cudaEvent_t> ev_c0, ev_c1; /* per MoE layer: its copy's start and end */
    std::vector<char> timing;              /* a copy whose time is not harvested yet */
    /* activations: pairs in expert order */
    float *xp = nullptr, *hg = nullptr, *hu = nullptr, *y = nullptr, *tile = nullptr, *pw = nullptr;
    int32_t *ptok = nullptr, *tlist = nullptr;
    size_t tile_elems = 0;      /* floats of one expert matrix (the largest) */
    int64_t tile_experts = 0;   /* expert matrices the tile holds at once */
    /* grouped GEMM tables (one group per active expert): device pointer
     * arrays A, B, C for the three stacks, pinned here and copied per layer */
    const void **h_ptr = nullptr;
    void **d_ptr = nullptr;
    std::vector<int> g_m, g_n, g_k, g_one;
    std::vector<cublasOperation_t> g_ta, g_tb;
    std::vector<float> g_alpha, g_beta;
    std::vector<int32_t> act; /* active expert ids of the layer, ascending */
    /* pinned host side of the per-layer tables: pair_tok | tok_list | pair_w */
    uint8_t *h_tab = nullptr;
    uint8_t *d_tab = nullptr;
    std::vector<int64_t> count, start;
    std::vector<int32_t> fill;
    std::vector<int> tfill; /* per token: its pairs placed so far */
    void *registered = nullptr;
    int mode = COPY_BOUNCE;
    /* bounce mode (the default): pinned chunks that the memcpy pool fills
     * from the mapping, then DMA'd; a chunk is refilled once the DMA that
     * read it is done (its event) */
    uint8_t *bounce[BOUNCE_N] = {};
    cudaEvent_t ev_bounce[BOUNCE_N] = {};
    int bounce_next = 0;
    nm_pool *mpool = nullptr;
    /* The copier thread issues every layer's copy, so that the host's part
     * of it (the memcpy into the bounce chunks, or the whole of a pageable
     * copy) overlaps the compute thread's work instead of stalling it: the
     * compute thread queues a request (pos) and, before it computes that
     * layer, waits until the copier has issued it (done >= want[buffer]),
     * so its stream wait sees the copy's ready event. */
    pthread_t copier{};
    bool copier_started = false, stop = false;
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER; /* queue, done, cerr */
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    int queue[QUEUE] = {}, queue_e[QUEUE] = {};
    int64_t req = 0, done = 0, want[2] = {0, 0};
    int cerr = 0;
    nm_err cmsg{};
    pthread_mutex_t tmu = PTHREAD_MUTEX_INITIALIZER; /* timing, st: written by both threads */
    size_t vram = 0;
    moe_stream_stats st = {};
    char desc[512] = "";
};

namespace {

int dmalloc(moe_stream *s, void **p, size_t bytes, const char *what, nm_err *err) {
    *p = nullptr;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 16);
    if (e != cudaSuccess) {
        *p = nullptr;
        return fail_cuda(err, e, "allocating %zu MiB of VRAM for %s", bytes >> 20, what);
    }
    s->vram += bytes;
    return 0;
}

/* Adds the copy times of finished copies (every pending one with wait). */
void harvest(moe_stream *s, int wait) {
    pthread_mutex_lock(&s->tmu);
    for (size_t i = 0; i < s->timing.size(); i++) {
        if (!s->timing[i]) continue;
        if (!wait && cudaEventQuery(s->ev_c1[i]) != cudaSuccess) continue;
        float ms = 0;
        if (cudaEventSynchronize(s->ev_c1[i]) == cudaSuccess &&
            cudaEventElapsedTime(&ms, s->ev_c0[i], s->ev_c1[i]) == cudaSuccess)
            s->st.t_copy += ms / 1e3;
        s->timing[i] = 0;
    }
    pthread_mutex_unlock(&s->tmu);
}

/* Issues the copy of layers[pos] into buffer pos % 2 on the copy stream,
 * behind the compute that last read that buffer (on the copier thread). */
int fetch_now(moe_stream *s, int pos, int e_here, nm_err *err) {
    const int b = pos % 2;
    const moe_layer &L = s->layers[(size_t)pos];
    size_t copied = 0;
    harvest(s, 1); /* the previous pass's copy of this layer ended long ago */
    CUDA_OK(cudaStreamWaitEvent(s->copy, s->ev_free[b], 0), "layer %d: copy waits for its buffer", L.il);
    if (L.res[0]) { /* resident: the buffer's turn passes without a copy */
        CUDA_OK(cudaEventRecord(s->ev_ready[b], s->copy), "layer %d: ready event", L.il);
        return 0;
    }
    CUDA_OK(cudaEventRecord(s->ev_c0[(size_t)pos], s->copy), "layer %d: copy start event", L.il);
    for (const stack &k : L.s) {
        /* a split pass: only experts 0..e_here, a prefix of the stack */
        const size_t want = (size_t)e_here * k.slab, bytes = want < k.bytes ? want : k.bytes;
        copied += bytes;
        if (s->mode != COPY_BOUNCE) {
            CUDA_OK(cudaMemcpyAsync(s->stage[b] + k.off, k.host, bytes, cudaMemcpyHostToDevice, s->copy),
                    "layer %d: streaming %s (%zu MiB) to the GPU", L.il, k.name, bytes >> 20);
            continue;
        }
        for (size_t o = 0; o < bytes; o += BOUNCE_BYTES) {
            const size_t n = bytes - o < BOUNCE_BYTES ? bytes - o : BOUNCE_BYTES;
            const int c = s->bounce_next;
            s->bounce_next = (c + 1) % BOUNCE_N;
            CUDA_OK(cudaEventSynchronize(s->ev_bounce[c]), "layer %d: waiting for a bounce chunk", L.il);
            copy_part part{s->bounce[c], k.host + o, n};
            nm_pool_run(s->mpool, copy_part_run, &part);
            CUDA_OK(cudaMemcpyAsync(s->stage[b] + k.off + o, s->bounce[c], n, cudaMemcpyHostToDevice, s->copy),
                    "layer %d: streaming %s (%zu MiB at %zu) to the GPU", L.il, k.name, n >> 20, o);
            CUDA_OK(cudaEventRecord(s->ev_bounce[c], s->copy), "layer %d: bounce chunk event", L.il);
        }
    }
    CUDA_OK(cudaEventRecord(s->ev_c1[(size_t)pos], s->copy), "layer %d: copy end event", L.il);
    CUDA_OK(cudaEventRecord(s->ev_ready[b], s->copy), "layer %d: copy ready event", L.il);
    pthread_mutex_lock(&s->tmu);
    s->timing[(size_t)pos] = 1;
    s->st.bytes_copied += (double)copied;
    pthread_mutex_unlock(&s->tmu);
    return 0;
}

void *copier_main(void *arg) {
    moe_stream *s = static_cast<moe_stream *>(arg);
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->stop && s->done == s->req) pthread_cond_wait(&s->cv, &s->mu);
        if (s->done == s->req) break; /* stopped with nothing left */
        const int pos = s->queue[s->done % QUEUE], e_here = s->queue_e[s->done % QUEUE];
        pthread_mutex_unlock(&s->mu);
        nm_err e{};
        const int rc = fetch_now(s, pos, e_here, &e);
        pthread_mutex_lock(&s->mu);
        if (rc && !s->cerr) s->cerr = 1, s->cmsg = e;
        s->done++;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return nullptr;
}

/* Queues the copy of layers[pos] (compute thread). */
void fetch(moe_stream *s, int pos) {
    pthread_mutex_lock(&s->mu);
    s->queue[s->req % QUEUE] = pos;
    s->queue_e[s->req % QUEUE] = s->pass_e;
    s->req++;
    s->want[pos % 2] = s->req;
    s->staged[pos % 2] = pos;
    s->staged_e[pos % 2] = s->pass_e;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* Waits until the copy that fills buffer b is issued (or every queued one,
 * b < 0); the copier's first error, if any. */
int await_issued(moe_stream *s, int b, nm_err *err) {
    pthread_mutex_lock(&s->mu);
    const int64_t w = b < 0 ? s->req : s->want[b];
    while (s->done < w) pthread_cond_wait(&s->cv, &s->mu);
    const int bad = s->cerr;
    if (bad) *err = s->cmsg;
    pthread_mutex_unlock(&s->mu);
    return bad ? -1 : 0;
}

constexpr size_t TILE_BUDGET = (size_t)1 << 30; /* bytes of float32 expert tile in VRAM */

/* Stack si (gate, up, down) of one layer for its active experts, Y_e = W_e X_e
 * (base: the stack's first expert in VRAM, staged or resident)
 * (rows x cols times cols x count), as grouped GEMMs, one group per active
 * expert (cublasGemmGroupedBatchedEx: one launch for all of a tile's experts
 * instead of one dequantisation and one GEMM each; ~400 launches a layer
 * were the bound of a streamed pass on the H200 box). The experts are
 * dequantised tile_experts at a time into the tile (one launch per run of
 * consecutive ids when the stack's slabs are contiguous); float32 stacks are
 * read in place. The pointer tables were uploaded by the caller: row
 * si * na + a of d_ptr's A / B / C arrays is active expert a. */
int stack_mm(moe_stream *s, int si, const stack &k, const uint8_t *base, int64_t na, int il, nm_err *err) {
    const int64_t E = s->m->hp.n_expert, me = k.rows * k.cols;
    const bool f32 = k.type == NM_TYPE_F32;
    const bool contiguous = k.slab == (size_t)k.rows * k.row_bytes;
    void **A = s->d_ptr + (size_t)(0 * 3 + si) * (size_t)E, **B = s->d_ptr + (size_t)(1 * 3 + si) * (size_t)E,
         **C = s->d_ptr + (size_t)(2 * 3 + si) * (size_t)E;
    for (int64_t a0 = 0; a0 < na;) {
        /* the active experts whose ids fit in the tile from act[a0] on */
        const int32_t e0 = s->act[(size_t)a0];
        int64_t a1 = a0;
        while (a1 < na && (f32 || s->act[(size_t)a1] - e0 < s->tile_experts)) a1++;
        if (!f32) {
            const int32_t e1 = s->act[(size_t)a1 - 1] + 1;
            for (int32_t e = e0; e < e1;) {
                /* a run of ids: one launch when contiguous, else one expert */
                int32_t r = e + 1;
                if (contiguous) r = e1;
                const uint8_t *W = base + (size_t)e * k.slab;
                int rc = nm_cuda_dequantize(k.type, W, s->tile + (size_t)(e - e0) * (size_t)me, (r - e) * me, s->cs);
                if (rc != NM_CUDA_OK)
                    return nm_errf(err, "GPU experts: layer %d: dequantising %s experts %d..%d: %s", il, k.name, e, r - 1,
                                   nm_cuda_last_error());
                e = r;
            }
        }
        const int g = (int)(a1 - a0);
        cublasStatus_t bs = cublasGemmGroupedBatchedEx(
            s->cb, s->g_ta.data(), s->g_tb.data(), s->g_m.data() + (size_t)si * E + a0, s->g_n.data() + a0,
            s->g_k.data() + (size_t)si * E + a0, s->g_alpha.data(), (const void *const *)(A + a0), CUDA_R_32F,
            s->g_k.data() + (size_t)si * E + a0, (const void *const *)(B + a0), CUDA_R_32F,
            s->g_k.data() + (size_t)si * E + a0, s->g_beta.data(), C + a0, CUDA_R_32F,
            s->g_m.data() + (size_t)si * E + a0, g, s->g_one.data(), s->ct);
        if (bs != CUBLAS_STATUS_SUCCESS)
            return nm_errf(err, "GPU experts: layer %d: grouped GEMM %s experts %d..%d: cuBLAS %s", il, k.name, e0,
                           s->act[(size_t)a1 - 1], cublasGetStatusString(bs));
        a0 = a1;
    }
    return 0;
}

} /* namespace */

int moe_stream_create(moe_stream **out, const nm_model *m, int64_t n_batch, int k, cudaStream_t compute,
                      cublasHandle_t cb, cublasComputeType_t ct, nm_err *err) {
    *out = nullptr;
    const nm_hparams *hp = &m->hp;
    moe_stream *s = new (std::nothrow) moe_stream();
    if (!s) return nm_errf(err, "out of memory");
    s->m = m;
    s->k = k;
    s->n_batch = n_batch;
    s->cs = compute;
    s->cb = cb;
    s->ct = ct;
    s->slot_of.assign((size_t)hp->n_layer, -1);
    const uint8_t *lo = nullptr, *hi = nullptr;
    for (int il = 0; il < hp->n_layer; il++) {
        const nm_layer *S = &m->layers[il];
        if (!S->is_moe) continue;
        moe_layer L;
        L.il = il;
        const nm_mat *src[3] = {&S->gate_exps, &S->up_exps, &S->down_exps};
        for (int i = 0; i < 3; i++) {
            stack &t = L.s[i];
            t.host = static_cast<const uint8_t *>(src[i]->data);
            t.slab = src[i]->slab;
            t.row_bytes = src[i]->row_bytes;
            t.bytes = src[i]->slab * (size_t)hp->n_expert;
            t.type = src[i]->type;
            t.rows = src[i]->rows;
            t.cols = src[i]->cols;
            t.name = src[i]->name;
            t.off = L.bytes;
            L.bytes = round_up(L.bytes + t.bytes, ALIGN);
            if (!nm_cuda_supports_dequantize(t.type)) {
                moe_stream_free(s);
                return nm_errf(err, "GPU experts: %s has type %s, which the CUDA kernels cannot dequantise", t.name,
                               nm_type_name(t.type));
            }
            if ((size_t)(t.rows * t.cols) > s->tile_elems && t.type != NM_TYPE_F32) s->tile_elems = (size_t)(t.rows * t.cols);
            if (!lo || t.host < lo) lo = t.host;
            if (!hi || t.host + t.bytes > hi) hi = t.host + t.bytes;
        }
        if (L.bytes > s->max_bytes) s->max_bytes = L.bytes;
        s->slot_of[(size_t)il] = (int)s->layers.size();
        s->layers.push_back(L);
    }
    if (s->layers.empty()) {
        *out = s;
        snprintf(s->desc, sizeof s->desc, "no MoE layers");
        return 0;
    }
    const int64_t H = hp->n_embd, ff = hp->n_ff_exp, P = n_batch * k;
    int rc = 0;
    cudaError_t e = cudaStreamCreateWithFlags(&s->copy, cudaStreamNonBlocking);
    for (int b = 0; b < 2 && e == cudaSuccess; b++) {
        e = cudaEventCreateWithFlags(&s->ev_ready[b], cudaEventDisableTiming);
        if (e == cudaSuccess) e = cudaEventCreateWithFlags(&s->ev_free[b], cudaEventDisableTiming);
    }
    s->ev_c0.assign(s->layers.size(), nullptr);
    s->ev_c1.assign(s->layers.size(), nullptr);
    s->timing.assign(s->layers.size(), 0);
    for (size_t i = 0; i < s->layers.size() && e == cudaSuccess; i++) {
        e = cudaEventCreate(&s->ev_c0[i]);
        if (e == cudaSuccess) e = cudaEventCreate(&s->ev_c1[i]);
    }
    if (e != cudaSuccess) rc = fail_cuda(err, e, "creating the copy stream and its events");
    void *v;
    for (int b = 0; b < 2 && !rc; b++) {
        rc = dmalloc(s, &v, s->max_bytes, "an expert staging buffer", err);
        s->stage[b] = static_cast<uint8_t *>(v);
    }
    const size_t tab = round_up((size_t)P * 3 * 4, ALIGN);
    if (!rc) rc = dmalloc(s, &v, (size_t)(P * H) * sizeof(float), "expert inputs", err), s->xp = (float *)v;
    if (!rc) rc = dmalloc(s, &v, (size_t)(P * ff) * sizeof(float), "expert gate", err), s->hg = (float *)v;
    if (!rc) rc = dmalloc(s, &v, (size_t)(P * ff) * sizeof(float), "expert up", err), s->hu = (float *)v;
    if (!rc) rc = dmalloc(s, &v, (size_t)(P * H) * sizeof(float), "expert outputs", err), s->y = (float *)v;
    if (s->tile_elems) {
        s->tile_experts = (int64_t)(TILE_BUDGET / (s->tile_elems * sizeof(float)));
        if (s->tile_experts < 1) s->tile_experts = 1;
        if (s->tile_experts > hp->n_expert) s->tile_experts = hp->n_expert;
    }
    if (!rc && s->tile_elems)
        rc = dmalloc(s, &v, (size_t)s->tile_experts * s->tile_elems * sizeof(float), "expert tile", err),
        s->tile = (float *)v;
    const size_t nptr = (size_t)9 * (size_t)hp->n_expert;
    if (!rc) rc = dmalloc(s, &v, nptr * sizeof(void *), "grouped GEMM tables", err), s->d_ptr = (void **)v;
    if (!rc) {
        e = cudaHostAlloc(&v, nptr * sizeof(void *), cudaHostAllocDefault);
        if (e != cudaSuccess) rc = fail_cuda(err, e, "allocating pinned grouped GEMM tables");
        else s->h_ptr = (const void **)v;
    }
    if (!rc) {
        const size_t E3 = (size_t)3 * (size_t)hp->n_expert;
        s->g_m.assign(E3, 0), s->g_k.assign(E3, 0), s->g_n.assign((size_t)hp->n_expert, 0);
        s->g_one.assign((size_t)hp->n_expert, 1);
        s->g_ta.assign((size_t)hp->n_expert, CUBLAS_OP_T), s->g_tb.assign((size_t)hp->n_expert, CUBLAS_OP_N);
        s->g_alpha.assign((size_t)hp->n_expert, 1.0f), s->g_beta.assign((size_t)hp->n_expert, 0.0f);
    }
    if (!rc) rc = dmalloc(s, &v, tab, "expert tables", err), s->d_tab = (uint8_t *)v;
    if (!rc) {
        e = cudaHostAlloc(&v, tab, cudaHostAllocDefault);
        if (e != cudaSuccess) rc = fail_cuda(err, e, "allocating pinned expert tables");
        else s->h_tab = (uint8_t *)v;
    }
    if (rc) {
        moe_stream_free(s);
        return -1;
    }
    s->ptok = reinterpret_cast<int32_t *>(s->d_tab);
    s->tlist = s->ptok + P;
    s->pw = reinterpret_cast<float *>(s->tlist + P);
    /* both buffers start free */
    for (int b = 0; b < 2; b++)
        if ((e = cudaEventRecord(s->ev_free[b], s->cs)) != cudaSuccess) {
            moe_stream_free(s);
            return fail_cuda(err, e, "recording the staging buffers' first free events");
        }
    /* pin the host source when it may stay resident: the span from the first
     * to the last expert byte, page aligned */
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uint8_t *base = (uint8_t *)((uintptr_t)lo & ~(uintptr_t)(page - 1));
    const size_t span = round_up((size_t)(hi - base), page);
    const size_t avail = mem_available();
    char how[200];
    /* NUMOE_STREAM_COPY: bounce (default), pageable or register. Measured on
     * the H200 box (8-layer V2-Lite Q4_K, pp512): bounce 20-24 GB/s, pageable
     * 6.5 GB/s; registering a multi-GB file mapping (cudaHostRegister) hung
     * the box's sandboxed driver (no progress in 25-60 s, twice) */
    const char *mode = getenv("NUMOE_STREAM_COPY");
    if (!mode || !*mode || !strcmp(mode, "bounce")) s->mode = COPY_BOUNCE;
    else if (!strcmp(mode, "pageable")) s->mode = COPY_PAGEABLE;
    else if (!strcmp(mode, "register")) s->mode = COPY_REGISTER;
    else {
        moe_stream_free(s);
        return nm_errf(err, "NUMOE_STREAM_COPY=%s: use bounce (default), pageable or register", mode);
    }
    if (s->mode == COPY_BOUNCE) {
        /* the memcpy threads run while the CPU has nothing else to do (the
         * pass's experts are here); two CPUs stay free for the compute thread
         * and the driver */
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        const int nt = ncpu <= 3 ? 1 : ncpu - 2 > BOUNCE_THREADS_MAX ? BOUNCE_THREADS_MAX : (int)(ncpu - 2);
        s->mpool = nm_pool_create(nt);
        for (int c = 0; c < BOUNCE_N && e == cudaSuccess; c++) {
            void *v = nullptr;
            e = cudaHostAlloc(&v, BOUNCE_BYTES, cudaHostAllocDefault);
            s->bounce[c] = static_cast<uint8_t *>(v);
            if (e == cudaSuccess) e = cudaEventCreateWithFlags(&s->ev_bounce[c], cudaEventDisableTiming);
        }
        if (e != cudaSuccess || !s->mpool) {
            moe_stream_free(s);
            if (e == cudaSuccess) return nm_errf(err, "GPU experts: cannot start %d memcpy threads", nt);
            return fail_cuda(err, e, "allocating %d pinned bounce chunks of %zu MiB", BOUNCE_N, BOUNCE_BYTES >> 20);
        }
        s->st.pinned = 1;
        snprintf(how, sizeof how, "through %d pinned %zu-MiB chunks filled by %d threads", BOUNCE_N,
                 BOUNCE_BYTES >> 20, nm_pool_size(s->mpool));
    } else if (s->mode == COPY_PAGEABLE) {
        snprintf(how, sizeof how, "pageable (NUMOE_STREAM_COPY=pageable)");
    } else if (avail && span <= avail / 2) {
        e = cudaHostRegister(base, span, cudaHostRegisterReadOnly | cudaHostRegisterPortable);
        if (e == cudaSuccess) {
            s->registered = base;
            s->st.pinned = 1;
            snprintf(how, sizeof how, "pinned (%.2f GiB of the mapping registered)", span / 1073741824.0);
        } else {
            (void)cudaGetLastError();
            snprintf(how, sizeof how, "pageable: registering the mapping failed: %s", cudaGetErrorString(e));
        }
    } else {
        snprintf(how, sizeof how, "pageable: the experts' %.1f GiB exceed half of the %.1f GiB available",
                 span / 1073741824.0, avail / 1073741824.0);
    }
    if (pthread_create(&s->copier, nullptr, copier_main, s) != 0) {
        moe_stream_free(s);
        return nm_errf(err, "GPU experts: cannot start the copier thread");
    }
    s->copier_started = true;
    s->st.vram = s->vram;
    snprintf(s->desc, sizeof s->desc, "2 x %.1f MiB staging + %.1f MiB work, host copies %s",
             s->max_bytes / 1048576.0, (s->vram - 2 * s->max_bytes) / 1048576.0, how);
    *out = s;
    return 0;
}

void moe_stream_free(moe_stream *s) {
    if (!s) return;
    if (s->copier_started) {
        pthread_mutex_lock(&s->mu);
        s->stop = true;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->copier, nullptr);
    }
    nm_pool_destroy(s->mpool);
    if (s->copy) cudaStreamSynchronize(s->copy);
    if (s->cs) cudaStreamSynchronize(s->cs);
    if (s->registered) cudaHostUnregister(s->registered);
    for (int c = 0; c < BOUNCE_N; c++) {
        if (s->bounce[c]) cudaFreeHost(s->bounce[c]);
        if (s->ev_bounce[c]) cudaEventDestroy(s->ev_bounce[c]);
    }
    for (void *p : {(void *)s->stage[0], (void *)s->stage[1], (void *)s->xp, (void *)s->hg, (void *)s->hu,
                    (void *)s->y, (void *)s->tile, (void *)s->d_tab, (void *)s->d_ptr})
        if (p) cudaFree(p);
    if (s->h_tab) cudaFreeHost(s->h_tab);
    if (s->h_ptr) cudaFreeHost((void *)s->h_ptr);
    for (int b = 0; b < 2; b++)
        for (cudaEvent_t ev : {s->ev_ready[b], s->ev_free[b]})
            if (ev) cudaEventDestroy(ev);
    for (cudaEvent_t ev : s->ev_c0)
        if (ev) cudaEventDestroy(ev);
    for (cudaEvent_t ev : s->ev_c1)
        if (ev) cudaEventDestroy(ev);
    if (s->copy) cudaStreamDestroy(s->copy);
    delete s;
}

int moe_stream_begin(moe_stream *s, int e_here, nm_err *err) {
    const int E = (int)s->m->hp.n_expert;
    if (e_here < 1 || e_here > E)
        return nm_errf(err, "GPU experts: a pass computing %d of %d experts per layer here", e_here, E);
    /* a pass that failed half-way may have left copies queued */
    if (await_issued(s, -1, err)) return -1;
    s->pass_e = e_here;
    s->staged[0] = s->staged[1] = -1;
    s->next_fetch = 0;
    for (int i = 0; i < 2 && s->next_fetch < (int)s->layers.size(); i++) fetch(s, s->next_fetch++);
    return 0;
}

int moe_stream_layer(moe_stream *s, int il, const float *a, int64_t n, const int32_t *ids, const float *w,
                     float *out, nm_err *err) {
    const nm_hparams *hp = &s->m->hp;
    const int64_t H = hp->n_embd, E = hp->n_expert, ff = hp->n_ff_exp;
    const int k = s->k;
    const int pos = il >= 0 && il < hp->n_layer ? s->slot_of[(size_t)il] : -1;
    if (pos < 0) return nm_errf(err, "GPU experts: layer %d is not a MoE layer", il);
    if (n < 1 || n > s->n_batch) return nm_errf(err, "GPU experts: layer %d: %lld tokens (1..%lld)", il, (long long)n,
                                                (long long)s->n_batch);
    const int b = pos % 2;
    if (s->staged[b] != pos) return nm_errf(err, "GPU experts: layer %d was not queued (moe_stream_begin missing)", il);
    const moe_layer &L = s->layers[(size_t)pos];
    /* the experts here: all of a resident layer, else the staged prefix */
    const int64_t E_here = L.res[0] ? E : s->staged_e[b];
    const int64_t NK = n * k;
    /* counting sort of the pairs by expert (kernels/moe.c's order); an id
     * < 0 (-1 - e) is a pick the CPU computes in a split pass */
    s->count.assign((size_t)E + 1, 0);
    s->start.assign((size_t)E + 1, 0);
    int64_t P = 0;
    for (int64_t i = 0; i < NK; i++) {
        if (ids[i] < -E || ids[i] >= E_here)
            return nm_errf(err, "GPU experts: layer %d: expert id %d out of range -%lld..%lld (%lld here)", il, ids[i],
                           (long long)E, (long long)E_here - 1, (long long)E_here);
        if (ids[i] < 0) continue;
        s->count[(size_t)ids[i]]++;
        P++;
    }
    for (int64_t e = 0; e < E; e++) s->start[(size_t)e + 1] = s->start[(size_t)e] + s->count[(size_t)e];
    int32_t *ptok = reinterpret_cast<int32_t *>(s->h_tab), *tlist = ptok + s->n_batch * k;
    float *pw = reinterpret_cast<float *>(tlist + s->n_batch * k);
    s->fill.assign((size_t)E, 0);
    for (int64_t i = 0; i < NK; i++) {
        const int32_t e = ids[i];
        if (e < 0) continue;
        const int64_t p = s->start[(size_t)e] + s->fill[(size_t)e]++;
        ptok[p] = (int32_t)(i / k);
        pw[p] = w[i];
    }
    /* each token's pairs in ascending p, i.e. ascending expert id; -1 ends
     * a token's list when it has fewer than k here */
    s->tfill.assign((size_t)n, 0);
    for (int64_t i = 0; i < NK; i++) tlist[i] = -1;
    for (int64_t p = 0; p < P; p++) {
        const int32_t t = ptok[p];
        tlist[(int64_t)t * k + s->tfill[(size_t)t]++] = (int32_t)p;
    }
    const size_t tab = (size_t)s->n_batch * k * 3 * 4;
    CUDA_OK(cudaMemcpyAsync(s->d_tab, s->h_tab, tab, cudaMemcpyHostToDevice, s->cs), "layer %d: expert tables", il);
    if (P > 0) {
        k_gather<<<(unsigned)P, 256, 0, s->cs>>>(s->xp, a, s->ptok, P, H);
        CUDA_OK(cudaGetLastError(), "layer %d: gathering expert inputs", il);
    }
    if (await_issued(s, b, err)) return -1;
    CUDA_OK(cudaStreamWaitEvent(s->cs, s->ev_ready[b], 0), "layer %d: waiting for the streamed experts", il);
    const uint8_t *buf = s->stage[b];
    const uint8_t *base[3];
    for (int si = 0; si < 3; si++) base[si] = L.res[0] ? L.res[si] : buf + L.s[si].off;
    /* the grouped GEMM tables: per stack, per active expert, A (its matrix:
     * in the tile, or in place for float32), B (its pairs' inputs), C (their
     * outputs); pinned -> device once per layer, behind the previous layer's
     * GEMMs on the same stream */
    s->act.clear();
    for (int64_t e = 0; e < E; e++)
        if (s->count[(size_t)e]) s->act.push_back((int32_t)e);
    const int64_t na = (int64_t)s->act.size();
    CUDA_OK(cudaStreamSynchronize(s->cs), "layer %d: the previous layer's GEMM tables are free", il);
    for (int si = 0; si < 3; si++) {
        const stack &kk = L.s[si];
        for (int64_t a = 0; a < na; a++) {
            const int32_t e = s->act[(size_t)a];
            const int64_t p0 = s->start[(size_t)e];
            s->h_ptr[(size_t)(0 * 3 + si) * E + a] =
                kk.type == NM_TYPE_F32 ? (const void *)(base[si] + (size_t)e * kk.slab) : nullptr;
            s->h_ptr[(size_t)(1 * 3 + si) * E + a] = si < 2 ? (const void *)(s->xp + p0 * H) : (const void *)(s->hg + p0 * ff);
            s->h_ptr[(size_t)(2 * 3 + si) * E + a] =
                si == 0 ? (const void *)(s->hg + p0 * ff) : si == 1 ? (const void *)(s->hu + p0 * ff) : (const void *)(s->y + p0 * H);
            s->g_m[(size_t)si * E + a] = (int)kk.rows;
            s->g_k[(size_t)si * E + a] = (int)kk.cols;
            if (si == 0) s->g_n[(size_t)a] = (int)s->count[(size_t)e];
        }
    }
    /* A of the dequantised stacks: the tile slot of each expert, relative to
     * the first id of its tile group (stack_mm's grouping, repeated here) */
    for (int si = 0; si < 3; si++) {
        const stack &kk = L.s[si];
        if (kk.type == NM_TYPE_F32) continue;
        const int64_t me = kk.rows * kk.cols;
        for (int64_t a0 = 0; a0 < na;) {
            const int32_t e0 = s->act[(size_t)a0];
            int64_t a1 = a0;
            while (a1 < na && s->act[(size_t)a1] - e0 < s->tile_experts) a1++;
            for (int64_t a = a0; a < a1; a++)
                s->h_ptr[(size_t)(0 * 3 + si) * E + a] = s->tile + (size_t)(s->act[(size_t)a] - e0) * (size_t)me;
            a0 = a1;
        }
    }
    if (na > 0) {
        CUDA_OK(cudaMemcpyAsync(s->d_ptr, s->h_ptr, (size_t)9 * (size_t)E * sizeof(void *), cudaMemcpyHostToDevice,
                                s->cs),
                "layer %d: grouped GEMM tables", il);
        if (stack_mm(s, 0, L.s[0], base[0], na, il, err) || stack_mm(s, 1, L.s[1], base[1], na, il, err)) return -1;
        CUDA_OK(silu_mul(s->cs, s->hg, s->hu, P * ff), "layer %d: expert silu", il);
        if (stack_mm(s, 2, L.s[2], base[2], na, il, err)) return -1;
    }
    CUDA_OK(cudaEventRecord(s->ev_free[b], s->cs), "layer %d: staging buffer free event", il);
    k_combine<<<(unsigned)n, 256, 0, s->cs>>>(out, s->y, s->tlist, s->pw, k, H);
    CUDA_OK(cudaGetLastError(), "layer %d: combining expert outputs", il);
    s->st.n_layers++;
    harvest(s, 0);
    if (s->next_fetch < (int)s->layers.size()) fetch(s, s->next_fetch++);
    return 0;
}

int moe_stream_time_copy(moe_stream *s, double *seconds, nm_err *err) {
    *seconds = 0;
    if (s->layers.empty()) return 0;
    int pos = 0;
    for (size_t i = 0; i < s->layers.size(); i++)
        if (s->layers[i].bytes > s->layers[(size_t)pos].bytes) pos = (int)i;
    const int b = pos % 2;
    if (await_issued(s, -1, err)) return -1;
    harvest(s, 1);
    const double bytes_before = s->st.bytes_copied;
    /* timed from the request: the host's part of the copy (the memcpy into
     * the bounce chunks) counts as much as the DMA */
    const double t0 = nm_now_s();
    s->pass_e = (int)s->m->hp.n_expert; /* the whole layer */
    fetch(s, pos);
    if (await_issued(s, b, err)) return -1;
    CUDA_OK(cudaEventSynchronize(s->ev_c1[(size_t)pos]), "timing a layer's copy");
    const double t1 = nm_now_s();
    pthread_mutex_lock(&s->tmu);
    s->timing[(size_t)pos] = 0;
    s->st.bytes_copied = bytes_before;
    pthread_mutex_unlock(&s->tmu);
    s->staged[b] = -1;
    *seconds = t1 - t0;
    return 0;
}

void moe_stream_get_stats(moe_stream *s, moe_stream_stats *st) {
    harvest(s, 1);
    *st = s->st;
}

void moe_stream_reset_stats(moe_stream *s) {
    harvest(s, 1);
    const size_t v = s->st.vram;
    const int p = s->st.pinned;
    s->st = moe_stream_stats{};
    s->st.vram = v;
    s->st.pinned = p;
}

size_t moe_stream_layer_bytes(const moe_stream *s) { return s->max_bytes; }

int moe_stream_set_resident(moe_stream *s, int il, const uint8_t *gate, const uint8_t *up, const uint8_t *down) {
    const int pos = il >= 0 && il < s->m->hp.n_layer ? s->slot_of[(size_t)il] : -1;
    if (pos < 0 || !gate || !up || !down) return -1;
    moe_layer &L = s->layers[(size_t)pos];
    L.res[0] = gate, L.res[1] = up, L.res[2] = down;
    return 0;
}

const char *moe_stream_describe(const moe_stream *s) { return s->desc; }

} /* namespace numoe_gpu */
