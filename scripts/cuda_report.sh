#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for the target GPU architecture with `ptxas -v` and print, per
# kernel, its registers, spill stores/loads, static shared memory, stack frame and constant
# memory. Needs nvcc and a CUDA build of torch (for its headers); no GPU.
#
#   scripts/cuda_report.sh            # sm_90 (TORCH_CUDA_ARCH_LIST / CUDA_ARCH override it)
#   CUDA_ARCH=90 PYTHON=python3 scripts/cuda_report.sh
#   CUDA_REPORT_FILES=csrc/cuda/dsnt_kernel.cu CUDA_REPORT_FLAGS=-DDSNT_REPORT_FLOAT_ONLY scripts/cuda_report.sh
# Exit status: non-zero if a file fails to compile or any kernel spills.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
ARCH="${CUDA_ARCH:-}"
if [ -z "$ARCH" ]; then
  ARCH="$(echo "${TORCH_CUDA_ARCH_LIST:-9.0}" | tr ' ;' '\n\n' | head -n1 | sed 's/+PTX//; s/\.//')"
fi

# The real toolkit root (nvcc on PATH may be a wrapper script).
CUDA_ROOT="${CUDA_HOME:-}"
if [ -z "$CUDA_ROOT" ] || [ ! -x "$CUDA_ROOT/bin/nvcc" ]; then
  for c in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ]; then CUDA_ROOT="$c"; fi
  done
fi
NVCC="${NVCC:-${CUDA_ROOT:+$CUDA_ROOT/bin/nvcc}}"
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda-report: nvcc not found (set CUDA_HOME or NVCC)"; exit 2
fi

read -r -d '' PYCODE <<'PY'
import torch, torch.utils.cpp_extension as c
try:
    inc = c.include_paths(device_type="cuda")
except TypeError:
    inc = c.include_paths(cuda=True)
print(" ".join("-I" + p for p in inc))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.__version__)
PY
INFO="$("$PYTHON" -c "$PYCODE" 2>/dev/null)" || { echo "cuda-report: cannot import torch with $PYTHON"; exit 2; }
INCLUDES="$(echo "$INFO" | sed -n 1p)"
ABI="$(echo "$INFO" | sed -n 2p)"
TORCH_VERSION="$(echo "$INFO" | sed -n 3p)"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "== cuda-report: $("$NVCC" --version | tail -n 2 | head -n 1), torch $TORCH_VERSION, sm_$ARCH"
status=0
for cu in ${CUDA_REPORT_FILES:-csrc/cuda/*.cu}; do
  [ -e "$cu" ] || continue
  log="$TMP/$(basename "$cu").log"
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$NVCC" -std=c++20 -O3 --expt-relaxed-constexpr -lineinfo \
    -gencode "arch=compute_${ARCH},code=sm_${ARCH}" -Xptxas -v \
    -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
    -DDSNT_WITH_CUDA=1 -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
    -I csrc $INCLUDES ${CUDA_REPORT_FLAGS:-} -Xcompiler -fPIC -c "$cu" -o "$TMP/out.o" >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  echo
  echo "== $cu  (nvcc exit $rc, ${secs}s)"
  if [ $rc -ne 0 ]; then
    status=1
    grep -E "error|Error" "$log" | head -n 40
    continue
  fi
  warnings=$(grep -c -i "warning" "$log" || true)
  [ "$warnings" != "0" ] && { echo "-- $warnings warning line(s):"; grep -i -A2 "warning" "$log" | head -n 30; }
  "$PYTHON" - "$log" <<'PY' || status=1
import re, subprocess, sys
lines = open(sys.argv[1]).read().splitlines()
rows, cur = [], None
def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
        return out.splitlines()
    except OSError:
        return names
for ln in lines:
    m = re.search(r"Compiling entry function '([^']+)'", ln)
    if m:
        cur = {"name": m.group(1), "regs": "?", "spill_st": 0, "spill_ld": 0, "smem": 0, "stack": 0, "cmem": ""}
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ln)
    if m:
        cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", ln)
    if m:
        cur["regs"] = m.group(1)
        s = re.search(r"(\d+) bytes smem", ln)
        cur["smem"] = int(s.group(1)) if s else 0
        cur["cmem"] = ", ".join(re.findall(r"\d+ bytes cmem\[\d+\]", ln))
names = demangle([r["name"] for r in rows])
spills = 0
print(f"{'kernel':<96} {'regs':>4} {'spill st/ld':>11} {'smem':>6} {'stack':>5}")
for r, n in zip(rows, names):
    n = re.sub(r"\(dsnt_cuda::\(anonymous namespace\)::\w+Args<\w+>\)$", "", n)
    n = n.replace("dsnt_cuda::(anonymous namespace)::", "").replace("c10::", "")
    spill = f"{r['spill_st']}/{r['spill_ld']}"
    spills += r["spill_st"] + r["spill_ld"]
    print(f"{n[:96]:<96} {r['regs']:>4} {spill:>11} {r['smem']:>6} {r['stack']:>5}")
print(f"-- {len(rows)} kernels, {'NO spills' if spills == 0 else f'SPILLS: {spills} bytes'}")
sys.exit(1 if spills else 0)
PY
done
exit $status
