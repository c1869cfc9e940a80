#!/usr/bin/env bash
# make cuda-report: static SASS counts of every CUDA kernel and the launch plans of the benchmark
# shapes, from the built extension (no GPU needed). See bench/README.md ("SASS counts").
#
#   - the production kernels of the built extension (dsnt_cuda/_C*.so, sm_90): the standard-loss
#     kernels (softmax + JS) as they run, and the kernel for every other mode (labelled "any");
#   - probe builds of every other normalization x regularizer, float32 (cached under
#     build/sass_probes/; CUDA_REPORT_PROBES=0 skips them: each takes minutes on 2 cores);
#   - the Triton kernels' rows when scripts/sass_triton.py exists;
#   - bench/results/cuda_sass.csv with all the rows, then the launch plans.
# Exit status: non-zero when a tool or build fails, or a standard-loss kernel is over budget.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
CSV="${CUDA_REPORT_CSV:-bench/results/cuda_sass.csv}"
PROBES=()
[ "${CUDA_REPORT_PROBES:-1}" != "0" ] && PROBES=(--probes)

status=0
echo "== SASS per element (sm_90, $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1))"
"$PYTHON" scripts/sass_count.py "${PROBES[@]}" --csv "$CSV" || status=1
if [ -f scripts/sass_triton.py ]; then
  echo
  echo "== Triton kernels (scripts/sass_triton.py)"
  if "$PYTHON" scripts/sass_triton.py --csv "$CSV.triton"; then
    tail -n +2 "$CSV.triton" >> "$CSV"  # the same columns; its header dropped
  else
    status=1
  fi
  rm -f "$CSV.triton"
fi
echo
echo "== Launch plans (H100 / H200 model: 132 SMs; registers from the disassembly)"
"$PYTHON" scripts/launch_plans.py || status=1
echo
echo "wrote $CSV"
exit $status
