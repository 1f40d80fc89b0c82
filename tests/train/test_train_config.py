"""TrainConfig: derived sizes, validation, presets; the data spec -> unit weights."""

from __future__ import annotations

import glob
import os

import pytest

from megablocks_ablate.data.manifest import Manifest
from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.train.config import PRESET_DIR, DataConfig, TrainConfig
from megablocks_ablate.train.data import build_mixture, resolve_unit_weights


def test_derived_sizes():
    cfg = TrainConfig.load(None, ["seq_len=2048", "global_batch_tokens=2097152", "micro_batch=16",
                                  "train_tokens=1B"])
    assert cfg.global_batch == 1024
    assert cfg.train_steps == 477  # ceil(ceil(1e9 / 2048) / 1024)
    assert cfg.train_samples == 477 * 1024
    assert cfg.grad_accum_steps(8) == 8 and cfg.grad_accum_steps(64) == 1
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.grad_accum_steps(3)
    assert TrainConfig.load(None, ["out_dir=pool/{unit}", "data.unit=cs-0001"]).resolved_out_dir() \
        == "pool/cs-0001"


@pytest.mark.parametrize("overrides, message", [
    (["global_batch_tokens=1000", "seq_len=64"], "not a multiple of seq_len"),
    (["global_batch_tokens=1024", "seq_len=64", "micro_batch=3"], "does not divide"),
    (["data.unit=a", "data.mixture=[b]"], "not unit and mixture"),
    (["data.weights={a: -1}"], "non-negative"),
    (["kind=unit", "data.mixture=[b]"], "one unit"),
    (["optimizer.betas=[0.9]"], "betas"),
    (["schedule.decay=step"], "schedule.decay"),
    (["train_tokens=lots"], "train_tokens"),
])
def test_invalid_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(None, overrides)


def test_out_dir_unit_placeholder_needs_a_unit():
    with pytest.raises(ConfigError, match="data.unit is not set"):
        TrainConfig.load(None, ["out_dir=pool/{unit}"]).resolved_out_dir()


def test_every_preset_loads_and_has_consistent_sizes():
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(str(PRESET_DIR / "*.yaml")))
    for model in ("tiny", "demo", "130m", "1.1b"):
        for kind in ("seed", "unit", "seq"):
            assert f"{model}_{kind}" in names
    for name in names:
        cfg = TrainConfig.from_preset(name)
        assert cfg.model == name.split("_")[0] and cfg.kind == name.split("_")[1]
        assert cfg.train_steps > cfg.warmup_steps() >= 1
        if cfg.kind != "seed":
            assert cfg.init_from and cfg.schedule.warmup_start_lr > 0  # re-warming from the seed
    assert "{unit}" in TrainConfig.from_preset("demo_unit").out_dir
    big = TrainConfig.from_preset("1.1b_unit")  # the large preset shards and recomputes
    assert big.distributed.parallel == "fsdp"
    assert "activation_checkpointing=true" in big.model_overrides


def test_unit_weights_from_the_data_spec(train_manifest):
    m = Manifest.load(train_manifest)
    parts = m.partition_units()
    assert resolve_unit_weights(DataConfig(unit="physics-0001"), m) == {"physics-0001": 1.0}
    assert resolve_unit_weights(DataConfig(weights={"physics-0001": 3, "history-0000": 1}), m) == \
        {"physics-0001": 0.75, "history-0000": 0.25}
    # a partition plus one unit of another: each partition gets half (equal-partition upsampling)
    w = resolve_unit_weights(DataConfig(mixture=["physics", "history-0002"]), m)
    assert w["history-0002"] == pytest.approx(0.5)
    assert all(w[u] == pytest.approx(0.5 / len(parts["physics"])) for u in parts["physics"])
    everything = resolve_unit_weights(DataConfig(mixture=["*"], balance="uniform"), m)
    assert set(everything) == set(m.units) and len(set(everything.values())) == 1
    tokens = resolve_unit_weights(DataConfig(mixture=["*"], balance="tokens"), m)
    total = sum(int(i["tokens"]) for i in m.units.values())
    assert tokens["physics-0001"] == pytest.approx(m.units["physics-0001"]["tokens"] / total)
    with pytest.raises(ConfigError, match="neither a partition nor a unit"):
        resolve_unit_weights(DataConfig(mixture=["chemistry"]), m)
    with pytest.raises(DataFormatError, match="unknown unit"):
        resolve_unit_weights(DataConfig(unit="chemistry-0000"), m)


def test_mixture_holds_exactly_the_run(train_manifest):
    cfg = TrainConfig.load(None, [f"data.manifest={train_manifest}", "data.unit=physics-0000",
                                  "seq_len=32", "global_batch_tokens=256", "micro_batch=4",
                                  "train_tokens=100k"])
    mix, weights, _ = build_mixture(cfg)
    # 100k tokens is ~30x the unit: it is repeated (upsampled) to exactly the run's samples
    assert len(mix) == cfg.train_samples == cfg.train_steps * 8
    assert weights == {"physics-0000": 1.0}


def test_unit_index_picks_the_pool_order(train_manifest):
    from megablocks_ablate.commands.train import load_config
    from megablocks_ablate.train.pool import pool_units

    units = pool_units(Manifest.load(train_manifest))
    ov = [f"data.manifest={train_manifest}", "out_dir=pool/{unit}"]
    cfg = load_config("tiny_unit", ov, unit_index=2)
    assert cfg.data.unit == units[2] and cfg.resolved_out_dir() == f"pool/{units[2]}"
    with pytest.raises(ConfigError, match="--unit-index"):
        load_config("tiny_unit", ov, unit_index=len(units))
