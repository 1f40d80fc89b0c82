"""`megablocks-ablate merge`: weighted parameter average of unit models, file to file.

The spec (YAML) lists the checkpoints and the mixture (uniform, weights, by_tokens,
macro, micro or a nested tree); see docs/merging.md. The merge streams over
memory-mapped inputs and writes the output checkpoint atomically with its config and
a lineage record.

A checkpoint that is a training run directory (`megablocks-ablate train`'s out_dir)
means its final/, which the merged lineage records as the parent; an unfinished run is
refused, naming its latest step checkpoint.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge unit-model checkpoints by a merge spec",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--spec",
        required=True,
        help="merge spec YAML (checkpoints + mixture; a training run directory as a "
        "checkpoint means its final/)",
    )
    p.add_argument("--out", help="output checkpoint directory (required unless --print-weights)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="output dtype (default: the spec's dtype, else the inputs')",
    )
    p.add_argument(
        "--allow-different-seed",
        action="store_true",
        help="merge checkpoints that do not continue from the same seed",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it holds a previous merged checkpoint (only its files)",
    )
    p.add_argument(
        "--print-weights",
        action="store_true",
        help="print the reduced weight vector and exit without merging",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from megablocks_ablate.checkpoint import read_checkpoint_meta
    from megablocks_ablate.errors import ConfigError
    from megablocks_ablate.merge.file_merge import merge_checkpoints
    from megablocks_ablate.merge.spec import MergeSpec
    from megablocks_ablate.utils.outputs import claim_output_dir

    spec = MergeSpec.load(args.spec)
    if args.print_weights:
        tokens = None
        if spec.needs_tokens():
            tokens = {
                u: read_checkpoint_meta(p)[1].tokens_seen for u, p in spec.checkpoints.items()
            }
        print(json.dumps(spec.weights(tokens), indent=2))
        return 0
    if not args.out:
        raise ConfigError("merge: --out DIR is required (or use --print-weights)")
    claim_output_dir(
        args.out,
        "checkpoint",
        overwrite=args.overwrite,
        inputs=list(spec.checkpoints.values()),
        create=False,
    )
    lineage = merge_checkpoints(
        spec, args.out, allow_different_seed=args.allow_different_seed, dtype=args.dtype
    )
    shown = ", ".join(f"{u}={w:.4g}" for u, w in zip(lineage.units, lineage.weights))
    print(f"merged {len(lineage.units)} checkpoints into {args.out} ({shown})")
    return 0
