"""What the sweep's driver does when the seed-band monitor (:mod:`polypythia.driver.seedband`) alerts on a
run: ``monitor.action`` of that run. :meth:`MonitorActions.act` says what it did as an :class:`ActionResult`.

- ``none`` (the default), and ``skip_step`` (which acts inside the job, on its own steps:
  :mod:`polypythia.train.skipstep`): the alert only (the ``stability.alert`` tag, ``monitor/band_deviation``,
  the mark in the live table, a log line).
- ``stop``: the run's Ray task is killed (as the stall watchdog kills a stalled one), its MLflow run
  gets ``stability.action=stopped at step T (...)`` and ends KILLED with a ``failure_reason`` naming
  the monitor, and it is not retried; the other runs go on. The sweep's outcome lists it as
  ``stopped``; it is not a failure of the sweep (the monitor did what it was told): the parent run
  ends FINISHED when every other run finished (:attr:`polypythia.jobspec.JobOutcome.ok`).
- ``rewind``: as PaLM did (Chowdhery et al. 2022, section 5.1): the run's task is killed and
  submitted again with a :class:`~polypythia.jobspec.RewindRequest`; the job goes back to its newest
  checkpoint strictly before the alert's decision step and skips the next ``monitor.skip_batches``
  batches (:mod:`polypythia.train.rewind`), in the same MLflow run (:mod:`polypythia.job.rewindlog`).
  At most ``monitor.max_rewinds`` rewinds per run: an alert after the last is an alert only (a seed
  that keeps leaving its band on other data is what a study of seeds is for; stopping it would lose
  it). A rewind is no failed attempt: it uses none of ``launcher.max_retries``. A run whose alert is
  decided only after it finished (its siblings were slower) is rewound too: its end is the abandoned
  branch (a run that finished is not stopped: ``stop`` is then an alert only).

While a rewound run waits for its new attempt, its row on the progress board shows step 0, so the
monitor sees none of its abandoned values; once the new attempt reports its first step (the
checkpoint it went back to), the monitor forgets its decisions after that step
(:meth:`~polypythia.driver.seedband.SeedBandMonitor.forget`) and judges the new branch afresh.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

from polypythia.config.monitor import DRIVER_ACTIONS
from polypythia.driver import watchdog
from polypythia.driver.seedband import Decision, SeedBandMonitor
from polypythia.driver.seedbandlog import MonitorLog
from polypythia.jobspec import JobOutcome, JobState, RewindRequest

ACTION_TAG = "stability.action"


class Taken(Enum):
    """What :meth:`MonitorActions.act` did to a job."""

    KEEP = "keep"  # nothing changes for the job: the alert is noted only
    RESUBMIT = "resubmit"  # (killed if it ran, then) to be submitted again: its JobSpec carries the rewind
    STOPPED = "stopped"  # ended: its outcome is in the result


@dataclass(frozen=True)
class ActionResult:
    """The result of acting on one alert: what was done, and the job's outcome when it was stopped."""

    taken: Taken
    outcome: Optional[JobOutcome] = None  # with Taken.STOPPED only


KEEP = ActionResult(Taken.KEEP)
RESUBMIT = ActionResult(Taken.RESUBMIT)


