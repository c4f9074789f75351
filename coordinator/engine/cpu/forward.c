/* forward.c - one batch of tokens through the model. The math is
 * docs/MODEL.md §3 (= HF modeling_deepseek): names below are the paper's.
 *
 *   a      = RMSNorm(x)                        c_KV = RMSNorm(W_DKV a)   k_pe = RoPE(W_KR a)
 *   q      = W_UQ RMSNorm(W_DQ a)  (or W_Q a)  q_nope | q_pe = split per head, q_pe = RoPE(q_pe)
 *   absorbed MLA: q_abs = W_UK^T q_nope (per head, kv_lora wide), so
 *   score(t,u) = kq_scale * (q_abs . c_KV[u] + q_pe . k_pe[u]),  o_c = sum_u softmax . c_KV[u],
 *   o = W_UV o_c per head,  x += W_O o
 *   x += FFN(RMSNorm(x)) with FFN dense, or routed MoE + shared experts.
 * The cache holds only c_KV and k_pe; the same absorbed path serves prefill
 * (matrix-matrix over the batch) and decode. */
#include "coordinator/engine/cpu/forward.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "coordinator/engine/router.h"
#include "kernels/quant.h"
#include "kernels/scores.h"
#include "kernels/wsum.h"

/* Heads per attention work unit: they share each cache row while it is in
 * L1 (scores) and their outputs are one weighted sum over the rows
 * (kernels/wsum.h); small enough that a decode token still makes
 * n_head / ATT_HEADS units for the threads. */
#define ATT_HEADS 4
/* Tokens per decompressed work unit (they share each K / V row while it is
 * in L1; at most ATT_HEADS, whose score rows they use), and the shortest
 * run that may take that form under NM_ATTN_AUTO. */
#define ATT_TOKS 4
#define ATT_DEC_MIN 16
_Static_assert(ATT_TOKS <= ATT_HEADS && ATT_TOKS <= NM_WSUM_MAX_V && ATT_TOKS == NM_SCORES_Q,
               "a decompressed unit's tokens use a thread's ATT_HEADS score rows, one weighted sum and the "
               "query rows of one score block");

/* Y[t][0..W->rows) = W_e X[t] for t < n; X rows are W->cols wide (contiguous),
 * Y rows are y_stride apart. e selects a matrix of a stack (heads of k_b / v_b). */
static void mm(nm_forward *f, const nm_mat *W, int64_t e, const float *X, int64_t n, float *Y, int64_t y_stride) {
    nm_matmul(&f->mm, f->pool, W->type, nm_mat_row(W, e, 0), W->rows, W->cols, X, W->cols, n, Y, y_stride);
}

static void rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

static float silu(float v) { return v / (1.0f + expf(-v)); }

