#!/usr/bin/env python
"""Megatron-style entry point: same as `megablocks-ablate preprocess`.

    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --tokenizer tok.model \
        --partition-by fos --order-by year --unit-tokens 50M --workers 32 --out data/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablocks_ablate.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
