#!/usr/bin/env python
"""Train the pool on this machine: one unit model per GPU (or CPU slot), the rest queued.

    python tools/launch/local_pool.py --config configs/train/demo_unit.yaml --devices cpu:2 data.manifest=data/
    python tools/launch/local_pool.py --config configs/train/130m_unit.yaml --devices 0,1,2,3

Same as `megablocks-ablate train-pool`; rerunning skips units whose COMPLETE.json exists.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megablocks_ablate.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-pool", *sys.argv[1:]]))
