"""A disk that fills up while a checkpoint is written, as one line: where, and what to do.

A full disk reaches a checkpoint's writers in three shapes: Python's ``OSError`` with ``errno``
ENOSPC (or EDQUOT, a quota), safetensors' ``SafetensorError`` whose text carries the OS error
("No space left on device (os error 28)"), and ``torch.save``'s ``RuntimeError`` from its zip
writer, which names no error at all ("[enforce fail at inline_container.cc:...] . unexpected pos
...", from the zip writer in torch's caffe2/serialize/inline_container.cc): that one counts as a
full disk when the file system has (almost) no space left after it. The three shapes were seen
writing onto a 1 MiB tmpfs with torch 2.13 and safetensors. :func:`is_disk_full` tells them apart from
other failures; :func:`space_problem` is the check before a checkpoint is started.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from polypythia.errors import DiskFullError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "file write failed")
ALMOST_FULL_BYTES = 16 << 20  # left free after a failed torch.save: the disk filled up


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the file system of ``path`` (its nearest existing folder)."""
    current = Path(path)
    while not current.exists():
        if current.parent == current:
            return None
        current = current.parent
    return shutil.disk_usage(current).free


def allocated_bytes(folder: str | Path) -> int:
    """Disk space the files under ``folder`` take (allocated blocks, so compression counts)."""
    return sum(p.stat().st_blocks * 512 for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def is_disk_full(exc: BaseException, path: str | Path) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is the disk of ``path`` filling up."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        text = str(seen)
        if any(marker in text for marker in DISK_FULL_TEXTS):
            return True
        if isinstance(seen, RuntimeError) and any(marker in text for marker in TORCH_WRITE_FAILURES):
            free = free_bytes(path)
            return free is not None and free < ALMOST_FULL_BYTES
        seen = seen.__cause__ or seen.__context__
    return False


def short_size(n: float) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def disk_full_error(folder: str | Path, step: int, reason: str, kept_step: int | None) -> DiskFullError:
    """The one line for the checkpoint of ``step`` that did not fit into ``folder``."""
    kept = (
        f"the checkpoint of step {kept_step} is the newest and a relaunch resumes from it"
        if kept_step is not None
        else "there is no earlier checkpoint"
    )
    return DiskFullError(
        f"disk full at {folder}: free space there or point the runs at another disk (runs_dir, or "
        f"POLYPYTHIA_HOME); the checkpoint of step {step} was not written ({reason}), {kept}."
    )


def error_reason(exc: BaseException) -> str:
    """``exc`` in a few words for the one line (its first line, its errno's name)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:200]


def space_problem(folder: str | Path, previous: str | Path | None) -> str | None:
    """Why the next checkpoint would not fit into ``folder``, or None: the space the ``previous``
    checkpoint takes (checkpoints of a run are the same size, and older resume states are dropped
    only after the new checkpoint is sealed) against the space left."""
    if previous is None:
        return None
    free, needed = free_bytes(folder), allocated_bytes(previous)
    if free is None or free >= needed:
        return None
    return f"{short_size(free)} free, the previous checkpoint takes {short_size(needed)}"


def remove_quietly(folder: str | Path) -> None:
    """Remove a half-written checkpoint (what it holds is useless, and it holds disk space)."""
    if os.path.lexists(folder):
        shutil.rmtree(folder, ignore_errors=True)
