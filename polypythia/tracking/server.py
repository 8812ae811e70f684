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
from polypythia.tracking import processes as procs
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


def serves(pid: int | None, server_dir: str | Path) -> bool:
    """Whether process ``pid`` is an MLflow server of the database in ``server_dir``."""
    if not pid or not procs.pid_alive(pid):
        return False
    command = procs.command_line(pid)
    state = read_state(server_dir) or {}  # a PostgreSQL-backed server: its database's URI, without password
    return "mlflow" in command and (
        str(Path(server_dir).resolve() / DATABASE) in command
        or bool(state.get("backend"))
        and state["backend"] in command
    )


def _recorded_port(state: dict) -> int:
    return int(state.get("port") or state["uri"].rsplit(":", 1)[-1])


def server_processes(server_dir: str | Path, state: dict | None = None) -> list:
    """The live processes (psutil.Process) of the server recorded in ``server_dir``: those of the
    process group its pid leads, and those listening on its recorded port, that serve the folder's
    database. Found also when the recorded ``mlflow server`` itself is gone."""
    state = read_state(server_dir) if state is None else state
    if not state:
        return []
    database = state.get("backend") or str(Path(server_dir).resolve() / DATABASE)  # PostgreSQL's URI has no password
    return procs.serving(database, state.get("pid"), _recorded_port(state))


def _running(server_dir: Path, state: dict | None) -> bool:
    """Whether the server recorded in ``state`` answers at its address: its recorded ``mlflow server``,
    or processes left serving this folder's database there (a SIGKILLed server's workers; the port is
    then theirs, not a stranger's)."""
    if not state or not is_healthy(state["uri"]):
        return False
    port = _recorded_port(state)
    return serves(state.get("pid"), server_dir) or any(
        procs.listens_on(p, port) for p in server_processes(server_dir, state)
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
    recorded = _recorded_port(state) if state and state.get("host", host) == host else 0
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


def _unlistenable(host: str, exc: BaseException) -> TrackingError:
    return TrackingError(
        f"The tracking server cannot listen on {host} ({exc}); give --host (tracking.host) "
        f"an address of this machine, such as {DEFAULT_TRACKING_HOST}."
    )


def _check_address(server_dir: Path, host: str, port: int) -> None:
    """The port is a port, the host resolves, and the folder exists or can be made."""
    if not 0 <= port <= 65535:
        raise TrackingError(
            f"The tracking server's port must be a TCP port from 1 to 65535 (or 0 for any free "
            f"port), got {port}; give --port (tracking.port) such a port."
        )
    try:
        socket.getaddrinfo(host, port)  # a name that resolves to nothing: refused before a folder is made
    except (OSError, UnicodeError) as exc:
        raise _unlistenable(host, exc) from None
    try:
        server_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(
            f"The tracking server's folder {server_dir} cannot be created ({exc.strerror}); give "
            "--dir (tracking.dir) a folder you can write to."
        ) from None


def _launch(server_dir: Path, host: str, port: int, backend: tuple[str, dict[str, str]], artifacts: str | None):
    """Start ``mlflow server`` detached (a session leader, so its workers share its process group);
    ``backend``: the database URI without password, and the environment that carries the password."""
    backend_uri, backend_env = backend
    options = {
        "--host": host,
        "--port": str(port),
        "--backend-store-uri": backend_uri,
        "--artifacts-destination": trackingstore.artifacts_uri(server_dir, artifacts),
        "--workers": "2",
    }
    cmd = [sys.executable, "-m", "mlflow", "server", *(part for option in options.items() for part in option)]
    env = {**os.environ, **runtime_env.MLFLOW_SERVER_ENV, **backend_env}
    with open(server_dir / "server.log", "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=server_dir,
        )


def _await_health(proc, server_dir: Path, uri: str, timeout_s: float) -> None:
    """Return once the server answers at ``uri``; a server that exits or stays silent is an error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (server_dir / "server.log").read_text(errors="replace")[-600:]
            raise TrackingError(
                f"The MLflow server exited at start (code {proc.returncode}); see {server_dir / 'server.log'}: {tail}"
            )
        if is_healthy(uri):
            return
        time.sleep(0.25)
    procs.kill_group(proc.pid)
    raise TrackingError(
        f"The MLflow server did not answer on {uri} within {timeout_s:.0f} s; see {server_dir / 'server.log'}."
    )


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
    _check_address(server_dir, host, port)
    with _lock(server_dir, timeout_s + 30):
        state = read_state(server_dir)
        database = trackingstore.backend_uri(server_dir, backend_store_uri)
        backend = trackingstore.command_uri(database)
        if _running(server_dir, state):
            trackingstore.check_same_backend(server_dir, state, backend[0])
            return state["uri"]
        trackingstore.check_database(database)
        try:
            port = _choose_port(state, host, port)
        except OSError as exc:
            raise _unlistenable(host, exc) from None
        uri = f"http://{host}:{port}"
        proc = _launch(server_dir, host, port, backend, artifacts_destination)
        _await_health(proc, server_dir, uri, timeout_s)
        record = {"pid": proc.pid, "uri": uri, "host": host, "port": port}
        if backend_store_uri:
            record["backend"] = backend[0]
        write_json_atomic(server_dir / STATE_FILE, record)
        return uri


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
        found = server_processes(server_dir, state)
        leader = bool(pid) and serves(pid, server_dir)
        if not leader and pid and procs.pid_alive(pid):
            log.warning(
                "The recorded MLflow server pid %d now belongs to another program (not the server of %s); "
                "it was left alone.",
                pid,
                server_dir,
            )
        procs.end(found)
        if pid:
            write_json_atomic(server_dir / STATE_FILE, {**state, "pid": None})
        return bool(found)


def default_server_dir() -> Path:
    return runtime_env.default_server_dir()
