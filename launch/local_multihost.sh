#!/usr/bin/env bash
# Several JAX processes on this machine, as if each were a host of a pod: the multi-host code
# paths (per-process data shards, global arrays, collective checkpoints) without a cluster.
#
#   launch/local_multihost.sh [PROCESSES] [DEVICES_PER_PROCESS] -- python -m llama2_jax train \
#       --config=configs/pretrain.py:tiny --workdir=runs/multihost --config.train.steps=50
#
# Each process sees DEVICES_PER_PROCESS simulated CPU devices; collectives go over gloo.
set -euo pipefail
processes=${1:-2}
devices=${2:-4}
shift $(( $# >= 2 ? 2 : $# ))
[ "${1:-}" = "--" ] && shift
if [ $# -eq 0 ]; then
  echo "usage: $0 [PROCESSES] [DEVICES_PER_PROCESS] -- COMMAND..." >&2
  exit 2
fi
port=$(( 20000 + RANDOM % 20000 ))
pids=()
for ((id = 0; id < processes; id++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" \
  JAX_NUM_PROCESSES="${processes}" \
  JAX_PROCESS_ID="${id}" \
    "$@" > >(sed "s/^/[process ${id}] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
