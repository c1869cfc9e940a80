#!/usr/bin/env bash
# The one script for the GPU machine (`make gpu-check`): build in place with the machine's own
# python3 (no venv, no network), record the device, run the CUDA / Triton GPU tests, the rest of
# the suite, compute-sanitizer (memcheck, racecheck, initcheck) over a small driver, and the
# benchmark. Everything goes under ${OUT:-gpu-results}: one log per step, junit XML, summary.md.
#
# Never stops halfway: each step records its status and the script goes on; the exit status is
# non-zero when any step failed. summary.md is rewritten after every step, so a run cut short
# (the device tool's 10-minute limit) still leaves the results so far.
#
# Knobs (environment):
#   OUT=dir                  results directory (default gpu-results)
#   PYTHON=python3           interpreter with torch
#   GPU_CHECK_STEPS=...      comma list, default: info,build,test-cuda,test-triton,sanitizer,test-rest,bench
#   GPU_CHECK_STEP_TIMEOUT=s per-step limit in seconds (default 900; `timeout` kills the step)
#   BENCH_ARGS="..."         default: --device cuda --full
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
export OUT PYTHON
STEPS="${GPU_CHECK_STEPS:-info,build,test-cuda,test-triton,sanitizer,test-rest,bench}"
STEP_TIMEOUT="${GPU_CHECK_STEP_TIMEOUT:-900}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

STATUS_FILE="$OUT/steps.tsv"
: >"$STATUS_FILE"
START_DATE="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
any_failed=0

want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# junit counts of a pytest XML: "passed failed errors skipped"
junit_counts() {
  "$PYTHON" - "$1" <<'PY' 2>/dev/null || echo "- - - -"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
t = sum(int(s.get("tests", 0)) for s in suites)
f = sum(int(s.get("failures", 0)) for s in suites)
e = sum(int(s.get("errors", 0)) for s in suites)
k = sum(int(s.get("skipped", 0)) for s in suites)
print(t - f - e - k, f, e, k)
PY
}

write_summary() {
  {
    echo "# dsnt_cuda GPU check"
    echo
    echo "- started: $START_DATE; updated: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- host: $(hostname)"
    echo "- device: $(cat "$OUT/device.txt" 2>/dev/null | head -n 1 || echo unknown)"
    echo "- torch: $(cat "$OUT/torch_version.txt" 2>/dev/null || echo unknown)"
    echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
    echo
    echo "| step | status | seconds | passed | failed | errors | skipped | log |"
    echo "|---|---|---|---|---|---|---|---|"
    while IFS=$'\t' read -r name st secs counts log; do
      read -r p f e k <<<"$counts"
      echo "| $name | $st | $secs | ${p:--} | ${f:--} | ${e:--} | ${k:--} | $log |"
    done <"$STATUS_FILE"
    echo
    if [ $any_failed -eq 0 ]; then echo "**All steps passed (so far).**"; else echo "**Some steps FAILED.**"; fi
    for log in "$OUT"/sanitizer-*.log; do
      [ -e "$log" ] || continue
      echo
      echo "$(basename "$log"): $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitizer driver:" "$log" | tr '\n' ' ')"
    done
  } >"$OUT/summary.md"
}

# run_step NAME JUNIT(or -) COMMAND...
run_step() {
  local name="$1" junit="$2"
  shift 2
  local log="$OUT/$name.log"
  echo "=== [$name] $(date -u +%H:%M:%S) $*" | tee "$log"
  local t0=$SECONDS
  if declare -F "$1" >/dev/null; then
    # a shell function of this script: run it in a child bash that `timeout` can kill
    timeout --signal=TERM --kill-after=30 "$STEP_TIMEOUT" bash -c "$(declare -f "$1"); $1" >>"$log" 2>&1
  else
    timeout --signal=TERM --kill-after=30 "$STEP_TIMEOUT" "$@" >>"$log" 2>&1
  fi
  local rc=$?
  local secs=$((SECONDS - t0))
  local counts="- - - -"
  if [ "$junit" != "-" ] && [ -f "$junit" ]; then counts="$(junit_counts "$junit")"; fi
  local st="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    st="TIMEOUT"
  elif [ $rc -ne 0 ]; then
    st="FAIL(rc=$rc)"
  fi
  # pytest exit 5 = nothing collected: not a failure of the code under test, but say so
  if [ $rc -eq 5 ] && [ "$junit" != "-" ]; then st="no tests"; fi
  # On this machine the GPU tests must run: all skipped means no GPU or a build without CUDA.
  case "$name" in
    test-cuda | test-triton)
      read -r p_ _ _ k_ <<<"$counts"
      if [ "$st" = ok ] && [ "$p_" = 0 ] && [ "$k_" != 0 ]; then st="ALL SKIPPED"; any_failed=1; fi
      ;;
  esac
  [ "$st" != "ok" ] && [ "$st" != "no tests" ] && any_failed=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$st" "$secs" "$counts" "$(basename "$log")" >>"$STATUS_FILE"
  echo "=== [$name] $st in ${secs}s ($counts: passed failed errors skipped)" | tee -a "$log"
  write_summary
  return 0
}

