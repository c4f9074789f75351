/* zmq_handoff.h - the per-layer hand-off to the launcher's workers as
 * ZeroMQ messages (NUMOE_HANDOFF=zmq, a developer knob for comparing with the
 * doorbell): the inputs still travel in the shared-memory slots, the request
 * and the reply are MoeRequest / MoeReply on the control socket. A worker
 * that dies fails the layer here (no restarts in this mode). */
#ifndef NUMOE_COORDINATOR_EXPERTS_ZMQ_HANDOFF_H
#define NUMOE_COORDINATOR_EXPERTS_ZMQ_HANDOFF_H

#include "coordinator/experts/remote_core.h"

/* The layer in rb->q, inputs in rb->base.in. 0, or -1 with err. */
int nm_zmq_submit(nm_remote *rb, nm_err *err);
int nm_zmq_wait(nm_remote *rb, float *out, nm_err *err);

#endif
