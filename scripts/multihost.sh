#!/usr/bin/env bash
# Plain multi-host launch: run this once on every host (one process per host; Lightning starts one rank per GPU).
#   MASTER_ADDR=10.0.0.1 NODE_RANK=0 NODES=2 DEVICES=8 RECIPE=1.5b scripts/multihost.sh [--out DIR] [more train args]
#   MASTER_ADDR=10.0.0.1 NODE_RANK=1 NODES=2 DEVICES=8 RECIPE=1.5b scripts/multihost.sh [--out DIR] [...]
# MASTER_ADDR: host 0's address, reachable from every host; MASTER_PORT: a free port on it (default 29500).
# The run folder (--out) should be on storage every host sees; rank 0 writes it.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the address of host 0}" "${NODE_RANK:?set NODE_RANK (0 on host 0, 1, 2, ...)}"
export MASTER_ADDR NODE_RANK MASTER_PORT=${MASTER_PORT:-29500}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" entrypoint.py train --recipe "${RECIPE:-0.1b}" \
  --set "train.num_nodes=${NODES:?set NODES (number of hosts)}" "train.devices=${DEVICES:-1}" "$@"
