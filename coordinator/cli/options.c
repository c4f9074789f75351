/* options.c - the command-line options every model-running command shares
 * (session and sampler), parsed with the common number parser (options.h). */
#include "coordinator/cli/options.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/opt.h"
#include "coordinator/engine/gpu/gpu_engine.h"
#include "coordinator/experts/remote.h"

const char nm_session_opts_help[] =
    "  -m, --model FILE        GGUF model (first part of a split model)\n"
    "      --gpu N|none|auto   where everything but the routed experts runs: CUDA device N, or none =\n"
    "                          the CPU engine; auto (default) = GPU 0 when a usable CUDA device exists,\n"
    "                          else the CPU. One line on stderr names the engine and device. --gpu N\n"
    "                          fails when there is no such device or numoe was built without CUDA\n"
    "                          (the routed experts stay on the CPU either way: --workers)\n"
    "      --prefill-experts cpu|gpu|split|auto\n"
    "                          with a GPU engine: where the routed experts of a pass run. cpu = always\n"
    "                          on the CPU (workers or this process); gpu = on the GPU for every pass,\n"
    "                          their weights streamed over PCIe per pass; split = every pass shares\n"
    "                          them: the first half of each layer's experts streamed to the GPU, the\n"
    "                          rest on the CPU at the same time; auto (default) = the GPU for\n"
    "                          passes long enough that streaming pays (measured at load: one layer's\n"
    "                          copy against the CPU's experts; never below 32 tokens), else the CPU\n"
    "                          (NUMOE_GPU_SPLIT=1: such passes split in the measured proportion)\n"
    "      --gpu-experts auto|N|FILE\n"
    "                          with a GPU engine: routed experts kept in VRAM and computed there for\n"
    "                          passes of <= 64 tokens, so the CPU reads fewer bytes per token. N = N\n"
    "                          experts of every MoE layer (0 = none); FILE = a `--dump-routing` profile:\n"
    "                          the most used experts first, as many as fit; auto (default) = as many\n"
    "                          as the VRAM left after weights, caches and scratch holds (a 1 GiB + 2%\n"
    "                          margin stays free), spread evenly over the layers\n"
    "      --gpu-experts-profile FILE\n"
    "                          which experts --gpu-experts N or auto places: the most used of this\n"
    "                          `--dump-routing` profile first (default: the lowest ids of every layer)\n"
    "  -t, --threads N         CPU threads (default: all online CPUs)\n"
    "  -c, --ctx-size N        KV cache positions (default: min(model context, 4096))\n"
    "  -b, --batch N           prefill chunk in tokens (default 512)\n"
    "      --experts-used K    routed experts per token, at most the model's count (default: the model's)\n"
    "      --no-prefault       page the model in lazily instead of reading it all at start-up\n"
    "      --workers N         routed experts in N numoe-worker processes (shm + ZeroMQ), each holding\n"
    "                          its share once, started and restarted by numoe; 0 = in this process\n"
    "                          (fastest on a one-node machine: no hand-off). Default: one per NUMA node;\n"
    "                          more workers than nodes split each node's cores\n"
    "      --placement P       how the workers share the experts: split (1/N of every expert's ff\n"
    "                          dimension each; default), experts (whole experts, contiguous ids),\n"
    "                          experts-rr (whole experts, round-robin), or a map FILE (configs/README.md;\n"
    "                          `numoe placement --profile` balances one from a --dump-routing file)\n"
    "      --shard-memory M    where the workers' experts live: ram (a copy each worker holds, kept across\n"
    "                          its restarts), file (computed from the model file's pages: models larger\n"
    "                          than memory), auto (default: file when the shards do not fit; docs/NUMA.md)\n"
    "      --worker-threads N  compute threads per worker (default: its node's CPUs / workers on it)\n"
    "      --worker-nodes L    NUMA node of each worker, comma-separated, repeated cyclically\n"
    "                          (default: round-robin over the nodes when there are several)\n"
    "      --worker-timeout S  a worker that does not answer a layer within S seconds is killed and\n"
    "                          restarted, and gets the layer again (300)\n"
    "      --worker-endpoints tcp://H1:P1,tcp://H2:P2,...\n"
    "                          use workers started by hand (maybe on other hosts) instead of spawning\n"
    "                          them: worker i is `numoe-worker --worker-id i --workers N --placement P\n"
    "                          --listen` at the i-th endpoint, with its own copy of the model file;\n"
    "                          activations travel inline over tcp (no shm). Nobody here restarts them;\n"
    "                          one that is lost is waited for (NUMOE_WORKER_RECONNECT_S, default 60) to\n"
    "                          come back at its endpoint, then sent the layer again\n"
    "      --worker-key FILE   encrypt and authenticate the tcp workers' traffic (ZeroMQ CURVE) with this\n"
    "                          key file, the one the workers got as --key (`numoe keygen FILE` makes one)\n";

