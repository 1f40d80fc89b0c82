"""`megablocks-ablate eval`: perplexity and bits per byte of checkpoints on evaluation domains.

    megablocks-ablate eval --model runs/seed --eval-sets paloma/ --out results.json
    megablocks-ablate eval --model a --model b --eval-sets data/ --tokenizer tok.model --out r.json
    torchrun --nproc-per-node 8 -m megablocks_ablate eval --model runs/seed --eval-sets paloma/ --out r.json

--eval-sets takes a directory of JSONL files (one domain per file), a preprocess output
directory (its held-out files, one domain per partition), or files / globs / NAME=PATH.
Documents are tokenized once per tokenizer and cached (--cache-dir). Several --model
checkpoints are evaluated one after the other on the same in-memory data. Under torchrun,
mpiexec or srun the documents are sharded over the ranks; rank 0 writes --out.

A --model that is a training run directory (`megablocks-ablate train`'s out_dir, as
runs/seed above) means its final/, and the results are recorded under that path (what
was read); an unfinished run is refused, naming its latest step checkpoint.

Each model is scored in windows of the sequence length it was trained at (its lineage's
trained_seq_len); --max-len beyond that is refused, naming both numbers, unless
--beyond-trained-context asks for the untrained positions. The results record each
model's window (models.<ckpt>.max_len) and trained length.

--out is claimed before any work (utils/output_files.py): a new path is written; an
existing file is replaced only when it is an earlier eval result (its "format" is
megablocks-ablate/eval@1) and --overwrite is given; anything else there (a model's
model.safetensors, an evaluation set, a results store, any file of yours), a directory,
a path equal to or inside an input (--model, --eval-sets, --tokenizer) is refused,
naming it, with nothing changed. Concurrent evals writing one --out are serialised: each
checks the file again under a lock just before writing, so a second one without
--overwrite is refused instead of silently replacing the first one's results.
"""

from __future__ import annotations

import argparse
import os

