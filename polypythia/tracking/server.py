"""The local MLflow tracking server's lifecycle: one detached ``mlflow server`` per folder.

Many processes writing one SQLite file directly hit "database is locked", so a study logs over HTTP
to one ``mlflow server`` on loopback with a SQLite backend in ``<dir>/mlflow.db``. The server is
started detached, so it outlives the sweep and the UI stays browsable. ``<dir>/server.json``
records its address and pid (written atomically):

- the address is the folder's for good: a later start serves the database at the address it was
  served at before (jobs that were logging there reconnect), whatever port is asked for, unless
  another program has taken that port meanwhile;
- the pid is checked before it is trusted: it must still be an MLflow process serving this folder's
  database (a stale pid may belong to any process by now), both to reuse the server and to stop it;
- the server is a process group, not one process: ``mlflow server`` starts uvicorn, whose workers
  serve the requests, and a SIGKILLed ``mlflow server`` leaves them serving. So the server's
  processes are those of the group the pid leads (it is started as a session leader) and those that
  listen on the recorded port, as long as they serve this folder's database (:func:`server_processes`):
  ``start`` reuses them, ``status`` reports them and ``stop`` ends every one;
- starting and stopping hold ``<dir>/server.lock`` (``fcntl.flock``), so two simultaneous starts
  make one server, not two on one database.

The command line (``python -m polypythia.tracking.client start|stop|status``) is in
:mod:`polypythia.tracking.client`, which re-exports these functions.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from polypythia.errors import TrackingError
from polypythia.files import FileLock, read_json, write_json_atomic
from polypythia.net import free_port, port_free
from polypythia.runtime import env as runtime_env
from polypythia.runtime.env import DEFAULT_TRACKING_HOST, DEFAULT_TRACKING_PORT
from polypythia.tracking import store as trackingstore

log = logging.getLogger(__name__)

STATE_FILE = "server.json"
LOCK_FILE = "server.lock"
DATABASE = "mlflow.db"


def is_healthy(uri: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def read_state(server_dir: str | Path) -> dict | None:
    """The record of the folder's server (``uri``, ``host``, ``port``, ``pid``: null once stopped),
    or None if it never had one; a corrupt record is a :class:`TrackingError` naming the file."""
    path = Path(server_dir) / STATE_FILE
    if not path.is_file():
        return None
    fix = (
        f"delete it and start the server again (stop any MLflow server still serving {Path(server_dir) / DATABASE} "
        "first)"
    )
    state = read_json(path, TrackingError, "the address and pid of the folder's MLflow server", fix)
    if not isinstance(state, dict) or not isinstance(state.get("uri"), str):
        raise TrackingError(
            f"{path} should hold the address and pid of the folder's MLflow server but has no uri; {fix}."
        )
    return state


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _command_line(pid: int) -> str:
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


def serves(pid: int | None, server_dir: str | Path) -> bool:
    """Whether process ``pid`` is an MLflow server of the database in ``server_dir``."""
    if not pid or not _pid_alive(pid):
        return False
    command = _command_line(pid)
    state = read_state(server_dir) or {}  # a PostgreSQL-backed server: its database's URI, without password
    return "mlflow" in command and (
        str(Path(server_dir).resolve() / DATABASE) in command
        or bool(state.get("backend"))
        and state["backend"] in command
    )


def _serves_database(proc, database: str) -> bool:
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


def _recorded_port(state: dict) -> int:
    return int(state.get("port") or state["uri"].rsplit(":", 1)[-1])


def server_processes(server_dir: str | Path, state: dict | None = None) -> list:
    """The live processes (psutil.Process) of the server recorded in ``server_dir``: those of the
    process group its pid leads, and those listening on its recorded port, that serve the folder's
    database. Found also when the recorded ``mlflow server`` itself is gone."""
    import psutil

    state = read_state(server_dir) if state is None else state
    if not state:
        return []
    database = state.get("backend") or str(Path(server_dir).resolve() / DATABASE)  # PostgreSQL's URI has no password
    group, port = state.get("pid"), _recorded_port(state)
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid() or not _serves_database(proc, database):
            continue
        try:
            in_group = bool(group) and os.getpgid(proc.pid) == group
        except OSError:
            continue
        if in_group or _listens_on(proc, port):
            found.append(proc)
    return found


def _listens_on(proc, port: int) -> bool:
    """Whether ``proc`` (a psutil.Process) listens on TCP ``port``."""
    import psutil

    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections(kind="inet"))
    except (psutil.Error, OSError):
        return False


def _running(server_dir: Path, state: dict | None) -> bool:
    """Whether the server recorded in ``state`` answers at its address: its recorded ``mlflow server``,
    or processes left serving this folder's database there (a SIGKILLed server's workers; the port is
    then theirs, not a stranger's)."""
    if not state or not is_healthy(state["uri"]):
        return False
    port = _recorded_port(state)
    return serves(state.get("pid"), server_dir) or any(
        _listens_on(p, port) for p in server_processes(server_dir, state)
    )


def running_server(server_dir: str | Path) -> str | None:
    """The URI of the local server recorded in ``server_dir`` if it is up, else None."""
    state = read_state(server_dir)
    return state["uri"] if _running(Path(server_dir).resolve(), state) else None


def _lock(server_dir: Path, timeout_s: float) -> FileLock:
    def late(owner: str) -> TrackingError:
        return TrackingError(
            f"Another process ({owner}) has been starting or stopping the MLflow server of "
            f"{server_dir} for over {timeout_s:.0f} s; wait for it to finish, or end it and try again."
        )

    return FileLock(server_dir / LOCK_FILE).acquire(timeout_s, late)