int nm_forward_init(nm_forward *f, const nm_model *m, nm_pool *pool, nm_expert_backend *experts, int64_t n_ctx,
                    int64_t n_batch, int n_expert_used, nm_err *err) {
    const nm_hparams *hp = &m->hp;
    memset(f, 0, sizeof *f);
    f->m = m, f->pool = pool, f->experts = experts;
    f->n_batch = n_batch < 1 ? 1 : n_batch;
    nm_matmul_ctx_init(&f->mm);
    /* the dense matrices on the VNNI tiles where their type has them
     * (kernels/matmul.h ctx->tiles): packing per call is amortised over the
     * batch's tokens at prefill, and decode takes the tile GEMV so a token's
     * bits do not depend on the batch it came in */
    f->mm.tiles = 1;
    f->n_expert_used = n_expert_used > 0 ? n_expert_used : (int)hp->n_expert_used;
    if (f->n_expert_used > hp->n_expert)
        return nm_errf(err, "--experts-used %d exceeds the model's %lld experts", f->n_expert_used,
                       (long long)hp->n_expert);
    if (n_ctx < 1) return nm_errf(err, "context size must be positive");
    if (experts->in.max_tok < f->n_batch || experts->in.max_k < f->n_expert_used || experts->in.n_embd != hp->n_embd)
        return nm_errf(err, "the expert backend takes %lld tokens of %d experts per layer, the engine's batch is %lld "
                       "tokens of %d", (long long)experts->in.max_tok, experts->in.max_k, (long long)f->n_batch,
                       f->n_expert_used);
    int64_t T = f->n_batch, H = hp->n_embd, nh = hp->n_head, dk = hp->d_nope + hp->d_rope;
    int64_t ffw = hp->n_ff > hp->n_ff_exp * hp->n_shared ? hp->n_ff : hp->n_ff_exp * hp->n_shared;
    int nth = nm_pool_size(pool);
    f->n_ctx = n_ctx;
    int64_t width = hp->kv_lora + hp->d_rope;
    struct { float **p; int64_t n; } parts[] = {
        {&f->x, T * H}, {&f->a, T * H}, {&f->q, T * nh * dk}, {&f->qa, T * (hp->q_lora > 0 ? hp->q_lora : 1)},
        {&f->kv_new, T * width}, {&f->gath, T * (hp->kv_lora > dk ? hp->kv_lora : dk)},
        {&f->qabs, T * nh * (hp->kv_lora + hp->d_rope)}, {&f->oc, T * nh * hp->kv_lora},
        {&f->o, T * nh * hp->d_v}, {&f->tmp, T * H}, {&f->hg, T * ffw}, {&f->hu, T * ffw},
        {&f->rlog, T * hp->n_expert + 2 * hp->n_expert}, {&f->moe, T * H},
        {&f->att, (int64_t)nth * ATT_HEADS * n_ctx},
    };
    /* every part takes a multiple of 16 floats (64 bytes), so each starts as
     * aligned as malloc's buffer: an odd-sized part before them left the
     * pointer and int64 arrays misaligned (UBSan, e.g. n_ctx 14) */
#define NM_SCRATCH_FLOATS(n) ((((size_t)(n)) + 16 + 15) & ~(size_t)15)
    size_t total = 0;
    for (size_t i = 0; i < sizeof parts / sizeof *parts; i++) total += NM_SCRATCH_FLOATS(parts[i].n);
    total += 2 * NM_SCRATCH_FLOATS(2 * T) + NM_SCRATCH_FLOATS(T); /* tkv (pointers), tpos (int64), tok (int32) */
    if (!(f->buf = malloc(total * sizeof(float)))) {
        nm_forward_free(f);
        return nm_errf(err, "cannot allocate %zu MB of scratch for batches of %lld", total * 4 >> 20, (long long)T);
    }
    float *cur = f->buf;
    for (size_t i = 0; i < sizeof parts / sizeof *parts; i++) *parts[i].p = cur, cur += NM_SCRATCH_FLOATS(parts[i].n);
    f->tkv = (nm_kv_cache **)cur;
    cur += NM_SCRATCH_FLOATS(2 * T);
    f->tpos = (int64_t *)cur;
    cur += NM_SCRATCH_FLOATS(2 * T);
    f->tok = (int32_t *)cur;
#undef NM_SCRATCH_FLOATS
    /* the decompressed attention's room, touched only when a run takes it:
     * K | V rows of as many heads as fit 64 MiB at the longest context */
    const int64_t w = dk + hp->d_v;
    f->dec_heads = ((int64_t)64 << 20) / ((int64_t)sizeof(float) * n_ctx * w);
    f->dec_heads = f->dec_heads < 1 ? 1 : f->dec_heads > nh ? nh : f->dec_heads;
    f->kbt = malloc((size_t)(nh * hp->d_nope * hp->kv_lora) * sizeof *f->kbt);
    f->kvd = malloc((size_t)(f->dec_heads * n_ctx * w) * sizeof *f->kvd);
    f->abs_t = malloc((size_t)T * sizeof *f->abs_t);
    if (!f->kbt || !f->kvd || !f->abs_t) {
        nm_forward_free(f);
        return nm_errf(err, "cannot allocate %lld MB for the decompressed attention at context %lld",
                       (long long)((nh * hp->d_nope * hp->kv_lora + f->dec_heads * n_ctx * w) * 4 >> 20),
                       (long long)n_ctx);
    }
    if (nm_rope_init(&f->rope, (int)hp->d_rope, hp->rope_base, hp->rope_freq_scale, hp->yarn_ext_factor,
                     hp->rope_n_ctx_orig)) {
        nm_forward_free(f);
        return nm_errf(err, "out of memory");
    }
    return 0;
}

void nm_forward_free(nm_forward *f) {
    free(f->buf);
    free(f->lbuf);
    free(f->kbt);
    free(f->kvd);
    free(f->abs_t);
    nm_rope_free(&f->rope);
    nm_matmul_ctx_free(&f->mm);
    memset(f, 0, sizeof *f);
}

/* s[0..n) = softmax of the scores s[0..n), whose largest is mx: both
 * attention forms' weights, summed in ascending position. */
static void softmax_scores(float *s, int64_t n, float mx) {
    float sum = 0;
    for (int64_t p = 0; p < n; p++) sum += s[p] = expf(s[p] - mx);
    for (int64_t p = 0; p < n; p++) s[p] = s[p] / sum;
}

