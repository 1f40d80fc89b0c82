#!/usr/bin/env bash
# Written by `megablocks-ablate launch-templates --out launch/` (a checkout: tools/launch/).
# One node, all its GPUs, data parallel (DDP; add distributed.parallel=fsdp for FSDP2).
#   launch/torchrun_single_node.sh 130m_seed data.manifest=data/ out_dir=runs/130m/seed
# A rerun with the same arguments resumes from the newest checkpoint in out_dir.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml|PRESET [key=value ...]}; shift
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NPROC" -ge 1 ] || NPROC=1
exec torchrun --standalone --nproc-per-node "$NPROC" \
    -m megablocks_ablate train --config "$CONFIG" "$@"
