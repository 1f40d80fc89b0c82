#!/usr/bin/env python
"""Megatron-style entry point: same as `megablocks-ablate study run`.

python tools/run_study.py configs/studies/demo.yaml --dry-run
torchrun --nproc-per-node 8 tools/run_study.py study.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablocks_ablate.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "run", *sys.argv[1:]]))
