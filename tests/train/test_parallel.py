"""FSDP2 mixed precision, HSDP meshes, activation checkpointing (train/parallel.py).

Pure functions first (policy dtypes, mesh shapes, errors, the checkpointing policy and
the activation-memory estimate against the tensors the model really saves), then
multi-process runs on CPU with gloo: this file is also the worker those runs start
(``torchrun ... tests/train/test_parallel.py worker OUT``), checking on 2 ranks that
FSDP2 gradients on the 1-D, (1 x 2) and (2 x 1) meshes equal one process's, that the
bf16 policy computes with bf16 parameters while the sharded fp32 master weights are
what the optimizer steps and checkpoints hold, that gradients accumulated over two
micro batches (reduce-scattered once, or after every micro batch) equal one process's
with the collectives each mode promises; and the real trainer under bf16 FSDP2 and
HSDP against one rank / one process. (Compile: ``test_parallel_compile.py``.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

import pytest
import torch
from conftest import PYTHON, subprocess_env, tiny_overrides

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.model.config import ModelConfig
from megablocks_ablate.model.transformer import checkpointed_blocks
from megablocks_ablate.train import parallel as par
from megablocks_ablate.train.config import DistributedConfig, TrainConfig
from megablocks_ablate.train.distributed import DistEnv

BIN = os.path.dirname(PYTHON)
HERE = os.path.abspath(__file__)


# ---- precision -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, device, param, expected",
    [
        ("auto", "cuda", "auto", ("bf16", "fp32")),
        ("auto", "cpu", "auto", ("fp32", "fp32")),
        ("bf16", "cpu", "auto", ("bf16", "fp32")),
        ("fp32", "cuda", "auto", ("fp32", "fp32")),
        ("auto", "cuda", "fp32", ("fp32", "fp32")),  # the old path: fp32 all-gathers
        ("bf16", "cuda", "bf16", ("bf16", "fp32")),
    ],
)
def test_policy_dtypes_follow_the_precision(precision, device, param, expected):
    assert par.fsdp_dtypes(precision, device, param) == expected
    assert par.fsdp_dtypes(precision, device, param, "bf16")[1] == "bf16"


def test_which_runs_compute_in_bf16():
    table = {
        (p, d): par.computes_in_bf16(p, d)
        for p in ("auto", "fp32", "bf16")
        for d in ("cpu", "cuda")
    }
    assert [k for k, v in table.items() if v] == [
        ("auto", "cuda"),
        ("bf16", "cpu"),
        ("bf16", "cuda"),
    ]


def test_bf16_parameters_need_bf16_compute():
    with pytest.raises(ConfigError, match="fsdp_param_dtype: bf16 needs a run computing in bf16"):
        par.fsdp_dtypes("fp32", "cuda", "bf16")
    with pytest.raises(ConfigError, match="auto"):
        par.fsdp_dtypes("auto", "cpu", "bf16")


def test_the_policy_object():
    mp = par.mp_policy("bf16", "fp32")
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mp.cast_forward_inputs is False  # the fp32 RoPE tables stay fp32
    assert par.mp_policy("fp32", "fp32").param_dtype == torch.float32


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distributed.parallel=fsdp", "distributed.fsdp_shard_size=0"], "must be >= 1"),
        (["distributed.fsdp_param_dtype=bf16"], "applies to parallel=fsdp only"),
        (["distributed.fsdp_shard_size=8"], "fsdp_shard_size=8: applies to parallel=fsdp"),
        (["distributed.parallel=fsdp", "distributed.fsdp_param_dtype=fp16"], "expected one"),
        (["activation_checkpointing=some"], "activation_checkpointing"),
        (
            ["distributed.fsdp_reduce_every_micro_batch=true"],
            r"distributed.fsdp_reduce_every_micro_batch=True: applies to parallel=fsdp only "
            r"\(parallel is 'ddp'\)$",
        ),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(None, overrides)


def test_config_fields_load():
    cfg = TrainConfig.load(
        None,
        [
            "distributed.parallel=fsdp",
            "distributed.fsdp_param_dtype=fp32",
            "distributed.fsdp_reduce_dtype=bf16",
            "distributed.fsdp_shard_size=8",
            "distributed.fsdp_reduce_every_micro_batch=true",
            "activation_checkpointing=selective",
        ],
    )
    d = cfg.distributed
    assert (d.fsdp_param_dtype, d.fsdp_reduce_dtype, d.fsdp_shard_size) == ("fp32", "bf16", 8)
    assert d.fsdp_reduce_every_micro_batch is True
    assert cfg.to_dict()["distributed"]["fsdp_reduce_every_micro_batch"] is True
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert DistributedConfig().fsdp_param_dtype == "auto"
    assert DistributedConfig().fsdp_reduce_every_micro_batch is False


# ---- meshes ----------------------------------------------------------------------------


def _hosts(*counts):
    return [f"node{i}" for i, n in enumerate(counts) for _ in range(n)]


@pytest.mark.parametrize(
    "world, shard, hosts, shape",
    [
        (8, None, _hosts(8), (8,)),  # one node: plain FSDP
        (16, None, _hosts(8, 8), (2, 8)),  # two nodes: shard within each, replicate across
        (32, None, _hosts(4, 4, 4, 4, 4, 4, 4, 4), (8, 4)),
        (8, 2, _hosts(8), (4, 2)),  # explicit: always 2-D
        (2, 2, _hosts(2), (1, 2)),
        (2, 1, _hosts(2), (2, 1)),
        (6, None, _hosts(4, 2), (6,)),  # uneven nodes: plain FSDP (warned)
        (4, None, ["a", "b", "a", "b"], (4,)),  # a node's ranks not consecutive
    ],
)
def test_mesh_shapes(world, shard, hosts, shape):
    assert par.fsdp_mesh_shape(world, shard, hosts) == shape


def test_mesh_errors_and_warnings(caplog):
    with pytest.raises(ConfigError, match="fsdp_shard_size: 3 does not divide the 8 ranks"):
        par.fsdp_mesh_shape(8, 3, _hosts(8))
    with pytest.raises(ConfigError, match="16 does not divide the 8 ranks"):
        par.fsdp_mesh_shape(8, 16, _hosts(8))
    with caplog.at_level(logging.WARNING, logger=par.__name__):
        par.fsdp_mesh_shape(6, None, _hosts(4, 2))
    assert "not 2 equal runs of consecutive ranks per node" in caplog.text
    assert par.node_size(_hosts(3, 3)) == 3 and par.node_size(["a", "b", "a"]) is None
    assert par._spans_nodes(_hosts(4, 4), 8) and not par._spans_nodes(_hosts(4, 4), 4)


# ---- activation checkpointing ----------------------------------------------------------


def test_checkpointed_blocks():
    assert checkpointed_blocks("none", 4) == frozenset()
    assert checkpointed_blocks("full", 3) == {0, 1, 2}
    assert checkpointed_blocks("selective", 5) == {0, 2, 4}  # every other block
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        checkpointed_blocks("every", 4)


def _tiny(n_layers=3, **extra):
    cfg = ModelConfig.from_preset("tiny", [f"n_layers={n_layers}"])
    torch.manual_seed(0)
    return cfg.build(**extra)


def test_policies_give_the_same_loss_and_gradients():
    """none, selective and full: equal losses and gradients; the checkpointed blocks
    (and only they) run their forward a second time, in backward."""
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    results = {}
    for policy in ("none", "selective", "full"):
        model = _tiny()
        model.set_activation_checkpointing(policy)
        calls = [0] * len(model.layers)
        for i, block in enumerate(model.layers):
            block.register_forward_pre_hook(lambda m, a, i=i, c=calls: c.__setitem__(i, c[i] + 1))
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results[policy] = (loss.detach(), [p.grad for p in model.parameters()])
        expected = [2 if i in checkpointed_blocks(policy, 3) else 1 for i in range(3)]
        assert calls == expected, (policy, calls)
    ref_loss, ref_grads = results["none"]
    for policy in ("selective", "full"):
        loss, grads = results[policy]
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)
    model = _tiny()
    model.eval()  # no recomputation outside training
    assert model.checkpointing_policy() == "none"


def test_the_deprecated_model_flag_means_full(caplog):
    """Old configs (model_overrides: [activation_checkpointing=true]) still load and run
    ``full``, with a deprecation warning; the train field wins when it is set."""
    cfg = TrainConfig.load(None, ["model_overrides=[activation_checkpointing=true]"])
    model = ModelConfig.from_preset(cfg.model, cfg.model_overrides).build()
    assert model.checkpointing_policy() == "full"  # a model on its own follows its flag
    with caplog.at_level(logging.WARNING, logger=par.__name__):
        wrapped = par.wrap_model(model, cfg, DistEnv())
    assert wrapped is model and model.activation_checkpointing == "full"
    assert "activation_checkpointing=true is deprecated" in caplog.text
    assert par.resolve_checkpointing("selective", True) == "selective"
    assert par.resolve_checkpointing("none", False) == "none"
    plain = par.wrap_model(
        _tiny(), TrainConfig.load(None, ["activation_checkpointing=full"]), DistEnv()
    )
    assert plain.checkpointing_policy() == "full"


# ---- the memory estimate ---------------------------------------------------------------


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", torch.bfloat16):
            model(ids[:, :-1], ids[:, 1:])
    return sum(seen.values())


def _measured_per_token(fields: dict, dtype, math: bool, seq: int, batch: int = 1) -> float:
    """Saved bytes per token of one block: two models, 2 and 1 blocks, at ``seq`` tokens
    (fp32 weights: also at seq / 2, cancelling autocast's per-layer bf16 weight copies)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megablocks_ablate.kernels import dispatch

    def per_layer(t):
        out = []
        for n_layers in (2, 1):
            cfg = ModelConfig.from_dict(
                dict(vocab_size=256, d_model=64, n_heads=4, mlp_hidden=128, max_seq_len=256)
                | fields
                | {"n_layers": n_layers}
            )
            torch.manual_seed(0)
            model = cfg.build(dtype=dtype)
            ids = torch.randint(0, 256, (batch, t + 1))
            attn = sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()
            with dispatch.kernel_backend("triton"), attn:  # the CUDA path's kernels
                out.append(_saved_bytes(model, ids))
        return out[0] - out[1]

    if dtype == torch.bfloat16:
        return per_layer(seq) / (batch * seq)
    return (per_layer(seq) - per_layer(seq // 2)) / (batch * (seq - seq // 2))


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"qk_norm": True, "n_kv_heads": 2},
        {"block": "sequential", "norms_per_block": 2},
        {"norms_per_block": 2, "mlp": "gelu", "bias": True},
    ],
    ids=["parallel", "qk_norm-gqa", "sequential", "neox"],
)
def test_activation_estimate_matches_the_saved_tensors(fields):
    pytest.importorskip("triton")
    cfg = ModelConfig.from_dict(
        dict(vocab_size=256, d_model=64, n_heads=4, mlp_hidden=128, max_seq_len=256) | fields
    )
    # bf16 parameters (FSDP2's bf16 policy): a bf16 residual stream
    got = _measured_per_token(fields, torch.bfloat16, False, 32)
    assert got == par.activation_bytes_per_token(cfg, "flash", 32, residual_bytes=2)
    if fields:  # the rest once (the Triton interpreter is slow)
        return
    # fp32 weights under autocast (DDP, one process): an fp32 residual stream
    got = _measured_per_token(fields, None, False, 32)
    assert got == par.activation_bytes_per_token(cfg, "flash", 32, residual_bytes=4)
    # math attention: the fp32 probabilities, 4 h T bytes, exactly; the copies of q, k, v
    # and the output it makes depend on their layout (within 2 (2q + 2kv) of the formula)
    math = {t: _measured_per_token(fields, torch.bfloat16, True, t) for t in (16, 32)}
    assert math[32] - math[16] == 4 * cfg.n_heads * 16
    formula = par.activation_bytes_per_token(cfg, "math", 32, residual_bytes=2)
    assert abs(math[32] - formula) <= 2 * (2 * cfg.q_dim + 2 * cfg.kv_dim)


