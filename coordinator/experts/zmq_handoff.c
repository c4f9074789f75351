/* zmq_handoff.c - the ZeroMQ message hand-off (zmq_handoff.h). */
#include "coordinator/experts/zmq_handoff.h"

#include <stdlib.h>
#include <string.h>

#include "common/clock.h"

/* Copies the inputs into every slot and sends every worker its MoeRequest. */
int nm_zmq_submit(nm_remote *rb, nm_err *err) {
    const nm_remote_inflight *q = &rb->q;
    const nm_expert_input *in = &rb->base.in;
    for (int i = 0; q->n_tok && i < rb->n; i++) {
        nm_remote_worker *w = &rb->w[i];
        size_t xb = (size_t)(q->n_tok * rb->n_embd) * sizeof(float), kb = (size_t)(q->n_tok * q->k) * sizeof(int32_t);
        memcpy(w->slot.x, in->x, xb);
        memcpy(w->slot.ids, in->ids, kb);
        memcpy(w->slot.w, in->w, kb);
    }
    for (int i = 0; i < rb->n; i++) {
        Numoe__Envelope env = NUMOE__ENVELOPE__INIT;
        Numoe__MoeRequest rq = NUMOE__MOE_REQUEST__INIT;
        rq.seq = q->seq, rq.layer = (uint32_t)(q->layer < 0 ? -1 : q->layer), rq.n_tok = (uint32_t)q->n_tok,
        rq.k = (uint32_t)q->k;
        env.msg_case = NUMOE__ENVELOPE__MSG_MOE_REQUEST, env.moe_request = &rq;
        if (nm_wire_send(rb->sock, &rb->w[i].rid, &env, err)) return nm_err_prefix(err, "worker %d", i);
        rb->w[i].t_posted = nm_now_s();
    }
    return 0;
}

/* Collects every worker's MoeReply, then adds the partial sums from the slots. */
int nm_zmq_wait(nm_remote *rb, float *out, nm_err *err) {
    int layer = rb->q.layer;
    uint64_t seq = rb->q.seq;
    int got = 0;
    uint8_t *seen = calloc((size_t)rb->n, 1);
    if (!seen) return nm_errf(err, "out of memory");
    double t0 = rb->w[0].t_posted;
    int rc = 0;
    while (got < rb->n && !rc) {
        Numoe__Envelope *env;
        nm_routing_id rid;
        int r = nm_wire_recv(rb->sock, 50, &rid, &env, err);
        if (r < 0) {
            rc = -1;
            break;
        }
        if (r == 1) {
            for (int i = 0; i < rb->n && !rc; i++)
                if (!seen[i] && nm_remote_check_gone(&rb->w[i]))
                    rc = nm_errf(err, "worker %d (pid %d) died while computing layer %d (the ZeroMQ hand-off does "
                                 "not restart workers)", i, (int)rb->w[i].pid, layer);
            if (!rc && nm_now_s() - t0 > rb->timeout_s)
                for (int i = 0; i < rb->n && !rc; i++)
                    if (!seen[i])
                        rc = nm_errf(err, "worker %d (pid %d) did not answer layer %d within %.0f s (--worker-timeout)",
                                     i, (int)rb->w[i].pid, layer, rb->timeout_s);
            continue;
        }
        nm_remote_worker *w = nm_remote_by_rid(rb, &rid);
        if (w && env->msg_case == NUMOE__ENVELOPE__MSG_MOE_REPLY && env->moe_reply->seq == seq && !seen[w->id]) {
            seen[w->id] = 1, got++;
            if (env->moe_reply->status != NUMOE__STATUS__STATUS_OK)
                rc = nm_errf(err, "worker %d (pid %d) failed layer %d: %s", w->id, (int)w->pid, layer,
                             env->moe_reply->error);
        } else if (env->msg_case == NUMOE__ENVELOPE__MSG_ERROR) {
            rc = env->error->from_launcher ? nm_errf(err, "%s", env->error->message)
                                           : nm_errf(err, "worker %u: %s", env->error->worker_id, env->error->message);
        }
        numoe__envelope__free_unpacked(env, NULL);
    }
    free(seen);
    if (!rc) nm_remote_sum_slots(rb, rb->q.n_tok, out);
    return rc;
}
