#!/usr/bin/env python
"""Perplexity and bits per byte of checkpoints on evaluation domains (Megatron-style script).

The same as ``megablocks-ablate eval``; see ``docs/evaluation.md``::

    python tools/eval_perplexity.py --model runs/seed --eval-sets paloma/ --out results.json
    torchrun --nproc-per-node 8 tools/eval_perplexity.py --model runs/seed --eval-sets paloma/ --out r.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablocks_ablate.errors import MBAError


def main(argv: list[str] | None = None) -> int:
    from megablocks_ablate.commands import eval as eval_command

    parser = argparse.ArgumentParser(
        description=eval_command.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    eval_command.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return eval_command.run(args)
    except MBAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
