"""The parallel-block decoder: API, loss paths, causality, checkpointing, names."""

import pytest
import torch
import torch.nn.functional as F

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.model import ModelConfig


def _model(*overrides, seed=0):
    torch.manual_seed(seed)
    model = ModelConfig.from_preset("tiny", list(overrides)).build()
    with torch.no_grad():  # move off the identity-norm init so every path matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _batch(cfg, b=2, t=19, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    labels[0, :3] = -100
    return ids, labels


@pytest.mark.parametrize(
    "overrides", [(), ("tie_embeddings=false", "logit_scale=0.5", "norm=rmsnorm")]
)
def test_loss_and_per_token_nll_match_full_logits(overrides):
    model = _model(*overrides)
    ids, labels = _batch(model.cfg)
    logits = model(ids)
    assert logits.shape == (2, 19, model.cfg.padded_vocab_size)
    expected = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    )
    nll = model.per_token_nll(ids, labels)
    assert nll.dtype == torch.float32 and nll.shape == (2, 19)
    torch.testing.assert_close(nll.flatten(), expected, atol=1e-5, rtol=1e-5)
    loss = model(ids, labels=labels)
    torch.testing.assert_close(loss, expected.sum() / (labels != -100).sum(), atol=1e-6, rtol=1e-6)


def test_fused_loss_gradients_match_full_logits():
    model = _model()
    ids, labels = _batch(model.cfg)
    model(ids, labels=labels).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_causal():
    model = _model()
    ids, _ = _batch(model.cfg)
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % model.cfg.vocab_size
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_activation_checkpointing_gives_same_grads():
    model = _model()
    ids, labels = _batch(model.cfg)
    model(ids, labels=labels).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.cfg.activation_checkpointing = True
    model.train()
    model(ids, labels=labels).backward()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_state_dict_names():
    model = _model("tie_embeddings=false")
    cfg = model.cfg
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["embed.weight"] == (cfg.padded_vocab_size, cfg.d_model)
    assert shapes["lm_head.weight"] == (cfg.padded_vocab_size, cfg.d_model)
    assert shapes["layers.1.in_proj.weight"] == (
        cfg.q_dim + 2 * cfg.kv_dim + 2 * cfg.mlp_hidden,
        cfg.d_model,
    )
    assert shapes["layers.1.qk_norm.weight"] == (cfg.n_heads + cfg.n_kv_heads, cfg.head_dim)
    assert shapes["layers.0.attn_out.weight"] == (cfg.d_model, cfg.q_dim)
    assert shapes["layers.0.mlp_out.weight"] == (cfg.d_model, cfg.mlp_hidden)
    assert len(shapes) == 3 + 5 * cfg.n_layers  # no buffers: RoPE tables are not state
    tied = _model()
    assert "lm_head.weight" not in tied.state_dict()


def test_bf16_model_runs():
    model = _model().to(torch.bfloat16)
    ids, labels = _batch(model.cfg)
    loss = model(ids, labels=labels)
    loss.backward()
    ref = _model()(ids, labels=labels)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05


def test_too_long_sequence_names_max_seq_len():
    model = _model()
    with pytest.raises(ConfigError, match="max_seq_len"):
        model(torch.zeros(1, model.cfg.max_seq_len + 1, dtype=torch.long))
