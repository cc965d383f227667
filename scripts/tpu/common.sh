# shellcheck shell=bash
# Settings shared by the scripts in this folder, and their helpers; sourced
# by them, not run. Every setting can be given in the environment:
#
#   TPU_NAME          name of the TPU VM                  (jaxswap)
#   ZONE              zone that has the accelerator type   (us-central2-b)
#   ACCELERATOR_TYPE  version-chips; v4-8 is one host      (v4-8)
#   RUNTIME_VERSION   TPU software version                 (tpu-ubuntu2204-base)
#   PROJECT           Google Cloud project       (gcloud's configured one)
#   BUCKET            a Cloud Storage bucket for work directories (none)
#   REMOTE_DIR        the checkout on each worker, under ~ (jaxswap)
#   PYTHON_VERSION    Python of the checkout's .venv       (3.11)
#
# tpu-ubuntu2204-base suits v4 and older; v5e wants v2-alpha-tpuv5-lite,
# v5p v2-alpha-tpuv5 and v6e v2-alpha-tpuv6e.

TPU_NAME="${TPU_NAME:-jaxswap}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"
BUCKET="${BUCKET:-}"
BUCKET="${BUCKET#gs://}"
REMOTE_DIR="${REMOTE_DIR:-jaxswap}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"

# The comment block at the top of the calling script, then exit 2.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' \
    "$0" >&2
  exit 2
}

if ! command -v gcloud >/dev/null; then
  echo "gcloud not found: install the Google Cloud CLI first" >&2
  exit 1
fi

# gcloud compute tpus tpu-vm VERB ARGS..., in the zone and project above.
gcloud_tpu() {
  local verb="$1"
  shift
  gcloud compute tpus tpu-vm "$verb" "$@" --zone="$ZONE" \
    ${PROJECT:+"--project=$PROJECT"}
}

# Runs one shell command line on every worker of the TPU VM at once.
on_all_workers() {
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

# A work directory as the workers see it: relative paths are inside the
# checkout; absolute and gs:// paths are left as they are.
remote_path() {
  case "$1" in
    /* | gs://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$REMOTE_DIR" "$1" ;;
  esac
}

# The argument quoted for the workers' shell (bash).
q() {
  printf '%q' "$1"
}
