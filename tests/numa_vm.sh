#!/usr/bin/env bash
# numa_vm.sh - boots a two-NUMA-node virtual machine (QEMU, software
# emulation) with numoe in its initramfs and prints its serial console.
#
#   tests/numa_vm.sh --bin DIR --model M.gguf --out DIR [--kernel VMLINUZ]
#                    [--tokens LIST] [-n N] [--timeout S] [--accel tcg|kvm]
#
# The machine: 4 CPUs and 2 GiB, node 0 = CPUs 0-1 + 1 GiB, node 1 = CPUs 2-3
# + 1 GiB (ACPI SRAT, as a two-socket board reports it). The root is a
# busybox initramfs with DIR/numoe, DIR/numoe-worker, the libraries ldd names
# for them, the model, its expert tensors' byte ranges (experts.ranges) and
# tests/numa_vm_probe.c built here; tests/numa_vm_init.sh is its /init and
# does the work (see there); tests/test_numa_vm.py checks what it prints.
# The kernel is Debian's (tests/setup.sh extracts it into build/tools/vm/);
# it needs no modules: NUMA, tmpfs, devtmpfs and the 8250 serial port are
# built in. Exit status: QEMU's (124 when --timeout, default 300 s, ran out).
set -euo pipefail
ROOT_DIR=$(cd "$(dirname "$0")/.." && pwd)
BIN="" MODEL="" OUT="" KERNEL="$ROOT_DIR/build/tools/vm/vmlinuz" LIMIT=300 ACCEL=tcg
TOKENS="0,17,200,45,3,99,150,12,8,77,240,31,5,64,128,250,33,2,190,101" NPRED=64
while (($#)); do
    case $1 in
    --bin) BIN=$2 ;;
    --model) MODEL=$2 ;;
    --out) OUT=$2 ;;
    --kernel) KERNEL=$2 ;;
    --tokens) TOKENS=$2 ;;
    -n) NPRED=$2 ;;
    --timeout) LIMIT=$2 ;;
    --accel) ACCEL=$2 ;;
    *) echo "numa_vm.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift 2
done
[[ -n $BIN && -n $MODEL && -n $OUT ]] || { echo "usage: numa_vm.sh --bin DIR --model M.gguf --out DIR" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "numa_vm.sh: qemu-system-x86_64 not found (tests/setup.sh installs it)" >&2; exit 3; }
[[ -r $KERNEL ]] || { echo "numa_vm.sh: no kernel at $KERNEL (tests/setup.sh extracts it)" >&2; exit 3; }
for b in numoe numoe-worker; do
    [[ -x $BIN/$b ]] || { echo "numa_vm.sh: $BIN/$b is not built" >&2; exit 3; }
done

rm -rf "$OUT/root"
R=$OUT/root
mkdir -p "$R/bin" "$R/numoe/bin"
cc -std=c11 -D_GNU_SOURCE -O1 -Wall -Wextra -Werror -o "$R/numoe/bin/numa_vm_probe" "$ROOT_DIR/tests/numa_vm_probe.c"
cp "$BIN/numoe" "$BIN/numoe-worker" "$R/numoe/bin/"
cp "$(command -v busybox)" "$R/bin/busybox"
# the dynamic loader and every library the three binaries load, at their own paths
ldd "$R/numoe/bin/numoe" "$R/numoe/bin/numoe-worker" "$R/numoe/bin/numa_vm_probe" |
    awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && NF > 1 {print $1}' | sort -u | while read -r lib; do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
done
if ldd "$R/numoe/bin/numoe" | grep -q "not found"; then
    echo "numa_vm.sh: a library of $BIN/numoe is missing" >&2
    exit 3
fi
cp "$MODEL" "$R/numoe/model.gguf"
# the expert tensors' bytes in the file: the coordinator must hold none of their pages
python3 - "$MODEL" >"$R/numoe/experts.ranges" <<'EOF'
import sys
from gguf import GGUFReader
for t in GGUFReader(sys.argv[1]).tensors:
    if "_exps." in t.name:
        print(int(t.data_offset), int(t.n_bytes))
EOF
printf 'TOKENS=%s\nNPRED=%s\nWAIT_S=%s\n' "$TOKENS" "$NPRED" 120 >"$R/numoe/vm.conf"
cp "$ROOT_DIR/tests/numa_vm_init.sh" "$R/init"
chmod 755 "$R/init"
# uncompressed: emulated decompression would cost seconds
(cd "$R" && find . | cpio -o -H newc --quiet) >"$OUT/initramfs.cpio"
echo "numa_vm.sh: initramfs $(du -h "$OUT/initramfs.cpio" | cut -f1), kernel $KERNEL, accel $ACCEL" >&2

ACCEL_OPTS=(-accel tcg,thread=multi -cpu max)
[[ $ACCEL == kvm ]] && ACCEL_OPTS=(-accel kvm -cpu host)
set +e
timeout -k 10 "$LIMIT" qemu-system-x86_64 -machine pc "${ACCEL_OPTS[@]}" -smp 4 -m 2G \
    -object memory-backend-ram,id=m0,size=1G -object memory-backend-ram,id=m1,size=1G \
    -numa node,nodeid=0,cpus=0-1,memdev=m0 -numa node,nodeid=1,cpus=2-3,memdev=m1 \
    -kernel "$KERNEL" -initrd "$OUT/initramfs.cpio" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init" \
    -nodefaults -display none -serial stdio -no-reboot </dev/null | tee "$OUT/console.log"
rc=${PIPESTATUS[0]}
set -e
exit "$rc"
