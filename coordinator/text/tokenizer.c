/* tokenizer.c - byte-level BPE (GGUF "gpt2" tokenizer); see tokenizer.h for
 * the algorithm (and docs/MODEL.md §6). */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "coordinator/text/tokenizer.h"

#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* pre-tokenizer regexes                                                     */
/* ------------------------------------------------------------------------ */

/* The regex lists of llama.cpp's llm_tokenizer_bpe (src/llama-vocab.cpp) in
 * PCRE2 syntax: non-ASCII characters written as \x{...} (so that no editor's
 * Unicode normalisation can change a class), everything else verbatim. `\s`
 * and `\S` are rewritten at compile time to the Unicode White_Space set (what
 * HF tokenizers' Oniguruma and llama.cpp's unicode tables use; PCRE2's own \s
 * would add U+180E). */
static const char *const RE_DEEPSEEK_LLM[] = {
    "[\\r\\n]",
    "\\s?[A-Za-z\\x{b5}\\x{c0}-\\x{d6}\\x{d8}-\\x{f6}\\x{f8}-\\x{1ba}\\x{1bc}-\\x{1bf}\\x{1c4}-\\x{293}"
    "\\x{295}-\\x{2af}\\x{370}-\\x{373}\\x{376}\\x{377}\\x{37b}-\\x{37d}\\x{37f}\\x{386}\\x{388}-\\x{38a}"
    "\\x{38c}\\x{38e}-\\x{3a1}\\x{3a3}-\\x{3f5}\\x{3f7}-\\x{481}\\x{48a}-\\x{52f}\\x{531}-\\x{556}"
    "\\x{10a0}-\\x{10c5}\\x{13a0}-\\x{13f5}\\x{13f8}-\\x{13fd}\\x{1c90}-\\x{1cba}\\x{1cbd}-\\x{1cbf}"
    "\\x{1d00}-\\x{1d2b}\\x{1d6b}-\\x{1d77}\\x{1d79}-\\x{1d9a}\\x{1e00}-\\x{1f15}\\x{1f18}-\\x{1f1d}"
    "\\x{1f20}-\\x{1f45}\\x{1f48}-\\x{1f4d}\\x{1f50}-\\x{1f57}\\x{1f59}\\x{1f5b}\\x{1f5d}\\x{1f5f}-\\x{1f7d}"
    "\\x{1f80}-\\x{1fb4}\\x{1fb6}-\\x{1fbc}\\x{1fbe}\\x{1fc2}-\\x{1fc4}\\x{1fc6}-\\x{1fcc}\\x{1fd0}-\\x{1fd3}"
    "\\x{1fd6}-\\x{1fdb}\\x{1fe0}-\\x{1fec}\\x{1ff2}-\\x{1ff4}\\x{1ff6}-\\x{1ffc}\\x{2102}\\x{2107}"
    "\\x{210a}-\\x{2113}\\x{2115}\\x{2119}-\\x{211d}\\x{2124}\\x{2126}\\x{2128}\\x{212a}-\\x{212d}"
    "\\x{212f}-\\x{2134}\\x{2139}\\x{213c}-\\x{213f}\\x{2145}-\\x{2149}\\x{214e}\\x{2183}\\x{2184}"
    "\\x{2c00}-\\x{2c7b}\\x{2c7e}-\\x{2ce4}\\x{2ceb}-\\x{2cee}\\x{2cf2}\\x{2cf3}\\x{a640}-\\x{a66d}"
    "\\x{a680}-\\x{a69b}\\x{a722}-\\x{a76f}\\x{a771}-\\x{a787}\\x{a78b}-\\x{a78e}\\x{ab70}-\\x{abbf}"
    "\\x{fb00}-\\x{fb06}\\x{fb13}-\\x{fb17}\\x{ff21}-\\x{ff3a}\\x{ff41}-\\x{ff5a}\\x{10400}-\\x{1044f}"
    "\\x{104b0}-\\x{104d3}\\x{104d8}-\\x{104fb}\\x{10c80}-\\x{10cb2}\\x{10cc0}-\\x{10cf2}"
    "\\x{118a0}-\\x{118df}\\x{1e900}-\\x{1e943}]+",
    "\\s?[!-/:-~\\x{ff01}-\\x{ff0f}\\x{ff1a}-\\x{ff5e}\\x{2018}-\\x{201f}\\x{3000}-\\x{3002}]+",
    "\\s+$",
    "[\\x{4e00}-\\x{9fa5}\\x{800}-\\x{4e00}\\x{ac00}-\\x{d7ff}]+",
    "\\p{N}+",
};