def test_the_preset_estimates_in_the_docs():
    """docs/training.md "Memory" quotes these (bytes per token per block, GiB)."""
    small, big = ModelConfig.from_preset("130m"), ModelConfig.from_preset("1.1b")
    assert par.activation_bytes_per_token(small) == 26168
    assert par.activation_bytes_per_token(big) == 61512
    assert par.activation_bytes_per_token(big, residual_bytes=2) == 57416
    gib = {
        (name, mb, att, policy): round(
            par.activation_estimate(cfg, mb, 2048, policy, att) / par.GIB, 1
        )
        for name, cfg, mb in (("130m", small, 16), ("1.1b", big, 4))
        for att in ("flash", "math")
        for policy in ("none", "selective", "full")
    }
    assert gib[("1.1b", 4, "flash", "none")] == 11.7
    assert gib[("1.1b", 4, "math", "none")] == 38.7
    assert gib[("1.1b", 4, "flash", "selective")] == 6.9
    assert gib[("1.1b", 4, "flash", "full")] == 2.0
    assert gib[("130m", 16, "flash", "none")] == 9.9
    assert gib[("130m", 16, "math", "none")] == 48.1


# ---- two gloo processes ----------------------------------------------------------------


def _reference(model, ids):
    """Loss and gradients of the mean loss over the whole batch, in one process."""
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _fsdp_copy(env, precision: str, shard_size=None, param="auto", policy="none"):
    model = _tiny()
    model.set_activation_checkpointing(policy)
    dist_cfg = DistributedConfig(
        parallel="fsdp", fsdp_param_dtype=param, fsdp_shard_size=shard_size
    )
    return par.apply_fsdp(model, env, dist_cfg, precision)


