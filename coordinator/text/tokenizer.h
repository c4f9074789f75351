/* tokenizer.h - the byte-level BPE tokenizer that DeepSeek GGUFs carry
 * (tokenizer.ggml.model = "gpt2"), behaving as llama.cpp's llm_tokenizer_bpe
 * (docs/MODEL.md §6 places it; the algorithm is all below).
 *
 * Encoding, in order:
 *   1. Invalid UTF-8 in the input becomes U+FFFD, one per bad byte (llama.cpp).
 *   2. Special-token partition: the text is cut at occurrences of the texts of
 *      USER_DEFINED tokens always, and of CONTROL (and UNKNOWN) tokens only when
 *      parse_special is set, longest token text first, leftmost occurrences,
 *      each found piece becoming that token. This is llama.cpp's
 *      tokenizer_st_partition and also what HF tokenizers does (its non-special
 *      added tokens - USER_DEFINED in GGUF - are always matched;
 *      split_special_tokens only affects special ones). As in llama.cpp, the
 *      end-of-turn and FIM tokens found by their text (e.g.
 *      "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>") count as CONTROL whatever their
 *      stored type.
 *   3. Pre-tokenizer: the regex list chosen by tokenizer.ggml.pre is applied in
 *      order, each regex splitting every current piece into matched and
 *      unmatched parts (both kept). PCRE2, UTF + UCP; `\s` means the Unicode
 *      White_Space set and `$` only the end of the piece.
 *   4. Each piece's bytes go through GPT-2's bytes_to_unicode, then the
 *      adjacent pair with the lowest merge rank (index in
 *      tokenizer.ggml.merges, "left right") is merged, leftmost first among
 *      equal ranks, until no pair has a rank.
 *   5. Each symbol is looked up in the vocabulary; one that is not there falls
 *      back to one token per byte (the byte's single-character token, else a
 *      "<0xXX>" BYTE token, else the byte is dropped as llama.cpp does; the
 *      loader counts bytes with neither in n_missing_bytes).
 *
 * Decoding a token ("piece"): NORMAL tokens are mapped back through the byte
 * table (a token with a character outside the table is output as its UTF-8
 * text, as HF's ByteLevel decoder does); USER_DEFINED tokens are their text;
 * CONTROL / UNKNOWN tokens are their text when special tokens are rendered,
 * else nothing; BYTE tokens "<0xXX>" are that byte; UNUSED tokens are nothing.
 *
 * Ownership and threads: nm_tokenizer_load copies what it needs out of the
 * GGUF (the nm_gguf may be closed afterwards). A loaded tokenizer is read-only:
 * any number of threads may call nm_tokenize / nm_detokenize / the lookups on
 * it at once. nm_detok_stream objects are per stream (one thread at a time). */
#ifndef NUMOE_COORDINATOR_TEXT_TOKENIZER_H
#define NUMOE_COORDINATOR_TEXT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "common/gguf.h"

/* tokenizer.ggml.token_type values */
enum {
    NM_TOKEN_NORMAL = 1,
    NM_TOKEN_UNKNOWN = 2,
    NM_TOKEN_CONTROL = 3,
    NM_TOKEN_USER_DEFINED = 4,
    NM_TOKEN_UNUSED = 5,
    NM_TOKEN_BYTE = 6,
};

typedef struct nm_tokenizer nm_tokenizer;

/* Loads the tokenizer of G (a full model or a vocabulary-only GGUF: no tensors
 * are needed). Fails with a clear message when G has no tokenizer or one that
 * is not byte-level BPE. 0 and *out, or -1 with err. */
int nm_tokenizer_load(nm_tokenizer **out, const nm_gguf *g, nm_err *err);
void nm_tokenizer_free(nm_tokenizer *tk);

int32_t nm_tokenizer_n_vocab(const nm_tokenizer *tk);
size_t nm_tokenizer_n_merges(const nm_tokenizer *tk);
/* Special ids; -1 where the vocabulary has none. EOT is found by text as
 * llama.cpp does ("<｜end▁of▁sentence｜>" for DeepSeek, "<|im_end|>", ...). */
int32_t nm_tokenizer_bos(const nm_tokenizer *tk);
int32_t nm_tokenizer_eos(const nm_tokenizer *tk);
int32_t nm_tokenizer_eot(const nm_tokenizer *tk);
int32_t nm_tokenizer_pad(const nm_tokenizer *tk);
/* tokenizer.ggml.add_bos_token / add_eos_token (false when absent). */
int nm_tokenizer_add_bos(const nm_tokenizer *tk);
int nm_tokenizer_add_eos(const nm_tokenizer *tk);
/* True for ids that end generation: EOS, EOT and the other end-of-turn texts
 * llama.cpp knows ("<|EOT|>" of DeepSeek-Coder included). */
