"""One gradient buffer for a block's fused input projection (``MBA_INPROJ_GRAD=buffer``).

The block splits the input projection's output ``y = h @ W_in.T`` into column views
(``qk | v | mlp_in``), and later splits RoPE's output into ``q`` and ``k``. Under plain
autograd (``MBA_INPROJ_GRAD=autograd``, the default) every split's backward is a ``cat``:
the gradients of the pieces are computed into separate tensors, then copied into a new
one of the whole's shape -- on a 1.1b model ~0.8 GB of extra memory traffic per layer
per micro-batch.

With ``buffer`` the block calls :func:`split` instead of ``Tensor.split``. It returns the
same views plus one :class:`GradSlot` per view. A consumer that can write its input
gradient anywhere (the RoPE and SwiGLU backwards, reference and Triton, and GELU's)
is handed its slot and, in backward, writes straight into that slice of ONE buffer of
``y``'s shape, allocated on first use (once per block backward; under activation
checkpointing too: the slots belong to the original forward's graph, the recomputed
forward's are discarded). The split's backward then finds its incoming gradients
already in place and hands the buffer to the GEMM backward as it is; a gradient that is
not (attention's ``dv``, whose kernel writes its own tensor; the ``qk`` gradient behind
``qk_norm``; RoPE with ``rope_layout: half`` or partial rotary) is copied into its slice,
an unused piece's slice is zeroed. Nothing is ever concatenated.

The numbers are those of the autograd path: the consumers' buffer backwards run the
same elementwise operations (fp32 results are equal bit for bit up to the attention
kernel's summation order, which may follow q/k's strides).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# A piece of the last dim: columns [start, stop), unflattened to ``shape`` when not None.
Part = tuple[int, int, tuple[int, ...] | None]


def _part_view(t: torch.Tensor, part: Part) -> torch.Tensor:
    start, stop, shape = part
    v = t[..., start:stop]
    return v if shape is None else v.unflatten(-1, shape)


def _is_view(g: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``g`` is exactly the view ``target`` (same memory, shape, strides, dtype)."""
    return (
        g.data_ptr() == target.data_ptr()
        and g.shape == target.shape
        and g.stride() == target.stride()
        and g.dtype == target.dtype
        and g.device == target.device
    )


class InProjGrad:
    """The lazily allocated gradient buffer of one block forward's split."""

    def __init__(self, y: torch.Tensor, parts: Sequence[Part]):
        self.shape, self.dtype, self.device = y.shape, y.dtype, y.device
        self.parts = tuple(parts)
        self._buffer: torch.Tensor | None = None

    def _allocate(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def buffer(self) -> torch.Tensor:
        if self._buffer is None:
            self._buffer = self._allocate()
        return self._buffer

    def view(self, index: int) -> torch.Tensor:
        """Piece ``index`` of the buffer: the same shape and strides as the forward's view."""
        return _part_view(self.buffer(), self.parts[index])

    def release(self) -> torch.Tensor:
        """The buffer, forgotten here (a second backward with ``retain_graph`` gets a new one)."""
        buf = self.buffer()
        self._buffer = None
        return buf


class GradSlot:
    """Where one consumer writes its input gradient: call it (in backward) for the view.

    ``shape``/``dtype`` are the view's, known without allocating, so a consumer can check
    in forward that its input is exactly this piece.
    """

    __slots__ = ("_index", "_owner", "dtype", "shape")

    def __init__(self, owner: InProjGrad, index: int, shape: torch.Size):
        self._owner, self._index = owner, index
        self.shape, self.dtype = shape, owner.dtype

    def __call__(self) -> torch.Tensor:
        return self._owner.view(self._index)


class _SplitInProj(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, grad: InProjGrad):
        ctx.grad = grad
        return tuple(_part_view(y, part) for part in grad.parts)

    @staticmethod
    def backward(ctx, *grads):
        owner: InProjGrad = ctx.grad
        for index, g in enumerate(grads):
            target = owner.view(index)
            if g is None:
                target.zero_()
            elif not _is_view(g, target):
                target.copy_(g)  # a consumer that could not write into its slice
        return owner.release(), None


def split(
    y: torch.Tensor, parts: Sequence[Part]
) -> tuple[tuple[torch.Tensor, ...], tuple[GradSlot, ...]]:
    """Views of ``y``'s last dim by ``parts`` (which must tile it, in order), and a slot
    per view into the one gradient buffer that the split's backward hands on."""
    at = 0
    for start, stop, shape in parts:
        width = stop - start
        if start != at or width < 0 or (shape is not None and width != _prod(shape)):
            raise ValueError(f"inproj_grad.split: parts {list(parts)} do not tile the last dim")
        at = stop
    if at != y.shape[-1]:
        raise ValueError(
            f"inproj_grad.split: parts cover {at} of the last dim's {y.shape[-1]} columns"
        )
    owner = InProjGrad(y, parts)
    views = _SplitInProj.apply(y, owner)
    slots = tuple(GradSlot(owner, i, v.shape) for i, v in enumerate(views))
    return views, slots


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def fits(x: torch.Tensor, grad_into: GradSlot | None) -> bool:
    """Whether ``grad_into`` can take ``x``'s gradient (same shape and dtype)."""
    return grad_into is not None and grad_into.shape == x.shape and grad_into.dtype == x.dtype


class _GeluInto(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, grad_into: GradSlot):
        ctx.save_for_backward(x)
        ctx.grad_into = grad_into
        return F.gelu(x)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (x,) = ctx.saved_tensors
        dx = ctx.grad_into()
        torch.ops.aten.gelu_backward.grad_input(dout, x, approximate="none", grad_input=dx)
        return dx, None


def gelu_into(x: torch.Tensor, grad_into: GradSlot | None) -> torch.Tensor:
    """Exact GELU whose backward writes ``dx`` into ``grad_into`` (autograd's numbers)."""
    if not fits(x, grad_into):
        return F.gelu(x)
    return _GeluInto.apply(x, grad_into)
