/* wire_key.c - CURVE key files and the ZAP handler (wire_key.h). */
#include "proto/wire_key.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

int nm_wire_key_generate(const char *path, nm_err *err) {
    char pub[41], sec[41];
    if (zmq_curve_keypair(pub, sec))
        return nm_errf(err, "cannot make a CURVE key pair: %s (libzmq built without CURVE?)", zmq_strerror(zmq_errno()));
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return nm_errf(err, "%s: cannot create: %s", path, strerror(errno));
    char buf[128];
    int n = snprintf(buf, sizeof buf, "public %s\nsecret %s\n", pub, sec);
    int bad = write(fd, buf, (size_t)n) != n;
    bad |= close(fd) != 0;
    memset(sec, 0, sizeof sec), memset(buf, 0, sizeof buf);
    if (bad) {
        unlink(path);
        return nm_errf(err, "%s: cannot write: %s", path, strerror(errno));
    }
    return 0;
}

int nm_wire_key_load(const char *path, nm_wire_key *k, nm_err *err) {
    memset(k, 0, sizeof *k);
    FILE *f = fopen(path, "re");
    if (!f) return nm_errf(err, "%s: cannot open the key file: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && (st.st_mode & 077)) {
        fclose(f);
        return nm_errf(err, "%s: the key file may be read by others (mode %03o); chmod 600 it", path,
                       (unsigned)(st.st_mode & 0777));
    }
    char line[256];
    while (fgets(line, sizeof line, f)) {
        char *v = NULL;
        if (!strncmp(line, "public ", 7)) v = k->public_z85;
        else if (!strncmp(line, "secret ", 7)) v = k->secret_z85;
        else continue;
        size_t n = strcspn(line + 7, "\r\n");
        if (n != 40) {
            fclose(f);
            return nm_errf(err, "%s: a key must be 40 Z85 characters (got %zu)", path, n);
        }
        memcpy(v, line + 7, 40);
        v[40] = 0;
    }
    fclose(f);
    memset(line, 0, sizeof line);
    char derived[41];
    if (!k->public_z85[0] || !k->secret_z85[0])
        return nm_errf(err, "%s: needs a 'public' and a 'secret' line (make one with `numoe keygen FILE`)", path);
    if (!zmq_z85_decode(k->public_bin, k->public_z85) || zmq_curve_public(derived, k->secret_z85) ||
        strcmp(derived, k->public_z85))
        return nm_errf(err, "%s: the public key is not the secret key's (or not Z85)", path);
    return 0;
}

int nm_wire_key_server(void *sock, const nm_wire_key *k, nm_err *err) {
    int one = 1;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof one) ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, k->secret_z85, 40) ||
        zmq_setsockopt(sock, ZMQ_ZAP_DOMAIN, "numoe", 5))
        return nm_errf(err, "CURVE server: %s", zmq_strerror(zmq_errno()));
    return 0;
}

int nm_wire_key_client(void *sock, const nm_wire_key *k, nm_err *err) {
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, k->public_z85, 40) ||
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, k->public_z85, 40) ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, k->secret_z85, 40))
        return nm_errf(err, "CURVE client: %s", zmq_strerror(zmq_errno()));
    return 0;
}

void *nm_wire_zap_open(void *zctx, nm_err *err) {
    void *s = zmq_socket(zctx, ZMQ_REP);
    int zero = 0;
    if (!s || zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero) || zmq_bind(s, "inproc://zeromq.zap.01")) {
        nm_errf(err, "ZAP handler: %s", zmq_strerror(zmq_errno()));
        if (s) zmq_close(s);
        return NULL;
    }
    return s;
}

/* ZAP (RFC 27): version, request id, domain, address, identity, mechanism,
 * credentials...; the reply is version, request id, status code, status
 * text, user id, metadata. */
int nm_wire_zap_answer(void *zap, const nm_wire_key *k) {
    zmq_msg_t part[8];
    int n = 0, more = 1;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, zap, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            for (int i = 0; i < n; i++) zmq_msg_close(&part[i]);
            return zmq_errno() == EAGAIN && n == 0 ? 0 : -1;
        }
        more = zmq_msg_more(&m);
        if (n < 8) part[n++] = m;
        else zmq_msg_close(&m);
    }
    int ok = n >= 7 && zmq_msg_size(&part[5]) == 5 && !memcmp(zmq_msg_data(&part[5]), "CURVE", 5) &&
             zmq_msg_size(&part[6]) == 32 && !memcmp(zmq_msg_data(&part[6]), k->public_bin, 32);
    const char *code = ok ? "200" : "400", *text = ok ? "OK" : "not the key of this cluster";
    zmq_send(zap, "1.0", 3, ZMQ_SNDMORE);
    if (n >= 2) zmq_send(zap, zmq_msg_data(&part[1]), zmq_msg_size(&part[1]), ZMQ_SNDMORE);
    else zmq_send(zap, "", 0, ZMQ_SNDMORE);
    zmq_send(zap, code, 3, ZMQ_SNDMORE);
    zmq_send(zap, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(zap, "", 0, ZMQ_SNDMORE);
    zmq_send(zap, "", 0, 0);
    for (int i = 0; i < n; i++) zmq_msg_close(&part[i]);
    return !ok;
}
