#!/usr/bin/env bash
# Written by `megablocks-ablate launch-templates --out launch/` (a checkout: tools/launch/).
# Under MPI: rank, world size and local rank come from mpi4py; rank 0 broadcasts the
# rendezvous address, so no MASTER_ADDR is needed.
#   NP=16 HOSTFILE=hosts launch/mpirun.sh 130m_seq data.manifest=/shared/data
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml|PRESET [key=value ...]}; shift
exec mpiexec -n "${NP:-2}" ${HOSTFILE:+-f "$HOSTFILE"} \
    python -m megablocks_ablate train --config "$CONFIG" "$@"
