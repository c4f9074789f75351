/* remote.h - the coordinator's side of the expert workers: the remote
 * expert backend (remote.c and its transports). */
#ifndef NUMOE_COORDINATOR_EXPERTS_REMOTE_H
#define NUMOE_COORDINATOR_EXPERTS_REMOTE_H

#include <stdint.h>

#include "common/error.h"
#include "coordinator/experts/backend.h"
#include "model/model.h"

#define NM_MAX_WORKERS 256

typedef struct {
    int n_workers;          /* launched workers: must match NUMOE_LAUNCH_WORKERS; with endpoints: 0
                               or their number */
    const char *placement;  /* "split" | "experts" | "experts-rr" | map file (model/placement.h) */
    double timeout_s;       /* a worker that does not answer a layer within this is restarted (<= 0: 300) */
    int64_t max_tok;        /* largest batch the backend will be given (input region and slot size) */
    int max_k;              /* largest number of experts per token */
    int handoff;            /* numoe.proto Handoff: 0 doorbell (default), 1 ZeroMQ messages */
    int verbose;            /* print per-worker lines on stderr (shard bytes etc.) */
    const char *endpoints;  /* "tcp://h1:p1,tcp://h2:p2": connect to workers started by hand
                               (`numoe-worker --listen`, worker i = i-th endpoint) instead of the
                               launcher's; data inline, no shm, no restarts */
    const char *key_path;   /* with endpoints: CURVE key file shared with the workers (proto/wire_key.h) */
} nm_remote_opts;

/* Binds the control endpoint the launcher named (NUMOE_LAUNCH_ENDPOINT;
 * launch/launcher.h) and waits until each of its workers has registered,
 * checked out (protocol version, model identity, placement) and mapped its
 * slot; or connects to o->endpoints. Prints each worker's shard bytes and
 * their sum against the model's routed-expert bytes on stderr (verbose). An
 * error when neither the launcher nor endpoints are there. */
nm_expert_backend *nm_experts_remote_create(const nm_model *m, const nm_remote_opts *o, nm_err *err);

#endif
