"""`megablocks-ablate study`: plan, run and report a data-ablation study.

    megablocks-ablate study plan configs/studies/demo.yaml [key=value ...]
    megablocks-ablate study run configs/studies/demo.yaml [key=value ...] [--dry-run]
    torchrun --nproc-per-node 8 -m megablocks_ablate study run study.yaml
    megablocks-ablate study report --store runs/demo/results.sqlite [--out report/]
    megablocks-ablate study report configs/studies/demo.yaml
    megablocks-ablate study search configs/studies/demo.yaml --k 4 --domains docs,core
    megablocks-ablate study export configs/studies/demo.yaml --mixture docs,core,gui

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
the paper's equal-partition weights.
"""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="plan a data-ablation study, or report its results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="study_command", metavar="ACTION")
    actions.required = True
    for add in (_add_plan, _add_run, _add_report, _add_search, _add_export):
        add(actions)


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="study YAML (see configs/studies/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the spec")


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
        type=int,
        default=16384,
        help="evaluation: padded tokens per forward (default 16384)",
    )
    run.add_argument(
        "--stride",
        type=int,
        default=None,
        help="evaluation: sliding-window stride (default: non-overlapping windows)",
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
        "spec", nargs="?", help="study YAML (the store is <out_dir>/results.sqlite)"
    )
    report.add_argument("overrides", nargs="*", help="key=value overrides of the spec")
    report.add_argument("--store", help="results store (instead of a spec)")
    report.add_argument("--out", help="report directory (default: report/ beside the store)")
    report.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for confidence intervals (default 1000)",
    )
    report.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    report.add_argument("--top-k", type=int, default=3, help="k of the top-k agreement")
    report.add_argument("--no-plots", action="store_true", help="skip the PNG scatter plots")
    report.set_defaults(func=run_report)


def _add_search(actions: argparse._SubParsersAction) -> None:
    search = actions.add_parser(
        "search",
        help="beam search for the best k-mixture, merging and evaluating mixtures not yet scored",
    )
    _spec_args(search)
    search.add_argument("--k", type=int, required=True, help="partitions in the mixture")
    search.add_argument("--proxy", default="macro", choices=["merged", "macro", "micro"])
    search.add_argument(
        "--domains",
        help="comma-separated evaluation domains to optimise "
        "(default: all; the score is their geometric-mean perplexity)",
    )
    search.add_argument("--beam", type=int, default=4, help="beam width (1 = greedy)")
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
        help="comma-separated partitions of the study, e.g. docs,core,gui",
    )
    export.add_argument(
        "--format",
        choices=["train", "megatron"],
        default="train",
        help="train: YAML data section for `megablocks-ablate train`; "
        "megatron: a --data-path value (default: train)",
    )
    export.set_defaults(func=run_export)


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

    study = load_study(args.spec, args.overrides)  # every spec error before any work
    opts = RunOptions(
        registry=args.registry,
        save_merged=args.save_merged,
        device=args.device,
        batch_tokens=args.batch_tokens,
        stride=args.stride,
        lock_timeout_s=None if args.wait else 0.0,
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
    if args.spec:
        from megablocks_ablate.ablate.spec import StudySpec

        path = store_path(StudySpec.load(args.spec, args.overrides).out_dir)
    else:
        path = args.store
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no results store (run the study first)")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "report")
    with ResultStore(path) as store:
        summary = write_report(
            store,
            out,
            n_boot=args.bootstrap,
            seed=args.seed,
            top_k=args.top_k,
            plots=not args.no_plots,
        )
    print(summary.headline())
    return 0


def run_export(args: argparse.Namespace) -> int:
    import yaml

    from megablocks_ablate.ablate.mixtures import Mixture
    from megablocks_ablate.ablate.runner import load_study
    from megablocks_ablate.ablate.search import megatron_data_path, training_blend
    from megablocks_ablate.errors import ConfigError

    study = load_study(args.spec, args.overrides)
    names = [n.strip() for n in args.mixture.split(",") if n.strip()]
    unknown = [n for n in names if n not in study.partitions]
    if not names or unknown:
        raise ConfigError(
            f"--mixture: unknown partition {unknown[0]!r} (study partitions: "
            f"{', '.join(study.partitions)})"
            if unknown
            else "--mixture: give at least one partition"
        )
    mixture = Mixture.of({n: study.partitions[n] for n in names})
    if args.format == "megatron":
        print(megatron_data_path(mixture, study.unit_paths))
    else:
        print(
            yaml.safe_dump({"data": training_blend(mixture, study.manifest_dir)}, sort_keys=False),
            end="",
        )
    return 0


def run_search(args: argparse.Namespace) -> int:
    from megablocks_ablate.ablate.runner import RunOptions, StudyRunner, load_study

    study = load_study(args.spec, args.overrides)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    runner = StudyRunner(study, RunOptions())
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