class MonitorActions:
    """The driver's actions on alerts, per job; :meth:`act` is called at every poll of the board."""

    def __init__(self, jobs: list[Any], monitor: SeedBandMonitor):
        self.jobs = jobs
        self.monitor = monitor
        self.handled: dict[int, Decision] = {}  # the alert last acted on, per job
        self.rewinds: Counter = Counter()  # rewinds requested per job
        self.requests: dict[int, RewindRequest] = {}  # each job's latest (its JobSpec carries it)
        self.awaiting: dict[int, int] = {}  # rewound job -> its board attempt count when it was killed
        self.notes: dict[int, list[str]] = {}  # what was done, for the sweep's outcome

    def restarted(self, rows: dict[int, dict]) -> None:
        """A rewound job's new attempt has started: the monitor forgets its steps after its checkpoint."""
        for index, attempts in list(self.awaiting.items()):
            if (rows[index].get("attempt") or 0) > attempts:
                del self.awaiting[index]
                self.monitor.forget(index, rows[index].get("first_step") or 0)

    def due(self, pending: dict[Any, int], outcomes: dict[int, JobOutcome]) -> list[tuple[Any, int, Decision]]:
        """(task, job, alert) of each job with an alert not acted on yet, whose action is stop or rewind: a
        running job, or (rewind) one that finished before its alert was decided (task None)."""
        tasks = {index: ref for ref, index in pending.items()}
        found = []
        for index, alert in list(self.monitor.alerts.items()):
            if (
                self.handled.get(index) is alert
                or index in self.awaiting
                or self.jobs[index].monitor.action not in DRIVER_ACTIONS
            ):
                continue
            if index in tasks:
                found.append((tasks[index], index, alert))
            elif index in outcomes and outcomes[index].finished:
                found.append((None, index, alert))
        return found

    def act(
        self,
        ref: Any,
        index: int,
        alert: Decision,
        row: dict,
        board: Any,
        watch: MonitorLog,
        rewind_wait_s: float = 30.0,
    ) -> ActionResult:
        """Act on ``alert`` of job ``index`` (task ``ref``, None when it had finished): stop it, rewind
        it (kill it if it runs, to be submitted again), or, when that is not to be done, note the alert."""
        job = self.jobs[index]
        self.handled[index] = alert
        step = row.get("step", 0)
        running = ref is not None and not watchdog.ended(ref)
        if job.monitor.action == "stop":
            if running and step < (row.get("total") or float("inf")):
                return ActionResult(Taken.STOPPED, self._stop(ref, index, alert, step, board, watch))
            self._say(index, f"alert only: the run had trained all its steps (alert {alert.describe()})", watch)
            return KEEP
        if self.rewinds[index] >= job.monitor.max_rewinds:
            text = f"alert only: monitor.max_rewinds={job.monitor.max_rewinds} reached (alert {alert.describe()})"
            self._say(index, text, watch)
            return KEEP
        if ref is not None:
            watchdog.cancel(ref)
            watchdog.wait_ended(ref, rewind_wait_s)  # its run folder's lock dies with its process
        else:  # it finished on the abandoned branch: its MLflow run trains again
            watch.reopen(index)
        self.rewinds[index] += 1
        number = self.rewinds[index]
        self.requests[index] = RewindRequest(number, alert.step, job.monitor.skip_batches, alert.describe())
        self.awaiting[index] = row.get("attempt") or 0
        self.monitor.alerts.pop(index, None)  # a new branch may alert again
        board.update.remote(index, {"state": JobState.REWINDING, "step": 0})
        when = f"at step {step}" if running else "after it had finished"
        self._say(
            index,
            f"rewind {number} requested {when} (alert {alert.describe()}): back to the newest "
            f"checkpoint before step {alert.step}",
            watch,
        )
        return RESUBMIT

    def _stop(self, ref: Any, index: int, alert: Decision, step: int, board: Any, watch: MonitorLog) -> JobOutcome:
        watchdog.cancel(ref)
        board.update.remote(index, {"state": JobState.STOPPED})
        reason = f"stopped by the cross-seed monitor (monitor.action=stop) at step {step}: alert {alert.describe()}"
        self._say(index, f"stopped at step {step} (alert {alert.describe()})", watch)
        watch.close(index, "KILLED", reason)  # now, not at the sweep's end, so the UI shows it at once
        return JobOutcome(state=JobState.STOPPED, reason=reason)

    def _say(self, index: int, text: str, watch: MonitorLog) -> None:
        """A line on the console, a note for the outcome, and the run's ``stability.action`` tag."""
        name = self.jobs[index].run_name
        print(f"[monitor] {name}: {text}", flush=True)
        self.notes.setdefault(index, []).append(text)
        watch.tag(index, ACTION_TAG, text)
