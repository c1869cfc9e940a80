#!/usr/bin/env bash
# The one script for a lent GPU machine (`make gpu-check`): a fresh 16-core H100/H200 box, its own
# python3 with torch, no venv, no network. One command of at most 8 minutes: build, the CUDA and
# Triton GPU tests, compute-sanitizer (memcheck, racecheck, synccheck, initcheck), the benchmark,
# then the rest of the suite if time remains. Results under $OUT (at most 8 plain files):
#   summary.md    table of steps: status, seconds, limit, pytest counts; device, torch, date
#   gpu_check.log every step's output (its tail when long) under a header
#   device.txt    device, driver, torch / CUDA / triton versions, nvidia-smi, nvcc
#   junit.xml     every pytest run's results, merged
#   bench.csv     benchmark rows (bench/run.py's results.csv), bench.md its markdown table
#
# Time: a total budget (GPU_CHECK_BUDGET, default 450 s) and a limit per step (LIMIT below, which
# adds up to 450 s). A step is killed at its limit or when the budget is spent (`timeout`); a step
# that would start with under MIN_STEP_S left is "not run (time budget)". summary.md is rewritten
# after each step, so a run cut short still reports. Exit status 1 when any step failed or did
# not run.
#
# Knobs (environment):
#   OUT=dir                   results (default gpu-results)
#   PYTHON=python3            interpreter with torch
#   GPU_CHECK_BUDGET=450      total seconds
#   GPU_CHECK_LIMITS=a=s,...  per-step limits, e.g. build=200,bench=60
#   GPU_CHECK_STEPS=a,b,...   run only these steps (others: "skipped (not selected)");
#                             "sanitizer" selects its four tools
#   GPU_CHECK_CMD_<step>=...  (step with '_' for '-') a shell command run instead of the step: the
#                             dry run of tests/test_gpu_scripts_dry_run.py fakes steps with it
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
export PYTHON PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
unset DSNT_GPU_TESTS_ON TRITON_INTERPRET # the GPU itself, never the CPU dry run of the GPU tests

# ----------------------------------------------------------------------------------------------
# The steps, one function each, run as `gpu_check.sh --step NAME` in a child that `timeout` kills.
# JUNIT_DIR (each step's pytest XML) and BENCH_DIR are set by the parent.

pytest_run() { # pytest_run XML_NAME ARGS...: pytest with its XML in the step's JUNIT_DIR
  local xml="$1"
  shift
  "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$JUNIT_DIR/$xml.xml" "$@"
}

step_info() {
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
    echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' + local changes')"
    "$PYTHON" -c 'import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__)
print("cuda:", torch.version.cuda)
print("gpu_available:", torch.cuda.is_available())
try:
    import triton
    print("triton:", triton.__version__)
except ImportError:
    print("triton: not installed")'
    echo "cpus: $(nproc)"
    echo "sanitizer: $(find_sanitizer || echo 'not found')"
    echo
    nvidia-smi || echo "nvidia-smi failed"
    nvcc --version || echo "nvcc not on PATH"
  } 2>&1 | tee "$OUT/device.txt"
}

step_build() {
  # In place against this machine's torch (nothing built elsewhere can be carried over); then
  # make sure the CUDA kernels are in it (setup.py builds without them when it finds no nvcc).
  "$PYTHON" setup.py build_ext --inplace &&
    "$PYTHON" -c 'import json, dsnt_cuda
from dsnt_cuda import _extension
print(json.dumps(_extension.build_info()))
assert _extension.has_kernel("dsnt_fwd", "CUDA"), "built without the CUDA kernels"'
}

# test_edge_cases.py runs on every (backend, device) of the process: ids like "cuda-cuda" select
# one backend on the GPU. Its CPU part runs in `make test`.
step_test_cuda() {
  local rc=0
  pytest_run ops_cuda tests/test_ops_cuda.py || rc=1
  pytest_run edge_cases_cuda tests/test_edge_cases.py -k cuda-cuda || rc=1
  return $rc
}