/* Attention scores and the latent-space output for every (absorbed token,
 * head): work split over tokens x groups of heads; each thread has its own
 * score rows. Token i of the unit list is f->abs_t[i]; its q_abs and o_c
 * rows are at index i (compacted). */
typedef struct {
    nm_forward *f;
    int layer;
    int64_t n;
    atomic_long next;
} attn_job;

static void attn_task(void *ctx, int ith, int nth) {
    attn_job *j = ctx;
    nm_forward *f = j->f;
    const nm_hparams *hp = &f->m->hp;
    int64_t nh = hp->n_head, kr = hp->kv_lora, W = hp->kv_lora + hp->d_rope;
    const int64_t n_groups = (nh + ATT_HEADS - 1) / ATT_HEADS;
    /* the query [q_abs | q_pe] and a cache row [c | k_pe] line up, so a score
     * is one float dot of width kv_lora + d_rope (the SIMD F32 kernel) */
    nm_vec_dot_fn dot = nm_vec_dot(NM_TYPE_F32);
    nm_wsum_fn wsum = nm_wsum();
    float *s = f->att + (size_t)ith * ATT_HEADS * (size_t)f->n_ctx; /* [ATT_HEADS][n_ctx] */
    (void)nth;
    for (;;) {
        int64_t u = atomic_fetch_add(&j->next, 1);
        if (u >= j->n * n_groups) break;
        int64_t i = u / n_groups, t = f->abs_t[i], h0 = (u % n_groups) * ATT_HEADS, last = f->tpos[t];
        const int hn = (int)(nh - h0 < ATT_HEADS ? nh - h0 : ATT_HEADS);
        const nm_kv_cache *kv = f->tkv[t];
        float mx[ATT_HEADS];
        for (int g = 0; g < hn; g++) mx[g] = -INFINITY;
        for (int64_t p = 0; p <= last; p++) {
            const float *row = nm_kv_row(kv, j->layer, p);
            for (int g = 0; g < hn; g++) {
                float v = dot(W, row, f->qabs + (i * nh + h0 + g) * W) * hp->kq_scale;
                s[(size_t)g * f->n_ctx + p] = v;
                mx[g] = v > mx[g] ? v : mx[g];
            }
        }
        for (int g = 0; g < hn; g++) softmax_scores(s + (size_t)g * f->n_ctx, last + 1, mx[g]);
        /* o_c[t][h] = sum_p softmax_p * c_p: the hn heads at once over the rows */
        wsum(last + 1, hn, s, f->n_ctx, nm_kv_row(kv, j->layer, 0), W, kr, f->oc + (i * nh + h0) * kr, kr);
    }
}

/* The absorbed form (docs/MODEL.md §5.1) for the n_abs tokens f->abs_t[..]:
 * q_abs = k_b q_nope per head, the scores and o_c over the latent cache,
 * o = v_b o_c into the tokens' rows of f->o. */
static void attention_absorbed(nm_forward *f, int il, int64_t n_abs) {
    const nm_hparams *hp = &f->m->hp;
    const nm_layer *L = &f->m->layers[il];
    int64_t nh = hp->n_head, dn = hp->d_nope, dr = hp->d_rope, dk = dn + dr, kr = hp->kv_lora, W = kr + dr;
    /* q_abs[i][h] = k_b[h] q_nope[t][h]: one matrix-matrix product per head, written
     * into [q_abs | q_pe] rows of the cache's width */
    for (int64_t h = 0; h < nh; h++) {
        for (int64_t i = 0; i < n_abs; i++) {
            const float *qt = f->q + f->abs_t[i] * nh * dk + h * dk;
            memcpy(f->gath + i * dn, qt, (size_t)dn * 4);
            memcpy(f->qabs + (i * nh + h) * W + kr, qt + dn, (size_t)dr * 4);
        }
        mm(f, &L->k_b, h, f->gath, n_abs, f->qabs + h * W, nh * W);
    }
    attn_job j = {.f = f, .layer = il, .n = n_abs}; /* units: (token, group of ATT_HEADS heads) */
    atomic_init(&j.next, 0);
    nm_pool_run(f->pool, attn_task, &j);
    /* o[t][h] = v_b[h] o_c[i][h], through q_abs's room (free now) for the compacted rows */
    float *oh = f->qabs;
    for (int64_t h = 0; h < nh; h++) {
        for (int64_t i = 0; i < n_abs; i++) memcpy(f->gath + i * kr, f->oc + (i * nh + h) * kr, (size_t)kr * 4);
        mm(f, &L->v_b, h, f->gath, n_abs, oh + h * hp->d_v, nh * hp->d_v);
    }
    for (int64_t i = 0; i < n_abs; i++)
        memcpy(f->o + f->abs_t[i] * nh * hp->d_v, oh + i * nh * hp->d_v, (size_t)(nh * hp->d_v) * 4);
}

