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
   rank from ``SLURM_*``; the rendezvous address is ``MASTER_ADDR`` or the first host
   of the step's node list (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``),
   expanded by :func:`expand_hostlist`; the port is ``MASTER_PORT`` or derived from
   ``SLURM_JOB_ID``.
4. Otherwise a single process, and no process group.

Backend: NCCL on CUDA, gloo on CPU (``backend=`` to force one).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megablocks_ablate.errors import ConfigError

logger = logging.getLogger(__name__)

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


# Slurm host lists ------------------------------------------------------------------

_HOSTLIST_SEPARATORS = ", \t\n"  # Slurm's own: hostlist_create() splits on these
_MAX_RANGE_HOSTS = 64 * 1024  # Slurm's limit for one range / one bracket group
_MAX_HOSTS = 1024 * 1024  # no allocation is this big: an expression that is, is a typo
_SCONTROL_TIMEOUT_S = 10
_RANGE_ITEM = re.compile(r"(\d+)(?:-(\d+))?")


def _hostlist_error(expr: str, why: str) -> ConfigError:
    return ConfigError(f"Slurm host list {expr!r}: {why}")


def _hostlist_tokens(expr: str) -> list[str]:
    """Split at separators outside brackets; brackets must pair up and not nest."""
    tokens: list[str] = []
    current: list[str] = []
    open_at = -1
    for i, ch in enumerate(expr):
        if ch == "[":
            if open_at >= 0:
                raise _hostlist_error(expr, f"nested '[' at position {i}")
            open_at = i
        elif ch == "]":
            if open_at < 0:
                raise _hostlist_error(expr, f"']' without '[' at position {i}")
            open_at = -1
        elif open_at < 0 and ch in _HOSTLIST_SEPARATORS:
            if current:
                tokens.append("".join(current))
                current = []
            continue
        current.append(ch)
    if open_at >= 0:
        raise _hostlist_error(expr, f"unclosed '[' at position {open_at}")
    if current:
        tokens.append("".join(current))
    return tokens


def _bracket_values(expr: str, body: str) -> list[str]:
    """``"1-3,07,10-11"`` -> ``["1", "2", "3", "07", "10", "11"]``.

    As Slurm: a range is as wide as its lower bound (``001-010`` -> ``001``..``010``).
    """
    values: list[str] = []
    for item in body.split(","):
        m = _RANGE_ITEM.fullmatch(item.strip())
        if m is None:
            raise _hostlist_error(expr, f"bad range {item.strip()!r} in [{body}]")
        lo_s, hi_s = m.group(1), m.group(2)
        lo = int(lo_s)
        hi = lo if hi_s is None else int(hi_s)
        if hi < lo:
            raise _hostlist_error(expr, f"bad range {item.strip()!r} in [{body}]: {hi} < {lo}")
        if hi - lo + 1 > _MAX_RANGE_HOSTS:
            raise _hostlist_error(
                expr, f"range {item.strip()!r} has more than {_MAX_RANGE_HOSTS} hosts"
            )
        width = len(lo_s)
        values.extend(f"{k:0{width}d}" for k in range(lo, hi + 1))
    if len(values) > _MAX_RANGE_HOSTS:
        raise _hostlist_error(expr, f"[{body}] has more than {_MAX_RANGE_HOSTS} hosts")
    return values


def _expand_token(expr: str, token: str) -> list[str]:
    """One name with 0..n bracket groups -> its hosts, in Slurm's order.

    Slurm (``hostlist.c``) takes the last group as the innermost loop and then loops
    over the other groups from right to left, outermost first: for two groups the
    usual row-major order (``rack[1-2]-node[1-2]`` -> rack1-node1, rack1-node2,
    rack2-node1, rack2-node2); for ``a[1-2]b[1-2]c[1-2]`` the ``b`` group is outermost,
    then ``a``, then ``c`` (a1b1c1, a1b1c2, a2b1c1, a2b1c2, a1b2c1, ...).
    """
    parts = re.split(r"\[([^\[\]]*)\]", token)  # literal, group, literal, ..., literal
    literals, bodies = parts[0::2], parts[1::2]
    if not bodies:
        return [token]
    groups = [_bracket_values(expr, body) for body in bodies]
    count = 1
    for g in groups:
        count *= len(g)
    if count > _MAX_HOSTS:
        raise _hostlist_error(expr, f"{token!r} expands to more than {_MAX_HOSTS} hosts")
    k = len(groups)
    loop_order = [*range(k - 2, -1, -1), k - 1]  # outermost first
    hosts = []
    for combo in itertools.product(*(groups[i] for i in loop_order)):
        values = [""] * k
        for i, v in zip(loop_order, combo):
            values[i] = v
        hosts.append("".join(lit + val for lit, val in zip(literals, [*values, ""])))
    return hosts


