#!/usr/bin/env bash
# One host, all its devices: the plain CLI.
#   launch/local.sh experiments/quickstart.gin runs/quickstart [--gin_param=...]
set -euo pipefail
GIN_FILE=$1; WORKDIR=$2; shift 2
exec python -m mosaicjax.train --gin_file="$GIN_FILE" --workdir="$WORKDIR" "$@"