static const char *const RE_DEEPSEEK_V3[] = {
    "\\p{N}{1,3}",
    "[\\x{4e00}-\\x{9fa5}\\x{3040}-\\x{309f}\\x{30a0}-\\x{30ff}]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};

static const char *const RE_DEEPSEEK_CODER[] = {
    "[\\r\\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\\x{4e00}-\\x{9fa5}\\x{800}-\\x{4e00}\\x{ac00}-\\x{d7ff}]+",
    "\\p{N}",
};

static const char *const RE_LLAMA3[] = {
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};

static const char *const RE_QWEN2[] = {
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};

static const char *const RE_GPT2[] = {
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
};

static const char *const RE_DEFAULT[] = {
    "[\\p{P}\\$\\+<=>\\^~\\|]+",
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    "\\p{N}+",
    "[0-9][0-9][0-9]",
};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

typedef struct {
    const char *used;          /* name of the regex set */
    const char *const *re;
    int n_re;
    int ignore_merges;
} pre_set;

static const pre_set PRE_V3 = {"deepseek-v3", RE_DEEPSEEK_V3, (int)NELEM(RE_DEEPSEEK_V3), 0};
static const pre_set PRE_LLM = {"deepseek-llm", RE_DEEPSEEK_LLM, (int)NELEM(RE_DEEPSEEK_LLM), 0};
static const pre_set PRE_CODER = {"deepseek-coder", RE_DEEPSEEK_CODER, (int)NELEM(RE_DEEPSEEK_CODER), 0};
static const pre_set PRE_LLAMA3 = {"llama3", RE_LLAMA3, (int)NELEM(RE_LLAMA3), 1};
static const pre_set PRE_QWEN2 = {"qwen2", RE_QWEN2, (int)NELEM(RE_QWEN2), 0};
static const pre_set PRE_GPT2 = {"gpt2", RE_GPT2, (int)NELEM(RE_GPT2), 0};
static const pre_set PRE_DEFAULT = {"default", RE_DEFAULT, (int)NELEM(RE_DEFAULT), 0};

static const pre_set *pre_for(const char *name) {
    static const struct { const char *name; const pre_set *set; } map[] = {
        {"deepseek-v3", &PRE_V3},      {"deepseek-llm", &PRE_LLM},  {"deepseek-coder", &PRE_CODER},
        {"llama3", &PRE_LLAMA3},       {"llama-v3", &PRE_LLAMA3},   {"llama-bpe", &PRE_LLAMA3},
        {"qwen2", &PRE_QWEN2},         {"deepseek-r1-qwen", &PRE_QWEN2}, {"stablelm2", &PRE_QWEN2},
        {"gpt-2", &PRE_GPT2},          {"gpt2", &PRE_GPT2},         {"mpt", &PRE_GPT2},
        {"olmo", &PRE_GPT2},           {"jais", &PRE_GPT2},
    };
    for (size_t i = 0; i < NELEM(map); i++)
        if (!strcmp(map[i].name, name)) return map[i].set;
    return &PRE_DEFAULT;
}

/* Code points assigned in Unicode 15.0 - 16.0, by general category: PCRE2
 * 10.42 knows Unicode 14.0, HF tokenizers (Oniguruma) 16.0, and a new emoji
 * such as U+1FABF must be \p{S} to pre-tokenize as HF does. \p{L} etc. are
 * rewritten to include these (harmless where PCRE2 is newer: they are in the
 * same category there). No character changed its major category between
 * 14.0 and 16.0. Generated by `tests/make_tokenizer_cases.py
 * --unicode-supplement` (Python 3.11's unicodedata 14.0.0 vs unicodedata2
 * 16.0.0). */
#define U16_L \
    "\\x{1c89}-\\x{1c8a}\\x{a7cb}-\\x{a7cd}\\x{a7da}-\\x{a7dc}\\x{105c0}-\\x{105f3}" \
    "\\x{10d4a}-\\x{10d65}\\x{10d6f}-\\x{10d85}\\x{10ec2}-\\x{10ec4}\\x{1123f}-\\x{11240}" \
    "\\x{11380}-\\x{11389}\\x{1138b}\\x{1138e}\\x{11390}-\\x{113b5}\\x{113b7}\\x{113d1}\\x{113d3}" \
    "\\x{11bc0}-\\x{11be0}\\x{11f02}\\x{11f04}-\\x{11f10}\\x{11f12}-\\x{11f33}\\x{1342f}" \
    "\\x{13441}-\\x{13446}\\x{13460}-\\x{143fa}\\x{16100}-\\x{1611d}\\x{16d40}-\\x{16d6c}\\x{18cff}" \
    "\\x{1b132}\\x{1b155}\\x{1df25}-\\x{1df2a}\\x{1e030}-\\x{1e06d}\\x{1e4d0}-\\x{1e4eb}" \
    "\\x{1e5d0}-\\x{1e5ed}\\x{1e5f0}\\x{2b739}\\x{2ebf0}-\\x{2ee5d}\\x{31350}-\\x{323af}"

#define U16_M \
    "\\x{897}\\x{cf3}\\x{ece}\\x{10d69}-\\x{10d6d}\\x{10efc}-\\x{10eff}\\x{11241}" \
    "\\x{113b8}-\\x{113c0}\\x{113c2}\\x{113c5}\\x{113c7}-\\x{113ca}\\x{113cc}-\\x{113d0}\\x{113d2}" \
    "\\x{113e1}-\\x{113e2}\\x{11f00}-\\x{11f01}\\x{11f03}\\x{11f34}-\\x{11f3a}\\x{11f3e}-\\x{11f42}" \
    "\\x{11f5a}\\x{13440}\\x{13447}-\\x{13455}\\x{1611e}-\\x{1612f}\\x{1e08f}\\x{1e4ec}-\\x{1e4ef}" \
    "\\x{1e5ee}-\\x{1e5ef}"

#define U16_N \
    "\\x{10d40}-\\x{10d49}\\x{116d0}-\\x{116e3}\\x{11bf0}-\\x{11bf9}\\x{11f50}-\\x{11f59}" \
    "\\x{16130}-\\x{16139}\\x{16d70}-\\x{16d79}\\x{1ccf0}-\\x{1ccf9}\\x{1d2c0}-\\x{1d2d3}" \
    "\\x{1e4f0}-\\x{1e4f9}\\x{1e5f1}-\\x{1e5fa}"

#define U16_P \
    "\\x{1b4e}-\\x{1b4f}\\x{1b7f}\\x{10d6e}\\x{113d4}-\\x{113d5}\\x{113d7}-\\x{113d8}" \
    "\\x{11b00}-\\x{11b09}\\x{11be1}\\x{11f43}-\\x{11f4f}\\x{16d6d}-\\x{16d6f}\\x{1e5ff}"

#define U16_S \
    "\\x{2427}-\\x{2429}\\x{2ffc}-\\x{2fff}\\x{31e4}-\\x{31e5}\\x{31ef}\\x{10d8e}-\\x{10d8f}" \
    "\\x{1cc00}-\\x{1ccef}\\x{1cd00}-\\x{1ceb3}\\x{1f6dc}\\x{1f774}-\\x{1f776}\\x{1f77b}-\\x{1f77f}" \
    "\\x{1f7d9}\\x{1f8b2}-\\x{1f8bb}\\x{1f8c0}-\\x{1f8c1}\\x{1fa75}-\\x{1fa77}\\x{1fa87}-\\x{1fa89}" \
    "\\x{1fa8f}\\x{1faad}-\\x{1faaf}\\x{1fabb}-\\x{1fabf}\\x{1fac6}\\x{1face}-\\x{1facf}" \
    "\\x{1fada}-\\x{1fadc}\\x{1fadf}\\x{1fae8}-\\x{1fae9}\\x{1faf7}-\\x{1faf8}\\x{1fbcb}-\\x{1fbef}"

/* White_Space (Unicode PropList), as a character-class body. */
#define WS_CLASS "\\t\\n\\x{0b}\\f\\r\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}"

static const char *supplement(char cat) {
    switch (cat) {
    case 'L': return U16_L;
    case 'M': return U16_M;
    case 'N': return U16_N;
    case 'P': return U16_P;
    case 'S': return U16_S;
    default: return NULL;
    }
}

/* Copies SRC replacing \s / \S by explicit White_Space classes and adding the
 * Unicode 15-16 supplement to \p{L}, \p{M}, \p{N}, \p{P}, \p{S}. Returns a
 * malloc'd string or NULL (out of memory, or \S inside a class). */
static char *rewrite_pattern(const char *src) {
    size_t n = strlen(src), k = 0, cap = n + 1;
    for (size_t i = 0; i + 1 < n; i++)
        if (src[i] == '\\') cap += sizeof WS_CLASS + sizeof U16_L + sizeof U16_M + sizeof U16_N + sizeof U16_P + sizeof U16_S;
    char *dst = malloc(cap);
    if (!dst) return NULL;
    int in_class = 0;
    for (size_t i = 0; i < n; i++) {
        char c = src[i];
        if (c == '\\' && i + 1 < n) {
            char e = src[i + 1];
            const char *sup = e == 'p' && i + 4 < n && src[i + 2] == '{' && src[i + 4] == '}' ? supplement(src[i + 3])
                                                                                              : NULL;
            if (e == 's' || e == 'S') {
                if (in_class && e == 'S') return free(dst), NULL;
                const char *open = in_class ? "" : (e == 's' ? "[" : "[^");
                k += (size_t)sprintf(dst + k, "%s%s%s", open, WS_CLASS, in_class ? "" : "]");
                i++;
            } else if (sup) {
                k += (size_t)sprintf(dst + k, "%s\\p{%c}%s%s", in_class ? "" : "[", src[i + 3], sup,
                                     in_class ? "" : "]");
                i += 4;
            } else {
                dst[k++] = c;
                dst[k++] = e;
                i++;
            }
            continue;
        }
        if (c == '[' && !in_class) {
            in_class = 1;
            dst[k++] = c;
            /* a ']' right after '[' or '[^' is a literal */
            if (i + 1 < n && src[i + 1] == '^') dst[k++] = src[++i];
            if (i + 1 < n && src[i + 1] == ']') dst[k++] = src[++i];
            continue;
        }
        if (c == ']' && in_class) in_class = 0;
        dst[k++] = c;
    }
    dst[k] = 0;
    return dst;
}

/* ------------------------------------------------------------------------ */
/* UTF-8                                                                     */
/* ------------------------------------------------------------------------ */

enum { U8_VALID, U8_TRUNC, U8_INVALID };

/* Classifies the character at S (N > 0 bytes available). VALID: *len = its
 * length. TRUNC: a valid prefix that runs out of bytes, *len = N. INVALID:
 * *len = length of the maximal invalid subpart (>= 1). Strict: no overlongs,
 * surrogates or values above U+10FFFF. */
static int u8_class(const unsigned char *s, size_t n, size_t *len) {
    unsigned c = s[0];
    size_t need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) return *len = 1, U8_VALID;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return *len = 1, U8_INVALID;
    for (size_t k = 1; k <= need; k++) {
        if (k >= n) return *len = n, U8_TRUNC;
        unsigned b = s[k];
        unsigned l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
        if (b < l || b > h) return *len = k, U8_INVALID;
    }
    return *len = need + 1, U8_VALID;
}