step_test_triton() {
  local rc=0
  pytest_run triton_gpu tests/test_triton_gpu.py || rc=1
  pytest_run edge_cases_triton tests/test_edge_cases.py -k triton-cuda || rc=1
  return $rc
}

find_sanitizer() { # on PATH or in the toolkit
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/none}"/{bin,compute-sanitizer}/compute-sanitizer \
    /usr/local/cuda{,-*}/{bin,compute-sanitizer}/compute-sanitizer; do
    [ -x "$c" ] && echo "$c" && return 0
  done
  return 1
}

# Any hazard fails the step (--error-exitcode). racecheck, synccheck and initcheck look at the
# dsnt_* kernels only: torch's own kernels are not ours to check, and skipping them saves time.
step_sanitizer() { # step_sanitizer TOOL
  local tool="$1" sanitizer
  sanitizer="$(find_sanitizer)" || { echo "compute-sanitizer not found"; return 2; }
  local args=(--tool "$tool" --error-exitcode 3)
  case "$tool" in
    memcheck) args+=(--leak-check no) ;;
    racecheck) args+=(--racecheck-report hazard --kernel-name kns=dsnt_) ;;
    *) args+=(--kernel-name kns=dsnt_) ;;
  esac
  "$sanitizer" "${args[@]}" "$PYTHON" scripts/sanitizer_driver.py --quick
}

# The standard GPU shapes (docs/performance.md §2), float32 and bfloat16, inference and training,
# fused backends against the eager reference; then torch.compile (a cold compile per case, the
# costly part) and dsntnn (when installed) on pose2d training, the targets' shape.
step_bench() {
  local shapes=pose2d,wholebody,face,volume3d,batch1
  "$PYTHON" -m bench.run --device cuda --shapes "$shapes" --dtypes float32,bfloat16 \
    --providers cuda,triton,reference --compile-cache --out "$BENCH_DIR" &&
    "$PYTHON" -m bench.run --device cuda --shapes pose2d --dtypes float32 --modes training \
      --providers cuda,reference-compile,dsntnn --out "$BENCH_DIR"
}

# The rest of the suite on this machine (the GPU files above, the CPU emulation of the CUDA
# kernels and this script's own dry run left out).
step_test_rest() {
  pytest_run rest tests --ignore=tests/test_ops_cuda.py --ignore=tests/test_triton_gpu.py \
    --ignore=tests/test_edge_cases.py --ignore=tests/test_triton_interpreter.py \
    --ignore=tests/test_cuda_emulator.py --ignore=tests/test_cuda_emulated.py \
    --ignore=tests/test_cuda_emulated_sanitized.py --ignore=tests/test_gpu_scripts_dry_run.py
}

if [ "${1:-}" = --step ]; then
  fake="GPU_CHECK_CMD_${2//-/_}"
  [ -n "${!fake:-}" ] && exec bash -c "${!fake}"
  case "$2" in
    sanitizer-*) step_sanitizer "${2#sanitizer-}" ;;
    *) "step_${2//-/_}" ;;
  esac
  exit
fi

# ----------------------------------------------------------------------------------------------
# The parent: the watchdog and the bookkeeping.

STEPS=(info build test-cuda test-triton sanitizer-memcheck sanitizer-racecheck sanitizer-synccheck
  sanitizer-initcheck bench test-rest)
# seconds; test-rest (0) gets what is left of the budget
declare -A LIMIT=([info]=10 [build]=160 [test-cuda]=45 [test-triton]=55 [sanitizer-memcheck]=25
  [sanitizer-racecheck]=25 [sanitizer-synccheck]=15 [sanitizer-initcheck]=25 [bench]=90 [test-rest]=0)