int nm_session_parse_opt(nm_session_opts *o, int argc, char **argv, int *i, const char *cmd) {
    const char *a = argv[*i], *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    long long x;
    if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
        if (!v) return fprintf(stderr, "%s: %s needs a file\n", cmd, a), -1;
        o->model_path = v;
    } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
        if (nm_opt_int(cmd, a, v, 1, 4096, &x)) return -1;
        o->threads = (int)x;
    } else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) {
        if (nm_opt_int(cmd, a, v, 1, 1 << 24, &x)) return -1;
        o->ctx_size = x;
    } else if (!strcmp(a, "-b") || !strcmp(a, "--batch")) {
        if (nm_opt_int(cmd, a, v, 1, 1 << 16, &x)) return -1;
        o->batch = x;
    } else if (!strcmp(a, "--gpu")) {
        if (v && !strcmp(v, "none")) {
            o->gpu_mode = NM_GPU_NONE;
        } else if (v && !strcmp(v, "auto")) {
            o->gpu_mode = NM_GPU_AUTO;
        } else if (v && !nm_parse_int(v, 0, 1023, &x)) {
            o->gpu_mode = NM_GPU_DEVICE;
            o->gpu = (int)x;
        } else {
            return fprintf(stderr, "%s: --gpu needs a CUDA device number, none or auto (got '%s')\n", cmd, v ? v : ""),
                   -1;
        }
    } else if (!strcmp(a, "--prefill-experts")) {
        if (v && !strcmp(v, "auto"))
            o->prefill_experts = NM_PREFILL_EXPERTS_AUTO;
        else if (v && !strcmp(v, "cpu"))
            o->prefill_experts = NM_PREFILL_EXPERTS_CPU;
        else if (v && !strcmp(v, "gpu"))
            o->prefill_experts = NM_PREFILL_EXPERTS_GPU;
        else if (v && !strcmp(v, "split"))
            o->prefill_experts = NM_PREFILL_EXPERTS_SPLIT;
        else
            return fprintf(stderr, "%s: --prefill-experts must be cpu, gpu, split or auto (got '%s')\n", cmd,
                           v ? v : ""),
                   -1;
    } else if (!strcmp(a, "--gpu-experts")) {
        if (!v) return fprintf(stderr, "%s: --gpu-experts needs auto, a number or a routing profile FILE\n", cmd), -1;
        o->gpu_experts_set = 1;
        if (!strcmp(v, "auto")) {
            o->gpu_experts = -1;
        } else if (!nm_parse_int(v, 0, 1 << 20, &x)) {
            o->gpu_experts = x;
        } else if (access(v, R_OK) == 0) {
            o->gpu_experts = -1;
            o->gpu_experts_profile = v;
        } else {
            return fprintf(stderr, "%s: --gpu-experts: '%s' is neither auto, a number of experts per layer nor a "
                           "readable routing profile (`numoe generate --dump-routing FILE` writes one)\n", cmd, v),
                   -1;
        }
    } else if (!strcmp(a, "--gpu-experts-profile")) {
        if (!v || access(v, R_OK) != 0)
            return fprintf(stderr, "%s: --gpu-experts-profile needs a readable routing profile (`numoe generate "
                           "--dump-routing FILE` writes one; got '%s')\n", cmd, v ? v : ""),
                   -1;
        o->gpu_experts_profile = v;
    } else if (!strcmp(a, "--no-prefault")) {
        o->no_prefault = 1;
        return 1; /* a flag: no value to skip */
    } else if (!strcmp(a, "--experts-used")) {
        if (nm_opt_int(cmd, a, v, 1, 1024, &x)) return -1;
        o->experts_used = (int)x;
    } else if (!strcmp(a, "--workers")) {
        if (nm_opt_int(cmd, a, v, 0, NM_MAX_WORKERS, &x)) return -1;
        o->workers = (int)x;
        o->workers_set = 1;
    } else if (!strcmp(a, "--placement")) {
        if (!v || (strcmp(v, "split") && strcmp(v, "experts") && strcmp(v, "experts-rr") && access(v, R_OK)))
            return fprintf(stderr, "%s: --placement must be split, experts, experts-rr or a readable map file (got '%s')\n",
                           cmd, v ? v : ""), -1;
        o->placement = v;
    } else if (!strcmp(a, "--shard-memory")) {
        if (v && !strcmp(v, "auto")) o->shard_memory = 0;
        else if (v && !strcmp(v, "ram")) o->shard_memory = 1;
        else if (v && !strcmp(v, "file")) o->shard_memory = 2;
        else return fprintf(stderr, "%s: --shard-memory must be auto, ram or file (got '%s')\n", cmd, v ? v : ""), -1;
    } else if (!strcmp(a, "--worker-threads")) {
        if (nm_opt_int(cmd, a, v, 1, 4096, &x)) return -1;
        o->worker_threads = (int)x;
    } else if (!strcmp(a, "--worker-nodes")) {
        const char *p = v;
        o->n_worker_nodes = 0;
        while (p && *p) {
            long long n;
            if (nm_parse_int_at(&p, 0, 1 << 20, &n) || (*p && *p != ',') ||
                o->n_worker_nodes == (int)(sizeof o->worker_nodes / sizeof *o->worker_nodes)) {
                p = NULL;
                break;
            }
            o->worker_nodes[o->n_worker_nodes++] = (int)n;
            if (*p) p++;
        }
        if (!p || !o->n_worker_nodes)
            return fprintf(stderr, "%s: --worker-nodes needs comma-separated NUMA node numbers (got '%s')\n", cmd,
                           v ? v : ""), -1;
    } else if (!strcmp(a, "--worker-endpoints")) {
        if (!v || strncmp(v, "tcp://", 6))
            return fprintf(stderr, "%s: --worker-endpoints needs comma-separated tcp://HOST:PORT endpoints (got '%s')\n",
                           cmd, v ? v : ""), -1;
        o->worker_endpoints = v;
    } else if (!strcmp(a, "--worker-key")) {
        if (!v) return fprintf(stderr, "%s: --worker-key needs a key file (`numoe keygen FILE`)\n", cmd), -1;
        o->worker_key = v;
    } else if (!strcmp(a, "--worker-timeout")) {
        if (nm_opt_int(cmd, a, v, 1, 1 << 24, &x)) return -1;
        o->worker_timeout = (double)x;
    } else {
        return 0;
    }
    (*i)++;
    return 1;
}

