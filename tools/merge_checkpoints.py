#!/usr/bin/env python
"""Megatron-style entry point: same as `megablocks-ablate merge`.

python tools/merge_checkpoints.py --spec merge.yaml --out merged/ [--dtype bf16]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablocks_ablate.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
