"""bf16-delta pool rows: bf16(unit - seed) plus one fp32 seed (merge/pool_delta.py).

Against the fp32 merge: within the rounding of the deltas, at least 10x closer than
plain bf16 rows, exact for weights that do not sum to 1; the seed is checked against
the units' recorded seed_hash; the format is validated, sized and recorded.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch
from merge_fixtures import CONFIG, TinyLM, merged_flats

from megablocks_ablate.checkpoint import Lineage, model_hash, save_model_checkpoint
from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.merge import pool_placement as pp
from megablocks_ablate.merge.pool import ModelPool
from megablocks_ablate.merge.pool_delta import Seed, find_seed, format_name, units_seed_hash
from megablocks_ablate.merge.pool_host import HostPool, host_dir_usage, row_file_name
from megablocks_ablate.merge.pool_placement import (
    MemoryFigures,
    PoolRequest,
    PoolSize,
    choose_placement,
    open_pool,
)

UNITS = ("a", "b", "c", "d")
WEIGHTS = [
    [0.25, 0.25, 0.25, 0.25],
    {"a": 0.5, "c": 0.5},
    [0.3, 0.3, 0.0, 0.0],  # sums to 0.6
    [1.5, -0.5, 0.0, 0.0],  # task arithmetic
    [0.125, 0.375, 0.5, 0.5],  # sums to 1.5 (a scaled merge)
]
GB = 10**9


def write_continuations(
    root: str,
    noise: float = 1e-3,
    units=UNITS,
    parents: bool = True,
    kind: str = "unit",
    seed_values=None,
    deltas=None,
) -> tuple[str, dict[str, str]]:
    """A seed and units = seed + ``noise`` x each tensor's std x N(0, 1) (how far a short
    continuation moves the weights); ``parents`` records the seed as their parent, as
    the trainer does. ``seed_values``/``deltas``: exact values instead (callables of
    (name, tensor) and (unit index, name, tensor))."""
    torch.manual_seed(0)
    seed_sd = {k: v.detach().clone() for k, v in TinyLM(**CONFIG).state_dict().items()}
    if seed_values is not None:
        seed_sd = {k: seed_values(k, v) for k, v in seed_sd.items()}
    seed_dir = os.path.join(root, "seed")
    save_model_checkpoint(
        seed_dir, seed_sd, CONFIG, Lineage(kind="seed", tokenizer_fingerprint="tok")
    )
    seed_hash = model_hash(seed_dir)
    out = {}
    for i, unit in enumerate(units):
        g = torch.Generator().manual_seed(10 + i)
        if deltas is not None:
            sd = {k: v + deltas(i, k, v) for k, v in seed_sd.items()}
        else:
            sd = {
                k: v + noise * float(v.std()) * torch.randn(v.shape, generator=g)
                for k, v in seed_sd.items()
            }
        d = os.path.join(root, "pool", unit)
        save_model_checkpoint(
            d,
            sd,
            CONFIG,
            Lineage(
                kind=kind,
                seed_hash=seed_hash,
                units=[unit],
                weights=[1.0],
                tokenizer_fingerprint="tok",
                parents=[seed_dir] if parents else [],
            ),
        )
        out[unit] = d
    return seed_dir, out


def _merges(ckpts, dtype=torch.float32, seed=None):
    pool = ModelPool.from_checkpoints(ckpts, dtype=dtype, show_progress=False, seed=seed)
    return merged_flats(pool, WEIGHTS)


def _units(ckpts) -> torch.Tensor:
    """[N, P] fp32 unit models in the pool's row layout (first checkpoint's order)."""
    return ModelPool.from_checkpoints(ckpts, show_progress=False).rows.clone()


# --------------------------------------------------------------------------- accuracy


def test_delta_rows_merge_within_bf16_of_the_deltas_and_10x_closer_than_plain(tmp_path):
    seed_dir, ckpts = write_continuations(str(tmp_path))
    seed, why = find_seed(ckpts, seed_dir)
    assert seed is not None and why == ""
    exact = _merges(ckpts)
    plain = _merges(ckpts, torch.bfloat16)
    delta = _merges(ckpts, torch.bfloat16, seed)
    units = _units(ckpts)
    base = ModelPool.from_checkpoints({"s": seed_dir}, show_progress=False).rows[0]
    for w, e, p, d in zip(WEIGHTS, exact, plain, delta):
        ws = torch.tensor([w.get(u, 0.0) for u in UNITS] if isinstance(w, dict) else w)
        # each delta rounded once to bf16 (relative 2^-8 at most), plus fp32 roundings
        bound = (ws.abs()[:, None] * (units - base).abs()).sum(0) * 2.0**-8
        bound += 1e-6 * (ws.abs()[:, None] * units.abs()).sum(0) + 1e-7
        assert bool(((d - e).abs() <= bound).all())
        err_plain, err_delta = float((p - e).abs().max()), float((d - e).abs().max())
        assert err_delta * 10 <= err_plain, (err_plain, err_delta)


def test_the_identity_is_exact_for_weights_not_summing_to_one(tmp_path):
    """Dyadic seed values and deltas that bf16 holds exactly: every fp32 operation of
    either merge is exact, so seed * sum(w) + sum w_i delta_i equals sum w_i unit_i
    bitwise, whatever the weights sum to (0.6 is not dyadic: compared to within fp32)."""

    def seed_values(name, v):
        g = torch.Generator().manual_seed(len(name))
        return torch.randint(-64, 65, v.shape, generator=g).float() / 64

    def deltas(i, name, v):
        g = torch.Generator().manual_seed(100 * i + len(name))
        return torch.randint(-8, 9, v.shape, generator=g).float() / 1024

    seed_dir, ckpts = write_continuations(str(tmp_path), seed_values=seed_values, deltas=deltas)
    seed = find_seed(ckpts, seed_dir)[0]
    exact, delta = _merges(ckpts), _merges(ckpts, torch.bfloat16, seed)
    for w, e, d in zip(WEIGHTS, exact, delta):
        if w == [0.3, 0.3, 0.0, 0.0]:
            torch.testing.assert_close(d, e, rtol=2e-7, atol=1e-7)
        else:
            assert torch.equal(d, e), w
    # weights summing to 0 (a difference of units): the seed's weight is 0, skipped
    pool = ModelPool.from_checkpoints(ckpts, dtype=torch.bfloat16, show_progress=False, seed=seed)
    units = _units(ckpts)
    got = merged_flats(pool, [[1.0, -1.0, 0.0, 0.0]])[0]
    assert torch.equal(got, units[0] - units[1])


# --------------------------------------------------------------------------- the seed


def test_a_seed_that_is_not_the_units_seed_is_refused_naming_it(tmp_path):
    seed_dir, ckpts = write_continuations(str(tmp_path / "one"))
    other_seed, _ = write_continuations(str(tmp_path / "two"), noise=0.5)
    # a different checkpoint: its hash is not the one the units record
    save_model_checkpoint(
        other_seed,
        {k: v + 1 for k, v in TinyLM(**CONFIG).state_dict().items()},
        CONFIG,
        Lineage(kind="seed", tokenizer_fingerprint="tok"),
    )
    weights = os.path.join(other_seed, "model.safetensors")
    with pytest.raises(DataFormatError, match=f"{weights}: sha256 .* differs"):
        find_seed(ckpts, other_seed)
    with pytest.raises(DataFormatError, match=weights):
        open_pool(ckpts, PoolRequest("resident", "bf16"), seed_dir=other_seed)
    # a Seed claiming the right hash for other bytes is caught where rows are loaded
    with pytest.raises(DataFormatError, match=weights):
        ModelPool.from_checkpoints(
            ckpts, dtype=torch.bfloat16, seed=Seed(other_seed, model_hash(seed_dir))
        )
    # and a Seed whose hash the units do not record
    with pytest.raises(ConfigError, match="not the seed the pool's checkpoints continue"):
        ModelPool.from_checkpoints(
            ckpts, dtype=torch.bfloat16, seed=Seed(other_seed, model_hash(other_seed))
        )


def test_the_seed_is_found_as_the_units_recorded_parent(tmp_path, caplog):
    seed_dir, ckpts = write_continuations(str(tmp_path))
    pool, choice = open_pool(ckpts, PoolRequest("resident", "bf16"), show_progress=False)
    assert choice.size.row_format == pool.row_format == "bf16-delta"
    assert pool.seed is not None and pool.seed.model_dir == seed_dir
    # the parent changed since the units were trained from it: plain rows, and why
    save_model_checkpoint(
        seed_dir,
        {k: v + 1 for k, v in TinyLM(**CONFIG).state_dict().items()},
        CONFIG,
        Lineage(kind="seed", tokenizer_fingerprint="tok"),
    )
    with caplog.at_level(logging.WARNING, logger="megablocks_ablate.merge.pool_placement"):
        pool, choice = open_pool(ckpts, PoolRequest("resident", "bf16"), show_progress=False)
    assert choice.size.row_format == pool.row_format == "bf16-plain"
    assert "changed since they were trained from it" in caplog.text


def test_no_seed_falls_back_to_plain_rows_saying_why(tmp_path, caplog):
    # imported models (import-hf keeps an exported lineage's seed_hash, and names its
    # own Hugging Face directory as the parent): no seed to take deltas from
    _, ckpts = write_continuations(str(tmp_path), kind="imported", parents=False)
    with caplog.at_level(logging.WARNING, logger="megablocks_ablate.merge.pool_placement"):
        pool, choice = open_pool(ckpts, PoolRequest("auto", "bf16"), show_progress=False)
    assert pool.row_format == choice.size.row_format == "bf16-plain" and pool.seed is None
    assert not choice.size.delta and choice.size.seed_bytes == 0
    assert "pool rows in plain bf16" in caplog.text and "no one parent" in caplog.text
    with pytest.raises(ConfigError, match="bf16-delta needs the seed"):
        open_pool(ckpts, PoolRequest("auto", "bf16-delta"), show_progress=False)
    # fp32 and bf16-plain never look for a seed
    for dtype in ("fp32", "bf16-plain"):
        pool, _ = open_pool(ckpts, PoolRequest("auto", dtype), show_progress=False)
        assert pool.seed is None
    # units that record no one seed (merged with --allow-different-seed elsewhere)
    lineages = {
        "x": Lineage(kind="unit", seed_hash="aa"),
        "y": Lineage(kind="unit", seed_hash="bb"),
        "z": Lineage(kind="imported"),
    }
    assert units_seed_hash(lineages) == (
        None,
        "the unit models do not record one seed they continue (x: aa, y: bb, z: none)",
    )
    assert units_seed_hash({"s": Lineage(kind="seed")})[0] is None


def test_the_scaled_merges_seed_row_is_a_zero_delta(tmp_path):
    """The scaled proxy adds the seed checkpoint itself as a row (lineage kind seed)."""
    seed_dir, ckpts = write_continuations(str(tmp_path))
    with_seed = {**ckpts, "seed": seed_dir}
    pool, choice = open_pool(with_seed, PoolRequest("resident", "bf16"), show_progress=False)
    assert choice.size.row_format == "bf16-delta"
    assert isinstance(pool, ModelPool) and not bool(pool.rows[-1].any())
    exact = ModelPool.from_checkpoints(with_seed, show_progress=False)
    w = {"a": 0.5 * 2.0, "b": 0.5 * 2.0, "seed": 1.0 - 2.0}  # lambda 2
    got, want = merged_flats(pool, [w])[0], merged_flats(exact, [w])[0]
    plain = ModelPool.from_checkpoints(with_seed, dtype=torch.bfloat16, show_progress=False)
    err_plain = float((merged_flats(plain, [w])[0] - want).abs().max())
    assert float((got - want).abs().max()) * 10 <= err_plain


# --------------------------------------------------------------------------- names, sizes


def test_pool_dtype_names_are_validated_and_resolved():
    for name in ("auto", "fp32", "bf16", "bf16-delta", "bf16-plain"):
        PoolRequest("auto", name)
    with pytest.raises(ConfigError, match="bf16-delta, bf16-plain, got 'bf16_delta'"):
        PoolRequest("auto", "bf16_delta")
    assert PoolRequest().format_on("cpu") == "fp32"
    assert PoolRequest().format_on("cuda") == "bf16-delta"
    assert PoolRequest(dtype="bf16").format_on("cpu") == "bf16-delta"
    assert PoolRequest(dtype="bf16-plain").format_on("cuda") == "bf16-plain"
    assert PoolRequest(dtype="bf16-delta").delta_required
    assert not PoolRequest(dtype="bf16").delta_required
    names = [format_name("fp32", False), format_name("bf16", False), format_name("bf16", True)]
    assert names == ["fp32", "bf16-plain", "bf16-delta"]


def test_memory_accounting_counts_the_fp32_seed_once_per_copy(tmp_path):
    seed_dir, ckpts = write_continuations(str(tmp_path))
    first = next(iter(ckpts.values()))
    p = sum(t.numel() for t in TinyLM(**CONFIG).parameters())
    assert pp.pool_size(first, 4, "bf16") == PoolSize(4, p, 2, delta=True)
    assert pp.pool_size(first, 4, "bf16-delta") == PoolSize(4, p, 2, delta=True)
    assert pp.pool_size(first, 4, "bf16-plain") == PoolSize(4, p, 2)
    assert pp.pool_size(first, 4, "fp32") == PoolSize(4, p, 4)
    size = PoolSize(64, 10**9, 2, delta=True)  # 128 GB of rows + 4 GB of seed
    assert (size.rows_bytes, size.seed_bytes, size.total_bytes) == (128 * GB, 4 * GB, 132 * GB)
    mem = MemoryFigures("cuda", 200 * GB, 1000 * GB, 1000 * GB, local_ranks=8, world_size=8)
    c = choose_placement("resident", size, mem, 10 * GB)
    assert c.per_device == 142 * GB
    c = choose_placement("host", size, mem, 10 * GB)
    assert c.per_node == 132 * GB and c.per_device == 10 * GB + pp.STAGING_BYTES
    c = choose_placement("sharded", size, MemoryFigures("cuda", 80 * GB, 0, 0, 1, 8, 4), 0)
    assert c.per_shard == 16 * 2 * GB + 4 * GB  # each shard's rows and its own seed
    assert c.per_device == c.per_shard + pp.chain_bytes()
    # the plan's text says the format and the seed's share
    text = "\n".join(pp.describe_pool(first, 4, pp.PoolPlanning(PoolRequest("host", "bf16"))))
    assert "in bf16-delta (bf16 differences from the fp32 seed" in text
    text = "\n".join(pp.describe_pool(first, 4, pp.PoolPlanning(PoolRequest("host", "fp32"))))
    assert "parameters in fp32 = " in text
    # what open_pool chose is what it loaded
    pool, choice = open_pool(ckpts, PoolRequest("resident", "bf16"), seed_dir=seed_dir)
    assert choice.size == PoolSize(4, p, 2, delta=True)
    assert isinstance(pool, ModelPool) and pool.base is not None
    assert pool.rows.numel() * 2 + pool.base.numel() * 4 == choice.size.total_bytes


# --------------------------------------------------------------------------- placements


def test_host_delta_rows_equal_resident_ones_and_are_never_plain_rows(tmp_path):
    seed_dir, ckpts = write_continuations(str(tmp_path))
    seed = find_seed(ckpts, seed_dir)[0]
    assert seed is not None
    want = _merges(ckpts, torch.bfloat16, seed)
    shm = str(tmp_path / "shm")
    plain = HostPool.from_checkpoints(ckpts, dtype=torch.bfloat16, host_dir=shm)
    direct = HostPool.from_checkpoints(ckpts, dtype=torch.bfloat16, host_dir=shm, seed=seed)
    staged = HostPool.from_checkpoints(
        ckpts,
        dtype=torch.bfloat16,
        host_dir=shm,
        seed=seed,
        staged=True,
        staging_bytes=2 * 40 * (4 + 4 * 2),  # 40-element chunks of the seed and 4 rows
    )
    assert plain.row_format == "bf16-plain" and direct.row_format == "bf16-delta"
    # plain and delta rows of the same units are different files; the seed is one more
    assert {f.path for f in plain.files}.isdisjoint(f.path for f in direct.files)
    assert all(f.created for f in direct.files) and not any(f.created for f in staged.files)
    p = direct.num_params
    assert host_dir_usage(shm) == {"files": 4 + 4 + 1, "bytes": 8 * p * 2 + p * 4}
    key = next(iter(ckpts.values()))
    slots = list(direct.slots.values())
    names = {
        row_file_name(key, slots, torch.bfloat16),
        row_file_name(key, slots, torch.bfloat16, seed.sha256),
        row_file_name(key, slots, torch.bfloat16, "another seed"),
    }
    assert len(names) == 3
    for pool in (direct, staged):
        got = merged_flats(pool, WEIGHTS)
        for w, g, r in zip(WEIGHTS, got, want):
            assert torch.equal(g, r), w
    for pool in (plain, direct, staged):
        pool.close()
    assert os.listdir(shm) == []


def test_open_pool_puts_delta_rows_in_host_memory(tmp_path):
    seed_dir, ckpts = write_continuations(str(tmp_path))
    (tmp_path / "shm").mkdir()
    req = PoolRequest("host", "bf16", str(tmp_path / "shm"))
    pool, choice = open_pool(ckpts, req, seed_dir=seed_dir)
    assert isinstance(pool, HostPool) and choice.size.row_format == pool.row_format
    assert pool.row_format == "bf16-delta"
    resident, _ = open_pool(ckpts, PoolRequest("resident", "bf16"), seed_dir=seed_dir)
    for a, b in zip(merged_flats(pool, WEIGHTS), merged_flats(resident, WEIGHTS)):
        assert torch.equal(a, b)
    pool.close()


# --------------------------------------------------------------------------- provenance


def test_the_scores_provenance_records_the_row_format(tmp_path):
    """What Scorer.score_mixture stores as ``pool``: the placement, the itemsize and the
    row format of the pool that merged it."""
    from megablocks_ablate.ablate.mixtures import Mixture, Score
    from megablocks_ablate.ablate.runner.scoring import Scorer
    from megablocks_ablate.ablate.store import ResultStore

    seed_dir, ckpts = write_continuations(str(tmp_path))
    for dtype, fmt in (("bf16", "bf16-delta"), ("bf16-plain", "bf16-plain"), ("fp32", "fp32")):
        _, choice = open_pool(ckpts, PoolRequest("resident", dtype), seed_dir=seed_dir)
        scorer = SimpleNamespace(
            opt=SimpleNamespace(write_results=True, save_merged=False),
            pool_choice=choice,
            _unit_hashes={u: "h" for u in ckpts},
            fingerprint="fp",
            _merge_and_evaluate=lambda m, w, what: ({"d": Score(1.0, 2, 3)}, 8),
            window_provenance=lambda trained: {"max_len": 8},
        )
        mixture = Mixture.of({"p": ["a"]})
        with ResultStore(str(tmp_path / f"{dtype}.sqlite")) as store:
            Scorer.score_mixture(scorer, store, mixture, {"a": 1.0}, ["merged"])  # type: ignore[arg-type]
            row = next(r for r in store.results("merged") if r.subject == mixture.id)
        assert row.provenance["pool"] == {
            "placement": "resident",
            "itemsize": 4 if dtype == "fp32" else 2,
            "format": fmt,
        }
