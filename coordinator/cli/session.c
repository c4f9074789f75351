#include "coordinator/cli/session.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <numa.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/progress.h"
#include "model/identity.h"
#include "coordinator/engine/cpu/cpu_engine.h"
#include "coordinator/engine/gpu/gpu_engine.h"
#include "model/routing_profile.h"
#include "coordinator/experts/local.h"
#include "coordinator/experts/remote.h"
#include "kernels/quant.h"
#include "proto/numoe.pb-c.h"

int nm_session_gpu_count(const nm_session_opts *o, char *why, size_t n, nm_err *err) {
    int gpu_count = o->gpu_mode == NM_GPU_NONE ? 0 : nm_gpu_usable(why, n);
    if (o->gpu_mode == NM_GPU_DEVICE && o->gpu >= gpu_count) {
        if (gpu_count > 0)
            return nm_errf(err, "--gpu %d: this machine has %d usable CUDA device%s (0..%d); pick one of them or "
                           "--gpu none", o->gpu, gpu_count, gpu_count == 1 ? "" : "s", gpu_count - 1);
        return nm_errf(err, "--gpu %d: no usable CUDA device here: %s; run on the CPU with --gpu none", o->gpu, why);
    }
    if (!nm_session_use_gpu(o, gpu_count) &&
        (o->prefill_experts == NM_PREFILL_EXPERTS_GPU || o->prefill_experts == NM_PREFILL_EXPERTS_SPLIT))
        return nm_errf(err, "--prefill-experts %s computes routed experts on the GPU, which needs the GPU engine; "
                       "this run is on the CPU (%s): drop it or pick a device with --gpu N",
                       o->prefill_experts == NM_PREFILL_EXPERTS_GPU ? "gpu" : "split",
                       o->gpu_mode == NM_GPU_NONE ? "--gpu none" : why);
    if (!nm_session_use_gpu(o, gpu_count) && ((o->gpu_experts_set && o->gpu_experts > 0) || o->gpu_experts_profile))
        return nm_errf(err, "--gpu-experts keeps routed experts in VRAM, which needs the GPU engine; this run is on "
                       "the CPU (%s): drop --gpu-experts or pick a device with --gpu N",
                       o->gpu_mode == NM_GPU_NONE ? "--gpu none" : why);
    return gpu_count;
}

int nm_session_use_gpu(const nm_session_opts *o, int gpu_count) {
    return o->gpu_mode == NM_GPU_DEVICE || (o->gpu_mode == NM_GPU_AUTO && gpu_count > 0);
}

/* --gpu-experts FILE: the profile's picks per (layer, expert). */
static int load_counts(nm_session *s, const nm_session_opts *o, uint32_t **out, nm_err *err) {
    const nm_hparams *hp = &s->model.hp;
    uint8_t *is_moe = calloc((size_t)hp->n_layer, 1);
    uint32_t *counts = calloc((size_t)(hp->n_layer * hp->n_expert), sizeof *counts);
    nm_routing_profile pr;
    int rc = -1;
    if (!is_moe || !counts) {
        nm_errf(err, "out of memory");
        goto out;
    }
    for (int64_t il = 0; il < hp->n_layer; il++) is_moe[il] = (uint8_t)s->model.layers[il].is_moe;
    /* records hold the k of the run that wrote them: the model's, or --experts-used */
    if (nm_routing_profile_load(&pr, o->gpu_experts_profile, hp->n_layer, is_moe, hp->n_expert,
                                o->experts_used > 0 ? o->experts_used : hp->n_expert_used, err)) {
        nm_err_prefix(err, "--gpu-experts");
        goto out;
    }
    nm_routing_profile_count(&pr, hp->n_layer, hp->n_expert, counts);
    nm_routing_profile_free(&pr);
    *out = counts, counts = NULL;
    rc = 0;
out:
    free(is_moe);
    free(counts);
    return rc;
}

