#!/usr/bin/env bash
# Written by `megablocks-ablate launch-templates --out launch/` (a checkout: tools/launch/).
# Several nodes: run this same command on every node (e.g. with pdsh, or from sbatch via srun).
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 launch/torchrun_multi_node.sh \
#       130m_seq data.manifest=/shared/data out_dir=/shared/runs/seq
# out_dir must be on a filesystem every node sees (rank 0 writes checkpoints, all ranks read them).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml|PRESET [key=value ...]}; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
    --rdzv-id "${RDZV_ID:-megablocks-ablate}" \
    -m megablocks_ablate train --config "$CONFIG" "$@"
