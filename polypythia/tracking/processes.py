"""Which processes are a folder's MLflow server, and how to end them (see :mod:`polypythia.tracking.server`).

A detached ``mlflow server`` is a process group: uvicorn's workers serve the requests, and outlive a
SIGKILLed ``mlflow server``. They are recognised by the database they serve (on their command line,
or in their environment), by their process group and by the port they listen on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def command_line(pid: int) -> str:
    """The command line of process ``pid`` ("" if there is none, or it cannot be read)."""
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self/cmdline").exists():
        try:
            return proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""
    try:  # no /proc (macOS): ask ps
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def serves_database(proc, database: str) -> bool:
    """Whether ``proc`` (a psutil.Process) belongs to an MLflow server of ``database``: the ``mlflow
    server`` command names it on its command line, the uvicorn (or gunicorn) processes it starts have
    it in their environment (MLflow 3 passes the backend store as ``_MLFLOW_SERVER_FILE_STORE``)."""
    import psutil

    try:
        command = " ".join(proc.cmdline())
        if "mlflow" in command and database in command:
            return True
        store = database if "://" in database else f"sqlite:///{database}"  # a PostgreSQL URI, or a SQLite file
        return proc.environ().get("_MLFLOW_SERVER_FILE_STORE") == store
    except (psutil.Error, OSError):  # gone, or another user's
        return False


def serving(database: str, group: int | None, port: int) -> list:
    """The live processes (psutil.Process) that serve ``database`` (a SQLite file or a PostgreSQL URI
    without password) and belong to process group ``group`` or listen on ``port``; not this process."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid() or not serves_database(proc, database):
            continue
        try:
            in_group = bool(group) and os.getpgid(proc.pid) == group
        except OSError:
            continue
        if in_group or listens_on(proc, port):
            found.append(proc)
    return found


def listens_on(proc, port: int) -> bool:
    """Whether ``proc`` (a psutil.Process) listens on TCP ``port``."""
    import psutil

    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections(kind="inet"))
    except (psutil.Error, OSError):
        return False


def end(processes: list, timeout_s: float = 10.0) -> None:
    """SIGTERM each of ``processes`` (psutil.Process), and SIGKILL those still alive after ``timeout_s``."""
    import psutil

    for proc in processes:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


def kill_group(pid: int, timeout_s: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