static size_t u8_len_lead(unsigned char c) {
    return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}

static const char U8_REPL[3] = {'\xEF', '\xBF', '\xBD'};

/* ------------------------------------------------------------------------ */
/* growable arrays                                                           */
/* ------------------------------------------------------------------------ */

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap : 16;
    while (nc < need) nc *= 2;
    void *q = realloc(*p, nc * elem);
    if (!q) return -1;
    *p = q;
    *cap = nc;
    return 0;
}

typedef struct {
    int32_t *v;
    size_t n, cap;
} ids_buf;

static int ids_push(ids_buf *b, int32_t id) {
    if (grow((void **)&b->v, &b->cap, b->n + 1, sizeof *b->v)) return -1;
    b->v[b->n++] = id;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* the tokenizer                                                             */
/* ------------------------------------------------------------------------ */

typedef struct {
    int32_t first_child, next_sibling, term; /* term: index into spec[] or -1 */
    unsigned char byte;
} trie_node;

struct nm_tokenizer {
    int32_t n_vocab;
    char *tok_arena;                 /* token texts, back to back */
    uint32_t *tok_off, *tok_len;
    uint8_t *tok_type;
    char *piece_arena;               /* decoded pieces */
    uint32_t *piece_off, *piece_len;
    int32_t *tmap;                   /* open addressing: token id or -1 */
    size_t tmap_mask;

    size_t n_merges;
    char *mer_arena;                 /* "left right" strings */
    uint32_t *mer_off, *mer_len, *mer_llen;
    int32_t *mmap_tab;               /* open addressing: merge index (= rank) or -1 */
    size_t mmap_mask;

    /* byte-level alphabet */
    char bchar[256][2];
    uint8_t bchar_len[256];
    int16_t cp_to_byte[324];         /* code point (< 324) -> byte, or -1 */
    int32_t byte_char_tok[256], byte_hex_tok[256];
    int n_missing_bytes;

    /* special tokens matched in text, longest first */
    int32_t *spec;
    size_t n_spec;
    trie_node *trie;
    size_t n_trie;

    int32_t bos, eos, eot, pad;
    int add_bos, add_eos;
    int32_t *eog;
    size_t n_eog;

    char pre[64];
    const pre_set *pre_set;
    pcre2_code *re[8];
    int n_re;
};

static uint64_t hash_bytes(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}
#define HASH_SEED 0xcbf29ce484222325ULL

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c *= 2;
    return c;
}

int32_t nm_token_id(const nm_tokenizer *tk, const char *text, size_t len) {
    if (!tk || len == 0) return -1;
    size_t i = hash_bytes(HASH_SEED, text, len) & tk->tmap_mask;
    for (;; i = (i + 1) & tk->tmap_mask) {
        int32_t id = tk->tmap[i];
        if (id < 0) return -1;
        if (tk->tok_len[id] == len && !memcmp(tk->tok_arena + tk->tok_off[id], text, len)) return id;
    }
}

static int32_t merge_rank(const nm_tokenizer *tk, const char *l, size_t ll, const char *r, size_t rl) {
    uint64_t h = hash_bytes(HASH_SEED, l, ll);
    h = hash_bytes(h, " ", 1);
    h = hash_bytes(h, r, rl);
    for (size_t i = h & tk->mmap_mask;; i = (i + 1) & tk->mmap_mask) {
        int32_t m = tk->mmap_tab[i];
        if (m < 0) return -1;
        const char *s = tk->mer_arena + tk->mer_off[m];
        if (tk->mer_llen[m] == ll && tk->mer_len[m] == ll + 1 + rl && !memcmp(s, l, ll) &&
            !memcmp(s + ll + 1, r, rl))
            return m;
    }
}

void nm_tokenizer_free(nm_tokenizer *tk) {
    if (!tk) return;
    free(tk->tok_arena);
    free(tk->tok_off);
    free(tk->tok_len);
    free(tk->tok_type);
    free(tk->piece_arena);
    free(tk->piece_off);
    free(tk->piece_len);
    free(tk->tmap);
    free(tk->mer_arena);
    free(tk->mer_off);
    free(tk->mer_len);
    free(tk->mer_llen);
    free(tk->mmap_tab);
    free(tk->spec);
    free(tk->trie);
    free(tk->eog);
    for (int i = 0; i < tk->n_re; i++) pcre2_code_free(tk->re[i]);
    free(tk);
}

/* llama.cpp looks these up by text: the first lists make a token CONTROL
 * whatever its stored type (EOT, EOM, FIM and end-of-generation tokens,
 * llama_vocab::impl::load); all of them end generation except the FIM
 * prefix/suffix/middle ones. "<|EOT|>" (DeepSeek-Coder-instruct's end of turn)
 * only ends generation, llama.cpp leaves its type alone. */
static const char *const FORCE_CONTROL_EOG[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "<\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>",
    "<end_of_utterance>", "<|eom_id|>", "<|return|>", "<|call|>",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
};
static const char *const FORCE_CONTROL_FIM[] = {
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>",
    "<PRE>", "\xe2\x96\x81<PRE>", "<|code_prefix|>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "hole\xef\xbd\x9c>",
    "<SUF>", "\xe2\x96\x81<SUF>", "<|code_suffix|>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>",
    "<MID>", "\xe2\x96\x81<MID>", "<|code_middle|>",
};
/* EOT candidates in llama.cpp's order of preference (it takes the first it
 * meets; we take the first of this list that exists). */
static const char *const EOT_TEXTS[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "<\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>",
    "<end_of_utterance>",
};

static int32_t find_text(const nm_tokenizer *tk, const char *s) { return nm_token_id(tk, s, strlen(s)); }

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int build_specials(nm_tokenizer *tk, nm_err *err) {
    size_t n = 0;
    for (int32_t i = 0; i < tk->n_vocab; i++) {
        int t = tk->tok_type[i];
        if ((t == NM_TOKEN_CONTROL || t == NM_TOKEN_USER_DEFINED || t == NM_TOKEN_UNKNOWN) && tk->tok_len[i])
            n++;
    }
    tk->spec = malloc((n ? n : 1) * sizeof *tk->spec);
    uint64_t *key = malloc((n ? n : 1) * sizeof *key);
    if (!tk->spec || !key) return free(key), nm_errf(err, "out of memory");
    /* longest first (llama.cpp's cache_special_tokens order); ids break ties */
    for (int32_t i = 0; i < tk->n_vocab; i++) {
        int t = tk->tok_type[i];
        if ((t == NM_TOKEN_CONTROL || t == NM_TOKEN_USER_DEFINED || t == NM_TOKEN_UNKNOWN) && tk->tok_len[i])
            key[tk->n_spec++] = ((uint64_t)(UINT32_MAX - tk->tok_len[i]) << 32) | (uint32_t)i;
    }
    qsort(key, tk->n_spec, sizeof *key, cmp_u64);
    for (size_t k = 0; k < tk->n_spec; k++) tk->spec[k] = (int32_t)(key[k] & 0xffffffffu);
    free(key);

    /* byte trie over the special texts, to find which occur in a text in one pass */
    size_t total = 1;
    for (size_t k = 0; k < tk->n_spec; k++) total += tk->tok_len[tk->spec[k]];
    if (total > INT32_MAX) return nm_errf(err, "special tokens: %zu bytes of text is too much", total);
    tk->trie = malloc(total * sizeof *tk->trie);
    if (!tk->trie) return nm_errf(err, "out of memory");
    tk->trie[0] = (trie_node){-1, -1, -1, 0};
    tk->n_trie = 1;
    for (size_t k = 0; k < tk->n_spec; k++) {
        int32_t id = tk->spec[k];
        const unsigned char *s = (const unsigned char *)tk->tok_arena + tk->tok_off[id];
        int32_t node = 0;
        for (uint32_t j = 0; j < tk->tok_len[id]; j++) {
            int32_t c = tk->trie[node].first_child;
            while (c >= 0 && tk->trie[c].byte != s[j]) c = tk->trie[c].next_sibling;
            if (c < 0) {
                c = (int32_t)tk->n_trie++;
                tk->trie[c] = (trie_node){-1, tk->trie[node].first_child, -1, s[j]};
                tk->trie[node].first_child = c;
            }
            node = c;
        }
        if (tk->trie[node].term < 0) tk->trie[node].term = (int32_t)k;
    }
    return 0;
}

