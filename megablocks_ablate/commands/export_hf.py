"""`megablocks-ablate export-hf` / `import-hf`: checkpoints to and from Hugging Face.

    megablocks-ablate export-hf runs/pool/merged_0001 hf/merged_0001
    megablocks-ablate import-hf hf/merged_0001 runs/imported
    megablocks-ablate import-hf ~/models/pythia-160m runs/pythia-seed   # a public seed

Families: CohereForCausalLM (every preset), LlamaForCausalLM and GPTNeoXForCausalLM
(Pythia). Import reads any safetensors directory of these (sharded too, every shard
inside the directory; pickle weights and NaN/inf tensors are refused); export writes the
family the checkpoint's config describes, loadable with
``transformers.AutoModelForCausalLM.from_pretrained`` (and so in lm-eval-harness and
vLLM). A training run directory given as the checkpoint to export means its final/.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-hf",
        help="write a checkpoint as a Hugging Face directory (Cohere, Llama or GPT-NeoX, "
        "as its config describes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint directory (model.safetensors + config.json + lineage.json), or a "
        "training run directory meaning its final/",
    )
    p.add_argument(
        "out", help="output directory (new or empty; a previous export with --overwrite)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous export in OUT (only the files it wrote)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer file to include (.model or tokenizer .json); default: the one the "
        "checkpoint's lineage records, if it still exists",
    )
    p.set_defaults(func=run_export)

    q = sub.add_parser(
        "import-hf",
        help="read a Hugging Face Cohere, Llama or GPT-NeoX (Pythia) directory into a checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("hf_dir", help="directory with config.json and model.safetensors")
    q.add_argument("out", help="output checkpoint directory (lineage kind 'imported')")
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous checkpoint in OUT (only its files)",
    )
    q.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    from megablocks_ablate.checkpoint import resolve_checkpoint_dir
    from megablocks_ablate.model.hf import export_hf
    from megablocks_ablate.utils.outputs import claim_output_dir

    checkpoint = resolve_checkpoint_dir(args.checkpoint)  # a run directory: its final/
    claim_output_dir(
        args.out,
        "hf-export",
        overwrite=args.overwrite,
        inputs=[checkpoint],
        flag="OUT",
        create=False,
    )
    export_hf(checkpoint, args.out, tokenizer=args.tokenizer)
    print(f"wrote {args.out} ({_exported_architecture(args.out)})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from megablocks_ablate.model.hf import import_hf
    from megablocks_ablate.utils.outputs import claim_output_dir

    claim_output_dir(
        args.out,
        "checkpoint",
        overwrite=args.overwrite,
        inputs=[args.hf_dir],
        flag="OUT",
        create=False,
    )
    import_hf(args.hf_dir, args.out)
    print(f"wrote checkpoint {args.out}")
    return 0


def _exported_architecture(out: str) -> str:
    import json
    import os

    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        return ", ".join(json.load(f).get("architectures") or ["?"])
