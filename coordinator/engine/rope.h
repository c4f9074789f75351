/* rope.h - rotary position embedding with YaRN, as DeepSeek uses it.
 *
 * Pairs are adjacent elements (x[2i], x[2i+1]) (ggml ROPE_TYPE_NORM; equal to
 * HF's de-interleave + rotate_half). With YaRN (docs/MODEL.md §5.2) each pair's
 * frequency blends the interpolated (freq_scale * theta) and the original
 * theta by a linear ramp between the correction dims of beta_fast = 32 and
 * beta_slow = 1. DeepSeek cancels YaRN's magnitude factor in the rotation
 * (mscale / mscale_all_dim = 1) and applies it to the softmax scale instead
 * (model.h kq_scale), so the rotation here is a pure rotation. */
#ifndef NUMOE_COORDINATOR_ENGINE_ROPE_H
#define NUMOE_COORDINATOR_ENGINE_ROPE_H

#include <stdint.h>

typedef struct {
    int n_dims;          /* d_rope */
    float *inv_freq;     /* [n_dims/2] effective frequency of each pair (owned) */
} nm_rope;

int nm_rope_init(nm_rope *r, int n_dims, float base, float freq_scale, float ext_factor, int64_t n_ctx_orig);
void nm_rope_free(nm_rope *r);
/* Rotates x[0..n_dims) in place for position pos. */
void nm_rope_apply(const nm_rope *r, float *x, int64_t pos);

#endif
