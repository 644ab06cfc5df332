#!/usr/bin/env bash
# Runs pudnet_jax on a Cloud TPU VM (one host, or every host of a pod slice). From the repo root
# on your workstation (gcloud configured):
#
#   export TPU_NAME=my-tpu ZONE=us-central2-b          # the TPU VM / pod slice
#   bash launch/tpu_vm.sh setup                        # copy this checkout + install, all workers
#   bash launch/tpu_vm.sh data                         # optional: copy ../shared/data/*.npz
#   bash launch/tpu_vm.sh train --config=configs/intra.py:size=gpu \
#       --config.data.tasks_per_batch=16 --workdir=/mnt/shared/runs/intra_omniglot
#   bash launch/tpu_vm.sh stop                         # kill a run left behind (frees the TPU)
#
# `train ARGS` runs `python -m pudnet_jax.main --distributed=on ARGS` on every worker at once
# (gcloud ... ssh --worker=all): the same command on all hosts, as JAX's multi-controller model
# wants. jax.distributed.initialize() finds the other workers from the TPU metadata.
#
# Requirements of a multi-host run (a single-host TPU VM needs none of this):
# - --workdir must be one directory that every worker sees (a Filestore NFS mount, or a GCS
#   bucket mounted with gcsfuse): all processes write their shards of each Orbax checkpoint
#   there, and process 0 writes config.json, metrics.jsonl and results.json.
# - data.tasks_per_batch must be a multiple of the number of TPU devices (jax.device_count()).
# - the datasets on every worker: `data` copies the .npz files to ~/pudnet_data (used through
#   PUDNET_DATA_DIR); otherwise TFDS downloads them on each worker.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR=${REMOTE_DIR:-pudnet_jax}  # relative to the remote home
DATA_DIR=${DATA_DIR:-../shared/data}
SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
SCP=(gcloud compute tpus tpu-vm scp --zone="$ZONE" --worker=all)

cmd=${1:-}
shift || true
case "$cmd" in
  setup)
    # The committed tree (git archive: no runs/, no caches). Commit first to ship local edits.
    archive=$(mktemp /tmp/pudnet_jax.XXXXXX.tgz)
    git archive --format=tar.gz -o "$archive" HEAD
    "${SCP[@]}" "$archive" "$TPU_NAME:pudnet_jax.tgz"
    rm -f "$archive"
    "${SSH[@]}" --command="set -e; mkdir -p $REMOTE_DIR && tar xzf pudnet_jax.tgz -C $REMOTE_DIR \
      && cd $REMOTE_DIR && JAX_VERSION=\$(sed -n 's/^jax==//p' requirements.txt) \
      && pip install -q -U \"jax[tpu]==\$JAX_VERSION\" \
      && pip install -q -r <(grep -v -E '^(jax|jaxlib)==' requirements.txt) \
      && python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
    ;;
  data)
    "${SSH[@]}" --command="mkdir -p pudnet_data"
    "${SCP[@]}" "$DATA_DIR"/*.npz "$TPU_NAME:pudnet_data/"
    ;;
  train)
    quoted=$(printf ' %q' "$@")
    "${SSH[@]}" --command="cd $REMOTE_DIR && \
      if [ -d ~/pudnet_data ]; then export PUDNET_DATA_DIR=~/pudnet_data; fi && \
      PYTHONUNBUFFERED=1 python -m pudnet_jax.main --distributed=on$quoted"
    ;;
  stop)
    "${SSH[@]}" --command="pkill -f 'python -m pudnet_jax.main' || true"
    ;;
  *)
    echo "usage: TPU_NAME=... ZONE=... $0 {setup|data|train ARGS...|stop}" >&2
    exit 2
    ;;
esac
