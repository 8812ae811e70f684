"""MLflow: the tracking server the jobs log to, and a buffered metrics logger that loses nothing.

The local server's lifecycle (one detached ``mlflow server`` with a SQLite backend per folder, its
address kept for good in ``<dir>/server.json``) is :mod:`polypythia.tracking.server`, re-exported
here; ``python -m polypythia.tracking.client start|stop|status`` is its command line.

:class:`MetricsLogger` sends points from a background thread in batches (``log_batch``, at most
1,000 metrics a request), retrying while the server is away for up to ``max_outage_s``. Points carry
their own timestamps, and MLflow's SQL store ignores an exact duplicate row, so a retried batch that
had in fact arrived is not stored twice.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time

from polypythia.errors import PolypythiaError, TrackingError
from polypythia.runtime import env as runtime_env
from polypythia.runtime.env import DEFAULT_TRACKING_HOST
from polypythia.tracking.server import (  # re-exported: the server's lifecycle, used through this module
    default_server_dir as default_server_dir,
)
from polypythia.tracking.server import (
    is_healthy as is_healthy,
)
from polypythia.tracking.server import (
    running_server as running_server,
)
from polypythia.tracking.server import (
    start_server as start_server,
)
from polypythia.tracking.server import (
    stop_server as stop_server,
)

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000


# ----------------------------------------------------------------------------- server


def default_tracking_uri() -> str | None:
    """For the command-line tools: ``MLFLOW_TRACKING_URI``, else the local server a sweep started
    (None, with a warning, if that server's record is unreadable)."""
    if os.environ.get(runtime_env.TRACKING_URI_ENV):
        return os.environ[runtime_env.TRACKING_URI_ENV]
    try:
        return running_server(default_server_dir())
    except TrackingError as exc:
        log.warning("%s", exc)
        return None


def resolve_tracking_uri(
    uri: str | None,
    server_dir: str,
    host: str,
    port: int,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
) -> str:
    """The configured server if it answers, else a clear error; with no URI, the local server (on
    ``backend_store_uri``, else SQLite in ``server_dir``)."""
    runtime_env.apply()  # a job's or a sweep's first MLflow step: the client settings, before mlflow loads
    if uri:
        require_reachable(
            uri, "start it, fix tracking.uri (or MLFLOW_TRACKING_URI), or set tracking.uri=null for a local server"
        )
        return uri
    return start_server(
        server_dir, host, port, backend_store_uri=backend_store_uri, artifacts_destination=artifacts_destination
    )


def require_reachable(uri: str, fix: str) -> None:
    """Fail fast on an HTTP tracking URI nobody answers (the MLflow client retries for minutes);
    ``fix`` says what to do about it."""
    if uri.startswith(("http://", "https://")) and not is_healthy(uri, timeout_s=5.0):
        raise TrackingError(f"The MLflow tracking server at {uri} does not answer; {fix}.")


# ----------------------------------------------------------------------------- runs


def client(uri: str):
    """An MLflow client for ``uri``, with polypythia's client settings (:func:`runtime_env.apply`)."""
    runtime_env.apply()
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
    except Exception:  # noqa: BLE001 - created concurrently by another job
        return mlflow_client.get_experiment_by_name(name).experiment_id


# ----------------------------------------------------------------------------- metrics logger


class MetricsLogger:
    """Buffered, retrying metric sender for one run; call :meth:`close` to flush."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        flush_interval_s: float = 2.0,
        max_outage_s: float = 300.0,
        already_logged: dict[str, int] | None = None,
    ):
        self.uri = uri
        self.run_id = run_id
        self.flush_interval_s = flush_interval_s
        self.max_outage_s = max_outage_s
        self._skip_through = dict(already_logged or {})
        self._queue: queue.Queue = queue.Queue()
        self._client = client(uri)
        self.error: TrackingError | None = None
        self.outage_since: float | None = None  # monotonic time the server stopped accepting points
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> bool:
        """Whether the points are held back, waiting for the tracking server to answer again (a
        progress display may say so; :meth:`flush` before a checkpoint blocks meanwhile)."""
        return self.outage_since is not None

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
        delay = 0.5
        while True:
            try:
                self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)
                if self.outage_since is not None:
                    log.warning(
                        "The MLflow server at %s accepts metrics again after %.0f s.",
                        self.uri,
                        time.monotonic() - self.outage_since,
                    )
                    self.outage_since = None
                return
            except Exception as exc:  # noqa: BLE001 - the server is away, restarting, or overloaded: retry
                now = time.monotonic()
                if self.outage_since is None:
                    self.outage_since = now
                    log.warning(
                        "The MLflow server at %s does not accept metrics (%s); holding them and retrying "
                        "for up to %.0f s (tracking.max_outage_s).",
                        self.uri,
                        type(exc).__name__,
                        self.max_outage_s,
                    )
                if now - self.outage_since > self.max_outage_s:
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

    parser = argparse.ArgumentParser(
        prog="python -m polypythia.tracking.client",
        description="Start, stop or locate the local MLflow tracking server.",
    )
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument(
        "--dir",
        default=str(default_server_dir()),
        help=f"the server's folder (default: ${runtime_env.HOME_ENV}/{runtime_env.MLFLOW_SUBDIR}, "
        f"i.e. {runtime_env.DEFAULT_HOME}/{runtime_env.MLFLOW_SUBDIR})",
    )
    parser.add_argument("--host", default=DEFAULT_TRACKING_HOST)
    parser.add_argument(
        "--port",
        type=int,
        default=runtime_env.DEFAULT_TRACKING_PORT,
        help="the port of a folder's first server (later ones keep the address it had)",
    )
    parser.add_argument(
        "--backend-store-uri",
        help="start: the database of the runs (default: SQLite in --dir), "
        "e.g. postgresql://user:password@db:5432/mlflow (pip install 'polypythia[postgres]')",
    )
    parser.add_argument(
        "--artifacts-destination",
        help="start: where artifacts are stored (default: --dir/artifacts), e.g. a shared folder or s3://bucket/path",
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            uri = start_server(
                args.dir,
                args.host,
                args.port,
                backend_store_uri=args.backend_store_uri,
                artifacts_destination=args.artifacts_destination,
            )
            print(f"MLflow UI: {uri}")
        elif args.action == "stop":
            print("stopped" if stop_server(args.dir) else "no server was running")
        else:
            uri = running_server(args.dir)
            print(f"running at {uri}" if uri else "not running")
            return 0 if uri else 1
    except PolypythiaError as exc:
        from polypythia.errors import exit_with

        exit_with(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
