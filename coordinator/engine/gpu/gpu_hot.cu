/* gpu_hot.cu - hot routed experts in VRAM (gpu_hot.cuh). */
#include "coordinator/engine/gpu/gpu_hot.cuh"
#include "kernels/cuda/pdl.cuh"

#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <new>

#include "coordinator/engine/gpu/gpu_error.cuh"
#include "coordinator/engine/gpu/gpu_kernels.cuh"
#include "kernels/cuda/cuda_quant.h"
#include "kernels/quant.h"

namespace numoe_gpu {

namespace {

struct hot_stack {
    const uint8_t *d = nullptr; /* n matrices, slab bytes apart */
    size_t slab = 0;
    int type = 0;
    int64_t rows = 0, cols = 0;
    bool q8 = false; /* computed by the integer GEMV (hot_create's q8, the type has one) */
};

struct hot_layer {
    int n = 0;                  /* experts resident */
    int32_t *slot = nullptr;    /* device: [n_expert] slot or -1 */
    hot_stack gate, up, down;
};

} /* namespace */

struct hot_experts {
    const nm_model *m = nullptr;
    cudaStream_t st = nullptr;
    int k = 0;
    int64_t max_tok = 0, total = 0;
    size_t vram = 0;
    std::vector<hot_layer> layers;
    std::vector<void *> dev;
    int32_t *mat = nullptr;          /* [max_tok * k] slot of each pick (hot_split) */
    float *hg = nullptr, *hu = nullptr, *y = nullptr; /* [max_tok * k][ff], [..][ff], [..][n_embd] */
    bool q8 = false;
    uint8_t *xq_a = nullptr, *xq_h = nullptr; /* q8 rows of a [max_tok] and of hg [max_tok * k] */
};

#define CUDA_OK(call, ...)                                                          \
    do {                                                                            \
        cudaError_t e_ = (call);                                                    \
        if (e_ != cudaSuccess) return cuda_errf(err, e_, "GPU hot experts", __VA_ARGS__); \
    } while (0)

static int dalloc(hot_experts *h, void **p, size_t bytes, const char *what, int il, nm_err *err) {
    *p = nullptr;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 16);
    if (e != cudaSuccess) {
        *p = nullptr;
        return cuda_errf(err, e, "GPU hot experts", "layer %d: allocating %zu MiB of VRAM for %s (lower --gpu-experts)",
                         il, bytes >> 20, what);
    }
    h->dev.push_back(*p);
    h->vram += bytes;
    return 0;
}

size_t hot_expert_bytes(const nm_model *m, int il) {
    const nm_layer *S = &m->layers[il];
    if (!S->is_moe) return 0;
    return S->gate_exps.slab + S->up_exps.slab + S->down_exps.slab;
}

size_t hot_choose(const nm_model *m, int64_t per_layer, const uint32_t *counts, size_t budget,
                  std::vector<uint8_t> &keep) {
    const int64_t L = m->hp.n_layer, E = m->hp.n_expert;
    keep.assign((size_t)(L * E), 0);
    /* candidates in the order they are taken: by count (descending), ties in
     * round-robin order (rank r of every layer before rank r + 1) */
    struct cand {
        uint32_t count;
        int64_t rank;
        int il, e;
    };
    std::vector<cand> c;
    for (int il = 0; il < L; il++) {
        if (!m->layers[il].is_moe) continue;
        std::vector<int> order((size_t)E);
        for (int e = 0; e < E; e++) order[(size_t)e] = e;
        if (counts)
            std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
                return counts[il * E + a] > counts[il * E + b];
            });
        for (int64_t r = 0; r < E; r++) {
            const int e = order[(size_t)r];
            if (per_layer >= 0 && r >= per_layer) break;
            c.push_back({counts ? counts[il * E + e] : 0u, r * L + il, il, e});
        }
    }
    if (per_layer >= 0) {
        size_t bytes = 0;
        for (const cand &x : c) keep[(size_t)(x.il * E + x.e)] = 1, bytes += hot_expert_bytes(m, x.il);
        return bytes;
    }
    std::stable_sort(c.begin(), c.end(), [](const cand &a, const cand &b) {
        return a.count != b.count ? a.count > b.count : a.rank < b.rank;
    });
    size_t bytes = 0;
    for (const cand &x : c) {
        const size_t b = hot_expert_bytes(m, x.il);
        if (bytes + b > budget) break; /* the most used first: stop at the first that does not fit */
        keep[(size_t)(x.il * E + x.e)] = 1;
        bytes += b;
    }
    return bytes;
}