static int compile_regexes(nm_tokenizer *tk, nm_err *err) {
    for (int i = 0; i < tk->pre_set->n_re; i++) {
        char *pat = rewrite_pattern(tk->pre_set->re[i]);
        if (!pat) return nm_errf(err, "pre-tokenizer '%s': regex %d: out of memory", tk->pre_set->used, i);
        int ec;
        PCRE2_SIZE eo;
        pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED,
                                       PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY, &ec, &eo, NULL);
        free(pat);
        if (!re) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(ec, msg, sizeof msg);
            return nm_errf(err, "pre-tokenizer '%s': regex %d does not compile at %zu: %s", tk->pre_set->used,
                           i, (size_t)eo, (const char *)msg);
        }
        (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* the interpreter is used if JIT is unavailable */
        tk->re[tk->n_re++] = re;
    }
    return 0;
}

/* The array KEY: NULL if absent (*bad = 0) or of the wrong kind (*bad = 1,
 * err set). want_strings: an array of strings, else of integers. */
static const nm_gguf_kv *find_arr(const nm_gguf *g, const char *key, int want_strings, const char *file,
                                  nm_err *err, int *bad) {
    const nm_gguf_kv *kv = nm_gguf_find(g, key);
    *bad = 0;
    if (!kv) return NULL;
    int t = kv->type == NM_GGUF_ARRAY ? (int)kv->arr_type : -1;
    int is_int = t >= 0 && t != NM_GGUF_STRING && t != NM_GGUF_ARRAY && t != NM_GGUF_F32 && t != NM_GGUF_F64;
    if (want_strings ? t == NM_GGUF_STRING : is_int) return kv;
    *bad = 1;
    if (t < 0)
        nm_errf(err, "%s: %s: expected an array of %s, found a %s", file, key, want_strings ? "strings" : "integers",
                nm_gguf_vtype_name(kv->type));
    else
        nm_errf(err, "%s: %s: expected an array of %s, found an array of %s", file, key,
                want_strings ? "strings" : "integers", nm_gguf_vtype_name(t));
    return NULL;
}

static int get_id(const nm_gguf *g, const char *key, int32_t n_vocab, int32_t *out, const char *file,
                  nm_err *err) {
    uint32_t v = 0;
    int r = nm_gguf_get_u32(g, key, &v, err);
    if (r < 0) return nm_err_prefix(err, "%s", file);
    if (r > 0) return *out = -1, 0;
    if (v >= (uint32_t)n_vocab)
        return nm_errf(err, "%s: %s = %u is not a token id (vocabulary of %d)", file, key, v, n_vocab);
    *out = (int32_t)v;
    return 0;
}

/* Decoded piece of token i into the piece arena. */
static int make_piece(nm_tokenizer *tk, int32_t i, char **arena, size_t *len, size_t *cap) {
    const char *s = tk->tok_arena + tk->tok_off[i];
    size_t n = tk->tok_len[i];
    int t = tk->tok_type[i];
    if (grow((void **)arena, cap, *len + n + 1, 1)) return -1;
    char *dst = *arena + *len;
    size_t k = 0;
    tk->piece_off[i] = (uint32_t)*len;
    if (t == NM_TOKEN_UNUSED) {
        k = 0;
    } else if (t == NM_TOKEN_CONTROL || t == NM_TOKEN_USER_DEFINED || t == NM_TOKEN_UNKNOWN) {
        memcpy(dst, s, n);
        k = n;
    } else if (t == NM_TOKEN_BYTE) {
        unsigned v;
        char tail;
        if (n == 6 && sscanf(s, "<0x%2x%c", &v, &tail) == 2 && tail == '>') dst[k++] = (char)v;
        else memcpy(dst, s, n), k = n;
    } else {
        /* byte-level: every character back to its byte; a token with a
         * character outside the table stays as its text (HF ByteLevel) */
        size_t j = 0;
        while (j < n) {
            size_t cl;
            if (u8_class((const unsigned char *)s + j, n - j, &cl) != U8_VALID) break;
            unsigned cp;
            const unsigned char *u = (const unsigned char *)s + j;
            if (cl == 1) cp = u[0];
            else if (cl == 2) cp = ((u[0] & 0x1Fu) << 6) | (u[1] & 0x3Fu);
            else break; /* all table characters are < U+0800 */
            if (cp >= 324 || tk->cp_to_byte[cp] < 0) break;
            dst[k++] = (char)tk->cp_to_byte[cp];
            j += cl;
        }
        if (j < n) memcpy(dst, s, n), k = n;
    }
    tk->piece_len[i] = (uint32_t)k;
    *len += k;
    return 0;
}

