#!/usr/bin/env bash
# race.sh - numoe against ik_llama.cpp on the GPU box, in as few device calls
# as the box's limits allow (10 minutes a call, a machine warm for 30 s
# between calls, about 14 minutes to build ik_llama.cpp there).
#
#   tests/cuda/race.sh unpack PACK WHEELS # every call: numoe's binaries from tests/cuda/pack.sh's PACK
#                                         #   into build/, the Python wheels in WHEELS into /tmp/site
#   tests/cuda/race.sh start IK_TARBALL   # call 1: ik build + models in the background (own sessions)
#   tests/cuda/race.sh tests              # call 1 (same): the CUDA test binaries meanwhile, then
#                                         #   compute-sanitizer memcheck on the CUDA forward test
#   tests/cuda/race.sh pytest             # call 2: tests/test_gpu_engine.py (4 at once, the VRAM test
#                                         #   alone after them), while ik still builds
#   tests/cuda/race.sh bench [SECONDS] [numoe|ik|all]
#                                         # call 3: waits for the models (and, for ik, the ik build; at
#                                         #   most SECONDS, 300), then numoe's variants and / or ik on the
#                                         #   files, nothing else running
# RACE_V3=1 with start also writes the V3-width slice /tmp/v3s.gguf (15 GB,
# 5 layers of hidden 7168, 256 experts of ff 2048); RACE_GEN="m8 v3s" names
# the files start writes instead (in that order), RACE_BUILD_JOBS the ik
# build's parallel jobs (default: every CPU but 4); RACE_MODELS picks the
# files the bench runs (default m8 m27; v3s for the slice).
#
# Everything prints under $OUT (the device tool's folder; default /tmp/race).
# numoe's binaries and the .so files ldd names must be in build/bin and on
# LD_LIBRARY_PATH (built on the development machine: the box lacks ZeroMQ,
# protobuf-c, ...; `unpack` puts them there, then export
# LD_LIBRARY_PATH=PACK/lib PYTHONPATH=/tmp/site); the generator needs the
# gguf wheel on PYTHONPATH.
#
# Models: speed-only files (gen_deepseek.py --random-blocks: the real plan's
# tensors, types and bytes, random blocks), deterministic, so a file
# regenerated in a later call is byte-identical (md5 printed):
#   /tmp/m8.gguf   8 layers of DeepSeek-V2-Lite width, q_lora 1536 (ik loads
#                  a q_lora-0 file only with 26-27 layers), Q4_K / Q5_0 / Q6_K
#   /tmp/m27.gguf  the full 27-layer V2-Lite shape, q_lora 0
# numoe runs with every routed expert on the CPU (--gpu-experts 0: ik's
# -ot exps=CPU) in process and in its default worker, then with part or all
# of them in VRAM (--gpu-experts N, auto: the curve); ik as the issues quote
# it: -ngl 99 -ot exps=CPU -mla 3 -fa 1 -fmoe 1.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/race}
mkdir -p "$OUT"
T=${RACE_THREADS:-$(nproc)}
IK=/tmp/ik/build/bin/llama-bench
B=build/bin/numoe

