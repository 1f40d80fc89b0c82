"""Pure-PyTorch reference of the merge kernel: ``out = sum_i w_i * x_i``.

It is the ground truth the C++, CUDA and Triton kernels are tested against, and the
fallback when none of them is available. It works in chunks so its temporaries stay
small (one fp32 chunk plus one product) however large the model, and it reads each
input once. Each term is rounded as a product and then summed in fp32, in input
order, which is exactly what the compiled kernels do (barring FMA contraction).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# 1M elements per chunk: a few MiB of temporaries, large enough to amortise op overhead.
CHUNK = 1 << 20


def merge_into_reference(
    out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float], chunk: int = CHUNK
) -> torch.Tensor:
    """Write ``sum_i weights[i] * inputs[i]`` (fp32 accumulation) into 1-D ``out``.

    ``out`` may alias one of the inputs: each chunk is read in full before it is written.
    """
    n = out.numel()
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        acc = inputs[0][start:end].to(torch.float32) * float(weights[0])
        for x, w in zip(inputs[1:], weights[1:]):
            acc += x[start:end].to(torch.float32) * float(w)
        out[start:end].copy_(acc)
    return out
