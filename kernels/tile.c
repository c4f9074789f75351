/* tile.c - the portable half of tile.h: sizes, the plain C packer, the
 * activation aux, the scalar reference of the tile numbers, and the
 * dispatch to the VNNI kernels (tile_avx512.c) and the AMX ones
 * (tile_amx.c, or their emulation, tile_amx_emu_avx512.c). */
#include "kernels/tile.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "kernels/fp16.h"
#include "kernels/quant.h"
#include "kernels/quant_unpack.h"
#include "kernels/tile_layout.h"

_Static_assert(Q4K_BLOCK == 2368 && Q50_PAIR == 704, "tile.h states these sizes");
_Static_assert(Q4K_BLOCK % 64 == 0 && Q50_PAIR % 64 == 0, "tiles of a matrix lie back to back, 64-byte aligned");

int nm_tile_usable(int type) {
    if (type != NM_TYPE_Q4_K && type != NM_TYPE_Q5_0) return 0;
    return nm_isa_best() >= NM_ISA_AVX512_VNNI && nm_tile_pack_vnni(type) != NULL;
}

size_t nm_tile_size(int type, int64_t n) {
    if (type == NM_TYPE_Q4_K) return (size_t)(n / NM_QK_K) * Q4K_BLOCK;
    if (type == NM_TYPE_Q5_0) return (size_t)((n / NM_QK5_0 + 1) / 2) * Q50_PAIR;
    return 0;
}

size_t nm_tile_aux_size(int type, int64_t n) {
    if (type == NM_TYPE_Q4_K) return (size_t)(n / NM_QK_K) * 4 * sizeof(int32_t);
    if (type == NM_TYPE_Q5_0) return (size_t)(n / NM_QK5_0) * 2 * sizeof(int32_t);
    return 0;
}

/* The plain C packer: tile.h's layout written byte by byte from its
 * definition (the SIMD packer must produce these bytes). */
void nm_tile_pack_ref(int type, int64_t n, const void *rows, size_t row_bytes, int nrows, void *tile) {
    uint8_t *T = tile;
    memset(T, 0, nm_tile_size(type, n));
    if (type == NM_TYPE_Q4_K) {
        for (int64_t b = 0; b < n / NM_QK_K; b++) {
            uint8_t *B = T + (size_t)b * Q4K_BLOCK;
            for (int r = 0; r < nrows; r++) {
                const block_q4_K *blk = (const block_q4_K *)((const uint8_t *)rows + (size_t)r * row_bytes) + b;
                for (int c = 0; c < 4; c++)
                    for (int d = 0; d < 8; d++)
                        for (int i = 0; i < 4; i++)
                            B[Q4K_Q + (size_t)(8 * c + d) * 64 + (size_t)r * 4 + (size_t)i] = blk->qs[32 * c + 4 * d + i];
                int8_t sc[8], m[8];
                nm_k4_scale_min(blk->scales, sc, m);
                for (int j = 0; j < 8; j++) B[Q4K_SC + 16 * j + r] = (uint8_t)sc[j];
                for (int i = 0; i < 4; i++) {
                    B[Q4K_M + 32 * i + 2 * r] = (uint8_t)m[2 * i];
                    B[Q4K_M + 32 * i + 2 * r + 1] = (uint8_t)m[2 * i + 1];
                }
                memcpy(B + Q4K_D + 2 * r, &blk->d, 2);
                memcpy(B + Q4K_DMIN + 2 * r, &blk->dmin, 2);
            }
        }
    } else if (type == NM_TYPE_Q5_0) {
        for (int64_t b = 0; b < n / NM_QK5_0; b++) {
            uint8_t *P = T + (size_t)(b / 2) * Q50_PAIR;
            const int h = (int)(b % 2);
            for (int r = 0; r < nrows; r++) {
                const block_q5_0 *blk = (const block_q5_0 *)((const uint8_t *)rows + (size_t)r * row_bytes) + b;
                for (int d = 0; d < 4; d++)
                    for (int i = 0; i < 4; i++)
                        P[Q50_Q + (size_t)(4 * h + d) * 64 + (size_t)r * 4 + (size_t)i] = blk->qs[4 * d + i];
                const uint32_t qh = nm_qh32(blk->qh);
                for (int g = 0; g < 8; g++) {
                    uint64_t mask;
                    memcpy(&mask, P + Q50_H + 8 * (8 * h + g), 8);
                    mask |= (uint64_t)((qh >> (4 * g)) & 0xF) << (4 * r);
                    memcpy(P + Q50_H + 8 * (8 * h + g), &mask, 8);
                }
                memcpy(P + Q50_D + 32 * h + 2 * r, &blk->d, 2);
            }
        }
    }
}

