"""The data-parallel process group a training job runs in: which rank this process is, and how ranks meet.

One process runs one data-parallel rank. A launcher that runs several ranks says which one each
process is through the environment variables of PyTorch's ``env://`` rendezvous (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; see
https://pytorch.org/docs/stable/distributed.html#environment-variable-initialization); a process
on its own gets rank 0 of 1 on a free loopback port.

Nothing listens beyond the address the ranks meet at. The ``env://`` rendezvous would have rank 0's
key-value store (torch's ``TCPStore``, unauthenticated) listen on every interface, so rank 0 binds
the listening socket itself, to ``MASTER_ADDR`` only (loopback for a local run, the node's address
for a run across nodes), and hands it to the store (``master_listen_fd``). Gloo's own sockets bind
to the interface named by ``GLOO_SOCKET_IFNAME``, else to the address the host name resolves to (the
machine's network address): unless it is set, it is set to the interface this process reaches
``MASTER_ADDR`` through (:func:`bind_gloo_near`).

Joining the group compiles nothing. On CPU, DeepSpeed's communication backend loads its
shared-memory op (``deepspeed_shm_comm``, DeepSpeed's ``ShareMemCommBuilder``) through
``torch.utils.cpp_extension.load`` whenever it starts: that compiles the op the first time on a
machine (and again for a venv at another path), and every time takes a lock file in the torch
extensions folder, so a process killed while it holds the lock leaves the file and every later
start waits for it forever (so a prebuilt op would not help). The op serves only DeepSpeed's
inference all-reduce, so :func:`skip_unused_ops` marks it unavailable and DeepSpeed uses
``torch.distributed`` alone (as it does for training anyway). Should DeepSpeed still mean to build
an op, :func:`check_build_locks` turns a stale lock into an error that says which file to delete.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time
from pathlib import Path

import torch

from polypythia.errors import PolypythiaError

RENDEZVOUS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SHM_COMM_OP = "deepspeed_shm_comm"  # built by DeepSpeed's CPU accelerator when its comm backend starts
# A build lock this old, open in no process of this machine, is left by a build that was killed
# (building the op takes about a minute on two busy cores).
STALE_LOCK_S = 600


class BuildLockError(PolypythiaError):
    """A JIT build of a DeepSpeed op was killed half-way and left its lock file behind."""


def set_rendezvous(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """Tell this process which rank it is and where rank 0 hosts the process group."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
    )


def clear_rendezvous() -> None:
    """Forget a rendezvous this process inherited (a Ray worker gets its raylet's environment), so
    a single-rank job picks a free port of its own instead of one another job may hold."""
    for key in RENDEZVOUS_ENV:
        os.environ.pop(key, None)


def init_distributed() -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world_size).

    A process on its own tries again with another port if someone else took the free one in
    between. DeepSpeed is then pointed at the group that exists rather than making its own, with
    nothing to compile (:func:`skip_unused_ops`, :func:`check_build_locks`).
    """
    import deepspeed

    check_build_locks(skip_unused_ops())
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "MASTER_PORT" not in os.environ:  # on its own: rank 0 of 1, on loopback
            listener = socket.create_server(("127.0.0.1", 0))  # a port of its own, nobody can take it in between
            set_rendezvous(0, 1, "127.0.0.1", listener.getsockname()[1])
        else:
            listener = None
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        bind_gloo_near(os.environ["MASTER_ADDR"])
        store = rendezvous_store(rank, world_size, listener)
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    deepspeed.init_distributed(verbose=False)  # wraps the existing group
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def rendezvous_store(rank: int, world_size: int, listener: socket.socket | None = None):
    """The process group's key-value store at ``MASTER_ADDR:MASTER_PORT``: hosted by rank 0 on a socket
    bound to that address alone (``listener``, else one bound here), joined by the other ranks."""
    from torch.distributed.constants import default_pg_timeout

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank != 0:
        return torch.distributed.TCPStore(addr, port, world_size, is_master=False, timeout=default_pg_timeout)
    listener = listener or socket.create_server((addr, port))
    return torch.distributed.TCPStore(
        addr, port, world_size, is_master=True, timeout=default_pg_timeout, master_listen_fd=listener.detach()
    )  # the store owns the socket now


def bind_gloo_near(master_addr: str) -> None:
    """Have gloo bind its sockets to the interface this process reaches ``master_addr`` through (the
    loopback interface for a local run), unless ``GLOO_SOCKET_IFNAME`` says otherwise; left to gloo
    when no interface holds that address."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    interface = interface_of(local_address_towards(master_addr))
    if interface:
        os.environ["GLOO_SOCKET_IFNAME"] = interface


def local_address_towards(host: str) -> str:
    """The address of this machine that packets to ``host`` leave from (a UDP "connect" sends nothing)."""
    family, _, _, _, address = socket.getaddrinfo(host, 1, type=socket.SOCK_DGRAM)[0]
    if ipaddress.ip_address(address[0]).is_loopback:
        return address[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(address)
        return probe.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds ``address`` (e.g. ``lo`` for 127.0.0.1), or None."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses):
            return name
    return None


def skip_unused_ops() -> list[str]:
    """Keep DeepSpeed from building ops that training does not use; returns the ops DeepSpeed will
    still JIT-build when its communication backend starts (none with the DeepSpeed versions that
    ``make setup`` installs).

    DeepSpeed builds the shared-memory comm op only if ``deepspeed.ops.__compatible_ops__`` says it
    can (``build_shm_op`` in ``deepspeed/comm/torch.py``); that table is computed once per process
    and kept, so marking the op incompatible there makes the backend use ``torch.distributed`` alone.
    """
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:  # GPU accelerators have no such op
        return []
    import deepspeed.ops
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(builder.NAME, False):  # compiled when DeepSpeed was installed: nothing to build
        return []
    try:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
    except AttributeError:  # a DeepSpeed without the table: it will build the op
        return [builder.NAME]
    return []


def extensions_dir() -> Path:
    """Where ``torch.utils.cpp_extension`` builds JIT ops: ``$TORCH_EXTENSIONS_DIR``, else
    ``<default root>/py<XY>_<cpu|cuXY|rocmXY>`` (as its ``_get_build_directory`` works it out)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def check_build_locks(ops: list[str], stale_after_s: float = STALE_LOCK_S) -> None:
    """Raise :class:`BuildLockError` if the build lock of one of ``ops`` is stale: older than
    ``stale_after_s`` and open in no process of this machine.

    It is not removed here: the extensions folder may be shared with other machines (a home
    folder on NFS), where a build that is still running cannot be seen, and two builds writing one
    library leave it broken for every later job; deleting it is one command for whoever knows.
    """
    for op in ops:
        lock = extensions_dir() / op / "lock"
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > stale_after_s and not _open_anywhere_here(lock):
            raise BuildLockError(
                f"{lock} is a build lock left {age / 60:.0f} minutes ago by a build of DeepSpeed's {op} op that "
                f"was killed, and every job would wait for it forever: delete it (or the folder {lock.parent}) "
                "and start again."
            )


def _open_anywhere_here(path: Path) -> bool:
    """Whether a process of this machine that we may inspect has ``path`` open (torch's build lock
    keeps its file open while the build runs)."""
    target = os.path.realpath(path)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.path.realpath(fd) == target:
                    return True
        except OSError:  # gone, or another user's
            continue
    return False


def barrier() -> None:
    """Wait for every rank (a no-op for a single rank, which need not wait for itself)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def global_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks, as a float on every rank."""
    world_size = torch.distributed.get_world_size()
    if world_size > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world_size
    return float(value)
