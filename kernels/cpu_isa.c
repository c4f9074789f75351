/* cpu_isa.c - which SIMD level the running CPU (and OS) can execute, and the
 * dot product chosen for it.
 *
 * This file is compiled without ISA flags: it must run on any x86-64 to
 * decide whether the AVX2 / AVX-512 files may be entered at all. A CPU bit
 * alone is not enough: the OS must also save the wider register state on
 * context switches, which it advertises in XCR0 (read with xgetbv once
 * CPUID says OSXSAVE is on). Without that, the first ymm/zmm instruction
 * faults even though CPUID lists the feature.
 *
 * AMX (quant.h: nm_isa_amx) needs one step more: Linux (5.16+) enables the
 * 8 KiB of tile data in XCR0 but arms it as extended feature disable (XFD)
 * until the process asks for it with arch_prctl(ARCH_REQ_XCOMP_PERM,
 * XFEATURE_XTILEDATA); a tile instruction before that raises SIGILL. The
 * permission is process-wide (Documentation/arch/x86/xstate.rst), so it is
 * asked once here, when nm_isa_best is first computed, before any kernel
 * thread could reach a tile. */
#include "kernels/quant.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "kernels/dot_simd.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* XCR0 bits: 1 SSE, 2 AVX (upper ymm), 5 opmask, 6 upper zmm0-15, 7 zmm16-31;
 * 17 XTILECFG, 18 XTILEDATA (the AMX tile configuration and the 8 tiles). */
#define XCR0_AVX_STATE 0x06u
#define XCR0_AVX512_STATE 0xE6u
#define XCR0_AMX_STATE (3u << 17)
/* <asm/prctl.h>'s ARCH_REQ_XCOMP_PERM and the xstate component number of
 * the tile data, spelled out: older headers lack them */
#define NM_ARCH_REQ_XCOMP_PERM 0x1023
#define NM_XFEATURE_XTILEDATA 18

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

/* The CPU and OS half of AMX (the process permission is asked in
 * init_best): NULL if present, else why not. Called after detect_hw found
 * the avx512vnni level, so OSXSAVE is known to be on. */
static const char *detect_amx(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1))
        return "the CPU lacks AMX-TILE / AMX-INT8 (cpuid 7.0 EDX bits 24, 25)";
    if ((read_xcr0() & XCR0_AMX_STATE) != XCR0_AMX_STATE)
        return "the OS does not enable the tile state (XCR0 bits 17, 18: XTILECFG, XTILEDATA; Linux 5.16+)";
    return NULL;
}

/* Asks Linux for the tile data; NULL on success, else why not (buf). */
static const char *request_amx(char *buf, size_t len) {
#if defined(__linux__)
    if (syscall(SYS_arch_prctl, NM_ARCH_REQ_XCOMP_PERM, NM_XFEATURE_XTILEDATA) == 0) return NULL;
    snprintf(buf, len, "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed: %s", strerror(errno));
    return buf;
#else
    snprintf(buf, len, "no way to ask this OS for the tile state (Linux only)");
    return buf;
#endif
}
#else
static nm_isa detect_hw(void) { return NM_ISA_SCALAR; }
static const char *detect_amx(void) { return "not an x86-64 CPU"; }
static const char *request_amx(char *buf, size_t len) {
    snprintf(buf, len, "not an x86-64 CPU");
    return buf;
}
#endif

static const char *const isa_names[NM_ISA_COUNT] = {"scalar", "avx2", "avx512", "avx512vnni"};

static nm_isa hw_level, best_level;
static pthread_once_t hw_once = PTHREAD_ONCE_INIT, best_once = PTHREAD_ONCE_INIT;
/* AMX: hw_amx_why NULL where CPU and OS have it; amx_on once the process
 * may use it (init_best), amx_why otherwise */
static const char *hw_amx_why, *amx_why;
static int amx_on;
static char amx_why_buf[160];

static void init_hw(void) {
    hw_level = detect_hw();
    hw_amx_why = hw_level >= NM_ISA_AVX512_VNNI ? detect_amx() : "the CPU does not reach avx512vnni, which the AMX kernels use too";
}

/* The levels are cumulative (each needs everything below it), so "supported"
 * is a comparison with the highest level found. */
static nm_isa hw_max(void) {
    pthread_once(&hw_once, init_hw);
    return hw_level;
}

/* NUMOE_ISA: a level caps the dots there and turns AMX off (AMX is above
 * every level); "amx" is the best level plus AMX, as no value is. A value
 * the CPU cannot honour, or none known, is reported and the best used. */
static void init_best(void) {
    const nm_isa hw = hw_max();
    best_level = hw;
    int want_amx = 1;
    const char *env = getenv("NUMOE_ISA");
    if (env && *env) {
        int known = 0;
        for (int i = 0; i < NM_ISA_COUNT && !known; i++) {
            if (strcasecmp(env, isa_names[i])) continue;
            known = 1;
            want_amx = 0;
            if ((nm_isa)i <= hw) {
                best_level = (nm_isa)i;
            } else {
                fprintf(stderr, "numoe: warning: NUMOE_ISA=%s: this CPU does not support %s; using %s\n", env,
                        isa_names[i], isa_names[hw]);
            }
        }
        if (!known && !strcasecmp(env, "amx")) {
            known = 1;
            if (hw_amx_why)
                fprintf(stderr, "numoe: warning: NUMOE_ISA=%s: AMX not available: %s; using %s\n", env, hw_amx_why,
                        isa_names[hw]);
        }
        if (!known)
            fprintf(stderr,
                    "numoe: warning: NUMOE_ISA=%s: unknown level (expected scalar, avx2, avx512, avx512vnni or amx); "
                    "using %s%s\n",
                    env, isa_names[hw], hw_amx_why ? "" : " and amx");
    }
    if (!want_amx) {
        snprintf(amx_why_buf, sizeof amx_why_buf, "NUMOE_ISA=%s turns it off", env);
        amx_why = amx_why_buf;
    } else if (hw_amx_why) {
        amx_why = hw_amx_why;
    } else {
        amx_why = request_amx(amx_why_buf, sizeof amx_why_buf);
        amx_on = amx_why == NULL;
    }
}

const char *nm_isa_env_error(void) {
    static char msg[200];
    const char *env = getenv("NUMOE_ISA");
    if (!env || !*env || !strcasecmp(env, "amx")) return NULL;
    for (int i = 0; i < NM_ISA_COUNT; i++)
        if (!strcasecmp(env, isa_names[i])) return NULL;
    snprintf(msg, sizeof msg, "NUMOE_ISA=%.60s: unknown level; use scalar, avx2, avx512, avx512vnni or amx, or unset it",
             env);
    return msg;
}

int nm_isa_amx(void) {
    pthread_once(&best_once, init_best);
    return amx_on;
}

const char *nm_isa_amx_why_not(void) {
    pthread_once(&best_once, init_best);
    return amx_why;
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
