/* remote_core.h - the state of the remote expert backend and what its
 * transports share: the worker table, the registration checks every worker
 * passes (protocol version, model identity, placement), and for the
 * launcher's workers the control socket, their shared-memory slots, liveness
 * through pidfds and waiting for a restarted worker (remote_core.c).
 *
 * Layering inside coordinator/experts/: remote.c (creation, dispatch) calls
 * the transports - shm_doorbell.c, zmq_handoff.c, tcp_inline.c - and this
 * core; the transports call the core; the core calls neither. */
#ifndef NUMOE_COORDINATOR_EXPERTS_REMOTE_CORE_H
#define NUMOE_COORDINATOR_EXPERTS_REMOTE_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/error.h"
#include "coordinator/experts/backend.h"
#include "model/model.h"
#include "proto/shm_slot.h"
#include "proto/wire.h"
#include "proto/wire_key.h"

#define NM_REMOTE_START_TIMEOUT_S 600.0 /* copying a shard of a big model out of the page cache takes a while */

typedef struct {
    int id;
    pid_t pid;             /* as registered */
    int pidfd;             /* readable once that process has ended; -1: none */
    int gone;
    nm_routing_id rid;
    int registered, attached;
    char shm_name[96];
    nm_slot slot;
    uint64_t shard_bytes;
    int node, threads, cpus;
    unsigned req;
    unsigned attempt;      /* its restarts before this start (Register.attempt) */
    double t_posted;       /* when its current request was handed to it */
    /* --worker-endpoints */
    char ep[256];
    void *dsock, *mon;
    int connected, lost;
    int handshake_failed;  /* the ZMQ_EVENT_HANDSHAKE_FAILED_* seen, 0: none */
    int handshake_value;   /* that event's value (NO_DETAIL: an errno) */
    int handshake_resets;  /* NO_DETAIL failures in a row on this socket (tcp_inline.c: fatal from the third) */
    int handshaken;        /* this socket's connection passed the ZeroMQ handshake */
    unsigned generation;   /* sockets opened so far (names each one's monitor) */
    char host[64];
    uint64_t rpid;
} nm_remote_worker;

/* What a Register must match. */
typedef struct {
    uint64_t file_bytes, header_hash, placement_hash;
    int placement;
} nm_remote_expect;

/* The layer in flight between submit and wait: enough to hand it to a
 * restarted or reconnected worker again (the inputs stay in base.in). */
typedef struct {
    int layer, k;
    int64_t n_tok;
    uint64_t seq;
    int pending;           /* submitted, not yet waited for */
} nm_remote_inflight;

typedef struct {
    nm_expert_backend base;
    const nm_model *m;
    int n;
    nm_remote_worker *w;
    void *zctx, *sock;
    int run_id;            /* the launcher's pid: prefix of every shm name of the run */
    int handoff, spin_us;
    double timeout_s;
    int64_t max_tok, n_embd;
    int max_k;
    int broken;
    char broken_msg[sizeof(nm_err)];
    uint64_t seq;
    nm_remote_expect ex;
    int tcp;               /* --worker-endpoints */
    int keyed;             /* --worker-key: CURVE */
    nm_wire_key key;
    nm_remote_inflight q;
    uint64_t restarts;     /* Registers of restarted workers (attempt > 0) */
    uint64_t give_ups;     /* the launcher's reports of a worker it gave up for now */
} nm_remote;

/* NUMOE_WORKER_START_TIMEOUT_S, or the default. */
double nm_remote_start_limit(void);
/* Whether w's registered process has ended (not our child: a pidfd tells). */
int nm_remote_check_gone(nm_remote_worker *w);
/* Why a Register does not fit (reason[0] == 0: it does). */
void nm_remote_register_reason(nm_remote *rb, const Numoe__Register *r, char *reason, size_t rlen);
/* The registered worker with routing id rid, or NULL. */
nm_remote_worker *nm_remote_by_rid(nm_remote *rb, const nm_routing_id *rid);
/* Launcher's workers: reads control messages for up to timeout_ms and
 * handles Register / Heartbeat; a worker that died before it attached is
 * forgotten (the launcher starts another). Errors: the launcher giving a
 * worker up always; a worker's own Error only when fatal_worker_errors. */
int nm_remote_control_step(nm_remote *rb, int timeout_ms, int fatal_worker_errors, nm_err *err);
/* Waits until every launched worker registered and mapped its slot. */
int nm_remote_await_workers(nm_remote *rb, nm_err *err);
/* Worker w failed (why): kills it if it still runs and waits for the
 * launcher's new process to register and map its slot. t0: when w was
 * handed the request it did not answer (the time printed is what the
 * failure cost that request). */
int nm_remote_await_restart(nm_remote *rb, nm_remote_worker *w, const nm_err *why, double t0, nm_err *err);
/* out = the partial sums in the workers' slots, added in worker order. */
void nm_remote_sum_slots(nm_remote *rb, int64_t n_tok, float *out);
/* Marks the backend unusable after err (every later call fails with it,
 * until nm_remote_rearm succeeds). */
int nm_remote_fail(nm_remote *rb, nm_err *err);
/* Launcher's workers, doorbell hand-off, nothing in flight: reads what
 * came on the control socket (Registers and Heartbeats of restarted
 * workers), forgets workers that died meanwhile (the launcher restarts
 * them), and when every worker is attached, alive and idle clears the
 * failure: 1. Else 0 with why (len bytes) saying what it waits for. */
int nm_remote_rearm(nm_remote *rb, char *why, size_t len);
/* Shutdown to every launched worker (and the doorbell, so a sleeping one
 * reads it now), then forgets them; the launcher reaps the processes. */
void nm_remote_close_launched(nm_remote *rb);

#endif