void nm_tile_aux(int type, int64_t n, const void *x, void *aux) {
    if (type == NM_TYPE_Q4_K) {
        const block_q8_K *a = x;
        int32_t *o = aux;
        for (int64_t b = 0; b < n / NM_QK_K; b++)
            for (int i = 0; i < 4; i++) {
                int32_t b0 = a[b].bsums[4 * i] + a[b].bsums[4 * i + 1];
                int32_t b1 = a[b].bsums[4 * i + 2] + a[b].bsums[4 * i + 3];
                o[4 * b + i] = (int32_t)((uint32_t)(uint16_t)(int16_t)b0 | (uint32_t)(uint16_t)(int16_t)b1 << 16);
            }
    } else if (type == NM_TYPE_Q5_0) {
        const block_q8_0 *a = x;
        int32_t *o = aux;
        for (int64_t b = 0; b < n / NM_QK8_0; b++) {
            int32_t s = 0;
            for (int l = 0; l < NM_QK8_0; l++) s += a[b].qs[l];
            o[2 * b] = -16 * s;
            float d = nm_fp16_to_fp32(a[b].d);
            memcpy(&o[2 * b + 1], &d, sizeof d);
        }
    }
}

float nm_tile_dot_ref(int type, int64_t n, const void *w, const void *x) {
    float acc = 0;
    if (type == NM_TYPE_Q4_K) {
        const block_q4_K *bw = w;
        const block_q8_K *a = x;
        for (int64_t b = 0; b < n / NM_QK_K; b++) {
            int8_t q[NM_QK_K], sc[8], m[8];
            nm_unpack_q4_K(&bw[b], q, sc, m);
            int32_t I = 0, M = 0;
            for (int j = 0; j < 8; j++) {
                int32_t s = 0;
                for (int l = 32 * j; l < 32 * j + 32; l++) s += q[l] * a[b].qs[l];
                I += sc[j] * s;
                M += m[j] * (a[b].bsums[2 * j] + a[b].bsums[2 * j + 1]);
            }
            float t = (float)I * nm_fp16_to_fp32(bw[b].d);
            t = fmaf(-(float)M, nm_fp16_to_fp32(bw[b].dmin), t);
            acc = fmaf(t, a[b].d, acc);
        }
    } else if (type == NM_TYPE_Q5_0) {
        const block_q5_0 *bw = w;
        const block_q8_0 *a = x;
        for (int64_t b = 0; b < n / NM_QK5_0; b++) {
            int8_t q[NM_QK5_0];
            nm_unpack_q5_0(&bw[b], q);
            int32_t s = 0;
            for (int l = 0; l < NM_QK5_0; l++) s += q[l] * a[b].qs[l];
            float d = nm_fp16_to_fp32(bw[b].d) * nm_fp16_to_fp32(a[b].d);
            acc = fmaf((float)s, d, acc);
        }
    }
    return acc;
}

void nm_tile_pack(int type, int64_t n, const void *rows, size_t row_bytes, int nrows, void *tile) {
    nm_tile_pack_vnni(type)(n, rows, row_bytes, nrows, tile);
}

