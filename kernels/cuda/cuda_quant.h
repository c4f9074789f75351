/* cuda_quant.h - GPU dequantisation and GEMV over ggml-layout weight rows.
 *
 * Plain C API (usable from C and C++) over the CUDA kernels in
 * kernels/cuda/dequant.cu and kernels/cuda/gemv.cu. The weight buffers hold
 * tensors exactly as they sit in a GGUF file (ggml block layouts, see
 * kernels/quant.h), already copied to device memory; rows run along GGUF
 * ne[0] and follow each other without padding (row stride =
 * nm_row_size(type, cols)).
 *
 * Errors: every call returns NM_CUDA_OK (0) or a negative NM_CUDA_E* code and
 * never exits or prints. nm_cuda_strerror() names a code;
 * nm_cuda_last_error() gives the detailed message of the calling thread's
 * last failure (argument that was wrong, CUDA's own error string, ...).
 * Kernels run asynchronously on the given stream: a failure inside a kernel
 * shows up at the next synchronising CUDA call, not as this API's return
 * value (launch-configuration errors are caught at launch).
 *
 * Streams are passed as void * (a cudaStream_t; NULL = the legacy default
 * stream) so that C callers need no CUDA headers.
 *
 * Numerics:
 *  - nm_cuda_dequantize is bit-exact with the CPU reference
 *    nm_dequantize_row (and ggml's dequantize_row_*): the same float
 *    operations in the same order, each rounded on its own (the kernels use
 *    __fmul_rn / __fadd_rn, which the compiler never fuses into FMA, so the
 *    result does not depend on -fmad). fp16 scales and F16 data convert
 *    exactly, NaN payloads included.
 *  - nm_cuda_gemv accumulates in fp32 in a different order from any CPU path
 *    (per-sub-block partial sums with the block scales factored out), so it
 *    agrees with a double-precision dot over the dequantised row only to
 *    rounding: tests/cuda/test_cuda_quant.cu checks
 *    |y - y_ref| <= 1e-5 * sum|w_i x_i| + 1e-6 * max|w| * sum|x_i|.
 */
#ifndef NUMOE_KERNELS_CUDA_QUANT_H
#define NUMOE_KERNELS_CUDA_QUANT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    NM_CUDA_OK = 0,
    NM_CUDA_EINVAL = -1,   /* bad argument: NULL pointer, negative size, n or
                              cols not a multiple of the block size, ... */
    NM_CUDA_ETYPE = -2,    /* type id not supported by this operation */
    NM_CUDA_EALIGN = -3,   /* device pointer not aligned as required */
    NM_CUDA_ENODEV = -4,   /* no usable CUDA device / no kernel image for it */
    NM_CUDA_ERUNTIME = -5  /* CUDA runtime reported an error */
};

/* Static name of a return code ("invalid argument", ...). */
const char *nm_cuda_strerror(int code);

/* Detailed message of the calling thread's most recent failing call of this
 * API ("" if none yet). Valid until the thread's next failing call. */
const char *nm_cuda_last_error(void);

/* Number of CUDA devices this library can run on (> 0), or 0 when there is
 * none (no driver, no device, or only devices without a kernel image in this
 * build: the library is compiled for sm_90). msg (may be NULL) receives a
 * one-line description: the current device's name, compute capability and
 * memory, or why none is usable. Never fails otherwise. */
int nm_cuda_available(char *msg, size_t n);

/* 1 if the operation supports the type id, else 0. Both support:
 * F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K. */
int nm_cuda_supports_dequantize(int type);
int nm_cuda_supports_gemv(int type);

/* d_dst[0..n) = the n elements stored at d_src (type's layout), as float.
 * n must be a multiple of the type's block size (32 or 256 for quants).
 * Alignment: d_src to 2 bytes (4 for F32), d_dst to 4 bytes. n may exceed
 * 2^31. */
int nm_cuda_dequantize(int type, const void *d_src, float *d_dst, int64_t n,
                       void *stream);

/* As nm_cuda_dequantize, the outputs rounded to bf16 (nearest even) and
 * stored as n 16-bit values at d_dst: bit-identical to rounding
 * nm_cuda_dequantize's floats (the prefill GEMMs' tensor-core operands).
 * d_dst 2-byte aligned. */
int nm_cuda_dequantize_bf16(int type, const void *d_src, void *d_dst, int64_t n, void *stream);

/* d_dst[t * cols + c] = bf16(d_x[t * ldx + c]) for t < n, c < cols
 * (nearest even): activations for the bf16 GEMMs. ldx >= cols. */
int nm_cuda_rows_to_bf16(const float *d_x, int64_t ldx, int64_t n, int64_t cols, void *d_dst, void *stream);

