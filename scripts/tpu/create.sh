#!/usr/bin/env bash
# Creates the TPU VM: one VM for each host of the slice, all with the same
# name and told apart by worker number.
#
#   bash scripts/tpu/create.sh
#   SPOT=1 ACCELERATOR_TYPE=v4-32 bash scripts/tpu/create.sh
#
# SPOT=1 asks for a Spot VM: much cheaper, but it can be preempted at any
# time, and a preempted one cannot be restarted: delete it and create it
# again. The other settings are described in common.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
[[ $# -eq 0 ]] || usage

spot=()
[[ ${SPOT:-0} == 1 ]] && spot=(--spot)
gcloud_tpu create "$TPU_NAME" \
  --accelerator-type="$ACCELERATOR_TYPE" \
  --version="$RUNTIME_VERSION" \
  ${spot[@]+"${spot[@]}"}
