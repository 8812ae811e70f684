"""MLflow: the local tracking server's lifecycle, and a buffered metrics logger that loses nothing.

Many processes writing one SQLite file directly hit "database is locked", so a study logs over HTTP
to one ``mlflow server`` on loopback with a SQLite backend (reference.md section 6). The server is
started detached, so it outlives the sweep and the UI stays browsable; its address and pid are kept
in ``<dir>/server.json`` and a later sweep reuses it. ``python -m polypythia.tracking stop`` ends it.

:class:`MetricsLogger` sends points from a background thread in batches (``log_batch``, at most
1,000 metrics a request), retrying while the server is away for up to ``max_outage_s``. Points carry
their own timestamps, and MLflow's SQL store ignores an exact duplicate row, so a retried batch that
had in fact arrived is not stored twice.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from polypythia.errors import TrackingError
from polypythia.net import free_port, port_free

log = logging.getLogger(__name__)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # reference.md section 6: lost a run once
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our own retry loop decides
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

MAX_METRICS_PER_BATCH = 1000


# ----------------------------------------------------------------------------- server lifecycle


def is_healthy(uri: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _state_file(server_dir: Path) -> Path:
    return server_dir / "server.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def running_server(server_dir: str | Path) -> str | None:
    """The URI of the local server recorded in ``server_dir`` if it is up, else None."""
    state_file = _state_file(Path(server_dir))
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        return None
    if _pid_alive(state.get("pid", -1)) and is_healthy(state["uri"]):
        return state["uri"]
    return None


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


def start_server(server_dir: str | Path, host: str = "127.0.0.1", port: int = 5050, timeout_s: float = 90.0) -> str:
    """Start (or reuse) a detached MLflow server with a SQLite backend in ``server_dir``."""
    server_dir = Path(server_dir).resolve()
    uri = running_server(server_dir)
    if uri:
        return uri
    server_dir.mkdir(parents=True, exist_ok=True)
    port = _pick_port(host, port)
    uri = f"http://{host}:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
        "--artifacts-destination", str(server_dir / "artifacts"),
        "--workers", "2",
    ]
    # No background job runner: it forks eight ~250 MB processes that a tracking server does not need.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(server_dir / "server.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=server_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (server_dir / "server.log").read_text(errors="replace")[-600:]
            raise TrackingError(f"The MLflow server exited at start (code {proc.returncode}); see {server_dir / 'server.log'}: {tail}")
        if is_healthy(uri):
            _state_file(server_dir).write_text(json.dumps({"pid": proc.pid, "uri": uri}))
            return uri
        time.sleep(0.25)
    _kill_group(proc.pid)
    raise TrackingError(f"The MLflow server did not answer on {uri} within {timeout_s:.0f} s; see {server_dir / 'server.log'}.")


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
    """Stop the local server recorded in ``server_dir``; True if one was running."""
    state_file = _state_file(Path(server_dir))
    if not state_file.is_file():
        return False
    state = json.loads(state_file.read_text())
    alive = _pid_alive(state["pid"])
    _kill_group(state["pid"])
    state_file.unlink(missing_ok=True)
    return alive


def default_server_dir() -> Path:
    return Path(os.environ.get("POLYPYTHIA_HOME", ".polypythia")) / "mlflow"


def default_tracking_uri() -> str | None:
    """For the command-line tools: ``MLFLOW_TRACKING_URI``, else the local server a sweep started."""
    return os.environ.get("MLFLOW_TRACKING_URI") or running_server(default_server_dir())


def resolve_tracking_uri(uri: str | None, server_dir: str, host: str, port: int) -> str:
    """The configured server if it answers, else a clear error; with no URI, the local server."""
    if uri:
        require_reachable(uri, "start it, fix tracking.uri (or MLFLOW_TRACKING_URI), or set tracking.uri=null "
                               "for a local server")
        return uri
    return start_server(server_dir, host, port)


def require_reachable(uri: str, fix: str) -> None:
    """Fail fast on an HTTP tracking URI nobody answers (the MLflow client retries for minutes);
    ``fix`` says what to do about it."""
    if uri.startswith(("http://", "https://")) and not is_healthy(uri, timeout_s=5.0):
        raise TrackingError(f"The MLflow tracking server at {uri} does not answer; {fix}.")


# ----------------------------------------------------------------------------- runs


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except Exception:  # created concurrently by another job
        return mlflow_client.get_experiment_by_name(name).experiment_id


# ----------------------------------------------------------------------------- metrics logger


class MetricsLogger:
    """Buffered, retrying metric sender for one run; call :meth:`close` to flush."""

    def __init__(self, uri: str, run_id: str, flush_interval_s: float = 2.0, max_outage_s: float = 300.0,
                 already_logged: dict[str, int] | None = None):
        self.uri = uri
        self.run_id = run_id
        self.flush_interval_s = flush_interval_s
        self.max_outage_s = max_outage_s
        self._skip_through = dict(already_logged or {})
        self._queue: queue.Queue = queue.Queue()
        self._client = client(uri)
        self.error: TrackingError | None = None
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, step: int, metrics: dict[str, float], timestamp_ms: int | None = None) -> None:
        """Queue ``metrics`` at ``step``; never blocks on the network."""
        if self.error is not None:
            raise self.error
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        for key, value in metrics.items():
            if step > self._skip_through.get(key, -1):
                self._queue.put((key, float(value), ts, step))

    def _drain(self, limit: int) -> list:
        items = []
        while len(items) < limit:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _send(self, items: list) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key=k, value=v, timestamp=ts, step=s) for k, v, ts, s in items]
        outage_started = None
        delay = 0.5
        while True:
            try:
                self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)
                return
            except Exception as exc:  # the server is away, restarting, or overloaded: retry
                now = time.monotonic()
                outage_started = outage_started or now
                if now - outage_started > self.max_outage_s:
                    self.error = TrackingError(
                        f"The MLflow server at {self.uri} has not accepted metrics for "
                        f"{self.max_outage_s:.0f} s ({type(exc).__name__}); check that it is running "
                        "(tracking.max_outage_s sets how long to wait). Checkpoints are intact."
                    )
                    return
                log.debug("MLflow log_batch failed (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            while True:
                items = self._drain(MAX_METRICS_PER_BATCH)
                if not items:
                    break
                if self.error is None:
                    self._send(items)
                for _ in items:  # sent, or given up on (self.error says so): either way done
                    self._queue.task_done()
            if self._closed.is_set():
                return

    def flush(self) -> None:
        """Block until every queued point is stored (called before a checkpoint is sealed, so a
        checkpoint never stands for steps whose points could still be lost)."""
        self._wake.set()
        self._queue.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Flush every queued point (waiting out an outage up to ``max_outage_s``) and stop."""
        self._closed.set()
        self._wake.set()
        self._thread.join()
        if self.error is not None:
            raise self.error


