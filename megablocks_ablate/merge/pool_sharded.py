"""ShardedPool: G ranks each hold a contiguous block of the pool's rows.

For pools that fit neither one device nor one node's host memory. The G ranks of a
pool group split the N rows into contiguous, balanced blocks (rank r holds rows
``[r*N//G, (r+1)*N//G)``) and merge every mixture together::

    rows 0..N/G-1   rows N/G..2N/G-1        rows (G-1)N/G..N-1
      rank 0    ──▶    rank 1      ──▶ ... ──▶   rank G-1          (only ranks holding a
      acc = Σ w_i x_i  acc += Σ w_i x_i          flat = acc +        member take part,
      (fp32 chunk)     (fp32 chunk)              Σ w_i x_i           chunk by chunk)
                                                    │
                          broadcast(flat) ◀─────────┘  every rank's live model

The sum is a chain rather than an all-reduce of partial sums on purpose: the merge
kernel folds its inputs left to right in fp32, and passing the fp32 accumulator from
shard to shard (as the next shard's first input, weight 1.0, which is exact) continues
that very fold, so the merged parameters are **bitwise equal** to one process's
``ModelPool.merge_into`` for any G and any live dtype. An all-reduce would add partial
sums in the backend's order (``(a+b)+(c+d)`` instead of ``((a+b)+c)+d``) and differ in
the last bits. The traffic is the same order as an all-reduce's: each participating
shard forwards P fp32 values (pipelined in chunks, so the hops overlap), then one
broadcast of P values in the live dtype. A mixture whose members all live on one shard
costs that shard's local merge and the broadcast.

Contiguous blocks (not round-robin) keep the chain short: the units of a mixture are
visited in pool order, so each shard appears in the chain at most once.

Delta rows (``bf16-delta``, :mod:`.pool_delta`): every rank also holds the fp32 seed
(P x 4 bytes), and the first owner of a mixture's chain folds it in first, with weight
``sum(ws)``, which is where a one-process pool folds it: the results stay bitwise equal.

Lockstep: every rank of the group must call :meth:`merge_into` with the same weights
in the same order (the runner gives a pool group one mixture sequence, see
docs/merging.md "Pool placement"); each merge checks this with one small all-gather.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Mapping

import torch
import torch.distributed as dist

from megablocks_ablate.errors import ConfigError, MBAError
from megablocks_ablate.merge.kernels import DTYPE_CODES, merge_into
from megablocks_ablate.merge.pool import RowPool, allocate_rows, open_units
from megablocks_ablate.merge.pool_delta import Seed
from megablocks_ablate.utils.progress import progress

logger = logging.getLogger(__name__)

# fp32 elements per chain chunk: 16 MiB per buffer (three buffers), big enough that the
# per-message latency is small next to the transfer, small beside any model.
CHAIN_CHUNK = 1 << 22


class LockstepError(MBAError, RuntimeError):
    """The ranks of a pool group asked for different merges (they must go in lockstep)."""


def shard_bounds(n: int, g: int) -> list[tuple[int, int]]:
    """Contiguous, balanced row blocks ``[(lo, hi)]`` of ``n`` rows over ``g`` ranks."""
    return [(r * n // g, (r + 1) * n // g) for r in range(g)]


def chain_bytes(chunk: int = CHAIN_CHUNK) -> int:
    """Device memory of the chain buffers (two send buffers, one receive buffer)."""
    return 3 * chunk * 4


class ShardedPool(RowPool):
    """This rank's block of the pool's rows; merges with the other G-1 ranks (see the
    module docstring)."""

    def __init__(
        self,
        units,
        rows: torch.Tensor,
        first: int,
        slots,
        config: dict,
        lineages,
        group: dist.ProcessGroup,
        chunk: int = CHAIN_CHUNK,
        seed: Seed | None = None,
        base: torch.Tensor | None = None,
    ):
        if (seed is None) != (base is None):
            raise ValueError("delta rows need both the seed and its fp32 vector (base)")
        super().__init__(units, slots, config, lineages, seed)
        self.base = base
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_process_group_ranks(group)  # group rank -> global rank
        self.bounds = shard_bounds(len(self.units), self.size)
        if self.bounds[self.rank] != (first, first + rows.shape[0]):
            raise ValueError(
                f"rank {self.rank} of {self.size} must hold rows {self.bounds[self.rank]}, "
                f"got {first}..{first + rows.shape[0]}"
            )
        self.rows, self.first = rows, first
        self.chunk = max(1, int(chunk))
        self._bufs: torch.Tensor | None = None

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Mapping[str, str],
        group: dist.ProcessGroup | None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        storage_dir: str | None = None,
        allow_different_seed: bool = False,
        show_progress: bool = True,
        chunk: int = CHAIN_CHUNK,
        seed: Seed | None = None,
    ) -> ShardedPool:
        """Check every checkpoint (headers and metadata, as a one-process pool does) and
        load this rank's block of rows onto ``device``; with ``seed`` (verified, see
        :mod:`.pool_delta`) the rows are ``unit - seed`` and every rank holds the seed."""
        if dtype not in DTYPE_CODES:
            raise ConfigError(f"pool dtype must be fp32, bf16 or fp16, got {dtype}")
        if group is None:
            raise ConfigError("a sharded pool needs the process group of its G ranks")
        opened = open_units(checkpoints, allow_different_seed, seed)
        g, r = dist.get_world_size(group), dist.get_rank(group)
        lo, hi = shard_bounds(len(opened.units), g)[r]
        p = opened.num_params
        base = None
        if seed is not None:
            base = allocate_rows(1, p, torch.float32, torch.device(device), storage_dir)[0]
            opened.fill_seed(base)
        rows = allocate_rows(hi - lo, p, dtype, torch.device(device), storage_dir)
        with progress(
            total=(hi - lo) * p,
            desc=f"load pool shard {r}/{g}",
            unit="param",
            disable=None if show_progress else True,
        ) as bar:
            for i in range(lo, hi):
                opened.fill_row(i, rows[i - lo], bar, base)
        opened.close()
        logger.info(
            "pool shard %d of %d: rows %d..%d of %d (%s)",
            r,
            g,
            lo,
            hi - 1,
            len(opened.units),
            ", ".join(opened.units[lo:hi]) or "none",
        )
        return cls(
            opened.units,
            rows,
            lo,
            opened.slots,
            opened.configs[0],
            opened.lineages,
            group,
            chunk,
            seed,
            base,
        )

    @property
    def row_dtype(self) -> torch.dtype:
        return self.rows.dtype

    # ------------------------------------------------------------------ merging

    def owner(self, i: int) -> int:
        """The group rank that holds row ``i``."""
        return next(r for r, (lo, hi) in enumerate(self.bounds) if lo <= i < hi)

    def _row(self, i: int) -> torch.Tensor | None:
        if self.first <= i < self.first + self.rows.shape[0]:
            return self.rows[i - self.first]
        return None

    def _check_lockstep(self, ws: list[float], device: torch.device) -> None:
        digest = hashlib.sha256(struct.pack(f"<{len(ws)}d", *ws)).digest()
        mine = torch.tensor(
            [int.from_bytes(digest[:8], "little", signed=True)], dtype=torch.int64, device=device
        )
        every = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine, group=self.group)
        if any(int(t) != int(mine) for t in every):
            raise LockstepError(
                f"pool group ranks {self.ranks} are merging different weight vectors: a "
                "sharded pool needs every rank of its group to score the same mixtures in "
                "the same order"
            )

    def _merge_rows(self, flat: torch.Tensor, ws: list[float]) -> None:
        self._check_lockstep(ws, flat.device)
        owners = sorted({self.owner(i) for i, w in enumerate(ws) if w})
        mine = [
            (self.rows[i - self.first], w)
            for i, w in enumerate(ws)
            if w and self._row(i) is not None
        ]
        if self.base is not None and owners and owners[0] == self.rank:
            # delta rows: the chain's first link folds the seed in first, weighted by
            # sum(ws), as a one-process pool does
            mine.insert(0, (self.base, self._seed_weight(ws)))
        if len(owners) == 1:
            if owners[0] == self.rank:  # the whole mixture is here: one local kernel call
                merge_into(flat, [x for x, _ in mine], [w for _, w in mine])
        elif self.rank in owners:
            self._chain(flat, owners, mine)
        dist.broadcast(flat, src=self.ranks[owners[-1]], group=self.group)

    def _buffers(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if self._bufs is None or self._bufs.device != device:
            self._bufs = torch.empty((3, self.chunk), dtype=torch.float32, device=device)
        return tuple(self._bufs)

    def _chain(
        self, flat: torch.Tensor, owners: list[int], mine: list[tuple[torch.Tensor, float]]
    ) -> None:
        """This rank's link of the chain: receive the fp32 accumulator chunk from the
        previous owner (unless first), fold in its own members, send it on (unless last,
        which writes the live flat buffer). Sends are asynchronous and double-buffered so
        that consecutive hops overlap."""
        pos = owners.index(self.rank)
        prev = self.ranks[owners[pos - 1]] if pos > 0 else None
        nxt = self.ranks[owners[pos + 1]] if pos + 1 < len(owners) else None
        send = self._buffers(flat.device)
        recv = send[2]
        pending: list[dist.Work | None] = [None, None]
        xs, ws = [x for x, _ in mine], [w for _, w in mine]
        for j, start in enumerate(range(0, flat.numel(), self.chunk)):
            n = min(self.chunk, flat.numel() - start)
            inputs = [x[start : start + n] for x in xs]
            weights = list(ws)
            if prev is not None:
                dist.recv(recv[:n], src=prev, group=self.group)
                inputs, weights = [recv[:n], *inputs], [1.0, *weights]
            if nxt is None:
                merge_into(flat[start : start + n], inputs, weights)
                continue
            b = j % 2
            last_send = pending[b]
            if last_send is not None:
                last_send.wait()  # the send that last used this buffer is done
            out = send[b][:n]
            merge_into(out, inputs, weights)
            pending[b] = dist.isend(out, dst=nxt, group=self.group)
        for work in pending:
            if work is not None:
                work.wait()
