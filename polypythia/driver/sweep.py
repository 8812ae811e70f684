"""The driver side of a sweep of training jobs on Ray: validation, shared set-up, submission, live
progress, outcome. The Hydra launcher (``hydra_plugins/polypythia_launcher``) composes one config per
job and hands them here as :class:`~polypythia.jobspec.JobRequest` values; this module knows nothing
of Hydra. :meth:`Sweep.run` turns each into a :class:`~polypythia.jobspec.JobSpec` (the config, the
tracking URI, the sweep's parent run, the worker count) and submits it to
:func:`polypythia.job.worker.run_job`, the code that runs inside the Ray worker; the jobs' outcomes come
back as :class:`~polypythia.jobspec.JobOutcome` values.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import replace
from typing import Any, Callable, Optional

from polypythia import runfolder
from polypythia.config.jobconfig import JobConfig, job_config, to_dict
from polypythia.config.sweepwide import check_sweep_wide
from polypythia.driver import orphans as driverloss
from polypythia.driver import watchdog
from polypythia.driver.actions import MonitorActions
from polypythia.driver.progress import ProgressBoard, ProgressDisplay
from polypythia.driver.seedband import CrossSeedMonitor, MonitorLog, plan_groups
from polypythia.driver.trackingstart import TrackingStart
from polypythia.errors import ConfigError, last_line
from polypythia.job import worker
from polypythia.jobspec import STOPPED, JobOutcome, JobRequest, JobSpec
from polypythia.runtime import raysetup
from polypythia.study import KIND_TAG, SWEEP_KIND
from polypythia.tracking import client as tracking
from polypythia.tracking import ui as mlflow_ui

log = logging.getLogger(__name__)
STOP = threading.Event()  # set by the launcher's SIGINT/SIGTERM handler (hydra_plugins/polypythia_launcher)

# Called once per study after the sweep's outcome is printed, with (tracking URI, study, parent
# run id); the launcher hands in the cross-seed summary of ``analysis``.
FinishedHook = Callable[[str, str, str], None]


def _validate_all(requests: list[JobRequest], launch_dir: str) -> list[JobConfig]:
    jobs = []
    for i, request in enumerate(requests):
        try:
            jobs.append(job_config(request.config, launch_dir))
            runfolder.check_relaunch(jobs[-1])  # the run's folder: not in use, same training config
        except ConfigError as exc:
            raise ConfigError(f"Job #{i}: {exc}") from None
    check_sweep_wide(
        jobs
    )  # launcher.address, tracking.uri, ...: one value for the whole sweep (polypythia.config.sweepwide)
    names = Counter((j.study, j.run_name) for j in jobs)
    repeated = [f"{study}/{name}" for (study, name), n in names.items() if n > 1]
    if repeated:
        raise ConfigError(
            f"The sweep has the same run more than once ({', '.join(repeated)}); each (model, seed) may "
            "appear only once (to train the same seeds again, add replicate=1,2,...: a run each)."
        )
    return jobs


class Sweep:
    """``Sweep(requests, launch_dir)`` validates every job; :meth:`prepare` sets up what they share;
    :meth:`run` runs them all and returns their outcomes in order."""

    def __init__(self, requests: list[JobRequest], launch_dir: str, on_finished: Optional[FinishedHook] = None):
        self.requests = requests
        self.jobs = _validate_all(requests, launch_dir)  # relative paths are relative to launch_dir
        self.launcher = self.jobs[0].launcher  # its sweep-wide keys only (address, progress): the same in every job
        self.on_finished = on_finished
        self.monitor = CrossSeedMonitor(plan_groups(self.jobs))  # each run's loss against its sibling seeds'
        self.actions = MonitorActions(self.jobs, self.monitor)  # monitor.action: stop or rewind a run that alerts
        self.retries_left: dict[int, int] = {}  # per job, once the driver has ended one of its attempts
        self.tracking_uri: str | None = None
        self.parent_runs: dict[str, str] = {}  # study -> the sweep's MLflow run in it
        self._started_ray = False
        self.placement_groups: dict[int, Any] = {}

    # -- setup shared by all jobs, before any starts ----------------------------------------

    def prepare(self) -> None:
        """Shared setup, leaving nothing behind when a check fails: the tracking server starts in a
        thread while the Ray runtime starts and its resources are checked; on any error Ray is shut
        down again, a server this call started is stopped, and a parent run made is closed."""
        raysetup.check_reachable(self.launcher.address)  # seconds: before anything starts or is written
        self._build_data_caches()
        links: list[str] = []  # the parent runs open in the server's thread, beside ray.init
        worker_env = ExitStack()  # set before the server's thread copies the environment, put back after
        worker_env.enter_context(raysetup.local_worker_env(self.launcher.address))
        server = TrackingStart(self.jobs[0].tracking, then=lambda uri: self._open_parent_runs(uri, links))
        try:
            self._init_ray()
            self._check_resources()
            self.tracking_uri = server.result()
            worker_env.close()  # Ray's processes and the server's have started with it
            print(f"MLflow tracking server: {self.tracking_uri}  (open it in a browser to see the runs)", flush=True)
            print("\n".join(links), flush=True)
            self._reserve_workers()
        except BaseException as exc:  # a parent run made already is closed (Ctrl-C: KILLED, interrupted)
            server.join()  # it may still be making one
            worker_env.close()
            interrupted = isinstance(exc, KeyboardInterrupt)
            self._close_parents(
                "KILLED" if interrupted else "FAILED", watchdog.INTERRUPTED if interrupted else str(exc)
            )
            self.shutdown()
            server.undo()
            raise

    def _build_data_caches(self) -> None:
        from polypythia.data.embedded import ensure_embedded_dataset

        for cache_dir, vocab in sorted(
            {(j.data.cache_dir, j.data.vocab_size) for j in self.jobs if j.data.kind == "embedded"}
        ):
            ensure_embedded_dataset(cache_dir, vocab)

    def _init_ray(self) -> None:
        self._started_ray = raysetup.init_ray(self.launcher.address) or self._started_ray

    def _check_resources(self) -> None:
        for launcher in {
            (j.launcher.num_cpus_per_job, j.launcher.num_gpus_per_job, j.launcher.workers_per_run): j.launcher
            for j in self.jobs
        }.values():  # each job's own resources (per-job keys)
            raysetup.check_resources(launcher)  # prepare() shuts Ray down again

    def _reserve_workers(self) -> None:
        self.placement_groups = raysetup.reserve_workers(self.jobs)

    def _open_parent_runs(self, uri: str, links: list[str]) -> None:
        """One parent run per study, and (into ``links``) the line with the link that opens the study's
        training runs in the MLflow UI."""
        self.tracking_uri = uri
        client = tracking.client(uri)
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        for study in sorted({j.study for j in self.jobs}):
            exp_id = tracking.experiment_id(client, study)
            links.extend(driverloss.close_dead_sweeps(client, exp_id))  # sweeps of the study whose driver died
            jobs = [j.run_name for j in self.jobs if j.study == study]
            run = client.create_run(
                exp_id,
                run_name=f"sweep-{stamp}",
                tags={KIND_TAG: SWEEP_KIND, "jobs": ", ".join(jobs), **driverloss.driver_tags()},
            )
            self.parent_runs[study] = run.info.run_id
            view = mlflow_ui.open_sweep_view(client, exp_id, run.info.run_id)  # loss charts first (tracking.ui)
            links.append(f"Study {study} in MLflow: {mlflow_ui.study_url(uri, exp_id, run.info.run_id, view_id=view)}")

    # -- running -----------------------------------------------------------------------------

    def job_spec(self, index: int) -> JobSpec:
        """Everything the worker running job ``index`` needs (once :meth:`prepare` has run)."""
        job, request = self.jobs[index], self.requests[index]
        return JobSpec(
            index=index,
            config=to_dict(job),
            tracking_uri=self.tracking_uri,
            parent_run_id=self.parent_runs[job.study],
            overrides=tuple(request.overrides),
            logging_config=request.logging_config,
            debug_loggers=tuple(request.debug_loggers),
            world_size=job.launcher.workers_per_run,
            num_cpus=job.launcher.num_cpus_per_job,
            num_gpus=job.launcher.num_gpus_per_job,
            rewind=self.actions.requests.get(index),
        )

    def _task_options(self, index: int) -> dict[str, Any]:
        job = self.jobs[index]
        extra = {}
        if index in self.placement_groups:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            extra["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.placement_groups[index], placement_group_bundle_index=0
            )
        return {
            **extra,
            "num_cpus": job.launcher.num_cpus_per_job,
            "num_gpus": job.launcher.num_gpus_per_job,
            # process deaths only (Python errors are final); shared with the stall watchdog's retries
            "max_retries": self.retries_left.get(index, job.launcher.max_retries),
            "retry_exceptions": False,
            "name": job.run_name,
        }

    def run(self) -> list[JobOutcome]:
        """Submit every job to :func:`polypythia.job.worker.run_job` and wait for all, showing progress;
        then close the parent runs, shut down what :meth:`prepare` started and print the outcome.

        Returns each job's outcome, in order.
        """
        import ray

        # max_calls=1: a fresh worker process per job, so no process group or CUDA state leaks.
        run_job = ray.remote(max_calls=1)(worker.run_job)
        outcomes: dict[int, JobOutcome] = {}
        rows: dict[int, dict] = {}
        pending: dict[Any, int] = {}
        interrupted = False
        try:
            board = (
                ray.remote(ProgressBoard)
                .options(num_cpus=0)
                .remote([j.run_name for j in self.jobs], self.monitor.plans())
            )
            watch = MonitorLog(self.monitor, tracking.client(self.tracking_uri), self.parent_runs, self.jobs)

            def submit(i: int) -> Any:
                return run_job.options(**self._task_options(i)).remote(
                    self.job_spec(i), board, self.placement_groups.get(i)
                )

            outcomes.update(self._skip_finished(board))  # a relaunch: runs that finished before are not trained again
            pending = {submit(i): i for i in range(len(self.jobs)) if i not in outcomes}
            heartbeat = driverloss.Heartbeat(watch.client, list(self.parent_runs.values()))  # polypythia.driver.orphans
            stalls: Counter = Counter()
            ended: Counter = Counter()  # attempts the driver ended (stalled, rewound)
            with ProgressDisplay(enabled=self.launcher.progress) as display:
                while pending and not STOP.is_set():  # STOP: a Ctrl-C or SIGTERM that a library call swallowed
                    done, _ = ray.wait(
                        list(pending), num_returns=len(pending), timeout=2.0
                    )  # 2 s: on 2 cores a busier driver slows the steps
                    for ref in done:
                        index = pending.pop(ref)
                        try:
                            outcomes[index] = ray.get(ref)
                        except Exception as exc:  # noqa: BLE001 - its process died more often than retries allow
                            outcomes[index] = JobOutcome(state="failed", error=exc, reason=last_line(exc))
                            board.update.remote(index, {"state": "failed"})
                    rows = ray.get(board.snapshot.remote())
                    for ref, index in list(pending.items()):  # the stall watchdog
                        if watchdog.stalled(rows[index], time.time(), self.jobs[index].launcher.stall_timeout_s):
                            del pending[ref]
                            ended[index] += 1
                            outcome = self._kill_stalled(index, ref, rows[index], stalls, ended, board)
                            if outcome is None:
                                pending[submit(index)] = index
                            else:
                                outcomes[index] = outcome
                    self.actions.restarted(rows)  # a rewound run's new attempt: the monitor forgets its abandoned steps
                    watch.watch(rows)
                    for ref, index, alert in self.actions.due(pending, outcomes):  # monitor.action: stop or rewind
                        what, outcome = self.actions.act(ref, index, alert, rows[index], board, watch)
                        if what == "stopped":
                            del pending[ref]
                            outcomes[index] = outcome
                        elif what == "resubmit":
                            pending.pop(ref, None)
                            outcomes.pop(index, None)
                            ended[index] += ref is not None
                            self._set_retries(index, rows[index], ended)
                            pending[submit(index)] = index
                    display.update(watch.marks(rows))
                    heartbeat.beat()
            if STOP.is_set():
                raise KeyboardInterrupt  # noqa: E701
            rows = ray.get(board.snapshot.remote())  # the jobs' last reports
            watch.watch({i: {**row, "state": outcomes[i].state} for i, row in rows.items()})
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the launcher turns it into one)
            interrupted = True
            for ref in pending:
                watchdog.cancel(ref)
            raise
        finally:
            self._finish(outcomes, interrupted)
        results = [replace(outcomes[i], attempts=rows.get(i, {}).get("attempt", 1) or 1) for i in range(len(self.jobs))]
        self._report(results)
        return results

    def _skip_finished(self, board: Any) -> dict[int, JobOutcome]:
        """Say what this launch does with each run that has been launched before (skipped, or resumed
        from which step, losing how many); the outcomes of those that finished before."""
        client, skipped = tracking.client(self.tracking_uri), {}
        for i, job in enumerate(self.jobs):
            plan = driverloss.plan(client, job)
            line = driverloss.describe(job.run_name, plan, job.budget.checkpoint_every_steps)
            if line:
                print(line, flush=True)
            if plan.state == "finished":
                driverloss.adopt(client, plan.run_id, self.parent_runs[job.study])
                board.update.remote(i, {"state": "finished", "step": job.budget.steps, "total": job.budget.steps})
                skipped[i] = JobOutcome(
                    state="finished",
                    summary={
                        "run_id": plan.run_id,
                        "run_name": job.run_name,
                        "final_loss": plan.final_loss,
                        "skipped": True,
                    },
                )
        return skipped

    def _set_retries(self, index: int, row: dict, ended: Counter) -> int:
        """Job ``index``'s failed attempts so far; its next attempt gets the rest of ``launcher.max_retries``."""
        failed = watchdog.failed_attempts(row, ended[index], self.actions.rewinds[index])
        self.retries_left[index] = max(0, self.jobs[index].launcher.max_retries - failed)
        return failed

    def _kill_stalled(
        self, index: int, ref: Any, row: dict, stalls: Counter, ended: Counter, board: Any
    ) -> Optional[JobOutcome]:
        """Kill job ``index``'s stalled process; None when it is to be retried, else its outcome."""
        job = self.jobs[index]
        timeout = job.launcher.stall_timeout_s
        watchdog.cancel(ref)
        stalls[index] += 1
        retry = self._set_retries(index, row, ended) <= job.launcher.max_retries
        what = "retrying it (it resumes from its checkpoint)" if retry else f"failed after {stalls[index]} stall(s)"
        tail = "\n    ".join(watchdog.last_lines(self.requests[index].logging_config, row))
        print(
            f"[watchdog] {job.run_name}: stalled (no progress for {timeout:g} s, last reported step {row.get('step', 0)}); "
            f"killed, {what}. Its last log lines:\n    {tail}",
            flush=True,
        )
        board.update.remote(index, {"state": watchdog.STALLED})
        if retry:
            return None
        return JobOutcome(
            state="failed", reason=f"stalled: no progress for {timeout:g} s (last reported step {row.get('step', 0)})"
        )

    def _finish(self, outcomes: dict[int, JobOutcome], interrupted: bool = False) -> None:
        client = tracking.client(self.tracking_uri)
        reasons: dict[str, dict[str, tuple[str, str]]] = {}  # per study: run name -> (status, failure_reason)
        for i, job in enumerate(self.jobs):
            if i not in outcomes or not outcomes[i].finished:
                reasons.setdefault(job.study, {})[job.run_name] = watchdog.closing(outcomes.get(i))
        for study, run_id in self.parent_runs.items():
            failed = any(i not in outcomes or not outcomes[i].ok for i, j in enumerate(self.jobs) if j.study == study)
            try:
                if (
                    study in reasons
                ):  # job runs left RUNNING: killed, stalled, stopped, or a process that died too often
                    watchdog.close_open_runs(client, run_id, reasons[study])
                if interrupted:
                    client.set_tag(run_id, "failure_reason", watchdog.INTERRUPTED)
                client.set_terminated(run_id, status="KILLED" if interrupted else "FAILED" if failed else "FINISHED")
            except Exception as exc:  # noqa: BLE001 - a dead server must not hide the jobs' outcome
                log.error("Could not close the sweep's MLflow run %s: %s", run_id, exc)
        self.shutdown()

    def _close_parents(self, status: str, reason: str) -> None:
        """End the parent runs made so far (a failed or interrupted :meth:`prepare`)."""
        client = tracking.client(self.tracking_uri) if self.parent_runs else None
        for run_id in self.parent_runs.values():
            try:
                client.set_tag(run_id, "failure_reason", reason[:5000])
                client.set_terminated(run_id, status=status)
            except Exception as exc:  # noqa: BLE001 - the error that stopped prepare() matters more
                log.error("Could not close the sweep's MLflow run %s: %s", run_id, exc)

    def _report(self, results: list[JobOutcome]) -> None:
        print("\nSweep outcome:", flush=True)
        for index, (job, outcome) in enumerate(zip(self.jobs, results)):
            retries = outcome.attempts - 1 - self.actions.rewinds[index]
            retried = f" (retried {retries}x)" if retries > 0 else ""
            alert = self.monitor.alerts.get(index)
            flagged = "" if alert is None else f"; cross-seed ALERT ({alert.describe()})"
            flagged += "".join(f"; {note}" for note in self.actions.notes.get(index, []) if outcome.state != STOPPED)
            if outcome.finished:
                summary = outcome.summary
                before = " (already finished before this launch)" if summary.get("skipped") else ""
                print(
                    f"  {job.run_name}: finished{retried}{before}, final loss {summary['final_loss']:.4f}, MLflow run {summary['run_id']}{flagged}"
                )
            else:
                print(f"  {job.run_name}: {outcome.state}{retried}: {outcome.reason or 'did not finish'}{flagged}")
        if self.on_finished is None:
            return
        for study, run_id in self.parent_runs.items():
            try:
                self.on_finished(self.tracking_uri, study, run_id)
            except Exception as exc:  # noqa: BLE001 - the summary must not fail a finished sweep
                log.error("Could not print the cross-seed summary: %s", exc)

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            from ray.util.placement_group import remove_placement_group

            for pg in self.placement_groups.values():
                remove_placement_group(pg)
        self.placement_groups = {}
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
