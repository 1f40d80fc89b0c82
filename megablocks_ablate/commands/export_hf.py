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

OUT is claimed like every output (docs/reliability.md): a user's file or directory,
another kind of output or an input (or a directory holding one) is refused, naming
it, and nothing is changed. --overwrite replaces only an earlier export (export-hf) or
an earlier import (import-hf: lineage kind "imported"; a trained or merged checkpoint is
never replaced), and only the files it wrote. One writer at a time: a second export or
import into the same OUT is refused at once, naming the first (a lock,
.<out>.megablocks-ablate.lock beside it).
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
        help="replace a previous import-hf checkpoint in OUT (only its files; a trained or "
        "merged checkpoint is never replaced)",
    )
    q.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    from megablocks_ablate.checkpoint import resolve_checkpoint_dir
    from megablocks_ablate.model.hf import export_hf
    from megablocks_ablate.utils.output_files import output_lock

    checkpoint = resolve_checkpoint_dir(args.checkpoint)  # a run directory: its final/
    inputs = [("CHECKPOINT", checkpoint), ("--tokenizer", args.tokenizer)]
    _claim(args.out, "hf-export", args.overwrite, inputs)  # before the lock: touches nothing
    with output_lock(args.out, f"export-hf {args.out}"):
        # again, holding the lock: another export may have written it meanwhile
        _claim(args.out, "hf-export", args.overwrite, inputs, sweep=True)
        export_hf(checkpoint, args.out, tokenizer=args.tokenizer)
    print(f"wrote {args.out} ({_exported_architecture(args.out)})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from megablocks_ablate.model.hf import import_hf
    from megablocks_ablate.utils.output_files import output_lock

    inputs = [("HF_DIR", args.hf_dir)]
    _claim_import(args, inputs)  # refusals before the lock, too: nothing is created
    with output_lock(args.out, f"import-hf {args.out}"):
        _claim_import(args, inputs, sweep=True)  # again, holding the lock
        import_hf(args.hf_dir, args.out)
    print(f"wrote checkpoint {args.out}")
    return 0


def _claim(
    out: str,
    kind: str,
    overwrite: bool,
    inputs: list[tuple[str, str | None]],
    *,
    sweep: bool = False,
) -> bool:
    """OUT may be written as this ``kind`` of output (see docs/reliability.md); with
    ``sweep`` (under the lock) stale temporaries of earlier writes of it are removed,
    else nothing is touched. Returns whether OUT already holds such an output."""
    from megablocks_ablate.utils.outputs import (
        check_inputs_outside,
        check_output_dir,
        claim_output_dir,
    )

    paths = [p for _, p in inputs]
    if sweep:
        existing = claim_output_dir(
            out, kind, overwrite=overwrite, inputs=paths, flag="OUT", create=False
        )
    else:
        existing = check_output_dir(out, kind, overwrite=overwrite, inputs=paths, flag="OUT")
    check_inputs_outside(out, inputs, flag="OUT")
    return existing


def _claim_import(
    args: argparse.Namespace, inputs: list[tuple[str, str | None]], sweep: bool = False
) -> None:
    """OUT of import-hf: new, or with --overwrite an earlier import (lineage kind
    ``imported``); a trained, merged or otherwise derived checkpoint is never replaced."""
    from megablocks_ablate.checkpoint import read_checkpoint_meta
    from megablocks_ablate.errors import ConfigError, MBAError

    if not _claim(args.out, "checkpoint", args.overwrite, inputs, sweep=sweep):
        return
    keep = "nothing was changed: choose another OUT, or remove it yourself if you mean it"
    try:
        _, lineage = read_checkpoint_meta(args.out)
    except MBAError as e:
        raise ConfigError(f"OUT {args.out}: cannot tell what it holds ({e}); {keep}") from None
    if lineage.kind != "imported":
        raise ConfigError(
            f"OUT {args.out}: holds a checkpoint of lineage kind {lineage.kind!r}; "
            f"--overwrite replaces only a checkpoint `import-hf` wrote: {keep}"
        )


def _exported_architecture(out: str) -> str:
    import json
    import os

    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        return ", ".join(json.load(f).get("architectures") or ["?"])
