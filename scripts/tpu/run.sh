#!/usr/bin/env bash
# Runs one training job on every worker of the TPU VM at once: the same
# `python -m jaxswap.main --config CONFIG --workdir WORKDIR --distributed
# FLAG...` on each, which find one another by themselves.
#
#   bash scripts/tpu/run.sh CONFIG [WORKDIR] [FLAG...]
#   bash scripts/tpu/run.sh configs/swap_fashion_mnist.py runs/fmnist \
#       --config.phase2.replicas=8
#   DETACH=1 bash scripts/tpu/run.sh configs/swap_fashion_mnist.py
#
# CONFIG is a path in the repository, as in its README. WORKDIR is relative
# to the checkout on the workers (or absolute); without it, it is
# runs/NAME, NAME from CONFIG's file name. Rerunning with the same WORKDIR
# resumes from its newest checkpoint.
#
# The job runs in the foreground: its output comes here, and Ctrl-C or a
# dropped connection can end it (rerun to resume). DETACH=1 starts it
# under nohup instead and returns; its output goes to LOG on each worker
# (default WORKDIR.log, beside the work directory).
#
# Each worker writes to its own disk. On a slice with one host (v4-8) that
# is the whole run; with several hosts (v4-16 and up) each keeps its own
# part, and the checkpoints of such a run resume only from a path that
# all of them share, such as a gs:// bucket, which the trainer does not
# take yet (see README.md here).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
[[ $# -ge 1 && $1 != -* ]] || usage

config="$1"
shift
if [[ $# -ge 1 && $1 != -* ]]; then
  workdir="$1"
  shift
else
  name="$(basename "$config")"
  name="${name%%:*}"
  name="${name%.py}"
  if [[ -n $BUCKET ]]; then
    workdir="gs://$BUCKET/runs/$name"
  else
    workdir="runs/$name"
  fi
fi

# The trainer opens its work directory with local file operations, so a
# gs:// path would become a local folder named 'gs:'.
if [[ $workdir == gs://* ]]; then
  echo "run.sh: $workdir: the trainer cannot write to gs:// yet;" \
    "give a WORKDIR on the VM's disk (and unset BUCKET)" >&2
  exit 2
fi

train=".venv/bin/python -m jaxswap.main"
for arg in --config="$config" --workdir="$workdir" --distributed "$@"; do
  train+=" $(q "$arg")"
done

echo "Work directory on the workers: $(remote_path "$workdir")"
if [[ ${DETACH:-0} == 1 ]]; then
  log="${LOG:-${workdir%/}.log}"
  shown="$(remote_path "$log")"
  # shellcheck disable=SC2088  # Shown, not expanded.
  [[ $shown == /* ]] || shown="~/$shown"
  # Only nohup itself goes to the background, holding none of ssh's
  # streams, so that ssh returns at once.
  on_all_workers "set -e
cd $(q "$REMOTE_DIR")
mkdir -p $(q "$(dirname "$log")")
nohup $train >> $(q "$log") 2>&1 < /dev/null &
echo \"\$(hostname): started\""
  echo "Output in $shown on each worker."
else
  on_all_workers "cd $(q "$REMOTE_DIR") && exec $train"
fi
