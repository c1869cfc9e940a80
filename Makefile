# One command each: `make test` (set-up + build + the whole suite) and `make bench` (set-up +
# build + the CPU benchmark). Both start from a fresh clone: they create .venv and install into it.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# The lent GPUs are sm_90; without an explicit list torch probes for GPUs and fails on CI.
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: all venv build test test-python test-emulated test-triton test-cmake lint lint-python lint-cxx \
	format-cxx bench overhead cuda-report gpu-check clean

all: build

$(VENV)/.installed: requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

# Incremental (ninja): a no-op when nothing changed. Compiles the CUDA kernels whenever nvcc is
# found, GPU or not.
build: venv
	$(VPY) setup.py build_ext --inplace

test: build
	$(MAKE) test-python test-emulated test-triton test-cmake

EMULATED_TESTS := tests/test_cuda_emulator.py tests/test_cuda_emulated.py tests/test_cuda_emulated_sanitized.py

# The second run is the GPU tests' dry run: their own code, on CPU tensors against the CPU
# kernels (DSNT_GPU_TESTS_ON=cpu), so a GPU machine is not the first to execute it.
test-python:
	$(VPY) -m pytest -q tests --ignore=tests/test_triton_interpreter.py $(EMULATED_TESTS:%=--ignore=%)
	DSNT_GPU_TESTS_ON=cpu $(VPY) -m pytest -q tests/test_ops_cuda.py

# The CUDA kernels on the CPU, over the emulation of the CUDA thread model (tests/cuda_emulation/):
# the emulator's own tests, the kernels' whole suite, then its sanitized subset under ThreadSanitizer
# and AddressSanitizer + UBSan. Builds are cached (ninja) in build/cuda_emulation/; no nvcc needed.
test-emulated: venv
	$(VPY) -m pytest -q $(EMULATED_TESTS)

# Triton's interpreter must be switched on before triton is imported: its own process. The GPU
# Triton tests run here too, on CPU tensors (their dry run, as above).
test-triton:
	TRITON_INTERPRET=1 $(VPY) -m pytest -q tests/test_triton_interpreter.py tests/test_edge_cases.py \
		tests/test_onnx_and_trace.py
	TRITON_INTERPRET=1 DSNT_GPU_TESTS_ON=cpu $(VPY) -m pytest -q tests/test_triton_gpu.py

test-cmake:
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/cmake_test.sh

# Lint: ruff (rules in pyproject.toml) on the Python, clang-format (.clang-format) on the C++ / CUDA.
# `make lint-cxx CXX_FILES="csrc/dsnt_ops.cpp csrc/dsnt_ops.h"` checks a list of files;
# `make format-cxx CXX_FILES=...` rewrites them in place.
RUFF := $(VENV)/bin/ruff
CLANG_FORMAT := $(VENV)/bin/clang-format
CXX_FILES ?= $(shell git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')

lint: lint-python lint-cxx

lint-python: venv
	$(RUFF) check .

lint-cxx: venv
	$(CLANG_FORMAT) --dry-run --Werror $(CXX_FILES)

format-cxx: venv
	$(CLANG_FORMAT) -i $(CXX_FILES)

bench: build
	$(VPY) -m bench.run --device cpu
	$(VPY) -m bench.plot

# Python overhead of the API per training step on a tiny map (bench/overhead.py).
overhead: build
	$(VPY) -m bench.overhead

# Registers, spills and shared memory of every CUDA kernel, from ptxas (no GPU needed).
cuda-report: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/cuda_report.sh

# On a 16-core GPU machine, one command within 8 minutes (a 450 s budget, per-step limits): its
# own python3 (no venv, no network), build, CUDA/Triton tests, compute-sanitizer (4 tools),
# benchmark, then the rest of the suite if time remains; at most 6 files under $$OUT.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build cmake-build dsnt_cuda/*.so
