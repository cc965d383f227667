#!/usr/bin/env bash
# Deletes the TPU VM, without asking. Its disks go with it, and so does
# every work directory on them: fetch what you need first (fetch.sh).
#
#   bash scripts/tpu/delete.sh
#   TPU_NAME=other ZONE=europe-west4-a bash scripts/tpu/delete.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
[[ $# -eq 0 ]] || usage

gcloud_tpu delete "$TPU_NAME" --quiet
