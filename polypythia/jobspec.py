"""The plain data that crosses between the sweep's driver and its Ray workers, one value per job.

Three frozen dataclasses, in the order a job meets them:

- :class:`JobRequest`: what the launcher asks for, one per job: the composed config and how it was
  asked for (made by the Hydra launcher, read by :class:`polypythia.driver.sweep.Sweep`);
- :class:`JobSpec`: everything the worker process needs to run that job (made by the sweep once the
  tracking server and the parent runs exist, read by :func:`polypythia.job.worker.run_job`);
- :class:`JobOutcome`: how the job ended (made by the worker, or by the sweep when the worker's
  process died too often or the seed-band monitor stopped it; read by the sweep's report and by
  the launcher).

A :class:`RewindRequest` rides in a :class:`JobSpec` when the sweep's seed-band monitor rolls a
run back (``monitor.action=rewind``, see :mod:`polypythia.driver.actions`).

A job's state (:class:`JobState`) is one of a few fixed strings, on the progress board's rows and in
a :class:`JobOutcome`.

Nothing here holds a live object (no Ray handle, no Hydra config), so each pickles to any process.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional


class JobState(str, Enum):
    """Where a job is: its progress-board row's ``state`` and its :attr:`JobOutcome.state`. A ``str``
    enum, so that a member equals, hashes, prints and pickles as its plain value (``"running"``): rows,
    logs and MLflow tags keep the strings they had."""

    PENDING = "pending"  # on the board, before its worker's first report
    RUNNING = "running"
    FINISHED = "finished"  # trained to its last step (or, on a relaunch, before it)
    FAILED = "failed"  # a Python error, a process that died too often, or too many stalls
    DIVERGED = "diverged"  # the loss left the finite numbers (polypythia.errors.DivergenceError)
    STOPPED = "stopped"  # ended by the seed-band monitor (monitor.action=stop): no failure of the sweep
    STALLED = "stalled"  # a board state: no progress for launcher.stall_timeout_s, killed by the watchdog
    REWINDING = "rewinding"  # a board state: killed, to start again from an earlier checkpoint

    __hash__ = str.__hash__  # as its value: "running" finds JobState.RUNNING in a set or dict

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# A job in these states reaches no further step (the seed band waits for it no longer).
ENDED_STATES = frozenset({JobState.FINISHED, JobState.FAILED, JobState.DIVERGED, JobState.STOPPED})


@dataclass(frozen=True)
class JobRequest:
    """One job as the launcher hands it to the sweep."""

    config: dict[str, Any]  # the job's composed config, interpolations resolved, without a ``hydra`` node
    overrides: tuple[str, ...] = ()  # the command-line overrides that produced it (logged with the run)
    logging_config: Optional[dict[str, Any]] = None  # the job's Python logging (``logging.config`` dict schema)
    debug_loggers: tuple[str, ...] = ()  # loggers to set to DEBUG in the job ("root" for all)


@dataclass(frozen=True)
class RewindRequest:
    """Roll the run back before its seed-band alert: to its newest checkpoint strictly before
    ``decision_step``, skipping the next ``skip_batches`` batches (None: as many as steps rewound).
    ``number`` counts the run's rewinds from 1; a request already recorded in the run folder is not
    applied again (see :mod:`polypythia.train.rewind`)."""

    number: int
    decision_step: int  # the step the alert was decided at
    skip_batches: Optional[int] = None
    reason: str = ""  # the alert, for the run's tag


@dataclass(frozen=True)
class JobSpec:
    """Everything the worker that runs job ``index`` of a sweep needs, and nothing else."""

    index: int  # the job's position in the sweep (its row in the progress table)
    config: dict[str, Any]  # the validated config (polypythia.config.jobconfig.to_dict), paths absolute
    tracking_uri: str  # the MLflow server every job of the sweep logs to
    parent_run_id: str  # the sweep's MLflow run of this job's study
    overrides: tuple[str, ...] = ()
    logging_config: Optional[dict[str, Any]] = None
    debug_loggers: tuple[str, ...] = ()
    world_size: int = 1  # data-parallel ranks (worker processes) of this job; rank 0 starts the others
    num_cpus: float = 1.0  # Ray resources of each of those processes
    num_gpus: float = 0.0
    rewind: Optional[RewindRequest] = None  # the run's latest rewind, applied before training starts


@dataclass(frozen=True)
class JobOutcome:
    """How one job ended."""

    state: JobState  # FINISHED, FAILED, DIVERGED or STOPPED
    summary: Optional[dict[str, Any]] = None  # polypythia.job.run.run's summary when finished: run_id, final_loss, ...
    error: Optional[BaseException] = None  # what ended it otherwise
    reason: str = ""  # that error in one line, for the sweep's report
    attempts: int = 1  # worker processes it took (more than one when Ray retried a dead one)

    @property
    def finished(self) -> bool:
        return self.state == JobState.FINISHED

    @property
    def ok(self) -> bool:
        """Whether the job ended as the sweep asked: trained to its end, or stopped by the seed-band
        monitor (``monitor.action=stop`` did what it was told: not a failure of the sweep)."""
        return self.state in (JobState.FINISHED, JobState.STOPPED)
