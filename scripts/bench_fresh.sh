#!/usr/bin/env bash
# Run the benchmark with whatever python is at hand, on a machine that may lack dsntnn, git or a
# venv (the GPU machine: its own python3, no network). Arguments go to `python -m bench.run`.
#
#   bash scripts/bench_fresh.sh --device cuda --full --out "$OUT"
#   PYTHON=.venv/bin/python bash scripts/bench_fresh.sh --device cpu
#
# - dsntnn is pure Python: where it is not importable but a copy travelled with the tree
#   (carry .venv/lib/python3.11/site-packages/dsntnn), that copy alone is put on PYTHONPATH
#   (not the whole site-packages, whose compiled torch belongs to another Python).
# - the git commit is taken from DSNT_BENCH_COMMIT when the tree has no .git (pass it in).
# - the plots follow when matplotlib is there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
    PYTHON="$ROOT/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi

if ! "$PYTHON" -c "import dsntnn" 2>/dev/null; then
  carried="$(ls -d "$ROOT"/.venv/lib/python3*/site-packages/dsntnn 2>/dev/null | head -n1 || true)"
  if [ -n "$carried" ]; then
    shim="$(mktemp -d)"
    trap 'rm -rf "$shim"' EXIT
    cp -r "$carried" "$shim/"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "bench_fresh: dsntnn from $carried"
  fi
fi

"$PYTHON" -m bench.run "$@"

out="$ROOT/bench/results"
prev=""
for arg in "$@"; do
  if [ "$prev" = "--out" ]; then out="$arg"; fi
  case "$arg" in --out=*) out="${arg#--out=}" ;; esac
  prev="$arg"
done
"$PYTHON" -m bench.plot --csv "$out/results.csv" || echo "bench_fresh: no plots"