static int upload_stack(hot_experts *h, const nm_mat *src, const std::vector<int> &ids, hot_stack *dst, int il,
                        void (*uploaded)(void *, size_t), void *ctx, nm_err *err) {
    dst->slab = src->slab;
    dst->type = src->type;
    dst->rows = src->rows;
    dst->cols = src->cols;
    /* the integer kernel's pairs need 16-byte-aligned matrices (cudaMalloc'd
     * stacks are, so the slab decides) */
    dst->q8 = h->q8 && nm_cuda_supports_gemv_q8(src->type) && src->slab % 16 == 0 && src->cols % 32 == 0;
    if (!nm_cuda_supports_gemv(src->type))
        return nm_errf(err, "GPU hot experts: tensor %s has type %s, which the CUDA kernels cannot compute with",
                       src->name, nm_type_name(src->type));
    void *d;
    if (dalloc(h, &d, src->slab * ids.size(), src->name, il, err)) return -1;
    dst->d = static_cast<const uint8_t *>(d);
    for (size_t s = 0; s < ids.size(); s++) {
        CUDA_OK(cudaMemcpyAsync(static_cast<uint8_t *>(d) + s * src->slab, nm_mat_row(src, ids[s], 0), src->slab,
                                cudaMemcpyHostToDevice, h->st),
                "layer %d: uploading expert %d of %s", il, ids[s], src->name);
        if (uploaded) uploaded(ctx, src->slab);
    }
    return 0;
}

