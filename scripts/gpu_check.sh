#!/usr/bin/env bash
# The prepared GPU check (needs only torch and Triton; no SGLang, no network). Finishes in a few minutes.
#   on the lent GPU machine:  OUT=$OUT bash scripts/gpu_check.sh
#   here, to check the script: OUT=/tmp/gpu_check bash scripts/gpu_check.sh --dry-run   (tiny shapes, CPU)
# Writes $OUT/kernel_sweep.txt, $OUT/gpu_check.json and $OUT/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi
if [[ "${1:-}" == "--dry-run" ]]; then
  TRITON_INTERPRET=1 "$PY" tests/kernel_cases.py | tee "$OUT/kernel_sweep.txt"
  TRITON_INTERPRET=1 OUT="$OUT" "$PY" scripts/gpu_check.py --dry-run
else
  "$PY" tests/kernel_cases.py --full --cuda | tee "$OUT/kernel_sweep.txt"
  OUT="$OUT" "$PY" scripts/gpu_check.py
fi
