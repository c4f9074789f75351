/* model.h - a DeepSeek-V2/V3 (`deepseek2`) model as the GGUF describes it:
 * hyper-parameters read from the metadata and per-layer views of the tensors
 * inside the mapped file (no copies; nm_model does not own the nm_gguf).
 *
 * The three attention layouts found in real files (docs/MODEL.md §3.3) are
 * folded into one: the absorbed-MLA matrices k_b (per head [kv_lora x d_nope])
 * and v_b (per head [d_v x kv_lora]). Legacy files carry only attn_kv_b; for
 * them k_b/v_b are derived at load time into buffers the model owns. */
#ifndef NUMOE_MODEL_MODEL_H
#define NUMOE_MODEL_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "common/gguf.h"

/* A matrix of `rows` rows of `cols` elements in ggml type `type`; row r
 * starts at data + r * row_bytes. For stacked expert tensors, `slab` is the
 * byte stride between experts (ne[2]). */
typedef struct {
    const void *data;
    int type;
    int64_t cols, rows, n_mat; /* ne[0], ne[1], ne[2] */
    size_t row_bytes, slab;
    const char *name;
} nm_mat;

typedef enum { NM_GATE_SOFTMAX = 1, NM_GATE_SIGMOID = 2 } nm_gating;

typedef struct {
    int64_t n_vocab, n_embd, n_layer, n_ctx_train;
    int64_t n_head, q_lora, kv_lora, d_nope, d_rope, d_v;
    int64_t n_ff, n_ff_exp, n_expert, n_expert_used, n_shared, n_dense;
    int64_t n_group, n_group_used;
    nm_gating gating;
    int norm_topk;
    float routed_scale, rms_eps;
    float rope_base, rope_freq_scale, yarn_ext_factor, yarn_attn_mscale;
    int64_t rope_n_ctx_orig;
    float kq_scale; /* mscale^2 / sqrt(d_nope + d_rope), docs/MODEL.md §5.3 */
    int attn_layout; /* 0 legacy kv_b, 1 kv_b + 2-D k_b/v_b (ik), 2 3-D k_b/v_b (mainline MLA) */
} nm_hparams;

/* Vectors (norm weights, the router bias) are converted to float32 at load
 * and owned by the model; matrices stay in the file's type. */
typedef struct {
    const float *attn_norm, *q_a_norm, *kv_a_norm, *ffn_norm;
    nm_mat q_a, q_b, q;                        /* q_a/q_b with q-LoRA, q without */
    nm_mat kv_a, k_b, v_b, out;                /* k_b: n_head x [kv_lora x d_nope], v_b: n_head x [d_v x kv_lora] */
    nm_mat gate, up, down;                     /* dense layers */
    nm_mat gate_inp;                           /* router [n_expert x n_embd] */
    const float *probs_b;                      /* V3 e_score_correction bias, NULL if absent */
    nm_mat gate_exps, up_exps, down_exps;      /* stacked routed experts */
    nm_mat gate_sh, up_sh, down_sh;            /* shared experts (fused) */
    int is_moe;
} nm_layer;

typedef struct {
    nm_hparams hp;
    const nm_gguf *gguf;
    nm_mat tok_embd, output;
    const float *out_norm;
    nm_layer *layers;
    void **owned;  /* buffers derived at load (k_b/v_b of legacy files) */
    int n_owned;
} nm_model;

/* Reads hyper-parameters and binds every tensor, checking shapes and types;
 * an error names the file, the tensor and what was expected. */
int nm_model_load(nm_model *m, const nm_gguf *g, nm_err *err);
void nm_model_free(nm_model *m);

/* Bytes of one row of m, and a pointer to row r of matrix e of a stack. */
static inline const void *nm_mat_row(const nm_mat *m, int64_t e, int64_t r) {
    return (const char *)m->data + (size_t)e * m->slab + (size_t)r * m->row_bytes;
}

#endif
