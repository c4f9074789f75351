# numoe build. `make` builds everything into build/ (binaries in build/bin,
# libraries in build/lib); `make SAN=1 BUILD=build-asan` builds the same tree
# with AddressSanitizer + UBSan; `make test` installs what is missing, builds
# both and runs every test; `make bench` prints the kernel benchmark table.

BUILD   ?= build
SAN     ?=
CC      ?= gcc
NVCC    ?= $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
PYTHON  ?= python3

PKGS := libzmq libprotobuf-c hwloc numa libpcre2-8 libmicrohttpd libcjson
# The two README commands (`make demo`, `make test`) install the packages
# first and then build in a sub-make, so this check must not stop them while
# the Makefile is parsed: it runs only for goals that build directly.
SETUP ?= tests/setup.sh
NO_PKG_GOALS := deps clean test demo help
PKG_OK := $(shell pkg-config --exists $(PKGS) && echo yes)
ifneq ($(PKG_OK),yes)
  ifneq ($(filter-out $(NO_PKG_GOALS),$(or $(MAKECMDGOALS),all)),)
    $(error pkg-config cannot find all of: $(PKGS). Run 'make deps' (or tests/setup.sh) as root to install libzmq3-dev libprotobuf-c-dev protobuf-c-compiler libhwloc-dev libnuma-dev libpcre2-dev libmicrohttpd-dev libcjson-dev)
  endif
endif
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

WARN    := -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter
CFLAGS  ?= -O3 -g
CFLAGS  += -std=c11 -D_GNU_SOURCE -fPIC $(WARN) -I. $(PKG_CFLAGS)
LDLIBS  := -Wl,--as-needed $(PKG_LIBS) -lpthread -lm
ifeq ($(SAN),1)
  CFLAGS  += -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
  LDFLAGS += -fsanitize=address,undefined
endif

# SIMD paths live in their own files and only those get the ISA flags, so the
# rest of the binary runs on any x86-64; cpuid picks the path at run time.
ISA_AVX2   := -mavx2 -mfma -mf16c
ISA_AVX512 := -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni
# the AMX tile kernels (kernels/tile_amx.c): AVX-512 for the scales and float
# steps around the tile instructions; entered only where nm_isa_amx()
ISA_AMX    := $(ISA_AVX512) -mamx-tile -mamx-int8

