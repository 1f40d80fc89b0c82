"""`megablocks-ablate study`: plan, run and report a data-ablation study.

    megablocks-ablate demo                  # builds demo_out/ and runs the study `demo`
    megablocks-ablate study plan demo [key=value ...]
    megablocks-ablate study run demo [key=value ...] [--dry-run]
    torchrun --nproc-per-node 8 -m megablocks_ablate study run study.yaml
    megablocks-ablate study report --store demo_out/study/results.sqlite [--out report/]
    megablocks-ablate study report demo
    megablocks-ablate study search demo --k 4 --domains docs,core
    megablocks-ablate study export demo --mixture docs,core,gui
    megablocks-ablate study optimize demo --budget 40 --domains docs

A spec is a study YAML (relative paths in it are relative to its directory), or the name
of a study preset shipped in the package (``demo``: ``megablocks-ablate config show
study demo`` prints it; its paths are relative to the working directory, where
``megablocks-ablate demo`` writes ``demo_out/``); a file of that name wins.

``plan`` checks the spec against the preprocessed data (every error names the spec
field) and prints the partitions, every mixture, the seq validation mixtures, the
evaluation domains and the training cost, before anything is trained. ``run`` trains
the missing seed, unit and seq models, then scores every mixture by in-memory merges
into ``<out_dir>/results.sqlite``; rerun it after a kill to continue. ``report``
writes ``report/`` from a study's results store (see docs/studies.md). ``search``
finds the best k-mixture for chosen domains by beam search over merged proxies,
scoring new mixtures on the fly (into the same store); ``export``
turns a chosen mixture (e.g. the report's recommendation) into training data: the
``data`` section of a train config, or a Megatron-LM ``--data-path`` string, both with
the paper's equal-partition weights (or a blend's shares: ``--mixture docs=0.6,core=0.4``).
``optimize`` searches the simplex of partition proportions for the blend whose weighted
merge scores best (docs/proportions.md), and exports it the same two ways.
"""

from __future__ import annotations

import argparse
import logging
import os

from megablocks_ablate.utils import cli_types as ct


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="plan a data-ablation study, or report its results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="study_command", metavar="ACTION")
    actions.required = True
    for add in (_add_plan, _add_run, _add_report, _add_search, _add_export, _add_optimize):
        add(actions)


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="study YAML, or a packaged study preset's name (demo)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the spec")


def _pool_args(p: argparse.ArgumentParser) -> None:
    """Where the unit-model pool lives during merge-eval (docs/merging.md "Pool placement")."""
    p.add_argument(
        "--pool-placement",
        default="auto",
        choices=["auto", "resident", "host", "sharded"],
        help="pool rows on each evaluation device (resident), once per node in host memory "
        "(host), or split over ranks (sharded); auto: the first that fits (default)",
    )
    p.add_argument(
        "--pool-dtype",
        default="auto",
        choices=["auto", "bf16", "bf16-delta", "bf16-plain", "fp32"],
        help="pool rows; merges accumulate in fp32 (default auto: bf16 on CUDA, fp32 on "
        "CPU). bf16 stores each unit as a bf16 difference from the fp32 seed (bf16-delta; "
        "plain bf16 rows with a warning when the units record no common seed); "
        "bf16-plain rounds the weights themselves",
    )
    p.add_argument(
        "--pool-dir",
        default=None,
        help="node-wide directory for host-placed pool rows (default /dev/shm)",
    )


def _verify_args(p: argparse.ArgumentParser) -> None:
    """How the models' recorded sha256 are checked (docs/reliability.md)."""
    from megablocks_ablate.utils.verify import VERIFY_MODES

    p.add_argument(
        "--verify",
        default="cached",
        choices=VERIFY_MODES,
        help="check each model against its recorded sha256 by a cache keyed on size, "
        "mtime, ctime and inode (cached, default), or hash every file in full (full)",
    )


def _window_args(p: argparse.ArgumentParser) -> None:
    """The evaluation window (docs/evaluation.md "Trained context"), for every action
    that scores models."""
    p.add_argument(
        "--max-len",
        type=ct.positive_int,
        default=None,
        help="evaluation: window length (default: the sequence length the study's unit "
        "and seq models were trained at); longer is refused unless --beyond-trained-context",
    )
    p.add_argument(
        "--beyond-trained-context",
        action="store_true",
        help="evaluation: allow a --max-len beyond the trained length (up to the model's "
        "max_seq_len): scores positions no model trained on",
    )


