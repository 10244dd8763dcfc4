#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install sglang-dflash with its test tools into it.
#   bash scripts/setup.sh            -> .venv in the repository root
#   VENV=/path bash scripts/setup.sh -> a virtualenv elsewhere
# sglang==0.5.23 brings torch 2.14.1 and transformers 5.19.0: about 11 GB, a few minutes the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "[setup] installing sglang-dflash (editable) with test dependencies into $VENV"
"$VENV/bin/python" -m pip install --quiet -e '.[test]'
"$VENV/bin/python" -c "import sglang, torch, sglang_dflash; print('[setup] ok: sglang', sglang.__version__, 'torch', torch.__version__, 'sglang-dflash', sglang_dflash.__version__)"