int nm_tokenizer_load(nm_tokenizer **out, const nm_gguf *g, nm_err *err) {
    *out = NULL;
    const char *file = g && g->n_files > 0 ? g->files[0].path : "(gguf)";
    nm_str model;
    int r = nm_gguf_get_str(g, "tokenizer.ggml.model", &model, err);
    if (r < 0) return nm_err_prefix(err, "%s", file);
    if (r > 0) return nm_errf(err, "%s: no tokenizer in this GGUF (tokenizer.ggml.model is missing)", file);
    if (!nm_str_eq(model, "gpt2")) {
        const char *what = nm_str_eq(model, "llama")  ? " (SentencePiece)"
                           : nm_str_eq(model, "bert") ? " (WordPiece)"
                           : nm_str_eq(model, "t5")   ? " (Unigram)"
                                                      : "";
        return nm_errf(err,
                       "%s: tokenizer model '%.*s'%s is not supported: numoe implements byte-level BPE "
                       "(tokenizer.ggml.model = \"gpt2\", the DeepSeek tokenizer) only",
                       file, (int)(model.len > 64 ? 64 : model.len), model.ptr, what);
    }
    int bad;
    const nm_gguf_kv *ktok = find_arr(g, "tokenizer.ggml.tokens", 1, file, err, &bad);
    if (bad) return -1;
    if (!ktok) return nm_errf(err, "%s: tokenizer.ggml.tokens is missing", file);
    if (ktok->arr_n == 0 || ktok->arr_n > (uint64_t)INT32_MAX)
        return nm_errf(err, "%s: tokenizer.ggml.tokens has %llu entries", file, (unsigned long long)ktok->arr_n);
    const nm_gguf_kv *ktype = find_arr(g, "tokenizer.ggml.token_type", 0, file, err, &bad);
    if (bad) return -1;
    if (ktype && ktype->arr_n != ktok->arr_n)
        return nm_errf(err, "%s: tokenizer.ggml.token_type has %llu entries for %llu tokens", file,
                       (unsigned long long)ktype->arr_n, (unsigned long long)ktok->arr_n);
    const nm_gguf_kv *kmer = find_arr(g, "tokenizer.ggml.merges", 1, file, err, &bad);
    if (bad) return -1;
    if (!kmer) return nm_errf(err, "%s: tokenizer.ggml.merges is missing (a BPE vocabulary needs its merges)", file);
    if (kmer->arr_n > (uint64_t)INT32_MAX)
        return nm_errf(err, "%s: tokenizer.ggml.merges has %llu entries", file, (unsigned long long)kmer->arr_n);

    nm_tokenizer *tk = calloc(1, sizeof *tk);
    if (!tk) return nm_errf(err, "out of memory");
    int32_t nv = tk->n_vocab = (int32_t)ktok->arr_n;

    /* tokens */
    uint64_t total = 0;
    for (int32_t i = 0; i < nv; i++) total += ktok->arr_str[i].len;
    if (total > UINT32_MAX) {
        nm_tokenizer_free(tk);
        return nm_errf(err, "%s: tokenizer.ggml.tokens: %llu bytes of text is too much", file,
                       (unsigned long long)total);
    }
    tk->tok_arena = malloc(total + 1);
    tk->tok_off = malloc((size_t)nv * sizeof *tk->tok_off);
    tk->tok_len = malloc((size_t)nv * sizeof *tk->tok_len);
    tk->tok_type = malloc((size_t)nv);
    tk->piece_off = malloc((size_t)nv * sizeof *tk->piece_off);
    tk->piece_len = malloc((size_t)nv * sizeof *tk->piece_len);
    size_t tcap = pow2_at_least((size_t)nv * 2);
    tk->tmap = malloc(tcap * sizeof *tk->tmap);
    if (!tk->tok_arena || !tk->tok_off || !tk->tok_len || !tk->tok_type || !tk->piece_off || !tk->piece_len ||
        !tk->tmap)
        goto oom;
    tk->tmap_mask = tcap - 1;
    memset(tk->tmap, 0xff, tcap * sizeof *tk->tmap);
    size_t off = 0;
    for (int32_t i = 0; i < nv; i++) {
        nm_str s = ktok->arr_str[i];
        memcpy(tk->tok_arena + off, s.ptr, s.len);
        tk->tok_off[i] = (uint32_t)off;
        tk->tok_len[i] = (uint32_t)s.len;
        off += s.len;
        int64_t t = ktype ? nm_gguf_arr_i64(ktype, (uint64_t)i) : NM_TOKEN_NORMAL;
        tk->tok_type[i] = (uint8_t)(t >= NM_TOKEN_NORMAL && t <= NM_TOKEN_BYTE ? t : NM_TOKEN_NORMAL);
        if (!s.len) continue;
        /* a later duplicate text wins, as in llama.cpp's token_to_id */
        size_t h = hash_bytes(HASH_SEED, s.ptr, s.len) & tk->tmap_mask;
        for (;; h = (h + 1) & tk->tmap_mask) {
            int32_t id = tk->tmap[h];
            if (id < 0 || (tk->tok_len[id] == s.len && !memcmp(tk->tok_arena + tk->tok_off[id], s.ptr, s.len))) {
                tk->tmap[h] = i;
                break;
            }
        }
    }
    tk->tok_arena[off] = 0;

    /* merges: "left right", split at the first space after the first byte */
    total = 0;
    for (uint64_t i = 0; i < kmer->arr_n; i++) total += kmer->arr_str[i].len;
    if (total > UINT32_MAX) {
        nm_tokenizer_free(tk);
        return nm_errf(err, "%s: tokenizer.ggml.merges: %llu bytes of text is too much", file,
                       (unsigned long long)total);
    }
    size_t nm = kmer->arr_n;
    tk->mer_arena = malloc(total + 1);
    tk->mer_off = malloc((nm ? nm : 1) * sizeof *tk->mer_off);
    tk->mer_len = malloc((nm ? nm : 1) * sizeof *tk->mer_len);
    tk->mer_llen = malloc((nm ? nm : 1) * sizeof *tk->mer_llen);
    size_t mcap = pow2_at_least(nm * 2);
    tk->mmap_tab = malloc(mcap * sizeof *tk->mmap_tab);
    if (!tk->mer_arena || !tk->mer_off || !tk->mer_len || !tk->mer_llen || !tk->mmap_tab) goto oom;
    tk->mmap_mask = mcap - 1;
    memset(tk->mmap_tab, 0xff, mcap * sizeof *tk->mmap_tab);
    off = 0;
    for (size_t i = 0; i < nm; i++) {
        nm_str s = kmer->arr_str[i];
        memcpy(tk->mer_arena + off, s.ptr, s.len);
        tk->mer_off[i] = (uint32_t)off;
        tk->mer_len[i] = (uint32_t)s.len;
        off += s.len;
        const char *sp = s.len > 1 ? memchr(s.ptr + 1, ' ', s.len - 1) : NULL;
        tk->mer_llen[i] = sp ? (uint32_t)(sp - s.ptr) : UINT32_MAX;
        if (!sp) continue; /* malformed: cannot match anything */
        size_t h = hash_bytes(HASH_SEED, s.ptr, s.len) & tk->mmap_mask;
        for (;; h = (h + 1) & tk->mmap_mask) {
            int32_t m = tk->mmap_tab[h];
            if (m < 0) {
                tk->mmap_tab[h] = (int32_t)i;
                break;
            }
            /* a repeated pair keeps its first (lowest) rank */
            if (tk->mer_len[m] == s.len && tk->mer_llen[m] == tk->mer_llen[i] &&
                !memcmp(tk->mer_arena + tk->mer_off[m], s.ptr, s.len))
                break;
        }
    }
    tk->mer_arena[off] = 0;
    tk->n_merges = nm;

    /* GPT-2 bytes_to_unicode */
    for (int i = 0; i < 324; i++) tk->cp_to_byte[i] = -1;
    for (int b = 0, extra = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        unsigned cp = printable ? (unsigned)b : 256u + (unsigned)extra++;
        if (cp < 0x80) {
            tk->bchar[b][0] = (char)cp;
            tk->bchar_len[b] = 1;
        } else {
            tk->bchar[b][0] = (char)(0xC0 | (cp >> 6));
            tk->bchar[b][1] = (char)(0x80 | (cp & 0x3F));
            tk->bchar_len[b] = 2;
        }
        tk->cp_to_byte[cp] = (int16_t)b;
    }
    for (int b = 0; b < 256; b++) {
        char hex[8];
        snprintf(hex, sizeof hex, "<0x%02X>", b);
        tk->byte_char_tok[b] = nm_token_id(tk, tk->bchar[b], tk->bchar_len[b]);
        tk->byte_hex_tok[b] = nm_token_id(tk, hex, 6);
        if (tk->byte_char_tok[b] < 0 && tk->byte_hex_tok[b] < 0) tk->n_missing_bytes++;
    }

    /* special ids and flags */
    if (get_id(g, "tokenizer.ggml.bos_token_id", nv, &tk->bos, file, err) ||
        get_id(g, "tokenizer.ggml.eos_token_id", nv, &tk->eos, file, err) ||
        get_id(g, "tokenizer.ggml.padding_token_id", nv, &tk->pad, file, err))
        goto fail;
    tk->add_bos = tk->add_eos = 0;
    if (nm_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &tk->add_bos, err) < 0 ||
        nm_gguf_get_bool(g, "tokenizer.ggml.add_eos_token", &tk->add_eos, err) < 0) {
        nm_err_prefix(err, "%s", file);
        goto fail;
    }
    if (tk->bos < 0) tk->add_bos = 0;
    if (tk->eos < 0) tk->add_eos = 0;

    /* llama.cpp's by-text overrides and the end-of-generation set */
    tk->eog = malloc((NELEM(FORCE_CONTROL_EOG) + 4) * sizeof *tk->eog);
    if (!tk->eog) goto oom;
    tk->eot = -1;
    for (size_t i = 0; i < NELEM(EOT_TEXTS) && tk->eot < 0; i++) tk->eot = find_text(tk, EOT_TEXTS[i]);
    for (size_t i = 0; i < NELEM(FORCE_CONTROL_EOG); i++) {
        int32_t id = find_text(tk, FORCE_CONTROL_EOG[i]);
        if (id < 0) continue;
        tk->tok_type[id] = NM_TOKEN_CONTROL;
        tk->eog[tk->n_eog++] = id;
    }
    for (size_t i = 0; i < NELEM(FORCE_CONTROL_FIM); i++) {
        int32_t id = find_text(tk, FORCE_CONTROL_FIM[i]);
        if (id >= 0) tk->tok_type[id] = NM_TOKEN_CONTROL;
    }
    int32_t extra_eog[3] = {tk->eos, tk->eot, find_text(tk, "<|EOT|>")};
    for (int i = 0; i < 3; i++)
        if (extra_eog[i] >= 0) tk->eog[tk->n_eog++] = extra_eog[i];

    /* decoded pieces */
    {
        size_t alen = 0, acap = 0;
        char *arena = NULL;
        for (int32_t i = 0; i < nv; i++)
            if (make_piece(tk, i, &arena, &alen, &acap)) {
                free(arena);
                goto oom;
            }
        tk->piece_arena = arena ? arena : malloc(1);
        if (!tk->piece_arena) goto oom;
    }

    if (build_specials(tk, err)) goto fail;

    /* pre-tokenizer */
    nm_str pre = {"", 0};
    if (nm_gguf_get_str(g, "tokenizer.ggml.pre", &pre, err) < 0) {
        nm_err_prefix(err, "%s", file);
        goto fail;
    }
    snprintf(tk->pre, sizeof tk->pre, "%.*s", (int)(pre.len < sizeof tk->pre ? pre.len : sizeof tk->pre - 1),
             pre.ptr);
    tk->pre_set = pre_for(tk->pre);
    if (compile_regexes(tk, err)) goto fail;

    *out = tk;
    return 0;
