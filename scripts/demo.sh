#!/usr/bin/env bash
# Install what is missing, then run the main job: a Child-Sum Tree-LSTM over the Python
# standard library's function ASTs (data every machine has), batched with dynbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[examples]"
exec "$PY" examples/ast_treelstm.py "$@"