def _pick_port(host: str, preferred: int, wait_s: float = 5.0) -> int:
    """``preferred`` if it frees up within ``wait_s`` (a just-stopped server's port), else any."""
    deadline = time.monotonic() + wait_s
    while preferred:
        if port_free(host, preferred):
            return preferred
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return free_port(host)


def _choose_port(state: dict | None, host: str, port: int) -> int:
    """The port the database was served at before (on ``host``), else ``port``, else any free one."""
    recorded = (
        int(state.get("port") or state["uri"].rsplit(":", 1)[-1]) if state and state.get("host", host) == host else 0
    )
    if not recorded:
        return _pick_port(host, port)
    chosen = _pick_port(host, recorded)
    if chosen != recorded:
        log.warning(
            "The MLflow database was served at %s, which another program now holds; serving it at "
            "http://%s:%d instead (jobs still logging to the old address fail after tracking.max_outage_s).",
            state["uri"],
            host,
            chosen,
        )
    return chosen


def start_server(
    server_dir: str | Path,
    host: str = DEFAULT_TRACKING_HOST,
    port: int = DEFAULT_TRACKING_PORT,
    timeout_s: float = 90.0,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
) -> str:
    """Start (or reuse) the detached MLflow server of ``server_dir``: at the address it had before,
    else on ``port`` (0: any free port; the next free one if taken); its runs in SQLite in
    ``server_dir`` or in ``backend_store_uri`` (PostgreSQL, :mod:`polypythia.tracking.store`)."""
    server_dir = Path(server_dir).resolve()
    if not 0 <= port <= 65535:
        raise TrackingError(
            f"The tracking server's port must be a TCP port from 1 to 65535 (or 0 for any free "
            f"port), got {port}; give --port (tracking.port) such a port."
        )
    try:
        socket.getaddrinfo(host, port)  # a name that resolves to nothing: refused before a folder is made
    except (OSError, UnicodeError) as exc:
        raise TrackingError(
            f"The tracking server cannot listen on {host} ({exc}); give --host (tracking.host) "
            f"an address of this machine, such as {DEFAULT_TRACKING_HOST}."
        ) from None
    try:
        server_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(
            f"The tracking server's folder {server_dir} cannot be created ({exc.strerror}); give "
            "--dir (tracking.dir) a folder you can write to."
        ) from None
    with _lock(server_dir, timeout_s + 30):
        state = read_state(server_dir)
        backend, backend_env = trackingstore.command_uri(trackingstore.backend_uri(server_dir, backend_store_uri))
        if _running(server_dir, state):
            trackingstore.check_same_backend(server_dir, state, backend)
            return state["uri"]
        trackingstore.check_database(trackingstore.backend_uri(server_dir, backend_store_uri))
        try:
            port = _choose_port(state, host, port)
        except OSError as exc:
            raise TrackingError(
                f"The tracking server cannot listen on {host} ({exc}); give --host (tracking.host) "
                f"an address of this machine, such as {DEFAULT_TRACKING_HOST}."
            ) from None
        uri = f"http://{host}:{port}"
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            host,
            "--port",
            str(port),
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            trackingstore.artifacts_uri(server_dir, artifacts_destination),
            "--workers",
            "2",
        ]
        env = {**os.environ, **runtime_env.MLFLOW_SERVER_ENV, **backend_env}
        with open(server_dir / "server.log", "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
                cwd=server_dir,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (server_dir / "server.log").read_text(errors="replace")[-600:]
                raise TrackingError(
                    f"The MLflow server exited at start (code {proc.returncode}); see {server_dir / 'server.log'}: {tail}"
                )
            if is_healthy(uri):
                write_json_atomic(
                    server_dir / STATE_FILE,
                    {
                        "pid": proc.pid,
                        "uri": uri,
                        "host": host,
                        "port": port,
                        **({"backend": backend} if backend_store_uri else {}),
                    },
                )
                return uri
            time.sleep(0.25)
        _kill_group(proc.pid)
        raise TrackingError(
            f"The MLflow server did not answer on {uri} within {timeout_s:.0f} s; see {server_dir / 'server.log'}."
        )


def _end(processes: list, timeout_s: float = 10.0) -> None:
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


def _kill_group(pid: int, timeout_s: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _pid_alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def stop_server(server_dir: str | Path) -> bool:
    """Stop the local server recorded in ``server_dir``, every process of it (:func:`server_processes`),
    also when the recorded ``mlflow server`` itself is gone; True if one was running. A recorded pid
    that is no longer this folder's MLflow server is left alone. The address stays recorded."""
    server_dir = Path(server_dir).resolve()
    if not (server_dir / STATE_FILE).is_file():
        return False
    with _lock(server_dir, 60.0):
        state = read_state(server_dir)
        pid = state.get("pid")
        processes = server_processes(server_dir, state)
        leader = bool(pid) and serves(pid, server_dir)
        if not leader and pid and _pid_alive(pid):
            log.warning(
                "The recorded MLflow server pid %d now belongs to another program (not the server of %s); "
                "it was left alone.",
                pid,
                server_dir,
            )
        _end(processes)
        if pid:
            write_json_atomic(server_dir / STATE_FILE, {**state, "pid": None})
        return bool(processes)


def default_server_dir() -> Path:
    return runtime_env.default_server_dir()