def _add_plan(actions: argparse._SubParsersAction) -> None:
    plan = actions.add_parser("plan", help="check a study spec and print the plan and its cost")
    _spec_args(plan)
    plan.add_argument(
        "--print-config", action="store_true", help="print the resolved spec as YAML and exit"
    )
    plan.set_defaults(func=run_plan)


def _add_run(actions: argparse._SubParsersAction) -> None:
    run = actions.add_parser("run", help="train missing models, merge-eval every mixture")
    _spec_args(run)
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be trained and evaluated, and the cost; do nothing",
    )
    run.add_argument(
        "--registry",
        help="registry root holding pool/ and seq/ (default: the "
        "study's out_dir); share one between studies to reuse their models",
    )
    run.add_argument(
        "--save-merged",
        action="store_true",
        help="also write every merged model to <out_dir>/merged/ (off: in memory)",
    )
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument(
        "--batch-tokens",
        type=ct.positive_int,
        default=16384,
        help="evaluation: padded tokens per forward (default 16384)",
    )
    run.add_argument(
        "--stride",
        type=ct.positive_int,
        default=None,
        help="evaluation: sliding-window stride (default: non-overlapping windows)",
    )
    _window_args(run)
    _pool_args(run)
    _verify_args(run)
    run.add_argument(
        "--cpu-workers",
        type=ct.at_least_one,
        default=1,
        metavar="N",
        help="one CPU process: train the unit/seq models and score models and mixtures "
        "in N worker processes, each with threads/N threads (small models train faster "
        "side by side than one at a time; default 1; ignored under torchrun and on CUDA)",
    )
    run.add_argument("--report", action="store_true", help="write report/ when done")
    run.add_argument(
        "--wait",
        action="store_true",
        help="if another `study run` of this study is in progress, wait for it to finish "
        "(default: refuse at once, naming it)",
    )
    run.set_defaults(func=run_run)


def _add_report(actions: argparse._SubParsersAction) -> None:
    report = actions.add_parser("report", help="write report/ from a study's results store")
    report.add_argument(
        "spec",
        nargs="?",
        help="study YAML or packaged preset name (the store is <out_dir>/results.sqlite)",
    )
    report.add_argument("overrides", nargs="*", help="key=value overrides of the spec")
    report.add_argument("--store", help="results store (instead of a spec)")
    report.add_argument(
        "--out",
        help="report directory (default: report/ beside the store); a directory holding "
        "anything but an earlier report is refused",
    )
    report.add_argument(
        "--bootstrap",
        type=ct.positive_int,
        default=1000,
        help="bootstrap resamples for confidence intervals (default 1000)",
    )
    report.add_argument("--seed", type=ct.nonneg_int, default=0, help="bootstrap seed")
    report.add_argument("--top-k", type=ct.positive_int, default=3, help="k of the top-k agreement")
    report.add_argument("--no-plots", action="store_true", help="skip the PNG scatter plots")
    report.set_defaults(func=run_report)


def _add_search(actions: argparse._SubParsersAction) -> None:
    search = actions.add_parser(
        "search",
        help="beam search for the best k-mixture, merging and evaluating mixtures not yet scored",
    )
    _spec_args(search)
    search.add_argument(
        "--k", type=ct.positive_int, required=True, help="partitions in the mixture"
    )
    search.add_argument("--proxy", default="macro", choices=["merged", "macro", "micro"])
    search.add_argument(
        "--domains",
        type=ct.nonempty_csv,
        help="comma-separated evaluation domains to optimise "
        "(default: all; the score is their geometric-mean perplexity)",
    )
    search.add_argument("--beam", type=ct.positive_int, default=4, help="beam width (1 = greedy)")
    _window_args(search)
    _pool_args(search)
    _verify_args(search)
    search.set_defaults(func=run_search)


def _add_export(actions: argparse._SubParsersAction) -> None:
    export = actions.add_parser(
        "export",
        help="a mixture as a training blend (train-config data section or Megatron --data-path)",
    )
    _spec_args(export)
    export.add_argument(
        "--mixture",
        required=True,
        type=ct.mixture,
        help="comma-separated partitions of the study, e.g. docs,core,gui, or a proportion "
        "blend of them, e.g. docs=0.5,core=0.3,gui=0.2",
    )
    export.add_argument(
        "--format",
        choices=["train", "megatron"],
        default="train",
        help="train: YAML data section for `megablocks-ablate train`; "
        "megatron: a --data-path value (default: train)",
    )
    export.add_argument(
        "--out",
        help="write it to this file instead of stdout (new, or an earlier `study export` "
        "with --overwrite; any other file is refused)",
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier `study export` at --out (never any other file)",
    )
    export.set_defaults(func=run_export)


