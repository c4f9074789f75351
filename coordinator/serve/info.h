/* info.h - what `numoe serve` tells clients about its one model: the
 * name it is served under and the figures /api/tags shows (parameter count,
 * dominant weight type, file size, modification time). Pure functions of the
 * path and the GGUF, kept apart from the HTTP code so they are unit-tested
 * (tests/unit/test_serve_info.c). */
#ifndef NUMOE_COORDINATOR_SERVE_INFO_H
#define NUMOE_COORDINATOR_SERVE_INFO_H

#include <stddef.h>
#include <stdint.h>

#include "common/gguf.h"

/* The default served model name of PATH: the file name without its
 * directory, without a trailing ".gguf" (any case) and without a split-model
 * suffix "-NNNNN-of-MMMMM" (digits, as llama.cpp's gguf-split writes them), so
 * "/m/DeepSeek-R1-Q4_K_M-00001-of-00009.gguf" is served as
 * "DeepSeek-R1-Q4_K_M". Falls back to the bare file name when stripping would
 * leave nothing, and to "model" for an empty path. Writes at most cap bytes
 * including the NUL (truncating); returns out. */
char *nm_serve_model_name(const char *path, char *out, size_t cap);

/* A parameter count the way Ollama shows it: "671B", "15.7B", "236M", "3.2K",
 * "12" (three significant digits at most, trailing ".0" dropped). Returns out. */
char *nm_serve_params_str(uint64_t n, char *out, size_t cap);

typedef struct {
    uint64_t n_params;    /* elements of all tensors */
    int64_t size_bytes;   /* all split parts together */
    char quant[32];       /* the ggml type holding most tensor bytes, e.g. "Q4_K" */
    char family[64];      /* general.architecture, e.g. "deepseek2" ("" when absent) */
} nm_serve_model_facts;

void nm_serve_model_facts_of(const nm_gguf *g, nm_serve_model_facts *out);

#endif