from megablocks_ablate.utils import cli_types as ct


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity / bits per byte of checkpoints on evaluation domains",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="CKPT",
        help="checkpoint directory, or a training run directory meaning its final/ (repeatable)",
    )
    p.add_argument(
        "--eval-sets",
        nargs="+",
        required=True,
        metavar="PATH",
        help="directory of JSONL files, preprocess output directory, or files/globs/NAME=PATH",
    )
    p.add_argument(
        "--out",
        required=True,
        help="results JSON (written atomically by rank 0); an existing file is replaced only "
        "when it is an earlier eval result and --overwrite is given",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it holds an earlier eval result (any other file is refused)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer file overriding the one the checkpoint's lineage records (a merged "
        "checkpoint's: its inputs'); refused if its fingerprint is not the model's",
    )
    p.add_argument(
        "--stride",
        type=ct.positive_int,
        default=None,
        help="labels scored per window after the first (default: max length, "
        "non-overlapping windows); smaller = sliding windows with more context",
    )
    p.add_argument(
        "--max-len",
        type=ct.positive_int,
        default=None,
        help="window length (default: the sequence length each model was trained at, its "
        "lineage's trained_seq_len); longer is refused unless --beyond-trained-context",
    )
    p.add_argument(
        "--beyond-trained-context",
        action="store_true",
        help="allow a --max-len beyond the length a model was trained at (up to its "
        "max_seq_len): scores positions it never trained on",
    )
    p.add_argument(
        "--batch-tokens",
        type=ct.positive_int,
        default=None,
        help="padded tokens per forward pass (default 16384)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="tokenized eval cache (default $MBA_CACHE_DIR/eval, "
        "else ~/.cache/megablocks_ablate/eval)",
    )
    p.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument(
        "--on-bad-line",
        choices=("error", "skip"),
        default="error",
        help="invalid JSONL lines: stop with file:line (default) or skip and count",
    )
    p.add_argument(
        "--device",
        default=None,
        choices=("auto", "cpu", "cuda"),
        help="default auto: this rank's GPU if CUDA is available, else cpu",
    )
    p.add_argument("--progress", action="store_true", help="show a progress bar per model")


def run(args: argparse.Namespace) -> int:
    from megablocks_ablate.checkpoint import resolve_checkpoint_dir
    from megablocks_ablate.errors import ConfigError
    from megablocks_ablate.train.distributed import distributed_session

    for name in ("stride", "max_len", "batch_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be positive, got {value}")
    # a run directory means its final/: results are recorded under what was read
    args.model = [resolve_checkpoint_dir(m) for m in args.model]
    with distributed_session(device=args.device or "auto") as denv:
        return _run(args, denv)


def json_text(obj, where: str) -> str:
    """``obj`` as standard JSON (``allow_nan=False``: no ``NaN``/``Infinity`` tokens that
    strict parsers reject); a non-finite number is a NonFiniteError naming its key."""
    import json
    import math

    from megablocks_ablate.errors import NonFiniteError

    stack: list[tuple[str, object]] = [("", obj)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, float) and not math.isfinite(x):
            raise NonFiniteError(f"{where}: not written: {path or 'the value'} is {x}")
        if isinstance(x, dict):
            stack.extend(reversed([(f"{path}[{k!r}]", v) for k, v in x.items()]))
        elif isinstance(x, (list, tuple)):
            stack.extend(reversed([(f"{path}[{i}]", v) for i, v in enumerate(x)]))
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def _resolve_tokenizer(metas: dict, override: str | None):
    """``--tokenizer`` (checked against the first model), else the tokenizer the first
    model whose lineage records an existing one records (a merged checkpoint: its
    inputs'); the caller checks it against every model."""
    from megablocks_ablate.errors import ConfigError
    from megablocks_ablate.evaluate.tokenizer_match import resolve_tokenizer

    first_error: ConfigError | None = None
    for ckpt, lineage in metas.items():
        try:
            return resolve_tokenizer(lineage, ckpt, override)
        except ConfigError as e:  # nothing recorded here: try the next model's record
            first_error = first_error or e
    assert first_error is not None
    raise first_error


def _run(args: argparse.Namespace, denv) -> int:
    from megablocks_ablate.checkpoint import read_checkpoint_meta
    from megablocks_ablate.evaluate import EvalSuite
    from megablocks_ablate.evaluate.tokenizer_match import check_tokenizer

    rank, world, device = denv.rank, denv.world_size, denv.device
    _check_out(args)

    # Every checkpoint's config and lineage first: a window beyond a model's trained
    # length or a tokenizer mismatch fails before any work.
    full = {ckpt: read_checkpoint_meta(ckpt) for ckpt in args.model}
    windows = {ckpt: _window(args, ckpt, *meta) for ckpt, meta in full.items()}
    metas = {ckpt: lineage for ckpt, (_, lineage) in full.items()}
    tokenizer = _resolve_tokenizer(metas, args.tokenizer)
    for ckpt, lineage in metas.items():
        check_tokenizer(
            lineage.tokenizer_fingerprint,
            tokenizer.fingerprint,
            f"tokenizer {tokenizer.path}",
            ckpt,
        )

    suite = EvalSuite.load(
        args.eval_sets,
        tokenizer,
        cache_dir=args.cache_dir,
        text_key=args.text_key,
        on_bad_line=args.on_bad_line,
    )
    out = _report_header(args, world, tokenizer, suite)
    for ckpt in args.model:
        out["models"][ckpt] = _evaluate_model(args, ckpt, windows[ckpt], suite, device, rank)
    if rank == 0:
        _write_out(args, json_text(out, args.out))
        print(f"wrote {args.out}")
    return 0


def _window(args: argparse.Namespace, ckpt: str, config: dict, lineage) -> tuple[int, int]:
    """``(window, trained length)`` of one checkpoint, checked (see the module docstring)."""
    from megablocks_ablate.checkpoint import CONFIG_FILE, trained_seq_len
    from megablocks_ablate.evaluate.windows import (
        BEYOND_FLAG,
        resolve_window,
        validate_window_args,
    )
    from megablocks_ablate.model.config import ModelConfig

    max_seq_len = ModelConfig.from_dict(config, _path=os.path.join(ckpt, CONFIG_FILE)).max_seq_len
    trained = trained_seq_len(lineage, max_seq_len, ckpt)
    window = resolve_window(
        args.max_len,
        trained,
        max_seq_len,
        ckpt,
        beyond=args.beyond_trained_context,
        flag="--max-len",
        beyond_flag=BEYOND_FLAG,
    )
    validate_window_args(window, args.stride)
    return window, trained


OUT_KIND = "eval"  # the kind its results' "format" (megablocks-ablate/eval@1) names


def _inputs(args: argparse.Namespace) -> list[str]:
    """What eval reads, as paths: the models, every --eval-sets entry (its NAME=PATH
    path and glob matches too) and --tokenizer; --out may be none of them nor inside."""
    import glob

    found = list(args.model) + ([args.tokenizer] if args.tokenizer else [])
    for item in args.eval_sets:
        for entry in {item, item.partition("=")[2]} - {""}:
            found += [entry, *glob.glob(entry)]
    return found


def _check_out(args: argparse.Namespace) -> None:
    """``--out`` is a JSON file eval may write (see the module docstring); touches nothing."""
    from megablocks_ablate.utils.output_files import check_output_file

    check_output_file(args.out, OUT_KIND, overwrite=args.overwrite, inputs=_inputs(args))


def _write_out(args: argparse.Namespace, text: str) -> None:
    """Write ``--out`` atomically, checked again under its lock (another eval may have
    written it while this one was evaluating)."""
    from megablocks_ablate.utils.atomic import atomic_write_text
    from megablocks_ablate.utils.output_files import claim_output_file, output_lock

    with output_lock(args.out, f"eval --out {args.out}", timeout_s=None):
        claim_output_file(args.out, OUT_KIND, overwrite=args.overwrite, inputs=_inputs(args))
        atomic_write_text(args.out, text)


def _report_header(args: argparse.Namespace, world: int, tokenizer, suite) -> dict:
    from megablocks_ablate.evaluate.perplexity import DEFAULT_BATCH_TOKENS

    return {
        "format": "megablocks-ablate/eval@1",
        "settings": {
            "stride": args.stride,
            "max_len": args.max_len,  # null: each model's trained length
            "beyond_trained_context": args.beyond_trained_context,
            "batch_tokens": args.batch_tokens or DEFAULT_BATCH_TOKENS,
            "world_size": world,
            "text_key": args.text_key,
            "on_bad_line": args.on_bad_line,
        },
        "tokenizer": tokenizer.describe(),
        "eval_sets": suite.describe(),
        "skipped_domains": suite.skipped_domains,
        "models": {},
    }


def _evaluate_model(
    args: argparse.Namespace, ckpt: str, window: tuple[int, int], suite, device, rank: int
) -> dict:
    """One checkpoint on every domain: its lineage, window length and results."""
    from megablocks_ablate.evaluate import evaluate, results_table
    from megablocks_ablate.evaluate.perplexity import DEFAULT_BATCH_TOKENS
    from megablocks_ablate.model.loading import load_model

    model, lineage = load_model(ckpt, device=device)
    max_len, trained = window
    results = evaluate(
        model,
        suite,
        stride=args.stride,
        max_len=max_len,
        trained_len=trained,
        beyond_trained_context=args.beyond_trained_context,
        batch_tokens=args.batch_tokens or DEFAULT_BATCH_TOKENS,
        tokenizer_fingerprint=lineage.tokenizer_fingerprint,
        show_progress=args.progress and rank == 0,
        name=ckpt,
    )
    if rank == 0:
        print(f"{ckpt}:\n{results_table(results)}")
    return {
        "lineage": lineage.to_dict(recorded_in=args.out),  # paths relative to --out
        "max_len": max_len,  # the window every document was scored in
        "trained_seq_len": trained,
        "results": {d: r.to_dict() for d, r in results.items()},
    }