limits="${GPU_CHECK_LIMITS:-}"
for kv in ${limits//,/ }; do LIMIT[${kv%%=*}]="${kv#*=}"; done
BUDGET="${GPU_CHECK_BUDGET:-450}"
MIN_STEP_S=5  # a step with less than this left is not started
KILL_GRACE_S=5  # after TERM at its limit, a step gets this long before KILL

OUT="${OUT:-gpu-results}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export OUT WORK
: >"$OUT/gpu_check.log"
any_failed=0

selected() {
  [ -z "${GPU_CHECK_STEPS:-}" ] && return 0
  case ",$GPU_CHECK_STEPS," in *",$1,"* | *",${1%%-*},"*) return 0 ;; *) return 1 ;; esac
}

record() { # record NAME STATUS SECONDS LIMIT COUNTS NOTE: a row of the table, summary rewritten
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/steps.tsv"
  case "$2" in ok | skipped*) ;; *) any_failed=1 ;; esac
  "$PYTHON" scripts/gpu_check_report.py summary "$OUT" "$WORK" "${STEPS[@]}"
  echo "=== [$1] $2 (${3}s of ${4}s)"
}

append_log() { # append_log NAME STATUS LOG: the step's output, its tail when long
  local lines
  lines=$(wc -l <"$3")
  {
    echo "===== [$1] $2 ====="
    if [ "$lines" -gt 4000 ]; then
      echo "... first $((lines - 4000)) of $lines lines left out ..."
      tail -n 4000 "$3"
    else
      cat "$3"
    fi
    echo
  } >>"$OUT/gpu_check.log"
}

step_note() { # a few words for the table from the step's log
  case "$1" in
    sanitizer-*) grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|sanitizer driver:|not found" "$2" | tr -s '\n=' '  ' | sed 's/^ *//' ;;
    bench) [ -f "$OUT/bench.csv" ] && echo "$(($(wc -l <"$OUT/bench.csv") - 1)) rows in bench.csv" ;;
    build) grep -m1 -E "^\{.*\}$|Error|error:" "$2" | cut -c1-160 ;;
  esac
}

run_step() {
  local name="$1" left=$((BUDGET - SECONDS)) limit="${LIMIT[$1]}"
  if ! selected "$name"; then record "$name" "skipped (not selected)" 0 0 "- - - -" ""; return; fi
  if [ "$left" -lt "$MIN_STEP_S" ]; then record "$name" "not run (time budget)" 0 0 "- - - -" ""; return; fi
  if [ "$limit" -le 0 ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
  export JUNIT_DIR="$WORK/junit-$name" BENCH_DIR="$WORK/bench"
  mkdir -p "$JUNIT_DIR" "$BENCH_DIR"
  local log="$WORK/$name.log" t0=$SECONDS rc
  echo "=== [$name] started $(date -u +%H:%M:%S), limit ${limit}s"
  timeout --kill-after="$KILL_GRACE_S" "$limit" bash "$0" --step "$name" >"$log" 2>&1
  rc=$?
  local secs=$((SECONDS - t0)) status=ok counts
  counts="$("$PYTHON" scripts/gpu_check_report.py counts "$JUNIT_DIR")"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="TIMEOUT (killed at ${limit}s)"
  elif [ $rc -ne 0 ]; then
    status="FAIL (rc=$rc)"
  elif [[ "$name" = test-cuda || "$name" = test-triton ]] && [ "${counts%% *}" = 0 ]; then
    status="ALL SKIPPED" # no GPU, or a build without the CUDA kernels: not a pass here
  fi
  if [ "$name" = bench ]; then
    cp "$BENCH_DIR/results.csv" "$OUT/bench.csv" 2>/dev/null
    cp "$BENCH_DIR/latest_cuda.md" "$OUT/bench.md" 2>/dev/null
  fi
  append_log "$name" "$status" "$log"
  record "$name" "$status" "$secs" "$limit" "$counts" "$(step_note "$name" "$log")"
}

echo "gpu_check: budget ${BUDGET}s, results in $OUT"
"$PYTHON" scripts/gpu_check_report.py summary "$OUT" "$WORK" "${STEPS[@]}"
for step in "${STEPS[@]}"; do run_step "$step"; done
echo
cat "$OUT/summary.md"
exit $any_failed
