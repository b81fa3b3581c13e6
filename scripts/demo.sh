#!/usr/bin/env bash
# Set up (if needed) and run the ~10 minute demo: GreenTrainer on SciTLDR with the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
greentrainer train "$@"
