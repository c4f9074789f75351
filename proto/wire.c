/* wire.c - Envelope framing over ZeroMQ (wire.h). */
#include "proto/wire.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

const char *nm_build_id(void) {
    static char id[200];
    if (!id[0])
        snprintf(id, sizeof id, "numoe proto %u, gcc %s, built %s %s", NM_PROTOCOL_VERSION, __VERSION__, __DATE__,
                 __TIME__);
    return id;
}

int nm_wire_send(void *sock, const nm_routing_id *rid, const Numoe__Envelope *env, nm_err *err) {
    size_t n = numoe__envelope__get_packed_size(env);
    uint8_t stackbuf[512], *buf = n <= sizeof stackbuf ? stackbuf : malloc(n);
    if (!buf) return nm_errf(err, "out of memory packing a %zu-byte message", n);
    numoe__envelope__pack(env, buf);
    int rc = 0;
    if (rid && zmq_send(sock, rid->id, rid->len, ZMQ_SNDMORE) < 0)
        rc = nm_errf(err, "sending %s: %s", nm_wire_msg_name(env), zmq_strerror(zmq_errno()));
    else if (zmq_send(sock, buf, n, 0) < 0)
        rc = nm_errf(err, "sending %s: %s", nm_wire_msg_name(env), zmq_strerror(zmq_errno()));
    if (buf != stackbuf) free(buf);
    return rc;
}

static void drain_more(void *sock) {
    int more = 1;
    size_t len = sizeof more;
    while (zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len) == 0 && more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        zmq_msg_recv(&m, sock, 0);
        zmq_msg_close(&m);
    }
}

int nm_wire_recv(void *sock, int timeout_ms, nm_routing_id *rid, Numoe__Envelope **env, nm_err *err) {
    *env = NULL;
    zmq_pollitem_t it = {sock, 0, ZMQ_POLLIN, 0};
    int r = zmq_poll(&it, 1, timeout_ms);
    if (r < 0) {
        if (zmq_errno() == EINTR) return 1;
        return nm_errf(err, "waiting for a message: %s", zmq_strerror(zmq_errno()));
    }
    if (r == 0) return 1;
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (rid) {
        if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return zmq_errno() == EAGAIN || zmq_errno() == EINTR
                       ? 1
                       : nm_errf(err, "receiving: %s", zmq_strerror(zmq_errno()));
        }
        size_t n = zmq_msg_size(&m);
        rid->len = n < sizeof rid->id ? n : sizeof rid->id;
        memcpy(rid->id, zmq_msg_data(&m), rid->len);
        int more = zmq_msg_more(&m);
        zmq_msg_close(&m);
        if (!more) return nm_errf(err, "received a message without a body");
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, 0) < 0) {
            zmq_msg_close(&m);
            return nm_errf(err, "receiving: %s", zmq_strerror(zmq_errno()));
        }
    } else if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&m);
        return zmq_errno() == EAGAIN || zmq_errno() == EINTR ? 1
                                                              : nm_errf(err, "receiving: %s", zmq_strerror(zmq_errno()));
    }
    int more = zmq_msg_more(&m);
    *env = numoe__envelope__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
    size_t size = zmq_msg_size(&m);
    zmq_msg_close(&m);
    if (more) drain_more(sock);
    if (!*env) return nm_errf(err, "received a malformed %zu-byte message (not a numoe Envelope)", size);
    return 0;
}

const char *nm_wire_msg_name(const Numoe__Envelope *env) {
    switch (env->msg_case) {
    case NUMOE__ENVELOPE__MSG_REGISTER: return "Register";
    case NUMOE__ENVELOPE__MSG_REGISTER_REPLY: return "RegisterReply";
    case NUMOE__ENVELOPE__MSG_MOE_REQUEST: return "MoeRequest";
    case NUMOE__ENVELOPE__MSG_MOE_REPLY: return "MoeReply";
    case NUMOE__ENVELOPE__MSG_HEARTBEAT: return "Heartbeat";
    case NUMOE__ENVELOPE__MSG_SHUTDOWN: return "Shutdown";
    case NUMOE__ENVELOPE__MSG_ERROR: return "Error";
    default: return "an empty Envelope";
    }
}
