/* tcp_inline.c - workers started by hand (tcp_inline.h). */
#include "coordinator/experts/tcp_inline.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "common/clock.h"

#define HANDSHAKE_RESETS_FATAL 3

/* Reads what w's socket monitor saw (connected / disconnected). */
static void drain_monitor(nm_remote_worker *w) {
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, w->mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        uint16_t ev = 0;
        uint32_t value = 0;
        if (zmq_msg_size(&m) >= 2) memcpy(&ev, zmq_msg_data(&m), 2);
        if (zmq_msg_size(&m) >= 6) memcpy(&value, (const char *)zmq_msg_data(&m) + 2, 4);
        int more = zmq_msg_more(&m);
        zmq_msg_close(&m);
        if (more) { /* the endpoint frame */
            zmq_msg_init(&m);
            zmq_msg_recv(&m, w->mon, 0);
            zmq_msg_close(&m);
        }
        if (ev == ZMQ_EVENT_CONNECTED) w->connected = 1;
        if (ev == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) w->handshaken = 1, w->handshake_resets = 0;
        /* a connection that never passed the handshake is not lost: ZeroMQ
         * tries again by itself, and its failure is judged below */
        if (ev == ZMQ_EVENT_DISCONNECTED && w->handshaken) w->lost = 1;
        /* A mechanism mismatch or a refused key is final. A transport error
         * during the handshake (NO_DETAIL: the errno) may be one: a CURVE
         * server that cannot read our hello drops the connection, every
         * time. Or it may be a passing one: a worker that dies closes its
         * listening socket a moment after its connections, and a reconnect
         * that lands in between is accepted by the kernel and then reset
         * (measured: 2 in 187 restarts with two busy loops beside the
         * test). So only the third in a row counts. */
        if (ev == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL) w->handshake_value = (int)value;
        if (ev == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL && ++w->handshake_resets < HANDSHAKE_RESETS_FATAL) continue;
        if (ev & (ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                  ZMQ_EVENT_HANDSHAKE_FAILED_AUTH))
            w->handshake_failed = ev;
    }
}

/* the NO_DETAIL failures, for the error: "3 times in a row: Connection reset by peer" */
static const char *resets_why(nm_remote_worker *w) {
    static _Thread_local char why[96];
    snprintf(why, sizeof why, "%d times in a row: %s", w->handshake_resets,
             w->handshake_value ? strerror(w->handshake_value) : "the connection closed");
    return why;
}

static double env_seconds(const char *name, double dflt) {
    const char *v = getenv(name);
    return v && atof(v) > 0 ? atof(v) : dflt;
}

/* A fresh DEALER for w (nothing of an earlier connection stays queued in
 * it), with a monitor, connected, and the hello sent. */
static int tcp_open(nm_remote *rb, nm_remote_worker *w, nm_err *err) {
    if (w->mon) zmq_close(w->mon);
    if (w->dsock) zmq_close(w->dsock);
    w->mon = w->dsock = NULL;
    w->connected = w->lost = w->registered = w->attached = w->handshake_failed = w->handshake_resets = w->handshaken = 0;
    char mon[64];
    snprintf(mon, sizeof mon, "inproc://numoe-monitor-%d-%u", w->id, w->generation++);
    int zero = 0, sndtimeo = 5000;
    if (!(w->dsock = zmq_socket(rb->zctx, ZMQ_DEALER)) || zmq_setsockopt(w->dsock, ZMQ_LINGER, &zero, sizeof zero) ||
        zmq_setsockopt(w->dsock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo) ||
        zmq_socket_monitor(w->dsock, mon, ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED |
                                               ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                                               ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) ||
        !(w->mon = zmq_socket(rb->zctx, ZMQ_PAIR)) || zmq_connect(w->mon, mon))
        return nm_errf(err, "worker %d: cannot connect to %s: %s", w->id, w->ep, zmq_strerror(zmq_errno()));
    if (rb->keyed && nm_wire_key_client(w->dsock, &rb->key, err)) return nm_err_prefix(err, "worker %d", w->id);
    if (zmq_connect(w->dsock, w->ep))
        return nm_errf(err, "worker %d: cannot connect to %s: %s", w->id, w->ep, zmq_strerror(zmq_errno()));
    Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
    Numoe__Heartbeat hb = NUMOE__HEARTBEAT__INIT;
    hb.time_ns = (uint64_t)nm_now_ns();
    env.msg_case = NUMOE__ENVELOPE__MSG_HEARTBEAT, env.heartbeat = &hb;
    if (nm_wire_send(w->dsock, NULL, &env, err)) return nm_err_prefix(err, "worker %d at %s", w->id, w->ep);
    return 0;
}

