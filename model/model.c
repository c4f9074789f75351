/* model.c - binds a deepseek2 GGUF to nm_model: hyper-parameters (reference
 * §2.2), tensor names and shapes (§3), the attention layout (§3.3). Every
 * check names the file and the tensor, so a user with a broken or foreign
 * GGUF learns which part is wrong. */
#include "model/model.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/quant.h"

#define ARCH "deepseek2"

static const char *path_of(const nm_gguf *g) { return g->files[0].path; }

static void *own(nm_model *m, size_t bytes) {
    void **o = realloc(m->owned, (size_t)(m->n_owned + 1) * sizeof *o);
    if (!o) return NULL;
    m->owned = o;
    void *p = calloc(1, bytes ? bytes : 1);
    if (p) m->owned[m->n_owned++] = p;
    return p;
}

/* u32 key "deepseek2.<k>"; missing -> def if def >= 0, else an error. */
static int key_i64(const nm_gguf *g, const char *k, int64_t def, int64_t *out, nm_err *err) {
    char key[128];
    snprintf(key, sizeof key, ARCH ".%s", k);
    const nm_gguf_kv *kv = nm_gguf_find(g, key);
    if (kv && kv->type == NM_GGUF_ARRAY && kv->arr_data && kv->arr_n > 0) {
        /* per-layer arrays (e.g. feed_forward_length): DeepSeek uses one value */
        *out = nm_gguf_arr_i64(kv, 0);
        return 0;
    }
    int r = nm_gguf_get_i64(g, key, out, err);
    if (r < 0) return -1;
    if (r == 1) {
        if (def < 0) return nm_errf(err, "%s: required key %s is missing", path_of(g), key);
        *out = def;
    }
    return 0;
}

static int key_f32(const nm_gguf *g, const char *k, float def, float *out, nm_err *err) {
    char key[128];
    snprintf(key, sizeof key, ARCH ".%s", k);
    *out = def;
    return nm_gguf_get_f32(g, key, out, err) < 0 ? -1 : 0;
}

