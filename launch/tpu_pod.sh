#!/usr/bin/env bash
# Run one llama2_jax command on every host of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE -- python -m llama2_jax train \
#       --config=configs/pretrain.py:7b --workdir=gs://BUCKET/runs/7b
#
# Every host gets the same command in a checkout of this repository at REPO_DIR (default: the
# same path as here); jax.distributed detects the pod itself. Setup, once per pod:
#   launch/tpu_pod.sh TPU_NAME ZONE -- pip install -r requirements.txt "jax[tpu]"
set -euo pipefail
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 TPU_NAME ZONE -- COMMAND..." >&2
  exit 2
fi
tpu_name=$1
zone=$2
shift 3
repo_dir=${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
printf -v remote_command '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all \
  --command="cd $(printf '%q' "$repo_dir") && $remote_command"