case "${1:-}" in
unpack)
    pack=${2:?usage: race.sh unpack PACK WHEELS}
    whl=${3:?usage: race.sh unpack PACK WHEELS}
    mkdir -p build/bin build/lib
    cp "$pack"/bin/* build/bin/ && cp "$pack/lib/libnumoe_kernels.so" build/lib/
    pip install -q --no-deps --no-index --target /tmp/site "$whl"/*.whl 2>&1 | tail -2
    echo "race: unpacked $(ls "$pack/bin" | wc -l) binaries; wheels in /tmp/site"
    ;;
start)
    tar=${2:?usage: race.sh start IK_TARBALL}
    mkdir -p /tmp/ik && tar -xJf "$tar" -C /tmp/ik
    setsid nohup bash -c "cd /tmp/ik && cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON \
        -DCMAKE_BUILD_TYPE=Release > /tmp/ik-cmake.log 2>&1 && \
        cmake --build build -j${RACE_BUILD_JOBS:-$((T > 4 ? T - 4 : 1))} --target llama-bench > /tmp/ik-build.log 2>&1; \
        echo \$? > /tmp/ik-done" > /dev/null 2>&1 &
    gen=""
    for m in ${RACE_GEN:-m8 m27 $([ "${RACE_V3:-0}" = 1 ] && echo v3s)}; do
        case $m in
        m8) a="--shape v2-lite --layers 8 --q-lora 1536" ;;
        m27) a="--shape v2-lite" ;;
        v3s) a="--shape v3-width --layers 5" ;;
        *) echo "race: no model $m (m8, m27, v3s)" >&2; exit 2 ;;
        esac
        gen+="python3 tests/gen_deepseek.py $a --attn-layout ik --type Q4_K --random-blocks -q -o /tmp/$m.gguf && "
    done
    setsid nohup bash -c "${gen}true; echo \$? > /tmp/gen-done" > /tmp/gen.log 2>&1 &
    echo "race: ik build and models started in the background"
    ;;
tests)
    NUMOE_CUDA_PREBUILT=1 timeout "${CUDA_S:-240}" bash tests/cuda/run.sh > "$OUT/cuda.log" 2>&1
    echo "cuda tests: exit $?" | tee -a "$OUT/cuda.log"
    grep -E "passed|FAIL" "$OUT/cuda.log" | tail -20
    # memcheck on the kernel tests (the integer GEMV's ragged last chunk must not read past a matrix)
    timeout "${MEMCHECK_S:-100}" compute-sanitizer --tool memcheck --error-exitcode 9 build/bin/test_cuda_quant \
        --no-bench > "$OUT/memcheck-quant.log" 2>&1
    echo "memcheck test_cuda_quant: exit $?" | tee -a "$OUT/memcheck-quant.log"
    grep -E "ERROR SUMMARY|passed" "$OUT/memcheck-quant.log" | tail -2
    # memcheck on a float and a quantised fixture (every kernel, the streamed and resident experts, graphs)
    for f in deepseek-v3-tiny-Q4_K-mla deepseek-v2-tiny-F32-legacy; do
        timeout "${MEMCHECK_S:-100}" compute-sanitizer --tool memcheck --leak-check full \
            --error-exitcode 9 build/bin/test_cuda_forward "tests/fixtures/models/$f.gguf" > "$OUT/memcheck-$f.log" 2>&1
        echo "memcheck $f: exit $?" | tee -a "$OUT/memcheck-$f.log"
        grep -E "ERROR SUMMARY|passed|LEAK" "$OUT/memcheck-$f.log" | tail -3
    done
    ;;
pytest)
    # 4 at once (pytest-xdist is on the box); the VRAM-flat check reads nvidia-smi, so it runs alone
    timeout "${PYTEST_S:-420}" python3 -m pytest -q -p no:cacheprovider -n 4 --durations=5 tests/test_gpu_engine.py \
        -k "not asan and not vram_flat" > "$OUT/pytest.log" 2>&1
    echo "pytest: exit $?" | tee -a "$OUT/pytest.log"
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py -k "vram_flat" >> "$OUT/pytest.log" 2>&1
    echo "pytest vram: exit $?" | tee -a "$OUT/pytest.log"
    grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest.log" | tail -30
    ;;
bench)
    wait_s=${2:-300}
    what=${3:-all}
    for _ in $(seq 1 $((wait_s / 5))); do
        [ -f /tmp/gen-done ] && { [ "$what" = numoe ] || [ -f /tmp/ik-done ]; } && break
        sleep 5
    done
    L="$OUT/bench.log"
    {
        echo "models: $(cat /tmp/gen-done 2>/dev/null || echo 'not finished')"
        echo "ik build: $(cat /tmp/ik-done 2>/dev/null || echo 'not finished')"
        md5sum /tmp/m8.gguf /tmp/m27.gguf 2>&1
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        nproc
    } > "$L"
    run() { # label, seconds, command...
        echo "## $1" >> "$L"
        local t=$2
        shift 2
        timeout "$t" "$@" 2>&1 | tr '\r' '\n' | grep -vE "reading the model|^llama_|^load|^print_info|^\.+$" >> "$L"
        echo "exit ${PIPESTATUS[0]}" >> "$L"
    }
    NB=("$B" bench -t "$T" --gpu 0)
    for m in ${RACE_MODELS:-m8 m27}; do
        [ "$what" = ik ] && break
        run "numoe $m --workers 0, experts on the CPU" 120 "${NB[@]}" -m /tmp/$m.gguf -p 512 -n 128 -r 2 --workers 0 --gpu-experts 0
        run "numoe $m --workers 0, experts on the CPU, pp2048" 90 "${NB[@]}" -m /tmp/$m.gguf -p 2048 -n 0 -r 2 --workers 0 \
            --gpu-experts 0
        run "numoe $m default worker, experts on the CPU" 120 "${NB[@]}" -m /tmp/$m.gguf -p 512 -n 64 -r 2 --gpu-experts 0
        for h in ${RACE_HOT:-16 32}; do
            run "numoe $m --workers 0 --gpu-experts $h" 60 "${NB[@]}" -m /tmp/$m.gguf -p 0 -n 128 -r 2 --workers 0 --gpu-experts $h
        done
        run "numoe $m --workers 0 --gpu-experts auto (the default)" 120 "${NB[@]}" -m /tmp/$m.gguf -p 512 -n 128 -r 2 --workers 0
        run "numoe $m default worker, --gpu-experts auto (the default)" 60 "${NB[@]}" -m /tmp/$m.gguf -p 0 -n 128 -r 2
        # the same decode with fp32 activations in every GEMV (the integer kernels off)
        run "numoe $m --workers 0 --gpu-experts auto, NUMOE_GPU_GEMV=f32" 60 env NUMOE_GPU_GEMV=f32 "${NB[@]}" \
            -m /tmp/$m.gguf -p 0 -n 128 -r 2 --workers 0
        run "numoe $m --workers 0 --gpu-experts 0, NUMOE_GPU_GEMV=f32" 60 env NUMOE_GPU_GEMV=f32 "${NB[@]}" \
            -m /tmp/$m.gguf -p 0 -n 128 -r 2 --workers 0 --gpu-experts 0
    done
    for m in ${RACE_MODELS:-m8 m27}; do
        [ "$what" = numoe ] && break
        [ -x "$IK" ] && run "ik_llama.cpp $m" 150 $IK -m /tmp/$m.gguf -ngl 99 -ot exps=CPU -mla 3 -fa 1 -fmoe 1 \
            -t "$T" -p 512,2048 -n 128 -r 2
    done
    grep -E "^##|^\||^exit|numoe: (decode|prefill|engine)" "$L"
    ;;
*)
    sed -n 2,25p "$0"
    exit 2
    ;;
esac
