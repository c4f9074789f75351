/* pdl.cuh - programmatic dependent launch (Hopper, sm_90): a kernel may
 * start while the kernel before it on the stream is still finishing.
 *
 * Why: a decode step is a chain of ~15 small kernels per layer, each a few
 * microseconds, and each waits for the one before to drain, be flushed and
 * retire before its own CTAs are even placed (docs/GPU.md, the per-kernel
 * table in docs/BENCHMARKS.md). Launched with the programmatic-serialisation
 * attribute, a kernel's CTAs are placed as soon as every CTA of the one
 * before has called pdl_trigger() (or exited), and run up to pdl_wait(),
 * which returns once that kernel has completed and its writes are visible
 * (CUDA C++ Programming Guide, "Programmatic Dependent Launch and
 * Synchronization"; PTX ISA, griddepcontrol). So the launch gap and
 * whatever a kernel does before pdl_wait() - loading weights, which no
 * kernel of the pass writes - overlap the kernel before. Captured into a CUDA
 * graph the attribute becomes a programmatic edge, so replays keep it.
 *
 * The contract every kernel launched by launch() below keeps:
 *   - before pdl_wait() it reads only memory that no earlier work of the
 *     stream writes (weights uploaded at load), and writes nothing;
 *   - every thread that reads or writes anything else calls pdl_wait()
 *     first (a CTA that returns before it touches anything need not).
 * pdl_wait() is transitive that way: a kernel completes only after its own
 * wait, so waiting for the kernel before also waits for everything earlier.
 * Launched without the attribute (nm_cuda_set_pdl(0), the default, or an
 * older GPU) pdl_wait() and pdl_trigger() do nothing and the stream
 * serialises as usual; the kernels compute the same bits either way.
 * CUDA C++ only. */
#ifndef NUMOE_KERNELS_CUDA_PDL_CUH
#define NUMOE_KERNELS_CUDA_PDL_CUH

#include <cuda_runtime.h>

#include <utility>

#include "kernels/cuda/cuda_quant.h"

namespace numoe_pdl {

/* the kernel after this one may be placed now (its pdl_wait still waits for
 * this kernel's completion) */
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* returns once the kernel before has completed and its writes are visible */
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* kernel<<<grid, block, smem, s>>>(args...), with the programmatic
 * serialisation attribute when nm_cuda_pdl() says so: the launch's own
 * error (a bad configuration), which the runtime also keeps for
 * cudaGetLastError as it does for <<<>>>. */
template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args &&...args) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = s;
    cfg.attrs = attr, cfg.numAttrs = nm_cuda_pdl() ? 1u : 0u;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

} /* namespace numoe_pdl */

#endif
