"""The sweep's outcome as the driver prints it at the end: a line per job (finished with its final
loss, or how it ended and why; its retries, its seed-band alert and what the monitor's action did),
then the hook that prints the cross-seed summary of each study (the launcher hands in ``analysis``'s).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from polypythia.driver.actions import MonitorActions
from polypythia.driver.seedband import Decision
from polypythia.jobspec import JobOutcome, JobState

log = logging.getLogger(__name__)


def print_outcome(
    jobs: list[Any], results: list[JobOutcome], alerts: dict[int, Decision], actions: MonitorActions
) -> None:
    """A line per job; ``alerts``: each job's first seed-band alert; ``actions``: what was done about them."""
    print("\nSweep outcome:", flush=True)
    for index, (job, outcome) in enumerate(zip(jobs, results)):
        retries = outcome.attempts - 1 - actions.rewinds[index]
        retried = f" (retried {retries}x)" if retries > 0 else ""
        alert = alerts.get(index)
        flagged = "" if alert is None else f"; cross-seed ALERT ({alert.describe()})"
        notes = actions.notes.get(index, []) if outcome.state != JobState.STOPPED else []
        flagged += "".join(f"; {note}" for note in notes)
        if outcome.finished:
            summary = outcome.summary
            before = " (already finished before this launch)" if summary.get("skipped") else ""
            loss, run_id = summary["final_loss"], summary["run_id"]
            print(f"  {job.run_name}: finished{retried}{before}, final loss {loss:.4f}, MLflow run {run_id}{flagged}")
        else:
            print(f"  {job.run_name}: {outcome.state}{retried}: {outcome.reason or 'did not finish'}{flagged}")


def call_finished_hook(hook: Callable[[str, str, str], None], uri: str, parent_runs: dict[str, str]) -> None:
    """``hook(uri, study, parent run id)`` per study; its failure is logged: it must not fail a finished sweep."""
    for study, run_id in parent_runs.items():
        try:
            hook(uri, study, run_id)
        except Exception as exc:  # noqa: BLE001 - the summary must not fail a finished sweep
            log.error("Could not print the cross-seed summary: %s", exc)