/* Checks w's Register (its answer to the hello) and replies. */
static int tcp_on_register(nm_remote *rb, nm_remote_worker *w, const Numoe__Register *r, nm_err *err) {
    char reason[800];
    if (r->protocol_version == NM_PROTOCOL_VERSION && r->n_workers == (uint32_t)rb->n && r->worker_id != (uint32_t)w->id)
        snprintf(reason, sizeof reason, "the worker at %s is worker %u of %u, but it is endpoint %d of "
                 "--worker-endpoints (worker i must be the i-th endpoint)", w->ep, r->worker_id, r->n_workers, w->id);
    else
        nm_remote_register_reason(rb, r, reason, sizeof reason);
    Numoe__Envelope out = NUMOE__ENVELOPE__INIT;
    Numoe__RegisterReply rr = NUMOE__REGISTER_REPLY__INIT;
    rr.accepted = !reason[0];
    rr.reason = reason;
    rr.protocol_version = NM_PROTOCOL_VERSION;
    rr.handoff = NUMOE__HANDOFF__HANDOFF_INLINE;
    out.msg_case = NUMOE__ENVELOPE__MSG_REGISTER_REPLY, out.register_reply = &rr;
    nm_wire_send(w->dsock, NULL, &out, NULL);
    if (reason[0]) return nm_errf(err, "worker at %s refused: %s", w->ep, reason);
    if (strcmp(r->build_id, nm_build_id()))
        fprintf(stderr, "numoe: note: worker %d at %s was built differently (%s; coordinator: %s)\n", w->id, w->ep,
                r->build_id, nm_build_id());
    w->registered = w->attached = 1;
    w->shard_bytes = r->shard_bytes;
    w->node = r->node, w->threads = (int)r->threads, w->cpus = (int)r->cores;
    w->rpid = r->pid;
    snprintf(w->host, sizeof w->host, "%s", r->host);
    return 0;
}

/* Waits until worker `only` (or every worker: -1) has registered. climit:
 * how long an endpoint may go without accepting a connection; slimit: how
 * long registering may take in all. */
static int tcp_await(nm_remote *rb, int only, double climit, double slimit, nm_err *err) {
    double t0 = nm_now_s();
    int lo = only < 0 ? 0 : only, hi = only < 0 ? rb->n : only + 1, m = hi - lo;
    zmq_pollitem_t *it = calloc((size_t)m, sizeof *it);
    if (!it) return nm_errf(err, "out of memory");
    int rc = 0;
    for (;;) {
        int ready = 0;
        for (int i = lo; i < hi; i++) ready += rb->w[i].registered;
        if (ready == m) break;
        for (int i = lo; i < hi; i++) it[i - lo] = (zmq_pollitem_t){rb->w[i].dsock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(it, m, 50) < 0 && zmq_errno() != EINTR) {
            rc = nm_errf(err, "waiting for the workers: %s", zmq_strerror(zmq_errno()));
            break;
        }
        double t = nm_now_s() - t0;
        for (int i = lo; i < hi && !rc; i++) {
            nm_remote_worker *w = &rb->w[i];
            drain_monitor(w);
            if (w->registered) continue;
            if (w->handshake_failed)
                rc = nm_errf(err, "worker %d at %s: the %s handshake failed (%s): both sides need the same key file "
                             "(--worker-key here, --key on the worker) or neither", i, w->ep,
                             rb->keyed ? "CURVE" : "ZeroMQ",
                             w->handshake_failed == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH ? "the worker refused our key"
                             : w->handshake_failed == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL ? "security mechanisms differ"
                                                                                          : resets_why(w));
            else if (!w->connected && t > climit)
                rc = nm_errf(err, "worker %d: nothing accepted a connection at %s within %.0f s; start `numoe-worker "
                             "--worker-id %d --workers %d ... --listen %s` there first (or set "
                             "NUMOE_WORKER_CONNECT_TIMEOUT_S)", i, w->ep, climit, i, rb->n, w->ep);
            else if (w->lost && only < 0)
                rc = nm_errf(err, "lost the connection to worker %d at %s before it registered", i, w->ep);
            else if (w->lost) /* came and went while restarting: a new socket, a new hello */
                rc = tcp_open(rb, w, err);
            else if (t > slimit)
                rc = nm_errf(err, "worker %d at %s did not register within %.0f s (set NUMOE_WORKER_NM_REMOTE_START_TIMEOUT_S)",
                             i, w->ep, slimit);
            while (!rc && !w->registered) {
                Numoe__Envelope *env;
                if (nm_wire_recv(w->dsock, 0, NULL, &env, NULL)) break;
                if (env->msg_case == NUMOE__ENVELOPE__MSG_REGISTER) rc = tcp_on_register(rb, w, env->register_, err);
                else if (env->msg_case == NUMOE__ENVELOPE__MSG_ERROR)
                    rc = nm_errf(err, "worker %d at %s: %s", i, w->ep, env->error->message);
                numoe__envelope__free_unpacked(env, NULL);
            }
        }
        if (rc) break;
    }
    free(it);
    return rc;
}