static int read_hparams(nm_hparams *hp, const nm_gguf *g, nm_err *err) {
    nm_str arch;
    if (nm_gguf_get_str(g, "general.architecture", &arch, err) != 0)
        return nm_errf(err, "%s: general.architecture missing or not a string", path_of(g));
    if (!nm_str_eq(arch, ARCH))
        return nm_errf(err, "%s: architecture '%.*s' is not supported (numoe runs " ARCH ": DeepSeek V2/V3/R1)",
                       path_of(g), (int)(arch.len > 64 ? 64 : arch.len), arch.ptr);
    int64_t head_kv, kl = 0, vl = 0, kl_mla = 0, vl_mla = 0, gating, norm = 0;
    if (key_i64(g, "block_count", -1, &hp->n_layer, err) || key_i64(g, "embedding_length", -1, &hp->n_embd, err) ||
        key_i64(g, "context_length", -1, &hp->n_ctx_train, err) ||
        key_i64(g, "attention.head_count", -1, &hp->n_head, err) ||
        key_i64(g, "attention.head_count_kv", hp->n_head, &head_kv, err) ||
        key_i64(g, "attention.q_lora_rank", 0, &hp->q_lora, err) ||
        key_i64(g, "attention.kv_lora_rank", -1, &hp->kv_lora, err) ||
        key_i64(g, "rope.dimension_count", -1, &hp->d_rope, err) ||
        key_i64(g, "attention.key_length", 0, &kl, err) || key_i64(g, "attention.value_length", 0, &vl, err) ||
        key_i64(g, "attention.key_length_mla", 0, &kl_mla, err) ||
        key_i64(g, "attention.value_length_mla", 0, &vl_mla, err) ||
        key_i64(g, "feed_forward_length", 0, &hp->n_ff, err) ||
        key_i64(g, "leading_dense_block_count", 0, &hp->n_dense, err) ||
        key_i64(g, "expert_count", -1, &hp->n_expert, err) ||
        key_i64(g, "expert_used_count", -1, &hp->n_expert_used, err) ||
        key_i64(g, "expert_shared_count", 0, &hp->n_shared, err) ||
        key_i64(g, "expert_feed_forward_length", -1, &hp->n_ff_exp, err) ||
        key_i64(g, "expert_gating_func", NM_GATE_SOFTMAX, &gating, err) ||
        key_i64(g, "expert_group_count", 1, &hp->n_group, err) ||
        key_i64(g, "expert_group_used_count", 1, &hp->n_group_used, err) ||
        key_f32(g, "expert_weights_scale", 1.0f, &hp->routed_scale, err) ||
        key_f32(g, "attention.layer_norm_rms_epsilon", 1e-6f, &hp->rms_eps, err) ||
        key_f32(g, "rope.freq_base", 10000.0f, &hp->rope_base, err))
        return -1;
    char key[128];
    snprintf(key, sizeof key, ARCH ".expert_weights_norm");
    int b = 0;
    if (nm_gguf_get_bool(g, key, &b, err) < 0) return -1;
    norm = b;

    /* mainline MLA files say head_count_kv = 1 and carry the per-head sizes in *_mla keys */
    if (kl_mla && vl_mla) {
        hp->attn_layout = 2;
        kl = kl_mla, vl = vl_mla;
    }
    if (!kl || !vl)
        return nm_errf(err, "%s: attention.key_length / value_length missing", path_of(g));
    hp->d_nope = kl - hp->d_rope;
    hp->d_v = vl;
    hp->gating = (nm_gating)gating;
    hp->norm_topk = (int)norm;
    (void)head_kv;

    if (hp->n_layer < 1 || hp->n_layer > 4096 || hp->n_embd < 1 || hp->n_head < 1 || hp->kv_lora < 1 ||
        hp->d_rope < 2 || hp->d_rope % 2 || hp->d_nope < 1 || hp->d_v < 1 || hp->n_expert < 1 ||
        hp->n_expert_used < 1 || hp->n_expert_used > hp->n_expert || hp->n_dense < 0 || hp->n_dense > hp->n_layer ||
        hp->n_ff_exp < 1 || hp->n_shared < 0 || hp->q_lora < 0 || hp->n_expert > 1024 || hp->n_group > 256)
        return nm_errf(err, "%s: inconsistent hyper-parameters (layers %" PRId64 ", embd %" PRId64 ", heads %" PRId64
                       ", kv_lora %" PRId64 ", rope %" PRId64 ", key %" PRId64 ", experts %" PRId64 "/%" PRId64 ")",
                       path_of(g), hp->n_layer, hp->n_embd, hp->n_head, hp->kv_lora, hp->d_rope, kl,
                       hp->n_expert_used, hp->n_expert);
    if (gating != NM_GATE_SOFTMAX && gating != NM_GATE_SIGMOID)
        return nm_errf(err, "%s: expert_gating_func %" PRId64 " is not supported (1 softmax, 2 sigmoid)", path_of(g),
                       gating);
    if (hp->n_group < 1 || hp->n_expert % hp->n_group || hp->n_group_used < 1 || hp->n_group_used > hp->n_group ||
        (hp->n_group > 1 && hp->n_group_used * (hp->n_expert / hp->n_group) < hp->n_expert_used))
        return nm_errf(err, "%s: expert groups %" PRId64 " (use %" PRId64 ") do not fit %" PRId64 " experts, top-%" PRId64,
                       path_of(g), hp->n_group, hp->n_group_used, hp->n_expert, hp->n_expert_used);

    /* RoPE / YaRN (docs/MODEL.md §5.2, §5.3) */
    nm_str type = {"none", 4};
    float factor = 0, log_mul = 0;
    snprintf(key, sizeof key, ARCH ".rope.scaling.type");
    if (nm_gguf_get_str(g, key, &type, err) < 0) return -1;
    if (key_f32(g, "rope.scaling.factor", 0, &factor, err) ||
        key_f32(g, "rope.scaling.yarn_log_multiplier", 0, &log_mul, err) ||
        key_i64(g, "rope.scaling.original_context_length", hp->n_ctx_train, &hp->rope_n_ctx_orig, err))
        return -1;
    hp->rope_freq_scale = 1.0f;
    hp->yarn_ext_factor = 0.0f;
    float mscale = 1.0f;
    if (factor > 1.0f && (nm_str_eq(type, "yarn") || nm_str_eq(type, "linear"))) {
        hp->rope_freq_scale = 1.0f / factor;
        if (nm_str_eq(type, "yarn")) {
            hp->yarn_ext_factor = 1.0f;
            /* HF softmax_scale = q_head_dim^-0.5 * yarn_get_mscale(factor, mscale_all_dim)^2 and the
             * GGUF stores 0.1 * mscale_all_dim, so mscale = 1 + stored * ln(factor). */
            mscale = 1.0f + log_mul * logf(factor);
        }
    } else if (!nm_str_eq(type, "none") && !nm_str_eq(type, "yarn") && !nm_str_eq(type, "linear")) {
        return nm_errf(err, "%s: rope.scaling.type '%.*s' is not supported", path_of(g),
                       (int)(type.len > 32 ? 32 : type.len), type.ptr);
    }
    hp->yarn_attn_mscale = mscale;
    hp->kq_scale = mscale * mscale / sqrtf((float)(hp->d_nope + hp->d_rope));
    return 0;
}

