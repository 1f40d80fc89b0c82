"""ModelPool: streaming load, parameters as views, one-call merges equal to file merges."""

from __future__ import annotations

import pytest
import torch
from merge_fixtures import CONFIG, TinyLM, write_family

from megablocks_ablate.checkpoint import load_model_checkpoint, save_model_checkpoint
from megablocks_ablate.errors import ConfigError, NonFiniteError
from megablocks_ablate.merge.file_merge import merge_checkpoints
from megablocks_ablate.merge.pool import ModelPool
from megablocks_ablate.merge.spec import MergeSpec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_merge_equals_file_merge_bitwise(tmp_path, dtype):
    _, ckpts = write_family(str(tmp_path), dtype=dtype)
    spec = MergeSpec.from_dict(
        {"checkpoints": ckpts, "macro": {"cs": ["cs_0", "cs_1"], "bio": ["bio_0"]}}
    )
    merge_checkpoints(spec, str(tmp_path / "merged"), show_progress=False)
    from_file = load_model_checkpoint(str(tmp_path / "merged"))[0]

    pool = ModelPool.from_checkpoints(ckpts, dtype=dtype, show_progress=False)
    assert pool.rows.shape == (3, sum(p.numel() for p in TinyLM(**CONFIG).parameters()))
    model = TinyLM(**CONFIG).to(dtype)
    pool.merge_into(model, spec.weights())
    got = model.state_dict()
    assert set(got) == set(from_file)
    for k, v in from_file.items():
        assert torch.equal(got[k], v), k


def test_bind_makes_views_and_merges_allocate_nothing(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    pool = ModelPool.from_directory(str(tmp_path / "pool"), show_progress=False)
    assert pool.units == ["bio_0", "cs_0", "cs_1"]  # sorted directory order
    model = TinyLM(**CONFIG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    flat = pool.bind(model)
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for k, p in model.named_parameters():
        assert p is params[k] and lo <= p.data_ptr() < hi  # same Parameter, now a view
        assert torch.equal(p, before[k])  # binding keeps the values
    units = {u: load_model_checkpoint(p)[0] for u, p in ckpts.items()}
    for weights in ({"cs_0": 1.0}, {"cs_1": 0.5, "bio_0": 0.5}):
        pool.merge_into(model, weights)
        for k, p in model.named_parameters():
            want = sum(w * units[u][k] for u, w in weights.items())
            torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
            assert lo <= p.data_ptr() < hi
    # the merged model runs
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, CONFIG["vocab_size"])


def test_pool_refusals(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    pool = ModelPool.from_checkpoints(ckpts, show_progress=False)
    model = TinyLM(**CONFIG)
    with pytest.raises(ConfigError, match="not in the pool"):
        pool.merge_into(model, {"nope": 1.0})
    with pytest.raises(ConfigError, match="all merge weights are zero"):
        pool.merge_into(model, [0.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match="not finite"):
        pool.merge_into(model, [float("nan"), 1.0, 0.0])
    with pytest.raises(ConfigError, match="shape"):
        pool.bind(TinyLM(vocab_size=37, hidden_size=12, ffn_size=21))
    _, other = write_family(str(tmp_path / "other"), units=("x_0",), tokenizer="tok-zzz")
    with pytest.raises(ConfigError, match="tokenizer"):
        ModelPool.from_checkpoints({**ckpts, **other}, show_progress=False)


def _poison(ckpt: str, name: str, values: list[float]) -> None:
    state, config, lin = load_model_checkpoint(ckpt)
    state[name].view(-1)[: len(values)] = torch.tensor(values)
    save_model_checkpoint(ckpt, state, config, lin)


def test_pool_refuses_non_finite_unit_rows(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    _poison(ckpts["cs_1"], "norm.bias", [float("nan"), float("inf")])
    with pytest.raises(
        NonFiniteError,
        match=r"pool/cs_1/model.safetensors: tensor 'norm.bias' has 2 non-finite values "
        r"\(NaN/inf\); a unit model with NaN weights means its training diverged",
    ):
        ModelPool.from_checkpoints(ckpts, show_progress=False)


def test_pool_refuses_values_that_overflow_its_dtype(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    _poison(ckpts["bio_0"], "up.bias", [1e6])  # finite in fp32, inf in fp16
    ModelPool.from_checkpoints(ckpts, dtype=torch.bfloat16, show_progress=False)  # fits
    with pytest.raises(
        NonFiniteError,
        match=r"bio_0/model.safetensors: tensor 'up.bias' has 1 values that overflow the pool "
        r"dtype fp16",
    ):
        ModelPool.from_checkpoints(ckpts, dtype=torch.float16, show_progress=False)


def test_merged_model_with_non_finite_values_names_the_tensor(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    _poison(ckpts["bio_0"], "norm.weight", [40000.0, 50000.0, 60000.0])
    pool = ModelPool.from_checkpoints(ckpts, dtype=torch.float16, show_progress=False)
    model = TinyLM(**CONFIG).half()
    pool.merge_into(model, {"cs_0": 0.5, "bio_0": 0.5})  # fits fp16
    with pytest.raises(
        NonFiniteError,
        match=r"merged model \{'cs_0': 1.0, 'bio_0': 2.0\}: tensor 'norm.weight' has 3 "
        r"non-finite values \(NaN/inf\) in fp16: the weighted sum of finite unit models "
        r"overflows fp16",
    ):
        pool.merge_into(model, {"cs_0": 1.0, "bio_0": 2.0})
    # a row made non-finite after loading (e.g. a pool built from raw rows) is named
    pool.rows[pool.units.index("cs_1"), pool.slots["embed.weight"].offset + 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"unit 'cs_1''s row of tensor 'embed.weight'"):
        pool.merge_into(model, {"cs_1": 1.0})
    pool.merge_into(model, {"cs_0": 1.0})  # other mixtures still merge
