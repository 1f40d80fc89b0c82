"""How a run spreads the model over ranks and what it computes in: FSDP2 with a
mixed-precision policy, HSDP meshes, DDP, and the activation-checkpointing policy.

:func:`wrap_model` is the trainer's one call; the rest are pure functions it is made of
(tested in ``tests/train/test_parallel.py``).

**Precision.** A run computes in bf16 when ``precision`` is ``bf16``, or ``auto`` on
CUDA (:func:`computes_in_bf16`); the trainer's bf16 autocast is then on, whatever the
parallelism. Under ``parallel: fsdp`` FSDP2 also gets a ``MixedPrecisionPolicy``
(:func:`fsdp_dtypes`): each module's parameters are all-gathered and used in
``distributed.fsdp_param_dtype`` (default bf16 in a bf16 run: half the all-gather bytes
of fp32, and no per-op casts of fp32 weights), gradients are reduce-scattered in
``fsdp_reduce_dtype`` (fp32), and FSDP2 keeps the sharded fp32 parameters as the
master weights the optimizer steps, so optimizer state and every checkpoint stay fp32.
Without a policy FSDP2 all-gathers fp32 parameters, in forward and again in backward.

Decisions, and why:

* **One policy for the blocks and the root** (embedding = tied output projection,
  final norm), as torchtitan does: the embedding's output is then bf16 and so is the
  residual stream (under DDP or one process, autocast keeps it fp32). Keeping the root
  in fp32 was considered (an fp32 residual stream, and an fp32 gradient out of the fused
  loss) and rejected: the blocks' norms would then meet fp32 activations with bf16
  weights, which the PyTorch reference norm does not take.
* **The fused cross-entropy** gets the bf16 unsharded weight; it still accumulates the
  weight's gradient over its chunks in fp32 and rounds it once, to bf16 (as every other
  weight gradient under the policy is), summed with the embedding's; FSDP2 then reduces
  and accumulates in ``fsdp_reduce_dtype``.
* **Inputs are not cast** (``cast_forward_inputs=False``): the activations already are
  bf16, and the fp32 RoPE tables passed to every block stay fp32.
* **Autocast stays on** in a bf16 run: with bf16 weights and activations its casts are
  no-ops, and it still runs its fp32 ops (softmax, norms on CUDA, ...) in fp32.
  ``precision`` decides the compute dtype, so ``fsdp_param_dtype: bf16`` in a run that
  computes in fp32 is a ``ConfigError``.
* **Gradient accumulation** (:func:`micro_batch_sync`): by default gradient sync is off
  for all but the last micro batch; FSDP2 then accumulates the unsharded gradients in
  ``fsdp_reduce_dtype`` (fp32), never in bf16, at the cost of one unsharded fp32
  gradient of the model per rank, and reduce-scatters once per step.
  ``distributed.fsdp_reduce_every_micro_batch`` reduce-scatters after every micro batch
  instead and accumulates the sharded gradients (fp32, in the sharded parameters'
  ``.grad``): each block's unsharded gradient is freed once reduce-scattered, in
  backward, for one reduce-scatter per micro batch more. Under HSDP the all-reduce
  across shard groups stays once per step (``set_requires_all_reduce``: FSDP2 sums the
  reduce-scattered shards and all-reduces the sum on the last micro batch). The update
  is the same to fp32 rounding (tested on 2 gloo ranks, 1-D and HSDP meshes).
* **Clipping** sees the sharded fp32 gradients (DTensors): the norm is a DTensor reduced
  over the shard dimension (``divergence.py``), and checkpoints gather the sharded fp32
  master weights (``get_model_state_dict``), never the bf16 copies.
* The last block is not resharded after forward: backward needs it first (torchtitan
  does the same).

**HSDP.** ``distributed.fsdp_shard_size`` (or, when null and the run spans several
nodes, the ranks of one node) makes the mesh 2-D, ``(replicate, shard)``: parameters
are sharded within each group of consecutive ranks and gradients all-reduced across
the groups (FSDP2's HSDP form, ``fully_shard(mesh=<2-D mesh>)``). See
:func:`fsdp_mesh_shape`.

**One rank.** FSDP2 needs a process group. A run launched as one process without one
(``megablocks-ablate train`` on one GPU) runs the plain module under autocast; one
started inside a one-rank group (``torchrun --nproc-per-node 1``, or a caller's group,
as ``benchmarks/gpu/train_step.py`` does) runs the FSDP2 path unsharded, with its
mixed-precision policy: the numerics of an N-rank run, measurable on one device.

**Compile** (``ModelConfig.compile``, :func:`apply_compile`): each block is compiled in
place (``nn.Module.compile``: parameter names and the state dict keep their keys, no
``_orig_mod.``) by :func:`wrap_model`, after the checkpointing policy is set and before
``fully_shard`` / DDP, in torchtitan's order; the trainer builds its model with
:func:`build_model`, which leaves the blocks eager for that. ``MBA_COMPILE_ORDER=
model_init`` (read by :func:`compile_order` only) gives back the old order, the blocks
compiled by ``Transformer.__init__``. Every other model (evaluation, merge scoring, the
benchmarks' ``ModelConfig.build()``) is compiled by ``Transformer.__init__`` as before,
whatever the order, and :func:`apply_compile` leaves a compiled block alone. Compilation
is lazy (it traces at the first call) and ``nn.Module.compile`` compiles the module's
``_call_impl``, which runs the hooks registered on the module at call time, so FSDP2's
(dynamo-disabled) hooks run from inside the compiled call in both orders; torchtitan's
``torch.compile(block)`` wrapper would keep them outside, at the cost of the
``_orig_mod.`` keys.

**Activation checkpointing** (the train config's ``activation_checkpointing``; the
model applies it: ``model/transformer.py``): ``none``, ``selective`` (every other block)
or ``full``. The old boolean ``ModelConfig.activation_checkpointing`` still loads and
means ``full``, with a deprecation warning (:func:`resolve_checkpointing`).
:func:`activation_bytes_per_token` is the memory estimate behind the presets' choice
(docs/training.md, "Memory").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
from collections.abc import Sequence

import torch

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.env_choice import env_choice

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 2**30


def computes_in_bf16(precision: str, device_type: str) -> bool:
    """Whether a run with ``precision`` on ``device_type`` computes under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def fsdp_dtypes(
    precision: str, device_type: str, param: str = "auto", reduce: str = "fp32"
) -> tuple[str, str]:
    """``(param, reduce)`` dtype names of the FSDP2 ``MixedPrecisionPolicy``: ``auto`` is
    bf16 in a bf16 run, fp32 otherwise. bf16 parameters in a run whose ``precision``
    means fp32 compute are refused: that setting decides the compute dtype."""
    bf16 = computes_in_bf16(precision, device_type)
    if param == "auto":
        param = "bf16" if bf16 else "fp32"
    if param not in DTYPES or reduce not in DTYPES:
        raise ConfigError(
            f"distributed.fsdp_param_dtype/fsdp_reduce_dtype: expected fp32 or bf16, "
            f"got {param!r}/{reduce!r}"
        )
    if param == "bf16" and not bf16:
        raise ConfigError(
            f"distributed.fsdp_param_dtype: bf16 needs a run computing in bf16 (precision "
            f"bf16, or auto on CUDA), but precision={precision!r} on {device_type} means "
            f"fp32 compute (set precision=bf16, or fsdp_param_dtype=fp32)"
        )
    return param, reduce