int hot_create(hot_experts **out, const nm_model *m, const std::vector<uint8_t> &keep, int k, int64_t max_tok, bool q8,
               cudaStream_t st, void (*uploaded)(void *, size_t), void *ctx, nm_err *err) {
    *out = nullptr;
    hot_experts *h = new (std::nothrow) hot_experts();
    if (!h) return nm_errf(err, "out of memory");
    h->m = m, h->st = st, h->k = k, h->max_tok = max_tok, h->q8 = q8;
    const nm_hparams *hp = &m->hp;
    const int64_t E = hp->n_expert;
    h->layers.resize((size_t)hp->n_layer);
    int64_t ff_max = 0;
    for (int il = 0; il < hp->n_layer; il++) {
        const nm_layer *S = &m->layers[il];
        hot_layer *HL = &h->layers[(size_t)il];
        if (!S->is_moe) continue;
        std::vector<int> ids;
        std::vector<int32_t> slot((size_t)E, -1);
        for (int e = 0; e < E; e++)
            if (keep[(size_t)(il * E + e)]) slot[(size_t)e] = (int32_t)ids.size(), ids.push_back(e);
        if (ids.empty()) continue;
        void *d;
        if (dalloc(h, &d, (size_t)E * sizeof(int32_t), "the slot table", il, err)) goto fail;
        HL->slot = static_cast<int32_t *>(d);
        if (cudaMemcpyAsync(d, slot.data(), (size_t)E * sizeof(int32_t), cudaMemcpyHostToDevice, st) != cudaSuccess) {
            nm_errf(err, "GPU hot experts: layer %d: uploading the slot table failed", il);
            goto fail;
        }
        if (upload_stack(h, &S->gate_exps, ids, &HL->gate, il, uploaded, ctx, err) ||
            upload_stack(h, &S->up_exps, ids, &HL->up, il, uploaded, ctx, err) ||
            upload_stack(h, &S->down_exps, ids, &HL->down, il, uploaded, ctx, err))
            goto fail;
        /* the slot table and every pinned-or-pageable copy above must land
         * before the host buffer of slot goes away */
        if (cudaStreamSynchronize(st) != cudaSuccess) {
            nm_errf(err, "GPU hot experts: layer %d: the upload failed", il);
            goto fail;
        }
        HL->n = (int)ids.size();
        h->total += HL->n;
        if (S->gate_exps.rows > ff_max) ff_max = S->gate_exps.rows;
    }
    if (h->total > 0) {
        const size_t P = (size_t)(max_tok * k);
        void *d;
        if (dalloc(h, &d, P * sizeof(int32_t), "pick slots", -1, err)) goto fail;
        h->mat = static_cast<int32_t *>(d);
        if (dalloc(h, &d, P * (size_t)ff_max * sizeof(float), "gate rows", -1, err)) goto fail;
        h->hg = static_cast<float *>(d);
        if (dalloc(h, &d, P * (size_t)ff_max * sizeof(float), "up rows", -1, err)) goto fail;
        h->hu = static_cast<float *>(d);
        if (dalloc(h, &d, P * (size_t)hp->n_embd * sizeof(float), "expert outputs", -1, err)) goto fail;
        h->y = static_cast<float *>(d);
        if (q8) {
            if (dalloc(h, &d, (size_t)max_tok * nm_cuda_q8_row_bytes(hp->n_embd), "quantised inputs", -1, err)) goto fail;
            h->xq_a = static_cast<uint8_t *>(d);
            if (dalloc(h, &d, P * nm_cuda_q8_row_bytes(ff_max), "quantised activations", -1, err)) goto fail;
            h->xq_h = static_cast<uint8_t *>(d);
        }
        /* rows of skipped picks are never read, but keep them defined */
        if (cudaMemsetAsync(h->hg, 0, P * (size_t)ff_max * sizeof(float), st) != cudaSuccess ||
            cudaMemsetAsync(h->hu, 0, P * (size_t)ff_max * sizeof(float), st) != cudaSuccess ||
            cudaStreamSynchronize(st) != cudaSuccess) {
            nm_errf(err, "GPU hot experts: clearing the scratch failed");
            goto fail;
        }
    }
    *out = h;
    return 0;
fail:
    cudaStreamSynchronize(st);
    hot_free(h);
    return -1;
}

void hot_free(hot_experts *h) {
    if (!h) return;
    for (void *p : h->dev) cudaFree(p);
    delete h;
}

int hot_count(const hot_experts *h, int il) { return h ? h->layers[(size_t)il].n : 0; }
int64_t hot_total(const hot_experts *h) { return h ? h->total : 0; }

bool hot_full_layer(const hot_experts *h, int il, const uint8_t **gate, const uint8_t **up, const uint8_t **down) {
    if (!h || h->layers[(size_t)il].n != (int)h->m->hp.n_expert) return false;
    const hot_layer &HL = h->layers[(size_t)il];
    *gate = HL.gate.d, *up = HL.up.d, *down = HL.down.d;
    return true;
}
size_t hot_vram(const hot_experts *h) { return h ? h->vram : 0; }
int64_t hot_max_tok(const hot_experts *h) { return h ? h->max_tok : 0; }

__global__ void k_split(const int32_t *__restrict__ rid, const int32_t *__restrict__ slot, int np,
                        int32_t *__restrict__ mat, int32_t *__restrict__ cid) {
    numoe_pdl::pdl_trigger();
    numoe_pdl::pdl_wait(); /* pdl.cuh: everything here follows the kernel before */
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= np) return;
    const int32_t e = rid[p], s = slot[e];
    mat[p] = s;
    cid[p] = s >= 0 ? -1 - e : e;
}

/* out[t][c] += sum_j w[t*k+j] * y[t*k+j][c] over resident picks, each
 * product and sum rounded on its own (no FMA contraction) */
