"""What the sweep's seed-band monitor (:mod:`polypythia.driver.seedband`) decides, written to MLflow:
``monitor/band_deviation`` on each run at every decision step, the ``stability.alert`` tag on a run
that alerts, and the band (``seeds/loss_median``, ``_p25``, ``_p75``, ``_min``, ``_max``) on the
sweep's parent run once every run of the group has reached the step or ended. The monitor's actions
(:mod:`polypythia.driver.actions`) tag, reopen and close a job's run through :class:`MonitorLog` too.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from polypythia.driver.seedband import Band, Decision, SeedBandMonitor
from polypythia.study import search_job_runs
from polypythia.tracking.client import MAX_METRICS_PER_BATCH

log = logging.getLogger(__name__)


class MonitorLog:
    """Feeds the board's rows to a :class:`SeedBandMonitor` and writes what it decides: a log line
    per alert, and MLflow (the runs' ``monitor/band_deviation`` and ``stability.alert``, the parent
    runs' band). An MLflow error is logged, never raised: the monitor must not fail a sweep."""

    def __init__(self, monitor: SeedBandMonitor, client: Any, parent_runs: dict[str, str], jobs: list[Any]):
        self.monitor = monitor
        self.client = client
        self.parent_runs = parent_runs  # study -> the sweep's run in it
        self.names = {i: (job.study, job.run_name) for i, job in enumerate(jobs)}
        self.run_ids: dict[int, str] = {}  # job -> its MLflow run, once found
        self.untagged: list[Decision] = []  # alerts whose tag is not written yet (retried at each watch)
        self.alerted: dict[int, int] = {}  # job -> its alerts tagged: stability.alert, then stability.alert.2, ...
        self.logged: set[tuple[int, int]] = set()  # (job, step) with a monitor/band_deviation point

    def watch(self, rows: dict[int, dict[str, Any]]) -> None:
        try:
            decisions, bands = self.monitor.observe(rows)
        except Exception:
            log.exception("The seed-band monitor failed; it is off for the rest of the sweep.")
            self.monitor.groups = []
            return
        alerts = [d for d in decisions if self.monitor.alerts.get(d.index) is d]
        self.untagged += alerts
        for d in alerts:
            log.warning(
                "Cross-seed alert: %s at step %d: its smoothed train/loss %.4f is %+.1f SDs from its %d "
                "siblings' in %s (threshold %.1f).",
                self.names[d.index][1],
                d.step,
                d.loss,
                d.deviation,
                d.siblings,
                d.group,
                d.threshold,
            )
        try:
            self._write(decisions, bands)
        except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not stop the sweep
            log.warning("Could not write the seed-band monitor's decisions to MLflow: %s", exc)

    def marks(self, rows: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """``rows`` with each run's verdict: ``deviation`` (its latest) and ``alert`` (its first alert's step)."""
        marked = {}
        for i, row in rows.items():
            latest, alert = self.monitor.latest.get(i), self.monitor.alerts.get(i)
            marked[i] = {
                **row,
                "deviation": None if latest is None else latest.deviation,
                "alert": None if alert is None else alert.step,
            }
        return marked

    def _write(self, decisions: list[Decision], bands: list[Band]) -> None:
        from mlflow.entities import Metric

        for d in list(self.untagged):  # the alerts first: they matter most (a rewound run's next: .2, .3, ...)
            if (run_id := self.run_id(d.index)) is not None:
                count = self.alerted.get(d.index, 0) + 1
                self.client.set_tag(run_id, "stability.alert" + (f".{count}" if count > 1 else ""), d.describe())
                self.alerted[d.index] = count
                self.untagged.remove(d)
        now = int(time.time() * 1000)
        points: dict[int, list] = {}
        for d in decisions:  # a step decided again (a rewound run's) keeps its first point: none twice
            if not math.isnan(d.deviation) and (d.index, d.step) not in self.logged:
                self.logged.add((d.index, d.step))
                points.setdefault(d.index, []).append(Metric("monitor/band_deviation", d.deviation, now, d.step))
        for index, metrics in points.items():
            self._log(self.run_id(index), metrics)
        by_study: dict[str, list] = {}
        for band in bands:
            by_study.setdefault(band.study, []).extend(Metric(k, v, now, band.step) for k, v in band.metrics.items())
        for study, metrics in by_study.items():
            self._log(self.parent_runs[study], metrics)

    def _log(self, run_id: str | None, metrics: list) -> None:
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH) if run_id else ():
            self.client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])

    def run_id(self, index: int) -> str | None:
        """The job's MLflow run (None until it exists): the child of the sweep's parent run that has the
        job's run name."""
        if index not in self.run_ids:
            study = self.names[index][0]
            parent = self.parent_runs[study]
            experiment = self.client.get_run(parent).info.experiment_id
            found = {run.info.run_name: run.info.run_id for run in search_job_runs(self.client, experiment, parent)}
            self.run_ids.update({i: found[name] for i, (s, name) in self.names.items() if s == study and name in found})
        return self.run_ids.get(index)

    def tag(self, index: int, key: str, value: str) -> None:
        """Set a tag on job ``index``'s run (quietly, as every write here)."""
        self._quietly(lambda run_id: self.client.set_tag(run_id, key, value[:5000]), index)

    def reopen(self, index: int) -> None:
        """Mark job ``index``'s finished run RUNNING again: it trains again from a rewind."""
        self._quietly(lambda run_id: self.client.update_run(run_id, status="RUNNING"), index)

    def close(self, index: int, status: str, reason: str) -> None:
        """End job ``index``'s run now with ``status`` (an MLflow run status) and ``failure_reason``."""
        self.tag(index, "failure_reason", reason)
        self._quietly(lambda run_id: self.client.set_terminated(run_id, status=status), index)

    def _quietly(self, write, index: int) -> None:
        """``write(run_id)`` of job ``index``'s run, if found; a tracking hiccup is logged, not raised."""
        try:
            run_id = self.run_id(index)
            if run_id is not None:
                write(run_id)
        except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not stop the sweep
            log.warning("The seed-band monitor could not reach MLflow: %s", exc)
