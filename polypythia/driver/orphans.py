"""When the sweep's driver dies: what stops with it, and what the next launch of the study finds.

The choice: **the jobs stop with their driver, and a relaunch resumes them.** A sweep's jobs are Ray
tasks that the driver (``python launch.py -m ...``) owns; Ray ends the tasks of an owner that dies
(Ray docs, "Fault tolerance: ownership"), and a local Ray runtime, started by the driver, ends
altogether. So no job trains on unobserved after an ssh session drops or an allocation ends. What
such a death cannot do is close its MLflow runs; this module does the rest at the next launch:

- the sweep's parent run carries its driver (``driver.host``, ``driver.pid``, ``driver.pid_started``)
  and a ``driver.heartbeat`` tag that the running driver renews every :data:`HEARTBEAT_S` seconds;
- a launch into a study first closes each of its sweeps still RUNNING whose driver is gone (on this
  host: that process no longer exists; elsewhere: no heartbeat for :data:`STALE_S` seconds): the
  parent run and its job runs still RUNNING end KILLED with ``failure_reason=driver lost: ...``;
- before submitting, the driver says per job what the launch does: a run whose MLflow run FINISHED
  is skipped and reported as already finished (it moves under the new sweep's parent run); a run
  with a checkpoint resumes from it in its own MLflow run, and the steps it trains again (those
  logged after that checkpoint: at most one checkpoint interval) are reported as lost work; their
  points are not logged twice (:mod:`polypythia.job.run`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from polypythia import runfolder
from polypythia.jobspec import JobOutcome, JobState
from polypythia.study import JOB_KIND, KIND_TAG, PARENT_TAG, SWEEP_KIND, search_job_runs

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG, PID_STARTED_TAG, HEARTBEAT_TAG = (
    "driver.host",
    "driver.pid",
    "driver.pid_started",
    "driver.heartbeat",
)
SUBMISSION_ENV, SUBMISSION_TAG = (
    "POLYPYTHIA_SUBMISSION_ID",
    "ray.submission_id",
)  # a detached study's (polypythia.driver.detach)
HEARTBEAT_S = 60.0  # how often a running driver renews its heartbeat tag
STALE_S = 5 * HEARTBEAT_S  # a driver on another host with no heartbeat for this long is gone
LOST = "driver lost"
_STEP_DIR = re.compile(r"^step(\d+)$")


def _pid_started(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def driver_tags(now: Optional[float] = None) -> dict[str, str]:
    """The tags that name this process as a sweep's driver."""
    pid = os.getpid()
    tags = {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(pid),
        PID_STARTED_TAG: f"{_pid_started(pid) or 0:.2f}",
        HEARTBEAT_TAG: f"{now or time.time():.0f}",
    }
    if os.environ.get(SUBMISSION_ENV):  # submitted as a Ray job: its stop command finds the runs by it
        tags[SUBMISSION_TAG] = os.environ[SUBMISSION_ENV]
    return tags


class Heartbeat:
    """Renews the parent runs' ``driver.heartbeat`` tag at most every ``every_s`` seconds (call :meth:`beat` at each poll)."""

    def __init__(self, client: Any, run_ids: list[str], every_s: float = HEARTBEAT_S):
        self.client, self.run_ids, self.every_s = client, run_ids, every_s
        self.last = time.monotonic()

    def beat(self) -> None:
        if time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        for run_id in self.run_ids:
            try:
                self.client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not stop the sweep
                log.warning("Could not renew the sweep's heartbeat in MLflow: %s", exc)


def driver_gone(tags: dict[str, str], now: float) -> Optional[str]:
    """Why the driver named by a parent run's ``tags`` is gone, or None while it may be alive (or the run
    names no driver: a sweep of an older version, left alone)."""
    host, pid = tags.get(HOST_TAG), tags.get(PID_TAG)
    if not host or not pid:
        return None
    if host == socket.gethostname():
        started = _pid_started(int(pid))
        if started is not None and abs(started - float(tags.get(PID_STARTED_TAG) or 0)) < 1.0:
            return None
        return f"its driver (pid {pid} on {host}) has ended"
    beat = float(tags.get(HEARTBEAT_TAG) or 0)
    if now - beat < STALE_S:
        return None
    return f"its driver (pid {pid} on {host}) has sent no heartbeat for {now - beat:.0f} s"


def close_dead_sweeps(client: Any, experiment_id: str, now: Optional[float] = None) -> list[str]:
    """Close the study's sweeps whose driver is gone: their job runs still RUNNING, then the parent run,
    KILLED with ``failure_reason``. Returns a line per sweep closed."""
    now = now or time.time()
    query = f"tags.`{KIND_TAG}` = '{SWEEP_KIND}' and attributes.status = 'RUNNING'"
    said: list[str] = []
    try:
        parents = client.search_runs([experiment_id], filter_string=query, max_results=1000)
        for parent in parents:
            _close_if_dead(client, experiment_id, parent, now, said)
    except Exception as exc:  # noqa: BLE001 - closing an old sweep must not stop a new one
        log.warning("Could not close the study's sweeps whose driver is gone: %s", exc)
    return said


