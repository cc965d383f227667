#!/usr/bin/env bash
# Copies a work directory back to this machine, into DEST/NAME where NAME
# is the work directory's last component: from worker 0 of the TPU VM, or
# from Cloud Storage if WORKDIR is a gs:// path.
#
#   bash scripts/tpu/fetch.sh WORKDIR DEST
#   bash scripts/tpu/fetch.sh runs/swap_fashion_mnist runs/tpu
#
# WORKDIR is as given to run.sh: relative to the checkout on the workers,
# or absolute. Worker 0 holds config.json, metrics.jsonl, tensorboard/ and
# summary.json of every run; the checkpoints of a run over several hosts
# are complete only in a shared (gs://) work directory.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
[[ $# -eq 2 ]] || usage

workdir="${1%/}"
dest="$2"
mkdir -p "$dest"
if [[ $workdir == gs://* ]]; then
  gcloud storage rsync --recursive "$workdir" "$dest/$(basename "$workdir")"
else
  gcloud_tpu scp --recurse "$TPU_NAME:$(remote_path "$workdir")" "$dest" \
    --worker=0
fi
