"""The driver side of a sweep of training jobs on Ray: validation, shared set-up, submission, live
progress, outcome. The Hydra launcher (``hydra_plugins/polypythia_launcher``) composes one config per
job and hands them here as :class:`~polypythia.jobspec.JobRequest` values; this module knows nothing
of Hydra. :meth:`Sweep.run` turns each into a :class:`~polypythia.jobspec.JobSpec` (the config, the
tracking URI, the sweep's parent run, the worker count) and submits it to
:func:`polypythia.job.worker.run_job`, the code that runs inside the Ray worker; the jobs' outcomes come
back as :class:`~polypythia.jobspec.JobOutcome` values.
"""

from __future__ import annotations

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
from polypythia.driver import parentruns, report, watchdog
from polypythia.driver.actions import MonitorActions, Taken
from polypythia.driver.progress import ProgressBoard, ProgressDisplay
from polypythia.driver.seedband import SeedBandMonitor, plan_groups
from polypythia.driver.seedbandlog import MonitorLog
from polypythia.driver.trackingstart import TrackingStart
from polypythia.errors import ConfigError, last_line
from polypythia.job import worker
from polypythia.jobspec import JobOutcome, JobRequest, JobSpec, JobState
from polypythia.runtime import raysetup
from polypythia.tracking import client as tracking

