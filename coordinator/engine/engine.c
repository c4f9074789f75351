/* engine.c - what every engine shares on top of its step (engine.h). */
#include "coordinator/engine/engine.h"

static int eval(nm_engine *e, nm_engine_seq *s, const int32_t *tokens, int64_t n, float *logits, int all_logits,
                nm_sampler *sampler, int32_t *token, nm_err *err) {
    const nm_engine_info *in = &e->info;
    if (n < 1) return nm_errf(err, "no tokens to evaluate");
    int64_t have = nm_engine_seq_len(e, s), cap = nm_engine_seq_ctx(e, s);
    if (have + n > cap)
        return nm_errf(err, "context full: %lld cached + %lld new tokens exceed the context size %lld (raise --ctx-size)",
                       (long long)have, (long long)n, (long long)cap);
    for (int64_t t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= in->n_vocab)
            return nm_errf(err, "token id %d at input position %lld is outside the vocabulary (0..%lld)", tokens[t],
                           (long long)t, (long long)in->n_vocab - 1);
    for (int64_t done = 0; done < n;) {
        int64_t c = n - done < in->n_batch ? n - done : in->n_batch;
        nm_engine_segment seg = {.seq = s, .tokens = tokens + done, .n = c};
        /* chunks before the last only fill the cache unless every row is wanted */
        if (logits && all_logits) seg.logits = logits + done * in->n_vocab, seg.all_logits = 1;
        else if (logits && done + c == n) seg.logits = logits;
        if (sampler && done + c == n) seg.sampler = sampler, seg.token = token;
        if (nm_engine_step(e, &seg, 1, err)) return -1;
        done += c;
    }
    return 0;
}

int nm_engine_eval(nm_engine *e, nm_engine_seq *s, const int32_t *tokens, int64_t n, float *logits, int all_logits,
                   nm_err *err) {
    return eval(e, s, tokens, n, logits, all_logits, NULL, NULL, err);
}

int nm_engine_eval_draw(nm_engine *e, nm_engine_seq *s, const int32_t *tokens, int64_t n, nm_sampler *sampler,
                        int32_t *token, nm_err *err) {
    *token = -1;
    if (eval(e, s, tokens, n, NULL, 0, sampler, token, err)) return -1;
    return *token < 0 ? nm_errf(err, "out of memory for the sampler's scratch") : 0;
}
