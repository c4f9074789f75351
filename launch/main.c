/* main.c - `numoe`, the one command users run. It dispatches to a
 * subcommand. A command that runs a model with expert workers makes this
 * process the launcher (launch/launcher.h): it starts the workers and the
 * numoe-coordinator and supervises them; without workers the command runs
 * here, renamed numoe-coordinator. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coordinator/cli/commands.h"
#include "kernels/quant.h"
#include "launch/commands.h"
#include "launch/launcher.h"

#define NUMOE_VERSION "0.1.0"

static void usage(FILE *f) {
    fprintf(f,
            "numoe %s - DeepSeek MoE inference engine (GGUF)\n"
            "\n"
            "usage: numoe <command> [options]\n"
            "\n"
            "commands:\n"
            "  inspect MODEL.gguf      metadata, hyper-parameters, tokenizer summary, tensor table and\n"
            "                          dense vs routed-expert byte totals (first part of a split model)\n"
            "  generate                run a prompt (token ids or text) and generate more\n"
            "  chat                    interactive conversation with the model's chat template\n"
            "  serve                   OpenAI- and Ollama-compatible HTTP server with continuous batching\n"
            "  perplexity              perplexity of a model on a text file (windows as llama-perplexity)\n"
            "  tokenize                text to token ids with the model's tokenizer (vocab-only GGUFs too)\n"
            "  detokenize              token ids to text\n"
            "  topology                NUMA nodes, cores, memory, GPUs and numactl lines per worker\n"
            "  placement               check a placement map, or balance one from a --dump-routing profile\n"
            "  keygen FILE             a key file that encrypts and authenticates tcp workers (--worker-key)\n"
            "  bench                   prefill and decode tokens/s of a model (`numoe bench --help`)\n"
            "  bench kernels           quantised GEMV throughput per weight type vs memory bandwidth\n"
            "  bench ipc               per-layer hand-off round trip to expert workers (doorbell, ZeroMQ)\n"
            "  help                    this text; `numoe <command> --help` for a command's options\n"
            "  version                 print the version\n",
            NUMOE_VERSION);
}

/* The commands that run a model are the coordinator of the design card: they
 * show as `numoe-coordinator ...` in ps, top and `pgrep -f`, and the workers
 * they start as `numoe-worker ...`. argv[0] cannot grow in place, so the
 * process re-executes itself once under that name (same pid, same
 * descriptors). The kernel's 15-byte thread name is set in session.c. A
 * failed exec is harmless: the command runs on under its old name. */
static void become_coordinator(int argc, char **argv) {
    const char *base = strrchr(argv[0], '/');
    if (!strcmp(base ? base + 1 : argv[0], "numoe-coordinator")) return;
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    char **nargv = calloc((size_t)argc + 1, sizeof *nargv);
    if (n <= 0 || !nargv) return free(nargv);
    self[n] = 0;
    nargv[0] = "numoe-coordinator";
    for (int i = 1; i < argc; i++) nargv[i] = argv[i];
    execv(self, nargv);
    free(nargv);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    const char *isa_err = nm_isa_env_error();
    if (isa_err) {
        fprintf(stderr, "numoe: %s\n", isa_err);
        return 2;
    }
    int runs_model = !strcmp(cmd, "generate") || !strcmp(cmd, "chat") || !strcmp(cmd, "serve") ||
                     !strcmp(cmd, "perplexity") ||
                     (!strcmp(cmd, "bench") && !(argc >= 3 && !strcmp(argv[2], "kernels")));
    if (runs_model && !getenv("NUMOE_LAUNCH_ENDPOINT")) {
        /* with workers this process stays the launcher, and the coordinator is its child */
        nm_session_opts so;
        int n_workers = nm_launch_plan(argc, argv, &so);
        if (n_workers > 0) return nm_launch(argc, argv, &so, n_workers);
    }
    if (runs_model) become_coordinator(argc, argv);
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("numoe %s\n", NUMOE_VERSION);
        return 0;
    }
    if (!strcmp(cmd, "inspect")) return nm_cmd_inspect(argc - 1, argv + 1);
    if (!strcmp(cmd, "topology")) return nm_cmd_topology(argc - 1, argv + 1);
    if (!strcmp(cmd, "placement")) return nm_cmd_placement(argc - 1, argv + 1);
    if (!strcmp(cmd, "keygen")) return nm_cmd_keygen(argc - 1, argv + 1);
    if (!strcmp(cmd, "generate")) return nm_cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "chat")) return nm_cmd_chat(argc - 1, argv + 1);
    if (!strcmp(cmd, "serve")) return nm_cmd_serve(argc - 1, argv + 1);
    if (!strcmp(cmd, "perplexity")) return nm_cmd_perplexity(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return nm_cmd_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "detokenize")) return nm_cmd_detokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench")) {
        if (argc >= 3 && !strcmp(argv[2], "kernels")) return nm_cmd_bench_kernels(argc - 2, argv + 2);
        if (argc >= 3 && !strcmp(argv[2], "ipc")) return nm_cmd_bench_ipc(argc - 2, argv + 2);
        return nm_cmd_bench_model(argc - 1, argv + 1);
    }
    fprintf(stderr, "numoe: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 2;
}
