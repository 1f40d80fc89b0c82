"""Variants of the Fisher merge, scored on a finished study without touching it.

    python benchmarks/fisher_variants.py VARIANT STUDY_SPEC --registry STUDY_DIR --out NAME
        [--alpha A] [--lam L]

An experiment harness for docs/fidelity.md, not package code: it runs the package's
``study run`` with the ``fisher`` proxy, replacing, for this process only, either the
Fisher each unit model is weighted by or the merge rule. VARIANT is one of

* ``regmean``: the Linear layers merged by RegMean's rule, the displacement
  ``(sum_u w_u d_u A_u) (sum_u w_u A_u)^-1`` with ``A_u`` the Gram matrix of the layer's
  inputs on the unit's first ``fisher.sequences`` training sequences (off-diagonal
  entries scaled by ``--alpha``); the embedding and norms by the diagonal Fisher merge;
* ``seed``: the diagonal Fisher merge, with each unit's Fisher computed at the seed's
  weights (on the unit's own sequences) instead of the unit model's;
* ``path``: the diagonal Fisher merge with each unit's Fisher the mean of the two
  above (at the seed's and at the unit's weights): the curvature along the unit's
  training, by the trapezoid rule over its two ends;
* ``agree``: where every unit moved a parameter the same way, the curvature-weighted
  *sum* of their moves, ``sum_u w_u G_u d_u / max_u w_u G_u`` (two units of equal
  curvature: both moves added, as a seq model trained on both takes the steps of both;
  one unit that dominates: its own move); elsewhere the Fisher merge;
* ``scaled``: the diagonal Fisher merge moved ``--lam`` times as far from the seed;
* ``relnorm``: the package's ``fisher.stretch`` (:mod:`megablocks_ablate.merge.stretch`)
  set to ``--gamma`` in the copy's spec: each tensor's displacement from the seed
  stretched by ``(r / r_mean) ** gamma``, ``r`` the weighted mean length of the mixture's
  unit displacements over the length of the merged one and ``r_mean`` its mean over the
  study's equal-weight groups of the mixture's size (``merge_rules.py``'s
  ``relnorm-tensor``, on the Fisher merge; the spec's ``fisher.stretch_max_models``
  applies). It was measured here before it was the default, with the
  harness's own implementation (commit 1464576).

Every variant but ``relnorm`` starts from the Fisher merge with ``fisher.stretch`` 0;
the study's other ``fisher`` settings are kept. The study's store is copied into ``<spec dir>/NAME`` (its seq and merged rows kept,
its fisher rows dropped) and the spec with ``out_dir: NAME`` written next to it, so
the new fisher rows are judged against the study's own seq models; the study itself
is only read. Per-unit Gram matrices and seed Fishers are cached as safetensors in
``NAME/variant-cache``. Compare with ``benchmarks/fidelity.py`` on ``NAME/report``.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys

import torch
import yaml
from safetensors.torch import load_file, save_file

import megablocks_ablate.ablate.runner.fisher as runner_fisher
from megablocks_ablate.ablate.store import ResultStore
from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.merge.fisher import empirical_fisher, fisher_merge, unit_curvatures


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", choices=["regmean", "seed", "path", "scaled", "agree", "relnorm"])
    ap.add_argument("spec", help="the finished study's spec (YAML)")
    ap.add_argument("--registry", required=True, help="the study directory holding its models")
    ap.add_argument("--out", required=True, help="new out_dir name, next to the spec")
    ap.add_argument("--alpha", type=float, default=0.9, help="regmean: off-diagonal scale")
    ap.add_argument("--lam", type=float, default=1.5, help="scaled: the multiple")
    ap.add_argument("--gamma", type=float, default=1.0, help="relnorm: the exponent")
    return ap.parse_args(argv)


def linear_names(model: torch.nn.Module) -> dict[str, str]:
    """parameter name -> module name, for every Linear layer's weight."""
    return {
        f"{name}.weight": name
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }


def input_grams(model, sequences, batch: int = 64) -> dict[str, torch.Tensor]:
    """Mean of x x^T over every token's input x of each Linear layer."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    modules = dict(model.named_modules())
    hooks = []
    for param, name in linear_names(model).items():

        def hook(_mod, inputs, _out, key=param):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[key] = sums.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(modules[name].register_forward_hook(hook))
    seqs = list(sequences)
    model.train(False)
    try:
        with torch.no_grad():
            for i in range(0, len(seqs), batch):
                tokens = torch.stack(seqs[i : i + batch]).long()
                model(tokens[:, :-1], tokens[:, 1:])
    finally:
        for h in hooks:
            h.remove()
    return {k: (s / counts[k]).contiguous() for k, s in sums.items()}


def regmean_merge(seed, deltas, grams, weights, alpha: float) -> dict[str, torch.Tensor]:
    """For each tensor the Grams name (weights ``[out, in]``): ``seed + (sum_u w_u d_u A_u)
    (sum_u w_u A_u)^-1``, the minimiser of ``sum_u w_u ||X_u (W - W_u)^T||^2`` over the
    units' inputs, with each ``A_u``'s off-diagonal entries scaled by ``alpha``."""
    out = {}
    for k in grams[0]:
        num = torch.zeros_like(deltas[0][k])
        den = torch.zeros_like(grams[0][k])
        for d, g, w in zip(deltas, grams, weights):
            a = alpha * g[k] + (1 - alpha) * torch.diag(torch.diag(g[k]))
            num += w * d[k] @ a
            den += w * a
        den += 1e-6 * torch.diag(den).mean() * torch.eye(den.shape[0])
        out[k] = seed[k] + torch.linalg.solve(den, num.T).T  # num den^-1 (den symmetric)
    return out


def agree_merge(seed, deltas, fishers, weights, eps, power, fisher_merged):
    """The ``agree`` variant: where all units' moves share a sign, ``sum_u w_u G_u d_u /
    max_u w_u G_u`` with the Fisher merge's ``G_u``; elsewhere ``fisher_merged``."""
    out = {}
    for k, merged in fisher_merged.items():
        curv = unit_curvatures(fishers, k, eps, power)
        if curv is None:
            out[k] = merged
            continue
        wg = [w * c for w, c in zip(weights, curv)]
        signs = torch.stack([torch.sign(d[k]) for d in deltas])
        same = (signs == signs[0]).all(dim=0) & (signs[0] != 0)
        total = sum(g * d[k] for g, d in zip(wg, deltas))
        summed = seed[k] + total / torch.stack(wg).amax(dim=0)
        out[k] = torch.where(same, summed, merged)
    return out


