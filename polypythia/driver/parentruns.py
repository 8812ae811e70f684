"""The sweep's parent runs in MLflow, one per study: opened while the tracking server starts (before any
job), closed when the sweep ends, with the job runs it left open. Used by :class:`polypythia.driver.sweep.Sweep`.

A parent run ends FINISHED when each of its jobs ended as the sweep asked (:attr:`JobOutcome.ok`),
FAILED when one did not, and KILLED with ``failure_reason=interrupted`` on a Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from polypythia.driver import orphans as driverloss
from polypythia.driver import watchdog
from polypythia.jobspec import JobOutcome
from polypythia.study import KIND_TAG, SWEEP_KIND
from polypythia.tracking import client as tracking
from polypythia.tracking import ui as mlflow_ui

log = logging.getLogger(__name__)


def open_parent_runs(client: Any, uri: str, jobs: list[Any], parent_runs: dict[str, str], links: list[str]) -> None:
    """One parent run per study of ``jobs`` into ``parent_runs`` (study -> run id, filled as each is
    made, so that a failure closes those made), and into ``links`` the line with the link that opens
    the study's training runs in the MLflow UI. A sweep of the study whose driver died is closed first."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for study in sorted({j.study for j in jobs}):
        exp_id = tracking.experiment_id(client, study)
        links.extend(driverloss.close_dead_sweeps(client, exp_id))
        names = [j.run_name for j in jobs if j.study == study]
        run = client.create_run(
            exp_id,
            run_name=f"sweep-{stamp}",
            tags={KIND_TAG: SWEEP_KIND, mlflow_ui.JOBS_TAG: ", ".join(names), **driverloss.driver_tags()},
        )
        parent_runs[study] = run.info.run_id
        view = mlflow_ui.open_sweep_view(client, exp_id, run.info.run_id)  # loss charts first (tracking.ui)
        links.append(f"Study {study} in MLflow: {mlflow_ui.study_url(uri, exp_id, run.info.run_id, view_id=view)}")


def close_parent_runs(
    client: Any, jobs: list[Any], parent_runs: dict[str, str], outcomes: dict[int, JobOutcome], interrupted: bool
) -> None:
    """End each parent run, and first its job runs still RUNNING (killed, stalled, stopped, or a process
    that died too often) with their reasons. A dead server is logged: it must not hide the jobs' outcome."""
    reasons: dict[str, dict[str, tuple[str, str]]] = {}  # per study: run name -> (status, failure_reason)
    for i, job in enumerate(jobs):
        if i not in outcomes or not outcomes[i].finished:
            reasons.setdefault(job.study, {})[job.run_name] = watchdog.closing(outcomes.get(i))
    for study, run_id in parent_runs.items():
        failed = any(i not in outcomes or not outcomes[i].ok for i, j in enumerate(jobs) if j.study == study)
        try:
            if study in reasons:
                watchdog.close_open_runs(client, run_id, reasons[study])
            if interrupted:
                client.set_tag(run_id, "failure_reason", watchdog.INTERRUPTED)
            client.set_terminated(run_id, status="KILLED" if interrupted else "FAILED" if failed else "FINISHED")
        except Exception as exc:  # noqa: BLE001 - a dead server must not hide the jobs' outcome
            log.error("Could not close the sweep's MLflow run %s: %s", run_id, exc)


def end_parent_runs(client: Any, parent_runs: dict[str, str], status: str, reason: str) -> None:
    """End the parent runs made so far with ``status`` and ``failure_reason`` (a failed or interrupted
    set-up, before any job started)."""
    for run_id in parent_runs.values():
        try:
            client.set_tag(run_id, "failure_reason", reason[:5000])
            client.set_terminated(run_id, status=status)
        except Exception as exc:  # noqa: BLE001 - the error that stopped the set-up matters more
            log.error("Could not close the sweep's MLflow run %s: %s", run_id, exc)
