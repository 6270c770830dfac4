#!/bin/bash
# Run the same command on every worker (host) of a Cloud TPU VM pod slice.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a tpu_gpu_launch/tpu_pod.sh \
#       python -m jaxcourse.ch9 --config=configs/ch9_layouts.py:gpu --workdir=/mnt/shared/ch9
#
# SETUP=1 first copies this checkout (without .venv and runs/) to ~/$REPO_DIR on every worker
# and installs it with jax[tpu]. Each worker then runs the command with
# JAXCOURSE_DISTRIBUTED=auto: jax.distributed.initialize() learns the coordinator, the worker
# count and this worker's index from the TPU metadata server. Every worker must run the
# command (collectives wait for all of them); --workdir must be a filesystem all workers
# share (e.g. a Filestore mount), because each writes its own checkpoint shards.
# Environment: TPU_NAME, ZONE (required); PROJECT, REPO_DIR (default jaxcourse), SETUP.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
if [ "$#" -eq 0 ]; then
  echo "usage: TPU_NAME=... ZONE=... tpu_gpu_launch/tpu_pod.sh COMMAND [ARGS...]" >&2
  exit 2
fi
REPO_DIR="${REPO_DIR:-jaxcourse}"
GCLOUD=(gcloud compute tpus tpu-vm)
FLAGS=(--zone "$ZONE" --worker=all)
if [ -n "${PROJECT:-}" ]; then
  FLAGS+=(--project "$PROJECT")
fi
if [ "${SETUP:-0}" = "1" ]; then
  archive="$(mktemp -d)/jaxcourse.tgz"
  tar --exclude=.venv --exclude=runs --exclude=.git -czf "$archive" -C "$(dirname "$0")/.." .
  "${GCLOUD[@]}" scp "$archive" "$TPU_NAME":jaxcourse.tgz "${FLAGS[@]}"
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${FLAGS[@]}" --command \
    "mkdir -p ~/$REPO_DIR && tar -xzf ~/jaxcourse.tgz -C ~/$REPO_DIR && cd ~/$REPO_DIR && pip install -q -e . 'jax[tpu]'"
fi
cmd="$(printf '%q ' "$@")"
"${GCLOUD[@]}" ssh "$TPU_NAME" "${FLAGS[@]}" --command \
  "cd ~/$REPO_DIR && JAXCOURSE_DISTRIBUTED=auto $cmd"