__global__ void k_combine(const int32_t *__restrict__ mat, const float *__restrict__ w, const float *__restrict__ y,
                          int k, int64_t H, float *__restrict__ out) {
    numoe_pdl::pdl_trigger();
    numoe_pdl::pdl_wait(); /* pdl.cuh: everything here follows the kernel before */
    const int64_t t = blockIdx.y, c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= H) return;
    float acc = 0.0f;
    bool any = false;
    for (int j = 0; j < k; j++) {
        const int64_t p = t * k + j;
        if (mat[p] < 0) continue;
        acc = __fadd_rn(acc, __fmul_rn(w[p], y[p * H + c]));
        any = true;
    }
    if (any) out[t * H + c] = __fadd_rn(out[t * H + c], acc);
}

int hot_split(hot_experts *h, int il, const int32_t *rid, int64_t n, int32_t *cid, nm_err *err) {
    const hot_layer *HL = &h->layers[(size_t)il];
    if (n > h->max_tok) return nm_errf(err, "GPU hot experts: layer %d: %lld tokens, more than %lld", il, (long long)n,
                                       (long long)h->max_tok);
    const int np = (int)(n * h->k);
    (void)numoe_pdl::launch(k_split, dim3((np + 127) / 128), dim3(128), 0, h->st, rid, HL->slot, np, h->mat, cid);
    CUDA_OK(cudaGetLastError(), "layer %d: splitting the picks", il);
    return 0;
}

/* y + p * ldy = S_{mat[p]} x_{p / x_div} for the stack S: the integer GEMV
 * over xq (the q8 rows of x, quantised by the caller) where S takes it,
 * else the fp32-activation one. */
static int stack_pairs(hot_experts *h, const hot_stack *S, const float *x, int64_t ldx, const uint8_t *xq, int64_t P,
                       int x_div, float *y, int64_t ldy) {
    if (S->q8)
        return nm_cuda_gemv_q8_pairs(S->type, S->d, S->slab, S->rows, S->cols, h->mat, P, xq, x_div, y, ldy, h->st);
    return nm_cuda_gemv_pairs(S->type, S->d, S->slab, S->rows, S->cols, h->mat, P, x, ldx, x_div, y, ldy, h->st);
}

int hot_compute(hot_experts *h, int il, const float *a, int64_t n, const float *w, float *out, nm_err *err) {
    const hot_layer *HL = &h->layers[(size_t)il];
    const int64_t H = h->m->hp.n_embd, P = n * h->k, ff = HL->gate.rows;
    if ((HL->gate.q8 || HL->up.q8) && nm_cuda_quantize_q8(a, H, n, H, h->xq_a, h->st) != NM_CUDA_OK)
        return nm_errf(err, "GPU hot experts: layer %d: quantising the input: %s", il, nm_cuda_last_error());
    if (stack_pairs(h, &HL->gate, a, H, h->xq_a, P, h->k, h->hg, ff) != NM_CUDA_OK ||
        stack_pairs(h, &HL->up, a, H, h->xq_a, P, h->k, h->hu, ff) != NM_CUDA_OK)
        return nm_errf(err, "GPU hot experts: layer %d: gate/up: %s", il, nm_cuda_last_error());
    CUDA_OK(silu_mul(h->st, h->hg, h->hu, P * ff), "layer %d: silu", il);
    if (HL->down.q8 && nm_cuda_quantize_q8(h->hg, ff, P, ff, h->xq_h, h->st) != NM_CUDA_OK)
        return nm_errf(err, "GPU hot experts: layer %d: quantising the activations: %s", il, nm_cuda_last_error());
    if (stack_pairs(h, &HL->down, h->hg, ff, h->xq_h, P, 1, h->y, H) != NM_CUDA_OK)
        return nm_errf(err, "GPU hot experts: layer %d: down: %s", il, nm_cuda_last_error());
    const dim3 g((unsigned)((H + 255) / 256), (unsigned)n);
    (void)numoe_pdl::launch(k_combine, dim3(g), dim3(256), 0, h->st, h->mat, w, h->y, h->k, H, out);
    CUDA_OK(cudaGetLastError(), "layer %d: adding the resident experts", il);
    return 0;
}

} /* namespace numoe_gpu */