/* Connects to every endpoint, says hello, checks the Registers. */
int nm_tcp_connect_all(nm_remote *rb, nm_err *err) {
    for (int i = 0; i < rb->n; i++)
        if (tcp_open(rb, &rb->w[i], err)) return -1;
    return tcp_await(rb, -1, env_seconds("NUMOE_WORKER_CONNECT_TIMEOUT_S", 10.0),
                     env_seconds("NUMOE_WORKER_NM_REMOTE_START_TIMEOUT_S", NM_REMOTE_START_TIMEOUT_S), err);
}

/* Worker w's connection dropped or it did not answer (why): nobody here can
 * restart it, but whoever runs it (systemd, a user) may. A new connection
 * is opened and, once a worker at that endpoint has registered and passed
 * the same checks, the caller sends it the layer again. Up to
 * NUMOE_WORKER_RECONNECT_S (default 60 s; 0 = fail at once). */
static int tcp_reconnect(nm_remote *rb, nm_remote_worker *w, const char *why, nm_err *err) {
    const char *v = getenv("NUMOE_WORKER_RECONNECT_S");
    double limit = v && *v ? atof(v) : 60.0;
    if (limit <= 0) return nm_errf(err, "%s (NUMOE_WORKER_RECONNECT_S=0: not waiting for it)", why);
    fprintf(stderr, "numoe: %s; waiting up to %.0f s for a worker at %s to come back (NUMOE_WORKER_RECONNECT_S)\n",
            why, limit, w->ep);
    double t0 = nm_now_s();
    nm_err e;
    if (tcp_open(rb, w, &e) || tcp_await(rb, w->id, limit, limit, &e))
        return nm_errf(err, "%s; it did not come back: %s", why, e.msg);
    fprintf(stderr, "numoe: worker %d at %s is back after %.1f ms (host %s, pid %llu)\n", w->id, w->ep,
            (nm_now_s() - t0) * 1e3, w->host, (unsigned long long)w->rpid);
    return 0;
}

static int tcp_send_request(nm_remote *rb, nm_remote_worker *w, const Numoe__MoeRequest *rq, nm_err *err) {
    (void)rb;
    Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
    env.msg_case = NUMOE__ENVELOPE__MSG_MOE_REQUEST, env.moe_request = (Numoe__MoeRequest *)rq;
    if (nm_wire_send(w->dsock, NULL, &env, err)) return nm_err_prefix(err, "worker %d at %s", w->id, w->ep);
    return 0;
}

/* The MoeRequest of the layer in flight: the data inline, straight from the
 * input region. */
static void request_of(nm_remote *rb, Numoe__MoeRequest *rq) {
    const nm_remote_inflight *q = &rb->q;
    const nm_expert_input *in = &rb->base.in;
    size_t xb = (size_t)(q->n_tok * rb->n_embd) * sizeof(float), kb = (size_t)(q->n_tok * q->k) * sizeof(int32_t);
    *rq = (Numoe__MoeRequest)NUMOE__MOE_REQUEST__INIT;
    rq->seq = q->seq, rq->layer = q->layer < 0 ? UINT32_MAX : (uint32_t)q->layer, rq->n_tok = (uint32_t)q->n_tok,
    rq->k = (uint32_t)q->k;
    rq->x.data = (uint8_t *)in->x, rq->x.len = xb;
    rq->ids.data = (uint8_t *)in->ids, rq->ids.len = kb;
    rq->weights.data = (uint8_t *)in->w, rq->weights.len = kb;
}

/* The data goes out in every MoeRequest; a worker lost since the last layer
 * is waited for first (tcp_reconnect). */
int nm_tcp_submit(nm_remote *rb, nm_err *err) {
    Numoe__MoeRequest rq;
    request_of(rb, &rq);
    char why[600];
    for (int i = 0; i < rb->n; i++) {
        nm_remote_worker *w = &rb->w[i];
        drain_monitor(w);
        if (w->lost) {
            snprintf(why, sizeof why, "lost the connection to worker %d at %s before layer %d", i, w->ep, rb->q.layer);
            if (tcp_reconnect(rb, w, why, err)) return -1;
        }
        if (tcp_send_request(rb, w, &rq, err)) return -1;
        w->t_posted = nm_now_s();
    }
    return 0;
}

