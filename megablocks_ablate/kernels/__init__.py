"""Fused kernels: Triton for CUDA, each beside a pure-PyTorch reference.

One file per op (``norm``, ``rope``, ``swiglu``, ``cross_entropy``; ``merge_*`` for the
parameter-average merge). :mod:`megablocks_ablate.kernels.dispatch` is the one place
that picks kernel or reference (``MBA_KERNELS=reference|triton|auto``); model code
calls the ops through it.
"""
