"""Small records on disk that several processes share: JSON written atomically, read with an error
that names the file, and exclusive locks (``fcntl.flock``) that die with the process holding them.

A lock is taken on an open file description, so it is held until this process closes the file or
dies (a SIGKILL included); a second ``open`` of the same file, even in the same process, conflicts
with it. The lock file holds its owner's pid, host and start time, so that whoever finds it taken
can say who has it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that a reader sees the old file or the new one, never
    half of one (a temporary file in the same folder, flushed, then renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path, error: Callable[[str], Exception], what: str, fix: str) -> Any:
    """The JSON in ``path``; an unreadable or empty file raises ``error`` in one sentence naming
    ``path``, ``what`` it should hold, and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        reason = (
            "it is empty" if isinstance(exc, json.JSONDecodeError) and not exc.doc.strip() else str(exc).split("\n")[0]
        )
        raise error(f"{path} should hold {what} but cannot be read ({reason}); {fix}.") from None


def owner_text() -> str:
    """What a lock file says about its holder: this process."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})


def describe_owner(path: str | Path) -> str:
    """The holder a lock file names, in words ("pid 123 on host-a since ..."), or "unknown"."""
    for _ in range(3):  # its owner may be writing it this instant
        try:
            owner = json.loads(Path(path).read_text() or "null")
        except (OSError, ValueError):
            owner = None
        if isinstance(owner, dict) and "pid" in owner:
            since = f" since {owner['since']}" if owner.get("since") else ""
            return f"pid {owner['pid']} on {owner.get('host', '?')}{since}"
        time.sleep(0.05)
    return "an unknown process"


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if need be), with this process named in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: Optional[int] = None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; False (and nothing held) if somebody does."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner_text().encode(), 0)
        self._fd = fd
        return True

    def acquire(self, timeout_s: float, on_timeout: Callable[[str], Exception]) -> "FileLock":
        """Wait up to ``timeout_s`` for the lock; then raise ``on_timeout(holder in words)``."""
        deadline = time.monotonic() + timeout_s
        while not self.try_acquire():
            if time.monotonic() > deadline:
                raise on_timeout(describe_owner(self.path))
            time.sleep(0.2)
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.ftruncate(fd, 0)  # no owner named any more (the file stays: removing it would race)
            os.close(fd)  # closing the only descriptor drops the lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(path: str | Path) -> bool:
    """Whether somebody holds the lock on an existing ``path`` (without creating it or keeping it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
