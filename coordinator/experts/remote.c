/* remote.c - the expert backend of `--workers N` (remote.h): routed experts
 * live in N numoe-worker processes (worker/), each holding its placement's
 * share exactly once. This file creates the backend and hands each layer to
 * the transport in use:
 *
 *   shm_doorbell.c  the launcher's workers, inputs copied into each worker's
 *                   shared-memory slot (proto/shm_slot.h), a doorbell rung
 *                   (the default);
 *   zmq_handoff.c   the same slots, request and reply as ZeroMQ messages
 *                   (NUMOE_HANDOFF=zmq);
 *   tcp_inline.c    workers started by hand (--worker-endpoints), the data
 *                   inline in the messages.
 * remote_core.c holds what they share: the worker table, registration and
 * its checks, liveness and restarts.
 *
 * Per MoE layer: submit hands the inputs (the backend's input region) to
 * every worker at once, so worker 0 computes while worker 1 is being
 * handed its part and the engine computes the shared experts meanwhile;
 * wait collects every answer and sums the partial outputs in worker order
 * 0, 1, ..., N-1 (fixed, so results are deterministic). A worker that
 * reports an error fails the call with a message naming it; the backend then
 * refuses further calls until health re-arms it (below).
 *
 * The workers are started, bound and restarted by the launcher (the `numoe`
 * process, launch/launcher.h), which names the endpoint to bind and the
 * worker count in NUMOE_LAUNCH_ENDPOINT / NUMOE_LAUNCH_WORKERS. Each worker
 * registers; the coordinator checks protocol version, model identity and
 * placement, creates the worker's slot (/dev/shm/numoe-<launcher pid>-w<id>-
 * <random>) and names it in RegisterReply; the worker maps it, unlinks the
 * name and confirms with a Heartbeat. destroy sends Shutdown; the launcher
 * reaps the processes and removes what is left in /dev/shm.
 *
 * Failures (doorbell hand-off): the coordinator watches each registered
 * worker through a pidfd. A worker that dies while it owes an answer, or
 * does not answer within the timeout (the coordinator kills it), is
 * restarted by the launcher; the layer in flight waits here. Once the new
 * process has registered and mapped its new slot, the inputs (still in the
 * input region) are copied in again and its doorbell rung; the other
 * workers' answers stay in their slots. So no request fails and the sums are
 * the same. "worker I restarted in X ms (attempt k, pid P)" goes to stderr.
 * If the launcher gives up on the worker for now it says so with an Error
 * (from_launcher) on the control socket, and the layer fails with that
 * reason. The backend is then unusable until its health call (backend.h)
 * re-arms it: `numoe serve` calls it between steps and while idle, and
 * once every worker has registered again (the launcher of a server keeps
 * restarting a failing worker with a capped back-off, launch/launcher.c)
 * and is idle, it works again. Batch commands just fail. A restart is quick because the shard outlives the worker
 * (worker/shard.h): the new process re-maps it read-only.
 *
 * Later (not here yet): restarts in the ZeroMQ hand-off mode (there a dead
 * worker still fails the call), and one shared input segment every worker
 * maps instead of a copy per worker's slot (the input region already
 * belongs to the backend, so the engine would not change). */
#include "coordinator/experts/remote.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "coordinator/experts/remote_core.h"
#include "coordinator/experts/shm_doorbell.h"
#include "coordinator/experts/tcp_inline.h"
#include "coordinator/experts/zmq_handoff.h"
#include "model/identity.h"
#include "model/placement.h"

#define SPIN_US_DEFAULT 250

