"""The sweep's stall watchdog and the closing of job runs that did not end on their own.

A running job reports to the progress board at its start, at every step (at most once a second) and
at its end; :func:`stalled` decides, from the board's row, that a job has made no progress for
``launcher.stall_timeout_s``. The sweep (:mod:`polypythia.driver.sweep`) then kills it and retries it, or
fails it with ``failure_reason=stalled``. :func:`close_open_runs` ends every job run still RUNNING
when the sweep stops (interrupted, stalled, a process that died too often), with its reason.

A job has ``launcher.max_retries`` retries in all: Ray's own retries of a dead process and the
watchdog's of a stalled one share them (:func:`failed_attempts`); a rewind by the seed-band monitor
(:mod:`polypythia.driver.actions`) is not a failed attempt.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any, Optional

from polypythia.jobspec import JobOutcome, JobState

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"  # the failure_reason of a run that a Ctrl-C or SIGTERM ended


def stalled(row: dict[str, Any], now: float, timeout_s: float) -> bool:
    """Whether a job's board row shows a running job with no report for ``timeout_s`` (0: never)."""
    updated = row.get("updated")
    return (
        bool(timeout_s)
        and timeout_s > 0
        and row.get("state") == JobState.RUNNING
        and updated is not None
        and now - updated >= timeout_s
    )


def failed_attempts(row: dict[str, Any], ended_by_driver: int, rewound: int) -> int:
    """How many of a job's attempts failed so far, the current one included when the driver ended it:
    each start of its process counts on the board (``attempt``, Ray's retries of a dead process too),
    and each attempt the driver ended had started; those a rewind ended did not fail."""
    return max(row.get("attempt") or 0, ended_by_driver) - rewound


def cancel(ref: Any) -> None:
    """Kill a job's Ray task (its worker process, with force) and forget errors: it may be done."""
    import ray

    try:
        ray.cancel(ref, force=True)
    except Exception as exc:  # noqa: BLE001
        log.debug("Could not cancel %s: %s", ref, exc)


def ended(ref: Any) -> bool:
    """Whether a job's Ray task has ended (its result is ready)."""
    import ray

    return bool(ray.wait([ref], timeout=0)[0])


def wait_ended(ref: Any, timeout_s: float) -> None:
    """Wait (up to ``timeout_s``) until a cancelled task has ended, so that its process is gone."""
    import ray

    ray.wait([ref], timeout=timeout_s)


def log_files(logging_config: Optional[dict]) -> list[Path]:
    """The files a job's Python logging config writes to (Hydra's default: ``<job folder>/<name>.log``)."""
    handlers = (logging_config or {}).get("handlers") or {}
    return [Path(h["filename"]) for h in handlers.values() if isinstance(h, dict) and h.get("filename")]


def last_lines(logging_config: Optional[dict], row: dict[str, Any], n: int = 5) -> list[str]:
    """The last ``n`` lines of the job's log file, or else its last progress report as one line."""
    for path in log_files(logging_config):
        try:
            with path.open(encoding="utf-8", errors="replace") as f:
                lines = [line.rstrip() for line in deque(f, maxlen=n) if line.strip()]
        except OSError:
            continue
        if lines:
            return lines
    return [f"last report: state {row.get('state')} step {row.get('step', 0)}/{row.get('total') or '?'}"]


def closing(outcome: Optional[JobOutcome]) -> tuple[str, str]:
    """(status, failure_reason) of the MLflow run of a job that did not finish (None: interrupted)."""
    if outcome is None:
        return "KILLED", INTERRUPTED
    if outcome.state == JobState.STOPPED:
        return "KILLED", outcome.reason
    return "FAILED", JobState.STALLED.value if outcome.reason.startswith(JobState.STALLED) else outcome.reason


def close_open_runs(client, parent_run_id: str, reasons: dict[str, tuple[str, str]]) -> None:
    """End the job runs of the sweep's ``parent_run_id`` that are still RUNNING (or that a Ctrl-C ended
    as FAILED): ``reasons`` maps a run name to its (status, failure_reason); other runs are left alone."""
    from polypythia.study import search_job_runs

    experiment = client.get_run(parent_run_id).info.experiment_id
    for run in search_job_runs(client, experiment, parent_run_id):
        # a job whose process got the terminal's Ctrl-C too marked its own run FAILED (KeyboardInterrupt)
        interrupted_itself = run.data.tags.get("failure_reason", "").startswith("KeyboardInterrupt")
        if not (run.info.status == "RUNNING" or interrupted_itself) or run.info.run_name not in reasons:
            continue
        status, reason = reasons[run.info.run_name]
        try:
            client.set_tag(run.info.run_id, "failure_reason", reason[:5000])
            client.set_terminated(run.info.run_id, status=status)
        except Exception as exc:  # noqa: BLE001 - a dead server must not hide the jobs' outcome
            log.error("Could not close MLflow run %s: %s", run.info.run_id, exc)
