#!/usr/bin/env python
"""Megatron-style entry point: same as `megablocks-ablate train`.

python tools/train.py --config configs/train/demo_seed.yaml data.manifest=data/
torchrun --nproc-per-node 8 tools/train.py --config configs/train/130m_unit.yaml data.unit=cs-0003
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablocks_ablate.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
