/* wire.h - numoe.proto messages over ZeroMQ, shared by the coordinator, the
 * workers and `numoe bench ipc`: one Envelope per frame (a ROUTER peer
 * prefixes the frame with the peer's routing id), the protocol version and
 * the build id. What both sides compare about the model at registration is
 * model/identity.h. */
#ifndef NUMOE_PROTO_WIRE_H
#define NUMOE_PROTO_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "proto/numoe.pb-c.h"

/* The protocol this tree speaks (numoe.proto: Protocol.PROTOCOL_CURRENT). */
#define NM_PROTOCOL_VERSION ((uint32_t)NUMOE__PROTOCOL__PROTOCOL_CURRENT)

/* numoe-worker's exit status after an error it reported to the coordinator
 * (an Error message, or the refusal it got): restarting it would fail the
 * same way, so the launcher does not. 0 is a clean shutdown, 2 a usage
 * error; anything else (a crash, a signal) is restarted. */
#define NM_WORKER_EXIT_ERROR 3

/* "numoe proto N, <compiler>, built <date time>": informational, printed
 * when the two sides differ (the protocol version is the contract). */
const char *nm_build_id(void);

#define NM_ROUTING_ID_MAX 256
typedef struct {
    uint8_t id[NM_ROUTING_ID_MAX];
    size_t len;
} nm_routing_id;

/* Packs env and sends it (after rid's frame when rid is non-NULL: ROUTER side).
 * Waits at most the socket's ZMQ_SNDTIMEO. */
int nm_wire_send(void *sock, const nm_routing_id *rid, const Numoe__Envelope *env, nm_err *err);
/* Receives one Envelope within timeout_ms (-1: no limit). rid gets the
 * routing id on a ROUTER socket (pass NULL on a DEALER). Returns 0 with *env
 * (free with numoe__envelope__free_unpacked(*env, NULL)), 1 on timeout or an
 * interrupted wait, -1 on an error or a malformed message. */
int nm_wire_recv(void *sock, int timeout_ms, nm_routing_id *rid, Numoe__Envelope **env, nm_err *err);

/* Name of the message in an Envelope ("Register", ...), for errors. */
const char *nm_wire_msg_name(const Numoe__Envelope *env);

#endif
