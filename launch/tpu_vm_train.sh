#!/usr/bin/env bash
# Start training on every host of a Cloud TPU VM slice (hosts find each other automatically).
# Usage: launch/tpu_vm_train.sh TPU_NAME ZONE configs/NAME.py gs://BUCKET/RUN [--config.KEY=VALUE ...]
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; CONFIG=${3:?config file}; WORKDIR=${4:?work directory}; shift 4
EXTRA=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/dit_jax && . .venv/bin/activate && python -m dit_jax.train --config $CONFIG --workdir $WORKDIR $EXTRA"