oom:
    nm_errf(err, "%s: tokenizer: out of memory", file);
fail:
    nm_tokenizer_free(tk);
    return -1;
}

int32_t nm_tokenizer_n_vocab(const nm_tokenizer *tk) { return tk->n_vocab; }
size_t nm_tokenizer_n_merges(const nm_tokenizer *tk) { return tk->n_merges; }
int32_t nm_tokenizer_bos(const nm_tokenizer *tk) { return tk->bos; }
int32_t nm_tokenizer_eos(const nm_tokenizer *tk) { return tk->eos; }
int32_t nm_tokenizer_eot(const nm_tokenizer *tk) { return tk->eot; }
int32_t nm_tokenizer_pad(const nm_tokenizer *tk) { return tk->pad; }
int nm_tokenizer_add_bos(const nm_tokenizer *tk) { return tk->add_bos; }
int nm_tokenizer_add_eos(const nm_tokenizer *tk) { return tk->add_eos; }
const char *nm_tokenizer_pre(const nm_tokenizer *tk) { return tk->pre; }
const char *nm_tokenizer_pre_used(const nm_tokenizer *tk) { return tk->pre_set->used; }
int nm_tokenizer_n_missing_bytes(const nm_tokenizer *tk) { return tk->n_missing_bytes; }

int nm_tokenizer_is_eog(const nm_tokenizer *tk, int32_t id) {
    if (id < 0) return 0;
    for (size_t i = 0; i < tk->n_eog; i++)
        if (tk->eog[i] == id) return 1;
    return 0;
}

const char *nm_token_text(const nm_tokenizer *tk, int32_t id, size_t *len) {
    if (id < 0 || id >= tk->n_vocab) return NULL;
    *len = tk->tok_len[id];
    return tk->tok_arena + tk->tok_off[id];
}

int nm_token_type(const nm_tokenizer *tk, int32_t id) {
    return id < 0 || id >= tk->n_vocab ? 0 : tk->tok_type[id];
}

const char *nm_token_piece(const nm_tokenizer *tk, int32_t id, int render_special, size_t *len) {
    if (id < 0 || id >= tk->n_vocab) return NULL;
    int t = tk->tok_type[id];
    if (!render_special && (t == NM_TOKEN_CONTROL || t == NM_TOKEN_UNKNOWN)) {
        *len = 0;
        return tk->piece_arena;
    }
    *len = tk->piece_len[id];
    return tk->piece_arena + tk->piece_off[id];
}

/* ------------------------------------------------------------------------ */
/* encoding                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct {
    uint32_t off, len;
    int32_t id; /* >= 0: a special token; -1: text */
} frag;

typedef struct {
    int32_t rank, left, right;
    uint32_t lsz, rsz;
} bigram;

/* Per-call scratch, reused across the pieces of one call. */
typedef struct {
    const nm_tokenizer *tk;
    pcre2_match_data *md;
    frag *fr, *fr2;
    size_t nfr, fr_cap, fr2_cap;
    char *map;                 /* byte-level form of the current piece */
    size_t map_cap;
    uint32_t *sym_start, *sym_n;
    int32_t *sym_prev, *sym_next;
    size_t sym_cap;
    bigram *heap;
    size_t nheap, heap_cap;
    ids_buf out;
    nm_err *err;
} work;

static int bg_less(const bigram *a, const bigram *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static int heap_push(work *w, bigram b) {
    if (grow((void **)&w->heap, &w->heap_cap, w->nheap + 1, sizeof *w->heap)) return -1;
    size_t i = w->nheap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!bg_less(&b, &w->heap[p])) break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = b;
    return 0;
}

static bigram heap_pop(work *w) {
    bigram top = w->heap[0], last = w->heap[--w->nheap];
    size_t i = 0, n = w->nheap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && bg_less(&w->heap[c + 1], &w->heap[c])) c++;
        if (!bg_less(&w->heap[c], &last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n) w->heap[i] = last;
    return top;
}

static int add_bigram(work *w, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return 0;
    int32_t rank = merge_rank(w->tk, w->map + w->sym_start[l], w->sym_n[l], w->map + w->sym_start[r], w->sym_n[r]);
    if (rank < 0) return 0;
    return heap_push(w, (bigram){rank, l, r, w->sym_n[l], w->sym_n[r]});
}

