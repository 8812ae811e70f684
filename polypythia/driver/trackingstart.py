"""The sweep's MLflow server found or started in a thread while Ray starts, and the sweep's parent
runs opened there too: both are a few seconds of waiting (a server's start, HTTP round trips) that
``ray.init`` (seconds of waiting on its own processes) need not wait for. Used by
:meth:`polypythia.driver.sweep.Sweep.prepare`.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from polypythia.runtime import env as runtime_env
from polypythia.tracking import client as tracking


class TrackingStart:
    """The MLflow server found or started (:func:`tracking.resolve_tracking_uri`) in a thread, then
    ``then(uri)`` in the same thread: :meth:`result` is the URI (or raises the error of either);
    :meth:`undo` stops the server again and removes its folder if this start made them (a server that
    was already running, a remote one, or a folder that existed, are left alone)."""

    def __init__(self, cfg: Any, then: Optional[Callable[[str], None]] = None):  # the first job's TrackingConfig
        runtime_env.apply()  # the MLflow client settings, in this process's environment, before Ray starts
        self.cfg, self.then, self.uri, self.error = cfg, then, None, None
        self.fresh = not cfg.uri and tracking.running_server(cfg.dir) is None
        self.new_folder = self.fresh and not Path(cfg.dir).exists()
        self.thread = threading.Thread(target=self._run, name="tracking-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.uri = tracking.resolve_tracking_uri(
                self.cfg.uri,
                self.cfg.dir,
                self.cfg.host,
                self.cfg.port,
                self.cfg.backend_store_uri,
                self.cfg.artifacts_destination,
            )
            if self.then is not None:
                self.then(self.uri)
        except BaseException as exc:  # noqa: BLE001 - raised in the sweep's thread by result()
            self.error = exc

    def result(self) -> str:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.uri

    def join(self, timeout_s: float = 120) -> None:
        """Wait for the thread (a failed or interrupted start: before undoing what it made)."""
        self.thread.join(timeout=timeout_s)

    def undo(self) -> None:
        self.join()
        if self.fresh and self.uri is not None:  # a server that failed to start keeps its folder (server.log)
            tracking.stop_server(self.cfg.dir)
            if self.new_folder:
                shutil.rmtree(self.cfg.dir, ignore_errors=True)
