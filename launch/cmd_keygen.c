/* cmd_keygen.c - `numoe keygen FILE`: a new CURVE key file for tcp workers
 * (proto/wire_key.h). */
#include <stdio.h>
#include <string.h>

#include "launch/commands.h"
#include "proto/wire_key.h"

int nm_cmd_keygen(int argc, char **argv) {
    if (argc != 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        FILE *f = argc == 2 ? stdout : stderr;
        fprintf(f, "usage: numoe keygen FILE\n\n"
                   "Writes a new ZeroMQ CURVE key pair to FILE (mode 0600; an existing FILE is left alone).\n"
                   "Copy it to every host; start the workers with `numoe-worker ... --listen tcp://ADDR:PORT\n"
                   "--key FILE` and the coordinator with `--worker-endpoints ... --worker-key FILE`: their\n"
                   "traffic is then encrypted, and a worker admits only coordinators holding the file.\n");
        return argc == 2 ? 0 : 2;
    }
    nm_err err;
    if (nm_wire_key_generate(argv[1], &err)) return fprintf(stderr, "numoe keygen: %s\n", err.msg), 1;
    fprintf(stderr, "numoe keygen: wrote %s\n", argv[1]);
    return 0;
}
