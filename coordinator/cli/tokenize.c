/* tokenize.c - `numoe tokenize` (text -> token ids) and `numoe detokenize`
 * (token ids -> text) with the tokenizer stored in a GGUF; a vocabulary-only
 * GGUF (no tensors, e.g. llama.cpp's ggml-vocab-*.gguf) is enough.
 * stdout carries only the result; the tokenizer summary goes to stderr. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/gguf.h"
#include "common/opt.h"
#include "coordinator/cli/commands.h"
#include "coordinator/text/tokenizer.h"

static int tokenize_usage(FILE *f) {
    fprintf(f,
            "usage: numoe tokenize --model M.gguf [options] (TEXT | --file F | --batch F)\n"
            "\n"
            "Prints the token ids of TEXT under the model's tokenizer (byte-level BPE; a\n"
            "vocabulary-only GGUF is enough). Default: one token per line, id and text;\n"
            "a summary of the tokenizer (pre-tokenizer used, BOS/EOS) goes to stderr.\n"
            "\n"
            "  --model M.gguf   the GGUF whose tokenizer to use (required)\n"
            "  --ids            print only the ids, on one line, comma-separated\n"
            "  --no-bos         do not add BOS (nor EOS) even where the vocabulary asks for it\n"
            "                   (tokenizer.ggml.add_bos_token / add_eos_token)\n"
            "  --special        text of special tokens such as <\xef\xbd\x9c" "User\xef\xbd\x9c> becomes that token;\n"
            "                   without it such text is tokenized as ordinary text (tokens of type\n"
            "                   USER_DEFINED, e.g. <think> in DeepSeek-V3, match either way, as in\n"
            "                   llama.cpp and HF tokenizers)\n"
            "  --file F         tokenize the bytes of file F ('-': stdin) instead of TEXT\n"
            "  --batch F        many texts at once: F ('-': stdin) holds one JSON string per line\n"
            "                   (\\udc80..\\udcff stand for raw bytes that are not UTF-8); prints one\n"
            "                   line of comma-separated ids per text, in order (empty for no tokens)\n"
            "  -q, --quiet      no tokenizer summary on stderr\n");
    return f == stdout ? 0 : 2;
}

static int detokenize_usage(FILE *f) {
    fprintf(f,
            "usage: numoe detokenize --model M.gguf [options] (IDS... | --batch F)\n"
            "\n"
            "Prints the text of token ids (comma- or space-separated, in one or more arguments)\n"
            "followed by a newline.\n"
            "\n"
            "  --model M.gguf   the GGUF whose tokenizer to use (required)\n"
            "  --no-special     control tokens (BOS, EOS, <\xef\xbd\x9c" "User\xef\xbd\x9c>, ...) give no text\n"
            "  --batch F        F ('-': stdin) holds one line of comma-separated ids per text; prints\n"
            "                   each text as one JSON string per line (bytes that are not UTF-8 as\n"
            "                   \\udc80..\\udcff, Python's surrogateescape)\n"
            "  -q, --quiet      no tokenizer summary on stderr\n");
    return f == stdout ? 0 : 2;
}

/* Whole file (or stdin for "-") into a malloc'd, NUL-terminated buffer (the
 * NUL not counted in *len). */
static int read_all(const char *path, char **out, size_t *len) {
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f) return -1;
    errno = 0;
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    if (!b) goto fail;
    for (;;) {
        if (n + 1 >= cap) {
            char *nb = realloc(b, cap *= 2);
            if (!nb) goto fail;
            b = nb;
        }
        size_t r = fread(b + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
    }
    if (ferror(f)) goto fail;
    if (f != stdin) fclose(f);
    b[n] = 0;
    *out = b;
    *len = n;
    return 0;
fail:
    free(b);
    if (f != stdin) fclose(f);
    if (!errno) errno = EIO;
    return -1;
}

