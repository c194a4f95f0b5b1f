#!/usr/bin/env bash
# A Cloud TPU VM pod slice: the same command on every worker; JAX discovers the pod topology itself.
#   launch/tpu_vm.sh TPU_NAME ZONE experiments/dbrx/dbrx_9b.gin gs://bucket/runs/dbrx9b [--gin_param=...]
# The workdir must be shared storage (GCS) so every host sees the same checkpoints.
set -euo pipefail
TPU=$1; ZONE=$2; GIN_FILE=$3; WORKDIR=$4; shift 4
EXTRA="$*"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd ~/mosaicjax && python -m mosaicjax.train --distributed_auto --gin_file=$GIN_FILE --workdir=$WORKDIR $EXTRA"