def stored_points(mlflow_client, run_id: str, keys: list[str] | None = None) -> dict[str, dict[int, float]]:
    """key -> {step: value} of the points stored in the run (for ``keys``, or every metric)."""
    present = set(mlflow_client.get_run(run_id).data.metrics)
    if keys is not None:
        present &= set(keys)
    return {key: {m.step: m.value for m in mlflow_client.get_metric_history(run_id, key)} for key in sorted(present)}


def logged_through(mlflow_client, run_id: str) -> dict[str, int]:
    """The highest step already stored for each of the run's metric keys (to resume without duplicates)."""
    return {key: max(points) for key, points in stored_points(mlflow_client, run_id).items() if points}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m polypythia.tracking",
                                     description="Start, stop or locate the local MLflow tracking server.")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", default=str(default_server_dir()),
                        help="the server's folder (default: $POLYPYTHIA_HOME/mlflow, i.e. .polypythia/mlflow)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5050)
    args = parser.parse_args(argv)
    if args.action == "start":
        print(f"MLflow UI: {start_server(args.dir, args.host, args.port)}")
    elif args.action == "stop":
        print("stopped" if stop_server(args.dir) else "no server was running")
    else:
        uri = running_server(args.dir)
        print(f"running at {uri}" if uri else "not running")
        return 0 if uri else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
