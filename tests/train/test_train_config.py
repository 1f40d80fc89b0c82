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
    cfg = TrainConfig.load(
        None, ["seq_len=2048", "global_batch_tokens=2097152", "micro_batch=16", "train_tokens=1B"]
    )
    assert cfg.global_batch == 1024
    assert cfg.train_steps == 477  # ceil(ceil(1e9 / 2048) / 1024)
    assert cfg.train_samples == 477 * 1024
    assert cfg.grad_accum_steps(8) == 8 and cfg.grad_accum_steps(64) == 1
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.grad_accum_steps(3)
    assert (
        TrainConfig.load(None, ["out_dir=pool/{unit}", "data.unit=cs-0001"]).resolved_out_dir()
        == "pool/cs-0001"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["global_batch_tokens=1000", "seq_len=64"], "not a multiple of seq_len"),
        (["global_batch_tokens=1024", "seq_len=64", "micro_batch=3"], "does not divide"),
        (["data.unit=a", "data.mixture=[b]"], "not unit and mixture"),
        (["data.weights={a: -1}"], "non-negative"),
        (["kind=unit", "data.mixture=[b]"], "one unit"),
        (["optimizer.betas=[0.9]"], "betas"),
        (["schedule.decay=step"], "schedule.decay"),
        (["train_tokens=lots"], "train_tokens"),
    ],
)
def test_invalid_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(None, overrides)


@pytest.mark.parametrize("preset", [None, "1.1b_seed"])
def test_apex_with_fsdp2_is_refused_at_load_naming_both_fields(preset):
    overrides = ["optimizer.impl=apex"] + ([] if preset else ["distributed.parallel=fsdp"])
    with pytest.raises(ConfigError) as e:
        if preset:  # a preset that is FSDP2 already (the 1.1b seed)
            TrainConfig.from_preset(preset, overrides)
        else:
            TrainConfig.load(None, overrides)
    msg = str(e.value)
    for part in ("optimizer.impl: apex", "distributed.parallel: fsdp", "DTensor", "impl: auto"):
        assert part in msg, (part, msg)


def test_apex_without_fsdp2_and_fsdp2_without_apex_still_load():
    assert TrainConfig.load(None, ["optimizer.impl=apex"]).optimizer.impl == "apex"  # DDP
    for impl in ("auto", "torch"):
        cfg = TrainConfig.load(None, [f"optimizer.impl={impl}", "distributed.parallel=fsdp"])
        assert cfg.distributed.parallel == "fsdp"


def test_out_dir_unit_placeholder_needs_a_unit():
    with pytest.raises(ConfigError, match="data.unit is not set"):
        TrainConfig.load(None, ["out_dir=pool/{unit}"]).resolved_out_dir()


def test_every_preset_loads_and_has_consistent_sizes():
    names = sorted(
        os.path.basename(p)[:-5]
        for p in glob.glob(str(PRESET_DIR / "*.yaml"))
        if not os.path.basename(p).startswith("_")
    )  # _common: a base, not a preset
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
    big = TrainConfig.from_preset("1.1b_unit")  # the large preset shards; activations fit
    assert big.distributed.parallel == "fsdp"  # at micro batch 4 (docs/training.md, Memory)
    assert big.activation_checkpointing == "none" and not big.model_overrides


