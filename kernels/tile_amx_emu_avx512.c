/* tile_amx_emu_avx512.c - the AMX tile GEMM of tile_amx.c with its tile
 * unit emulated in plain C (tile_amx_impl.h under NM_AMX_EMULATE): the same
 * unpacking, scales and float steps, for tests on CPUs without AMX (tile.h:
 * nm_tile_gemm_many_amx_emu, nm_tile_amx_emulate). Compiled with the
 * AVX-512 + VNNI flags of the *_avx512 rule; call only where
 * nm_isa_best() reaches avx512vnni. Slow (one C multiply per byte pair):
 * never a production path. */
#define NM_AMX_EMULATE 1
#include "kernels/tile_amx_impl.h"

nm_tile_many_fn nm_tile_gemm_many_amx_emu(int type) { return amx_many_table_emu(type); }
