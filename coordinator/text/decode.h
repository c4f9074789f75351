/* decode.h - the one decode step of `numoe generate`, `numoe chat` and the
 * server's scheduler: what happens to each sampled token.
 *
 * For every token, in this order:
 *   1. it is counted (n_gen, the end-of-generation token included);
 *   2. an end-of-generation token (nm_tokenizer_is_eog) ends the text unless
 *      ignore_eos: what the detokenizer still holds is flushed, the text is
 *      final, NM_FINISH_STOP, the token itself adds no text;
 *   3. otherwise its piece is detokenized (streaming: never half a UTF-8
 *      character) and appended to the stop-string text (stop_text.h); a stop
 *      string ends it: NM_FINISH_STOP, the text cut before it;
 *   4. the max_tokens-th token ends it: the detokenizer is flushed (a stop
 *      string in what it held still wins: STOP), the text is final,
 *      NM_FINISH_LENGTH;
 *   5. else NM_FINISH_NONE: the token is to be fed back to the model.
 * After every token the release mark moves as far as it may (stop_text.h):
 * text.buf[0..text.released) never changes again and can be shown.
 *
 * Without a tokenizer (token-id prompts: `numoe generate --tokens`) there is
 * no end-of-generation check and no text; without text (with_text 0:
 * --print-ids) there is the end-of-generation check but no text and no stop
 * strings. A step that cannot keep the text (out of memory) or decode the
 * token ends with NM_FINISH_ERROR.
 *
 * Threads: when lock is set, every change of n_gen and of the text is made
 * under it and cv (if set) is broadcast after each, so a reader on another
 * thread (an HTTP client of the scheduler) may read n_gen and the released
 * text under the same lock while the step runs. Nothing else is shared.
 *
 * Ownership: nm_decode_init allocates the detokenizer and the text;
 * nm_decode_free releases them (safe on a zeroed or freed struct). The
 * tokenizer is borrowed. */
#ifndef NUMOE_COORDINATOR_TEXT_DECODE_H
#define NUMOE_COORDINATOR_TEXT_DECODE_H

#include <pthread.h>
#include <stdint.h>

#include "common/error.h"
#include "coordinator/text/stop_text.h"
#include "coordinator/text/tokenizer.h"

typedef enum {
    NM_FINISH_NONE = 0,  /* still queued or running */
    NM_FINISH_STOP,      /* end-of-generation token or a stop string */
    NM_FINISH_LENGTH,    /* max_tokens or the context reached */
    NM_FINISH_CANCELLED, /* the request was cancelled, or the server shut down */
    NM_FINISH_ERROR,     /* the engine failed */
} nm_finish;

/* "stop", "length", "cancelled", "error" (or NULL for NM_FINISH_NONE). */
const char *nm_finish_name(nm_finish f);

typedef struct {
    const nm_tokenizer *tk;  /* NULL: ids only */
    int64_t max_tokens;      /* tokens to generate at most (>= 1) */
    int ignore_eos;
    nm_detok_stream *detok;  /* NULL without text */
    nm_stop_text text;       /* the text so far (empty without text) */
    int64_t n_gen;           /* tokens taken so far */
    int hit_eog;             /* the last token was an end-of-generation token */
    pthread_mutex_t *lock;   /* see Threads */
    pthread_cond_t *cv;
} nm_decode;

/* Sets up D (zeroed first) for one generation. with_text: detokenize and cut
 * at the N_STOPS stop strings (ignored without a tokenizer). 0, or -1 with
 * err (out of memory; D is then freed). */
int nm_decode_init(nm_decode *d, const nm_tokenizer *tk, int with_text, const char *const *stops, int n_stops,
                   int64_t max_tokens, int ignore_eos, nm_err *err);
/* Takes the sampled token TOK (see above). Returns NM_FINISH_NONE to go on
 * with TOK, or why the generation ended. */
nm_finish nm_decode_token(nm_decode *d, int32_t tok);
/* Ends a generation that ended before max_tokens for another reason (the
 * context is full, zero tokens wanted): flushes the detokenizer and makes
 * the text final. -1 when out of memory. */
int nm_decode_end(nm_decode *d);
void nm_decode_free(nm_decode *d);

#endif
