/* api.h - the JSON side of `numoe serve`: request bodies of the OpenAI
 * and Ollama APIs parsed and checked into one plain request, and the response
 * bodies (whole and streamed chunks) built back. No HTTP and no model here, so
 * every rule is unit-tested on strings (tests/unit/test_serve_api.c).
 *
 * JSON is read and written with cJSON (Debian libcjson).
 *
 * Errors follow OpenAI's shape,
 *   {"error": {"message": "...", "type": "invalid_request_error",
 *              "param": "messages", "code": null}}
 * with the HTTP status the server should send (400 for malformed JSON, wrong
 * types, missing or empty fields, out-of-range values, unknown roles). */
#ifndef NUMOE_COORDINATOR_SERVE_API_H
#define NUMOE_COORDINATOR_SERVE_API_H

#include <stddef.h>
#include <stdint.h>

#include "coordinator/text/chat_template.h"
#include "coordinator/text/sampler.h"

/* repeat_last_n above this is refused (the sampler keeps a window of that
 * many tokens per request) */
#define NM_API_MAX_REPEAT_LAST_N 65536

typedef enum {
    NM_API_OPENAI_CHAT,       /* POST /v1/chat/completions */
    NM_API_OPENAI_COMPLETION, /* POST /v1/completions */
    NM_API_OLLAMA_CHAT,       /* POST /api/chat */
    NM_API_OLLAMA_GENERATE,   /* POST /api/generate */
} nm_api_kind;

typedef struct {
    int status;         /* HTTP status to send */
    char type[48];      /* "invalid_request_error", "not_found_error", "server_error", ... */
    char param[64];     /* the offending field ("" when none) */
    char message[512];
} nm_api_error;