def _add_optimize(actions: argparse._SubParsersAction) -> None:
    opt = actions.add_parser(
        "optimize",
        help="search partition proportions for the best blend by weighted merges "
        "(docs/proportions.md)",
    )
    _spec_args(opt)
    opt.add_argument(
        "--over",
        type=ct.nonempty_csv,
        help="comma-separated partitions to blend (default: every partition)",
    )
    opt.add_argument(
        "--domains",
        type=ct.nonempty_csv,
        help="comma-separated evaluation domains of the geometric-mean perplexity "
        "objective (default: all)",
    )
    opt.add_argument(
        "--domain-weights",
        type=ct.name_weights,
        help="instead: minimise the weighted mean loss, e.g. docs=2,core=1 (nats/token)",
    )
    opt.add_argument("--proxy", default="macro", choices=["merged", "macro", "micro"])
    opt.add_argument(
        "--budget", type=ct.positive_int, default=40, help="most merges to evaluate (40)"
    )
    opt.add_argument(
        "--step",
        type=ct.fraction_to_one,
        default=0.2,
        help="first share moved between partitions (0.2)",
    )
    opt.add_argument(
        "--min-share",
        type=ct.fraction_from_zero,
        default=0.0,
        help="floor on every partition's share (0)",
    )
    opt.add_argument(
        "--no-regression", action="store_true", help="skip the RegMix-style regression"
    )
    opt.add_argument("--out", help="result JSON (default: <out_dir>/optimize/<request hash>.json)")
    _window_args(opt)
    _pool_args(opt)
    _verify_args(opt)
    opt.set_defaults(func=run_optimize)


def run_plan(args: argparse.Namespace) -> int:
    from megablocks_ablate.ablate.runner import resolve
    from megablocks_ablate.ablate.spec import StudySpec, describe_plan

    spec = StudySpec.load(args.spec, args.overrides)
    if args.print_config:
        print(spec.to_commented_yaml(), end="")
        return 0
    print(describe_plan(resolve(spec)))
    return 0


def run_run(args: argparse.Namespace) -> int:
    from megablocks_ablate.ablate.runner import RunOptions, dry_run, load_study, run_study
    from megablocks_ablate.utils.verify import set_verify_mode

    set_verify_mode(args.verify)
    study = load_study(args.spec, args.overrides)  # every spec error before any work
    opts = RunOptions(
        registry=args.registry,
        save_merged=args.save_merged,
        device=args.device,
        batch_tokens=args.batch_tokens,
        stride=args.stride,
        max_len=args.max_len,
        beyond_trained_context=args.beyond_trained_context,
        lock_timeout_s=None if args.wait else 0.0,
        pool_placement=args.pool_placement,
        pool_dtype=args.pool_dtype,
        pool_dir=args.pool_dir,
        cpu_workers=args.cpu_workers,
    )
    if args.dry_run:
        print(dry_run(study, opts))
        return 0
    runner = run_study(study, opts)
    if args.report and runner.env.is_main:
        from megablocks_ablate.ablate.report import write_report
        from megablocks_ablate.ablate.store import ResultStore, store_path

        with ResultStore(store_path(study.spec.out_dir)) as store:
            print(write_report(store, os.path.join(study.spec.out_dir, "report")).headline())
    return 0


def run_report(args: argparse.Namespace) -> int:
    from megablocks_ablate.ablate.report import write_report
    from megablocks_ablate.ablate.store import ResultStore, store_path
    from megablocks_ablate.errors import ConfigError

    if bool(args.spec) == bool(args.store):
        raise ConfigError("study report: give a study spec or --store PATH (one of them)")
    spec = None
    if args.spec:
        from megablocks_ablate.ablate.spec import StudySpec

        spec = StudySpec.load(args.spec, args.overrides)
        path = store_path(spec.out_dir)
    else:
        path = args.store
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no results store (run the study first)")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "report")
    with ResultStore(path) as store:
        if spec is not None:
            _warn_other_spec(store, spec, path, args.spec)
        summary = write_report(
            store,
            out,
            n_boot=args.bootstrap,
            seed=args.seed,
            top_k=args.top_k,
            plots=not args.no_plots,
            flag="--out" if args.out else "report directory",
        )
    print(summary.headline())
    return 0