int nm_session_open(nm_session *s, const nm_session_opts *o, nm_err *err) {
    memset(s, 0, sizeof *s);
    if (!o->model_path) return nm_errf(err, "no model given (--model FILE.gguf)");
    double t0 = nm_now_s();
    /* where the engine runs is settled before anything is loaded: --gpu N
     * without that device fails at once, auto takes GPU 0 when one is usable */
    char why[512] = "";
    int gpu_count = nm_session_gpu_count(o, why, sizeof why, err);
    if (gpu_count < 0) return -1;
    const int use_gpu = nm_session_use_gpu(o, gpu_count);
    if (use_gpu && o->sync_experts)
        return nm_errf(err, "--experts-sync measures the CPU engine's overlap; add --gpu none");
    const int device = o->gpu_mode == NM_GPU_DEVICE ? o->gpu : 0;
    if (nm_gguf_open(o->model_path, &s->gguf, err)) return -1;
    if (nm_model_load(&s->model, s->gguf, err)) {
        nm_session_close(s);
        return -1;
    }
    /* the launcher (launch/launcher.h) started the workers and says how many */
    const char *launched = getenv("NUMOE_LAUNCH_WORKERS");
    int n_workers = launched ? atoi(launched) : o->workers;
    if (!launched && !o->workers_set && !o->worker_endpoints) {
        int nodes = numa_available() < 0 ? 1 : numa_num_configured_nodes();
        n_workers = nodes > 0 ? nodes : 1;
    }
    /* in-process experts read the whole file; workers copy their own shards */
    int remote = n_workers > 0 || o->worker_endpoints;
    prctl(PR_SET_NAME, "numoe-coordinator"); /* the kernel keeps 15 bytes: numoe-coordinat */
    /* the load meter (/health's loading fraction): the file read here, or the
     * routed experts the workers load, each counted as its step does it */
    uint64_t file_bytes = 0;
    for (int i = 0; i < s->gguf->n_files; i++) file_bytes += s->gguf->files[i].size;
    nm_load_plan(remote ? nm_routed_expert_bytes(s->gguf) : o->no_prefault ? 0 : file_bytes);
    if (!o->no_prefault && !remote) nm_gguf_prefault(s->gguf, 1);
    const nm_hparams *hp = &s->model.hp;
    int64_t ctx = o->ctx_size ? o->ctx_size : (hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096);
    if (o->experts_used > hp->n_expert_used) {
        nm_session_close(s);
        return nm_errf(err, "--experts-used %d: the model routes to %lld experts per token; numoe can lower it, not raise it",
                       o->experts_used, (long long)hp->n_expert_used);
    }
    if (!(s->pool = nm_pool_create(o->threads))) {
        nm_session_close(s);
        return nm_errf(err, "cannot start %d threads", o->threads);
    }
    /* With workers polling on the same cores, thread i stays on CPU i: migrating
     * threads made decode swing by 2x and cost 20-30% under server load; alone
     * (in-process) pinning measured neutral to 10% worse under load, where the
     * scheduler does better moving threads off cores the HTTP side is using
     * (docs/NUMA.md). NUMOE_PIN_THREADS=0 / 1 overrides either way. */
    const char *pin = getenv("NUMOE_PIN_THREADS");
    if (pin ? !strcmp(pin, "1") : launched != NULL) nm_pool_pin(s->pool);
    /* how long idle threads poll before they sleep (NM_SESSION_GPU_SPIN_US) */
    const char *spin = getenv("NUMOE_POOL_SPIN_US");
    if (spin) nm_pool_set_spin_us(s->pool, atoi(spin));
    else if (use_gpu) nm_pool_set_spin_us(s->pool, NM_SESSION_GPU_SPIN_US);
    if (remote) {
        nm_remote_opts ro = {.n_workers = n_workers, .placement = o->placement ? o->placement : "split",
                             .timeout_s = o->worker_timeout, .key_path = o->worker_key, .max_tok = o->batch ? o->batch : 512, .max_k = (int)hp->n_expert_used, .verbose = 1,
                             .endpoints = o->worker_endpoints};
        const char *h = getenv("NUMOE_HANDOFF"); /* developer knob: zmq = per-layer hand-off over ZeroMQ */
        ro.handoff = h && !strcmp(h, "zmq") ? NUMOE__HANDOFF__HANDOFF_ZMQ : NUMOE__HANDOFF__HANDOFF_DOORBELL;
        s->experts = nm_experts_remote_create(&s->model, &ro, err);
        /* the workers hold the routed experts: drop any expert pages this process
         * touched (identity hash, fault-around) so its RSS has no second copy */
        long page = sysconf(_SC_PAGESIZE);
        for (uint64_t i = 0; s->experts && i < s->gguf->n_tensors; i++) {
            const nm_gguf_tensor *t = &s->gguf->tensors[i];
            if (!strstr(t->name, "_exps.")) continue;
            uintptr_t a = ((uintptr_t)t->data + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
            uintptr_t b = ((uintptr_t)t->data + t->nbytes) & ~((uintptr_t)page - 1);
            if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
        }
    } else {
        s->experts = nm_experts_local_create(&s->model, s->pool, o->batch ? o->batch : 512, (int)hp->n_expert_used, err);
    }
    if (s->experts && use_gpu) {
        nm_engine_gpu_opts go = {.device = device, .n_ctx = ctx, .n_batch = o->batch ? o->batch : 512,
                                 .n_expert_used = o->experts_used, .prefill_experts = o->prefill_experts,
                                 .gpu_experts = o->gpu_experts_set ? o->gpu_experts : -1,
                                 .kv_positions = o->kv_positions > 0 ? o->kv_positions
                                                                     : ctx * (o->kv_seqs > 0 ? o->kv_seqs : 1)};
        uint32_t *counts = NULL;
        if (o->gpu_experts_profile && load_counts(s, o, &counts, err)) {
            nm_session_close(s);
            return -1;
        }
        go.gpu_expert_counts = counts;
        s->engine = nm_engine_gpu_create(&s->model, s->experts, &go, err);
        free(counts);
    } else if (s->experts) {
        nm_engine_cpu_opts eo = {.n_ctx = ctx, .n_batch = o->batch ? o->batch : 512, .n_expert_used = o->experts_used,
                                 .sync_experts = o->sync_experts};
        s->engine = nm_engine_cpu_create(&s->model, s->pool, s->experts, &eo, err);
    }
    if (!s->engine) {
        nm_session_close(s);
        return -1;
    }
    nm_load_ready();
    /* the one line that says where the engine runs (and, on a GPU, what its VRAM holds) */
    if (use_gpu)
        fprintf(stderr, "numoe: engine: %s\n", nm_engine_gpu_describe(s->engine));
    else
        fprintf(stderr, "numoe: engine: CPU, %d threads, %s (%s%s)\n", nm_pool_size(s->pool), nm_isa_name(nm_isa_best()),
                o->gpu_mode == NM_GPU_NONE ? "--gpu none" : "no usable GPU: ",
                o->gpu_mode == NM_GPU_NONE ? "" : why);

    fprintf(stderr,
            "numoe: %s: deepseek2, %lld layers (%lld dense), embd %lld, %lld heads, q_lora %lld, kv_lora %lld, "
            "%lld experts (%d used, %lld shared), vocab %lld; ctx %lld, %d threads, %s%s; loaded in %.2f s\n",
            o->model_path, (long long)hp->n_layer, (long long)hp->n_dense, (long long)hp->n_embd,
            (long long)hp->n_head, (long long)hp->q_lora, (long long)hp->kv_lora, (long long)hp->n_expert,
            s->engine->info.n_expert_used, (long long)hp->n_shared, (long long)hp->n_vocab, (long long)ctx,
            nm_pool_size(s->pool), nm_isa_name(nm_isa_best()), remote ? ", routed experts in workers" : "",
            nm_now_s() - t0);
    return 0;
}

void nm_session_close(nm_session *s) {
    nm_engine_destroy(s->engine);
    if (s->experts) s->experts->destroy(s->experts);
    if (s->pool) nm_pool_destroy(s->pool);
    if (s->model.layers || s->model.owned) nm_model_free(&s->model);
    nm_gguf_close(s->gguf);
    memset(s, 0, sizeof *s);
}
