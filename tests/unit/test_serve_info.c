/* test_serve_info.c - the name `numoe serve` serves a model under (directory,
 * ".gguf" and split suffix stripped) and the parameter-count strings of
 * /api/tags; the figures of a fixture GGUF. */
#include <stdint.h>

#include "common/gguf.h"
#include "coordinator/serve/info.h"
#include "tests/unit/check.h"

static void name_is(const char *path, const char *want) {
    char got[256];
    nm_serve_model_name(path, got, sizeof got);
    CHECK(!strcmp(got, want), "name of '%s': got '%s', want '%s'", path ? path : "(null)", got, want);
}

static void test_model_name(void) {
    name_is("model.gguf", "model");
    name_is("/models/deepseek/DeepSeek-V3-Q4_K_M.gguf", "DeepSeek-V3-Q4_K_M");
    name_is("DeepSeek-R1-Q4_K_M-00001-of-00009.gguf", "DeepSeek-R1-Q4_K_M");
    name_is("/x/y/DeepSeek-R1-UD-IQ1_S-00003-of-00003.gguf", "DeepSeek-R1-UD-IQ1_S");
    name_is("a-1-of-2.gguf", "a");
    name_is("M.GGUF", "M");
    name_is("relative/dir/m.gguf", "m");
    name_is("no-extension", "no-extension");
    name_is("weights.bin", "weights.bin");
    name_is("two.gguf.gguf", "two.gguf");
    /* not a split suffix: stays */
    name_is("model-00001-of.gguf", "model-00001-of");
    name_is("model-of-00002.gguf", "model-of-00002");
    name_is("model00001-of-00002.gguf", "model00001-of-00002");
    name_is("model-00001-of-00002-extra.gguf", "model-00001-of-00002-extra");
    /* suffix only inside the extension-less name */
    name_is("model-00001-of-00002", "model");
    /* stripping everything would leave nothing: keep the file name */
    name_is(".gguf", ".gguf");
    name_is("-00001-of-00002.gguf", "-00001-of-00002.gguf");
    name_is("dir/", "dir");
    name_is("/", "model");
    name_is("", "model");
    name_is(NULL, "model");
    /* truncation keeps a NUL */
    char small[4];
    nm_serve_model_name("abcdefgh.gguf", small, sizeof small);
    CHECK(!strcmp(small, "abc"), "truncated: '%s'", small);
}

static void params_is(uint64_t n, const char *want) {
    char got[32];
    nm_serve_params_str(n, got, sizeof got);
    CHECK(!strcmp(got, want), "params %llu: got '%s', want '%s'", (unsigned long long)n, got, want);
}

static void test_params(void) {
    params_is(0, "0");
    params_is(999, "999");
    params_is(1000, "1K");
    params_is(3210, "3.21K");
    params_is(15706484224ull, "15.7B");
    params_is(671026419200ull, "671B");
    params_is(236000000, "236M");
    params_is(1500000000000ull, "1.5T");
    params_is(999600, "1M"); /* rounds up into the next unit, not "1000K" */
}

static void test_fixture_facts(void) {
    nm_gguf *g;
    nm_err e;
    const char *path = "tests/fixtures/models/deepseek-v3-tiny-Q8_0-mla.gguf";
    if (nm_gguf_open(path, &g, &e)) {
        CHECK(0, "open %s: %s", path, e.msg);
        return;
    }
    nm_serve_model_facts f;
    nm_serve_model_facts_of(g, &f);
    CHECK(f.size_bytes == 1097024 && f.size_bytes == (int64_t)g->files[0].size, "size %lld",
          (long long)f.size_bytes); /* tests/fixtures/models/README.md */
    CHECK(!strcmp(f.family, "deepseek2"), "family '%s'", f.family);
    CHECK(!strcmp(f.quant, "Q8_0"), "quant '%s'", f.quant);
    /* The V3 fixture's shapes (tests/fixtures/models/README.md): hidden 256, vocab 324,
     * 4 heads (nope 32, rope 16, v 32), q_lora 96, kv_lora 64, one dense layer (ff 64) and
     * two MoE layers (8 experts + 1 shared of ff 32). Per layer, attention:
     *   norms 256 + 96 + 64 + 256, q_a 256*96, q_b 96*4*48, kv_a 256*(64+16),
     *   k_b 4*32*64, v_b 4*64*32, output 4*32*256                      = 113 312
     * dense FFN 3*256*64 = 49 152; MoE FFN: gate 256*8 + bias 8 + experts 3*8*256*32
     *   + shared 3*256*32 = 223 240. Whole model: embeddings and output 2*324*256,
     * output norm 256, layers 113 312*3 + 49 152 + 2*223 240: 1 001 712 (gguf-py's
     * GGUFReader sums the same over its 52 tensors). */
    CHECK(f.n_params == 1001712ull, "params %llu, want 1001712", (unsigned long long)f.n_params);
    char params[32];
    CHECK(!strcmp(nm_serve_params_str(f.n_params, params, sizeof params), "1M"), "params string '%s'", params);
    nm_gguf_close(g);
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    RUN(test_model_name);
    RUN(test_params);
    RUN(test_fixture_facts);
    return check_summary();
}