/* Which form a run of n tokens of one sequence ending at position last takes
 * (NM_ATTN_AUTO): the one with fewer multiply-adds. Both pay n_head (d_nope +
 * d_v) kv_lora per row they project - the absorbed form per new token (W_UK^T
 * q_nope and W_UV o_c), the decompressed form per position of the context (K
 * and V) - and per (token, position) pair and head a dot plus a weighted sum,
 * of kv_lora + d_rope and kv_lora wide absorbed, d_nope + d_rope and d_v wide
 * decompressed (V2/V3: 576 + 512 against 192 + 128). A prompt decompresses,
 * a decode token or a short chunk after a long past stays absorbed. The
 * choice depends on the run alone, so a sequence gets the same numbers in a
 * batch as alone. */
static int attn_decompress(const nm_forward *f, int64_t n, int64_t last) {
    const nm_hparams *hp = &f->m->hp;
    if (f->attn_mode != NM_ATTN_AUTO) return f->attn_mode == NM_ATTN_DECOMPRESSED;
    if (n < ATT_DEC_MIN) return 0;
    double pairs = (double)n * (double)(last + 1) - (double)n * (double)(n - 1) / 2; /* sum over the run of pos+1 */
    double proj = (double)hp->n_head * (double)(hp->d_nope + hp->d_v) * (double)hp->kv_lora;
    double absorbed = (double)n * proj + pairs * (double)hp->n_head * (double)(2 * hp->kv_lora + hp->d_rope);
    double decomp = (double)(last + 1) * proj + pairs * (double)hp->n_head * (double)(hp->d_nope + hp->d_rope + hp->d_v);
    return decomp < absorbed;
}

/* The decompressed attention of one run, heads [h0, h0 + hn) of the chunk in
 * f->kvd: units are (head, group of ATT_TOKS tokens); a token's scores over
 * its positions, softmax, and o = sum_p softmax_p V_p straight into f->o. */
typedef struct {
    nm_forward *f;
    int64_t t0, n, h0, hn; /* the run's first batch index, its tokens; the chunk's heads */
    atomic_long next;
} dec_job;

static void dec_task(void *ctx, int ith, int nth) {
    dec_job *j = ctx;
    nm_forward *f = j->f;
    const nm_hparams *hp = &f->m->hp;
    const int64_t nh = hp->n_head, dk = hp->d_nope + hp->d_rope, dv = hp->d_v, w = dk + dv;
    const int64_t n_groups = (j->n + ATT_TOKS - 1) / ATT_TOKS;
    nm_scores_fn scores = nm_scores();
    nm_wsum_fn wsum = nm_wsum();
    float *s = f->att + (size_t)ith * ATT_HEADS * (size_t)f->n_ctx; /* [ATT_TOKS][n_ctx] */
    (void)nth;
    for (;;) {
        int64_t u = atomic_fetch_add(&j->next, 1);
        if (u >= j->hn * n_groups) break;
        int64_t hh = u / n_groups, t = j->t0 + (u % n_groups) * ATT_TOKS, h = j->h0 + hh;
        const int tn = (int)(j->t0 + j->n - t < ATT_TOKS ? j->t0 + j->n - t : ATT_TOKS);
        const float *kvh = f->kvd + (size_t)hh * (size_t)f->n_ctx * (size_t)w; /* [p][K | V] */
        const int64_t top = f->tpos[t + tn - 1];                             /* the group's last position */
        /* every token of the group against every position up to the group's
         * last, 4 x 4 at a time (kernels/scores.h); a short group or the last
         * block repeats a row, whose scores are dropped: a score does not
         * depend on the rows beside it, so a token gets the same numbers in
         * any group */
        const float *qg[NM_SCORES_Q]; /* [q_nope | q_pe] lines up with K */
        for (int g = 0; g < NM_SCORES_Q; g++) qg[g] = f->q + (t + (g < tn ? g : tn - 1)) * nh * dk + h * dk;
        for (int64_t p0 = 0; p0 <= top; p0 += NM_SCORES_K) {
            const float *kp[NM_SCORES_K];
            float o[NM_SCORES_Q * NM_SCORES_K];
            const int np = top - p0 + 1 < NM_SCORES_K ? (int)(top - p0 + 1) : NM_SCORES_K;
            for (int i = 0; i < NM_SCORES_K; i++) kp[i] = kvh + (p0 + (i < np ? i : np - 1)) * w;
            scores(dk, qg, kp, o);
            for (int g = 0; g < tn; g++)
                for (int i = 0; i < np; i++) s[(size_t)g * f->n_ctx + p0 + i] = o[g * NM_SCORES_K + i] * hp->kq_scale;
        }
        for (int g = 0; g < tn; g++) {
            float *sg = s + (size_t)g * f->n_ctx, mx = -INFINITY;
            const int64_t last = f->tpos[t + g];
            for (int64_t p = 0; p <= last; p++) mx = sg[p] > mx ? sg[p] : mx;
            softmax_scores(sg, last + 1, mx);
            for (int64_t p = last + 1; p <= top; p++) sg[p] = 0; /* causal: later rows weigh nothing */
        }
        wsum(top + 1, tn, s, f->n_ctx, kvh + dk, w, dv, f->o + t * nh * dv + h * dv, nh * dv);
    }
}

