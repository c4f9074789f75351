/* pdl.cu - the process-wide programmatic-dependent-launch switch
 * (cuda_quant.h, pdl.cuh). An atomic: engines on several threads may read
 * it while a test flips it between passes. */
#include <atomic>

#include "kernels/cuda/cuda_quant.h"

static std::atomic<int> pdl_on{0};

extern "C" void nm_cuda_set_pdl(int on) { pdl_on.store(on ? 1 : 0, std::memory_order_relaxed); }
extern "C" int nm_cuda_pdl(void) { return pdl_on.load(std::memory_order_relaxed); }