def _half(ids, env):
    n = ids.shape[0] // env.world_size
    return ids[env.rank * n : (env.rank + 1) * n]


def _check_fp32_meshes(env, ids) -> dict:
    """Every mesh shape and a checkpointing policy: gradients (and their global norm)
    equal one process's."""
    from megablocks_ablate.train.divergence import total_grad_norm

    ref_loss, ref = _reference(_tiny(), ids)
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref.values()]))
    shapes = {}
    for shard, policy in ((None, "none"), (2, "none"), (1, "none"), (2, "selective")):
        model = _fsdp_copy(env, "fp32", shard, policy=policy)
        mine = _half(ids, env)
        model(mine[:, :-1], mine[:, 1:]).backward()
        params = list(model.parameters())
        norm = total_grad_norm(params)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), ref[name], rtol=1e-4, atol=1e-6)
        shapes[f"{shard}/{policy}"] = list(params[0].device_mesh.shape)
    return {"shapes": shapes, "ref_loss": ref_loss.item()}


def _check_bf16_policy(env, ids) -> dict:
    """bf16 compute on bf16 unsharded parameters; sharded fp32 masters are what the
    optimizer steps and the full state dict (the checkpoint) holds."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = _fsdp_copy(env, "bf16")
    seen = {}
    model.layers[0].in_proj.register_forward_pre_hook(
        lambda m, a: seen.update(weight=str(m.weight.dtype), input=str(a[0].dtype))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mine = _half(ids, env)
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(mine[:, :-1], mine[:, 1:])
        loss.backward()
    p = model.layers[0].in_proj.weight
    grad = {"type": type(p.grad).__name__, "dtype": str(p.grad.dtype)}
    opt.step()
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    w = sd["layers.0.in_proj.weight"]
    return {
        "seen": seen,
        "param": [type(p).__name__, str(p.dtype), p.placements[0].is_shard(0)],
        "grad": grad,
        "state_dtypes": sorted({str(v.dtype) for v in sd.values()}),
        "state_is_master": bool(torch.equal(w, p.full_tensor().detach())),
        "not_bf16_rounded": bool((w != w.to(torch.bfloat16).float()).any()),
        "loss": loss.item(),
    }


@contextlib.contextmanager
def _counting(*names: str):
    """Calls of the ``torch.distributed`` functions ``names`` (FSDP2 looks them up on
    the module at each call), counted while the block runs."""
    import torch.distributed as dist

    counts = dict.fromkeys(names, 0)
    originals = {n: getattr(dist, n) for n in names}

    def counted(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for n in names:
        setattr(dist, n, counted(n))
    try:
        yield counts
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)


def _check_micro_batches(env, ids) -> dict:
    """Each rank's half of the batch in two micro batches, gradient sync set by
    ``micro_batch_sync`` (once per step, or after every micro batch), on the 1-D and the
    HSDP 2 x 1 meshes: the accumulated gradients equal one process's; per micro batch
    the reduce-scatters and all-reduces run and the sharded gradients present after the
    first are recorded."""
    _, ref = _reference(_tiny(), ids)
    found = {}
    for shard in (None, 1):
        for every in (False, True):
            model = _fsdp_copy(env, "fp32", shard)
            comms, sharded_grads = [], None
            for i, micro in enumerate(_half(ids, env).chunk(2)):
                with _counting("reduce_scatter_single", "all_reduce") as counts:
                    with par.micro_batch_sync(model, i == 1, every):
                        (model(micro[:, :-1], micro[:, 1:]) / 2).backward()
                comms.append([counts["reduce_scatter_single"], counts["all_reduce"]])
                if i == 0:
                    sharded_grads = sum(p.grad is not None for p in model.parameters())
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad.full_tensor(), ref[name], rtol=1e-5, atol=1e-7)
            found[f"{shard}/{every}"] = {"comms": comms, "sharded_grads": sharded_grads}
    return found


def _worker(out_dir: str) -> None:
    from megablocks_ablate.train.distributed import distributed_session

    with distributed_session("cpu", "gloo") as env:
        ids = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(2))
        result = {
            "fp32": _check_fp32_meshes(env, ids),
            "bf16": _check_bf16_policy(env, ids),
            "micro": _check_micro_batches(env, ids),
        }
        with open(os.path.join(out_dir, f"rank{env.rank}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f)


def _run(cmd, timeout=240):
    import subprocess

    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def _torchrun(n: int, *args) -> str:
    runner = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", str(n)]
    return _run([*runner, *args])


@pytest.mark.integration
def test_fsdp2_meshes_and_bf16_policy_on_two_ranks(tmp_path):
    _torchrun(2, HERE, "worker", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for res in ranks:
        assert res["fp32"]["shapes"] == {
            "None/none": [2],
            "2/none": [1, 2],
            "1/none": [2, 1],
            "2/selective": [1, 2],
        }
        b = res["bf16"]
        assert b["seen"] == {"weight": "torch.bfloat16", "input": "torch.bfloat16"}
        assert b["param"] == ["DTensor", "torch.float32", True]  # sharded dim 0
        assert b["grad"] == {"type": "DTensor", "dtype": "torch.float32"}
        assert b["state_dtypes"] == ["torch.float32"]
        assert b["state_is_master"] and b["not_bf16_rounded"]
        # 3 blocks + the root: 4 FSDP2 groups, each reducing its gradients in one call;
        # a 1-rank shard group (HSDP 2 x 1) has no reduce-scatter to make
        n, params = 4, len(list(_tiny().parameters()))
        assert res["micro"] == {
            "None/False": {"comms": [[0, 0], [n, 0]], "sharded_grads": 0},
            "None/True": {"comms": [[n, 0], [n, 0]], "sharded_grads": params},
            "1/False": {"comms": [[0, 0], [0, n]], "sharded_grads": 0},
            # reduce-scattered shards summed, all-reduced once, on the last micro batch
            "1/True": {"comms": [[0, 0], [0, n]], "sharded_grads": 0},
        }
    # bf16 compute agrees with fp32 to bf16's precision
    mean_bf16 = sum(r["bf16"]["loss"] for r in ranks) / 2
    assert abs(mean_bf16 - ranks[0]["fp32"]["ref_loss"]) < 0.05


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]


def _train_overrides(manifest, out, **extra):
    return tiny_overrides(
        manifest,
        out,
        micro_batch=2,
        train_tokens=256 * 4,
        **{"data.unit": "biology-0001", "distributed.parallel": "fsdp"},
        **extra,
    )


TRAIN = ["-m", "megablocks_ablate", "train"]


@pytest.mark.integration
def test_trainer_bf16_fsdp2_two_ranks_match_one(train_manifest, tmp_path):
    """The trainer under FSDP2's bf16 policy: 2 ranks give one rank's loss curve (one
    rank inside a one-rank group runs the same FSDP2 path), and its step checkpoint
    holds the fp32 master weights."""
    from megablocks_ablate.train.state import load_train_checkpoint, step_dir

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    extra = {"precision": "bf16", "checkpoint.every": 2}
    log = _torchrun(1, *TRAIN, *_train_overrides(train_manifest, one, **extra))
    assert "FSDP2: FSDP mesh 1; parameters gathered in bf16, gradients reduced in fp32" in log
    _torchrun(2, *TRAIN, *_train_overrides(train_manifest, two, **extra))
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)  # (bitwise here)
    model = load_train_checkpoint(step_dir(two, 2))["model"]
    assert {str(v.dtype) for v in model.values()} == {"torch.float32"}
    w = model["layers.0.in_proj.weight"]
    assert (w != w.to(torch.bfloat16).float()).any()  # fp32 masters, not bf16 copies


@pytest.mark.integration
def test_trainer_hsdp_matches_one_process(train_manifest, tmp_path):
    """HSDP (2 x 1: replicate over both ranks) through the trainer, fp32, with full
    recomputation: one process's loss curve."""
    from megablocks_ablate.train.trainer import train

    ref = str(tmp_path / "ref")
    train(TrainConfig.load(None, _train_overrides(train_manifest, ref)))
    out = str(tmp_path / "hsdp")
    extra = {"distributed.fsdp_shard_size": 1, "activation_checkpointing": "full"}
    log = _torchrun(2, *TRAIN, *_train_overrides(train_manifest, out, **extra))
    assert "HSDP (replicate x shard) mesh 2 x 1" in log
    a, b = _losses(ref), _losses(out)
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
