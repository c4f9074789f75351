/* test_batch.c - continuous batching is invisible in the numbers:
 *   - an engine step over several sequences (mixed prefill chunks and
 *     decode tokens in one batch) gives each sequence the logits that
 *     running it alone (nm_engine_eval) gives it;
 *   - the scheduler, with more requests than batch slots and a cache budget
 *     that makes some of them queue, produces for every request the greedy
 *     text of running it alone, honours max_tokens, stop strings and
 *     cancellation, and returns the whole cache budget at the end.
 * Uses the tiny fixture models in tests/fixtures/models (run from the repo
 * root, as tests/test_unit_binaries.py does). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "coordinator/cli/session.h"
#include "coordinator/serve/scheduler.h"

static const char *MODELS[] = {
    "tests/fixtures/models/deepseek-v3-tiny-F32-mla.gguf",
    "tests/fixtures/models/deepseek-v2-tiny-Q4_K-legacy.gguf",
};

static int open_model(nm_session *s, const char *path, int64_t batch) {
    nm_session_opts o = {0};
    o.model_path = path;
    o.threads = 2;
    o.ctx_size = 128;
    o.batch = batch;
    o.workers_set = 1; /* experts in this process */
    nm_err err;
    if (nm_session_open(s, &o, &err)) {
        CHECK(0, "open %s: %s", path, err.msg);
        return -1;
    }
    return 0;
}

static void prompt_of(int seq, int32_t *tok, int64_t n, int64_t n_vocab) {
    uint64_t x = 0x9E3779B97F4A7C15ull * (uint64_t)(seq + 1);
    for (int64_t i = 0; i < n; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((x >> 33) % (uint64_t)n_vocab);
    }
}

