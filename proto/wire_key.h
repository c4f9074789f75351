/* wire_key.h - authentication and encryption of tcp workers: ZeroMQ CURVE
 * with one shared key file.
 *
 * Workers on other hosts listen on a tcp port; without a key anyone who can
 * reach it may send requests and read activations. With a key file (made by
 * `numoe keygen FILE`, mode 0600, copied to every host) both ends use the
 * same CURVE key pair: the worker as its server key, the coordinator as its
 * client key and as the server key it expects. The traffic is encrypted,
 * and the worker's ZAP handler admits only clients whose public key is the
 * file's, which a client can only show by holding the file's secret key -
 * so holding the file is the credential.
 *
 * File format, two lines: "public <40 Z85 chars>" and "secret <40 Z85 chars>". */
#ifndef NUMOE_PROTO_WIRE_KEY_H
#define NUMOE_PROTO_WIRE_KEY_H

#include <stdint.h>

#include "common/error.h"

typedef struct {
    char public_z85[41], secret_z85[41];
    uint8_t public_bin[32];
} nm_wire_key;

/* Writes a new key pair to path (created 0600; an existing file is an
 * error, so a key in use is not overwritten by mistake). */
int nm_wire_key_generate(const char *path, nm_err *err);
/* Reads path; a file others may read (mode & 077) is refused, as ssh does. */
int nm_wire_key_load(const char *path, nm_wire_key *k, nm_err *err);

/* Socket options, set before bind / connect. */
int nm_wire_key_server(void *sock, const nm_wire_key *k, nm_err *err);
int nm_wire_key_client(void *sock, const nm_wire_key *k, nm_err *err);

/* The ZAP handler: a REP socket on inproc://zeromq.zap.01 of ctx, which
 * libzmq asks about every CURVE handshake; the owner polls it with its
 * other sockets and calls nm_wire_zap_answer when it is readable. */
void *nm_wire_zap_open(void *zctx, nm_err *err);
/* Answers one pending request: 200 when the client's key is k's, else 400.
 * Returns 1 if a client was refused (so the caller can say so), 0 if
 * admitted or nothing was pending, -1 on a socket error. */
int nm_wire_zap_answer(void *zap, const nm_wire_key *k);

#endif
