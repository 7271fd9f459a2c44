#!/usr/bin/env bash
# One prepared GPU check (≤ 8 minutes on one GPU): writes ${OUT:-benchmarks/gpu/out}/gpu_check.json.
#   bash benchmarks/gpu/check.sh            # on a CUDA machine
#   bash benchmarks/gpu/check.sh --tiny     # toy size on CPU (what the test suite runs)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR="${OUT:-benchmarks/gpu/out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" timeout "${CHECK_TIMEOUT_S:-480}" \
    "$PY" benchmarks/gpu/check.py --out "$OUT_DIR/gpu_check.json" "$@"