/* Binds tensor `name` expecting ne = {c, r, n} (0 = any). */
static int bind(const nm_gguf *g, nm_mat *m, const char *name, int64_t c, int64_t r, int64_t n, int required,
                nm_err *err) {
    const nm_gguf_tensor *t = nm_gguf_tensor_find(g, name);
    memset(m, 0, sizeof *m);
    if (!t) return required ? nm_errf(err, "%s: tensor %s is missing", path_of(g), name) : 1;
    int64_t want[3] = {c, r, n};
    int64_t has[3] = {t->ne[0], t->ne[1], t->ne[2]};
    for (int d = 0; d < 3; d++)
        if (want[d] && want[d] != has[d])
            return nm_errf(err, "%s: tensor %s has shape [%" PRId64 ", %" PRId64 ", %" PRId64 "], expected [%" PRId64
                           ", %" PRId64 ", %" PRId64 "]",
                           path_of(g), name, has[0], has[1], has[2], c, r, n ? n : 1);
    if (t->ne[3] != 1) return nm_errf(err, "%s: tensor %s has 4 dimensions", path_of(g), name);
    const nm_type_traits *tr = nm_type_traits_of(t->type);
    if (!tr || !tr->can_dequantize || !nm_vec_dot_ref(t->type))
        return nm_errf(err, "%s: tensor %s has type %s, which numoe cannot compute with", path_of(g), name,
                       nm_type_name(t->type));
    m->data = t->data;
    m->type = t->type;
    m->cols = t->ne[0];
    m->rows = t->ne[1];
    m->n_mat = t->ne[2];
    m->row_bytes = nm_row_size(t->type, t->ne[0]);
    m->slab = m->row_bytes * (size_t)m->rows;
    m->name = t->name;
    return 0;
}

/* A 1-D tensor of n values as owned float32. */
static int bind_vec(nm_model *m, const nm_gguf *g, const float **out, const char *name, int64_t n, int required,
                    nm_err *err) {
    nm_mat v;
    int r = bind(g, &v, name, n, 1, 1, required, err);
    *out = NULL;
    if (r) return r;
    float *f = own(m, (size_t)n * sizeof *f);
    if (!f) return nm_errf(err, "out of memory");
    if (nm_dequantize_row(v.type, v.data, f, n))
        return nm_errf(err, "%s: tensor %s: cannot convert %s to float", path_of(g), name, nm_type_name(v.type));
    *out = f;
    return 0;
}

/* Legacy layout: derive k_b[h] = (K rows of kv_b for head h)^T and v_b[h] = V rows of kv_b
 * (docs/MODEL.md §3.2). Float sources give float32 results (exact); quantised sources give
 * Q8_0, as ik_llama.cpp does, to keep the derived copy small. */
