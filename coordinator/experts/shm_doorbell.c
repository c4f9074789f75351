/* shm_doorbell.c - the doorbell hand-off (shm_doorbell.h). */
#include "coordinator/experts/shm_doorbell.h"

#include <stdatomic.h>
#include <string.h>

#include "common/clock.h"

/* Copies the request into w's slot and rings its doorbell. */
static void post(nm_remote *rb, nm_remote_worker *w) {
    const nm_remote_inflight *q = &rb->q;
    const nm_expert_input *in = &rb->base.in;
    nm_slot_header *h = w->slot.h;
    if (q->n_tok) {
        size_t xb = (size_t)(q->n_tok * rb->n_embd) * sizeof(float), kb = (size_t)(q->n_tok * q->k) * sizeof(int32_t);
        memcpy(w->slot.x, in->x, xb);
        memcpy(w->slot.ids, in->ids, kb);
        memcpy(w->slot.w, in->w, kb);
    }
    h->op = q->layer < 0 ? NM_SLOT_OP_PING : NM_SLOT_OP_MOE;
    h->layer = (uint32_t)q->layer, h->n_tok = q->n_tok, h->k = q->k, h->seq = q->seq;
    w->t_posted = nm_now_s();
    nm_doorbell_ring(&h->req, ++w->req);
}

/* Waits for worker w's answer to request number w->req (doorbell); a worker
 * that dies or times out is restarted (by the launcher) and given the
 * request again. */
static int await_doorbell(nm_remote *rb, nm_remote_worker *w, nm_err *err) {
    int layer = rb->q.layer;
    for (;;) {
        nm_slot_header *h = w->slot.h;
        unsigned old = w->req - 1;
        double t0 = nm_now_s();
        int64_t spin = (int64_t)rb->spin_us * 1000;
        nm_err why;
        int failed = 0;
        /* after the spin, wake every 10 ms to see whether it is still alive */
        while (nm_doorbell_wait(&h->done, old, spin, 10 * 1000000LL)) {
            spin = 0;
            if (nm_remote_check_gone(w)) {
                nm_errf(&why, "worker %d (pid %d) died while computing layer %d", w->id, (int)w->pid, layer);
                failed = 1;
                break;
            }
            if (nm_now_s() - t0 > rb->timeout_s) {
                nm_errf(&why, "worker %d (pid %d) did not answer layer %d within %.0f s (--worker-timeout)", w->id,
                        (int)w->pid, layer, rb->timeout_s);
                failed = 1;
                break;
            }
        }
        if (!failed) break;
        if (nm_remote_await_restart(rb, w, &why, w->t_posted, err)) return -1;
        post(rb, w);
    }
    if (atomic_load_explicit(&w->slot.h->done.seq, memory_order_acquire) != w->req)
        return nm_errf(err, "worker %d (pid %d) answered request %u while %u was expected", w->id, (int)w->pid,
                       atomic_load(&w->slot.h->done.seq), w->req);
    nm_slot_header *h = w->slot.h;
    if (h->status) {
        char msg[NM_SLOT_ERROR_LEN + 1];
        memcpy(msg, h->error, NM_SLOT_ERROR_LEN);
        msg[NM_SLOT_ERROR_LEN] = 0;
        return nm_errf(err, "worker %d (pid %d) failed layer %d: %s", w->id, (int)w->pid, layer, msg);
    }
    return 0;
}

/* Every worker's doorbell at once, so worker 0 computes while worker 1's
 * slot is being filled. */
int nm_shm_submit(nm_remote *rb, nm_err *err) {
    (void)err;
    for (int i = 0; i < rb->n; i++) post(rb, &rb->w[i]);
    return 0;
}

int nm_shm_wait(nm_remote *rb, float *out, nm_err *err) {
    /* wait for all before failing, so no worker is left computing into a slot */
    int rc = 0;
    nm_err first;
    for (int i = 0; i < rb->n; i++)
        if (await_doorbell(rb, &rb->w[i], rc ? NULL : &first) && !rc) rc = -1;
    if (rc) {
        *err = first;
        return -1;
    }
    nm_remote_sum_slots(rb, rb->q.n_tok, out);
    return 0;
}
