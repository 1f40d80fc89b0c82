"""A model run on Triton kernels (CPU interpreter here) vs the same model on PyTorch
references: same loss and gradients. fp32 to 1e-5; bf16 loss to 2e-2 and gradients to
5e-2 of their scale (bf16 rounding differs between the paths)."""

import pytest
import torch

from megablocks_ablate.kernels.dispatch import kernel_backend
from megablocks_ablate.model import ModelConfig


def _loss_and_grads(model, ids, labels, backend):
    model.zero_grad()
    with kernel_backend(backend):
        loss = model(ids, labels=labels)
        loss.backward()
        nll = model.per_token_nll(ids, labels)
    return (
        loss.detach().float(),
        nll,
        {n: p.grad.float().clone() for n, p in model.named_parameters()},
    )


@pytest.mark.parametrize("dtype,norm", [(torch.float32, "layernorm"), (torch.bfloat16, "rmsnorm")])
def test_triton_model_matches_reference_model(dtype, norm):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", [f"norm={norm}", "logit_scale=0.5"])
    model = cfg.build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    labels = torch.randint(0, cfg.vocab_size, (2, 13))
    labels[1, -2:] = -100
    loss_r, nll_r, grads_r = _loss_and_grads(model, ids, labels, "reference")
    loss_t, nll_t, grads_t = _loss_and_grads(model, ids, labels, "triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss_t, loss_r, atol=tol, rtol=tol)
    torch.testing.assert_close(nll_t, nll_r, atol=tol * 5, rtol=tol)
    for name, g in grads_r.items():
        scale = g.abs().max().item() + 1e-12
        err = (grads_t[name] - g).abs().max().item() / scale
        assert err < (1e-4 if dtype == torch.float32 else 5e-2), (name, err)
