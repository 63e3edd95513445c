#!/usr/bin/env bash
# Runs scripts/torch-bench.py (transformers' PaliGemma 2 in bf16 on random weights,
# stage by stage) in a virtual environment at target/torch-venv holding the versions of
# tests/reference/requirements.txt, made on first use (torch from PyPI, about 3 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/torch-venv
if ! "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet -r tests/reference/requirements.txt
fi
exec "$venv/bin/python" scripts/torch-bench.py "$@"
