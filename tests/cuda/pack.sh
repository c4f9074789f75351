#!/usr/bin/env bash
# pack.sh - numoe's GPU binaries for a GPU box that lacks numoe's packages.
#
#   tests/cuda/pack.sh DEST        # after `make -j cuda` (and `make`) here
#
# Writes DEST/bin (numoe, numoe-worker, the CUDA test and bench binaries,
# the CPU kernels' unit tests, stripped), DEST/lib (every .so `ldd` names for them except glibc's, the
# compiler runtime's and CUDA's, which the box has in newer versions, and
# libnumoe_kernels.so, which the generator's K-type quantiser loads). On the
# box: copy DEST/bin/* into build/bin, DEST/lib/libnumoe_kernels.so into
# build/lib, and run with LD_LIBRARY_PATH=DEST/lib (tests/cuda/race.sh
# `unpack` does both).
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:?usage: tests/cuda/pack.sh DEST}
B=${NUMOE_BUILD:-build}
mkdir -p "$dest/bin" "$dest/lib"
bins=("$B/bin/numoe" "$B/bin/numoe-worker")
for b in "$B"/bin/test_cuda_* "$B/bin/bench_gpu_forward"; do [ -x "$b" ] && bins+=("$b"); done
# the CPU kernels' unit tests too: the box's Xeon has what this machine lacks
# (AMX), so its paths are checked against the scalar reference there
for t in tile matmul quant dot_simd scores wsum; do [ -x "$B/bin/test_$t" ] && bins+=("$B/bin/test_$t"); done
for b in "${bins[@]}"; do
    [ -x "$b" ] || { echo "pack: $b is missing: run make -j\$(nproc) cuda first" >&2; exit 1; }
    cp "$b" "$dest/bin/" && strip "$dest/bin/$(basename "$b")"
done
skip='^(linux-vdso|ld-linux|libc\.|libm\.|libpthread|libdl\.|librt\.|libresolv|libstdc\+\+|libgcc_s|libcuda|libcublas|libcudart)'
for b in "${bins[@]}"; do ldd "$b"; done | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u |
    while read -r name path; do
        [[ $name =~ $skip ]] || cp -L "$path" "$dest/lib/$name"
    done
cp "$B/lib/libnumoe_kernels.so" "$dest/lib/"
du -sh "$dest"