static void remote_destroy(nm_expert_backend *b) {
    nm_remote *rb = (nm_remote *)b;
    nm_remote_close_launched(rb);
    nm_tcp_close(rb);
    memset(&rb->key, 0, sizeof rb->key);
    if (rb->sock) {
        int linger = 500; /* the Shutdowns */
        zmq_setsockopt(rb->sock, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(rb->sock);
    }
    if (rb->zctx) zmq_ctx_term(rb->zctx);
    nm_expert_input_free(&rb->base.in);
    free(rb->w);
    free(rb);
}

static int remote_submit(nm_expert_backend *b, int layer, int64_t n_tok, int k, nm_err *err) {
    nm_remote *rb = (nm_remote *)b;
    if (rb->broken) return nm_errf(err, "expert workers unusable after an earlier failure: %s", rb->broken_msg);
    if (rb->q.pending) {
        nm_errf(err, "expert backend: a submit while layer %d is in flight", rb->q.layer);
        return nm_remote_fail(rb, err);
    }
    if (layer >= 0 && (layer >= rb->m->hp.n_layer || !rb->m->layers[layer].is_moe))
        return nm_errf(err, "expert backend: layer %d is not a MoE layer", layer);
    if (nm_experts_check(b, n_tok, k, err)) return -1;
    rb->q = (nm_remote_inflight){.layer = layer, .k = k, .n_tok = n_tok, .seq = ++rb->seq};
    int rc = rb->tcp ? nm_tcp_submit(rb, err)
             : rb->handoff == NUMOE__HANDOFF__HANDOFF_ZMQ ? nm_zmq_submit(rb, err)
                                                          : nm_shm_submit(rb, err);
    if (rc) return nm_remote_fail(rb, err);
    rb->q.pending = 1;
    return 0;
}

static int remote_wait(nm_expert_backend *b, float *out, nm_err *err) {
    nm_remote *rb = (nm_remote *)b;
    if (!rb->q.pending) return nm_errf(err, "expert backend: wait without a submit");
    rb->q.pending = 0;
    int rc = rb->tcp ? nm_tcp_wait(rb, out, err)
             : rb->handoff == NUMOE__HANDOFF__HANDOFF_ZMQ ? nm_zmq_wait(rb, out, err)
                                                          : nm_shm_wait(rb, out, err);
    return rc ? nm_remote_fail(rb, err) : 0;
}

static void remote_health(nm_expert_backend *b, nm_expert_health *out) {
    nm_remote *rb = (nm_remote *)b;
    out->restarts = rb->restarts, out->give_ups = rb->give_ups;
    out->ok = !rb->broken;
    if (out->ok || rb->q.pending) return;
    if (rb->tcp || rb->handoff == NUMOE__HANDOFF__HANDOFF_ZMQ) {
        /* no restarts there: what failed stays failed */
        snprintf(out->why, sizeof out->why, "expert workers unusable after: %.250s (the %s hand-off cannot recover; "
                 "restart the server)", rb->broken_msg, rb->tcp ? "--worker-endpoints" : "ZeroMQ");
        return;
    }
    out->ok = nm_remote_rearm(rb, out->why, sizeof out->why);
    out->restarts = rb->restarts, out->give_ups = rb->give_ups;
}

nm_expert_backend *nm_experts_remote_create(const nm_model *m, const nm_remote_opts *o, nm_err *err) {
    int n_workers = o->n_workers;
    const char *launch_ep = getenv("NUMOE_LAUNCH_ENDPOINT"), *launch_n = getenv("NUMOE_LAUNCH_WORKERS");
    if (o->endpoints) {
        int n_ep = 1;
        for (const char *c = o->endpoints; *c; c++) n_ep += *c == ',';
        for (const char *c = o->endpoints; c;) {
            const char *e = strchr(c, ',');
            size_t len = e ? (size_t)(e - c) : strlen(c);
            if (len <= 6 || len >= sizeof ((nm_remote_worker *)0)->ep || strncmp(c, "tcp://", 6)) {
                nm_errf(err, "--worker-endpoints: '%.*s' is not a tcp://HOST:PORT endpoint", (int)len, c);
                return NULL;
            }
            c = e ? e + 1 : NULL;
        }
        if (n_workers > 0 && n_workers != n_ep) {
            nm_errf(err, "--workers %d, but --worker-endpoints names %d worker%s", n_workers, n_ep, n_ep > 1 ? "s" : "");
            return NULL;
        }
        n_workers = n_ep;
    } else if (o->key_path) {
        nm_errf(err, "--worker-key is for --worker-endpoints (tcp) workers; the launcher's workers talk over "
                "local ipc and shared memory");
        return NULL;
    } else if (!launch_ep || !launch_n) {
        nm_errf(err, "routed experts in workers need the numoe launcher, which starts them: run `numoe <command> "
                "--workers N ...`, not numoe-coordinator directly");
        return NULL;
    } else {
        n_workers = atoi(launch_n);
    }
    if (n_workers < 1 || n_workers > NM_MAX_WORKERS) {
        nm_errf(err, "--workers %d: between 1 and %d", n_workers, NM_MAX_WORKERS);
        return NULL;
    }
    if (!o->placement) {
        nm_errf(err, "expert workers need a placement");
        return NULL;
    }
    /* the same map every worker builds (a family name or a map file): fails here,
     * once, if it cannot be made */
    nm_placement pl;
    if (nm_placement_for_model_spec(&pl, m, o->placement, n_workers, err)) return NULL;
    int kind = pl.kind;
    uint64_t placement_hash = nm_placement_hash(&pl);
    nm_placement_free(&pl);
    nm_remote *rb = calloc(1, sizeof *rb);
    if (!rb || !(rb->w = calloc((size_t)n_workers, sizeof *rb->w))) {
        free(rb);
        nm_errf(err, "out of memory");
        return NULL;
    }
    rb->base.submit = remote_submit;
    rb->base.wait = remote_wait;
    rb->base.destroy = remote_destroy;
    rb->base.health = remote_health;
    rb->m = m;
    rb->n = n_workers;
    for (int i = 0; i < rb->n; i++) rb->w[i].id = i, rb->w[i].pidfd = -1, rb->w[i].node = -1;
    rb->handoff = o->handoff;
    if (o->endpoints) rb->tcp = 1, rb->handoff = NUMOE__HANDOFF__HANDOFF_INLINE;
    rb->timeout_s = o->timeout_s > 0 ? o->timeout_s : 300;
    rb->n_embd = m->hp.n_embd;
    rb->max_tok = o->max_tok > 0 ? o->max_tok : 512;
    rb->max_k = o->max_k > 0 ? o->max_k : (int)m->hp.n_expert_used;
    if (nm_expert_input_alloc(&rb->base.in, rb->n_embd, rb->max_tok, rb->max_k, err)) {
        free(rb->w), free(rb);
        return NULL;
    }
    const char *spin = getenv("NUMOE_WORKER_SPIN_US");
    rb->spin_us = spin ? atoi(spin) : SPIN_US_DEFAULT;
    if (rb->spin_us < 0) rb->spin_us = 0;
    rb->run_id = getppid(); /* the launcher */
    nm_model_identity(m->gguf, &rb->ex.file_bytes, &rb->ex.header_hash);
    rb->ex.placement = kind, rb->ex.placement_hash = placement_hash;
    if (!(rb->zctx = zmq_ctx_new())) {
        nm_errf(err, "ZeroMQ: %s", zmq_strerror(zmq_errno()));
        remote_destroy(&rb->base);
        return NULL;
    }

    if (rb->tcp) {
        const char *c = o->endpoints;
        for (int i = 0; i < rb->n; i++) {
            const char *e = strchr(c, ',');
            int len = e ? (int)(e - c) : (int)strlen(c);
            snprintf(rb->w[i].ep, sizeof rb->w[i].ep, "%.*s", len, c);
            c = e ? e + 1 : c + len;
        }
        if (o->key_path && nm_wire_key_load(o->key_path, &rb->key, err)) {
            remote_destroy(&rb->base);
            return NULL;
        }
        rb->keyed = o->key_path != NULL;
        if (nm_tcp_connect_all(rb, err)) {
            rb->broken = 1;
            remote_destroy(&rb->base);
            return NULL;
        }
    } else {
        int one = 1, zero = 0, sndtimeo = 5000;
        if (!(rb->sock = zmq_socket(rb->zctx, ZMQ_ROUTER)) ||
            zmq_setsockopt(rb->sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one) ||
            zmq_setsockopt(rb->sock, ZMQ_LINGER, &zero, sizeof zero) ||
            zmq_setsockopt(rb->sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo) || zmq_bind(rb->sock, launch_ep)) {
            nm_errf(err, "ZeroMQ: cannot listen on %s: %s", launch_ep, zmq_strerror(zmq_errno()));
            remote_destroy(&rb->base);
            return NULL;
        }
        if (nm_remote_await_workers(rb, err)) {
            rb->broken = 1;
            remote_destroy(&rb->base);
            return NULL;
        }
    }
    uint64_t total = 0, routed = nm_routed_expert_bytes(m->gguf);
    for (int i = 0; i < rb->n; i++) {
        nm_remote_worker *w = &rb->w[i];
        total += w->shard_bytes;
        char node[16] = "-";
        if (w->node >= 0) snprintf(node, sizeof node, "%d", w->node);
        if (o->verbose && rb->tcp)
            fprintf(stderr, "numoe: worker %d: %s (host %s, pid %llu), node %s, %d threads, shard %llu bytes\n", i,
                    w->ep, w->host, (unsigned long long)w->rpid, node, w->threads, (unsigned long long)w->shard_bytes);
        else if (o->verbose)
            fprintf(stderr, "numoe: worker %d: pid %d, node %s, %d threads, shard %llu bytes, slot %zu bytes\n", i,
                    (int)w->pid, node, w->threads, (unsigned long long)w->shard_bytes, w->slot.bytes);
    }
    if (o->verbose)
        fprintf(stderr, "numoe: %d workers (placement %s, %s hand-off) hold %llu bytes of routed experts; the model has %llu\n",
                rb->n, o->placement, rb->tcp ? "tcp inline" : rb->handoff == NUMOE__HANDOFF__HANDOFF_ZMQ ? "ZeroMQ" : "doorbell",
                (unsigned long long)total, (unsigned long long)routed);
    if (total != routed) {
        nm_errf(err, "the workers hold %llu bytes of routed experts, the model has %llu: the placement lost or "
                "duplicated weights", (unsigned long long)total, (unsigned long long)routed);
        rb->broken = 1;
        remote_destroy(&rb->base);
        return NULL;
    }
    return &rb->base;
}
