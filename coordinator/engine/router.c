/* router.c - gating as the Hugging Face DeepSeek code does it:
 *   V2 (softmax):  p = softmax(logits); top-k of p (groups: "group_limited_greedy",
 *                  a group scores its best expert).
 *   V3 (sigmoid):  p = sigmoid(logits); selection uses s = p + e_score_correction_bias;
 *                  "noaux_tc": a group scores the sum of its two best s, the best
 *                  topk_group groups stay, experts of other groups get s = -inf
 *                  (transformers >= 5 and mainline llama.cpp; DeepSeek's original
 *                  remote code filled 0.0, which differs when a kept s < 0), top-k of s.
 *   weights = p[top] (never the biased s), optionally renormalised to sum 1, then
 *   times routed_scaling_factor (llama.cpp multiplies in every case; HF V2 skips it
 *   when renormalising, which no released V2 config does).
 * Ties go to the lower expert index. */
#include "coordinator/engine/router.h"

#include <math.h>

/* index of the largest v[i] among i with v[i] > -INFINITY not yet taken */
static int argmax_free(const float *v, const uint8_t *taken, int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

void nm_route(const nm_hparams *hp, int k, const float *logits, const float *bias, int32_t *ids, float *weights,
              float *scratch) {
    int E = (int)hp->n_expert;
    float *p = scratch, *s = scratch + E;
    if (hp->gating == NM_GATE_SOFTMAX) {
        float mx = logits[0], sum = 0;
        for (int i = 1; i < E; i++) mx = logits[i] > mx ? logits[i] : mx;
        for (int i = 0; i < E; i++) sum += p[i] = expf(logits[i] - mx);
        for (int i = 0; i < E; i++) p[i] /= sum;
    } else {
        for (int i = 0; i < E; i++) p[i] = 1.0f / (1.0f + expf(-logits[i]));
    }
    for (int i = 0; i < E; i++) s[i] = bias ? p[i] + bias[i] : p[i];

    int G = (int)hp->n_group, per = E / G;
    if (G > 1 && hp->n_group_used < G) {
        float gscore[256 + 1];
        uint8_t keep[256 + 1] = {0};
        for (int g = 0; g < G && g < 256; g++) {
            const float *x = s + g * per;
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int i = 0; i < per; i++) {
                if (x[i] > b1) b2 = b1, b1 = x[i];
                else if (x[i] > b2) b2 = x[i];
            }
            gscore[g] = hp->gating == NM_GATE_SIGMOID ? b1 + (per > 1 ? b2 : 0.0f) : b1;
        }
        uint8_t taken[256 + 1] = {0};
        for (int j = 0; j < hp->n_group_used; j++) {
            int g = argmax_free(gscore, taken, G);
            taken[g] = keep[g] = 1;
        }
        for (int g = 0; g < G; g++)
            if (!keep[g])
                for (int i = 0; i < per; i++) s[g * per + i] = -INFINITY;
    }

    uint8_t taken[1024] = {0}; /* n_expert <= 1024 is checked at load */
    float sum = 0;
    for (int j = 0; j < k; j++) {
        int e = argmax_free(s, taken, E);
        taken[e] = 1;
        ids[j] = e;
        weights[j] = p[e];
        sum += p[e];
    }
    float scale = hp->routed_scale;
    if (hp->norm_topk) scale /= (sum + 1e-20f);
    for (int j = 0; j < k; j++) weights[j] *= scale;
}
