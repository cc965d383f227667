#!/usr/bin/env bash
# Runs every benchmark at its default (small) size, writing a Markdown table
# to the terminal and JSON under $OUT. About 20 minutes on 2 cores.
#
#   bash scripts/bench/run_all.sh            # JSON in runs/bench/
#   OUT=/tmp/bench bash scripts/bench/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-runs/bench}"
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
python -c 'import torch' 2>/dev/null ||
  echo "torch is missing: pip install -e '.[bench]' for the PyTorch side"

run() {
  local name="$1"; shift
  echo "==== $name: $*"
  local start=$SECONDS
  python "scripts/bench/$name.py" --out "$OUT/$name.json" "$@" \
    2>&1 | tee "$OUT/$name.log" | grep -v -i 'warning' || true
  echo "==== $name took $((SECONDS - start)) s"
}

run train_step_vs_torch
run replicas
run capsules
run scaling
run gpu
