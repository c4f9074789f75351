/* routing_profile.h - the routing records `numoe generate --dump-routing
 * FILE` writes (int32 {position, layer, k expert ids} per token and MoE
 * layer: coordinator/engine/engine.h), read back where expert usage
 * decides something: the balanced placement of `numoe placement --profile`
 * and the experts the GPU engine keeps in VRAM (`--gpu-experts FILE`).
 *
 * Errors name the file, the record and what does not fit the model. */
#ifndef NUMOE_MODEL_ROUTING_PROFILE_H
#define NUMOE_MODEL_ROUTING_PROFILE_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

typedef struct {
    int32_t *rec; /* n records of k + 2 int32 */
    size_t n;
    int64_t k;
} nm_routing_profile;

/* Reads every record of path, checking each layer against is_moe[n_layer]
 * and each id against [0, n_expert). 0, or -1 with err (also for a file
 * without records). */
int nm_routing_profile_load(nm_routing_profile *pr, const char *path, int64_t n_layer, const uint8_t *is_moe,
                            int64_t n_expert, int64_t k, nm_err *err);
void nm_routing_profile_free(nm_routing_profile *pr);

/* counts[il * n_expert + e] = how often expert e of layer il was picked
 * (counts holds n_layer * n_expert, zeroed here). */
void nm_routing_profile_count(const nm_routing_profile *pr, int64_t n_layer, int64_t n_expert, uint32_t *counts);

#endif
