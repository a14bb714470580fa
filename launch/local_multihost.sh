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
# The coordinator's port: one the kernel says is free, held until this script exits (reserve_port.py;
# a port found free and let go could be another job's by the time process 0 binds it).
if ! read -r port < <(python3 "$(dirname "$0")/reserve_port.py"); then
  echo "$0: could not reserve a port for the coordinator (python3 launch/reserve_port.py)" >&2
  exit 1
fi
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
