"""The ``fisher`` proxy (beyond the paper): each mixture's unit models merged
parameter by parameter in proportion to their own data's Fisher information.

See :mod:`megablocks_ablate.merge.fisher` for the rule and why it approximates a
model trained on the union. Here the study gets it:

1. for every unit (or partition-level) model a mixture merges, its diagonal empirical
   Fisher on its own training sequences (the first ``fisher.sequences`` of its data
   order, at the trained weights), computed once and kept in the model's run directory
   (``fisher-s<N>-b<B>.safetensors``: the settings are in the name, and the file names
   the sha256 of the weights it was computed for, checked on every read);
2. every mixture merged by :func:`~megablocks_ablate.merge.fisher.fisher_merge` from the
   seed (hash-checked against the units' lineage), the units' weights (hash-checked) and
   those Fishers, each partition weighted as its seq model trains it
   (:func:`fisher_weights`), and scored as proxy ``fisher``;
3. with ``fisher.stretch`` > 0, each merge's displacement stretched tensor by tensor
   by its shortening relative to the mean over equal-weight groups of the study's
   models of the mixture's size (mixtures of at most ``fisher.stretch_max_models``)
   (:mod:`megablocks_ablate.merge.stretch`; every model the study merges is loaded for
   that reference, and its names are part of the recorded settings).

Each row's provenance records the unit hashes, the weights, the Fisher files' settings
and ``eps``; the store's meta ``fisher`` records the settings of its rows, and a run with
other settings replaces them (the study wrote them, and they are no longer this proxy).
The rows are comparable with ``merged`` (same mixtures, same suite).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.mixtures import Mixture
from megablocks_ablate.ablate.runner.plan import ModelJob, RunPlan
from megablocks_ablate.ablate.store import Result, ResultStore, make_provenance
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.merge.fisher import (
    empirical_fisher,
    fisher_file_problem,
    fisher_merge,
    fisher_path,
    load_fisher,
    save_fisher,
)
from megablocks_ablate.merge.stretch import reference_groups, reference_shortening, stretch_merge
from megablocks_ablate.model.config import ModelConfig
from megablocks_ablate.utils.progress import progress

logger = logging.getLogger(__name__)

FISHER = "fisher"
META_KEY = "fisher"  # the store's record of the settings its fisher rows were made with


def _unit_sequences(job: ModelJob, n: int):
    """The first ``n`` training sequences of ``job``'s data order (``seq_len + 1``
    tokens each): what the model was trained on, in the order it saw them."""
    from megablocks_ablate.train.data import build_mixture

    mix, _, _ = build_mixture(job.cfg)
    for i in range(min(n, len(mix))):
        yield torch.from_numpy(mix[i])


def ensure_fisher(
    job: ModelJob, model_sha256: str, sequences: int, batch: int, device: str | torch.device
) -> str:
    """The path of ``job``'s Fisher file, computed now unless one for these exact
    weights and settings is there. A file at that path that this program did not write,
    or wrote for other weights, is refused, never replaced."""
    from megablocks_ablate.model.loading import load_model

    path = fisher_path(job.entry.out_dir, sequences, batch)
    if os.path.exists(path):
        problem = fisher_file_problem(path, model_sha256)
        if problem is None:
            return path
        kind, why = problem
        hint = "move it away" if kind == "foreign" else "delete it to recompute"
        raise ConfigError(f"{why}; {hint}")
    model, _ = load_model(job.entry.model_dir, device)
    fisher = empirical_fisher(model, _unit_sequences(job, sequences), batch)
    save_fisher(
        path,
        fisher,
        {
            "model_sha256": model_sha256,
            "sequences": sequences,
            "batch": batch,
            "seq_len": job.cfg.seq_len,
            "unit": job.name,
        },
    )
    logger.info("[fisher] %s: %d sequences -> %s", job.name, sequences, path)
    return path


def fisher_and_score(scorer, store: ResultStore, plan: RunPlan, mixtures: Sequence[Mixture]):
    """Compute the Fisher of every model the mixtures merge (where missing), then score
    every mixture not yet in the store as proxy ``fisher``; returns how many were scored."""
    study, spec = scorer.study, scorer.study.spec.fisher
    settings, reference_models = _settings(study, spec, mixtures)
    _sync_settings(store, settings)
    row_settings = {k: v for k, v in settings.items() if k != "stretch_reference"}
    todo = [m for m in mixtures if not store.done(m.id, FISHER, scorer.domains)]
    if not todo:
        return 0
    weights = {m.id: fisher_weights(study, m) for m in todo}
    needed = {u for w in weights.values() for u in w} | set(reference_models)
    jobs = {j.name: j for j in plan.pool_jobs if j.name in needed}
    if set(jobs) != needed:
        raise ConfigError(f"fisher: no trained model for {sorted(needed - set(jobs))}")
    inputs = _load_inputs(plan, jobs, spec, scorer.opt.device)
    merge = _mixture_merge(inputs, spec, reference_models)
    live = inputs.model_cfg.build(device="cpu").to(scorer.opt.device)
    with progress(total=len(todo), desc="fisher merges", unit="merge") as bar:
        for m in todo:
            w = weights[m.id]
            units = list(w)
            live.load_state_dict(merge(units, [w[u] for u in units]))
            trained = min(inputs.trained[u] for u in units)
            scores = scorer.evaluate(live, f"the Fisher merge of {m.label}", trained)
            prov = make_provenance(
                unit_hashes={u: inputs.hashes[u] for u in units},
                weights=w,
                eval_fingerprint=scorer.fingerprint,
                proxies=[FISHER],
                fisher=row_settings,
                **scorer.window_provenance(trained),
            )
            store.add_results([Result(m.id, FISHER, d, s, prov) for d, s in scores.items()])
            bar.update(1)
    logger.info(
        "[fisher] %d mixtures scored (eps %g, power %g, stretch %g)",
        len(todo),
        spec.eps,
        spec.power,
        spec.stretch,
    )
    return len(todo)


def _sync_settings(store: ResultStore, settings: dict) -> None:
    """Record the settings of the store's fisher rows; rows made with other settings are
    not this proxy, so they are dropped (the study wrote them) and scored again."""
    recorded = store.get_meta(META_KEY)
    if recorded == settings:
        return
    dropped = store.drop_proxy(FISHER)
    if dropped:
        logger.info(
            "[fisher] settings changed %s -> %s: %d old rows replaced", recorded, settings, dropped
        )
    store.set_meta(META_KEY, settings)


@dataclass
class _Inputs:
    """What every Fisher merge of a study reads (fp32, CPU)."""

    model_cfg: ModelConfig
    seed: dict[str, torch.Tensor]
    deltas: dict[str, dict[str, torch.Tensor]]  # unit -> unit - seed
    fishers: dict[str, dict[str, torch.Tensor]]
    hashes: dict[str, str]  # unit -> verified sha256 of its weights
    trained: dict[str, int]  # unit -> the sequence length it was trained at


def _load_inputs(plan: RunPlan, jobs: dict[str, ModelJob], spec, device) -> _Inputs:
    """Hash-check the units and their one seed, compute missing Fishers, load it all."""
    from megablocks_ablate.ablate.runner.scaled import SEED_ROW, SeedRow
    from megablocks_ablate.checkpoint import (
        load_model_checkpoint,
        read_checkpoint_meta,
        trained_seq_len,
    )

    hashes = {u: j.verified_sha256() for u, j in jobs.items()}
    lineages = {u: read_checkpoint_meta(j.entry.model_dir)[1] for u, j in jobs.items()}
    seed_hashes = {lin.seed_hash for lin in lineages.values()}
    if len(seed_hashes) != 1 or None in seed_hashes:
        raise ConfigError(
            "fisher: the unit models do not record one seed they continue "
            f"({sorted(map(str, seed_hashes))}); the Fisher merge moves from it"
        )
    SeedRow(SEED_ROW, plan.seed_dir, str(seed_hashes.pop())).verified_sha256()
    paths = {}
    with progress(total=len(jobs), desc="fisher", unit="model") as bar:
        for u in sorted(jobs):
            paths[u] = ensure_fisher(jobs[u], hashes[u], spec.sequences, spec.batch, device)
            bar.update(1)
    seed_state, config, _ = load_model_checkpoint(plan.seed_dir)
    seed = {k: v.float() for k, v in seed_state.items()}
    model_cfg = ModelConfig.from_dict(config)
    names = [n for n, p in model_cfg.build(device="meta").named_parameters() if p.requires_grad]
    shapes = {k: seed[k].shape for k in names}  # a Fisher holds one tensor per parameter
    deltas, fishers = {}, {}
    for u in sorted(jobs):
        state = load_model_checkpoint(jobs[u].entry.model_dir)[0]
        deltas[u] = {k: state[k].float() - seed[k] for k in seed}
        fishers[u] = load_fisher(paths[u], hashes[u], shapes)
    max_len = model_cfg.max_seq_len
    trained = {
        u: trained_seq_len(lin, max_len, jobs[u].entry.model_dir) for u, lin in lineages.items()
    }
    return _Inputs(model_cfg, seed, deltas, fishers, hashes, trained)


def _settings(study, spec, mixtures: Sequence[Mixture]) -> tuple[dict[str, object], list[str]]:
    """The settings the store's fisher rows are made with, and the models the stretch's
    reference is taken over (every model the study's mixtures merge; none without it)."""
    settings: dict[str, object] = {
        "sequences": spec.sequences,
        "batch": spec.batch,
        "eps": spec.eps,
        "power": spec.power,
    }
    if not spec.stretch:
        return settings, []
    reference_models = sorted({u for m in mixtures for u in fisher_weights(study, m)})
    if len(reference_models) < 2:
        raise ConfigError(
            "fisher.stretch: the study merges fewer than two models, so there is no "
            "shortening to undo; set fisher.stretch=0"
        )
    settings["stretch"] = spec.stretch
    settings["stretch_max_models"] = spec.stretch_max_models
    settings["stretch_reference"] = reference_models
    return settings, reference_models


def _mixture_merge(inputs: _Inputs, spec, reference_models: Sequence[str]):
    """``merge(units, weights)``: the Fisher merge of those units, stretched
    (:mod:`megablocks_ablate.merge.stretch`) when ``fisher.stretch`` > 0, relative to the
    mean over equal-weight groups of ``reference_models`` of the mixture's size (each
    size's reference computed the first time a mixture of that size is merged); a
    mixture of more than ``fisher.stretch_max_models`` models is left unstretched."""

    def fisher(units: Sequence[str], w: Sequence[float]) -> dict[str, torch.Tensor]:
        deltas = [inputs.deltas[u] for u in units]
        fishers = [inputs.fishers[u] for u in units]
        return fisher_merge(inputs.seed, deltas, fishers, w, spec.eps, spec.power)

    if not spec.stretch:
        return fisher
    references: dict[int, dict[str, float]] = {}
    pool = {u: inputs.deltas[u] for u in reference_models}

    def reference(size: int) -> dict[str, float]:
        if size not in references:
            n = len(reference_groups(reference_models, size))
            desc = f"fisher stretch reference ({size} models)"
            with progress(total=n, desc=desc, unit="group") as bar:

                def group_merge(group: Sequence[str]) -> dict[str, torch.Tensor]:
                    bar.update(1)
                    return fisher(group, [1.0 / size] * size)

                references[size] = reference_shortening(inputs.seed, pool, group_merge, size)
        return references[size]

    def stretched(units: Sequence[str], w: Sequence[float]) -> dict[str, torch.Tensor]:
        merged = fisher(units, w)
        if not 2 <= len(units) <= spec.stretch_max_models:
            return merged
        deltas = [inputs.deltas[u] for u in units]
        return stretch_merge(inputs.seed, deltas, w, merged, reference(len(units)), spec.stretch)

    return stretched


def fisher_weights(study, mixture: Mixture) -> dict[str, float]:
    """The merge weights of the Fisher merge: each partition an equal share (or the
    mixture's), as its seq model trains: the partition-level models when the study
    trains them (``merged``), else ``macro`` over the unit models (the same as
    ``merged`` when every partition is one unit)."""
    proxy = "merged" if study.partition_models else "macro"
    return mx.proxy_weights(mixture, proxy, study.partition_models)
