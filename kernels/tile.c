/* tile.c - the portable half of tile.h: sizes, the plain C packer, the
 * activation aux, the scalar reference of the tile numbers, and the
 * dispatch to the VNNI kernels (tile_avx512.c). */
#include "kernels/tile.h"

#include <math.h>
#include <string.h>

#include "kernels/fp16.h"
#include "kernels/quant.h"
#include "kernels/quant_unpack.h"

enum {
    Q4K_Q = 64 * 64,         /* 64 groups of 4 quants x 16 rows */
    Q4K_SC = Q4K_Q,          /* int32 [8][16] */
    Q4K_MP = Q4K_SC + 8 * 64, /* int32 [4][16] */
    Q4K_D = Q4K_MP + 4 * 64, /* float [16] */
    Q4K_DMIN = Q4K_D + 64,   /* float [16] */
    Q4K_BLOCK = Q4K_DMIN + 64,
    Q50_Q = 8 * 64,
    Q50_D = Q50_Q,
    Q50_BLOCK = Q50_D + 64,
};

int nm_tile_usable(int type) {
    if (type != NM_TYPE_Q4_K && type != NM_TYPE_Q5_0) return 0;
    return nm_isa_best() >= NM_ISA_AVX512_VNNI && nm_tile_pack_vnni(type) != NULL;
}

size_t nm_tile_size(int type, int64_t n) {
    if (type == NM_TYPE_Q4_K) return (size_t)(n / NM_QK_K) * Q4K_BLOCK;
    if (type == NM_TYPE_Q5_0) return (size_t)(n / NM_QK5_0) * Q50_BLOCK;
    return 0;
}

size_t nm_tile_aux_size(int type, int64_t n) {
    if (type == NM_TYPE_Q4_K) return (size_t)(n / NM_QK_K) * 4 * sizeof(int32_t);
    if (type == NM_TYPE_Q5_0) return (size_t)(n / NM_QK5_0) * 2 * sizeof(int32_t);
    return 0;
}

/* quant k of row r in a block's group area: group k / 4, row r, byte k % 4 */
static inline size_t qpos(int k, int r) { return (size_t)(k / 4) * 64 + (size_t)r * 4 + (size_t)(k % 4); }

void nm_tile_pack_ref(int type, int64_t n, const void *rows, size_t row_bytes, int nrows, void *tile) {
    uint8_t *T = tile;
    memset(T, 0, nm_tile_size(type, n));
    if (type == NM_TYPE_Q4_K) {
        for (int64_t b = 0; b < n / NM_QK_K; b++) {
            uint8_t *B = T + (size_t)b * Q4K_BLOCK;
            for (int r = 0; r < nrows; r++) {
                const block_q4_K *blk = (const block_q4_K *)((const uint8_t *)rows + (size_t)r * row_bytes) + b;
                int8_t q[NM_QK_K], sc[8], m[8];
                nm_unpack_q4_K(blk, q, sc, m);
                for (int k = 0; k < NM_QK_K; k++) B[qpos(k, r)] = (uint8_t)q[k];
                int32_t *S = (int32_t *)(B + Q4K_SC), *MP = (int32_t *)(B + Q4K_MP);
                for (int j = 0; j < 8; j++) S[j * 16 + r] = sc[j];
                for (int i = 0; i < 4; i++) MP[i * 16 + r] = (int32_t)((uint32_t)(uint8_t)m[2 * i] | (uint32_t)(uint8_t)m[2 * i + 1] << 16);
                ((float *)(B + Q4K_D))[r] = nm_fp16_to_fp32(blk->d);
                ((float *)(B + Q4K_DMIN))[r] = nm_fp16_to_fp32(blk->dmin);
            }
        }
    } else if (type == NM_TYPE_Q5_0) {
        for (int64_t b = 0; b < n / NM_QK5_0; b++) {
            uint8_t *B = T + (size_t)b * Q50_BLOCK;
            for (int r = 0; r < nrows; r++) {
                const block_q5_0 *blk = (const block_q5_0 *)((const uint8_t *)rows + (size_t)r * row_bytes) + b;
                int8_t q[NM_QK5_0];
                nm_unpack_5bit32(blk->qs, blk->qh, 0, q);
                for (int k = 0; k < NM_QK5_0; k++) B[qpos(k, r)] = (uint8_t)q[k];
                ((float *)(B + Q50_D))[r] = nm_fp16_to_fp32(blk->d);
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

void nm_tile_gemm(int type, int64_t n, const void *tile, const void *const *x, const void *const *aux, int nx,
                  float *out) {
    nm_tile_gemm_vnni(type)(n, tile, x, aux, nx, out);
}

void nm_tile_gemv(int type, int64_t n, const void *rows, size_t row_bytes, int nrows, const void *x, const void *aux,
                  float *out) {
    nm_tile_gemv_vnni(type)(n, rows, row_bytes, nrows, x, aux, out);
}
