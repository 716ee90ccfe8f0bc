#!/usr/bin/env bash
# Run N training processes on this machine over 127.0.0.1 (2 CPU devices each): the multi-host code path.
# Usage: launch/local_multiprocess.sh N configs/NAME.py WORKDIR [--config.KEY=VALUE ...]
set -euo pipefail
N=${1:?number of processes}; CONFIG=${2:?config file}; WORKDIR=${3:?work directory}; shift 3
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2 python -m dit_jax.train --config "$CONFIG" --workdir "$WORKDIR" \
    --coordinator_address "127.0.0.1:$PORT" --num_processes "$N" --process_id "$i" "$@" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
wait "${pids[@]}"
