/* router.h - MoE expert selection for one token (docs/MODEL.md §5.4, HF
 * DeepseekV2MoEGate / DeepseekV3TopkRouter). */
#ifndef NUMOE_COORDINATOR_ENGINE_ROUTER_H
#define NUMOE_COORDINATOR_ENGINE_ROUTER_H

#include <stdint.h>

#include "model/model.h"

/* From router logits [n_expert] picks k experts: ids[k] and weights[k].
 * bias is the V3 correction bias (NULL for V2); scratch holds 2*n_expert
 * floats. k may be lower than the model's expert_used_count (6-of-8 mode). */
void nm_route(const nm_hparams *hp, int k, const float *logits, const float *bias, int32_t *ids, float *weights,
              float *scratch);

#endif
