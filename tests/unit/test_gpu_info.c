/* test_gpu_info.c - the part of `numoe topology`'s GPU lines that needs no
 * GPU: a sysfs current_link_speed read as a PCIe generation (the GPU lines
 * themselves are checked on the GPU box, tests/test_gpu_engine.py). */
#include "coordinator/engine/gpu/gpu_engine.h"
#include "tests/unit/check.h"

static void test_pcie_generations(void) {
    static const struct {
        const char *speed;
        int gen;
    } cases[] = {{"2.5 GT/s PCIe", 1}, {"5.0 GT/s PCIe", 2}, {"8.0 GT/s PCIe", 3},  {"16.0 GT/s PCIe", 4},
                 {"32.0 GT/s PCIe", 5}, {"64.0 GT/s PCIe", 6}, {"32.0 GT/s", 5},      {"Unknown", 0},
                 {"", 0},               {"32.0 GB/s PCIe", 0}, {"12.0 GT/s PCIe", 0}, {"GT/s", 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int got = nm_pcie_gen_of(cases[i].speed);
        CHECK(got == cases[i].gen, "'%s': generation %d, want %d", cases[i].speed, got, cases[i].gen);
    }
    CHECK(nm_pcie_gen_of(NULL) == 0, "NULL");
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    RUN(test_pcie_generations);
    return check_summary();
}
