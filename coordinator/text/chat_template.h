/* chat_template.h - conversations rendered into the prompt text a DeepSeek
 * model was trained on, without a Jinja engine.
 *
 * Each format is written out in C to give, byte for byte, what transformers'
 * apply_chat_template(messages, tokenize=False, add_generation_prompt=...)
 * gives with the model's own Jinja template (tests/fixtures/chat holds the
 * transformers renderings the tests compare against):
 *
 *   deepseek3  DeepSeek-V3 / V3-0324 / R1 / R1-0528
 *              BOS, then every system message joined by "\n\n" (wherever they
 *              stand in the list), then per message
 *                user       "<｜User｜>" content "<｜Assistant｜>"
 *                assistant  content "<｜end▁of▁sentence｜>"  (after tool
 *                           results: "<｜tool▁outputs▁end｜>" first)
 *                tool       "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
 *                           content "<｜tool▁output▁end｜>" (later outputs:
 *                           "\n<｜tool▁output▁begin｜>" ...)
 *              a trailing tool block is closed with "<｜tool▁outputs▁end｜>";
 *              the generation prompt "<｜Assistant｜>" is added only when the
 *              last turn is not a user turn (a user turn already ends with it)
 *              and not a tool turn. The end-of-sentence text is literal in the
 *              template, so eos_text is not used.
 *   deepseek2  DeepSeek-V2 / V2-Lite / V2.5 chat, DeepSeek-LLM chat
 *              BOS, then per message, in order
 *                system     content "\n\n"
 *                user       "User: " content "\n\n"
 *                assistant  "Assistant: " content EOS
 *              (tool messages are skipped, as the template does), and the
 *              generation prompt "Assistant:" (no trailing space).
 *
 * force_think (DeepSeek-R1, like KTransformers' --force_think) appends
 * "<think>\n" after the generation prompt so the answer starts inside the
 * reasoning block; it applies only when add_generation_prompt is set.
 * Assistant messages are rendered as given: keep only the answer part of an R1
 * reply in the history (nm_chat_split_reasoning), as DeepSeek recommends. */
#ifndef NUMOE_COORDINATOR_TEXT_CHAT_TEMPLATE_H
#define NUMOE_COORDINATOR_TEXT_CHAT_TEMPLATE_H

#include <stddef.h>

#include "common/error.h"

typedef enum {
    NM_CHAT_TMPL_NONE = 0, /* not recognised */
    NM_CHAT_TMPL_DEEPSEEK3,
    NM_CHAT_TMPL_DEEPSEEK2,
} nm_chat_tmpl;

/* The names --chat-template accepts, comma-separated (for help texts). */
extern const char nm_chat_template_names[];

typedef struct {
    const char *role;    /* "system", "user", "assistant" or "tool" */
    const char *content; /* UTF-8, NUL-terminated; NULL renders as "" */
} nm_chat_msg;

/* The format of a GGUF's tokenizer.chat_template text (not NUL-terminated),
 * by llama.cpp's rules (llama_chat_detect_template):
 *   contains "'Assistant: ' + message['content'] + eos_token"      -> deepseek2
 *   contains "<｜Assistant｜>", "<｜User｜>" and "<｜end▁of▁sentence｜>" -> deepseek3
 * NM_CHAT_TMPL_NONE otherwise (or for NULL). */
nm_chat_tmpl nm_chat_template_detect(const char *tmpl_text, size_t len);

/* The format called NAME ("deepseek3", "deepseek2"); -1 with an error that
 * lists the known names for anything else. */
int nm_chat_template_from_name(const char *name, nm_chat_tmpl *out, nm_err *e);

/* The canonical name of a format ("none" for NM_CHAT_TMPL_NONE). */
const char *nm_chat_template_name(nm_chat_tmpl t);

/* Picks the format for a model: the --chat-template NAME if given, else the
 * detected format of the GGUF's template text (tmpl_text may be NULL when the
 * file has none). -1 with an error naming --chat-template and the known
 * names when neither gives one. */
int nm_chat_template_resolve(const char *name, const char *tmpl_text, size_t len, nm_chat_tmpl *out, nm_err *e);

/* Renders msgs[0..n) into a new NUL-terminated string *out (the caller frees
 * it). bos_text / eos_text are the vocabulary's BOS / EOS token texts; NULL
 * means the DeepSeek ones ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
 * "" none. Unknown roles and NM_CHAT_TMPL_NONE are errors. 0, or -1 with e. */
int nm_chat_render(nm_chat_tmpl t, const nm_chat_msg *msgs, size_t n, int add_generation_prompt, int force_think,
                   const char *bos_text, const char *eos_text, char **out, nm_err *e);

/* Generated text split into reasoning and answer, as views into the text. */
typedef struct {
    const char *reasoning; /* inside <think>...</think>, surrounding whitespace trimmed */
    size_t reasoning_len;
    const char *answer;    /* after </think> with leading whitespace trimmed; all
                              of the text when there is no reasoning block */
    size_t answer_len;
    int has_reasoning;     /* a reasoning block was found (opened or forced) */
    int thinking;          /* the block is not closed yet: still reasoning
                              (streaming, or cut off by the token limit) */
} nm_chat_reasoning;

/* Splits generated text (len bytes) into reasoning and answer. The text may
 * open with "<think>" (after optional whitespace), or, with started_in_think
 * (the prompt ended inside "<think>\n": force_think, or an R1 template that
 * opens the block itself), be inside the block from its first byte. Safe to
 * call on a growing buffer while streaming. */
void nm_chat_split_reasoning(const char *text, size_t len, int started_in_think, nm_chat_reasoning *out);

#endif
