#!/usr/bin/env bash
# The GPU check (docs/GPU.md): parity, decode step time beside the HBM floor, alpha and a short served
# run on one GPU, within 8 minutes; without a GPU, the CPU-checkable parts (it says what it skipped).
#   bench/gpu_check.sh [--out DIR] [--budget-s SECONDS]
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). Nothing is
# downloaded: if APTSERVE_WHEELS names a folder of wheels, missing packages are installed from it offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${APTSERVE_WHEELS:-}" ]; then
    "$PY" -m pip install --quiet --no-index --find-links "$APTSERVE_WHEELS" pydantic pyyaml safetensors tqdm numpy
fi
missing=$("$PY" -c '
import importlib.util as u
print(" ".join(m for m in ("torch", "triton", "numpy", "pydantic", "yaml", "safetensors", "tqdm") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
    echo "gpu_check: $PY lacks: $missing (install them, or point APTSERVE_WHEELS at a folder of wheels)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no GPU here: running the CPU-checkable parts only (the triton backend under its interpreter)"
    export TRITON_INTERPRET=1
fi
exec timeout 480 "$PY" -m bench.gpu_check "$@"
