/* cpu_isa.c - which SIMD level the running CPU (and OS) can execute, and the
 * dot product chosen for it.
 *
 * This file is compiled without ISA flags: it must run on any x86-64 to
 * decide whether the AVX2 / AVX-512 files may be entered at all. A CPU bit
 * alone is not enough: the OS must also save the wider register state on
 * context switches, which it advertises in XCR0 (read with xgetbv once
 * CPUID says OSXSAVE is on). Without that, the first ymm/zmm instruction
 * faults even though CPUID lists the feature. */
#include "kernels/quant.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

#include "kernels/dot_simd.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

/* XCR0 bits: 1 SSE, 2 AVX (upper ymm), 5 opmask, 6 upper zmm0-15, 7 zmm16-31. */
#define XCR0_AVX_STATE 0x06u
#define XCR0_AVX512_STATE 0xE6u

static uint64_t read_xcr0(void) {
    uint32_t lo, hi;
    /* the mnemonic, not _xgetbv(): the intrinsic needs -mxsave */
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (uint64_t)hi << 32 | lo;
}

static nm_isa detect_hw(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return NM_ISA_SCALAR;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return NM_ISA_SCALAR;
    const uint64_t xcr0 = read_xcr0();
    if ((xcr0 & XCR0_AVX_STATE) != XCR0_AVX_STATE) return NM_ISA_SCALAR;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return NM_ISA_SCALAR;
    const int avx2 = (b >> 5) & 1;
    if (!avx2 || !fma || !f16c) return NM_ISA_SCALAR;
    const int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    if (!(f && dq && bw && vl) || (xcr0 & XCR0_AVX512_STATE) != XCR0_AVX512_STATE) return NM_ISA_AVX2;
    const int vnni = (c >> 11) & 1;
    return vnni ? NM_ISA_AVX512_VNNI : NM_ISA_AVX512;
}
#else
static nm_isa detect_hw(void) { return NM_ISA_SCALAR; }
#endif

static const char *const isa_names[NM_ISA_COUNT] = {"scalar", "avx2", "avx512", "avx512vnni"};

static nm_isa hw_level, best_level;
static pthread_once_t hw_once = PTHREAD_ONCE_INIT, best_once = PTHREAD_ONCE_INIT;

static void init_hw(void) { hw_level = detect_hw(); }

/* The levels are cumulative (each needs everything below it), so "supported"
 * is a comparison with the highest level found. */
static nm_isa hw_max(void) {
    pthread_once(&hw_once, init_hw);
    return hw_level;
}

static void init_best(void) {
    const nm_isa hw = hw_max();
    best_level = hw;
    const char *env = getenv("NUMOE_ISA");
    if (!env || !*env) return;
    for (int i = 0; i < NM_ISA_COUNT; i++) {
        if (strcasecmp(env, isa_names[i])) continue;
        if ((nm_isa)i <= hw) {
            best_level = (nm_isa)i;
        } else {
            fprintf(stderr, "numoe: warning: NUMOE_ISA=%s: this CPU does not support %s; using %s\n", env,
                    isa_names[i], isa_names[hw]);
        }
        return;
    }
    fprintf(stderr,
            "numoe: warning: NUMOE_ISA=%s: unknown level (expected scalar, avx2, avx512 or avx512vnni); using %s\n",
            env, isa_names[hw]);
}

const char *nm_isa_name(nm_isa isa) {
    return ((int)isa >= 0 && (int)isa < NM_ISA_COUNT) ? isa_names[isa] : "unknown";
}

int nm_isa_supported(nm_isa isa) { return (int)isa >= NM_ISA_SCALAR && (int)isa <= (int)hw_max(); }

nm_isa nm_isa_best(void) {
    pthread_once(&best_once, init_best);
    return best_level;
}

nm_vec_dot_fn nm_vec_dot_for(int type, nm_isa isa) {
    /* Levels above what the CPU runs are skipped, so a caller asking for
     * avx512 on an AVX2 machine gets the AVX2 path, never a SIGILL. */
    if ((int)isa > (int)hw_max()) isa = hw_max();
    nm_vec_dot_fn fn = NULL;
    switch (isa) {
    case NM_ISA_AVX512_VNNI:
        if ((fn = nm_dot_table_avx512vnni(type))) return fn;
        /* fall through */
    case NM_ISA_AVX512:
        if ((fn = nm_dot_table_avx512(type))) return fn;
        /* fall through */
    case NM_ISA_AVX2:
        if ((fn = nm_dot_table_avx2(type))) return fn;
        /* fall through */
    default:
        return nm_vec_dot_ref(type);
    }
}

nm_vec_dot_fn nm_vec_dot(int type) { return nm_vec_dot_for(type, nm_isa_best()); }

/* Same walk as nm_vec_dot_for: every level's multi table has an entry for
 * exactly the types its single table has, so both stop at the same level
 * and a multi result equals the single dot's, row by row. */
nm_vec_dot_multi_fn nm_vec_dot_multi_for(int type, nm_isa isa) {
    if ((int)isa > (int)hw_max()) isa = hw_max();
    nm_vec_dot_multi_fn fn = NULL;
    switch (isa) {
    case NM_ISA_AVX512_VNNI:
        if ((fn = nm_dot_multi_table_avx512vnni(type))) return fn;
        /* fall through */
    case NM_ISA_AVX512:
        if ((fn = nm_dot_multi_table_avx512(type))) return fn;
        /* fall through */
    case NM_ISA_AVX2:
        if ((fn = nm_dot_multi_table_avx2(type))) return fn;
        /* fall through */
    default:
        return nm_vec_dot_multi_ref(type);
    }
}

nm_vec_dot_multi_fn nm_vec_dot_multi(int type) { return nm_vec_dot_multi_for(type, nm_isa_best()); }