size_t nm_tile_matrix_size(int type, int64_t n, int64_t nrows) {
    return (size_t)((nrows + NM_TILE_ROWS - 1) / NM_TILE_ROWS) * nm_tile_size(type, n);
}

void nm_tile_pack_matrix(int type, int64_t n, const void *rows, size_t row_bytes, int64_t nrows, void *dst) {
    const nm_tile_pack_fn pack = nm_tile_pack_vnni(type);
    const size_t ts = nm_tile_size(type, n);
    for (int64_t r = 0; r < nrows; r += NM_TILE_ROWS) {
        const int nr = nrows - r < NM_TILE_ROWS ? (int)(nrows - r) : NM_TILE_ROWS;
        pack(n, (const uint8_t *)rows + (size_t)r * row_bytes, row_bytes, nr, (uint8_t *)dst + (size_t)(r / NM_TILE_ROWS) * ts);
    }
}

void nm_tile_gemm(int type, int64_t n, const void *tile, const void *const *x, const void *const *aux, int nx,
                  float *out) {
    nm_tile_gemm_vnni(type)(n, tile, x, aux, nx, out);
}

void nm_tile_gemv(int type, int64_t n, const void *rows, size_t row_bytes, int nrows, const void *x, const void *aux,
                  float *out) {
    nm_tile_gemv_vnni(type)(n, rows, row_bytes, nrows, x, aux, out);
}

/* ---- many activation rows ---------------------------------------------- */

static atomic_int amx_emulate;
static atomic_long amx_emulated;

void nm_tile_amx_emulate(int on) { atomic_store(&amx_emulate, on != 0); }

long nm_tile_amx_emulated_calls(void) { return atomic_load(&amx_emulated); }

int nm_tile_amx_usable(int type) {
    if (type != NM_TYPE_Q4_K && type != NM_TYPE_Q5_0) return 0;
    if (!nm_tile_usable(type)) return 0; /* VNNI, which the AMX kernels use too */
    if (atomic_load_explicit(&amx_emulate, memory_order_relaxed)) return nm_tile_gemm_many_amx_emu(type) != NULL;
    return nm_isa_amx() && nm_tile_gemm_many_amx(type) != NULL;
}

void nm_tile_gemm_many(int type, int64_t n, const void *tile, const void *x, size_t x_stride, const void *aux,
                       size_t aux_stride, int nx, float *out, size_t ldo) {
    if (nm_tile_amx_usable(type)) {
        if (atomic_load_explicit(&amx_emulate, memory_order_relaxed)) {
            atomic_fetch_add_explicit(&amx_emulated, 1, memory_order_relaxed);
            nm_tile_gemm_many_amx_emu(type)(n, tile, x, x_stride, aux, aux_stride, nx, out, ldo);
        } else {
            nm_tile_gemm_many_amx(type)(n, tile, x, x_stride, aux, aux_stride, nx, out, ldo);
        }
        return;
    }
    /* VNNI: groups of NM_TILE_NX, out written 16 apart, then placed ldo apart */
    const nm_tile_gemm_fn gemm = nm_tile_gemm_vnni(type);
    for (int j0 = 0; j0 < nx; j0 += NM_TILE_NX) {
        const int g = nx - j0 < NM_TILE_NX ? nx - j0 : NM_TILE_NX;
        const void *xs[NM_TILE_NX], *as[NM_TILE_NX];
        for (int k = 0; k < g; k++) {
            xs[k] = (const uint8_t *)x + (size_t)(j0 + k) * x_stride;
            as[k] = (const uint8_t *)aux + (size_t)(j0 + k) * aux_stride;
        }
        float o[NM_TILE_NX * NM_TILE_ROWS];
        gemm(n, tile, xs, as, g, o);
        for (int k = 0; k < g; k++) memcpy(out + (size_t)(j0 + k) * ldo, o + k * NM_TILE_ROWS, sizeof(float) * NM_TILE_ROWS);
    }
}
