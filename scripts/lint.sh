#!/usr/bin/env bash
# One lint gate, run the same way by developers and CI: ruff, then mypy, both over the whole tree.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
"$BIN/ruff" check shared model_runtime services migrations tests bench
"$BIN/mypy" shared model_runtime services migrations tests bench --no-error-summary