def _warn_other_spec(store, spec, path: str, given: str) -> None:
    """`study report SPEC` reports the store SPEC's out_dir names, whatever spec wrote
    it: say so when that was another spec (the report is of the store's spec)."""
    from megablocks_ablate.ablate.report import spec_differences

    fields = spec_differences(store, spec.to_dict(), path)
    if fields:
        shown = ", ".join(fields[:8]) + (f" (+{len(fields) - 8} more)" if len(fields) > 8 else "")
        logging.getLogger(__name__).warning(
            "%s was written under another spec than %s (differing: %s); the report is of "
            "what the store holds",
            path,
            given,
            shown,
        )


def run_export(args: argparse.Namespace) -> int:
    import yaml

    from megablocks_ablate.ablate.runner import load_study
    from megablocks_ablate.ablate.search import megatron_data_path, training_blend

    study = load_study(args.spec, args.overrides)
    mixture = parse_mixture_arg("--mixture", args.mixture, study.partitions)
    if args.format == "megatron":
        text = megatron_data_path(mixture, study.unit_paths) + "\n"
    else:
        text = yaml.safe_dump(
            {"data": training_blend(mixture, study.manifest_dir)}, sort_keys=False
        )
    if not args.out:
        print(text, end="")
        return 0
    from megablocks_ablate.commands.study_outputs import study_inputs, write_export

    write_export(args.out, text, args.overwrite, study_inputs(args.spec, study))
    print(f"wrote {args.out} ({args.format} blend of {mixture.label})")
    return 0


def parse_mixture_arg(flag: str, text: str, partitions: dict[str, list[str]]):
    """``a,b,c`` (equal shares) or ``a=0.5,b=0.3,c=0.2`` (a proportion mixture)."""
    from megablocks_ablate.ablate import mixtures as mx
    from megablocks_ablate.errors import ConfigError

    items = [n.strip() for n in text.split(",") if n.strip()]
    if not items:
        raise ConfigError(f"{flag}: give at least one partition")
    shares: dict[str, float] | None = None
    if any("=" in it for it in items):
        shares = _name_values(flag, items, "partition=share (e.g. docs=0.5)")
    names = list(shares) if shares is not None else items
    unknown = [n for n in names if n not in partitions]
    if unknown:
        raise ConfigError(
            f"{flag}: unknown partition {unknown[0]!r} (study partitions: {', '.join(partitions)})"
        )
    try:
        return mx.Mixture.of({n: partitions[n] for n in names}, shares)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None


def _pool_runner(study, args: argparse.Namespace):
    """A one-process study runner with the command's window and pool options (search,
    optimize)."""
    from megablocks_ablate.ablate.runner import RunOptions, StudyRunner
    from megablocks_ablate.utils.verify import set_verify_mode

    set_verify_mode(args.verify)
    return StudyRunner(
        study,
        RunOptions(
            max_len=args.max_len,
            beyond_trained_context=args.beyond_trained_context,
            pool_placement=args.pool_placement,
            pool_dtype=args.pool_dtype,
            pool_dir=args.pool_dir,
        ),
    )


def _name_values(flag: str, items: list[str], form: str) -> dict[str, float]:
    """``["a=0.5", "b=2"]`` -> ``{"a": 0.5, "b": 2.0}``; ConfigError naming the item."""
    from megablocks_ablate.errors import ConfigError

    out = {}
    for it in items:
        name, sep, value = it.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"{flag}: {it!r} is not {form}") from None
    return out


def run_search(args: argparse.Namespace) -> int:
    from megablocks_ablate.ablate.runner import load_study

    study = load_study(args.spec, args.overrides)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    runner = _pool_runner(study, args)
    try:
        result, n_new = runner.search(
            args.k, proxy=args.proxy, domains=domains, beam_width=args.beam
        )
    finally:
        runner.close()
    print(
        f"best {args.k}-mixture by {args.proxy}: {'+'.join(result.best)} "
        f"(geometric-mean perplexity {result.score:.3f}; {result.evaluations} mixtures "
        f"scored, {n_new} of them merged and evaluated now, the rest read from the store)"
    )
    for beam in result.beams:
        print(f"  size {len(beam[0][0])}: " + "; ".join(f"{'+'.join(m)} {v:.3f}" for m, v in beam))
    return 0