int nm_tokenizer_is_eog(const nm_tokenizer *tk, int32_t id);
/* tokenizer.ggml.pre as stored ("" when absent) and the regex set actually
 * used for it: "deepseek-v3", "deepseek-llm", "deepseek-coder", "llama3",
 * "qwen2", "gpt2" or "default" (llama.cpp's default list, for pre-tokenizer
 * names numoe does not know). */
const char *nm_tokenizer_pre(const nm_tokenizer *tk);
const char *nm_tokenizer_pre_used(const nm_tokenizer *tk);
/* Bytes that have neither a single-character token nor a <0xXX> token (0 for
 * every real vocabulary); such bytes are dropped when they must fall back. */
int nm_tokenizer_n_missing_bytes(const nm_tokenizer *tk);

/* Encodes LEN bytes of TEXT (need not be NUL-terminated, may hold NULs).
 *   add_special:   prepend BOS when the vocabulary's add_bos_token is true and
 *                  append EOS when add_eos_token is true (llama.cpp's
 *                  add_special; pass 0 for "--no-bos")
 *   parse_special: CONTROL token texts in TEXT become those tokens; otherwise
 *                  they are tokenized as ordinary text (USER_DEFINED texts are
 *                  matched either way, see above)
 * On success *ids is a malloc'd array of *n ids that the caller frees with
 * free() (NULL when *n == 0). 0, or -1 with err (out of memory, regex engine
 * failure); *ids is NULL and *n 0 on failure. */
int nm_tokenize(const nm_tokenizer *tk, const char *text, size_t len, int add_special,
                int parse_special, int32_t **ids, size_t *n, nm_err *err);

/* Vocabulary text of ID exactly as stored (byte-level form for NORMAL tokens,
 * e.g. "Ġworld"); *len its length. NULL for an id out of range. Valid as
 * long as the tokenizer. Not NUL-terminated in general. */
const char *nm_token_text(const nm_tokenizer *tk, int32_t id, size_t *len);
/* tokenizer.ggml.token_type of ID (NM_TOKEN_*, after llama.cpp's overrides);
 * 0 for an id out of range. */
int nm_token_type(const nm_tokenizer *tk, int32_t id);
/* The bytes ID decodes to (see above); *len its length. render_special: CONTROL
 * and UNKNOWN tokens give their text, else nothing. NULL for an id out of
 * range. Valid as long as the tokenizer. */
const char *nm_token_piece(const nm_tokenizer *tk, int32_t id, int render_special, size_t *len);
/* Id of the token whose vocabulary text is exactly TEXT (LEN bytes), or -1.
 * E.g. nm_token_id(tk, "<｜end▁of▁sentence｜>", strlen(...)). */
int32_t nm_token_id(const nm_tokenizer *tk, const char *text, size_t len);

/* Concatenated pieces of N ids. *out is malloc'd, NUL-terminated (the NUL is
 * not counted in *len) and freed by the caller with free(). The bytes are
 * returned as they are, valid UTF-8 or not. -1 with err for an id out of
 * range or out of memory. */
int nm_detokenize(const nm_tokenizer *tk, const int32_t *ids, size_t n, int render_special,
                  char **out, size_t *len, nm_err *err);

/* Streaming detokenizer: feed ids one at a time and get only complete UTF-8
 * characters back; a character split over tokens comes out whole with the
 * token that completes it. Bytes that cannot start or continue a character
 * become U+FFFD (one per maximal invalid sequence, as Python's
 * errors="replace"), so the output is always valid UTF-8; for token streams
 * that decode to valid UTF-8 the concatenated output equals nm_detokenize. */
typedef struct nm_detok_stream nm_detok_stream;

/* NULL when out of memory. The tokenizer must outlive the stream. */
nm_detok_stream *nm_detok_stream_new(const nm_tokenizer *tk, int render_special);
void nm_detok_stream_free(nm_detok_stream *s);
/* Appends ID. *text / *len: the newly completed text (maybe empty), valid
 * until the next call on S. -1 with err for an id out of range or out of
 * memory (S is unchanged then). */
int nm_detok_stream_feed(nm_detok_stream *s, int32_t id, const char **text, size_t *len,
                         nm_err *err);
/* Ends the stream: returns what is still held (an incomplete character comes
 * out as U+FFFD) and resets S for a new stream. Valid until the next call. */
const char *nm_detok_stream_flush(nm_detok_stream *s, size_t *len);

#endif
