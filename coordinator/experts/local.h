/* local.h - the in-process expert backend (`--workers 0`): every expert of
 * every layer straight from the mapped model, on the caller's thread pool. */
#ifndef NUMOE_COORDINATOR_EXPERTS_LOCAL_H
#define NUMOE_COORDINATOR_EXPERTS_LOCAL_H

#include <stdint.h>

#include "common/error.h"
#include "coordinator/experts/backend.h"
#include "kernels/threadpool.h"
#include "model/model.h"

/* pool is borrowed; the input region holds max_tok tokens of up to max_k
 * experts. NULL with err. */
nm_expert_backend *nm_experts_local_create(const nm_model *m, nm_pool *pool, int64_t max_tok, int max_k, nm_err *err);

#endif