def _objective(args: argparse.Namespace):
    from megablocks_ablate.ablate.runner.propose import BlendObjective
    from megablocks_ablate.errors import ConfigError

    if args.domain_weights:
        if args.domains:
            raise ConfigError("give --domains or --domain-weights, not both")
        items = [it.strip() for it in args.domain_weights.split(",") if it.strip()]
        weights = _name_values("--domain-weights", items, "domain=weight (e.g. docs=2)")
        return BlendObjective("weighted", domain_weights=tuple(weights.items()))
    domains = [d.strip() for d in (args.domains or "").split(",") if d.strip()]
    return BlendObjective("geomean", domains=tuple(domains))


def run_optimize(args: argparse.Namespace) -> int:
    from megablocks_ablate.ablate.runner import load_study
    from megablocks_ablate.ablate.search import megatron_data_path, training_blend
    from megablocks_ablate.commands.study_outputs import check_optimize_out, study_inputs
    from megablocks_ablate.utils.atomic import atomic_write_json
    from megablocks_ablate.utils.hashing import sha256_json
    from megablocks_ablate.utils.output_files import output_lock

    study = load_study(args.spec, args.overrides)
    objective = _objective(args)
    if objective.kind == "geomean" and not objective.domains:
        objective = type(objective)("geomean", domains=tuple(study.eval_sets))
    over = [p.strip() for p in args.over.split(",") if p.strip()] if args.over else None
    request = {
        "objective": objective.describe(),
        "over": over or list(study.partitions),
        "proxy": args.proxy,
        "budget": args.budget,
        "step": args.step,
        "min_share": args.min_share,
    }
    out = args.out or os.path.join(
        study.spec.out_dir, "optimize", f"{sha256_json(request)[:12]}.json"
    )
    inputs = study_inputs(args.spec, study)
    check_optimize_out(out, inputs)  # before any merge: never replace a file we did not write
    # one optimize into one result at a time: a second is refused at once, naming this one
    runner = _pool_runner(study, args)  # checks the window first: a refusal writes nothing
    try:
        with output_lock(out, f"study optimize --out {out}"):
            check_optimize_out(out, inputs)  # again, holding the lock
            result = runner.optimize(
                objective,
                over=over,
                proxy=args.proxy,
                budget=args.budget,
                step=args.step,
                min_share=args.min_share,
                regression=not args.no_regression,
            )
            m = result.mixture
            train = {"data": training_blend(m, study.manifest_dir)}
            megatron = megatron_data_path(m, study.unit_paths)
            check_optimize_out(out, inputs)  # a file that appeared meanwhile is not replaced
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            atomic_write_json(
                out,
                {
                    "request": request,
                    **result.to_dict(),
                    "export": {"train": train, "megatron": megatron},
                },
            )
    finally:
        runner.close()
    _print_optimize(args, objective, result, out, train, megatron)
    return 0


def _print_optimize(args, objective, result, out: str, train: dict, megatron: str) -> None:
    import yaml

    m, s = result.mixture, result.search
    print(
        f"best blend by {args.proxy} ({objective.describe()}): {m.label} -> "
        f"{result.best.objective:.4f} [{result.best.kind}]; {s.calls} search points "
        f"({s.stop_reason}), {result.merged_now} merged and evaluated now, the rest read "
        "from the store"
    )
    start = s.path[0]
    print(f"  start {_blend_text(start.blend)}: {start.objective:.4f}")
    if result.regression is not None and result.regression_point is not None:
        r = result.regression
        print(
            f"  regression (log objective ~ quadratic in shares; {r.n_points} points, "
            f"R^2 {r.r2:.3f}{', underdetermined' if r.underdetermined else ''}): optimum "
            f"{_blend_text(result.regression_point.blend)} predicted "
            f"{r.predict(result.regression_point.blend):.4f}, scored "
            f"{result.regression_point.objective:.4f}"
        )
    print(f"  path and exports: {out}")
    print("  train config data section:")
    print("    " + yaml.safe_dump(train, sort_keys=False).rstrip().replace("\n", "\n    "))
    print(f"  Megatron --data-path: {megatron}")


def _blend_text(blend: dict[str, float]) -> str:
    return ", ".join(f"{p}={v:.3f}" for p, v in blend.items())