/* BPE of one pre-tokenized piece (raw bytes P[0..n)); ids appended to w->out. */
static int bpe_piece(work *w, const unsigned char *p, size_t n) {
    const nm_tokenizer *tk = w->tk;
    if (!n) return 0;
    if (grow((void **)&w->map, &w->map_cap, 2 * n, 1)) return -1;
    if (n > w->sym_cap) {
        size_t nc = w->sym_cap ? w->sym_cap : 64;
        while (nc < n) nc *= 2;
        uint32_t *a = realloc(w->sym_start, nc * sizeof *a);
        if (!a) return -1;
        w->sym_start = a;
        uint32_t *b = realloc(w->sym_n, nc * sizeof *b);
        if (!b) return -1;
        w->sym_n = b;
        int32_t *c = realloc(w->sym_prev, nc * sizeof *c);
        if (!c) return -1;
        w->sym_prev = c;
        int32_t *d = realloc(w->sym_next, nc * sizeof *d);
        if (!d) return -1;
        w->sym_next = d;
        w->sym_cap = nc;
    }
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        w->sym_start[i] = (uint32_t)m;
        w->sym_n[i] = tk->bchar_len[p[i]];
        memcpy(w->map + m, tk->bchar[p[i]], tk->bchar_len[p[i]]);
        m += tk->bchar_len[p[i]];
        w->sym_prev[i] = (int32_t)i - 1;
        w->sym_next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    if (tk->pre_set->ignore_merges) {
        int32_t id = nm_token_id(tk, w->map, m);
        if (id >= 0) return ids_push(&w->out, id);
    }
    w->nheap = 0;
    for (size_t i = 1; i < n; i++)
        if (add_bigram(w, (int32_t)i - 1, (int32_t)i)) return -1;
    while (w->nheap) {
        bigram b = heap_pop(w);
        /* stale: either side changed since it was queued (lengths only grow) */
        if (w->sym_n[b.left] != b.lsz || w->sym_n[b.right] != b.rsz || w->sym_next[b.left] != b.right) continue;
        w->sym_n[b.left] += w->sym_n[b.right];
        w->sym_n[b.right] = 0;
        int32_t nx = w->sym_next[b.right];
        w->sym_next[b.left] = nx;
        if (nx >= 0) w->sym_prev[nx] = b.left;
        if (add_bigram(w, w->sym_prev[b.left], b.left) || add_bigram(w, b.left, nx)) return -1;
    }
    for (int32_t i = 0; i >= 0; i = w->sym_next[i]) {
        int32_t id = nm_token_id(tk, w->map + w->sym_start[i], w->sym_n[i]);
        if (id >= 0) {
            if (ids_push(&w->out, id)) return -1;
            continue;
        }
        /* not in the vocabulary: one token per byte it covers */
        size_t end = w->sym_next[i] >= 0 ? (size_t)w->sym_next[i] : n;
        for (size_t j = (size_t)i; j < end; j++) {
            int32_t t = tk->byte_char_tok[p[j]] >= 0 ? tk->byte_char_tok[p[j]] : tk->byte_hex_tok[p[j]];
            if (t >= 0 && ids_push(&w->out, t)) return -1;
        }
    }
    return 0;
}

static int push_frag(frag **v, size_t *n, size_t *cap, frag f) {
    if (grow((void **)v, cap, *n + 1, sizeof **v)) return -1;
    (*v)[(*n)++] = f;
    return 0;
}

/* Splits every text fragment in w->fr by regex RE (matched and unmatched
 * parts both kept). */
static int regex_split(work *w, const char *text, pcre2_code *re) {
    size_t n2 = 0;
    for (size_t f = 0; f < w->nfr; f++) {
        frag fr = w->fr[f];
        PCRE2_SPTR subj = (PCRE2_SPTR)text + fr.off;
        size_t pos = 0, start = 0;
        while (start <= fr.len) {
            int rc = pcre2_match(re, subj, fr.len, start, PCRE2_NO_UTF_CHECK, w->md, NULL);
            if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
                rc = pcre2_match(re, subj, fr.len, start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, w->md, NULL);
            if (rc == PCRE2_ERROR_NOMATCH) break;
            if (rc < 0) {
                PCRE2_UCHAR msg[256];
                pcre2_get_error_message(rc, msg, sizeof msg);
                return nm_errf(w->err, "pre-tokenizer regex failed on a piece of %u bytes: %s", fr.len,
                               (const char *)msg);
            }
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(w->md);
            size_t ms = ov[0], me = ov[1];
            if (me == ms) { /* empty match: nothing to cut, step one character */
                if (ms >= fr.len) break;
                start = ms + u8_len_lead(subj[ms]);
                continue;
            }
            if (ms > pos && push_frag(&w->fr2, &n2, &w->fr2_cap, (frag){fr.off + (uint32_t)pos, (uint32_t)(ms - pos), -1}))
                return nm_errf(w->err, "out of memory");
            if (push_frag(&w->fr2, &n2, &w->fr2_cap, (frag){fr.off + (uint32_t)ms, (uint32_t)(me - ms), -1}))
                return nm_errf(w->err, "out of memory");
            pos = start = me;
        }
        if (pos < fr.len && push_frag(&w->fr2, &n2, &w->fr2_cap, (frag){fr.off + (uint32_t)pos, (uint32_t)(fr.len - pos), -1}))
            return nm_errf(w->err, "out of memory");
    }
    frag *t = w->fr;
    w->fr = w->fr2;
    w->fr2 = t;
    size_t tc = w->fr_cap;
    w->fr_cap = w->fr2_cap;
    w->fr2_cap = tc;
    w->nfr = n2;
    return 0;
}

/* Returns TEXT itself if it is valid UTF-8, else a malloc'd copy with every
 * byte that does not start a valid character replaced by U+FFFD (*owned set). */
static const char *sanitize(const char *text, size_t len, size_t *out_len, char **owned) {
    *owned = NULL;
    size_t i = 0, cl;
    while (i < len && u8_class((const unsigned char *)text + i, len - i, &cl) == U8_VALID) i += cl;
    if (i == len) return *out_len = len, text;
    char *d = malloc(3 * len + 1);
    if (!d) return NULL;
    memcpy(d, text, i);
    size_t k = i;
    while (i < len) {
        if (u8_class((const unsigned char *)text + i, len - i, &cl) == U8_VALID) {
            memcpy(d + k, text + i, cl);
            k += cl, i += cl;
        } else {
            memcpy(d + k, U8_REPL, 3);
            k += 3, i += 1;
        }
    }
    *owned = d;
    *out_len = k;
    return d;
}

static void work_free(work *w) {
    if (w->md) pcre2_match_data_free(w->md);
    free(w->fr);
    free(w->fr2);
    free(w->map);
    free(w->sym_start);
    free(w->sym_n);
    free(w->sym_prev);
    free(w->sym_next);
    free(w->heap);
}

/* The special tokens (indices into tk->spec, ascending = longest first) that
 * occur in TEXT and may be matched; *np their count. */
static int specials_present(const nm_tokenizer *tk, const char *text, size_t len, int parse_special,
                            int32_t **present, size_t *np) {
    *present = NULL;
    *np = 0;
    if (!tk->n_spec || !len) return 0;
    uint8_t *seen = NULL;
    const unsigned char *s = (const unsigned char *)text;
    size_t cnt = 0;
    for (size_t i = 0; i < len; i++) {
        int32_t node = 0;
        for (size_t j = i; j < len; j++) {
            int32_t c = tk->trie[node].first_child;
            while (c >= 0 && tk->trie[c].byte != s[j]) c = tk->trie[c].next_sibling;
            if (c < 0) break;
            node = c;
            int32_t k = tk->trie[node].term;
            if (k < 0) continue;
            int t = tk->tok_type[tk->spec[k]];
            if (!parse_special && t != NM_TOKEN_USER_DEFINED) continue;
            if (!seen && !(seen = calloc(tk->n_spec, 1))) return -1;
            if (!seen[k]) seen[k] = 1, cnt++;
        }
    }
    if (!cnt) return free(seen), 0;
    int32_t *v = malloc(cnt * sizeof *v);
    if (!v) return free(seen), -1;
    for (size_t k = 0, j = 0; k < tk->n_spec; k++)
        if (seen[k]) v[j++] = (int32_t)k;
    free(seen);
    *present = v;
    *np = cnt;
    return 0;
}

/* Cuts every text fragment of *parts at the occurrences of token SID's text
 * (leftmost first, not overlapping). */