def _close_if_dead(client: Any, experiment_id: str, parent: Any, now: float, said: list[str]) -> None:
    """Close one sweep (its job runs still RUNNING, then its parent run) if its driver is gone."""
    why = driver_gone(parent.data.tags, now)
    if why is None:
        return
    reason = f"{LOST}: {why} without closing the sweep; launch the same command again to resume its runs"
    open_jobs = [r for r in search_job_runs(client, experiment_id, parent.info.run_id) if r.info.status == "RUNNING"]
    for run in open_jobs + [parent]:
        client.set_tag(run.info.run_id, "failure_reason", reason)
        client.set_terminated(run.info.run_id, status="KILLED")
    said.append(
        f"[relaunch] {parent.info.run_name}: closed (KILLED) with {len(open_jobs)} job run(s) that were "
        f"left RUNNING; {why}."
    )


@dataclass(frozen=True)
class Plan:
    """What a launch does with one job's run, from its folder and its MLflow run."""

    state: str  # "new", "finished" (skipped) or "resumes"
    run_id: Optional[str] = None
    checkpoint_step: int = 0  # the newest checkpoint with a resume state
    logged_step: int = 0  # the last step of train/loss in MLflow
    final_loss: float = float("nan")

    @property
    def lost_steps(self) -> int:
        """Steps trained and logged after the checkpoint it resumes from: trained again, logged once."""
        return max(0, self.logged_step - self.checkpoint_step)


def resume_step(run_dir: str | Path) -> int:
    """The step of the run's newest checkpoint that keeps a resume state (0: none), from the folder
    names alone (the job verifies the checkpoint itself before it resumes from it)."""
    root = Path(run_dir) / "checkpoints"
    steps = [
        int(m.group(1))
        for p in (root.iterdir() if root.is_dir() else ())
        if (m := _STEP_DIR.match(p.name)) and (p / "state").is_dir()
    ]
    return max(steps, default=0)


def plan(client: Any, cfg: Any) -> Plan:
    """The :class:`Plan` of job ``cfg`` (a JobConfig) against its run folder and MLflow run."""
    record = runfolder.read_mlflow_record(cfg.run_dir)
    if record is None:
        return Plan("new")
    try:
        run = client.get_run(record["run_id"])
    except Exception:  # noqa: BLE001 - gone or elsewhere: the job reports it in one line when it starts
        return Plan("new")
    latest = {m.key: m for m in getattr(run.data, "_metric_objs", None) or ()}  # the latest point of each metric
    loss = latest.get("train/loss")
    if loss is None and "train/loss" in run.data.metrics:  # (a client whose runs do not carry their points' steps)
        loss = max(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    logged, final = (loss.step, loss.value) if loss is not None else (0, float("nan"))
    finished = run.info.status == "FINISHED" and not cfg.train.evaluate_after_training
    return Plan("finished" if finished else "resumes", run.info.run_id, resume_step(cfg.run_dir), logged, final)


def describe(name: str, p: Plan, every_steps: int) -> Optional[str]:
    """The line a relaunch prints for a job (None for a new run)."""
    if p.state == "finished":
        return f"[relaunch] {name}: already finished (MLflow run {p.run_id}); skipped."
    if p.state == "resumes":
        return (
            f"[relaunch] {name}: resumes from its checkpoint at step {p.checkpoint_step} in MLflow run {p.run_id}, "
            f"which has steps up to {p.logged_step}: {p.lost_steps} step(s) of work lost and trained again "
            f"(checkpoints every {every_steps} steps), none logged twice."
        )
    return None


def skip_finished(client: Any, jobs: list[Any], parent_runs: dict[str, str], board: Any) -> dict[int, JobOutcome]:
    """Say what this launch does with each run that has been launched before (skipped, or resumed from
    which step, losing how many); the outcomes of those that finished before (marked finished on the
    progress ``board``, and adopted by the study's parent run in ``parent_runs``)."""
    skipped = {}
    for i, job in enumerate(jobs):
        p = plan(client, job)
        line = describe(job.run_name, p, job.budget.checkpoint_every_steps)
        if line:
            print(line, flush=True)
        if p.state == "finished":  # (a Plan's own word: "new", "finished" or "resumes")
            adopt(client, p.run_id, parent_runs[job.study])
            board.update.remote(i, {"state": JobState.FINISHED, "step": job.budget.steps, "total": job.budget.steps})
            summary = {"run_id": p.run_id, "run_name": job.run_name, "final_loss": p.final_loss, "skipped": True}
            skipped[i] = JobOutcome(state=JobState.FINISHED, summary=summary)
    return skipped


def adopt(client: Any, run_id: str, parent_run_id: str) -> None:
    """Put a finished run that a relaunch skips under the new sweep's parent run (the study's view and
    summary then show every run of the sweep)."""
    client.set_tag(run_id, PARENT_TAG, parent_run_id)
    client.set_tag(run_id, KIND_TAG, JOB_KIND)
