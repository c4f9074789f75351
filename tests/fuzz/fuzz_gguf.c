/* fuzz_gguf.c - libFuzzer target for the GGUF reader.
 *
 *   make fuzz && build/fuzz/fuzz_gguf -max_total_time=60 tests/fixtures/gguf/corpus
 *
 * Contract under test: any byte string either parses into a table whose every
 * string, array and tensor lies inside the buffer, or fails with a message;
 * no crash, hang, leak or out-of-bounds read (ASan + UBSan are on). Touching
 * the first and last byte of every accepted object makes ASan check that. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common/gguf.h"

static volatile uint8_t sink;

static void touch(const void *p, uint64_t n) {
    if (!n) return;
    sink ^= ((const uint8_t *)p)[0];
    sink ^= ((const uint8_t *)p)[n - 1];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    nm_gguf *g;
    nm_err err;
    if (nm_gguf_parse_buffer(data, size, "fuzz", &g, &err)) {
        touch(err.msg, 1);
        return 0;
    }
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const nm_gguf_kv *kv = &g->kv[i];
        if (nm_gguf_find(g, kv->key) != kv) __builtin_trap();
        if (kv->type == NM_GGUF_STRING) touch(kv->str.ptr, kv->str.len);
        if (kv->type == NM_GGUF_ARRAY) {
            for (uint64_t j = 0; kv->arr_str && j < kv->arr_n; j++) touch(kv->arr_str[j].ptr, kv->arr_str[j].len);
            if (kv->arr_data && kv->arr_n) {
                (void)nm_gguf_arr_i64(kv, 0);
                (void)nm_gguf_arr_f64(kv, kv->arr_n - 1);
            }
        }
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const nm_gguf_tensor *t = &g->tensors[i];
        if (nm_gguf_tensor_find(g, t->name) != t) __builtin_trap();
        touch(t->data, t->nbytes);
    }
    uint32_t u;
    float f;
    nm_str s;
    (void)nm_gguf_get_u32(g, "general.alignment", &u, &err);
    (void)nm_gguf_get_f32(g, "deepseek2.rope.freq_base", &f, &err);
    (void)nm_gguf_get_str(g, "general.architecture", &s, &err);
    nm_gguf_close(g);
    return 0;
}