# protobuf-c messages: proto/*.proto -> $(BUILD)/gen/proto/*.pb-c.{c,h} at build time
PROTO_SRC  := $(wildcard proto/*.proto)
PROTO_C    := $(patsubst %.proto,$(BUILD)/gen/%.pb-c.c,$(PROTO_SRC))
PROTO_H    := $(PROTO_C:.c=.h)
CFLAGS     += -I$(BUILD)/gen

# One library per layer, each using only the ones below it (docs/LAYOUT.md):
# common (+ proto) < kernels < model < coordinator < launch; worker uses
# model and below.
COMMON_SRC := $(wildcard common/*.c)
WORKER_SRC := $(wildcard worker/*.c)
KERNEL_SRC := $(wildcard kernels/*.c)
MODEL_SRC  := $(wildcard model/*.c)
COORD_SRC  := $(wildcard coordinator/*/*.c coordinator/*/*/*.c)
LAUNCH_SRC := $(wildcard launch/*.c)
TEST_SRC   := $(wildcard tests/unit/test_*.c)
CUDA_SRC   := $(wildcard kernels/cuda/*.cu)
CUDA_TEST_SRC := $(wildcard tests/cuda/*.cu)
GPU_SRC    := $(wildcard coordinator/engine/gpu/*.cu)

obj = $(patsubst %.c,$(BUILD)/obj/%.o,$(1))

LIB_COMMON  := $(BUILD)/lib/libnumoe_common.a
LIB_KERNELS := $(BUILD)/lib/libnumoe_kernels.a
LIB_MODEL   := $(BUILD)/lib/libnumoe_model.a
LIB_COORD   := $(BUILD)/lib/libnumoe_coordinator.a
SO_KERNELS  := $(BUILD)/lib/libnumoe_kernels.so
LIBS := $(LIB_COORD) $(LIB_MODEL) $(LIB_KERNELS) $(LIB_COMMON)
WORKER_LIBS := $(LIB_MODEL) $(LIB_KERNELS) $(LIB_COMMON)

BIN_NUMOE  := $(BUILD)/bin/numoe
BIN_WORKER := $(if $(WORKER_SRC),$(BUILD)/bin/numoe-worker)
TEST_BINS  := $(patsubst tests/unit/%.c,$(BUILD)/bin/%,$(TEST_SRC))

ifneq ($(NVCC),)
  LIB_CUDA  := $(BUILD)/lib/libnumoe_cuda.a
  CUDA_BINS := $(patsubst tests/cuda/%.cu,$(BUILD)/bin/%,$(CUDA_TEST_SRC))
  NVFLAGS   ?= -O2 -std=c++17 -arch=sm_90 -Xcompiler -Wall,-Wextra,-Werror,-fPIC -I.
  # the GPU forward pass (coordinator/engine/gpu) and what links it: cuBLAS from the toolkit, found at run time through rpath
  LIB_GPU   := $(BUILD)/lib/libnumoe_gpu.a
  GPU_BENCH := $(BUILD)/bin/bench_gpu_forward
  CUDA_LIB64 := $(abspath $(dir $(NVCC))../lib64)
  GPU_LDLIBS := $(LIB_GPU) $(LIB_CUDA) $(LIBS) -L$(CUDA_LIB64) -lcublas -Xlinker -rpath=$(CUDA_LIB64) -lpthread -lm
  # numoe gets the GPU engine (coordinator/engine/gpu/gpu_engine.c, NUMOE_CUDA)
  # wherever nvcc exists, except in the sanitizer tree: the CUDA runtime and
  # AddressSanitizer do not mix (the driver maps memory ASan reserves for its
  # shadow unless protect_shadow_gap=0, and ASan then reports the runtime's
  # own allocations), so build-asan runs the CPU engine and --gpu N says it was
  # built without CUDA there. Without nvcc the same holds for every tree.
  ifneq ($(SAN),1)
    CFLAGS        += -DNUMOE_CUDA=1
    ENGINE_LIBS   := $(LIB_GPU) $(LIB_CUDA)
    ENGINE_LDLIBS := -L$(CUDA_LIB64) -lcublas -lcudart -lstdc++ -Wl,-rpath=$(CUDA_LIB64)
  endif
endif
# what links the coordinator library (numoe, the unit tests): the GPU engine's
# libraries sit in one group with it, since each calls into the other
LINK_LIBS = -Wl,--start-group $(LIBS) $(ENGINE_LIBS) -Wl,--end-group

.PHONY: all tests cuda test bench deps clean fuzz demo
# Keep chained intermediates (test objects, generated protobuf headers): without
# this make deletes them after each build and rebuilds them the next time.
.SECONDARY:
all: $(BIN_NUMOE) $(BIN_WORKER) $(SO_KERNELS) tests cuda
tests: $(TEST_BINS)
cuda: $(LIB_CUDA) $(CUDA_BINS) $(LIB_GPU) $(GPU_BENCH)

$(BUILD)/obj/%.o: %.c | $(PROTO_H)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/gen/%.pb-c.c $(BUILD)/gen/%.pb-c.h: %.proto
	@mkdir -p $(BUILD)/gen
	protoc-c --c_out=$(BUILD)/gen $<

$(BUILD)/obj/gen/%.o: $(BUILD)/gen/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Wno-shadow -MMD -MP -c $< -o $@

$(BUILD)/obj/%_avx2.o: %_avx2.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(ISA_AVX2) -MMD -MP -c $< -o $@

$(BUILD)/obj/%_avx512.o: %_avx512.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(ISA_AVX512) -MMD -MP -c $< -o $@

$(BUILD)/obj/%_amx.o: %_amx.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(ISA_AMX) -MMD -MP -c $< -o $@

PROTO_OBJ := $(patsubst $(BUILD)/gen/%.c,$(BUILD)/obj/gen/%.o,$(PROTO_C))
# proto/*.c: the wire and shm-slot helpers both sides of numoe.proto use
$(LIB_COMMON): $(call obj,$(COMMON_SRC) $(wildcard proto/*.c)) $(PROTO_OBJ)
$(LIB_KERNELS): $(call obj,$(KERNEL_SRC))
$(LIB_MODEL): $(call obj,$(MODEL_SRC))
$(LIB_COORD): $(call obj,$(COORD_SRC))
$(BUILD)/lib/%.a:
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# Shared library of the kernels + GGUF reader: the Python fixture tools load
# it with ctypes (K-quant quantisation, which the gguf package lacks).
$(SO_KERNELS): $(call obj,$(KERNEL_SRC) $(COMMON_SRC))
	@mkdir -p $(dir $@)
	$(CC) -shared $(LDFLAGS) -o $@ $^ -lpthread -lm

$(BIN_NUMOE): $(call obj,$(LAUNCH_SRC)) $(LIBS) $(ENGINE_LIBS)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $(call obj,$(LAUNCH_SRC)) $(LINK_LIBS) $(LDLIBS) $(ENGINE_LDLIBS)

$(BUILD)/bin/numoe-worker: $(call obj,$(WORKER_SRC)) $(WORKER_LIBS)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $(call obj,$(WORKER_SRC)) $(WORKER_LIBS) $(LDLIBS)

$(BUILD)/bin/test_%: $(BUILD)/obj/tests/unit/test_%.o $(LIBS) $(ENGINE_LIBS)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $< $(LINK_LIBS) $(LDLIBS) $(ENGINE_LDLIBS)

ifneq ($(NVCC),)
$(BUILD)/obj/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -MMD -MP -c $< -o $@
$(LIB_CUDA): $(patsubst %.cu,$(BUILD)/obj/%.cu.o,$(CUDA_SRC))
$(BUILD)/bin/test_cuda_%: $(BUILD)/obj/tests/cuda/test_cuda_%.cu.o $(LIB_CUDA) $(LIB_KERNELS) $(LIB_COMMON)
	@mkdir -p $(dir $@)
	$(NVCC) -o $@ $^ -lpthread -lm
$(LIB_GPU): $(patsubst %.cu,$(BUILD)/obj/%.cu.o,$(GPU_SRC))
$(BUILD)/bin/test_cuda_forward: $(BUILD)/obj/tests/cuda/test_cuda_forward.cu.o $(LIB_GPU) $(LIB_CUDA) $(LIBS)
	@mkdir -p $(dir $@)
	$(NVCC) -o $@ $< $(GPU_LDLIBS)
$(GPU_BENCH): $(BUILD)/obj/tests/cuda/bench_gpu_forward.o $(LIB_GPU) $(LIB_CUDA) $(LIBS)
	@mkdir -p $(dir $@)
	$(NVCC) -o $@ $< $(GPU_LDLIBS)
endif

# libFuzzer target for the GGUF reader (clang only; see tests/fuzz/).
FUZZ_BIN := $(BUILD)/fuzz/fuzz_gguf
fuzz: $(FUZZ_BIN)
# The reader and what it uses are all in common/.
$(FUZZ_BIN): tests/fuzz/fuzz_gguf.c $(COMMON_SRC)
	@mkdir -p $(dir $@)
	clang -std=c11 -D_GNU_SOURCE -g -O1 -I. -fsanitize=fuzzer,address,undefined $^ -o $@

deps:
	$(SETUP)

# build-vm/: numoe without CUDA for the two-NUMA-node VM test (tests/test_numa_vm.py),
# whose initramfs cannot carry the CUDA libraries; only where build/ links them.
test: deps
	$(MAKE) all
	$(MAKE) BUILD=build-asan SAN=1 tests build-asan/bin/numoe $(if $(WORKER_SRC),build-asan/bin/numoe-worker)
	$(if $(NVCC),$(MAKE) BUILD=build-vm NVCC= build-vm/bin/numoe build-vm/bin/numoe-worker)
	$(MAKE) fuzz
	$(PYTHON) -m pytest -q -p no:cacheprovider --durations=10 tests

bench: all
	$(BUILD)/bin/numoe bench kernels

# The main job on the committed demo model: a tiny DeepSeek-V3-architecture model
# trained on the prose of the Python documentation (tests/train_demo.py; see
# tests/fixtures/models/README.md), inspected and run on an English prompt
# (greedy, with a mild repetition penalty: a model this small otherwise loops
# sooner), then the command line that serves it. `make demo MODEL=/path/to/model.gguf` runs
# another model.
DEMO_MODEL := tests/fixtures/models/demo-v3-Q8_0.gguf
MODEL ?= $(DEMO_MODEL)
demo: deps
	$(MAKE) all
	$(BUILD)/bin/numoe inspect $(MODEL) --no-tensors
	$(BUILD)/bin/numoe generate --model $(MODEL) --prompt "The function returns" -n 48 --repeat-penalty 1.2
	@echo
	@echo "Serve it (OpenAI- and Ollama-compatible HTTP API, docs/SERVE.md):"
	@echo "  $(BUILD)/bin/numoe serve -m $(MODEL) --port 10002"
	@echo "  curl -s http://127.0.0.1:10002/v1/completions -d '{\"prompt\": \"The function returns\", \"max_tokens\": 32}'"

clean:
	rm -rf build build-asan build-vm

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