def parse_hostlist(expr: str) -> list[str]:
    """Expand a Slurm host list in Python, as ``scontrol show hostnames`` does.

    Every form Slurm writes: ``node1``; lists ``a,b,c`` (commas or white space);
    ranges ``node[1-4]``, zero padded ``node[001-010]``, mixed ``node[1-3,7,10-11]``;
    several groups in one name ``rack[1-2]-node[01-04]``; text after a group
    (``c[3-4]-ib``); lists mixing all of these (``a[1-2],b,c[3-4]-x``). Names keep
    their dots and dashes. Order and duplicates are Slurm's (no sorting).

    Raises :class:`ConfigError`, naming the expression, for an empty list, unbalanced
    or nested brackets, and a bad range (``[5-3]``, ``[]``, ``[a-b]``, ``[1,,2]``).
    """
    if not isinstance(expr, str) or not expr.strip(_HOSTLIST_SEPARATORS):
        raise _hostlist_error(str(expr), "empty host list")
    hosts: list[str] = []
    for token in _hostlist_tokens(expr):
        hosts.extend(_expand_token(expr, token))
        if len(hosts) > _MAX_HOSTS:
            raise _hostlist_error(expr, f"expands to more than {_MAX_HOSTS} hosts")
    return hosts


def _scontrol_hostnames(expr: str) -> list[str] | None:
    """``scontrol show hostnames EXPR``, or None when there is no scontrol or it fails."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    try:
        r = subprocess.run(
            [exe, "show", "hostnames", expr],
            capture_output=True,
            text=True,
            timeout=_SCONTROL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        logger.debug("scontrol show hostnames %r failed (%s): parsing it here", expr, e)
        return None
    hosts = r.stdout.split()
    if r.returncode != 0 or not hosts:
        # an invalid list: scontrol complains on stderr but still exits 0
        logger.debug(
            "scontrol show hostnames %r: exit %s, %d host(s), %s: parsing it here",
            expr,
            r.returncode,
            len(hosts),
            r.stderr.strip()[:200] or "no message",
        )
        return None
    return hosts


def expand_hostlist(expr: str, *, use_scontrol: bool = True) -> list[str]:
    """Every host of a Slurm host list (``SLURM_JOB_NODELIST``), in Slurm's order.

    ``scontrol show hostnames`` when ``scontrol`` is on ``PATH`` (the site's own
    Slurm, which also knows site-specific syntax); :func:`parse_hostlist` when it is
    not, fails, times out or prints nothing. ``"rack[1-2]-node[01-02]"`` ->
    ``["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]``.
    """
    if use_scontrol:
        hosts = _scontrol_hostnames(expr)
        if hosts:
            return hosts
    return parse_hostlist(expr)


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``"rack[1-2]-node[01-04],cpu1"`` -> ``"rack1-node01"``."""
    return expand_hostlist(nodelist)[0]


def _slurm_rendezvous_host() -> str:
    """``MASTER_ADDR``, else the first host of the step's (else the job's) node list.

    Task 0 of a step runs on the first node of the step, which is the job's first node
    unless the step was given fewer or other nodes (``srun --nodes``/``--nodelist``).
    """
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    for var in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if os.environ.get(var):
            try:
                return first_slurm_host(os.environ[var])
            except ConfigError as e:
                raise ConfigError(f"{var}: {e}") from None
    raise ConfigError(
        "launched by srun but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: "
        "export MASTER_ADDR=<host of task 0>"
    )


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
        host = _slurm_rendezvous_host()
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
