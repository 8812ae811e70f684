"""Cores follow the work: a sweep's training jobs share the CPU cores no other work is using.

Each job of a local sweep asks Ray for ``launcher.num_cpus_per_job`` CPUs and starts with that many
torch threads. When fewer jobs train than the machine has cores (the tail of a sweep, a sweep of one
job), the cores left over would idle. The driver, which polls the progress board anyway, calls
:func:`advise` with the board's rows and the CPUs Ray has free: each training job's fair share is
``floor((free + running * own) / running)`` threads, never fewer than its own CPUs and never more
than the machine's cores, written to ``<run_dir>/threads.json``. The job's :class:`CoreShare`
callback reads that file every few seconds and sets its intra-op threads (``torch.set_num_threads``).
A checkpoint-evaluation task (a Ray task of one CPU, :mod:`polypythia.evaluate.background`) takes a
free CPU like anything else, and the shares drop at the next poll. The training process makes no
Ray call for this (a task blocked in ``ray.get`` lends its CPU to Ray, which may start another task
on it meanwhile).

Only for a local sweep (``launcher.address`` null): the run folders are this machine's, and the
free CPUs are this machine's. Off when ``train.threads`` is set, for a job of several data-parallel
workers, and for GPU jobs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from polypythia.files import write_json_atomic
from polypythia.train.callbacks import Callback, TrainStart

log = logging.getLogger(__name__)

THREADS_FILE = "threads.json"


def fair_threads(own: int, free: float, running: int, cores: int) -> int:
    """Threads of one of ``running`` training jobs holding ``own`` CPUs each, with ``free`` CPUs idle."""
    running = max(1, running)
    share = int((max(0.0, free) + running * own) // running)
    return max(own, min(share, cores))


def follows_free_cores(cfg: Any) -> bool:
    """Whether the job of ``cfg`` (a JobConfig) takes its share of the free cores in a sweep."""
    launcher = cfg.launcher
    return not (cfg.train.threads or launcher.address or launcher.workers_per_run > 1 or launcher.num_gpus_per_job)


def own_cpus(cfg: Any) -> int:
    return max(1, int(cfg.launcher.num_cpus_per_job))


class Advisor:
    """The driver's side: writes each training job's share of the cores when it changes."""

    def __init__(self, jobs: list[Any], cores: Optional[int] = None):
        self.jobs = jobs
        self.cores = cores or os.cpu_count() or 1
        self.written: dict[int, int] = {}

    def advise(self, rows: dict[int, dict[str, Any]], free_cpus: float) -> None:
        """``rows``: the progress board's; ``free_cpus``: what Ray has free now."""
        training = [i for i, row in rows.items() if row.get("state") == "running" and not row.get("evaluating")]
        for i in training:
            job = self.jobs[i]
            if not follows_free_cores(job):
                continue
            threads = fair_threads(own_cpus(job), free_cpus, len(training), self.cores)
            if self.written.get(i) != threads:
                try:
                    write_json_atomic(Path(job.run_dir) / THREADS_FILE, {"threads": threads, "written": time.time()})
                    self.written[i] = threads
                except OSError as exc:  # a missed advice keeps the job's threads as they are
                    log.debug("Could not write %s's thread advice: %s", job.run_name, exc)


class CoreShare(Callback):
    """The job's side: sets its torch threads to the driver's advice, at the start and every
    ``every_s`` seconds; each step's thread count is logged as ``train/threads``."""

    priority = 10  # before the job's MLflow callback, which logs the step's metrics

    def __init__(self, run_dir: str, own: int, every_s: float = 3.0, cores: Optional[int] = None):
        self.path = Path(run_dir) / THREADS_FILE
        self.own = own
        self.every_s = every_s
        self.cores = cores or os.cpu_count() or 1
        import torch  # here, not at the top: the driver imports this module for the Advisor, and needs no torch

        self.threads = torch.get_num_threads()
        self.last = 0.0

    def on_train_start(self, start: TrainStart) -> None:
        try:
            self.path.unlink()  # an earlier attempt's advice: the driver writes anew for this one
        except OSError:
            pass
        self.adjust()

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        metrics["train/threads"] = self.threads  # the threads this step ran with
        if time.monotonic() - self.last >= self.every_s:
            self.adjust()

    def adjust(self) -> None:
        self.last = time.monotonic()
        try:
            advice = json.loads(self.path.read_text())
            threads = max(1, min(int(advice["threads"]), self.cores))
        except (OSError, ValueError, KeyError, TypeError):
            threads = self.own  # no advice (yet): the CPUs Ray gave the job
        if threads != self.threads:
            import torch

            log.info("Torch threads %d -> %d (the job's share of the free cores).", self.threads, threads)
            torch.set_num_threads(threads)
            self.threads = threads


def core_share(cfg: Any) -> list[Callback]:
    """``[CoreShare(...)]`` for a job of a local sweep (a Ray worker) where it applies, else ``[]``."""
    if not follows_free_cores(cfg):
        return []
    try:
        import ray
    except ImportError:
        return []
    if not ray.is_initialized():
        return []
    return [CoreShare(cfg.run_dir, own_cpus(cfg))]
