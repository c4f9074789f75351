/* tcp_inline.h - workers started by hand (--worker-endpoints
 * tcp://h1:p1,...; worker i is the i-th endpoint, started as `numoe-worker
 * --worker-id i --listen ...`): nothing is launched and nothing is shared.
 * Each endpoint gets its own DEALER socket (connected; the worker binds a
 * ROUTER) and a socket monitor; the coordinator sends a Heartbeat as hello,
 * the worker answers with its Register, which passes the core's checks (plus:
 * its worker id is the endpoint's position). Per layer the MoeRequest
 * carries x / ids / weights and the MoeReply the partial output
 * (HANDOFF_INLINE); the sum is in worker order. No supervision: a worker
 * whose connection drops (monitor: DISCONNECTED) or that does not answer in
 * time is waited for to come back at its endpoint (NUMOE_WORKER_RECONNECT_S)
 * and sent the layer again. An endpoint nothing accepts a connection on
 * within NUMOE_WORKER_CONNECT_TIMEOUT_S (default 10 s) is an error. With
 * --worker-key the traffic is CURVE-encrypted (proto/wire_key.h). */
#ifndef NUMOE_COORDINATOR_EXPERTS_TCP_INLINE_H
#define NUMOE_COORDINATOR_EXPERTS_TCP_INLINE_H

#include "coordinator/experts/remote_core.h"

/* Connects to every endpoint (rb->w[i].ep), says hello, checks the
 * Registers. 0, or -1 with err. */
int nm_tcp_connect_all(nm_remote *rb, nm_err *err);
/* The layer in rb->q, inputs in rb->base.in. 0, or -1 with err. */
int nm_tcp_submit(nm_remote *rb, nm_err *err);
int nm_tcp_wait(nm_remote *rb, float *out, nm_err *err);
/* Shutdown to every connected worker, sockets closed. */
void nm_tcp_close(nm_remote *rb);

#endif
