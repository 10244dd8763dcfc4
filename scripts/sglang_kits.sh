#!/usr/bin/env bash
# SGLang's own server test kits on the bundled pair, without speculation and with DFLASH, then the comparison
# table (docs/compatibility.md's "kits" section is pasted from its output). About 20 minutes on 2 cores.
#   bash scripts/sglang_kits.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${1:-runs/sglang_kits}
mkdir -p "$OUT"
for cls in TestKitsNoSpeculation TestKitsDflash; do
  echo "[kits] $cls"
  "$VENV/bin/python" -m pytest -q -m slow -p no:cacheprovider "tests/test_sglang_kits.py::$cls" \
    --junitxml "$OUT/$cls.xml" -o junit_family=xunit1 >"$OUT/$cls.log" 2>&1
  tail -3 "$OUT/$cls.log"
done
"$VENV/bin/python" scripts/kits_table.py "$OUT/TestKitsNoSpeculation.xml" "$OUT/TestKitsDflash.xml"
