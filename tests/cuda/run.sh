#!/usr/bin/env bash
# The CUDA tests, on a machine with an NVIDIA GPU and nvcc (the GPU box):
#     tests/cuda/run.sh [ARGS...]      # ARGS go to every binary, e.g. --no-bench
# builds every tests/cuda/test_cuda_*.cu into $NUMOE_BUILD (default build/) and
# runs each binary; exits non-zero when any fails or could not be built (a
# binary exits 77 when it finds no CUDA device, which counts as failed here).
# Where numoe's packages (ZeroMQ, protobuf-c, PCRE2, ... see tests/setup.sh) are
# missing, the tests that need only the kernels are still built: the Makefile's
# package check, the generated protobuf headers and the common library are
# switched off for them; a test that needs the rest of numoe is then reported
# as not built. `make test` runs the same binaries through
# tests/cuda/test_cuda_binaries.py wherever `nvidia-smi -L` lists a GPU.
#
# NUMOE_CUDA_PREBUILT=1 runs the binaries already in $NUMOE_BUILD/bin without
# building anything: the way to run the tests that need all of numoe on a GPU
# box that lacks its packages. Build them where the packages are (`make cuda`),
# copy $NUMOE_BUILD/bin/test_cuda_* there together with the .so files `ldd`
# names that the box lacks, and point LD_LIBRARY_PATH at those.
set -uo pipefail
cd "$(dirname "$0")/../.."
B="${NUMOE_BUILD:-build}"
bins=()
for src in tests/cuda/test_cuda_*.cu; do bins+=("$B/bin/$(basename "$src" .cu)"); done
kernels_only=()
prebuilt=${NUMOE_CUDA_PREBUILT:-0}
if [ "$prebuilt" = 1 ]; then
    echo "== NUMOE_CUDA_PREBUILT=1: running the binaries in $B/bin as they are"
elif ! pkg-config --exists libzmq libprotobuf-c hwloc numa libpcre2-8 libmicrohttpd libcjson ||
   ! command -v protoc-c >/dev/null; then
    echo "== numoe's packages are missing here: building the CUDA tests against the kernels alone"
    kernels_only=(PKG_OK=yes PROTO_H= LIB_COMMON=)
fi
nvidia-smi -L
failed=0
for t in "${bins[@]}"; do
    if [ "$prebuilt" = 1 ]; then
        [ -x "$t" ] || { echo "== $t: NOT BUILT (missing, and NUMOE_CUDA_PREBUILT=1 builds nothing)"; failed=$((failed + 1)); continue; }
    elif ! make -s -j"$(nproc)" BUILD="$B" "${kernels_only[@]}" "$t"; then
        echo "== $t: NOT BUILT"
        failed=$((failed + 1))
        continue
    fi
    echo "== $t $*"
    "$t" "$@"
    rc=$?
    [ "$rc" -eq 0 ] || { echo "== $t: FAILED (exit $rc)"; failed=$((failed + 1)); }
done
echo "== ${#bins[@]} CUDA test binaries, $failed failed or not built"
[ "$failed" -eq 0 ]
