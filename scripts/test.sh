#!/usr/bin/env bash
# Install what is missing, then run the test suite. Safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# A plain `torch` requirement with no torch installed would pull a multi-GB CUDA build;
# install the pinned CPU wheel explicitly, and only when torch is missing.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
exec "$PY" -m pytest -q "$@"