/* K_nope = W_UK c for every position p < P of the latent cache C (rows ldc
 * apart) and heads [h0, h0 + hn), into f->kvd: kvh[p][n] = kbt[h][n] . C[p].
 * Units are (head, KEXP_POS positions); inside, 4 positions x 4 rows of
 * W_UK at a time through the score block (kernels/scores.h), whose number
 * per pair does not depend on the block, so a position's K is the same
 * whatever the pass's length. */
#define KEXP_POS 16
typedef struct {
    nm_forward *f;
    const float *C;
    int64_t ldc, P, h0, hn;
    atomic_long next;
} kexp_job;

static void kexp_task(void *ctx, int ith, int nth) {
    kexp_job *j = ctx;
    nm_forward *f = j->f;
    const nm_hparams *hp = &f->m->hp;
    const int64_t dn = hp->d_nope, kr = hp->kv_lora, w = hp->d_nope + hp->d_rope + hp->d_v;
    const int64_t blocks = (j->P + KEXP_POS - 1) / KEXP_POS;
    nm_scores_fn scores = nm_scores();
    (void)ith, (void)nth;
    for (;;) {
        int64_t u = atomic_fetch_add(&j->next, 1);
        if (u >= j->hn * blocks) break;
        const int64_t hh = u / blocks, pb = (u % blocks) * KEXP_POS;
        const int64_t pe = pb + KEXP_POS < j->P ? pb + KEXP_POS : j->P;
        const float *kb = f->kbt + (j->h0 + hh) * dn * kr;
        float *kvh = f->kvd + (size_t)hh * (size_t)f->n_ctx * (size_t)w;
        for (int64_t p0 = pb; p0 < pe; p0 += NM_SCORES_Q) {
            const int np = pe - p0 < NM_SCORES_Q ? (int)(pe - p0) : NM_SCORES_Q;
            const float *cp[NM_SCORES_Q];
            for (int g = 0; g < NM_SCORES_Q; g++) cp[g] = j->C + (p0 + (g < np ? g : np - 1)) * j->ldc;
            for (int64_t n0 = 0; n0 < dn; n0 += NM_SCORES_K) {
                const int nn = dn - n0 < NM_SCORES_K ? (int)(dn - n0) : NM_SCORES_K;
                const float *wr[NM_SCORES_K];
                float o[NM_SCORES_Q * NM_SCORES_K];
                for (int i = 0; i < NM_SCORES_K; i++) wr[i] = kb + (n0 + (i < nn ? i : nn - 1)) * kr;
                scores(kr, cp, wr, o);
                for (int g = 0; g < np; g++)
                    for (int i = 0; i < nn; i++) kvh[(p0 + g) * w + n0 + i] = o[g * NM_SCORES_K + i];
            }
        }
    }
}

/* The decompressed form for the run of n tokens at batch index t0 (one
 * sequence, consecutive positions): per chunk of heads, K = [W_UK c | k_pe]
 * and V = W_UV c for every position of the context from the latent cache
 * (k_b transposed once per layer into f->kbt), then dec_task. */