def cached(path: str, compute) -> dict[str, torch.Tensor]:
    if os.path.exists(path):
        return load_file(path)
    tensors = {k: v.contiguous() for k, v in compute().items()}
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
    return tensors


def install(args, cache_dir: str):
    """Replace the fisher runner's inputs or merge in this process; returns the undo."""
    from megablocks_ablate.model.loading import load_model

    grams_of: dict[int, dict[str, torch.Tensor]] = {}  # id(unit's deltas) -> its Grams
    original_load = runner_fisher._load_inputs

    def load_inputs(plan, jobs, spec, device):
        inputs = original_load(plan, jobs, spec, device)
        seed_model = None
        for u, job in jobs.items():
            sha = inputs.hashes[u]
            if args.variant == "regmean":
                grams_of[id(inputs.deltas[u])] = cached(
                    os.path.join(cache_dir, f"grams-{sha}.safetensors"),
                    lambda j=job: input_grams(
                        load_model(j.entry.model_dir, device)[0],
                        runner_fisher._unit_sequences(j, spec.sequences),
                    ),
                )
            elif args.variant in ("seed", "path"):
                if seed_model is None:
                    seed_model = load_model(plan.seed_dir, device)[0]
                seqs = runner_fisher._unit_sequences(job, spec.sequences)
                at_seed = cached(
                    os.path.join(cache_dir, f"seed-fisher-{sha}.safetensors"),
                    lambda m=seed_model, s=seqs: empirical_fisher(m, s, spec.batch),
                )
                if args.variant == "seed":
                    inputs.fishers[u] = at_seed
                else:
                    inputs.fishers[u] = {
                        k: 0.5 * (v + at_seed[k]) for k, v in inputs.fishers[u].items()
                    }
        return inputs

    def merge(seed, deltas, fishers, weights, eps, power=1.0):
        out = fisher_merge(seed, deltas, fishers, weights, eps, power)
        if args.variant == "scaled":
            return {k: seed[k] + args.lam * (v - seed[k]) for k, v in out.items()}
        if args.variant == "agree":
            out.update(agree_merge(seed, deltas, fishers, weights, eps, power, out))
        if args.variant == "regmean":
            grams = [grams_of[id(d)] for d in deltas]
            out.update(regmean_merge(seed, deltas, grams, weights, args.alpha))
        return out

    saved = (runner_fisher._load_inputs, runner_fisher.fisher_merge)
    runner_fisher._load_inputs = load_inputs
    runner_fisher.fisher_merge = merge

    def restore() -> None:
        runner_fisher._load_inputs, runner_fisher.fisher_merge = saved

    return restore


def main(argv=None) -> int:
    args = parse_args(argv)
    with open(args.spec) as f:
        spec = yaml.safe_load(f)
    base = os.path.dirname(os.path.abspath(args.spec))
    src = os.path.join(base, spec["out_dir"], "results.sqlite")
    dst_dir = os.path.join(base, args.out)
    new_spec = os.path.join(base, args.out + ".yaml")
    for taken in (dst_dir, new_spec):  # both checked before anything is written
        if os.path.exists(taken):
            sys.exit(f"fisher_variants: {taken} exists; choose another --out")
    if not os.path.exists(src):
        sys.exit(f"fisher_variants: no results store {src} (run the study first)")
    cache_dir = os.path.join(dst_dir, "variant-cache")
    os.makedirs(cache_dir)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    copy = sqlite3.connect(os.path.join(dst_dir, "results.sqlite"))
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()
    with ResultStore(os.path.join(dst_dir, "results.sqlite")) as store:
        store.drop_proxy(runner_fisher.FISHER)
    spec["out_dir"] = args.out
    spec["proxies"] = ["merged", "fisher"]
    # every variant is one of the Fisher merge without the package's relative stretch,
    # but relnorm, which is that stretch at --gamma
    stretch = args.gamma if args.variant == "relnorm" else 0.0
    spec["fisher"] = {**(spec.get("fisher") or {}), "stretch": stretch}
    with open(new_spec, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    restore = install(args, cache_dir)
    try:
        return cli_main(
            [
                "study",
                "run",
                new_spec,
                "--registry",
                args.registry,
                "--report",
                "--cpu-workers",
                "1",
            ]
        )
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
