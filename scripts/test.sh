#!/usr/bin/env bash
# The test command: the CPU suite (slow checks excluded; run them with `-m slow`).
# pytest exits 5 when it collects nothing: that is a failure here too.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/python" -m pytest -q -m "not slow" "$@" tests
rc=$?
if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
exit "$rc"