static int argmax(const float *v, int64_t n) {
    int best = 0;
    for (int64_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = (int)i;
    return best;
}

/* Three sequences of different prompt lengths: alone, then together, the
 * batch mixing a prefill chunk of one with decode tokens of the others. */
static void test_forward_batch_equals_alone(void) {
    enum { NS = 3, DEC = 6 };
    const int64_t plen[NS] = {7, 13, 4};
    for (size_t mi = 0; mi < sizeof MODELS / sizeof *MODELS; mi++) {
        nm_session s;
        if (open_model(&s, MODELS[mi], 32)) continue;
        nm_engine *e = s.engine;
        int64_t V = e->info.n_vocab;
        nm_err err;
        float *alone = calloc((size_t)(NS * (DEC + 1) * V), sizeof(float));
        float *got = calloc((size_t)(NS * V), sizeof(float));
        int32_t prompt[NS][32], gen[NS][DEC + 1];
        nm_engine_seq *one = nm_engine_seq_new(e, e->info.n_ctx, &err);
        CHECK(one != NULL, "%s", err.msg);
        for (int q = 0; q < NS && one; q++) {
            prompt_of(q, prompt[q], plen[q], V);
            nm_engine_seq_rewind(e, one, 0);
            float *row = alone + (size_t)q * (DEC + 1) * V;
            CHECK(nm_engine_eval(e, one, prompt[q], plen[q], row, 0, &err) == 0, "%s", err.msg);
            gen[q][0] = argmax(row, V);
            for (int d = 1; d <= DEC; d++) {
                CHECK(nm_engine_eval(e, one, &gen[q][d - 1], 1, row + (size_t)d * V, 0, &err) == 0, "%s", err.msg);
                gen[q][d] = argmax(row + (size_t)d * V, V);
            }
        }
        nm_engine_seq_free(e, one);
        nm_engine_seq *kv[NS];
        for (int q = 0; q < NS; q++) CHECK((kv[q] = nm_engine_seq_new(e, 64, &err)) != NULL, "%s", err.msg);
        /* step 1: seq 0 whole prompt, seq 1 first 5 prompt tokens (no logits)
         * step 2: seq 0 decodes, seq 1 rest of its prompt, seq 2 whole prompt
         * then all decode together */
        int64_t fed1 = 5, dec[NS] = {0, 0, 0};
        nm_engine_segment st1[2] = {{.seq = kv[0], .tokens = prompt[0], .n = plen[0], .logits = got},
                                    {.seq = kv[1], .tokens = prompt[1], .n = fed1}};
        CHECK(nm_engine_step(e, st1, 2, &err) == 0, "%s", err.msg);
        double worst = 0;
        int mismatched = 0;
#define COMPARE(q, d, buf)                                                                      \
    do {                                                                                        \
        const float *ref_ = alone + ((size_t)(q) * (DEC + 1) + (size_t)(d)) * V;                 \
        for (int64_t v_ = 0; v_ < V; v_++) {                                                    \
            double e_ = fabs((double)(buf)[v_] - ref_[v_]) / (fabs(ref_[v_]) + 1e-3);            \
            worst = e_ > worst ? e_ : worst;                                                    \
        }                                                                                       \
        mismatched += argmax(buf, V) != gen[q][d];                                              \
    } while (0)
        COMPARE(0, 0, got);
        nm_engine_segment st2[3] = {{.seq = kv[0], .tokens = &gen[0][0], .n = 1, .logits = got},
                                    {.seq = kv[1], .tokens = prompt[1] + fed1, .n = plen[1] - fed1, .logits = got + V},
                                    {.seq = kv[2], .tokens = prompt[2], .n = plen[2], .logits = got + 2 * V}};
        CHECK(nm_engine_step(e, st2, 3, &err) == 0, "%s", err.msg);
        COMPARE(0, 1, got);
        COMPARE(1, 0, got + V);
        COMPARE(2, 0, got + 2 * V);
        dec[0] = 2, dec[1] = 1, dec[2] = 1;
        for (int step = 0; step < 4; step++) {
            nm_engine_segment sd[NS];
            for (int q = 0; q < NS; q++)
                sd[q] = (nm_engine_segment){.seq = kv[q], .tokens = &gen[q][dec[q] - 1], .n = 1, .logits = got + (size_t)q * V};
            CHECK(nm_engine_step(e, sd, NS, &err) == 0, "%s", err.msg);
            for (int q = 0; q < NS; q++) {
                COMPARE(q, dec[q], got + (size_t)q * V);
                dec[q]++;
            }
        }
#undef COMPARE
        fprintf(stderr, "  %s: batched vs alone, largest relative logit difference %.3g\n", MODELS[mi], worst);
        /* measured: 0 (bit-identical) on the scalar, AVX2 and AVX-512 kernels */
        CHECK(worst <= 1e-6, "%s: batched logits differ from alone by %.3g (relative)", MODELS[mi], worst);
        CHECK(mismatched == 0, "%s: %d greedy tokens differ", MODELS[mi], mismatched);
        /* a batch larger than the state was made for is refused, nothing advanced */
        int32_t many[40] = {0};
        int64_t before = nm_engine_seq_len(e, kv[0]);
        nm_engine_segment big = {.seq = kv[0], .tokens = many, .n = 40};
        CHECK(nm_engine_step(e, &big, 1, &err) != 0 && nm_engine_seq_len(e, kv[0]) == before, "oversized batch accepted");
        for (int q = 0; q < NS; q++) nm_engine_seq_free(e, kv[q]);
        free(alone);
        free(got);
        nm_session_close(&s);
    }
}

/* Greedy text of one prompt run alone through the single-sequence path. */
static char *alone_text(nm_session *s, const nm_tokenizer *tk, const int32_t *prompt, int64_t n, int n_new) {
    nm_err err;
    nm_engine *e = s->engine;
    int64_t V = e->info.n_vocab;
    float *logits = malloc((size_t)V * sizeof *logits);
    int32_t *ids = malloc((size_t)n_new * sizeof *ids);
    nm_engine_seq *seq = nm_engine_seq_new(e, e->info.n_ctx, &err);
    CHECK(seq != NULL, "%s", err.msg);
    int32_t tok = -1;
    for (int i = 0; i < n_new && seq; i++) {
        int rc = i == 0 ? nm_engine_eval(e, seq, prompt, n, logits, 0, &err)
                        : nm_engine_eval(e, seq, &tok, 1, logits, 0, &err);
        CHECK(rc == 0, "%s", err.msg);
        ids[i] = tok = argmax(logits, V);
    }
    /* through the streaming detokenizer, as the server delivers text (invalid
     * UTF-8 from random prompts becomes U+FFFD there) */
    nm_text text = {0};
    nm_detok_stream *ds = nm_detok_stream_new(tk, 0);
    for (int i = 0; i < n_new; i++) {
        const char *piece;
        size_t len;
        CHECK(nm_detok_stream_feed(ds, ids[i], &piece, &len, &err) == 0, "%s", err.msg);
        CHECK(nm_text_append(&text, piece, len) == 0, "out of memory");
    }
    size_t len;
    const char *rest = nm_detok_stream_flush(ds, &len);
    CHECK(nm_text_append(&text, rest, len) == 0, "out of memory");
    nm_detok_stream_free(ds);
    nm_engine_seq_free(e, seq);
    free(logits);
    free(ids);
    return text.buf;
}

static nm_req_params greedy(const int32_t *prompt, int64_t n, int64_t max_tokens) {
    nm_req_params p = {0};
    p.prompt = prompt, p.n_prompt = n, p.max_tokens = max_tokens;
    p.sampling = nm_sampler_params_default();
    p.sampling.temp = 0;
    p.ignore_eos = 1;
    return p;
}

/* From the requests' own timestamps (the engine sets t_admit after it has
 * reserved a request's cache and t_end before it frees it): at no instant do
 * the admitted requests hold more than the cache budget or the batch slots;
 * the budget made some request wait for another to end; and, when every
 * request was submitted before the first one had its first token (the test
 * thread was not held up), requests really ran together. */
static void check_timeline(const nm_req_state *st, const int64_t *plen, int n, int64_t new_tokens, int64_t budget,
                           int64_t slots) {
    int64_t worst_used = 0, worst_active = 0;
    int waited = 0;
    double first_token = st[0].t_first, last_submit = 0;
    for (int i = 0; i < n; i++) {
        int64_t used = 0, active = 0;
        for (int j = 0; j < n; j++)
            if (st[j].t_admit <= st[i].t_admit && st[i].t_admit < st[j].t_end) used += plen[j] + new_tokens, active++;
        worst_used = used > worst_used ? used : worst_used;
        worst_active = active > worst_active ? active : worst_active;
        for (int j = 0; j < n; j++) waited |= j != i && st[i].t_admit >= st[j].t_end;
        first_token = st[i].t_first < first_token ? st[i].t_first : first_token;
        last_submit = st[i].t_submit > last_submit ? st[i].t_submit : last_submit;
    }
    CHECK(worst_used <= budget && worst_active <= slots, "over budget: %lld positions, %lld requests at once",
          (long long)worst_used, (long long)worst_active);
    CHECK(waited, "no request waited for the cache although %d do not fit at once", n);
    CHECK(last_submit >= first_token || worst_active >= 2, "requests ran one at a time (at most %lld together)",
          (long long)worst_active);
    fprintf(stderr, "  scheduler: at most %lld requests / %lld cache positions at once (budget %lld / %lld)\n",
            (long long)worst_active, (long long)worst_used, (long long)slots, (long long)budget);
}

/* Eight requests, four slots, a cache for three at a time: all queue and run
 * in turns, and each gets exactly its alone text. */
static void test_scheduler_matches_alone(void) {
    enum { NR = 8, NEW = 12 };
    nm_session s;
    if (open_model(&s, MODELS[0], 64)) return;
    nm_tokenizer *tk = NULL;
    nm_err err;
    CHECK(nm_tokenizer_load(&tk, s.gguf, &err) == 0, "%s", err.msg);
    if (!tk) return nm_session_close(&s);
    int32_t prompt[NR][24];
    int64_t plen[NR];
    char *want[NR];
    for (int q = 0; q < NR; q++) {
        plen[q] = 3 + (q * 5) % 19;
        prompt_of(100 + q, prompt[q], plen[q], s.model.hp.n_vocab);
        want[q] = alone_text(&s, tk, prompt[q], plen[q], NEW);
    }
    nm_sched_opts so = {.max_batch = 4, .chunk = 16, .cache_lens = 3 * 40, .n_ctx = 64};
    nm_sched *sch = NULL;
    CHECK(nm_sched_create(&sch, s.engine, tk, &so, &err) == 0, "%s", err.msg);
    if (!sch) return nm_tokenizer_free(tk), nm_session_close(&s);
    nm_req *r[NR];
    int fault;
    for (int q = 0; q < NR; q++) {
        nm_req_params p = greedy(prompt[q], plen[q], NEW);
        CHECK(nm_sched_submit(sch, &p, &r[q], &fault, &err) == 0, "%s", err.msg);
    }
    nm_sched_stats st;
    nm_sched_get_stats(sch, &st);
    CHECK(st.cache_used <= 3 * 40 && st.active <= 4, "over budget: %lld used, %lld active", (long long)st.cache_used,
          (long long)st.active);
    nm_req_state fin[NR];
    for (int q = 0; q < NR; q++) {
        nm_text got = {0};
        nm_req_state rs;
        int done = 0;
        for (int spins = 0; !done && spins < 600; spins++) done = nm_req_wait(r[q], 100, &got, &rs);
        CHECK(done && rs.finish == NM_FINISH_LENGTH && rs.n_gen == NEW, "request %d: done %d finish %d n_gen %lld", q,
              done, rs.finish, (long long)rs.n_gen);
        CHECK(got.buf && !strcmp(got.buf, want[q]), "request %d: batched text differs from alone", q);
        CHECK(rs.n_prompt == plen[q] && rs.t_first >= rs.t_admit && rs.t_admit >= rs.t_submit, "request %d: state", q);
        fin[q] = rs;
        nm_req_release(r[q]);
        free(got.buf);
    }
    nm_sched_get_stats(sch, &st);
    CHECK(st.cache_used == 0 && st.active == 0 && st.queued == 0, "budget not returned: %lld", (long long)st.cache_used);
    CHECK(st.requests_done == NR && st.gen_tokens == NR * NEW, "stats: %llu done, %llu tokens",
          (unsigned long long)st.requests_done, (unsigned long long)st.gen_tokens);
    check_timeline(fin, plen, NR, NEW, 3 * 40, 4);

    /* a stop string cuts the text before it; the client never sees a byte of it */
    size_t wl = strlen(want[0]);
    CHECK(wl >= 6, "the greedy text is too short (%zu bytes) to cut at a stop string", wl);
    if (wl >= 6) { /* (else the CHECK above failed) */
        char stop[3] = {want[0][wl / 2], want[0][wl / 2 + 1], 0};
        const char *stops[] = {stop};
        nm_req_params p = greedy(prompt[0], plen[0], NEW);
        p.stops = stops, p.n_stops = 1;
        nm_req *rq;
        CHECK(nm_sched_submit(sch, &p, &rq, &fault, &err) == 0, "%s", err.msg);
        nm_text got = {0};
        nm_req_state rs;
        for (int spins = 0; spins < 600 && !nm_req_wait(rq, 100, &got, &rs); spins++) {
            CHECK(!got.buf || !strstr(got.buf, stop), "stop string leaked while streaming");
        }
        size_t cut = (size_t)(strstr(want[0], stop) - want[0]);
        CHECK(rs.finish == NM_FINISH_STOP && got.len == cut && !memcmp(got.buf ? got.buf : "", want[0], cut),
              "stop: finish %d, %zu bytes, want %zu", rs.finish, got.len, cut);
        nm_req_release(rq);
        free(got.buf);
    }

    /* cancel a long request: it ends as cancelled and gives its cache back */
    nm_req_params p = greedy(prompt[1], plen[1], 64 - plen[1]);
    nm_req *rq;
    CHECK(nm_sched_submit(sch, &p, &rq, &fault, &err) == 0, "%s", err.msg);
    nm_text got = {0};
    nm_req_state rs;
    nm_req_wait(rq, 2000, &got, &rs);
    nm_req_cancel(rq);
    int done = 0;
    for (int spins = 0; spins < 100 && !done; spins++) done = nm_req_wait(rq, 100, &got, &rs);
    CHECK(done && rs.finish == NM_FINISH_CANCELLED, "cancel: done %d finish %d", done, rs.finish);
    nm_req_release(rq);
    free(got.buf);
    /* the engine thread returns the budget after it has seen the cancel: wait
     * for that state (up to 30 s on a loaded machine), never read it once */
    for (int spins = 0; spins < 1500; spins++) {
        nm_sched_get_stats(sch, &st);
        if (st.cache_used == 0) break;
        usleep(20000);
    }
    CHECK(st.cache_used == 0 && st.requests_cancelled == 1, "after cancel: %lld used, %llu cancelled",
          (long long)st.cache_used, (unsigned long long)st.requests_cancelled);

    /* what can never run is refused up front */
    nm_req_params bad = greedy(prompt[0], 0, 4);
    CHECK(nm_sched_submit(sch, &bad, &rq, &fault, &err) != 0 && !fault, "empty prompt accepted");
    bad = greedy(prompt[0], plen[0], 64);
    CHECK(nm_sched_submit(sch, &bad, &rq, &fault, &err) != 0 && strstr(err.msg, "exceed the context"),
          "max_tokens beyond the context accepted");
    int32_t oov = (int32_t)s.model.hp.n_vocab;
    bad = greedy(&oov, 1, 4);
    CHECK(nm_sched_submit(sch, &bad, &rq, &fault, &err) != 0, "out-of-vocabulary token accepted");

    /* shutdown with a request in flight: it ends as cancelled, still readable */
    p = greedy(prompt[2], plen[2], 64 - plen[2]);
    CHECK(nm_sched_submit(sch, &p, &rq, &fault, &err) == 0, "%s", err.msg);
    nm_sched_destroy(sch);
    got = (nm_text){0};
    CHECK(nm_req_wait(rq, 0, &got, &rs) == 1 && rs.finish == NM_FINISH_CANCELLED, "shutdown: finish %d", rs.finish);
    nm_req_release(rq);
    free(got.buf);
    for (int q = 0; q < NR; q++) free(want[q]);
    nm_tokenizer_free(tk);
    nm_session_close(&s);
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    RUN(test_forward_batch_equals_alone);
    RUN(test_scheduler_matches_alone);
    return check_summary();
}
