/* identity.h - a model's identity as both sides of the worker protocol
 * compute it (numoe.proto: ModelIdentity) and the byte count of its routed
 * experts, which the workers' shards must add up to. */
#ifndef NUMOE_MODEL_IDENTITY_H
#define NUMOE_MODEL_IDENTITY_H

#include <stdint.h>

#include "common/gguf.h"

/* file_bytes: all split parts together; header_hash: FNV-1a of the first
 * part's header (metadata and every tensor's name, type, shape, offset) and
 * of 4 KiB at both ends of every routed-expert tensor (files of one
 * generator with different seeds share the header). */
void nm_model_identity(const nm_gguf *g, uint64_t *file_bytes, uint64_t *header_hash);

/* Bytes of every routed-expert tensor (ffn_{gate,up,down}_exps) of a model. */
uint64_t nm_routed_expert_bytes(const nm_gguf *g);

#endif
