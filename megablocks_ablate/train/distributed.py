"""One process-group init for torchrun, mpiexec/mpirun and Slurm (or none at all).

:func:`init_distributed` finds out how the process was launched, in this order:

1. **torchrun** (or any launcher setting ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``):
   ``env://`` rendezvous; ``LOCAL_RANK`` from the environment.
2. **MPI** (``mpiexec``/``mpirun`` of MPICH, Open MPI, Intel MPI: ``PMI_SIZE``,
   ``OMPI_COMM_WORLD_SIZE``, ``PMIX_RANK``...): rank and world size from
   ``mpi4py.MPI.COMM_WORLD``, local rank from the shared-memory sub-communicator;
   rank 0 picks its host name (or ``MASTER_ADDR``) and a free port and broadcasts
   them over MPI, so no environment set-up is needed.
3. **Slurm** (``srun``: ``SLURM_PROCID``/``SLURM_NTASKS``): rank, world size and local
   rank from ``SLURM_*``; the first host of ``SLURM_JOB_NODELIST`` is the rendezvous
   address, the port is ``MASTER_PORT`` or derived from ``SLURM_JOB_ID``.
4. Otherwise a single process, and no process group.

Backend: NCCL on CUDA, gloo on CPU (``backend=`` to force one).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megablocks_ablate.errors import ConfigError

_MPI_SIZE_VARS = (
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_SIZE",
    "MPI_LOCALNRANKS",
    "MV2_COMM_WORLD_SIZE",
)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, world size, local rank, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_launcher(env=None) -> str:
    """ "torchrun", "mpi", "slurm" or "single", from the environment alone."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if any(v in env for v in _MPI_SIZE_VARS) or "PMIX_RANK" in env:
        return "mpi"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return "single"


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``."""
    m = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise ConfigError(f"SLURM_JOB_NODELIST: cannot parse {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous() -> tuple[int, int, int, str]:
    """(rank, world, local_rank, tcp:// init method) via mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError(
            "launched by mpiexec/mpirun but mpi4py is not installed "
            "(pip install mpi4py, or launch with torchrun)"
        ) from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    address = None
    if rank == 0:
        # all ranks on this node: loopback always works; otherwise our host name
        default_host = "127.0.0.1" if local_size == world else socket.gethostname()
        host = os.environ.get("MASTER_ADDR", default_host)
        port = int(os.environ.get("MASTER_PORT", 0)) or _free_port()
        address = f"tcp://{host}:{port}"
    address = comm.bcast(address, root=0)
    return rank, world, local_rank, address


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but CUDA is not available")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Initialise torch.distributed for however this process was launched.

    Returns a :class:`DistEnv`; a single process gets world size 1 and no process group.
    Calling it again when a group exists just describes that group.
    """
    launcher = detect_launcher()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistEnv(rank, world, local_rank, _pick_device(device, local_rank), launcher)

    init_method = "env://"
    if launcher == "torchrun":
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    elif launcher == "mpi":
        rank, world, local_rank, init_method = _mpi_rendezvous()
    elif launcher == "slurm":
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local_rank = int(os.environ.get("SLURM_LOCALID", 0))
        host = os.environ.get("MASTER_ADDR") or first_slurm_host(os.environ["SLURM_JOB_NODELIST"])
        port = (
            int(os.environ.get("MASTER_PORT", 0))
            or 15000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000
        )
        init_method = f"tcp://{host}:{port}"
    else:
        return DistEnv(0, 1, 0, _pick_device(device, 0), launcher)

    dev = _pick_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if world > 1 or launcher != "single":
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
    return DistEnv(rank, world, local_rank, dev, launcher)


@contextlib.contextmanager
def distributed_session(
    device: str = "auto", backend: str = "auto", timeout_s: int = 1800
) -> Iterator[DistEnv]:
    """``with distributed_session() as env:`` -- init, and tear down what *this* call set up.

    A group that already existed (a caller's) is left alone, so the trainer and the
    evaluator can run inside a study runner's group. On success the ranks meet at a
    barrier before the group is destroyed: a rank leaving while another is still in a
    collective makes gloo abort the process at exit.
    """
    owns = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(device, backend, timeout_s)
    ok = False
    try:
        yield env
        ok = True
    finally:
        if owns and dist.is_available() and dist.is_initialized():
            if ok:
                barrier()
            dist.destroy_process_group()


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place); the identity without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Broadcast a small JSON-able object from ``src`` (in-process only, never from files)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
