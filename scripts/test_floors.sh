#!/usr/bin/env bash
# Install every version floor of pyproject.toml exactly ("name>=X" -> "name==X", build backend included) in a
# fresh .venv-floors, then run the fast tests there (all but tests/test_bench_smoke.py; pytest arguments
# replace that selection) and load the real default model's GGUF if it is in the model cache.
#
#   bash scripts/test_floors.sh                      # fast tests at the floors
#   bash scripts/test_floors.sh tests/test_flops.py  # a subset
#
# torch: the floor (2.6, fixed for CVE-2025-32434) is installed from the CPU index (TORCH_INDEX_URL, default
# https://download.pytorch.org/whl/cpu) when that is reachable. Where it is not, as on the machine these floors
# were checked on (PyPI only), torch==2.6.0 exists only as a CUDA build of several GB, so the script installs
# torch==${FLOORS_TORCH_FALLBACK:-2.13.0} instead (a CPU wheel on that machine) and says so.
#
# Last outcome (2026-11-27, x86_64, Python 3.11.7, 2 shared CPU cores, run under nice -n 19):
#   installed transformers==5.19.0 peft==0.21.2 accelerate==1.3.0 gguf==0.10.0 rouge_score==0.1.2 pytest==7.0.0
#   scipy==1.9.2 (pip resolved numpy 1.25.2 for it), setuptools==77.0.3 as the build backend, and torch==2.13.0+cpu,
#   not the 2.6 floor (the CPU index was unreachable); pip check OK; fast tests: 418 passed (18 warnings: scipy 1.9
#   hands HiGHS the mip_rel_gap option verbatim, numpy 1.25 deprecations); the default model's GGUF loaded at the
#   floors (config, dequantised weights, finite logits). Whole script: 4 min. Re-checked after the Accelerate
#   engine (commit aedf452) landed: tests/test_precision.py, test_distributed.py, test_training.py: 42 passed.
#   Floors raised by earlier runs: transformers 4.56 -> 5.19 (4.56: 39 failures, nearly all a forward on the meta
#   device failing under torch 2.13, as in 5.0; 5.4: 2 failures, rotary angles computed with a matmul break the
#   exact FLOPs counts, and the source keeps that matmul up to 5.18), peft 0.19 -> 0.21.2 (with transformers 5.19,
#   T5 LoRA/DoRA/prefix fail on 0.19: AttributeError _prepare_encoder_decoder_kwargs_for_generation, which
#   transformers dropped in 5.18; by the source 0.21.1 still uses it), accelerate 0.34 -> 1.3 (the Trainer's
#   unwrap_model(keep_torch_compile=...); the callback test fails on 1.2.1), scipy 1.9 -> 1.9.2 (first with a
#   CPython 3.11 wheel), setuptools 68 -> 77.0.3 (77 for the SPDX licence; torch 2.13 requires >= 77.0.3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FLOORS_VENV:-.venv-floors}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}

rm -rf "$VENV"
"$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --disable-pip-version-check --upgrade pip
python -c "import tomllib" 2>/dev/null || python -m pip install -q --disable-pip-version-check tomli  # Python 3.10

# The floors, read from pyproject.toml: runtime dependencies, every extra, and the build system.
python - > "$VENV/floors.txt" <<'EOF'
import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    py = tomllib.load(f)
reqs = list(py["project"]["dependencies"]) + list(py["build-system"]["requires"])
for extra in py["project"].get("optional-dependencies", {}).values():
    reqs += extra
for r in reqs:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*", r)
    if m:
        print(f"{m.group(1)}=={m.group(2)}")
EOF
TORCH_FLOOR=$(sed -n 's/^torch==//p' "$VENV/floors.txt")
echo "floors: $(grep -v '^torch==' "$VENV/floors.txt" | tr '\n' ' ')torch==$TORCH_FLOOR"

reachable() {  # the host of a URL accepts a connection within 5 s
  python - "$1" <<'EOF'
import socket, sys, urllib.parse
try:
    u = urllib.parse.urlsplit(sys.argv[1])
    socket.create_connection((u.hostname, u.port or (80 if u.scheme == "http" else 443)), timeout=5).close()
except OSError:
    sys.exit(1)
EOF
}
if reachable "$TORCH_INDEX_URL"; then
  TORCH_USED=$TORCH_FLOOR
  pip install -q --disable-pip-version-check "torch==$TORCH_USED" --index-url "$TORCH_INDEX_URL"
else
  TORCH_USED=${FLOORS_TORCH_FALLBACK:-2.13.0}
  echo "note: $TORCH_INDEX_URL is unreachable; torch==$TORCH_FLOOR is a multi-GB CUDA build on PyPI," \
       "so torch==$TORCH_USED is tested instead of the torch floor"
  pip install -q --disable-pip-version-check "torch==$TORCH_USED"
fi

# Everything else at its floor (constraints), unfloored dependencies as pip resolves them; the package is
# built by the floor setuptools (no build isolation).
{ grep -v '^torch==' "$VENV/floors.txt"; echo "torch==$(python -c 'import torch; print(torch.__version__)')"; } \
  > "$VENV/constraints.txt"
pip install -q --disable-pip-version-check -c "$VENV/constraints.txt" \
  "$(grep '^setuptools==' "$VENV/floors.txt")"
pip install -q --disable-pip-version-check --no-build-isolation -c "$VENV/constraints.txt" -e ".[test]"
python -m pip check
pip freeze --exclude-editable > "$VENV/freeze.txt"
echo "installed: $(grep -iE '^(torch|transformers|peft|accelerate|gguf|rouge.score|pytest|scipy|setuptools|numpy)==' \
  "$VENV/freeze.txt" | tr '\n' ' ')"

if [ $# -eq 0 ]; then set -- tests/ --ignore=tests/test_bench_smoke.py; fi
python -m pytest -q -p no:cacheprovider "$@"

# The real default model through gguf and transformers at their floors (config, dequantised weights, a forward).
GGUF=$(python -m greentrainer.model_files --check 2>/dev/null || true)
if [ -f "$GGUF" ]; then
  CACHE=$(mktemp -d)
  mkdir -p "$CACHE/gguf" && ln -s "$GGUF" "$CACHE/gguf/"
  GREENTRAINER_CACHE=$CACHE python - <<'EOF'
import torch
from greentrainer.models import load_config, load_model
cfg = load_config("smollm2-135m")
model, tok = load_model("smollm2-135m")
x = tok("The cat sat on the mat.", return_tensors="pt")
with torch.no_grad():
    logits = model(**x).logits
assert torch.isfinite(logits).all() and cfg.num_hidden_layers == model.config.num_hidden_layers
print(f"default model at the floors: {cfg.model_type}, {cfg.num_hidden_layers} layers, "
      f"{sum(p.numel() for p in model.parameters())} parameters, finite logits")
EOF
  rm -rf "$CACHE"
else
  echo "note: the default model's GGUF is not in the model cache; skipped loading it (run scripts/setup.sh)"
fi
echo "floors OK (torch $TORCH_USED)"