const char nm_sampler_opts_help[] =
    "      --temp T            sampling temperature; 0 = greedy\n"
    "      --top-k N           keep the N most likely tokens (0 = off)\n"
    "      --top-p P           keep the smallest set of tokens with probability mass >= P (1 = off)\n"
    "      --min-p P           keep tokens with probability >= P * the largest (0 = off)\n"
    "      --repeat-penalty F  divide positive / multiply negative logits of recent tokens by F (1 = off)\n"
    "      --presence-penalty F     subtract F from the logits of recent tokens (0 = off)\n"
    "      --frequency-penalty F    subtract F * count from the logits of recent tokens (0 = off)\n"
    "      --repeat-last-n N   how many recent tokens the penalties look at (default 64; 0 = off)\n"
    "      --seed N            sampler seed; the same seed gives the same tokens (default 42)\n";

int nm_sampler_parse_opt(nm_sampler_params *p, int argc, char **argv, int *i, const char *cmd) {
    const char *a = argv[*i], *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    long long x;
    if (!strcmp(a, "--temp")) {
        if (nm_opt_float(cmd, a, v, 0, 1e6, &p->temp)) return -1;
    } else if (!strcmp(a, "--top-k")) {
        if (nm_opt_int(cmd, a, v, 0, INT32_MAX, &x)) return -1;
        p->top_k = (int32_t)x;
    } else if (!strcmp(a, "--top-p")) {
        if (nm_opt_float(cmd, a, v, 0, 1, &p->top_p)) return -1;
    } else if (!strcmp(a, "--min-p")) {
        if (nm_opt_float(cmd, a, v, 0, 1, &p->min_p)) return -1;
    } else if (!strcmp(a, "--repeat-penalty")) {
        if (nm_opt_float(cmd, a, v, 1e-6, 1e6, &p->repeat_penalty)) return -1;
    } else if (!strcmp(a, "--presence-penalty")) {
        if (nm_opt_float(cmd, a, v, -1e6, 1e6, &p->presence_penalty)) return -1;
    } else if (!strcmp(a, "--frequency-penalty")) {
        if (nm_opt_float(cmd, a, v, -1e6, 1e6, &p->frequency_penalty)) return -1;
    } else if (!strcmp(a, "--repeat-last-n")) {
        if (nm_opt_int(cmd, a, v, 0, 1 << 20, &x)) return -1;
        p->penalty_last_n = (int32_t)x;
    } else if (!strcmp(a, "--seed")) {
        if (nm_opt_u64(cmd, a, v, &p->seed)) return -1;
    } else {
        return 0;
    }
    (*i)++;
    return 1;
}