/* The partial sums come back in the MoeReplies and are added in worker
 * order. A worker lost on the way is waited for and sent the layer again. */
int nm_tcp_wait(nm_remote *rb, float *out, nm_err *err) {
    const int64_t H = rb->n_embd, n_tok = rb->q.n_tok;
    const int layer = rb->q.layer;
    size_t xb = (size_t)(n_tok * H) * sizeof(float);
    Numoe__MoeRequest rq;
    request_of(rb, &rq);
    char why[600];
    Numoe__Envelope **rep = calloc((size_t)rb->n, sizeof *rep);
    zmq_pollitem_t *it = calloc((size_t)rb->n, sizeof *it);
    if (!rep || !it) {
        free(rep), free(it);
        return nm_errf(err, "out of memory");
    }
    int got = 0, rc = 0;
    while (got < rb->n && !rc) {
        for (int i = 0; i < rb->n; i++) it[i] = (zmq_pollitem_t){rb->w[i].dsock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(it, rb->n, 50) < 0 && zmq_errno() != EINTR) {
            rc = nm_errf(err, "waiting for the workers: %s", zmq_strerror(zmq_errno()));
            break;
        }
        for (int i = 0; i < rb->n && !rc; i++) {
            nm_remote_worker *w = &rb->w[i];
            Numoe__Envelope *env;
            while (!rep[i] && !rc && nm_wire_recv(w->dsock, 0, NULL, &env, NULL) == 0) {
                const Numoe__MoeReply *r = env->moe_reply;
                if (env->msg_case == NUMOE__ENVELOPE__MSG_MOE_REPLY && r->seq == rq.seq) {
                    if (r->status != NUMOE__STATUS__STATUS_OK)
                        rc = nm_errf(err, "worker %d at %s failed layer %d: %s", i, w->ep, layer, r->error);
                    else if (r->out.len != xb)
                        rc = nm_errf(err, "worker %d at %s answered layer %d with %zu bytes, %zu expected", i, w->ep,
                                     layer, r->out.len, xb);
                    else {
                        rep[i] = env, got++;
                        continue;
                    }
                } else if (env->msg_case == NUMOE__ENVELOPE__MSG_ERROR) {
                    rc = nm_errf(err, "worker %d at %s: %s", i, w->ep, env->error->message);
                }
                numoe__envelope__free_unpacked(env, NULL);
            }
            if (rc || rep[i]) continue;
            drain_monitor(w);
            why[0] = 0;
            if (w->lost)
                snprintf(why, sizeof why, "lost the connection to worker %d at %s while it computed layer %d", i, w->ep,
                         layer);
            else if (nm_now_s() - w->t_posted > rb->timeout_s)
                snprintf(why, sizeof why, "worker %d at %s did not answer layer %d within %.0f s (--worker-timeout)", i,
                         w->ep, layer, rb->timeout_s);
            if (why[0] && !(rc = tcp_reconnect(rb, w, why, err))) {
                rc = tcp_send_request(rb, w, &rq, err);
                w->t_posted = nm_now_s();
            }
        }
    }
    if (!rc && n_tok) {
        size_t n = (size_t)(n_tok * H);
        float *p = malloc(xb);
        if (!p) rc = nm_errf(err, "out of memory");
        for (int i = 0; i < rb->n && !rc; i++) {
            memcpy(p, rep[i]->moe_reply->out.data, xb); /* the message's bytes need not be aligned */
            if (i == 0) memcpy(out, p, xb);
            else
                for (size_t j = 0; j < n; j++) out[j] += p[j];
        }
        free(p);
    }
    for (int i = 0; i < rb->n; i++)
        if (rep[i]) numoe__envelope__free_unpacked(rep[i], NULL);
    free(rep), free(it);
    return rc;
}

void nm_tcp_close(nm_remote *rb) {
    for (int i = 0; rb->tcp && i < rb->n; i++) {
        nm_remote_worker *w = &rb->w[i];
        if (w->dsock && w->registered && !w->lost) {
            int linger = 500; /* let the Shutdown go out */
            zmq_setsockopt(w->dsock, ZMQ_LINGER, &linger, sizeof linger);
            Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
            Numoe__Shutdown sd = NUMOE__SHUTDOWN__INIT;
            sd.reason = "coordinator exiting";
            env.msg_case = NUMOE__ENVELOPE__MSG_SHUTDOWN, env.shutdown = &sd;
            nm_wire_send(w->dsock, NULL, &env, NULL);
        }
        if (w->mon) zmq_close(w->mon);
        if (w->dsock) zmq_close(w->dsock);
        w->mon = w->dsock = NULL;
    }
}
