#!/usr/bin/env bash
# Copy this checkout to every host of a Cloud TPU VM slice and install dit_jax with the TPU extra.
# Usage: launch/tpu_vm_setup.sh TPU_NAME ZONE
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$ROOT" --exclude=.venv --exclude=.git --exclude=runs -czf /tmp/dit_jax_src.tgz .
gcloud compute tpus tpu-vm scp /tmp/dit_jax_src.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  'mkdir -p ~/dit_jax && tar -xzf /tmp/dit_jax_src.tgz -C ~/dit_jax && cd ~/dit_jax &&
   python3 -m venv .venv && . .venv/bin/activate && pip install -q -e ".[tpu]"'
