#!/usr/bin/env bash
# Puts this repository on every worker of the TPU VM, in ~/REMOTE_DIR, and
# installs it there with JAX for TPU (pip install -e . 'jax[tpu]') into
# ~/REMOTE_DIR/.venv. Rerun it after changing the code.
#
#   bash scripts/tpu/install.sh
#   REPO_URL=https://github.com/you/jaxswap.git bash scripts/tpu/install.sh
#
# Without REPO_URL it copies a `git archive` of REF (default HEAD) of the
# local clone: commit what you want to run, since uncommitted changes are
# not copied. With REPO_URL each worker clones (or fetches) that
# repository itself and checks out REF (default origin/HEAD).
#
# JAX needs Python 3.11 or newer and the TPU images have 3.10, so the
# .venv is made by uv with PYTHON_VERSION (default 3.11), which uv
# downloads. It also tries to apt-get the Debian package
# dataset-fashion-mnist, which the Fashion-MNIST configs read by default.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
[[ $# -eq 0 ]] || usage

dir="$(q "$REMOTE_DIR")"
if [[ -n ${REPO_URL:-} ]]; then
  ref="$(q "${REF:-origin/HEAD}")"
  get_code="{ [ -d $dir/.git ] || git clone -q $(q "$REPO_URL") $dir; }"
  get_code+=" && git -C $dir fetch -q origin"
  get_code+=" && git -C $dir checkout -q $ref"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  tarball="$tmp/jaxswap-src.tar.gz"
  root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
  git -C "$root" archive --format=tar.gz -o "$tarball" "${REF:-HEAD}"
  gcloud_tpu scp "$tarball" "$TPU_NAME:" --worker=all
  # Unpacked over the old checkout, keeping its .venv and runs/.
  get_code="mkdir -p $dir && tar -xzf jaxswap-src.tar.gz -C $dir"
  get_code+=" && rm jaxswap-src.tar.gz"
fi

# shellcheck disable=SC2016  # $HOME is the worker's.
uv='"$HOME/.local/bin/uv"'
on_all_workers "set -e
$get_code
cd $dir
python3 -m pip install -q --user --upgrade uv
$uv venv -q --allow-existing --python $(q "$PYTHON_VERSION") .venv
$uv pip install -q --python .venv/bin/python -e . 'jax[tpu]'
{ sudo apt-get -qq update && sudo apt-get -qq install -y \
    dataset-fashion-mnist; } >/dev/null 2>&1 ||
  echo 'dataset-fashion-mnist not installed: for Fashion-MNIST pass' \
    '--config.data.source=tfds to run.sh'
.venv/bin/python -c 'import jax, jaxswap; print(\"jax\", jax.__version__)'"
