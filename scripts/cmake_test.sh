#!/usr/bin/env bash
# Configure, build (cmake-build/, -j2) and test (ctest) the libtorch-only CMake build of the ops.
# Exits non-zero on any failure. The AOTInductor test (aoti_export + test_aoti) needs the Python
# extension built in place first (make build; make test does). Environment:
#   PYTHON           interpreter whose torch to build against (default: .venv/bin/python, python3)
#   DSNT_WITH_CUDA   ON to also compile csrc/cuda/*.cu (default OFF)
#   CUDA_HOME        CUDA toolkit root (default: found like setup.py does)
#   JOBS             parallel build jobs (default 2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${ROOT}/cmake-build"
PYTHON="${PYTHON:-}"
if [[ -z "${PYTHON}" ]]; then
  if [[ -x "${ROOT}/.venv/bin/python" ]]; then PYTHON="${ROOT}/.venv/bin/python"; else PYTHON=python3; fi
fi
# A current CMake (the system one may be too old for CUDA with C++20): the venv's if present.
CMAKE="${CMAKE:-}"
if [[ -z "${CMAKE}" ]]; then
  if [[ -x "$(dirname "${PYTHON}")/cmake" ]]; then CMAKE="$(dirname "${PYTHON}")/cmake"; else CMAKE=cmake; fi
fi
CTEST="$(dirname "$(command -v "${CMAKE}")")/ctest"
[[ -x "${CTEST}" ]] || CTEST=ctest

TORCH_PREFIX="$("${PYTHON}" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
TORCH_CUDA="$("${PYTHON}" -c 'import torch; print(torch.version.cuda or "")')"

# The AOTInductor test exports with this Python (its torch and the in-place dsnt_cuda._C).
ARGS=(-S "${ROOT}" -B "${BUILD}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="${TORCH_PREFIX}"
      -DDSNT_WITH_CUDA="${DSNT_WITH_CUDA:-OFF}" -DPython3_EXECUTABLE="$(command -v "${PYTHON}")"
      -DDSNT_AOTI_TEST=ON)
if command -v ninja >/dev/null 2>&1 || [[ -x "$(dirname "${PYTHON}")/ninja" ]]; then
  ARGS+=(-G Ninja)
  [[ -x "$(dirname "${PYTHON}")/ninja" ]] && ARGS+=(-DCMAKE_MAKE_PROGRAM="$(dirname "${PYTHON}")/ninja")
fi

# torch's CMake config on a CUDA build looks for the toolkit even for CPU-only code.
if [[ -n "${TORCH_CUDA}" ]]; then
  CUDA_ROOT="${CUDA_HOME:-}"
  if [[ -z "${CUDA_ROOT}" || ! -f "${CUDA_ROOT}/include/cuda_runtime.h" ]]; then
    CUDA_ROOT=""
    for c in /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -r); do
      if [[ -f "${c}/include/cuda_runtime.h" && -x "${c}/bin/nvcc" ]]; then CUDA_ROOT="${c}"; break; fi
    done
  fi
  if [[ -n "${CUDA_ROOT}" ]]; then
    export CUDA_HOME="${CUDA_ROOT}"
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR="${CUDA_ROOT}" -DCMAKE_CUDA_COMPILER="${CUDA_ROOT}/bin/nvcc"
           -DCUDAToolkit_ROOT="${CUDA_ROOT}")
  else
    echo "cmake_test.sh: torch is a CUDA build but no CUDA toolkit was found (set CUDA_HOME)" >&2
  fi
fi

"${CMAKE}" "${ARGS[@]}"
"${CMAKE}" --build "${BUILD}" -j "${JOBS:-2}"
"${CTEST}" --test-dir "${BUILD}" --output-on-failure
