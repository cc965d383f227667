#!/usr/bin/env bash
# Runs every benchmark at a small size (about half an hour on a quiet
# 2-core machine, more under load): a Markdown table of each on the
# terminal, and its JSON and full log under $OUT. Each script's own
# defaults are larger; see docs/benchmarks.md for what they measured.
#
#   bash scripts/bench/run_all.sh             # JSON and logs in runs/bench/
#   OUT=/tmp/bench bash scripts/bench/run_all.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-runs/bench}"
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
python -c 'import torch' 2>/dev/null ||
  echo "torch is not installed (pip install -e '.[bench]'): no PyTorch side"

failed=()
run() {
  local name="$1"
  shift
  echo "==== $name $*"
  local start=$SECONDS
  python "scripts/bench/$name.py" --out "$OUT/$name.json" "$@" 2>&1 |
    tee "$OUT/$name.log" | grep -v -i -e 'warning' -e '^ *warnings\.'
  local status=${PIPESTATUS[0]}
  echo "==== $name: exit $status after $((SECONDS - start)) s"
  [[ $status == 0 ]] || failed+=("$name")
}

run train_step_vs_torch --batch 256 --xla_batch 128 \
  --conv_configs 1.0:32x32x3:32 0.25:28x28x1:128
run replicas --batch 64 --rss_devices
run capsules
run scaling --batches 128
run gpu
if ((${#failed[@]})); then
  echo "failed: ${failed[*]} (their logs are in $OUT)"
  exit 1
fi