/* Fills e and returns -1. */
int nm_api_errorf(nm_api_error *e, int status, const char *type, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Everything a request asks for. All strings are owned (nm_api_request_free). */
typedef struct {
    nm_api_kind kind;
    char *model;              /* as sent; NULL when absent (Ollama requires it, OpenAI does not here) */
    nm_chat_msg *msgs;        /* chat kinds: role/content strings owned */
    size_t n_msgs;
    char *prompt;             /* completion kinds */
    char *system;             /* Ollama generate "system" (NULL when absent) */
    int raw;                  /* Ollama generate "raw": the prompt goes to the model untemplated */
    int stream;               /* OpenAI default false, Ollama default true */
    int include_usage;        /* OpenAI stream_options.include_usage */
    int64_t max_tokens;       /* max_tokens / max_completion_tokens / options.num_predict; -1 absent */
    nm_sampler_params sampling; /* the server's defaults overridden by the request */
    int has_seed;             /* the request gave a seed */
    char **stops;             /* "stop" (string or array of up to 16 strings) / options.stop */
    int n_stops;
    int ignore_eos;           /* ignore_eos (llama.cpp server extension) */
    int load_only;            /* Ollama only: no messages (chat) / empty prompt and system
                                 (generate). Ollama answers such a request by loading the
                                 model and sending one final object with done_reason "load"
                                 (clients use it to preload); the server should do the same
                                 (nm_api_render with finish = "load", no text) */
} nm_api_request;

/* Parses and checks BODY (LEN bytes, not necessarily NUL-terminated) as a
 * request of KIND. defaults: the server's sampler parameters. Recognised
 * fields (others are ignored, as OpenAI-compatible servers do):
 *   OpenAI chat:  model, messages[{role, content}] (content a string or an
 *                 array of {"type":"text","text":...} parts), stream,
 *                 stream_options.include_usage, max_tokens,
 *                 max_completion_tokens, temperature, top_p, top_k, min_p,
 *                 seed, stop, presence_penalty, frequency_penalty,
 *                 repeat_penalty, n (only 1), ignore_eos
 *   OpenAI completion: the same with prompt (a string, or an array of one string) instead of messages
 *   Ollama chat / generate: model, messages / prompt, system, raw, stream,
 *                 options{num_predict, temperature, top_p, top_k, min_p,
 *                 seed, stop, repeat_penalty, presence_penalty,
 *                 frequency_penalty, repeat_last_n}
 * Roles: system, user, assistant, tool (anything else: 400). A chat needs at
 * least one message; numbers must be numbers, in range (temperature 0..2,
 * top_p 0..1, max_tokens >= 1, ...). 0, or -1 with e.
 *
 * Details (api.c has the full rules):
 *   - OpenAI: null means absent. Also accepted: role "developer" (read as
 *     "system"), repeat_last_n at the top level (as llama.cpp's server).
 *     Text content parts are joined with "\n" (as llama.cpp and vLLM do);
 *     any other part type is a 400. An assistant message may lack content
 *     only when it has tool_calls / function_call (it becomes "").
 *     max_completion_tokens wins over max_tokens; both 1..2^31-1.
 *   - Completion prompt: a string or an array of exactly one string; token
 *     id arrays are a 400 ("token-id prompts are not supported").
 *   - seed: an integer in [-2^63, 2^64); -1 means "no seed" (llama.cpp and
 *     Ollama's convention), anything else sets has_seed. Negative seeds are
 *     taken modulo 2^64.
 *   - stop: a string or an array of at most 16 non-empty strings.
 *   - No string anywhere in the body may hold \u0000 (C strings would end
 *     there): 400 naming it, e.g. param "messages[0].content".
 *   - repeat_last_n: 0..NM_API_MAX_REPEAT_LAST_N.
 *   - Ollama: num_predict <= 0 means no limit (max_tokens -1), as Ollama
 *     does; repeat_last_n -1 (whole context) is refused; message content must
 *     be a string; non-empty "images" are refused. No messages / no prompt
 *     sets load_only instead of failing. */
int nm_api_parse(nm_api_kind kind, const char *body, size_t len, const nm_sampler_params *defaults,
                 nm_api_request *out, nm_api_error *e);
void nm_api_request_free(nm_api_request *r);

/* {"error": {...}} for OpenAI paths, {"error": "message"} for Ollama paths
 * (ollama_style). malloc'd, NUL-terminated; NULL when out of memory. */
char *nm_api_error_json(const nm_api_error *e, int ollama_style);

/* One response body or streamed chunk. */
typedef struct {
    const char *id;           /* "chatcmpl-..." / "cmpl-..." */
    const char *model;        /* the served model name */
    int64_t created;          /* unix seconds */
    const char *content;      /* answer text (or the completion text) */
    size_t content_len;
    const char *reasoning;    /* R1 reasoning text (NULL / 0 when none) */
    size_t reasoning_len;
    const char *finish;       /* "stop" / "length"; NULL on a chunk that does not end the stream */
    int first;                /* the first streamed chunk: carries role "assistant" */
    int64_t prompt_tokens, completion_tokens;
    int with_usage;           /* put usage in this body / chunk */
    /* Ollama timings, nanoseconds */
    int64_t total_ns, prompt_ns, eval_ns;
    int32_t created_nsec;     /* sub-second part of Ollama's created_at (0..999999999) */
} nm_api_out;

/* The whole non-streamed body (stream = 0), or one streamed chunk (stream =
 * 1): for OpenAI kinds the JSON that follows "data: " (the caller adds the
 * SSE framing and the final "data: [DONE]"); for Ollama kinds one NDJSON line
 * without the newline. Content and reasoning are emitted only when non-empty
 * (OpenAI chat: message.content is always present, as a string; reasoning as
 * message.reasoning_content / delta.reasoning_content; Ollama chat as
 * message.thinking, generate as "thinking"). An OpenAI usage-only chunk
 * (stream_options.include_usage) is choices [] with usage: pass
 * with_usage = 1 and content_len = 0, finish = NULL. malloc'd; NULL when out
 * of memory. */
char *nm_api_render(nm_api_kind kind, int stream, const nm_api_out *o);

/* sec.nsec as RFC 3339 UTC with nanoseconds, "2024-01-01T00:00:00.000000000Z"
 * (Ollama's created_at / modified_at). Returns buf. size >= 32 is enough. */
char *nm_api_time_rfc3339(int64_t sec, int32_t nsec, char *buf, size_t size);

/* {"status": STATUS, "reason": REASON} (reason left out when NULL): the
 * body of a /health that is not ok. malloc'd. */
char *nm_api_health_json(const char *status, const char *reason);

/* GET /v1/models and GET /api/tags bodies for the one served model.
 * size_bytes: the model file(s) size; family e.g. "deepseek2"; quant e.g.
 * "Q4_K"; params e.g. "15.7B". malloc'd. */
char *nm_api_models_json(const char *name, int64_t created);
char *nm_api_tags_json(const char *name, int64_t size_bytes, const char *family, const char *quant,
                       const char *params, const char *modified_iso8601);

/* Streaming split of an R1 reply into reasoning and answer (reasoning inside
 * <think>...</think>, as nm_chat_split_reasoning). Feed the generated text
 * as it grows; each call returns only what is new on each side, holding back
 * bytes that might still be the start of "<think>" or "</think>", so the
 * concatenated deltas equal the final split exactly. */
typedef struct {
    int started_in_think; /* the prompt ended inside "<think>\n" */
    size_t shown_reasoning, shown_answer;
} nm_reasoning_stream;

/* text/len: all the text generated so far (each call's text extends the
 * previous one); final: no more text will come (release everything held).
 * Sets the new parts as views into text (length 0 when nothing is new).
 *
 * The concatenated deltas equal nm_chat_split_reasoning(full text) with one
 * difference at the very end: a text that ends inside a tag ("<thi" before
 * any reasoning, "</thi" inside it) keeps those bytes as answer / reasoning
 * on the final call instead of dropping them (they were never a tag). For a
 * non-streamed reply, one call with final = 1 on a zeroed state gives the
 * same split the stream would have given. */
void nm_reasoning_stream_feed(nm_reasoning_stream *s, const char *text, size_t len, int final,
                              const char **reasoning, size_t *reasoning_len, const char **answer,
                              size_t *answer_len);

#endif