static int attention_run(nm_forward *f, int il, int64_t t0, int64_t n, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const nm_layer *L = &f->m->layers[il];
    const int64_t nh = hp->n_head, dn = hp->d_nope, dr = hp->d_rope, dk = dn + dr, dv = hp->d_v, kr = hp->kv_lora;
    const int64_t w = dk + dv, P = f->tpos[t0 + n - 1] + 1;
    const nm_kv_cache *kv = f->tkv[t0];
    const float *C = nm_kv_row(kv, il, 0);
    const int64_t ldc = kr + dr;
    nm_act cq;
    if (nm_act_prepare(&f->mm, f->pool, L->v_b.type, C, ldc, P, kr, &cq))
        return nm_errf(err, "layer %d: cannot convert the latent cache for the decompressed attention", il);
    for (int64_t h0 = 0; h0 < nh; h0 += f->dec_heads) {
        const int64_t hn = nh - h0 < f->dec_heads ? nh - h0 : f->dec_heads;
        kexp_job kj = {.f = f, .C = C, .ldc = ldc, .P = P, .h0 = h0, .hn = hn};
        atomic_init(&kj.next, 0);
        nm_pool_run(f->pool, kexp_task, &kj);
        for (int64_t hh = 0; hh < hn; hh++) {
            float *kvh = f->kvd + (size_t)hh * (size_t)f->n_ctx * (size_t)w;
            if (nm_matmul_act(&f->mm, f->pool, L->v_b.type, nm_mat_row(&L->v_b, h0 + hh, 0), dv, &cq, NULL, P,
                              kvh + dk, w))
                return nm_errf(err, "layer %d head %lld: the decompressed V product failed", il,
                               (long long)(h0 + hh));
            for (int64_t p = 0; p < P; p++) memcpy(kvh + p * w + dn, C + p * ldc + kr, (size_t)dr * 4);
        }
        dec_job j = {.f = f, .t0 = t0, .n = n, .h0 = h0, .hn = hn};
        atomic_init(&j.next, 0);
        nm_pool_run(f->pool, dec_task, &j);
    }
    return 0;
}

/* kbt[h][n][c] = k_b[h][c][n] as floats: W_UK itself, the rows a key's
 * d_nope values are dots with. Redone per layer of each pass that
 * decompresses (n_head kv_lora d_nope values, against the n_head (d_nope +
 * d_v) kv_lora multiply-adds per context position that pass spends):
 * kept for every layer it would be 2 GiB of f32 on V3. */
static int transpose_k_b(nm_forward *f, int il, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const nm_mat *kb = &f->m->layers[il].k_b;
    const int64_t dn = hp->d_nope, kr = hp->kv_lora;
    float *row = f->gath; /* d_nope floats of room (T >= 1 rows of max(kv_lora, dk)) */
    for (int64_t h = 0; h < hp->n_head; h++)
        for (int64_t c = 0; c < kr; c++) {
            if (nm_dequantize_row(kb->type, nm_mat_row(kb, h, c), row, dn))
                return nm_errf(err, "layer %d: %s has no dequantiser for the decompressed attention", il, kb->name);
            for (int64_t k = 0; k < dn; k++) f->kbt[(h * dn + k) * kr + c] = row[k];
        }
    return 0;
}

static int attention(nm_forward *f, int il, int64_t n, nm_err *err) {
    const nm_model *m = f->m;
    const nm_hparams *hp = &m->hp;
    const nm_layer *L = &m->layers[il];
    int64_t H = hp->n_embd, nh = hp->n_head, dn = hp->d_nope, dr = hp->d_rope, dk = dn + dr, kr = hp->kv_lora;
    int64_t W = kr + dr;
    for (int64_t t = 0; t < n; t++) rmsnorm(f->a + t * H, f->x + t * H, L->attn_norm, H, hp->rms_eps);
    if (L->q.data) {
        mm(f, &L->q, 0, f->a, n, f->q, nh * dk);
    } else {
        mm(f, &L->q_a, 0, f->a, n, f->qa, hp->q_lora);
        for (int64_t t = 0; t < n; t++)
            rmsnorm(f->qa + t * hp->q_lora, f->qa + t * hp->q_lora, L->q_a_norm, hp->q_lora, hp->rms_eps);
        mm(f, &L->q_b, 0, f->qa, n, f->q, nh * dk);
    }
    mm(f, &L->kv_a, 0, f->a, n, f->kv_new, W);
    for (int64_t t = 0; t < n; t++) {
        int64_t pos = f->tpos[t];
        float *row = nm_kv_row(f->tkv[t], il, pos), *src = f->kv_new + t * W;
        rmsnorm(row, src, L->kv_a_norm, kr, hp->rms_eps);
        memcpy(row + kr, src + kr, (size_t)dr * sizeof *row);
        nm_rope_apply(&f->rope, row + kr, pos);
        for (int64_t h = 0; h < nh; h++) nm_rope_apply(&f->rope, f->q + t * nh * dk + h * dk + dn, pos);
    }
    /* runs: the batch's tokens of one sequence at consecutive positions (a
     * segment); each takes the decompressed or the absorbed form */
    int64_t n_abs = 0;
    int kbt_done = 0;
    for (int64_t t0 = 0, r; t0 < n; t0 += r) {
        for (r = 1; t0 + r < n && f->tkv[t0 + r] == f->tkv[t0] && f->tpos[t0 + r] == f->tpos[t0] + r; r++) {}
        if (!attn_decompress(f, r, f->tpos[t0 + r - 1])) {
            for (int64_t k = 0; k < r; k++) f->abs_t[n_abs++] = t0 + k;
            continue;
        }
        if (!kbt_done && transpose_k_b(f, il, err)) return -1;
        kbt_done = 1;
        if (attention_run(f, il, t0, r, err)) return -1;
    }
    if (n_abs) attention_absorbed(f, il, n_abs);
    mm(f, &L->out, 0, f->o, n, f->tmp, H);
    for (int64_t i = 0; i < n * H; i++) f->x[i] += f->tmp[i];
    return 0;
}