def mp_policy(param: str, reduce: str):
    """The FSDP2 ``MixedPrecisionPolicy`` of every module (see the module doc)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=DTYPES[param], reduce_dtype=DTYPES[reduce], cast_forward_inputs=False
    )


# ---- meshes ----------------------------------------------------------------------------


def node_size(hosts: Sequence[str]) -> int | None:
    """Ranks per node when ``hosts`` (each rank's host name, in rank order) is runs of
    equal length, one per host (a node's ranks consecutive); else None."""
    runs: list[list] = []
    for h in hosts:
        if runs and runs[-1][0] == h:
            runs[-1][1] += 1
        else:
            runs.append([h, 1])
    if len({h for h, _ in runs}) != len(runs) or len({n for _, n in runs}) != 1:
        return None
    return runs[0][1]


def fsdp_mesh_shape(world: int, shard_size: int | None, hosts: Sequence[str]) -> tuple[int, ...]:
    """The FSDP2 mesh: ``(world,)`` (plain FSDP) or ``(replicate, shard)`` (HSDP).

    An explicit ``shard_size`` always gives the 2-D form (``(1, world)`` shards like plain
    FSDP, ``(world, 1)`` replicates like DDP) and must divide ``world``. ``None``: one
    shard group per node when the ranks span several nodes with the same number of
    consecutive ranks on each, else plain FSDP (with a warning when they span nodes
    unevenly)."""
    if shard_size is not None:
        if shard_size < 1 or world % shard_size:
            raise ConfigError(
                f"distributed.fsdp_shard_size: {shard_size} does not divide the "
                f"{world} ranks of this run (HSDP is replicate x shard = ranks)"
            )
        return (world // shard_size, shard_size)
    if len(hosts) != world:
        raise ValueError(f"{len(hosts)} host names for {world} ranks")
    per_node = node_size(hosts)
    if per_node is None:
        logger.warning(
            f"FSDP2: the {world} ranks are not {len(set(hosts))} equal runs of consecutive "
            f"ranks per node; sharding over all of them (set distributed.fsdp_shard_size "
            f"for HSDP)"
        )
        return (world,)
    if per_node == world:
        return (world,)
    return (world // per_node, per_node)


def rank_hosts() -> list[str]:
    """Every rank's host name, in rank order (one small collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [socket.gethostname()]
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return [str(h) for h in hosts]


def _spans_nodes(hosts: Sequence[str], shard: int) -> bool:
    return any(len(set(hosts[i : i + shard])) > 1 for i in range(0, len(hosts), shard))


def build_fsdp_mesh(device_type: str, world: int, shard_size: int | None):
    """The device mesh of :func:`fsdp_mesh_shape` (2-D dims named replicate, shard)."""
    from torch.distributed.device_mesh import init_device_mesh

    hosts = rank_hosts() if world > 1 else [socket.gethostname()]
    shape = fsdp_mesh_shape(world, shard_size, hosts)
    if len(shape) == 1:
        return init_device_mesh(device_type, shape)
    if _spans_nodes(hosts, shape[1]):
        logger.warning(
            f"FSDP2: shard groups of {shape[1]} consecutive ranks span nodes; all-gathers "
            f"and reduce-scatters then cross the network every step"
        )
    return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))


# ---- activation checkpointing ----------------------------------------------------------


def resolve_checkpointing(policy: str, legacy_flag: bool) -> str:
    """The activation-checkpointing policy of a run: the train config's ``policy``; the
    deprecated model flag ``activation_checkpointing=true`` means ``full`` when the
    train config leaves it at ``none``."""
    if not legacy_flag:
        return policy
    if policy == "none":
        logger.warning(
            "model_overrides activation_checkpointing=true is deprecated: set the train "
            "config's activation_checkpointing=full (none|selective|full); running full"
        )
        return "full"
    logger.warning(
        f"model_overrides activation_checkpointing=true is deprecated and ignored: the "
        f"train config's activation_checkpointing={policy} applies"
    )
    return policy


def activation_bytes_per_token(
    mcfg, attention: str = "flash", seq_len: int = 2048, residual_bytes: int = 4
) -> int:
    """Bytes one block keeps for backward per token in a bf16 run, with the Triton
    kernels of the CUDA path. ``residual_bytes`` is the residual stream's element size:
    4 under autocast with fp32 weights (DDP, one process), 2 under FSDP2's bf16 policy.

    ``r d`` (block input, saved by the norm) ``+ n_norms (2d + 8)`` (the bf16 norm output
    feeding a matmul, the norm's fp32 mean and rstd) ``+ 2 (q + 2 kv + mlp_in)`` (the
    input projection's output: v and the MLP input are views of it) ``+ 2 (q + kv)`` (q
    and k after RoPE) ``+ 2 q + 4 h`` (attention output, its fp32 log-sum-exp) ``+ 2 m``
    (the MLP activation); sequential blocks keep a second residual (``+ r d``), QK-norm a
    copy of q and k (``+ 2 (q + kv) + 8 (h + kv)``). ``attention="math"`` (SDPA's math
    backend, which materialises the probabilities) adds ``4 h T`` (the probabilities in
    fp32) ``+ 2 (2q + 2kv) - 4h`` (copies of q, k, v and the output in some layouts; no
    log-sum-exp). Checked against the tensors the model saves (flash: exactly; math: to
    within the copies) in ``tests/train/test_parallel.py``.
    """
    d, q, kv, m = mcfg.d_model, mcfg.q_dim, mcfg.kv_dim, mcfg.mlp_hidden
    h, hkv, r = mcfg.n_heads, mcfg.n_kv_heads, residual_bytes
    n = r * d + mcfg.norms_per_block * (2 * d + 8)
    n += 2 * (q + 2 * kv + mcfg.mlp_in_dim) + 2 * (q + kv) + 2 * q + 4 * h + 2 * m
    if mcfg.block == "sequential":
        n += r * d
    if mcfg.qk_norm:
        n += 2 * (q + kv) + 8 * (h + hkv)
    if attention == "math":  # fp32 probabilities, copies of q, k, v and out, no lse
        n += 4 * h * seq_len + 2 * (2 * q + 2 * kv) - 4 * h
    elif attention != "flash":
        raise ValueError(f"attention: expected flash or math, got {attention!r}")
    return n


def activation_estimate(
    mcfg,
    micro_batch: int,
    seq_len: int,
    policy: str,
    attention: str = "flash",
    residual_bytes: int = 4,
) -> int:
    """Bytes of activations kept for backward by one micro batch: the blocks (a
    recomputed block keeps only its input) plus the head (final norm input, the fused
    loss's bf16 hidden-state gradient and fp32 output-projection gradient)."""
    from megablocks_ablate.model.transformer import checkpointed_blocks

    tokens, d, r = micro_batch * seq_len, mcfg.d_model, residual_bytes
    recomputed = len(checkpointed_blocks(policy, mcfg.n_layers))
    kept = mcfg.n_layers - recomputed
    per_block = activation_bytes_per_token(mcfg, attention, seq_len, residual_bytes)
    blocks = tokens * (kept * per_block + recomputed * r * d)
    head = tokens * (r * d + 2 * d + 16) + 4 * mcfg.padded_vocab_size * d
    return blocks + head


# ---- compile ---------------------------------------------------------------------------

COMPILE_ORDER_ENV = "MBA_COMPILE_ORDER"
COMPILE_ORDERS = ("before_shard", "model_init")


def compile_order() -> str:
    """Where a training run's blocks are compiled (``ModelConfig.compile``): by
    :func:`wrap_model` just before ``fully_shard`` / DDP (``before_shard``, the default)
    or by ``Transformer.__init__`` (``model_init``, the old order). The one reader of
    ``MBA_COMPILE_ORDER``."""
    return env_choice(COMPILE_ORDER_ENV, COMPILE_ORDERS)


def build_model(mcfg, device=None):
    """The trainer's model of ``mcfg``, freshly initialised. With ``compile: true`` under
    ``before_shard`` its blocks are left eager (:func:`wrap_model` compiles them); its
    ``cfg`` is still ``mcfg``, ``compile`` included."""
    if not (mcfg.compile and compile_order() == "before_shard"):
        return mcfg.build(device=device)
    model = dataclasses.replace(mcfg, compile=False).build(device=device)
    model.cfg = mcfg  # the blocks keep the copy: it differs in `compile` alone
    return model


def apply_compile(model) -> int:
    """Compile each block of ``model`` in place (``nn.Module.compile``: the state dict's
    keys do not change); a block already compiled is left as it is. Returns how many
    were compiled here."""
    fresh = [b for b in model.layers if getattr(b, "_compiled_call_impl", None) is None]
    for block in fresh:
        block.compile()
    if fresh:
        logger.info(f"compile: {len(fresh)} block(s) compiled in place, before wrapping")
    return len(fresh)


# ---- wrapping --------------------------------------------------------------------------


def apply_fsdp(model, env, dist_cfg, precision: str):
    """``fully_shard`` every block, then the root, on the run's mesh and policies."""
    from torch.distributed.fsdp import fully_shard

    param, reduce = fsdp_dtypes(
        precision, env.device.type, dist_cfg.fsdp_param_dtype, dist_cfg.fsdp_reduce_dtype
    )
    mesh = build_fsdp_mesh(env.device.type, env.world_size, dist_cfg.fsdp_shard_size)
    mp = mp_policy(param, reduce)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    shape = " x ".join(map(str, mesh.shape))
    kind = "HSDP (replicate x shard)" if mesh.ndim == 2 else "FSDP"
    when = "every micro batch" if dist_cfg.fsdp_reduce_every_micro_batch else "once per step"
    logger.info(
        f"FSDP2: {kind} mesh {shape}; parameters gathered in {param}, gradients reduced "
        f"in {reduce} ({when}), master weights and optimizer state fp32"
    )
    return model


def micro_batch_sync(model, last: bool, every_micro_batch: bool = False):
    """The context one micro batch's forward and backward run in, gradient sync set for
    it: under FSDP2 a reduce-scatter on the ``last`` micro batch only, or on every one
    with ``every_micro_batch`` (the all-reduce of HSDP still on the last only); under
    DDP ``no_sync`` but on the last; nothing for a plain module."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last or every_micro_batch)
        if every_micro_batch:
            model.set_requires_all_reduce(last)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not last:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def wrap_model(model, cfg, env):
    """The model as the run trains it: its activation-checkpointing policy set, its
    blocks compiled (``compile: true``; :func:`compile_order`), then FSDP2 (``parallel:
    fsdp`` inside a process group), DDP (several ranks) or as it is."""
    import torch.distributed as dist

    policy = resolve_checkpointing(cfg.activation_checkpointing, model.cfg.activation_checkpointing)
    model.set_activation_checkpointing(policy)
    if model.cfg.compile and compile_order() == "before_shard":
        apply_compile(model)
    grouped = dist.is_available() and dist.is_initialized()
    fsdp = cfg.distributed.parallel == "fsdp" and (env.distributed or grouped)
    if computes_in_bf16(cfg.precision, env.device.type):
        d = cfg.distributed
        bf16_params = (
            fsdp and fsdp_dtypes(cfg.precision, env.device.type, d.fsdp_param_dtype)[0] == "bf16"
        )
        est = activation_estimate(
            model.cfg, cfg.micro_batch, cfg.seq_len, policy, residual_bytes=2 if bf16_params else 4
        )
        logger.info(
            f"activation checkpointing: {policy} (estimated {est / GIB:.1f} GiB of "
            f"activations per micro batch of {cfg.micro_batch} x {cfg.seq_len})"
        )
    if fsdp:
        return apply_fsdp(model, env, cfg.distributed, cfg.precision)
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    return model
