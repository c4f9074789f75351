/* decode.c - the decode step (decode.h). */
#include "coordinator/text/decode.h"

#include <string.h>

const char *nm_finish_name(nm_finish f) {
    switch (f) {
    case NM_FINISH_STOP: return "stop";
    case NM_FINISH_LENGTH: return "length";
    case NM_FINISH_CANCELLED: return "cancelled";
    case NM_FINISH_ERROR: return "error";
    default: return NULL;
    }
}

static void lock(nm_decode *d) {
    if (d->lock) pthread_mutex_lock(d->lock);
}

static void unlock(nm_decode *d) {
    if (d->cv) pthread_cond_broadcast(d->cv);
    if (d->lock) pthread_mutex_unlock(d->lock);
}

int nm_decode_init(nm_decode *d, const nm_tokenizer *tk, int with_text, const char *const *stops, int n_stops,
                   int64_t max_tokens, int ignore_eos, nm_err *err) {
    memset(d, 0, sizeof *d);
    d->tk = tk, d->max_tokens = max_tokens, d->ignore_eos = ignore_eos;
    /* the text is a valid (empty) string from here on, with or without pieces to come */
    if (nm_stop_text_init(&d->text, tk && with_text ? stops : NULL, tk && with_text ? n_stops : 0) ||
        (tk && with_text && !(d->detok = nm_detok_stream_new(tk, 0)))) {
        nm_decode_free(d);
        return nm_errf(err, "out of memory");
    }
    return 0;
}

/* Appends a piece (cut at a stop string) and moves the release mark; FINAL:
 * nothing more will come. 1 when a stop string has been hit, 0 when not, -1
 * when out of memory. */
static int take(nm_decode *d, const char *piece, size_t len, int final) {
    lock(d);
    int hit = nm_stop_text_append(&d->text, piece, len);
    nm_stop_text_release(&d->text, final);
    unlock(d);
    return hit;
}

static int flush(nm_decode *d) {
    size_t len = 0;
    const char *rest = d->detok ? nm_detok_stream_flush(d->detok, &len) : "";
    return take(d, rest, len, 1);
}

nm_finish nm_decode_token(nm_decode *d, int32_t tok) {
    lock(d);
    d->n_gen++;
    d->hit_eog = d->tk && !d->ignore_eos && nm_tokenizer_is_eog(d->tk, tok);
    unlock(d);
    if (d->hit_eog) return flush(d) < 0 ? NM_FINISH_ERROR : NM_FINISH_STOP;
    int hit = 0;
    if (d->detok) {
        const char *piece;
        size_t len;
        nm_err err;
        if (nm_detok_stream_feed(d->detok, tok, &piece, &len, &err)) return NM_FINISH_ERROR;
        hit = take(d, piece, len, 0);
    }
    if (hit > 0) return NM_FINISH_STOP;
    if (d->n_gen >= d->max_tokens) {
        int r = flush(d);
        return r > 0 ? NM_FINISH_STOP : r < 0 || hit < 0 ? NM_FINISH_ERROR : NM_FINISH_LENGTH;
    }
    return hit < 0 ? NM_FINISH_ERROR : NM_FINISH_NONE;
}

int nm_decode_end(nm_decode *d) { return flush(d) < 0 ? -1 : 0; }

void nm_decode_free(nm_decode *d) {
    nm_stop_text_free(&d->text);
    if (d->detok) nm_detok_stream_free(d->detok);
    d->detok = NULL;
}