/* down(silu(gate a) * up a) into out for the n rows of a; ff = the
 * matrices' hidden width */
static void ffn(nm_forward *f, const nm_mat *g, const nm_mat *u, const nm_mat *d, const float *a, int64_t n,
                float *out) {
    int64_t ff = g->rows;
    mm(f, g, 0, a, n, f->hg, ff);
    mm(f, u, 0, a, n, f->hu, ff);
    for (int64_t i = 0; i < n * ff; i++) f->hg[i] = silu(f->hg[i]) * f->hu[i];
    mm(f, d, 0, f->hg, n, out, d->rows);
}

static int timed_wait(nm_forward *f, nm_err *err) {
    double t0 = nm_now_s();
    int rc = nm_experts_wait(f->experts, f->moe, err);
    f->expert_wait_s += nm_now_s() - t0;
    return rc;
}

/* Dense layers: x += FFN(RMSNorm(x)). MoE layers: the normalised rows go
 * straight into the expert backend's input region, the router writes each
 * token's experts and weights there too, the routed experts are submitted,
 * the shared experts run while they are computed elsewhere, and only then
 * does the layer wait for them: x += shared + routed (in that order, as
 * before the split, so the sums are the same bits). */
static int feed_forward(nm_forward *f, int il, int64_t n, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    const nm_layer *L = &f->m->layers[il];
    int64_t H = hp->n_embd, E = hp->n_expert;
    if (!L->is_moe) {
        for (int64_t t = 0; t < n; t++) rmsnorm(f->a + t * H, f->x + t * H, L->ffn_norm, H, hp->rms_eps);
        ffn(f, &L->gate, &L->up, &L->down, f->a, n, f->tmp);
        for (int64_t i = 0; i < n * H; i++) f->x[i] += f->tmp[i];
        return 0;
    }
    nm_expert_input *in = &f->experts->in;
    float *a = in->x;
    int k = f->n_expert_used;
    int32_t *rid = in->ids;
    for (int64_t t = 0; t < n; t++) rmsnorm(a + t * H, f->x + t * H, L->ffn_norm, H, hp->rms_eps);
    mm(f, &L->gate_inp, 0, a, n, f->rlog, E);
    float *scratch = f->rlog + n * E;
    for (int64_t t = 0; t < n; t++) nm_route(hp, k, f->rlog + t * E, L->probs_b, rid + t * k, in->w + t * k, scratch);
    if (f->route_log)
        for (int64_t t = 0; t < n; t++) {
            int32_t head[2] = {(int32_t)f->tpos[t], il};
            if (fwrite(head, sizeof head, 1, f->route_log) != 1 ||
                fwrite(rid + t * k, sizeof *rid, (size_t)k, f->route_log) != (size_t)k)
                return nm_errf(err, "writing the routing log failed");
        }
    if (nm_experts_submit(f->experts, il, n, k, err)) return -1;
    /* the waiting is the only thing that can fail from here: after a submit
     * the backend gets its wait whatever happens */
    int rc = f->sync_experts ? timed_wait(f, err) : 0;
    if (hp->n_shared > 0) ffn(f, &L->gate_sh, &L->up_sh, &L->down_sh, a, n, f->tmp);
    if (!f->sync_experts) rc = timed_wait(f, err);
    if (rc) return -1;
    if (hp->n_shared > 0)
        for (int64_t i = 0; i < n * H; i++) f->x[i] += f->tmp[i];
    for (int64_t i = 0; i < n * H; i++) f->x[i] += f->moe[i];
    return 0;
}

/* The n tokens in f->tok, at the caches and positions of f->tkv / f->tpos,
 * through every layer. Caches are not advanced here. */
