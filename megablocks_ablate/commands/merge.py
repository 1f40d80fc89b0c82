"""`megablocks-ablate merge`: weighted parameter average of unit models, file to file.

The spec (YAML) lists the checkpoints and the mixture (uniform, weights, by_tokens,
macro, micro or a nested tree); see docs/merging.md. The merge streams over
memory-mapped inputs and writes the output checkpoint atomically with its config and
a lineage record.

Hugging Face models are merged as they are: a spec whose checkpoints are all Hugging
Face model directories (Cohere, Llama, GPT-NeoX; config.json + model.safetensors or a
sharded index), or a mergekit `linear` config given as --spec (recognised by its
merge_method key; relative model paths resolve against the config's directory), is
merged tensor by tensor on the HF files and written as a Hugging Face model directory
(model.safetensors, the first input's config and tokenizer files, merge_provenance.json).
A mergekit config is merged with mergekit's arithmetic, a spec with ours (see
docs/merging.md). A spec mixing Hugging Face models and our checkpoints is refused.

A checkpoint that is a training run directory (`megablocks-ablate train`'s out_dir)
means its final/, which the merged lineage records as the parent; an unfinished run is
refused, naming its latest step checkpoint.

--out is claimed like every output directory (docs/reliability.md): a user's directory,
another kind of output or an input is refused. Two merges into one --out at once: the
second is refused at once, naming the first (a lock, .<out>.megablocks-ablate.lock
beside it, held while it checks and writes), so the last writer never silently wins.

--overwrite replaces only a checkpoint a merge wrote (lineage kind "merged"). A trained
or imported model (lineage kind seed, unit, seq, imported: what studies train from and
merge; a study's seed, unit and seq models are all of these kinds) is refused even with
--overwrite, naming it, and so is a merged checkpoint that is the seed the spec's inputs
continue from (its sha256 is their seed_hash) or a checkpoint an input was merged from.
There is deliberately no flag to force it: replacing a model other results were
derived from silently invalidates them, so remove it yourself if that is really meant.
(A merged checkpoint some other study uses as its seed is recognised only as the seed
of this merge's inputs: nothing on disk links a checkpoint to every study that reads it.)
"""

from __future__ import annotations