static int load(const char *cmd, const char *model, int quiet, nm_tokenizer **tk) {
    nm_err err = {{0}};
    nm_gguf *g = NULL;
    if (nm_gguf_open(model, &g, &err)) {
        fprintf(stderr, "numoe %s: %s\n", cmd, err.msg);
        return -1;
    }
    int bad = nm_tokenizer_load(tk, g, &err);
    nm_gguf_close(g); /* the tokenizer keeps its own copy */
    if (bad) {
        fprintf(stderr, "numoe %s: %s\n", cmd, err.msg);
        return -1;
    }
    if (!quiet) {
        const nm_tokenizer *t = *tk;
        const char *pre = nm_tokenizer_pre(t), *used = nm_tokenizer_pre_used(t);
        fprintf(stderr, "numoe %s: %s: byte-level BPE, %d tokens, %zu merges, ", cmd, model,
                nm_tokenizer_n_vocab(t), nm_tokenizer_n_merges(t));
        if (!strcmp(pre, used))
            fprintf(stderr, "pre-tokenizer %s", used);
        else if (!*pre)
            fprintf(stderr, "no tokenizer.ggml.pre: using llama.cpp's default regexes");
        else if (!strcmp(used, "default"))
            fprintf(stderr, "pre-tokenizer '%s' is not known: using llama.cpp's default regexes", pre);
        else
            fprintf(stderr, "pre-tokenizer '%s': using the %s regexes", pre, used);
        fprintf(stderr, ", BOS %d (%s), EOS %d\n", nm_tokenizer_bos(t),
                nm_tokenizer_add_bos(t) ? "added" : "not added", nm_tokenizer_eos(t));
        if (nm_tokenizer_n_missing_bytes(t))
            fprintf(stderr, "numoe %s: warning: %d byte values have no token; text with them loses them\n", cmd,
                    nm_tokenizer_n_missing_bytes(t));
    }
    return 0;
}

/* Token text for the one-per-line listing: printable UTF-8 as is, the rest
 * escaped (an incomplete UTF-8 sequence shows as \xNN bytes). */
static void print_piece(const char *p, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)p[i];
        if (c == '\n') fputs("\\n", stdout), i++;
        else if (c == '\t') fputs("\\t", stdout), i++;
        else if (c == '\r') fputs("\\r", stdout), i++;
        else if (c == '\\' || c == '\'') printf("\\%c", c), i++;
        else if (c < 0x20 || c == 0x7f) printf("\\x%02x", c), i++;
        else if (c < 0x80) putchar(c), i++;
        else {
            size_t k = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0, j = 1;
            while (k && j < k && i + j < n && ((unsigned char)p[i + j] & 0xC0) == 0x80) j++;
            if (k && j == k) fwrite(p + i, 1, k, stdout), i += k;
            else printf("\\x%02x", c), i++;
        }
    }
}

/* ---- JSON strings for the batch modes ----
 * A text travels as one JSON string per line. Raw bytes that are not UTF-8
 * are written as \udc80..\udcff and read back as those bytes (Python's
 * "surrogateescape"); any other unpaired surrogate reads as U+FFFD. */