static int run_layers(nm_forward *f, int64_t n, nm_err *err) {
    const nm_model *m = f->m;
    const nm_hparams *hp = &m->hp;
    int64_t H = hp->n_embd;
    for (int64_t t = 0; t < n; t++)
        nm_dequantize_row(m->tok_embd.type, nm_mat_row(&m->tok_embd, 0, f->tok[t]), f->x + t * H, H);
    for (int il = 0; il < hp->n_layer; il++) {
        if (attention(f, il, n, err)) return -1;
        if (feed_forward(f, il, n, err)) return -1;
    }
    return 0;
}

/* Final norm and output head for rows[0..n_rows) of x into dst (n_rows x n_vocab). */
static void head(nm_forward *f, const int64_t *rows, int64_t n_rows, float *dst) {
    const nm_model *m = f->m;
    int64_t H = m->hp.n_embd;
    for (int64_t i = 0; i < n_rows; i++) rmsnorm(f->a + i * H, f->x + rows[i] * H, m->out_norm, H, m->hp.rms_eps);
    mm(f, &m->output, 0, f->a, n_rows, dst, m->hp.n_vocab);
}

static int check_tokens(const nm_forward *f, const int32_t *tokens, int64_t n, nm_err *err) {
    for (int64_t t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= f->m->hp.n_vocab)
            return nm_errf(err, "token id %d at input position %lld is outside the vocabulary (0..%lld)", tokens[t],
                           (long long)t, (long long)f->m->hp.n_vocab - 1);
    return 0;
}

int nm_forward_batch(nm_forward *f, nm_forward_seq *seqs, int n_seqs, nm_err *err) {
    const nm_hparams *hp = &f->m->hp;
    int64_t n = 0, n_out = 0;
    for (int i = 0; i < n_seqs; i++) {
        nm_forward_seq *q = &seqs[i];
        q->logits = NULL;
        if (q->n < 1) return nm_errf(err, "batch segment %d has no tokens", i);
        if (q->rows != 0 && q->rows != 1 && q->rows != q->n)
            return nm_errf(err, "batch segment %d: %lld rows of logits for %lld tokens", i, (long long)q->rows,
                           (long long)q->n);
        if (q->kv->n_ctx > f->n_ctx || q->kv->width != hp->kv_lora + hp->d_rope || q->kv->n_layer != hp->n_layer)
            return nm_errf(err, "batch segment %d: its cache does not fit this model / context", i);
        if (q->kv->n_pos + q->n > q->kv->n_ctx)
            return nm_errf(err, "batch segment %d: %lld cached + %lld new tokens exceed its context %lld", i,
                           (long long)q->kv->n_pos, (long long)q->n, (long long)q->kv->n_ctx);
        if (check_tokens(f, q->tokens, q->n, err)) return nm_err_prefix(err, "batch segment %d", i);
        n += q->n;
        n_out += q->rows;
    }
    if (n < 1) return nm_errf(err, "no tokens to evaluate");
    if (n > f->n_batch)
        return nm_errf(err, "a batch of %lld tokens exceeds the %lld the state was made for", (long long)n,
                       (long long)f->n_batch);
    if ((size_t)n_out > f->lbuf_rows) {
        float *nb = realloc(f->lbuf, (size_t)n_out * (size_t)hp->n_vocab * sizeof *nb);
        if (!nb) return nm_errf(err, "out of memory for %lld rows of logits", (long long)n_out);
        f->lbuf = nb, f->lbuf_rows = (size_t)n_out;
    }
    int64_t t = 0;
    for (int i = 0; i < n_seqs; i++)
        for (int64_t k = 0; k < seqs[i].n; k++, t++)
            f->tok[t] = seqs[i].tokens[k], f->tkv[t] = seqs[i].kv, f->tpos[t] = seqs[i].kv->n_pos + k;
    if (run_layers(f, n, err)) return -1;
    f->n_steps++, f->n_tokens += (uint64_t)n;
    /* the rows each segment wants (its last token, or all of them); tpos is
     * free now and becomes the row list */
    int64_t r = 0;
    t = 0;
    for (int i = 0; i < n_seqs; i++) {
        seqs[i].kv->n_pos += seqs[i].n;
        for (int64_t k = seqs[i].n - seqs[i].rows; k < seqs[i].n; k++) f->tpos[r++] = t + k;
        t += seqs[i].n;
    }
    if (n_out) head(f, f->tpos, n_out, f->lbuf);
    r = 0;
    for (int i = 0; i < n_seqs; i++)
        if (seqs[i].rows) {
            seqs[i].logits = f->lbuf + (size_t)r * (size_t)hp->n_vocab;
            r += seqs[i].rows;
        }
    return 0;
}