def test_seq_len_must_fit_the_models_max_seq_len(tmp_path, capsys):
    from megablocks_ablate.cli import main

    # the shipped presets train at their model's whole length: evaluation's default
    # window (the trained length) then covers every position the model has
    for model in ("tiny", "demo", "130m", "1.1b"):
        cfg = TrainConfig.from_preset(f"{model}_seed")
        assert cfg.model_config().max_seq_len == cfg.seq_len
    cfg = TrainConfig.load(None, ["model=tiny", "seq_len=128", "global_batch_tokens=1024"])
    with pytest.raises(
        ConfigError, match=r"seq_len: 128 exceeds the max_seq_len=64 of model 'tiny'; lower"
    ):
        cfg.model_config()
    assert cfg.replace(["model_overrides=[max_seq_len=128]"]).model_config().max_seq_len == 128
    out = tmp_path / "run"  # `train` refuses it before writing anything
    assert main(["train", "--config", "tiny_seed", "seq_len=128", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "seq_len: 128 exceeds the max_seq_len=64" in err and "Traceback" not in err
    assert not out.exists()


def test_unit_weights_from_the_data_spec(train_manifest):
    m = Manifest.load(train_manifest)
    parts = m.partition_units()
    assert resolve_unit_weights(DataConfig(unit="physics-0001"), m) == {"physics-0001": 1.0}
    assert resolve_unit_weights(DataConfig(weights={"physics-0001": 3, "history-0000": 1}), m) == {
        "physics-0001": 0.75,
        "history-0000": 0.25,
    }
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
    cfg = TrainConfig.load(
        None,
        [
            f"data.manifest={train_manifest}",
            "data.unit=physics-0000",
            "seq_len=32",
            "global_batch_tokens=256",
            "micro_batch=4",
            "train_tokens=100k",
        ],
    )
    mix, weights, _ = build_mixture(cfg)
    # 100k tokens is ~30x the unit: it is repeated (upsampled) to exactly the run's samples
    assert len(mix) == cfg.train_samples == cfg.train_steps * 8
    assert weights == {"physics-0000": 1.0}


def test_unit_index_picks_the_pool_order(train_manifest):
    from megablocks_ablate.commands.train import load_config
    from megablocks_ablate.train.launcher import pool_units

    units = pool_units(Manifest.load(train_manifest))
    ov = [f"data.manifest={train_manifest}", "out_dir=pool/{unit}"]
    cfg = load_config("tiny_unit", ov, unit_index=2)
    assert cfg.data.unit == units[2] and cfg.resolved_out_dir() == f"pool/{units[2]}"
    with pytest.raises(ConfigError, match="--unit-index"):
        load_config("tiny_unit", ov, unit_index=len(units))


# Every preset resolved, pinned: the `base:` restructuring of configs/train/ must not change
# any of them. Columns: name, out_dir, init_from, train_tokens, seq_len, global_batch_tokens,
# micro_batch, lr, warmup_steps, warmup_fraction, warmup_start_lr, min_lr, data.mixture,
# data.balance, checkpoint.every, checkpoint.keep_last, distributed.parallel, model_overrides,
# init_optimizer, checkpoint.final_optimizer (paper A.3: seeds keep their optimizer state in
# final/, unit and seq runs start from it). Every other field is its default, but
# data.manifest (data/).
# fmt: off
PINNED = [
    ('1.1b_seed', 'runs/1.1b/seed', None, 42000000000, 2048, 2097152, 4, 0.0003, None, 0.01, 0.0, 3e-05, ['*'], 'tokens', 1000, 2, 'fsdp', [], 'fresh', True),
    ('1.1b_seed_mb8', 'runs/1.1b/seed', None, 42000000000, 2048, 2097152, 8, 0.0003, None, 0.01, 0.0, 3e-05, ['*'], 'tokens', 1000, 2, 'fsdp', [], 'fresh', True),
    ('1.1b_seq', 'runs/1.1b/seq', 'runs/1.1b/seed/final', 4000000000, 2048, 2097152, 4, 0.0003, 50, 0.01, 3e-05, 3e-05, ['*'], 'partition', 100, 1, 'fsdp', [], 'seed', False),
    ('1.1b_unit', 'pool/1.1b/{unit}', 'runs/1.1b/seed/final', 1000000000, 2048, 2097152, 4, 0.0003, 50, 0.01, 3e-05, 3e-05, [], 'partition', 100, 1, 'fsdp', [], 'seed', False),
    ('130m_seed', 'runs/130m/seed', None, 42000000000, 2048, 2097152, 16, 0.0006, None, 0.01, 0.0, 6e-05, ['*'], 'tokens', 1000, 2, 'ddp', [], 'fresh', True),
    ('130m_seq', 'runs/130m/seq', 'runs/130m/seed/final', 4000000000, 2048, 2097152, 16, 0.0006, 50, 0.01, 6e-05, 6e-05, ['*'], 'partition', 100, 1, 'ddp', [], 'seed', False),
    ('130m_unit', 'pool/130m/{unit}', 'runs/130m/seed/final', 1000000000, 2048, 2097152, 16, 0.0006, 50, 0.01, 6e-05, 6e-05, [], 'partition', 100, 1, 'ddp', [], 'seed', False),
    ('demo_seed', 'runs/demo/seed', None, 4000000, 256, 8192, 16, 0.002, None, 0.05, 0.0, 0.0002, ['*'], 'tokens', 100, 2, 'ddp', [], 'fresh', True),
    ('demo_seq', 'runs/demo/seq', 'runs/demo/seed/final', 1000000, 256, 8192, 16, 0.002, 5, 0.01, 0.0002, 0.0002, ['*'], 'partition', 50, 1, 'ddp', [], 'fresh', False),
    ('demo_unit', 'pool/demo/{unit}', 'runs/demo/seed/final', 500000, 256, 8192, 16, 0.002, 5, 0.01, 0.0002, 0.0002, [], 'partition', 50, 1, 'ddp', [], 'fresh', False),
    ('paperlike_seed', 'runs/paperlike/seed', None, 4200000, 64, 1024, 16, 0.003, None, 0.05, 0.0, 0.0003, ['*'], 'tokens', 500, 2, 'ddp', [], 'fresh', True),
    ('paperlike_seq', 'runs/paperlike/seq', 'runs/paperlike/seed/final', 192000, 64, 1024, 16, 0.003, None, 0.05, 0.0003, 0.0003, ['*'], 'partition', 100, 1, 'ddp', [], 'seed', False),
    ('paperlike_unit', 'pool/paperlike/{unit}', 'runs/paperlike/seed/final', 96000, 64, 1024, 16, 0.003, None, 0.05, 0.0003, 0.0003, [], 'partition', 100, 1, 'ddp', [], 'seed', False),
    ('tiny_seed', 'runs/tiny/seed', None, 200000, 64, 1024, 8, 0.003, None, 0.05, 0.0, 0.0003, ['*'], 'tokens', 50, 2, 'ddp', [], 'fresh', True),
    ('tiny_seq', 'runs/tiny/seq', 'runs/tiny/seed/final', 100000, 64, 1024, 8, 0.003, 5, 0.01, 0.0003, 0.0003, ['*'], 'partition', 20, 1, 'ddp', [], 'seed', False),
    ('tiny_unit', 'pool/tiny/{unit}', 'runs/tiny/seed/final', 50000, 64, 1024, 8, 0.003, 5, 0.01, 0.0003, 0.0003, [], 'partition', 20, 1, 'ddp', [], 'seed', False),
]
# fmt: on


@pytest.mark.parametrize("row", PINNED, ids=lambda r: r[0])
def test_presets_resolve_exactly_as_pinned(row):
    (
        name,
        out_dir,
        init_from,
        tokens,
        seq_len,
        gbt,
        micro,
        lr,
        w_steps,
        w_frac,
        w_start,
        min_lr,
        mixture,
        balance,
        every,
        keep,
        parallel,
        model_overrides,
        init_optimizer,
        final_optimizer,
    ) = row
    model, kind = name.split("_")[:2]  # 1.1b_seed_mb8: a variant of 1.1b_seed
    expected = TrainConfig.from_dict(
        {
            "kind": kind,
            "model": model,
            "out_dir": out_dir,
            "init_from": init_from,
            "train_tokens": tokens,
            "seq_len": seq_len,
            "global_batch_tokens": gbt,
            "micro_batch": micro,
            "optimizer": {"lr": lr},
            "schedule": {
                "warmup_steps": w_steps,
                "warmup_fraction": w_frac,
                "warmup_start_lr": w_start,
                "min_lr": min_lr,
            },
            "data": {"manifest": "data/", "mixture": mixture, "balance": balance},
            "checkpoint": {"every": every, "keep_last": keep, "final_optimizer": final_optimizer},
            "distributed": {"parallel": parallel},
            "model_overrides": model_overrides,
            "init_optimizer": init_optimizer,
        }
    )
    assert TrainConfig.from_preset(name) == expected
    assert TrainConfig.load(PRESET_DIR / f"{name}.yaml") == expected  # as train-pool loads it


def test_pinned_table_covers_every_preset():
    names = {os.path.basename(p)[:-5] for p in glob.glob(str(PRESET_DIR / "[!_]*.yaml"))}
    assert names == {row[0] for row in PINNED}


def test_presets_derive_by_base():
    """Each unit/seq preset says only what differs from the one below it."""
    import yaml

    for model in ("tiny", "demo", "130m", "1.1b"):
        chain = {
            k: yaml.safe_load((PRESET_DIR / f"{model}_{k}.yaml").read_text())["base"]
            for k in ("seed", "unit", "seq")
        }
        assert chain == {"seed": "_common", "unit": f"{model}_seed", "seq": f"{model}_unit"}
    with pytest.raises(ConfigError, match="known presets: 1.1b_seed") as e:
        TrainConfig.from_preset("nope")
    assert "_common" not in str(e.value)


def test_demo_study_refs_resolve():
    from megablocks_ablate.ablate.spec import StudySpec

    spec = StudySpec.load(PRESET_DIR.parents[1] / "configs" / "studies" / "demo.yaml")
    seed = TrainConfig.from_preset(spec.seed.config, spec.seed.overrides)
    unit = TrainConfig.from_preset(spec.unit.config, spec.unit.overrides)
    seq = TrainConfig.from_preset(spec.validation.train.config, spec.validation.train.overrides)
    assert (seed.kind, seed.train_tokens, seed.data.manifest) == (
        "seed",
        4_200_000,
        "demo_out/seed_data",
    )
    # the paper-like regime: one warmup fraction for unit and seq models, the seed's AdamW
    assert (unit.kind, unit.train_tokens, unit.schedule.warmup_steps) == ("unit", 96_000, None)
    assert (unit.schedule.warmup_fraction, seq.schedule.warmup_fraction) == (0.05, 0.05)
    assert unit.init_optimizer == seq.init_optimizer == "seed"
    assert (seq.kind, seq.data.mixture, seq.init_from) == (
        "seq",
        ["*"],
        "runs/paperlike/seed/final",
    )


def _all_fields(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from _all_fields(tp, prefix + f.name + ".")


def test_every_train_and_model_field_has_a_doc():
    from megablocks_ablate.model.config import ModelConfig

    for cls in (TrainConfig, ModelConfig):
        missing = [n for n, f in _all_fields(cls) if not f.metadata.get("help", "").strip()]
        assert not missing, f"{cls.__name__} fields without doc(): {missing}"


@pytest.mark.parametrize("name", [row[0] for row in PINNED])
def test_print_config_round_trips_with_docs(name, tmp_path, capsys):
    from megablocks_ablate.cli import main

    overrides = ["optimizer.lr=1e-3", "data.weights={}", "model_overrides=[n_layers=3]"]
    assert main(["train", "--config", name, "--print-config", *overrides]) == 0
    text = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(text)
    assert TrainConfig.load(tmp_path / "printed.yaml") == TrainConfig.from_preset(name, overrides)
    assert "# tokens per training sequence\nseq_len:" in text  # a field's doc, above it
    assert "# peak learning rate" in text  # a nested field's doc
    assert "#   n_layers: 3" in text and "#   d_model: " in text  # the model, resolved
    assert "base:" not in text  # fully resolved


def test_config_show_is_print_config(capsys):
    from megablocks_ablate.cli import main

    assert main(["train", "--config", "demo_unit", "--print-config", "seq_len=128"]) == 0
    printed = capsys.readouterr().out
    assert main(["config", "show", "train", "demo_unit", "seq_len=128"]) == 0
    assert capsys.readouterr().out == printed


def test_config_describe_lists_type_default_doc(capsys):
    from megablocks_ablate.cli import main

    assert main(["config", "describe", "train"]) == 0
    out = capsys.readouterr().out
    assert "kind: seed|unit|seq = unit\n    what this run trains" in out
    assert "  optimizer.lr: float = 0.0006\n" in out and "data.unit: str | null = null" in out
    assert main(["config", "describe", "model"]) == 0
    assert "d_model: int = 768\n    residual stream width" in capsys.readouterr().out
    assert main(["config", "describe", "study"]) == 0
    assert "validation.train.config: str" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["config", "describe", "optimizer"],
            "unknown kind 'optimizer' (known: train, model, study)",
        ),
        (["config", "show", "train", "nope"], "train preset 'nope': no "),
        (["config", "show", "model", "tiny", "d_model=big"], "d_model: expected an integer"),
    ],
)
def test_config_command_errors_are_one_line(argv, message, capsys):
    from megablocks_ablate.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