static int derive_kv_b(nm_model *m, nm_layer *L, const nm_mat *kvb, nm_err *err) {
    const nm_hparams *hp = &m->hp;
    int64_t dn = hp->d_nope, dv = hp->d_v, kr = hp->kv_lora, H = hp->n_head;
    const nm_type_traits *tr = nm_type_traits_of(kvb->type);
    int out_type = tr->block_size == 1 ? NM_TYPE_F32 : NM_TYPE_Q8_0;
    if (out_type == NM_TYPE_Q8_0 && (dn % NM_QK8_0 || kr % NM_QK8_0)) out_type = NM_TYPE_F32;
    float *rows = malloc((size_t)(dn + dv) * (size_t)kr * sizeof *rows);
    float *tmp = malloc((size_t)(kr > dn ? kr : dn) * sizeof *tmp);
    size_t kb_row = nm_row_size(out_type, dn), vb_row = nm_row_size(out_type, kr);
    uint8_t *kb = own(m, kb_row * (size_t)(kr * H)), *vb = own(m, vb_row * (size_t)(dv * H));
    if (!rows || !tmp || !kb || !vb) {
        free(rows), free(tmp);
        return nm_errf(err, "out of memory deriving k_b/v_b from %s", kvb->name);
    }
    for (int64_t h = 0; h < H; h++) {
        for (int64_t j = 0; j < dn + dv; j++)
            nm_dequantize_row(kvb->type, nm_mat_row(kvb, 0, h * (dn + dv) + j), rows + j * kr, kr);
        for (int64_t c = 0; c < kr; c++) {
            for (int64_t n = 0; n < dn; n++) tmp[n] = rows[n * kr + c];
            nm_quantize_row(out_type, tmp, kb + (size_t)(h * kr + c) * kb_row, dn);
        }
        for (int64_t j = 0; j < dv; j++)
            nm_quantize_row(out_type, rows + (dn + j) * kr, vb + (size_t)(h * dv + j) * vb_row, kr);
    }
    free(rows), free(tmp);
    L->k_b = (nm_mat){kb, out_type, dn, kr, H, kb_row, kb_row * (size_t)kr, "k_b (derived from attn_kv_b)"};
    L->v_b = (nm_mat){vb, out_type, kr, dv, H, vb_row, vb_row * (size_t)dv, "v_b (derived from attn_kv_b)"};
    return 0;
}

/* ik's 2-D and mainline's 3-D k_b / v_b hold the same bytes; view both per head. */
static int bind_kv_b(nm_model *m, const nm_gguf *g, nm_layer *L, int il, nm_err *err) {
    const nm_hparams *hp = &m->hp;
    char n1[96], n2[96];
    snprintf(n1, sizeof n1, "blk.%d.attn_k_b.weight", il);
    snprintf(n2, sizeof n2, "blk.%d.attn_v_b.weight", il);
    const nm_gguf_tensor *tk = nm_gguf_tensor_find(g, n1), *tv = nm_gguf_tensor_find(g, n2);
    if (tk && tv) {
        int three_d = tk->n_dims == 3;
        if (bind(g, &L->k_b, n1, hp->d_nope, three_d ? hp->kv_lora : hp->kv_lora * hp->n_head, three_d ? hp->n_head : 1,
                 1, err) ||
            bind(g, &L->v_b, n2, hp->kv_lora, three_d ? hp->d_v : hp->d_v * hp->n_head, three_d ? hp->n_head : 1, 1,
                 err))
            return -1;
        L->k_b.rows = hp->kv_lora, L->k_b.n_mat = hp->n_head, L->k_b.slab = L->k_b.row_bytes * (size_t)hp->kv_lora;
        L->v_b.rows = hp->d_v, L->v_b.n_mat = hp->n_head, L->v_b.slab = L->v_b.row_bytes * (size_t)hp->d_v;
        if (il == 0 && m->hp.attn_layout == 0) m->hp.attn_layout = 1;
        return 0;
    }
    if (m->hp.attn_layout == 2)
        return nm_errf(err, "%s: MLA file (key_length_mla set) lacks %s / %s", path_of(g), n1, n2);
    nm_mat kvb;
    snprintf(n1, sizeof n1, "blk.%d.attn_kv_b.weight", il);
    if (bind(g, &kvb, n1, hp->kv_lora, hp->n_head * (hp->d_nope + hp->d_v), 1, 1, err)) return -1;
    return derive_kv_b(m, L, &kvb, err);
}