static size_t put_utf8(char *d, unsigned cp) {
    if (cp < 0x80) return d[0] = (char)cp, 1;
    if (cp < 0x800) return d[0] = (char)(0xC0 | cp >> 6), d[1] = (char)(0x80 | (cp & 0x3F)), 2;
    if (cp < 0x10000) {
        d[0] = (char)(0xE0 | cp >> 12), d[1] = (char)(0x80 | ((cp >> 6) & 0x3F)), d[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    d[0] = (char)(0xF0 | cp >> 18), d[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    d[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), d[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static int hex4(const char *s, unsigned *v) {
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        unsigned d = c >= '0' && c <= '9' ? (unsigned)(c - '0') : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
                   : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10) : 16u;
        if (d > 15) return -1;
        *v = *v * 16 + d;
    }
    return 0;
}

/* Parses the JSON string that is the whole of LINE[0..n) (blanks around it
 * allowed) into DST (at least n bytes); *len its length. NULL on success, else
 * what is wrong. */
static const char *json_parse_line(const char *line, size_t n, char *dst, size_t *len) {
    size_t i = 0, k = 0;
    while (i < n && (line[i] == ' ' || line[i] == '\t' || line[i] == '\r')) i++;
    if (i == n || line[i] != '"') return "expected a JSON string";
    for (i++;; i++) {
        if (i >= n) return "unterminated JSON string";
        unsigned char c = (unsigned char)line[i];
        if (c == '"') break;
        if (c < 0x20) return "control character inside a JSON string";
        if (c != '\\') {
            dst[k++] = (char)c;
            continue;
        }
        if (++i >= n) return "unterminated escape";
        unsigned cp;
        switch (line[i]) {
        case '"': dst[k++] = '"'; break;
        case '\\': dst[k++] = '\\'; break;
        case '/': dst[k++] = '/'; break;
        case 'b': dst[k++] = '\b'; break;
        case 'f': dst[k++] = '\f'; break;
        case 'n': dst[k++] = '\n'; break;
        case 'r': dst[k++] = '\r'; break;
        case 't': dst[k++] = '\t'; break;
        case 'u':
            if (i + 4 >= n || hex4(line + i + 1, &cp)) return "bad \\u escape";
            i += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                if (i + 6 < n && line[i + 1] == '\\' && line[i + 2] == 'u' && !hex4(line + i + 3, &lo) &&
                    lo >= 0xDC00 && lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    i += 6;
                } else {
                    cp = 0xFFFD;
                }
            } else if (cp >= 0xDC80 && cp <= 0xDCFF) { /* surrogateescape'd raw byte */
                dst[k++] = (char)(cp - 0xDC00);
                break;
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                cp = 0xFFFD;
            }
            /* \uXXXX takes 6 input bytes, its UTF-8 at most 3 (4 for a pair of 12) */
            k += put_utf8(dst + k, cp);
            break;
        default: return "bad escape in a JSON string";
        }
    }
    for (i++; i < n; i++)
        if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r') return "text after the JSON string";
    *len = k;
    return NULL;
}

static void json_write(FILE *f, const char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t cl = 0;
        if (c >= 0x80) { /* a valid UTF-8 sequence goes out as is */
            size_t need = c >= 0xF0 && c <= 0xF4 ? 4 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xC2 && c <= 0xDF ? 2 : 0;
            if (need && i + need <= n) {
                unsigned char c1 = (unsigned char)s[i + 1];
                int ok = (c1 & 0xC0) == 0x80;
                if (c == 0xE0) ok = ok && c1 >= 0xA0;
                if (c == 0xED) ok = ok && c1 <= 0x9F;
                if (c == 0xF0) ok = ok && c1 >= 0x90;
                if (c == 0xF4) ok = ok && c1 <= 0x8F;
                for (size_t j = 2; j < need; j++) ok = ok && ((unsigned char)s[i + j] & 0xC0) == 0x80;
                if (ok) cl = need;
            }
            if (cl) fwrite(s + i, 1, cl, f), i += cl;
            else fprintf(f, "\\udc%02x", c), i++;
            continue;
        }
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c == '\r') fputs("\\r", f);
        else if (c < 0x20 || c == 0x7f) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
        i++;
    }
    fputs("\"\n", f);
}

static void print_ids_line(const int32_t *ids, size_t n) {
    for (size_t i = 0; i < n; i++) printf(i ? ",%d" : "%d", ids[i]);
    putchar('\n');
}

