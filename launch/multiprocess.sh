#!/usr/bin/env bash
# Several processes on one machine, each a "host" of one multi-host JAX job (CPU collectives over gloo).
# This is how multi-host code paths are exercised without a cluster.
#   launch/multiprocess.sh 2 experiments/quickstart.gin runs/mp [--gin_param=...]
set -euo pipefail
NPROC=$1; GIN_FILE=$2; WORKDIR=$3; shift 3
PORT=${MOSAICJAX_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu python -m mosaicjax.train --gin_file="$GIN_FILE" --workdir="$WORKDIR" \
    --coordinator_address="127.0.0.1:$PORT" --num_processes="$NPROC" --process_id="$i" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
