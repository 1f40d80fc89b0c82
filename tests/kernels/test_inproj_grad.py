"""MBA_INPROJ_GRAD=buffer (one in-projection gradient buffer per block backward) against
the autograd default: the switch, the model's loss and every parameter gradient (fp32 to
1e-6 relative, bf16 to bf16 rounding), and that the buffer really reaches the GEMM with
no ``cat`` on the way."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.kernels import dispatch, inproj_grad
from megablocks_ablate.model import ModelConfig


@pytest.fixture(autouse=True)
def _restore_switch():
    yield
    dispatch.set_inproj_grad(None)


@pytest.fixture
def allocations(monkeypatch):
    """Every buffer :class:`inproj_grad.InProjGrad` allocates, in order."""
    made = []
    original = inproj_grad.InProjGrad._allocate

    def spy(self):
        buf = original(self)
        made.append(buf)
        return buf

    monkeypatch.setattr(inproj_grad.InProjGrad, "_allocate", spy)
    return made


# ---- the switch ------------------------------------------------------------------------


def test_switch_reads_the_environment(monkeypatch):
    monkeypatch.delenv("MBA_INPROJ_GRAD", raising=False)
    assert dispatch.configured_inproj_grad() == "autograd"  # the default
    monkeypatch.setenv("MBA_INPROJ_GRAD", " Buffer ")
    assert dispatch.configured_inproj_grad() == "buffer"  # re-read when the value changes
    with dispatch.inproj_grad("autograd"):
        assert dispatch.configured_inproj_grad() == "autograd"
    assert dispatch.configured_inproj_grad() == "buffer"


def test_bad_value_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MBA_INPROJ_GRAD", "inplace")
    with pytest.raises(ConfigError) as err:
        dispatch.configured_inproj_grad()
    assert str(err.value) == "MBA_INPROJ_GRAD: expected one of autograd, buffer, got 'inplace'"
    with pytest.raises(ConfigError, match="expected one of autograd, buffer"):
        dispatch.set_inproj_grad("cat")


# ---- the model: same loss and gradients -------------------------------------------------


def _loss_and_grads(cfg, mode, dtype, backend, checkpointing):
    torch.manual_seed(0)
    model = cfg.build()
    with torch.no_grad():  # move norms and biases off their 1/0 init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.to(dtype)
    model.set_activation_checkpointing(checkpointing)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    labels = torch.randint(0, cfg.vocab_size, (2, 13))
    labels[1, -2:] = -100
    with dispatch.inproj_grad(mode), dispatch.kernel_backend(backend):
        loss = model(ids, labels=labels)
        loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def _check_equal(cfg, dtype, backend, checkpointing, allocations):
    loss_a, grads_a = _loss_and_grads(cfg, "autograd", dtype, backend, checkpointing)
    assert allocations == []
    loss_b, grads_b = _loss_and_grads(cfg, "buffer", dtype, backend, checkpointing)
    # one buffer per block backward, recomputed (checkpointed) blocks included
    assert len(allocations) == cfg.n_layers
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss_b, loss_a, rtol=tol, atol=0)
    assert grads_b.keys() == grads_a.keys()
    for name, g in grads_a.items():
        scale = g.abs().max().item()
        assert scale > 0, name  # every parameter gets a gradient here
        err = (grads_b[name] - g).abs().max().item() / scale
        assert err <= tol, (name, err)


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("qk_norm", ["true", "false"])
def test_parallel_block_fp32_equals_autograd(qk_norm, mlp, checkpointing, allocations):
    cfg = ModelConfig.from_preset("tiny", [f"qk_norm={qk_norm}", f"mlp={mlp}"])
    _check_equal(cfg, torch.float32, "reference", checkpointing, allocations)


@pytest.mark.parametrize("overrides", [["qk_norm=false"], ["mlp=gelu", "norm=rmsnorm"]])
def test_parallel_block_bf16_equals_autograd(overrides, allocations):
    cfg = ModelConfig.from_preset("tiny", overrides)
    _check_equal(cfg, torch.bfloat16, "reference", "full", allocations)


@pytest.mark.parametrize(
    "overrides",
    [
        ["norms_per_block=2", "qk_norm=false"],  # GPT-NeoX-like parallel block, two norms
        ["norms_per_block=2", "block=sequential", "rope_layout=half", "norm=rmsnorm"],  # Llama
        ["norms_per_block=2", "mlp=gelu", "rotary_fraction=0.5", "bias=true", "norm_bias=true"],
    ],
)
def test_two_norm_and_sequential_blocks_equal_autograd(overrides, allocations):
    """Two norms: only the attention half (qk | v) goes through the buffer."""
    cfg = ModelConfig.from_preset("tiny", overrides)
    _check_equal(cfg, torch.float32, "reference", "full", allocations)


@pytest.mark.parametrize(
    "dtype,overrides",
    [(torch.float32, ["qk_norm=false"]), (torch.bfloat16, ["norm=rmsnorm"])],
)
def test_triton_kernels_equal_autograd(dtype, overrides, allocations):
    """The Triton RoPE/SwiGLU buffer backwards (CPU interpreter) in the whole model."""
    cfg = ModelConfig.from_preset("tiny", overrides)
    _check_equal(cfg, dtype, "triton", "full", allocations)


def test_no_grad_forward_takes_the_plain_path(allocations):
    cfg = ModelConfig.from_preset("tiny", ["qk_norm=false"])
    model = cfg.build()
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    with torch.no_grad(), dispatch.kernel_backend("reference"):
        plain = model(ids)
        with dispatch.inproj_grad("buffer"):
            assert torch.equal(model(ids), plain)
    assert allocations == []


# ---- no cat: the one buffer is what the GEMM's backward receives ------------------------


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.copies: list[tuple[int, ...]] = []  # shapes written by copy_ (2-D and up)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        if self.ops[-1] == "copy_" and args[0].dim() > 1:  # the interpreter's are 1-D
            self.copies.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["autograd", "buffer"])
def test_buffer_reaches_the_gemm_without_cat(mode, backend, allocations):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", ["qk_norm=false"])
    block = cfg.build().layers[0]
    cos, sin = cfg.build().rope_tables(torch.device("cpu"))
    x = torch.randn(2, 5, cfg.d_model, requires_grad=True)
    seen = []

    def hook(module, inputs, output):
        output.register_hook(seen.append)

    block.in_proj.register_forward_hook(hook)
    with dispatch.inproj_grad(mode), dispatch.kernel_backend(backend):
        out = block(x, cos, sin)
        log = _OpLog()
        with log:
            out.backward(torch.randn_like(out))
    (g,) = seen  # the gradient handed to the in-projection GEMM's backward
    assert g.shape == (2, 5, cfg.in_proj_dim)
    if mode == "autograd":
        # qkv|mlp_in, qk|v, q|k (after RoPE), and gate|up (the reference's chunk; the
        # Triton SwiGLU writes one tensor): one cat each
        cats = 4 if backend == "reference" else 3
        assert log.ops.count("cat") == cats and allocations == []
        return
    assert "cat" not in log.ops
    # attention's dv is copied into its slice; the Triton RoPE and SwiGLU backwards store
    # into theirs (the reference RoPE copies its dq/dk results in)
    dv = (2, 5, cfg.n_kv_heads, cfg.head_dim)
    if backend == "triton":
        assert log.copies == [dv]
    else:
        assert sorted(log.copies) == sorted([(2, 5, cfg.n_heads, cfg.head_dim), dv, dv])
    (buf,) = allocations  # one buffer for the block's backward ...
    assert g.data_ptr() == buf.data_ptr() and g.stride() == buf.stride()  # ... handed on as is
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- split itself -------------------------------------------------------------------------


def _parts():
    return [(0, 4, (2, 2)), (4, 6, None), (6, 9, None)]


def test_split_copies_foreign_grads_and_zeroes_unused_pieces(allocations):
    w = torch.randn(3, 9, requires_grad=True)
    (a, b, c), slots = inproj_grad.split(w * 2.0, _parts())
    assert a.shape == (3, 2, 2) and [s.shape for s in slots] == [a.shape, b.shape, c.shape]
    loss = (a * 3.0).sum() + (c**2).sum()  # b unused: its slice must be zeroed, not garbage
    loss.backward(retain_graph=True)
    expected = torch.cat([torch.full((3, 4), 6.0), torch.zeros(3, 2), 8.0 * w[:, 6:]], dim=1)
    torch.testing.assert_close(w.grad, expected.detach())
    loss.backward()  # retain_graph: a second backward gets a buffer of its own
    torch.testing.assert_close(w.grad, 2 * expected.detach())
    assert len(allocations) == 2 and allocations[0].data_ptr() != allocations[1].data_ptr()


def test_gelu_into_writes_autograds_numbers_into_the_slot():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 3, dtype=torch.float64)
    (_, _, c), (_, _, slot) = inproj_grad.split(x * 1.0, _parts())
    dispatch.gelu(c, slot).backward(dy)
    x2 = x.detach().clone().requires_grad_()
    F.gelu(x2[:, 6:]).backward(dy)
    assert torch.equal(x.grad, x2.grad)


def test_split_rejects_parts_that_do_not_tile():
    y = torch.zeros(2, 9)
    with pytest.raises(ValueError, match="do not tile"):
        inproj_grad.split(y, [(0, 4, None), (5, 9, None)])
    with pytest.raises(ValueError, match="do not tile"):
        inproj_grad.split(y, [(0, 4, (3, 2)), (4, 9, None)])
    with pytest.raises(ValueError, match="cover 6 of the last dim's 9"):
        inproj_grad.split(y, [(0, 6, None)])