static int bind_layer(nm_model *m, const nm_gguf *g, int il, nm_err *err) {
    const nm_hparams *hp = &m->hp;
    nm_layer *L = &m->layers[il];
    int64_t H = hp->n_embd, dk = hp->d_nope + hp->d_rope;
    char n[96];
#define NAME(s) (snprintf(n, sizeof n, "blk.%d." s, il), n)
    if (bind_vec(m, g, &L->attn_norm, NAME("attn_norm.weight"), H, 1, err) ||
        bind_vec(m, g, &L->kv_a_norm, NAME("attn_kv_a_norm.weight"), hp->kv_lora, 1, err) ||
        bind_vec(m, g, &L->ffn_norm, NAME("ffn_norm.weight"), H, 1, err) ||
        bind(g, &L->kv_a, NAME("attn_kv_a_mqa.weight"), H, hp->kv_lora + hp->d_rope, 1, 1, err) ||
        bind(g, &L->out, NAME("attn_output.weight"), hp->n_head * hp->d_v, H, 1, 1, err))
        return -1;
    /* q-LoRA is decided by the tensors present (as mainline does), not by the layer count */
    int r = bind(g, &L->q, NAME("attn_q.weight"), H, hp->n_head * dk, 1, 0, err);
    if (r < 0) return -1;
    if (r == 1) {
        if (hp->q_lora < 1) return nm_errf(err, "%s: layer %d has neither attn_q nor q_lora_rank", path_of(g), il);
        if (bind(g, &L->q_a, NAME("attn_q_a.weight"), H, hp->q_lora, 1, 1, err) ||
            bind_vec(m, g, &L->q_a_norm, NAME("attn_q_a_norm.weight"), hp->q_lora, 1, err) ||
            bind(g, &L->q_b, NAME("attn_q_b.weight"), hp->q_lora, hp->n_head * dk, 1, 1, err))
            return -1;
    }
    if (bind_kv_b(m, g, L, il, err)) return -1;
    L->is_moe = il >= hp->n_dense;
    if (!L->is_moe) {
        int64_t ff = hp->n_ff;
        return bind(g, &L->gate, NAME("ffn_gate.weight"), H, ff, 1, 1, err) ||
               bind(g, &L->up, NAME("ffn_up.weight"), H, ff, 1, 1, err) ||
               bind(g, &L->down, NAME("ffn_down.weight"), ff, H, 1, 1, err) ? -1 : 0;
    }
    int64_t E = hp->n_expert, ffe = hp->n_ff_exp, ffs = hp->n_ff_exp * hp->n_shared;
    if (bind(g, &L->gate_inp, NAME("ffn_gate_inp.weight"), H, E, 1, 1, err) ||
        bind(g, &L->gate_exps, NAME("ffn_gate_exps.weight"), H, ffe, E, 1, err) ||
        bind(g, &L->up_exps, NAME("ffn_up_exps.weight"), H, ffe, E, 1, err) ||
        bind(g, &L->down_exps, NAME("ffn_down_exps.weight"), ffe, H, E, 1, err))
        return -1;
    r = bind_vec(m, g, &L->probs_b, NAME("exp_probs_b.bias"), E, 0, err);
    if (r < 0) return -1;
    if (ffs > 0 && (bind(g, &L->gate_sh, NAME("ffn_gate_shexp.weight"), H, ffs, 1, 1, err) ||
                    bind(g, &L->up_sh, NAME("ffn_up_shexp.weight"), H, ffs, 1, 1, err) ||
                    bind(g, &L->down_sh, NAME("ffn_down_shexp.weight"), ffs, H, 1, 1, err)))
        return -1;
#undef NAME
    return 0;
}

int nm_model_load(nm_model *m, const nm_gguf *g, nm_err *err) {
    memset(m, 0, sizeof *m);
    m->gguf = g;
    if (read_hparams(&m->hp, g, err)) return -1;
    nm_hparams *hp = &m->hp;
    if (bind(g, &m->tok_embd, "token_embd.weight", hp->n_embd, 0, 1, 1, err)) goto fail;
    hp->n_vocab = m->tok_embd.rows;
    if (bind_vec(m, g, &m->out_norm, "output_norm.weight", hp->n_embd, 1, err)) goto fail;
    /* mainline falls back to the tied embedding when output.weight is absent */
    int r = bind(g, &m->output, "output.weight", hp->n_embd, hp->n_vocab, 1, 0, err);
    if (r < 0) goto fail;
    if (r == 1) m->output = m->tok_embd;
    if (!(m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers))) {
        nm_errf(err, "out of memory");
        goto fail;
    }
    for (int il = 0; il < hp->n_layer; il++)
        if (bind_layer(m, g, il, err)) goto fail;
    if (hp->n_dense > 0 && hp->n_ff < 1) {
        nm_errf(err, "%s: feed_forward_length missing for the dense layers", path_of(g));
        goto fail;
    }
    return 0;
fail:
    nm_model_free(m);
    return -1;
}

void nm_model_free(nm_model *m) {
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m->layers);
    memset(m, 0, sizeof *m);
}
