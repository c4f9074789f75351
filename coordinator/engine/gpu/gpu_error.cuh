/* gpu_error.cuh - the one formatter of CUDA errors for the GPU engine's
 * files (CUDA C++ only, not a public header). */
#ifndef NUMOE_COORDINATOR_GPU_ERROR_CUH
#define NUMOE_COORDINATOR_GPU_ERROR_CUH

#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdio.h>

extern "C" {
#include "common/error.h"
}

namespace numoe_gpu {

/* err = "<who>: <what>: <CUDA's message> (<error name>)"; returns -1.
 * Also takes the error out of the runtime's last-error slot: a failed API
 * call leaves it there, and the next kernel launch checked with
 * cudaGetLastError would report it as its own (measured: one failed event
 * wait made every later test fail "uploading layer 0"). Sticky errors (a
 * kernel fault) stay: the context is lost for every later call anyway. */
static inline int __attribute__((format(printf, 4, 5)))
cuda_errf(nm_err *err, cudaError_t e, const char *who, const char *fmt, ...) {
    (void)cudaGetLastError();
    char what[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return nm_errf(err, "%s: %s: %s (%s)", who, what, cudaGetErrorString(e), cudaGetErrorName(e));
}

} /* namespace numoe_gpu */

#endif
