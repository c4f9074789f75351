/* session.h - everything one model run needs, opened from command-line
 * style options (cli/options.h parses them): the mapped GGUF, the bound
 * model, a thread pool, the expert backend and the engine that runs the
 * forward pass. Shared by generate, chat, serve and bench, so start-up and
 * load reporting live in one place. */
#ifndef NUMOE_COORDINATOR_CLI_SESSION_H
#define NUMOE_COORDINATOR_CLI_SESSION_H

#include "common/gguf.h"
#include "coordinator/engine/engine.h"
#include "coordinator/experts/backend.h"
#include "kernels/threadpool.h"
#include "model/model.h"

typedef struct {
    const char *model_path;
    int threads;        /* <= 0: all online CPUs */
    int64_t ctx_size;   /* 0: min(model context, 4096) */
    int64_t batch;      /* prefill chunk, default 512 */
    int experts_used;   /* 0: the model's expert_used_count */
    int no_prefault;    /* leave the mapping to page in lazily */
    /* routed experts in worker processes (coordinator/experts/remote.h) */
    int workers;              /* 0: in this process; see workers_set */
    int workers_set;          /* --workers given; otherwise one worker per NUMA node. The launcher
                               * (launch/launcher.h) starts them and names their count in
                               * NUMOE_LAUNCH_WORKERS, which then wins */
    const char *placement;    /* NULL: "split" */
    int shard_memory;         /* --shard-memory: 0 auto, 1 ram, 2 file (launch/memory.h) */
    int worker_threads;       /* 0: the CPUs of a worker's node shared by the workers on it */
    int worker_nodes[64];     /* --worker-nodes LIST: node of worker i = worker_nodes[i % n_worker_nodes] */
    int n_worker_nodes;       /* 0: round-robin over the machine's nodes when it has several, else unbound */
    double worker_timeout;    /* seconds; 0: 300 */
    const char *worker_endpoints; /* --worker-endpoints tcp://h:p,...: workers started by hand (no spawn) */
    const char *worker_key;       /* --worker-key FILE: CURVE key shared with those workers */
    int sync_experts;             /* wait for the routed experts before the shared ones (bench --experts-sync) */
    int gpu_mode;                 /* --gpu: NM_GPU_AUTO (default), NM_GPU_DEVICE (device gpu), NM_GPU_NONE */
    int gpu;                      /* the CUDA device with NM_GPU_DEVICE */
    int prefill_experts;          /* --prefill-experts: NM_PREFILL_EXPERTS_AUTO (0), _CPU, _GPU, _SPLIT (gpu_engine.h) */
    /* --gpu-experts: routed experts kept in VRAM by the GPU engine */
    int gpu_experts_set;          /* given; otherwise auto */
    int64_t gpu_experts;          /* N of every MoE layer (0: none), or -1: auto (fill the VRAM left) */
    const char *gpu_experts_profile; /* --gpu-experts FILE or --gpu-experts-profile FILE: the
                                     --dump-routing profile choosing which experts (most used first) */
    int64_t kv_positions;         /* KV positions the caller's sequences hold at once (serve: --cache-lens),
                                     kept free of experts; 0: the context times kv_seqs */
    int kv_seqs;                  /* sequences of a full context at once (serve: --max-batch-size); 0: 1 */
} nm_session_opts;

enum { NM_GPU_AUTO = 0, NM_GPU_DEVICE = 1, NM_GPU_NONE = 2 };

typedef struct {
    nm_gguf *gguf;
    nm_model model;
    nm_pool *pool;
    nm_expert_backend *experts;
    nm_engine *engine;
} nm_session;

/* The usable CUDA devices for o's --gpu choice (0 with --gpu none; why
 * receives the reason when there are none), or -1 with err when --gpu N
 * names a device that is not there. Checked before anything is loaded or
 * started (the launcher asks too, so no worker is spawned for a run that
 * cannot start). */
int nm_session_gpu_count(const nm_session_opts *o, char *why, size_t n, nm_err *err);

/* Whether o runs the GPU engine, given nm_session_gpu_count's answer. */
int nm_session_use_gpu(const nm_session_opts *o, int gpu_count);

/* How long the CPU threads of a GPU run (the coordinator's, and the
 * workers' it launches, through NUMOE_POOL_SPIN_US) poll before they sleep:
 * they idle between MoE layers while the GPU computes its part of each
 * (~50-200 us), and a thread that fell asleep costs a wake-up. Measured on
 * the H200 box (decode, --workers 0, 16 threads): the default 200 us gave
 * 11-28 tok/s on the 27-layer V2-Lite file, 2000 us 52 tok/s; 8 layers 144
 * -> 219 tok/s (docs/BENCHMARKS.md). The CPU engine keeps the pool's
 * default: its threads are busy between layers, and polling workers would
 * take cores from it. NUMOE_POOL_SPIN_US overrides either. */
#define NM_SESSION_GPU_SPIN_US 2000

int nm_session_open(nm_session *s, const nm_session_opts *o, nm_err *err);
void nm_session_close(nm_session *s);

#endif