POLL_S = 2.0  # the driver's poll: on 2 cores a busier driver slows the steps

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
    check_sweep_wide(jobs)  # launcher.address, tracking.uri, ...: one value for the whole sweep
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
    :meth:`run` runs them all and returns their outcomes in order: a loop of named steps at each poll
    (jobs that ended, the board's rows, stalled jobs, the seed band's alerts), as
    :func:`polypythia.train.loop.train` is a loop of steps."""

    def __init__(self, requests: list[JobRequest], launch_dir: str, on_finished: Optional[FinishedHook] = None):
        self.requests = requests
        self.jobs = _validate_all(requests, launch_dir)  # relative paths are relative to launch_dir
        self.launcher = self.jobs[0].launcher  # its sweep-wide keys only (address, progress): the same in every job
        self.on_finished = on_finished
        self.monitor = SeedBandMonitor(plan_groups(self.jobs))  # each run's loss against its sibling seeds' band
        self.actions = MonitorActions(self.jobs, self.monitor)  # monitor.action: stop or rewind a run that alerts
        self.retries_left: dict[int, int] = {}  # per job, once the driver has ended one of its attempts
        self.tracking_uri: str | None = None
        self.parent_runs: dict[str, str] = {}  # study -> the sweep's MLflow run in it
        self._started_ray = False
        self.placement_groups: dict[int, Any] = {}
        # what run() keeps from poll to poll
        self.pending: dict[Any, int] = {}  # Ray task -> job
        self.outcomes: dict[int, JobOutcome] = {}
        self.rows: dict[int, dict] = {}  # the progress board's, at the last poll
        self.stalls: Counter = Counter()  # per job
        self.ended: Counter = Counter()  # attempts the driver ended (stalled, rewound), per job
        self.board = self.watch = self.heartbeat = self._run_job = None  # made by _start_jobs

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
        self.tracking_uri = uri
        parentruns.open_parent_runs(tracking.client(uri), uri, self.jobs, self.parent_runs, links)

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

    def run(self, stop: Optional[threading.Event] = None) -> list[JobOutcome]:
        """Submit every job to :func:`polypythia.job.worker.run_job` and wait for all, showing progress;
        then close the parent runs, shut down what :meth:`prepare` started and print the outcome.
        ``stop``: set by a Ctrl-C or SIGTERM handler (the launcher's); the loop ends at its next poll, as
        on a KeyboardInterrupt, which a library call (Ray's, MLflow's) may have swallowed.

        Returns each job's outcome, in order.
        """
        stop = stop or threading.Event()
        interrupted = False
        try:
            self._start_jobs()
            with ProgressDisplay(enabled=self.launcher.progress) as display:
                while self.pending and not stop.is_set():
                    self._collect_ended()  # waits up to POLL_S for a job to end
                    self._read_board()
                    self._restart_stalled()
                    self._act_on_alerts()
                    display.update(self.watch.marks(self.rows))
                    self.heartbeat.beat()
            if stop.is_set():
                raise KeyboardInterrupt
            self._read_last_reports()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the launcher turns it into one)
            interrupted = True
            for ref in self.pending:
                watchdog.cancel(ref)
            raise
        finally:
            self._finish(self.outcomes, interrupted)
        results = [
            replace(self.outcomes[i], attempts=self.rows.get(i, {}).get("attempt", 1) or 1)
            for i in range(len(self.jobs))
        ]
        report.print_outcome(self.jobs, results, self.monitor.alerts, self.actions)
        if self.on_finished is not None:
            report.call_finished_hook(self.on_finished, self.tracking_uri, self.parent_runs)
        return results

    # -- the steps of a poll -----------------------------------------------------------------

    def _start_jobs(self) -> None:
        """The progress board, the seed-band log and the heartbeat; the outcome of each run that
        finished at an earlier launch (not trained again), and every other job submitted."""
        import ray

        # max_calls=1: a fresh worker process per job, so no process group or CUDA state leaks.
        self._run_job = ray.remote(max_calls=1)(worker.run_job)
        names = [j.run_name for j in self.jobs]
        self.board = ray.remote(ProgressBoard).options(num_cpus=0).remote(names, self.monitor.plans())
        client = tracking.client(self.tracking_uri)
        self.watch = MonitorLog(self.monitor, client, self.parent_runs, self.jobs)
        self.outcomes.update(driverloss.skip_finished(client, self.jobs, self.parent_runs, self.board))
        for index in range(len(self.jobs)):
            if index not in self.outcomes:
                self._submit(index)
        self.heartbeat = driverloss.Heartbeat(client, list(self.parent_runs.values()))  # polypythia.driver.orphans

    def _submit(self, index: int) -> None:
        ref = self._run_job.options(**self._task_options(index)).remote(
            self.job_spec(index), self.board, self.placement_groups.get(index)
        )
        self.pending[ref] = index

    def _collect_ended(self) -> None:
        """The outcomes of the jobs whose task ended (a task whose process died more often than its
        retries allow: failed)."""
        import ray

        pending = list(self.pending)
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
        for ref in done:
            index = self.pending.pop(ref)
            try:
                self.outcomes[index] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - its process died more often than retries allow
                self.outcomes[index] = JobOutcome(state=JobState.FAILED, error=exc, reason=last_line(exc))
                self.board.update.remote(index, {"state": JobState.FAILED})

    def _read_board(self) -> None:
        import ray

        self.rows = ray.get(self.board.snapshot.remote())

    def _restart_stalled(self) -> None:
        """The stall watchdog: a stalled job is killed, and submitted again or failed."""
        for ref, index in list(self.pending.items()):
            if watchdog.stalled(self.rows[index], time.time(), self.jobs[index].launcher.stall_timeout_s):
                del self.pending[ref]
                self.ended[index] += 1
                outcome = self._kill_stalled(index, ref, self.rows[index])
                if outcome is None:
                    self._submit(index)
                else:
                    self.outcomes[index] = outcome

    def _act_on_alerts(self) -> None:
        """The seed band: a rewound run's new attempt makes the monitor forget its abandoned steps; the
        monitor judges the new rows; ``monitor.action`` stops or rewinds a run that alerts."""
        self.actions.restarted(self.rows)
        self.watch.watch(self.rows)
        for ref, index, alert in self.actions.due(self.pending, self.outcomes):
            result = self.actions.act(ref, index, alert, self.rows[index], self.board, self.watch)
            if result.taken is Taken.STOPPED:
                del self.pending[ref]
                self.outcomes[index] = result.outcome
            elif result.taken is Taken.RESUBMIT:
                self.pending.pop(ref, None)
                self.outcomes.pop(index, None)
                self.ended[index] += ref is not None
                self._set_retries(index, self.rows[index])
                self._submit(index)

    def _read_last_reports(self) -> None:
        """The jobs' last reports, judged by the seed band with each job's final state."""
        self._read_board()
        self.watch.watch({i: {**row, "state": self.outcomes[i].state} for i, row in self.rows.items()})

    def _set_retries(self, index: int, row: dict) -> int:
        """Job ``index``'s failed attempts so far; its next attempt gets the rest of ``launcher.max_retries``."""
        failed = watchdog.failed_attempts(row, self.ended[index], self.actions.rewinds[index])
        self.retries_left[index] = max(0, self.jobs[index].launcher.max_retries - failed)
        return failed

    def _kill_stalled(self, index: int, ref: Any, row: dict) -> Optional[JobOutcome]:
        """Kill job ``index``'s stalled process; None when it is to be retried, else its outcome."""
        job = self.jobs[index]
        timeout = job.launcher.stall_timeout_s
        watchdog.cancel(ref)
        self.stalls[index] += 1
        retry, stalls = self._set_retries(index, row) <= job.launcher.max_retries, self.stalls[index]
        what = "retrying it (it resumes from its checkpoint)" if retry else f"failed after {stalls} stall(s)"
        tail = "\n    ".join(watchdog.last_lines(self.requests[index].logging_config, row))
        print(
            f"[watchdog] {job.run_name}: stalled (no progress for {timeout:g} s, last reported step {row.get('step', 0)}); "
            f"killed, {what}. Its last log lines:\n    {tail}",
            flush=True,
        )
        self.board.update.remote(index, {"state": JobState.STALLED})
        if retry:
            return None
        reason = f"{JobState.STALLED}: no progress for {timeout:g} s (last reported step {row.get('step', 0)})"
        return JobOutcome(state=JobState.FAILED, reason=reason)

    def _finish(self, outcomes: dict[int, JobOutcome], interrupted: bool = False) -> None:
        """Close the parent runs (and the job runs left open), then shut down what :meth:`prepare` started."""
        client = tracking.client(self.tracking_uri)
        parentruns.close_parent_runs(client, self.jobs, self.parent_runs, outcomes, interrupted)
        self.shutdown()

    def _close_parents(self, status: str, reason: str) -> None:
        """End the parent runs made so far (a failed or interrupted :meth:`prepare`)."""
        if self.parent_runs:
            parentruns.end_parent_runs(tracking.client(self.tracking_uri), self.parent_runs, status, reason)

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
