"""What runs inside a sweep's Ray worker processes: one job, built from its :class:`JobSpec`.

:func:`run_job` is the one function the sweep submits (``polypythia/driver/sweep.py``, one Ray task per job,
a fresh process each). It is rank 0 of the job: it sets up the job's logging, validates the config
it was given, takes ownership of the run's folder (:func:`polypythia.runfolder.claim`), starts the
job's other data-parallel ranks when it has several (:func:`run_other_rank`, each in its own Ray
task) and calls :func:`polypythia.job.run.run` with the tracking URI and parent run from the spec. It
returns a :class:`JobOutcome` instead of raising, so that a Python error in a job is final; only a
process that dies is retried by Ray (a dead process's ownership of the folder dies with it).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from polypythia.jobspec import JobOutcome, JobSpec, JobState

log = logging.getLogger(__name__)


def run_job(spec: JobSpec, progress_board: Any, placement_group: Any = None) -> JobOutcome:
    """Run job ``spec.index`` of a sweep in this process (rank 0 of it).

    ``progress_board`` is the sweep's :class:`~polypythia.driver.progress.ProgressBoard` actor; a job of
    several workers gets the Ray placement group reserved for it, one bundle per rank.
    """
    # When the task began (the run's task_started tag; bench_sweep.py's start-up), so before the imports
    # below: torch, DeepSpeed and transformers take seconds, and they are start-up too.
    task_started = time.time()
    from polypythia import runfolder
    from polypythia.config.jobconfig import job_config
    from polypythia.job import run as job
    from polypythia.runtime.env import quiet_libraries
    from polypythia.train.distributed import clear_rendezvous

    configure_logging(spec.logging_config, spec.debug_loggers)
    clear_rendezvous()  # whatever the worker inherited; several ranks get theirs set below
    try:  # before any other rank starts: a second launch of this run, or a changed config, stops here
        cfg = job_config(spec.config)
        owner = runfolder.claim(cfg.run_dir)
    except Exception as exc:  # noqa: BLE001 - the job's failure, reported by the sweep
        return _ended(spec, progress_board, failure_outcome(exc))

    def report_progress(update: dict) -> None:
        progress_board.update.remote(spec.index, update)

    report_progress({"state": JobState.RUNNING})  # before its first step (and the stall watchdog's clock restarts)

    with owner:  # job.run claims it again (claims nest); held until the other ranks are done too
        other_ranks = []
        try:
            runfolder.check_relaunch(cfg)
            if spec.rewind is not None:  # before any other rank looks for a checkpoint (polypythia.train.rewind)
                from polypythia.train.rewind import apply

                apply(cfg.run_dir, spec.rewind)
            other_ranks = start_other_ranks(spec, placement_group) if spec.world_size > 1 else []
            quiet_libraries()
            summary = job.run(
                cfg,
                tracking_uri=spec.tracking_uri,
                parent_run_id=spec.parent_run_id,
                overrides=spec.overrides,
                progress=report_progress,
                rewind=spec.rewind,
                task_started=task_started,
            )
            outcome = JobOutcome(state=JobState.FINISHED, summary=summary)
        except Exception as exc:  # noqa: BLE001 - the job's failure, reported by the sweep
            outcome = failure_outcome(exc)
        finally:
            job.teardown()
        outcome = join_other_ranks(other_ranks, outcome)
    return _ended(spec, progress_board, outcome)


def _ended(spec: JobSpec, progress_board: Any, outcome: JobOutcome) -> JobOutcome:
    progress_board.update.remote(spec.index, {"state": outcome.state})
    return outcome


def failure_outcome(exc: BaseException) -> JobOutcome:
    """The outcome of a job that raised ``exc``."""
    from polypythia.errors import DivergenceError

    state = JobState.DIVERGED if isinstance(exc, DivergenceError) else JobState.FAILED
    return JobOutcome(state=state, error=exc, reason=f"{type(exc).__name__}: {exc}")


def configure_logging(logging_config: dict | None, debug_loggers: tuple[str, ...]) -> None:
    """The job's Python logging, as the launcher asked (by default: to the console and to a log
    file in the job's Hydra folder). Applied by Hydra's own ``configure_log``, which vets the
    handlers and formatters a logging config names."""
    from hydra.core.utils import configure_log
    from omegaconf import OmegaConf

    configure_log(None if logging_config is None else OmegaConf.create(logging_config))
    for name in debug_loggers:
        logging.getLogger(name).setLevel(logging.DEBUG)


def start_other_ranks(spec: JobSpec, placement_group: Any) -> list:
    """Start ranks 1..N-1 in the job's placement group and point this process (rank 0) at the
    rendezvous, which it hosts on a free port. Returns the ranks' Ray object refs."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from polypythia.net import free_port
    from polypythia.train.distributed import set_rendezvous

    master_addr = ray.util.get_node_ip_address()
    master_port = free_port()
    refs = [
        ray.remote(max_calls=1)(run_other_rank)
        .options(
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
            max_retries=0,
            name=f"rank{rank}",
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=rank),
        )
        .remote(spec, rank, master_addr, master_port)
        for rank in range(1, spec.world_size)
    ]
    set_rendezvous(0, spec.world_size, master_addr, master_port)
    return refs


def run_other_rank(spec: JobSpec, rank: int, master_addr: str, master_port: int) -> list[float]:
    """A data-parallel rank other than 0: trains in step with rank 0, tracks nothing itself."""
    from polypythia.config.jobconfig import job_config
    from polypythia.runtime.env import quiet_libraries
    from polypythia.train.distributed import set_rendezvous
    from polypythia.train.loop import train

    set_rendezvous(rank, spec.world_size, master_addr, master_port)
    quiet_libraries()
    return train(job_config(spec.config)).losses


def join_other_ranks(refs: list, outcome: JobOutcome) -> JobOutcome:
    """Wait for the other ranks. If one's process died, this process dies too, so that Ray retries
    the whole job (it resumes from its checkpoint); any other failure of a rank fails the job."""
    import signal

    import ray
    from ray.exceptions import WorkerCrashedError

    for ref in refs:
        try:
            ray.get(ref)
        except WorkerCrashedError:
            log.error("A data-parallel rank of this run died; restarting the whole run from its checkpoint.")
            os.kill(os.getpid(), signal.SIGKILL)
        except Exception as exc:  # noqa: BLE001 - reported as the job's failure
            if outcome.finished:
                outcome = failure_outcome(exc)
    return outcome
