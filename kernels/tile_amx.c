/* tile_amx.c - the AMX-INT8 half of tile.h: nm_tile_gemm_many on the tile
 * unit (the body, shared with its plain-C emulation, is tile_amx_impl.h)
 * and the register-only TDPBSUD loop that measures the unit's peak.
 * Compiled with the AVX-512 + VNNI and AMX-TILE + AMX-INT8 flags (the
 * Makefile's *_amx rule); enter it only where nm_isa_amx() (quant.h): a
 * tile instruction elsewhere is SIGILL. */
#include "kernels/tile_amx_impl.h"

nm_tile_many_fn nm_tile_gemm_many_amx(int type) { return amx_many_table(type); }

/* n x 4 TDPBSUD of full tiles (16 x 64 signed bytes by 16 x 64 unsigned,
 * 16 x 16 x 64 = 16384 multiply-adds each) into four independent
 * accumulators, so the unit is never waiting on a result: no load, no
 * store, the tile unit's throughput alone. LDTILECFG zeroes the operands;
 * the unit's speed does not depend on their values. */
void nm_tile_amx_spin(int64_t n) {
    _Alignas(64) amx_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
    AMX_CONFIG(&cfg);
    for (int64_t i = 0; i < n; i++) {
        AMX_DPBSUD(0, 4, 6);
        AMX_DPBSUD(1, 4, 7);
        AMX_DPBSUD(2, 5, 6);
        AMX_DPBSUD(3, 5, 7);
    }
    AMX_RELEASE();
}