int nm_cmd_tokenize(int argc, char **argv) {
    const char *model = NULL, *file = NULL, *batch = NULL, *text = NULL;
    int ids_only = 0, no_bos = 0, special = 0, quiet = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return tokenize_usage(stdout);
        if (!strcmp(a, "--ids")) ids_only = 1;
        else if (!strcmp(a, "--no-bos")) no_bos = 1;
        else if (!strcmp(a, "--special")) special = 1;
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) quiet = 1;
        else if (!strcmp(a, "--model") || !strcmp(a, "-m") || !strcmp(a, "--file") || !strcmp(a, "-f") ||
                 !strcmp(a, "--batch")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "numoe tokenize: %s needs a value\n", a);
                return 2;
            }
            const char *v = argv[++i];
            if (!strcmp(a, "--model") || !strcmp(a, "-m")) model = v;
            else if (!strcmp(a, "--batch")) batch = v;
            else file = v;
        } else if (!strcmp(a, "--")) {
            if (i + 1 < argc && !text && i + 2 == argc) text = argv[++i];
            else {
                fprintf(stderr, "numoe tokenize: '--' must be followed by exactly one TEXT\n");
                return 2;
            }
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "numoe tokenize: unknown option '%s'\n", a);
            return tokenize_usage(stderr);
        } else if (!text) {
            text = a;
        } else {
            fprintf(stderr, "numoe tokenize: one TEXT only (quote it, or use --file)\n");
            return 2;
        }
    }
    if (!model) {
        fprintf(stderr, "numoe tokenize: --model M.gguf is required\n");
        return tokenize_usage(stderr);
    }
    if (!!text + !!file + !!batch != 1) {
        fprintf(stderr, "numoe tokenize: give exactly one of TEXT, --file F, --batch F\n");
        return tokenize_usage(stderr);
    }

    char *buf = NULL;
    size_t len = 0;
    if (file || batch) {
        const char *path = file ? file : batch;
        if (read_all(path, &buf, &len)) {
            fprintf(stderr, "numoe tokenize: cannot read '%s': %s\n", path, strerror(errno));
            return 1;
        }
    }
    nm_tokenizer *tk = NULL;
    if (load("tokenize", model, quiet, &tk)) {
        free(buf);
        return 1;
    }

    int rc = 0;
    nm_err err = {{0}};
    int add = !no_bos;
    if (batch) {
        size_t pos = 0, line = 0;
        char *text_buf = malloc(len + 1);
        if (!text_buf) rc = 1;
        while (pos < len && !rc) {
            const char *nl = memchr(buf + pos, '\n', len - pos);
            size_t end = nl ? (size_t)(nl - buf) : len, tl;
            line++;
            const char *why = json_parse_line(buf + pos, end - pos, text_buf, &tl);
            if (why) {
                fprintf(stderr, "numoe tokenize: %s line %zu: %s\n", batch, line, why);
                rc = 1;
                break;
            }
            int32_t *ids;
            size_t n;
            if (nm_tokenize(tk, text_buf, tl, add, special, &ids, &n, &err)) {
                fprintf(stderr, "numoe tokenize: %s line %zu: %s\n", batch, line, err.msg);
                rc = 1;
                break;
            }
            print_ids_line(ids, n);
            free(ids);
            pos = end + 1;
        }
        free(text_buf);
    } else {
        const char *src = file ? buf : text;
        size_t n_src = file ? len : strlen(text);
        int32_t *ids;
        size_t n;
        if (nm_tokenize(tk, src, n_src, add, special, &ids, &n, &err)) {
            fprintf(stderr, "numoe tokenize: %s\n", err.msg);
            rc = 1;
        } else if (ids_only) {
            print_ids_line(ids, n);
        } else {
            for (size_t i = 0; i < n; i++) {
                size_t pl;
                const char *p = nm_token_piece(tk, ids[i], 1, &pl);
                printf("%6d -> '", ids[i]);
                print_piece(p, pl);
                fputs("'\n", stdout);
            }
        }
        free(ids);
    }
    if (fflush(stdout)) rc = 1;
    nm_tokenizer_free(tk);
    free(buf);
    return rc;
}

/* Appends the ids in S (separated by commas and/or blanks). -1 on a bad id. */
static int parse_ids(const char *s, int32_t **v, size_t *n, size_t *cap, int32_t n_vocab) {
    while (*s) {
        if (*s == ',' || *s == ' ' || *s == '\t' || *s == '\r') {
            s++;
            continue;
        }
        long long x;
        if (nm_parse_int_at(&s, 0, (long long)n_vocab - 1, &x) || (*s && *s != ',' && *s != ' ' && *s != '\t' &&
                                                                   *s != '\r'))
            return -1;
        if (*n == *cap) {
            size_t nc = *cap ? *cap * 2 : 64;
            int32_t *nv = realloc(*v, nc * sizeof *nv);
            if (!nv) return -1;
            *v = nv;
            *cap = nc;
        }
        (*v)[(*n)++] = (int32_t)x;
    }
    return 0;
}

