"""Block compile (``ModelConfig.compile``) applied by ``wrap_model`` before FSDP2 / DDP
(``train/parallel.py``: :func:`compile_order`, :func:`build_model`,
:func:`apply_compile`), or by ``Transformer.__init__`` under
``MBA_COMPILE_ORDER=model_init``. The order is checked with ``fully_shard``, DDP and
``nn.Module.compile`` replaced by recorders (no GPU, no process group, nothing
compiled); one test compiles a 2-layer model with inductor on CPU and compares it with
eager."""

from __future__ import annotations

import pytest
import torch

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.model.config import ModelConfig
from megablocks_ablate.train import parallel as par
from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.distributed import DistEnv

ENV = par.COMPILE_ORDER_ENV


def _mcfg(compile: bool, n_layers: int = 3) -> ModelConfig:
    return ModelConfig.from_preset("tiny", [f"n_layers={n_layers}", f"compile={compile}"])


def _compiled(model) -> list[bool]:
    return [b._compiled_call_impl is not None for b in model.layers]


def test_compile_order_reads_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert par.compile_order() == "before_shard"
    monkeypatch.setenv(ENV, "")
    assert par.compile_order() == "before_shard"
    monkeypatch.setenv(ENV, " model_init ")
    assert par.compile_order() == "model_init"
    monkeypatch.setenv(ENV, "after_shard")
    with pytest.raises(ConfigError) as e:
        par.compile_order()
    assert str(e.value) == (
        "MBA_COMPILE_ORDER: expected one of before_shard, model_init, got 'after_shard'"
    )


@pytest.mark.parametrize(
    "order, compile, at_init",
    [
        ("before_shard", True, False),  # left to wrap_model
        ("model_init", True, True),  # the old order
        ("before_shard", False, False),
        ("model_init", False, False),
    ],
)
def test_build_model(monkeypatch, order, compile, at_init):
    monkeypatch.setenv(ENV, order)
    mcfg = _mcfg(compile)
    model = par.build_model(mcfg)
    assert _compiled(model) == [at_init] * 3
    assert model.cfg is mcfg and model.cfg.compile is compile  # what the run records
    torch.manual_seed(0)
    eager = _mcfg(False).build()
    assert list(model.state_dict()) == list(eager.state_dict())
    # every other builder (evaluation, merge scoring, benchmarks) compiles as before
    assert _compiled(mcfg.build()) == [compile] * 3


@pytest.fixture
def recorded(monkeypatch):
    """``nn.Module.compile``, ``fully_shard``, DDP and the mesh replaced by recorders of
    one event list (``("compile", block)``, ``("shard", module)``, ``("ddp", module)``)."""
    import torch.distributed.fsdp as fsdp
    import torch.nn.parallel as nn_parallel

    events: list = []

    def compile_(module, *args, **kwargs):
        events.append(("compile", module))
        module._compiled_call_impl = module._call_impl  # compiled, as far as anyone can see

    class Mesh:
        shape, ndim = (2,), 1

    monkeypatch.setattr(torch.nn.Module, "compile", compile_)
    monkeypatch.setattr(fsdp, "fully_shard", lambda m, **kw: events.append(("shard", m)))
    monkeypatch.setattr(par, "build_fsdp_mesh", lambda *a: Mesh())
    monkeypatch.setattr(nn_parallel, "DistributedDataParallel", lambda m, **kw: ("ddp", m))
    return events


def _kinds(events) -> list[str]:
    return [kind for kind, _ in events]


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_wrap_model_compiles_each_block_before_sharding(monkeypatch, recorded, parallel):
    monkeypatch.delenv(ENV, raising=False)
    cfg = TrainConfig.load(None, [f"distributed.parallel={parallel}"])
    env = DistEnv(world_size=2)
    model = par.build_model(_mcfg(True))
    assert recorded == []  # nothing compiled at init
    wrapped = par.wrap_model(model, cfg, env)
    blocks = list(model.layers)
    assert [m for kind, m in recorded if kind == "compile"] == blocks  # each block, once
    if parallel == "fsdp":
        assert _kinds(recorded) == ["compile"] * 3 + ["shard"] * 4  # blocks, then the root
        assert [m for _, m in recorded[3:]] == [*blocks, model]
        assert wrapped is model
    else:
        assert _kinds(recorded) == ["compile"] * 3 and wrapped == ("ddp", model)
    assert _compiled(model) == [True] * 3


def test_model_init_order_and_already_compiled_blocks(monkeypatch, recorded):
    """``model_init``: the blocks are compiled when the model is built and ``wrap_model``
    compiles nothing; a model built by ``ModelConfig.build()`` (as the benchmarks do) is
    not compiled twice under ``before_shard`` either."""
    cfg = TrainConfig.load(None, ["distributed.parallel=fsdp"])
    for order, build in (("model_init", par.build_model), ("before_shard", ModelConfig.build)):
        monkeypatch.setenv(ENV, order)
        recorded.clear()
        model = build(_mcfg(True))
        assert _kinds(recorded) == ["compile"] * 3
        par.wrap_model(model, cfg, DistEnv(world_size=2))
        assert _kinds(recorded) == ["compile"] * 3 + ["shard"] * 4
    recorded.clear()
    par.wrap_model(par.build_model(_mcfg(False)), cfg, DistEnv(world_size=2))
    assert _kinds(recorded) == ["shard"] * 4  # compile: false compiles nothing


@pytest.mark.integration  # inductor on CPU: about half a minute
def test_compiled_blocks_match_eager(monkeypatch):
    """``compile: true`` through ``build_model`` and ``wrap_model`` (one process): the
    blocks really compiled, the same state-dict keys, and the loss and gradients of
    eager to fp32 rounding."""
    from torch._dynamo.utils import counters

    monkeypatch.delenv(ENV, raising=False)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    counters.clear()
    cfg = TrainConfig.load(None, [])
    results = {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = par.wrap_model(par.build_model(_mcfg(compile, n_layers=2)), cfg, DistEnv())
        assert _compiled(model) == [compile] * 2
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results[compile] = (loss.detach(), grads, list(model.state_dict()))
    (loss, grads, keys), (eager_loss, eager_grads, eager_keys) = results[True], results[False]
    assert counters["stats"]["unique_graphs"] > 0  # dynamo traced the blocks
    assert keys == eager_keys and not any("_orig_mod" in k for k in keys)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-4, atol=1e-6)
