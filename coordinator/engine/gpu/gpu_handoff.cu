/* gpu_handoff.cu - the GPU waiting for the host's routed experts inside a
 * queued decode segment (gpu_kernels.cuh wait_flag).
 *
 * Why: a decode step hands every MoE layer to the CPU. Without this, the
 * host launches segment j+1's CUDA graph only once the experts of layer j
 * are back, so every layer pays the graph launch (the CPU's share of
 * cudaGraphLaunch, then the GPU fetching the graph) on the serial path.
 * With it, the host launches segment j+1 while the experts compute; the
 * segment's first node is this one-thread kernel, polling a word of mapped
 * host memory until the host writes 1 (after the routed sum is in h_moe),
 * then it writes 0 back, ready for the next layer, and the segment goes on
 * at once. The host writes the flag only after it saw the previous
 * segment's hand-off event, which comes after the previous reset (stream
 * order; a kernel's writes are visible to the host at its end), so a 1 is
 * never lost or seen twice. The sum is read by the next kernel, after this
 * one has seen the flag, with plain loads: that assumes the GPU does not
 * keep mapped host memory in L2 from one kernel to the next (the previous
 * layer's add_norm read the same buffer). test_cuda_forward's bit-for-bit
 * check against launching after the host would show a stale read; if it
 * does, gpu_norm.cu's load of b becomes __ldcv. */
#include "coordinator/engine/gpu/gpu_kernels.cuh"

namespace numoe_gpu {
namespace {

__global__ void k_wait_flag(volatile uint32_t *flag) {
    while (*flag == 0) __nanosleep(256);
    *flag = 0;
    __threadfence_system();
}

} /* namespace */

cudaError_t wait_flag(cudaStream_t s, uint32_t *flag) {
    k_wait_flag<<<1, 1, 0, s>>>(flag);
    return cudaGetLastError();
}

} /* namespace numoe_gpu */