import argparse
import os


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
        "checkpoint means its final/; Hugging Face model directories as checkpoints give a "
        "Hugging Face output), or a mergekit linear config",
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
    from megablocks_ablate.utils.verify import VERIFY_MODES

    p.add_argument(
        "--verify",
        default="cached",
        choices=VERIFY_MODES,
        help="hashes compared with recorded ones: from a cache keyed on size, mtime, ctime "
        "and inode (cached, default), or every file hashed in full (full)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from megablocks_ablate.checkpoint import read_checkpoint_meta
    from megablocks_ablate.errors import ConfigError
    from megablocks_ablate.merge.file_merge import merge_checkpoints
    from megablocks_ablate.merge.mergekit_config import is_mergekit_config
    from megablocks_ablate.merge.spec import MergeSpec, load_yaml
    from megablocks_ablate.utils.output_files import output_lock
    from megablocks_ablate.utils.verify import set_verify_mode

    set_verify_mode(args.verify)
    data = load_yaml(args.spec)
    if is_mergekit_config(data):
        from megablocks_ablate.merge.mergekit_config import plan_from_mergekit

        return _run_hf(args, plan_from_mergekit(data, args.spec, args.dtype))
    spec = MergeSpec.from_file_data(data, args.spec)
    if _hf_inputs(spec):
        from megablocks_ablate.merge.hf_merge import plan_from_spec

        return _run_hf(args, plan_from_spec(spec, args.dtype))
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
    _claim(args, spec)  # refusals before the lock, too: nothing is created for them
    with output_lock(args.out, f"merge --out {args.out}"):
        _claim(args, spec)  # again, holding the lock: another merge may have written it
        lineage = merge_checkpoints(
            spec, args.out, allow_different_seed=args.allow_different_seed, dtype=args.dtype
        )
    shown = ", ".join(f"{u}={w:.4g}" for u, w in zip(lineage.units, lineage.weights))
    print(f"merged {len(lineage.units)} checkpoints into {args.out} ({shown})")
    return 0


def _hf_inputs(spec) -> bool:
    """Whether the spec's checkpoints are Hugging Face model directories (all of them;
    a mixture of those and our checkpoints is refused, naming one of each)."""
    from megablocks_ablate.errors import ConfigError
    from megablocks_ablate.merge.hf_inputs import is_hf_model_dir

    kinds = {u: is_hf_model_dir(p) for u, p in spec.checkpoints.items()}
    if all(kinds.values()):
        return True
    if any(kinds.values()):
        hf = next(u for u, k in kinds.items() if k)
        ours = next(u for u, k in kinds.items() if not k)
        raise ConfigError(
            f"{spec.source}: checkpoints.{hf} ({spec.checkpoints[hf]}) is a Hugging Face "
            f"model directory and checkpoints.{ours} ({spec.checkpoints[ours]}) is not: the "
            "inputs of one merge are all Hugging Face models or all our checkpoints "
            "(import-hf the Hugging Face ones, or export-hf ours)"
        )
    return False


def _run_hf(args: argparse.Namespace, plan) -> int:
    """Merge Hugging Face model directories into one (docs/merging.md)."""
    import json

    from megablocks_ablate.errors import ConfigError
    from megablocks_ablate.merge.hf_merge import OUTPUT_KIND, describe, merge_hf
    from megablocks_ablate.utils.output_files import output_lock
    from megablocks_ablate.utils.outputs import check_output_dir

    if args.print_weights:
        print(json.dumps(plan.applied_weights(), indent=2))
        return 0
    if not args.out:
        raise ConfigError("merge: --out DIR is required (or use --print-weights)")
    claim = dict(overwrite=args.overwrite, inputs=plan.paths)
    check_output_dir(args.out, OUTPUT_KIND, **claim)  # before the lock: nothing is created
    with output_lock(args.out, f"merge --out {args.out}"):
        check_output_dir(args.out, OUTPUT_KIND, **claim)  # again, holding the lock
        merge_hf(plan, args.out, allow_different_seed=args.allow_different_seed)
    print(f"merged {describe(plan)} into {args.out}")
    return 0


def _claim(args: argparse.Namespace, spec) -> None:
    """--out may be written (see the module docstring); touches nothing."""
    from megablocks_ablate.utils.outputs import check_output_dir

    inputs = list(spec.checkpoints.values())
    if check_output_dir(args.out, "checkpoint", overwrite=args.overwrite, inputs=inputs):
        _check_replaceable(args.out, inputs)


# lineage kind -> what such a model is, in a refusal
_ROLES = {
    "seed": "a trained seed model (what unit models and studies continue from)",
    "unit": "a trained unit model (a study's and a merge's input)",
    "seq": "a model trained on a mixture (a study's reference)",
    "imported": "an imported model (a seed or reference of your studies)",
}


def _check_replaceable(out: str, inputs: list[str]) -> None:
    """The checkpoint at ``out`` is a merge's output that nothing here was built from."""
    from megablocks_ablate.checkpoint import model_file, read_checkpoint_meta
    from megablocks_ablate.errors import ConfigError, MBAError
    from megablocks_ablate.utils.verify import file_sha256

    keep = "nothing was changed: choose another --out, or remove it yourself if you mean it"
    try:
        _, lineage = read_checkpoint_meta(out)
    except MBAError as e:
        raise ConfigError(f"--out {out}: cannot tell what it holds ({e}); {keep}") from None
    if lineage.kind != "merged":
        role = _ROLES.get(lineage.kind, f"a {lineage.kind!r} model")
        raise ConfigError(
            f"--out {out}: holds {role}, lineage kind {lineage.kind!r}; --overwrite replaces "
            f"only a checkpoint `merge` wrote: {keep}"
        )
    real = os.path.realpath(out)
    metas = {p: read_checkpoint_meta(p)[1] for p in inputs}
    for p, lin in metas.items():
        if real in {os.path.realpath(q) for q in lin.parents}:
            raise ConfigError(f"--out {out}: is a checkpoint the input {p} was merged from; {keep}")
    seeds = {lin.seed_hash for lin in metas.values()} - {None}
    if seeds and file_sha256(model_file(out)) in seeds:
        raise ConfigError(
            f"--out {out}: is the seed checkpoint the spec's inputs continue from (its "
            f"sha256 is their seed_hash); {keep}"
        )