/* y = W x: d_y[r] = sum_c W[r][c] * d_x[c] for r < rows, W stored row-major
 * in the type's block layout (rows * nm_row_size(type, cols) bytes at d_w).
 * cols must be a multiple of the block size. Alignment: d_w to 2 bytes (4
 * for F32), d_x to 16 bytes, d_y to 4 bytes (cudaMalloc'd buffers are
 * 256-aligned). d_y must not overlap d_w or d_x. x stays fp32 (it is not
 * quantised to Q8 as ggml / the CPU dot do); fp32 accumulation. Uses no
 * scratch memory and no library state: every type has a direct kernel (one
 * CTA per row, up to 4 warps splitting the row), so concurrent calls on
 * different streams are safe. rows and cols < 2^31 blocks. */
int nm_cuda_gemv(int type, const void *d_w, int64_t rows, int64_t cols,
                 const float *d_x, float *d_y, void *stream);

/* Many products with matrices of one stack, as routed experts need: for
 * each p < n_pairs with d_mat[p] >= 0,
 *   d_y + p * ldy  =  W_{d_mat[p]} (d_x + (p / x_div) * ldx),
 * W_s being the rows x cols matrix at d_w + s * mat_bytes (the type's
 * layout, as nm_cuda_gemv). Products with d_mat[p] < 0 are skipped (their
 * y rows are not written). d_mat lives in device memory, so a CUDA graph
 * can replay the launch for whatever the router chose. x_div = k lets the
 * k pairs of a token share its row of x. Numerics per product are
 * nm_cuda_gemv's. Alignment: d_w and mat_bytes to 2 bytes (4 for F32), d_x
 * to 16 and ldx to 4 floats, d_y and d_mat to 4 bytes. n_pairs <= 65535,
 * ldy >= rows. */
int nm_cuda_gemv_pairs(int type, const void *d_w, size_t mat_bytes, int64_t rows, int64_t cols,
                       const int32_t *d_mat, int64_t n_pairs, const float *d_x, int64_t ldx, int x_div,
                       float *d_y, int64_t ldy, void *stream);

/* ---- integer GEMV: x quantised to 8 bits (kernels/cuda/gemv_q8.cu) ---------
 * Decode's fast path for quantised weights: x is quantised once per row of
 * activations and every GEMV reading it uses integer dot products (ggml's
 * MMVQ scheme; numoe's CPU dots quantise x the same way). A q8 row of cols
 * elements (cols a multiple of 32) is nm_cuda_q8_row_bytes(cols) bytes:
 * [cols int8 q][cols/32 x float (d, s)], d = max|x| / 127 over the 32
 * elements, q = x / d rounded to nearest even, s = d * sum q. Rows of a
 * multi-row buffer follow each other at that stride.
 *
 * Numerics: the integer sums are exact; y agrees with a double dot of the
 * dequantised W and the dequantised q8 x to fp32 rounding (bound as
 * nm_cuda_gemv's), and a row's y is bit-identical whatever n or the pairs
 * form. Against fp32 x it differs by x's quantisation (|x - q d| <= d / 2). */

/* Bytes of one q8 activation row (0 for cols <= 0). */
size_t nm_cuda_q8_row_bytes(int64_t cols);

/* 1 for Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K; the other types take
 * nm_cuda_gemv. */
int nm_cuda_supports_gemv_q8(int type);

/* The n rows x + t * ldx (t < n, cols floats each) into n q8 rows at d_xq.
 * Alignment: d_x and d_xq 16 bytes, ldx a multiple of 4; ldx >= cols. */
int nm_cuda_quantize_q8(const float *d_x, int64_t ldx, int64_t n, int64_t cols, void *d_xq, void *stream);

/* d_y + t * ldy = W xq_t for t < n (1 <= n <= 8: W is read once for all n;
 * ldy >= rows when n > 1), W as in nm_cuda_gemv, xq the n q8 rows at d_xq.
 * Alignment: d_w and d_xq 16 bytes (cudaMalloc'd buffers and 256-aligned
 * tensor slabs are), d_y 4. Uses no scratch; concurrent calls are safe. */
int nm_cuda_gemv_q8(int type, const void *d_w, int64_t rows, int64_t cols, const void *d_xq, int64_t n, float *d_y,
                    int64_t ldy, void *stream);

/* nm_cuda_gemv_pairs with q8 x: for p < n_pairs with d_mat[p] >= 0,
 * d_y + p * ldy = W_{d_mat[p]} xq_{p / x_div}, W_s at d_w + s * mat_bytes
 * (mat_bytes a multiple of 16). */
int nm_cuda_gemv_q8_pairs(int type, const void *d_w, size_t mat_bytes, int64_t rows, int64_t cols,
                          const int32_t *d_mat, int64_t n_pairs, const void *d_xq, int x_div, float *d_y, int64_t ldy,
                          void *stream);

/* Programmatic dependent launch (kernels/cuda/pdl.cuh): whether the decode
 * kernels that support it (the integer GEMV here, the GPU forward pass's
 * own) are launched so that each may start while the one before finishes.
 * Process-wide, off until set; it changes when kernels start, never what
 * they compute. Takes effect on Hopper (sm_90) and later. */
void nm_cuda_set_pdl(int on);
int nm_cuda_pdl(void);

#ifdef __cplusplus
}
#endif

#endif
