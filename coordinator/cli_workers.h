/* cli_workers.h - the coordinator's side of the expert workers: the remote
 * expert backend (experts_remote.c) and `numoe bench ipc` (cmd_bench_ipc.c). */
#ifndef NUMOE_COORDINATOR_CLI_WORKERS_H
#define NUMOE_COORDINATOR_CLI_WORKERS_H

#include <stdint.h>

#include "common/error.h"
#include "coordinator/expert_backend.h"
#include "coordinator/model.h"

#define NM_MAX_WORKERS 256

typedef struct {
    const char *model_path; /* the workers open the same file */
    int n_workers;          /* >= 1 */
    const char *placement;  /* "split" | "experts" | "experts-rr" (worker/placement.h) */
    int threads;            /* per worker; <= 0: the CPUs of its node shared by the workers on it */
    const int *nodes;       /* [n_nodes] node of worker i = nodes[i % n_nodes]; NULL: round-robin over
                               the machine's NUMA nodes when it has several, else unbound */
    int n_nodes;
    double timeout_s;       /* a worker that does not answer a layer within this is an error (<= 0: 300) */
    int64_t max_tok;        /* largest batch the backend will be given (slot size) */
    int max_k;              /* largest number of experts per token */
    int handoff;            /* numoe.proto Handoff: 0 doorbell (default), 1 ZeroMQ messages */
    int verbose;            /* print per-worker lines on stderr (shard bytes etc.) */
    const char *endpoints;  /* "tcp://h1:p1,tcp://h2:p2": connect to workers started by hand
                               (`numoe-worker --listen`, worker i = i-th endpoint) instead of
                               spawning any; data inline, no shm, no restarts. n_workers: 0 or
                               the number of endpoints */
} nm_remote_opts;

/* Spawns n_workers numoe-worker processes (found next to this executable,
 * or $NUMOE_WORKER), waits until each has registered, checked out (protocol
 * version, model identity, placement) and mapped its slot; prints each
 * worker's shard bytes and their sum against the model's routed-expert bytes
 * on stderr. The workers are shut down and reaped by destroy, and die with
 * this process if it is killed (PR_SET_PDEATHSIG). */
nm_expert_backend *nm_experts_remote_create(const nm_model *m, const nm_remote_opts *o, nm_err *err);

/* `numoe bench ipc`: per-layer hand-off round trips (ZeroMQ REQ/REP and
 * DEALER/ROUTER with protobuf Envelopes, shm doorbell with and without
 * polling) between two processes, and with --model, through real workers. */
int nm_cmd_bench_ipc(int argc, char **argv);

#endif
