"""ModelConfig: presets, derived sizes, parameter count and FLOPs per token."""

import pytest
import torch

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.model import ModelConfig


@pytest.mark.parametrize("name", ["tiny", "demo", "130m", "1.1b"])
def test_param_count_matches_built_module(name):
    cfg = ModelConfig.from_preset(name)
    model = cfg.build(device="meta")  # no memory for the big presets
    assert model.num_params() == cfg.num_params()
    untied = cfg.replace(["tie_embeddings=false"])
    assert untied.build(device="meta").num_params() == untied.num_params()


def test_preset_shapes():
    tiny, demo = ModelConfig.from_preset("tiny"), ModelConfig.from_preset("demo")
    m130, m1b = ModelConfig.from_preset("130m"), ModelConfig.from_preset("1.1b")
    assert tiny.num_params() < 1_000_000
    assert (demo.d_model, demo.n_layers, demo.n_heads, demo.padded_vocab_size) == (128, 2, 4, 2048)
    assert (m130.d_model, m130.n_layers, m130.n_heads, m130.padded_vocab_size) == (
        768,
        12,
        12,
        50304,
    )
    assert (m1b.d_model, m1b.n_layers, m1b.n_heads, m1b.max_seq_len) == (2048, 24, 16, 2048)
    assert 120e6 < m130.num_params() < 135e6
    assert 1.05e9 < m1b.num_params() < 1.15e9


def test_derived_sizes():
    assert ModelConfig(vocab_size=50277).padded_vocab_size == 50304
    assert ModelConfig(vocab_size=256).padded_vocab_size == 256
    assert ModelConfig(vocab_size=250, vocab_multiple=1).padded_vocab_size == 250
    # SwiGLU default: 8/3 * d_model rounded up to a multiple of 128.
    assert [ModelConfig(d_model=d, n_heads=8).mlp_hidden for d in (128, 768, 2048)] == [
        384,
        2048,
        5504,
    ]
    assert ModelConfig(n_heads=12).n_kv_heads == 12


def test_flops_per_token_formula():
    cfg = ModelConfig.from_preset("130m")
    d, L, V, m = 768, 12, 50304, 2048
    block = d * (3 * d + 2 * m) + d * d + m * d + d
    n_matmul = L * block + d + V * d
    assert cfg.flops_per_token(2048) == 6 * n_matmul + 12 * L * d * 2048
    assert cfg.flops_per_token() == cfg.flops_per_token(cfg.max_seq_len)


def test_round_trip_and_overrides(tmp_path):
    cfg = ModelConfig.from_preset("demo", ["n_layers=3", "qk_norm=true"])
    assert cfg.n_layers == 3 and cfg.qk_norm
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "m.yaml")
    assert ModelConfig.from_preset(str(tmp_path / "m.yaml")) == cfg


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match="n_heads: must divide d_model"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(d_model=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="known presets: .*tiny"):
        ModelConfig.from_preset("nope")
    with pytest.raises(ConfigError, match="norm"):
        ModelConfig.from_preset("tiny", ["norm=batchnorm"])


def test_build_gives_fresh_scaled_init():
    cfg = ModelConfig.from_preset("demo", ["n_layers=8", "init_std=0.02"])
    torch.manual_seed(0)
    model = cfg.build()
    out_std = model.layers[0].mlp_out.weight.std().item()
    in_std = model.layers[0].in_proj.weight.std().item()
    assert in_std == pytest.approx(0.02, rel=0.05)
    assert out_std == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2 * 8)
