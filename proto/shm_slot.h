/* shm_slot.h - the shared-memory slot between the coordinator and one worker,
 * and its doorbell.
 *
 * One slot per worker, a POSIX shm object (/dev/shm/numoe-<coordinator pid>-
 * w<id>-<random>) that the coordinator creates and sizes from the model and
 * its largest batch; the worker maps it after registration (the name comes
 * in RegisterReply) and unlinks the name at once, so nothing is left in
 * /dev/shm however either side ends. Layout (offsets in the header, each
 * region page-aligned):
 *
 *   header   nm_slot_header (one page)
 *   x        float32 [max_tok][n_embd]   hidden states (coordinator writes)
 *   ids      int32   [max_tok][max_k]    routed expert ids (coordinator writes)
 *   w        float32 [max_tok][max_k]    routing weights (coordinator writes)
 *   out      float32 [max_tok][n_embd]   the worker's partial sums (worker writes)
 *
 * Doorbell (the per-layer hand-off; ZeroMQ is too slow for it, see
 * `numoe bench ipc`): the coordinator fills the request fields, then stores
 * req.seq + 1; the worker, which polls req.seq for a while and then sleeps on
 * it with FUTEX_WAIT, computes, fills the reply fields and stores done.seq =
 * req.seq.
 * The coordinator waits on done the same way. A side about to sleep sets its
 * *_sleeping word before re-reading the sequence word, and the ringer reads
 * *_sleeping after storing the sequence word (all seq_cst), so one of the two
 * always sees the other and no wake-up is lost (same argument as
 * kernels/threadpool.c). Futexes here are process-shared (no _PRIVATE).
 *
 * Atomics in a shared mapping: atomic_uint is lock-free on every platform
 * numoe builds for, and lock-free atomics are address-free. */
#ifndef NUMOE_PROTO_SHM_SLOT_H
#define NUMOE_PROTO_SHM_SLOT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#define NM_SLOT_MAGIC 0x544f4c53454f4d4eull /* "NMOESLOT" */
#define NM_SLOT_LAYOUT 1                    /* bump with any change below (and the protocol version) */
#define NM_SLOT_PAGE 4096
#define NM_SLOT_ERROR_LEN 512

/* What the doorbell asks for. */
enum {
    NM_SLOT_OP_NONE = 0,
    NM_SLOT_OP_MOE = 1,     /* layer, n_tok, k: compute the partial sums into out */
    NM_SLOT_OP_PING = 2,    /* empty round trip (`numoe bench ipc`) */
    NM_SLOT_OP_CONTROL = 3, /* a control message (Shutdown) waits on the ZeroMQ socket: read it now */
};

/* One direction of the doorbell: the ringer stores seq (and the CPU it runs
 * on); the waiter polls seq, then sleeps on it with `sleeping` set. */
typedef struct {
    atomic_uint seq;
    atomic_uint sleeping;
    atomic_int cpu; /* the ringer's CPU at its last ring: a waiter on that same CPU sleeps at once */
    uint32_t pad;
} nm_doorbell;

typedef struct {
    /* written once by the coordinator before the worker maps the slot */
    uint64_t magic;
    uint32_t layout, protocol;
    uint64_t bytes;                       /* whole slot */
    int64_t n_embd, max_tok, max_k;
    uint64_t off_x, off_ids, off_w, off_out;
    uint32_t worker_id, pad0;
    /* request: the coordinator writes the fields, then rings req */
    _Alignas(64) nm_doorbell req;
    uint32_t op, layer;
    int64_t n_tok;
    int32_t k, pad1;
    uint64_t seq;
    /* reply: the worker writes the fields, then rings done with the value of req */
    _Alignas(64) nm_doorbell done;
    int32_t status; /* 0 ok, else error text below */
    uint32_t pad2;
    uint64_t compute_ns;
    char error[NM_SLOT_ERROR_LEN];
} nm_slot_header;

_Static_assert(sizeof(nm_slot_header) <= NM_SLOT_PAGE, "slot header must fit its page");

/* A mapped slot, either side. */
typedef struct {
    nm_slot_header *h;
    size_t bytes;
    float *x, *w, *out;
    int32_t *ids;
} nm_slot;

/* Bytes of a slot for these sizes, 0 on overflow. */
size_t nm_slot_bytes(int64_t n_embd, int64_t max_tok, int64_t max_k);

/* Coordinator: creates (O_EXCL) and maps the shm object `name` ("/numoe-..."),
 * writes the header. On error nothing is left behind. */
int nm_slot_create(nm_slot *s, const char *name, uint32_t worker_id, int64_t n_embd, int64_t max_tok, int64_t max_k,
                   nm_err *err);
/* Worker: maps an existing slot, checks its header against the expected
 * size and width, and unlinks the name (the mapping stays). */
int nm_slot_attach(nm_slot *s, const char *name, uint64_t expect_bytes, int64_t n_embd, nm_err *err);
void nm_slot_unmap(nm_slot *s);

/* nm_doorbell_ring stores value in d->seq and wakes a sleeper.
 * nm_doorbell_wait waits until d->seq != old: polls for spin_ns (yielding
 * the CPU now and then; 0: 64 polls, < 0: none), then sleeps on the futex;
 * returns 0 when the word changed, 1 when timeout_ns (< 0: none) passed or a
 * signal interrupted the sleep (the caller checks its own conditions and
 * calls again). Polling is skipped when the waiter runs on the CPU the other
 * side last rang from: that side needs this CPU to answer, and a poller
 * only delays it (measured: ~28 us per round trip instead of ~2 us). */
void nm_doorbell_ring(nm_doorbell *d, unsigned value);
int nm_doorbell_wait(nm_doorbell *d, unsigned old, int64_t spin_ns, int64_t timeout_ns);

/* Removes /dev/shm/numoe-<pid>-* objects whose creating process is gone
 * (left by a coordinator killed while it was starting workers). Returns the
 * number removed. */
int nm_slot_sweep_stale(void);

#endif