int nm_cmd_detokenize(int argc, char **argv) {
    const char *model = NULL, *batch = NULL;
    int special = 1, quiet = 0, n_args = 0;
    const char **id_args = calloc((size_t)argc + 1, sizeof *id_args);
    if (!id_args) return 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return free(id_args), detokenize_usage(stdout);
        if (!strcmp(a, "--no-special")) special = 0;
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) quiet = 1;
        else if (!strcmp(a, "--model") || !strcmp(a, "-m") || !strcmp(a, "--batch")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "numoe detokenize: %s needs a value\n", a);
                return free(id_args), 2;
            }
            if (!strcmp(a, "--batch")) batch = argv[++i];
            else model = argv[++i];
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "numoe detokenize: unknown option '%s'\n", a);
            return free(id_args), detokenize_usage(stderr);
        } else {
            id_args[n_args++] = a;
        }
    }
    if (!model) {
        fprintf(stderr, "numoe detokenize: --model M.gguf is required\n");
        return free(id_args), detokenize_usage(stderr);
    }
    if (!!n_args == !!batch) {
        fprintf(stderr, "numoe detokenize: give token IDS or --batch F (not both)\n");
        return free(id_args), detokenize_usage(stderr);
    }
    char *buf = NULL;
    size_t len = 0;
    if (batch && read_all(batch, &buf, &len)) {
        fprintf(stderr, "numoe detokenize: cannot read '%s': %s\n", batch, strerror(errno));
        return free(id_args), 1;
    }
    nm_tokenizer *tk = NULL;
    if (load("detokenize", model, quiet, &tk)) {
        free(buf);
        return free(id_args), 1;
    }

    int rc = 0;
    int32_t *ids = NULL;
    size_t n = 0, cap = 0;
    nm_err err = {{0}};
    int32_t nv = nm_tokenizer_n_vocab(tk);
    if (!batch) {
        for (int i = 0; i < n_args && !rc; i++)
            if (parse_ids(id_args[i], &ids, &n, &cap, nv)) {
                fprintf(stderr, "numoe detokenize: bad token ids '%s' (ids are 0..%d)\n", id_args[i], nv - 1);
                rc = 2;
            }
        char *s;
        size_t sl;
        if (!rc) {
            if (nm_detokenize(tk, ids, n, special, &s, &sl, &err)) {
                fprintf(stderr, "numoe detokenize: %s\n", err.msg);
                rc = 1;
            } else {
                fwrite(s, 1, sl, stdout);
                putchar('\n');
                free(s);
            }
        }
    } else {
        size_t pos = 0, line = 0;
        while (pos < len && !rc) {
            char *nl = memchr(buf + pos, '\n', len - pos);
            size_t end = nl ? (size_t)(nl - buf) : len;
            buf[end] = 0; /* buf[len] is the terminating NUL */
            line++;
            n = 0;
            char *s;
            size_t sl;
            if (parse_ids(buf + pos, &ids, &n, &cap, nv)) {
                fprintf(stderr, "numoe detokenize: %s line %zu: bad token ids (ids are 0..%d)\n", batch, line,
                        nv - 1);
                rc = 1;
            } else if (nm_detokenize(tk, ids, n, special, &s, &sl, &err)) {
                fprintf(stderr, "numoe detokenize: %s line %zu: %s\n", batch, line, err.msg);
                rc = 1;
            } else {
                json_write(stdout, s, sl);
                free(s);
            }
            pos = end + 1;
        }
    }
    if (fflush(stdout)) rc = 1;
    free(ids);
    free(buf);
    free(id_args);
    nm_tokenizer_free(tk);
    return rc;
}
