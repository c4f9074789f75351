/* shm_doorbell.h - the per-layer hand-off to the launcher's workers through
 * their shared-memory slots (proto/shm_slot.h): the inputs are copied into
 * every worker's slot and its doorbell rung at submit; wait watches the
 * doorbells, restarts what died or hung (the launcher starts the process,
 * the layer is handed to it again), then adds the partial sums in worker
 * order. The default hand-off. */
#ifndef NUMOE_COORDINATOR_EXPERTS_SHM_DOORBELL_H
#define NUMOE_COORDINATOR_EXPERTS_SHM_DOORBELL_H

#include "coordinator/experts/remote_core.h"

/* The layer in rb->q, inputs in rb->base.in. 0, or -1 with err. */
int nm_shm_submit(nm_remote *rb, nm_err *err);
int nm_shm_wait(nm_remote *rb, float *out, nm_err *err);

#endif