static int split_special(const nm_tokenizer *tk, const char *t, int32_t sid, frag **parts, size_t *nparts,
                         size_t *parts_cap) {
    const char *st = tk->tok_arena + tk->tok_off[sid];
    size_t sl = tk->tok_len[sid];
    frag *out = NULL;
    size_t n2 = 0, cap2 = 0;
    for (size_t f = 0; f < *nparts; f++) {
        frag fr = (*parts)[f];
        size_t pos = 0;
        if (fr.id < 0) {
            const char *hit;
            while ((hit = memmem(t + fr.off + pos, fr.len - pos, st, sl))) {
                size_t at = (size_t)(hit - (t + fr.off));
                if ((at > pos && push_frag(&out, &n2, &cap2, (frag){fr.off + (uint32_t)pos, (uint32_t)(at - pos), -1})) ||
                    push_frag(&out, &n2, &cap2, (frag){fr.off + (uint32_t)at, (uint32_t)sl, sid}))
                    return free(out), -1;
                pos = at + sl;
            }
            if (pos == 0) { /* untouched */
                if (push_frag(&out, &n2, &cap2, fr)) return free(out), -1;
                continue;
            }
            if (pos < fr.len &&
                push_frag(&out, &n2, &cap2, (frag){fr.off + (uint32_t)pos, (uint32_t)(fr.len - pos), -1}))
                return free(out), -1;
        } else if (push_frag(&out, &n2, &cap2, fr)) {
            return free(out), -1;
        }
    }
    free(*parts);
    *parts = out;
    *nparts = n2;
    *parts_cap = cap2;
    return 0;
}

int nm_tokenize(const nm_tokenizer *tk, const char *text, size_t len, int add_special, int parse_special,
                int32_t **ids, size_t *n, nm_err *err) {
    *ids = NULL;
    *n = 0;
    work w = {0};
    w.tk = tk;
    w.err = err;
    char *owned = NULL;
    int32_t *present = NULL;
    frag *parts = NULL;
    size_t np = 0, tlen = 0, nparts = 0, parts_cap = 0;
    int rc = -1;
    const char *t = len ? sanitize(text, len, &tlen, &owned) : "";
    if (!t) goto oom;
    if (tlen > UINT32_MAX) {
        nm_errf(err, "tokenize: text of %zu bytes is too long (4 GiB at most)", tlen);
        goto done;
    }
    if (add_special && tk->add_bos && ids_push(&w.out, tk->bos)) goto oom;

    /* 1. special-token partition, longest token first (llama.cpp order) */
    if (tlen && push_frag(&parts, &nparts, &parts_cap, (frag){0, (uint32_t)tlen, -1})) goto oom;
    if (specials_present(tk, t, tlen, parse_special, &present, &np)) goto oom;
    for (size_t k = 0; k < np; k++)
        if (split_special(tk, t, tk->spec[present[k]], &parts, &nparts, &parts_cap)) goto oom;

    /* 2.-5. pre-tokenize and BPE every text fragment */
    uint32_t groups = 0;
    for (int r = 0; r < tk->n_re; r++) {
        uint32_t c = 0;
        pcre2_pattern_info(tk->re[r], PCRE2_INFO_CAPTURECOUNT, &c);
        if (c > groups) groups = c;
    }
    if (!(w.md = pcre2_match_data_create(groups + 1, NULL))) goto oom;
    for (size_t f = 0; f < nparts; f++) {
        if (parts[f].id >= 0) {
            if (ids_push(&w.out, parts[f].id)) goto oom;
            continue;
        }
        w.nfr = 0;
        if (push_frag(&w.fr, &w.nfr, &w.fr_cap, parts[f])) goto oom;
        for (int r = 0; r < tk->n_re; r++)
            if (regex_split(&w, t, tk->re[r])) goto done;
        for (size_t i = 0; i < w.nfr; i++)
            if (bpe_piece(&w, (const unsigned char *)t + w.fr[i].off, w.fr[i].len)) goto oom;
    }
    if (add_special && tk->add_eos && ids_push(&w.out, tk->eos)) goto oom;
    rc = 0;
    goto done;
oom:
    nm_errf(err, "tokenize: out of memory");
done:
    free(parts);
    free(present);
    free(owned);
    work_free(&w);
    if (rc == 0 && w.out.n) {
        *ids = w.out.v;
        *n = w.out.n;
    } else {
        free(w.out.v);
    }
    return rc;
}

/* ------------------------------------------------------------------------ */
/* decoding                                                                  */
/* ------------------------------------------------------------------------ */

int nm_detokenize(const nm_tokenizer *tk, const int32_t *ids, size_t n, int render_special, char **out,
                  size_t *len, nm_err *err) {
    *out = NULL;
    *len = 0;
    size_t total = 0, pl;
    for (size_t i = 0; i < n; i++) {
        if (!nm_token_piece(tk, ids[i], render_special, &pl))
            return nm_errf(err, "detokenize: token id %d at position %zu is out of range (vocabulary of %d)",
                           ids[i], i, tk->n_vocab);
        total += pl;
    }
    char *s = malloc(total + 1);
    if (!s) return nm_errf(err, "detokenize: out of memory");
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const char *p = nm_token_piece(tk, ids[i], render_special, &pl);
        memcpy(s + k, p, pl);
        k += pl;
    }
    s[k] = 0;
    *out = s;
    *len = k;
    return 0;
}

struct nm_detok_stream {
    const nm_tokenizer *tk;
    int render_special;
    unsigned char pend[4]; /* an incomplete character held back (at most 3 bytes) */
    size_t npend;
    char *out, *in;
    size_t out_cap, in_cap;
};

nm_detok_stream *nm_detok_stream_new(const nm_tokenizer *tk, int render_special) {
    nm_detok_stream *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->tk = tk;
    s->render_special = render_special;
    return s;
}

void nm_detok_stream_free(nm_detok_stream *s) {
    if (!s) return;
    free(s->out);
    free(s->in);
    free(s);
}

int nm_detok_stream_feed(nm_detok_stream *s, int32_t id, const char **text, size_t *len, nm_err *err) {
    size_t pl;
    const char *p = nm_token_piece(s->tk, id, s->render_special, &pl);
    *text = "";
    *len = 0;
    if (!p) return nm_errf(err, "detokenize: token id %d is out of range (vocabulary of %d)", id, s->tk->n_vocab);
    size_t total = s->npend + pl;
    /* worst case every byte becomes the 3 bytes of U+FFFD */
    if (grow((void **)&s->in, &s->in_cap, total + 1, 1) || grow((void **)&s->out, &s->out_cap, 3 * total + 1, 1))
        return nm_errf(err, "detokenize: out of memory");
    unsigned char *in = (unsigned char *)s->in;
    memcpy(in, s->pend, s->npend);
    memcpy(in + s->npend, p, pl);
    size_t i = 0, k = 0, cl;
    s->npend = 0;
    while (i < total) {
        int c = u8_class(in + i, total - i, &cl);
        if (c == U8_VALID) {
            memcpy(s->out + k, in + i, cl);
            k += cl;
        } else if (c == U8_INVALID) {
            memcpy(s->out + k, U8_REPL, 3);
            k += 3;
        } else { /* an incomplete character at the end: hold it back */
            memcpy(s->pend, in + i, cl);
            s->npend = cl;
        }
        i += cl;
    }
    s->out[k] = 0;
    *text = s->out;
    *len = k;
    return 0;
}

const char *nm_detok_stream_flush(nm_detok_stream *s, size_t *len) {
    *len = 0;
    if (!s->npend) return "";
    s->npend = 0;
    *len = 3;
    return "\xEF\xBF\xBD";
}