skip_step() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "skipped: $2" "0" "- - - -" "-" >>"$STATUS_FILE"
  echo "=== [$1] skipped: $2"
  write_summary
}

# ---------------------------------------------------------------------------------------------
"$PYTHON" -c "import torch; print(torch.__version__)" >"$OUT/torch_version.txt" 2>/dev/null ||
  echo "no torch" >"$OUT/torch_version.txt"
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
  echo "no GPU (nvidia-smi failed)") | head -n 1 >"$OUT/device.txt"

if want info; then
  info() {
    date -u
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
    nvcc --version || true
    command -v compute-sanitizer || echo "compute-sanitizer not on PATH"
    "$PYTHON" - <<'PY'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
PY
  }
  run_step info - info
fi

if want build; then
  build() {
    # The in-place build against this machine's torch (a build from another machine cannot be
    # carried over); ninja reuses objects from an earlier run on the same machine.
    "$PYTHON" setup.py build_ext --inplace &&
      "$PYTHON" -c "import dsnt_cuda, json; print(json.dumps(dsnt_cuda.build_info()))"
  }
  run_step build - build
fi

if want test-cuda; then
  run_step test-cuda "$OUT/junit-test-cuda.xml" \
    "$PYTHON" -m pytest -q -rfEs tests/test_ops_cuda.py tests/test_hard_maps.py \
    --junitxml="$OUT/junit-test-cuda.xml"
fi

if want test-triton; then
  if [ -f tests/test_triton_gpu.py ]; then
    run_step test-triton "$OUT/junit-test-triton.xml" \
      "$PYTHON" -m pytest -q -rfEs tests/test_triton_gpu.py --junitxml="$OUT/junit-test-triton.xml"
  else
    skip_step test-triton "tests/test_triton_gpu.py not present"
  fi
fi

# compute-sanitizer may live in the toolkit without being on PATH.
SANITIZER="$(command -v compute-sanitizer 2>/dev/null || true)"
if [ -z "$SANITIZER" ]; then
  for c in "${CUDA_HOME:-/nonexistent}/bin" "${CUDA_HOME:-/nonexistent}/compute-sanitizer" /usr/local/cuda/bin \
    /usr/local/cuda/compute-sanitizer /usr/local/cuda-*/bin /usr/local/cuda-*/compute-sanitizer; do
    if [ -x "$c/compute-sanitizer" ]; then SANITIZER="$c/compute-sanitizer"; break; fi
  done
fi

if want sanitizer; then
  if [ -n "$SANITIZER" ]; then
    # --error-exitcode makes any reported hazard fail the step (memcheck: out-of-bounds and
    # misaligned accesses; racecheck: shared-memory hazards of the block reductions and tables).
    run_step sanitizer-memcheck - "$SANITIZER" --tool memcheck --leak-check no --error-exitcode 3 \
      "$PYTHON" scripts/sanitizer_driver.py
    run_step sanitizer-racecheck - "$SANITIZER" --tool racecheck --racecheck-report hazard \
      --error-exitcode 3 "$PYTHON" scripts/sanitizer_driver.py
    # initcheck also sees PyTorch's own kernels (which may read memory they did not write):
    # informational, its exit status is the driver's.
    run_step sanitizer-initcheck - "$SANITIZER" --tool initcheck "$PYTHON" scripts/sanitizer_driver.py
  else
    skip_step sanitizer "compute-sanitizer not found"
    any_failed=1
  fi
fi

# Not the CUDA emulation (tests/cuda_emulation/): it stands in for a GPU, and its sanitizer builds
# would take minutes of the GPU machine's time.
if want test-rest; then
  run_step test-rest "$OUT/junit-test-rest.xml" \
    "$PYTHON" -m pytest -q -rfE tests --ignore=tests/test_ops_cuda.py --ignore=tests/test_triton_gpu.py \
    --ignore=tests/test_hard_maps.py --ignore=tests/test_triton_interpreter.py \
    --ignore=tests/test_cuda_emulator.py --ignore=tests/test_cuda_emulated.py \
    --ignore=tests/test_cuda_emulated_sanitized.py --junitxml="$OUT/junit-test-rest.xml"
fi

if want bench; then
  if [ -f bench/run.py ]; then
    # shellcheck disable=SC2086
    run_step bench - "$PYTHON" -m bench.run ${BENCH_ARGS:---device cuda --full} --out "$OUT/bench"
  else
    skip_step bench "bench/run.py not present"
  fi
fi

write_summary
echo
cat "$OUT/summary.md"
exit $any_failed
