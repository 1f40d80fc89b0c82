"""The seed's optimizer state carried into unit/seq runs (init_optimizer, paper A.3)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import flip_byte, tiny_overrides

from megablocks_ablate.checkpoint import (
    load_model_checkpoint,
    map_model_weights,
    model_hash,
    read_checkpoint_meta,
)
from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.train import init_state
from megablocks_ablate.train import state as st
from megablocks_ablate.train.config import OptimizerConfig, TrainConfig
from megablocks_ablate.train.optim import build_optimizer, lr_at
from megablocks_ablate.train.trainer import train
from megablocks_ablate.utils.hashing import sha256_file
from megablocks_ablate.utils.outputs import output_kind

SEED_STEPS, UNIT_STEPS = 8, 4
# the unit runs' own optimizer settings, all unlike the seed's (lr 3e-3, betas 0.9/0.95,
# eps 1e-8, weight_decay 0.1): none of the seed's may survive the load
OWN = {
    "optimizer.lr": 1e-3,
    "optimizer.betas": "[0.8,0.9]",
    "optimizer.eps": 1e-6,
    "optimizer.weight_decay": 0.05,
}


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _complete(out_dir) -> dict:
    with open(os.path.join(out_dir, st.COMPLETE_FILE), encoding="utf-8") as f:
        return json.load(f)


def _steps(osd) -> set[float]:
    return {float(v["step"]) for v in osd["state"].values()}


@pytest.fixture(scope="module")
def seed(train_manifest, tmp_path_factory):
    """A seed run of 8 steps whose final/ keeps its optimizer state."""
    out = str(tmp_path_factory.mktemp("seed-optim") / "seed")
    ov = {"data.mixture": "['*']", "checkpoint.final_optimizer": "true"}
    cfg = TrainConfig.load(None, tiny_overrides(train_manifest, out, kind="seed", **ov))
    train(cfg)
    return cfg, out


def _unit_cfg(manifest, out, init_from, **extra) -> TrainConfig:
    ov = dict(OWN, **{"data.unit": "physics-0002", "checkpoint.every": 2})
    ov.update(extra)
    return TrainConfig.load(
        None,
        tiny_overrides(
            manifest, out, kind="unit", init_from=init_from, train_tokens=256 * UNIT_STEPS, **ov
        ),
    )


@pytest.fixture(scope="module")
def units(seed, train_manifest, tmp_path_factory):
    """The same unit run twice from the seed: init_optimizer=seed and fresh."""
    _, seed_out = seed
    root = tmp_path_factory.mktemp("units")
    runs = {}
    for how in ("seed", "fresh"):
        out = str(root / how)
        extra = {"init_optimizer": how, "checkpoint.final_optimizer": "true"}
        cfg = _unit_cfg(train_manifest, out, os.path.join(seed_out, "final"), **extra)
        runs[how] = (cfg, out, train(cfg))
    return runs


def test_seed_final_keeps_its_optimizer_state(seed, tmp_path):
    cfg, out = seed
    final = os.path.join(out, st.FINAL_DIR)
    assert st.has_optimizer_state(final)
    assert sorted(os.listdir(final)) == sorted(
        ["model.safetensors", "config.json", "lineage.json", st.OPTIM_TENSORS, st.OPTIM_JSON]
    )
    assert not [n for n in os.listdir(out) if n.endswith((".tmp", ".old"))]  # no staging left
    done = _complete(out)
    assert done["optimizer_sha256"] == sha256_file(os.path.join(final, st.OPTIM_TENSORS))
    assert done["model_sha256"] == model_hash(final)
    assert (done["optimizer_init"], done["optimizer_init_from"]) == ("fresh", None)
    assert st.recorded_optimizer_sha256(final) == (
        done["optimizer_sha256"],
        os.path.join(out, st.COMPLETE_FILE),
    )
    osd = st.load_optimizer_state(final)
    state, _, lineage = load_model_checkpoint(final)
    assert set(osd["state"]) == set(state)  # keyed by parameter name, tied weight once
    assert _steps(osd) == {float(SEED_STEPS)}
    # the groups as the seed's last step left them: its lr, decay on matrices only
    assert [g["lr"] for g in osd["param_groups"]] == [lr_at(SEED_STEPS - 1, cfg)] * 2
    assert [g["weight_decay"] for g in osd["param_groups"]] == [0.1, 0.0]
    assert lineage.extra["optimizer_init"] == "fresh"
    # every reader of a checkpoint directory takes the one with the extra files
    assert output_kind(final) == "checkpoint"
    assert set(map_model_weights(final)) == set(state)
    assert read_checkpoint_meta(final)[1].kind == "seed"
    from megablocks_ablate.model.hf import export_hf

    hf = export_hf(final, str(tmp_path / "hf"))
    assert not {st.OPTIM_TENSORS, st.OPTIM_JSON} & set(os.listdir(hf))


def test_load_gives_the_seeds_moments_under_this_runs_settings(seed):
    """The loaded state is bitwise the saved one; the groups are this run's; the next
    AdamW step continues the seed's moments and step count with this run's betas."""
    from megablocks_ablate.model.config import ModelConfig

    _, out = seed
    final = os.path.join(out, st.FINAL_DIR)
    model = ModelConfig.from_preset("tiny", ["vocab_size=512"]).build()
    own = OptimizerConfig(lr=1e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05)
    opt = build_optimizer(model, own, torch.device("cpu"))
    record = init_state.load_seed_optimizer(model, model, opt, final, lambda f: f(), True)
    assert record == {"optimizer_init": "seed", "optimizer_init_from": final}
    saved = st.load_optimizer_state(final)
    named = dict(model.named_parameters())
    for name, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(opt.state[named[name]][key], value), (name, key)
    for group, wd in zip(opt.param_groups, (0.05, 0.0), strict=True):
        assert (group["lr"], tuple(group["betas"]), group["eps"]) == (1e-3, (0.8, 0.9), 1e-6)
        assert group["weight_decay"] == wd
    name = "layers.0.in_proj.weight"
    m0 = saved["state"][name]["exp_avg"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert float(opt.state[named[name]]["step"]) == SEED_STEPS + 1
    torch.testing.assert_close(opt.state[named[name]]["exp_avg"], 0.8 * m0 + 0.2)


def test_unit_run_continues_the_seeds_optimizer(seed, units):
    _, seed_out = seed
    seed_final = os.path.join(seed_out, "final")
    cfg, out, summary = units["seed"]
    assert summary["optimizer_init"] == "seed"
    # AdamW's step counter continues the seed's: 8 + 2 at the step-2 checkpoint, 8 + 4 at the end
    ckpt = st.load_train_checkpoint(st.step_dir(out, 2))
    assert _steps(ckpt["optim"]) == {SEED_STEPS + 2.0}
    final_osd = st.load_optimizer_state(os.path.join(out, "final"))
    assert _steps(final_osd) == {float(SEED_STEPS + UNIT_STEPS)}
    # its own settings, not the seed's, in every group; its own schedule (the re-warm)
    for group, wd in zip(final_osd["param_groups"], (0.05, 0.0), strict=True):
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.9), 1e-6, wd)
        assert group["lr"] == lr_at(UNIT_STEPS - 1, cfg)
    assert [r["lr"] for r in _metrics(out)] == [lr_at(s, cfg) for s in range(UNIT_STEPS)]
    done = _complete(out)
    assert (done["optimizer_init"], done["optimizer_init_from"]) == ("seed", seed_final)
    _, _, lineage = load_model_checkpoint(os.path.join(out, "final"))
    assert lineage.extra["optimizer_init"] == "seed"
    assert lineage.extra["optimizer_init_from"] == seed_final


def test_fresh_unit_run_is_unchanged_and_differs(units):
    cfg, out, summary = units["fresh"]
    assert summary["optimizer_init"] == "fresh"
    assert _steps(st.load_train_checkpoint(st.step_dir(out, 2))["optim"]) == {2.0}
    done = _complete(out)
    assert (done["optimizer_init"], done["optimizer_init_from"]) == ("fresh", None)
    a, b = _metrics(units["seed"][1]), _metrics(out)
    # same weights and data: the first loss (before any update) is the same, then the
    # seed's moments change every update
    assert a[0]["loss"] == b[0]["loss"]
    assert all(x["loss"] != y["loss"] for x, y in zip(a[1:], b[1:], strict=True))
    assert model_hash(os.path.join(out, "final")) != model_hash(
        os.path.join(units["seed"][1], "final")
    )


def test_seed_without_optimizer_state_warns_and_starts_fresh(
    seed, units, train_manifest, tmp_path, caplog
):
    _, seed_out = seed
    bare = tmp_path / "imported"  # weights only, as import-hf or an old seed leaves them
    bare.mkdir()
    for name in ("model.safetensors", "config.json", "lineage.json"):
        shutil.copy(os.path.join(seed_out, "final", name), bare)
    out = str(tmp_path / "unit")
    caplog.set_level(logging.WARNING, logger="megablocks_ablate")
    extra = {"init_optimizer": "seed", "checkpoint.final_optimizer": "true"}
    summary = train(_unit_cfg(train_manifest, out, str(bare), **extra))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "holds no optimizer state" in warnings[0]
    assert str(bare) in warnings[0]
    assert summary["optimizer_init"] == "fresh"
    done = _complete(out)
    assert (done["optimizer_init"], done["optimizer_init_from"]) == ("fresh", None)
    # exactly the fresh run: same weights, data and settings, a new AdamW
    assert model_hash(os.path.join(out, "final")) == model_hash(
        os.path.join(units["fresh"][1], "final")
    )


def _copied_seed(seed_out, tmp_path) -> str:
    run = str(tmp_path / "seed")
    shutil.copytree(seed_out, run)
    return os.path.join(run, "final")


def test_tampered_optimizer_state_is_refused(seed, train_manifest, tmp_path):
    _, seed_out = seed
    final = _copied_seed(seed_out, tmp_path)
    bad = os.path.join(final, st.OPTIM_TENSORS)
    flip_byte(bad)
    out = str(tmp_path / "unit")
    cfg = _unit_cfg(train_manifest, out, final, init_optimizer="seed")
    with pytest.raises(DataFormatError, match="sha256") as e:
        train(cfg)
    assert bad in str(e.value) and "optimizer state of init_from" in str(e.value)
    assert not os.path.exists(os.path.join(out, "final"))


def test_optimizer_files_its_run_did_not_record_are_not_used(seed, tmp_path, caplog):
    """A final/ whose COMPLETE.json has no optimizer_sha256 did not get its optimizer
    files from the run that finished it: warned about and left unused."""
    from megablocks_ablate.model.config import ModelConfig

    _, seed_out = seed
    final = _copied_seed(seed_out, tmp_path)
    complete = os.path.join(os.path.dirname(final), st.COMPLETE_FILE)
    with open(complete, encoding="utf-8") as f:
        record = json.load(f)
    del record["optimizer_sha256"]
    with open(complete, "w", encoding="utf-8") as f:
        json.dump(record, f)
    model = ModelConfig.from_preset("tiny", ["vocab_size=512"]).build()
    opt = build_optimizer(model, OptimizerConfig(), torch.device("cpu"))
    caplog.set_level(logging.WARNING, logger="megablocks_ablate")
    got = init_state.load_seed_optimizer(model, model, opt, final, lambda f: f(), True)
    assert got == {"optimizer_init": "fresh", "optimizer_init_from": None}
    assert not opt.state  # untouched: a fresh AdamW
    assert "records no optimizer_sha256" in caplog.text and complete in caplog.text


def test_optimizer_state_of_other_parameters_is_refused(seed, train_manifest, tmp_path):
    _, seed_out = seed
    final = _copied_seed(seed_out, tmp_path)
    path = os.path.join(final, st.OPTIM_JSON)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    group = meta["param_groups"][0]["params"]
    group[group.index("layers.0.in_proj.weight")] = "layers.0.qkv.weight"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    cfg = _unit_cfg(train_manifest, str(tmp_path / "unit"), final, init_optimizer="seed")
    with pytest.raises(DataFormatError, match="'layers.0.in_proj.weight' has no entry") as e:
        train(cfg)
    assert path in str(e.value)


def test_check_names():
    osd = {"state": {"a": {}, "b": {}}, "param_groups": [{"params": ["a", "b"]}, {"params": []}]}
    init_state.check_names(osd, [["a", "b"], []], "d")
    with pytest.raises(DataFormatError, match="'c' has no entry"):
        init_state.check_names(osd, [["a", "b", "c"], []], "d")
    with pytest.raises(DataFormatError, match="parameter 'b' is not in the model"):
        init_state.check_names(osd, [["a"], []], "d")
    with pytest.raises(DataFormatError, match="param group 0 .* position 0: 'a' where .* 'b'"):
        init_state.check_names(osd, [["b", "a"], []], "d")  # same names, other order
    with pytest.raises(DataFormatError, match="param group 0 .* position 1: 'b' where .* None"):
        init_state.check_names(osd, [["a"], ["b"]], "d")  # another group split
    with pytest.raises(DataFormatError, match="2 param groups, but this optimizer has 1"):
        init_state.check_names(osd, [["a", "b"]], "d")


def test_resume_keeps_its_own_optimizer_state(seed, units, train_manifest, tmp_path, monkeypatch):
    """An interrupted unit run resumes from its own step checkpoint, never the seed's
    state again, and ends bit for bit as the uninterrupted run."""
    import megablocks_ablate.train.trainer as trainer_mod

    cfg, out, _ = units["seed"]
    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    shutil.rmtree(os.path.join(run, "final"))  # as if killed after the step-2 checkpoint
    os.remove(os.path.join(run, st.COMPLETE_FILE))

    def no_reload(*a, **k):
        raise AssertionError("a resumed run loaded init_from's optimizer state")

    monkeypatch.setattr(trainer_mod, "load_seed_optimizer", no_reload)
    resumed = cfg.replace([f"out_dir={run}"])
    # a checkpoint written under init_optimizer=seed does not resume as a fresh run
    with pytest.raises(DataFormatError, match="init_optimizer: checkpoint 'seed' vs now 'fresh'"):
        train(resumed.replace(["init_optimizer=fresh"]))
    summary = train(resumed)
    assert summary["start_step"] == 2 and summary["optimizer_init"] == "seed"
    assert model_hash(os.path.join(run, "final")) == model_hash(os.path.join(out, "final"))
    assert _steps(st.load_optimizer_state(os.path.join(run, "final"))) == {12.0}
    done = _complete(run)
    assert (done["optimizer_init"], done["optimizer_init_from"]) == ("seed", cfg.init_from)


def test_old_checkpoints_resume_as_fresh(tmp_path):
    # a config saved before init_optimizer existed was a fresh-optimizer run
    st.check_compatible({}, {"init_optimizer": "fresh"}, str(tmp_path))
    with pytest.raises(DataFormatError, match="init_optimizer: checkpoint 'fresh' vs now 'seed'"):
        st.check_compatible({}, {"init_optimizer": "seed"}, str(tmp_path))


def test_init_optimizer_seed_needs_init_from():
    with pytest.raises(ConfigError, match="init_optimizer: 'seed' .* init_from is not set"):
        TrainConfig.from_dict({"init_optimizer": "seed"})
    assert TrainConfig().init_optimizer == "fresh"
    assert TrainConfig().checkpoint.final_optimizer is False


@pytest.mark.integration
def test_fsdp2_unit_run_loads_and_keeps_the_seeds_state(seed, units, train_manifest, tmp_path):
    """2 gloo ranks under FSDP2: every rank loads the full state and keeps its shard; the
    curve and the gathered final state are those of the single-process run."""
    import subprocess

    from conftest import PYTHON, subprocess_env

    _, seed_out = seed
    cfg, single, _ = units["seed"]
    out = str(tmp_path / "fsdp")
    ov = dict(
        OWN,
        **{
            "data.unit": "physics-0002",
            "checkpoint.every": 2,
            "init_optimizer": "seed",
            "checkpoint.final_optimizer": "true",
            "distributed.parallel": "fsdp",
        },
    )
    args = tiny_overrides(
        train_manifest,
        out,
        kind="unit",
        init_from=os.path.join(seed_out, "final"),
        train_tokens=256 * UNIT_STEPS,
        **ov,
    )
    torchrun = os.path.join(os.path.dirname(PYTHON), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "megablocks_ablate", "train"]
    r = subprocess.run(
        cmd + args, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = _metrics(single), _metrics(out)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) < 1e-5
    got = st.load_optimizer_state(os.path.join(out, "final"))
    want = st.load_optimizer_state(os.path.join(single, "final"))
    assert _steps(got) == {float(SEED_STEPS + UNIT_STEPS)}
    for name, entry in want["state"].items():
        torch.testing.assert_close(got["state"][name]["exp_avg"], entry["exp_avg"])
    assert _complete(out)["optimizer_init"] == "seed"
