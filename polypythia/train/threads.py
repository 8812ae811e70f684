"""A job's torch threads are fixed when it starts, so that its numbers do not depend on its siblings.

A CPU kernel's result can depend on how many threads split its work (a reduction summed in another
order rounds differently), so a job whose thread count changed mid-run with the cores its siblings
left free (what this module did before) drifted from a rerun of the same config: a reference run
that moved from 1 to 2 threads at step 456 left its own rerun's losses from there. Run-to-run
nondeterminism alone can be as large as seed variance (Zhuang et al., "Randomness in neural network
training: characterizing the impact of tooling", MLSys 2022), and a tool that measures seed variance
must not add scheduling noise to it.

So the thread count is a function of the config alone: ``train.threads`` when set, else the CPUs the
job asks for (``launcher.num_cpus_per_job``, at least one), in a sweep (each job a Ray task) and in a
job run in the launching process alike, and it is never changed during the run. Free cores go to
jobs that start and to checkpoint evaluation (a Ray task of one CPU, :mod:`polypythia.evaluate.background`).
Each step logs the count it ran with as ``train/threads``.
"""

from __future__ import annotations

import logging
from typing import Any

from polypythia.train.callbacks import Callback, TrainStart

log = logging.getLogger(__name__)


def job_threads(cfg: Any) -> int:
    """The torch intra-op threads of the job of ``cfg`` (a JobConfig): configured, else its own CPUs."""
    if cfg.train.threads:
        return int(cfg.train.threads)
    return max(1, int(cfg.launcher.num_cpus_per_job))


def fix_threads(cfg: Any) -> int:
    """Set torch's intra-op threads for the whole run (before the model is built); returns the count."""
    import torch  # here, not at the top: the driver imports polypythia modules that need no torch

    threads = job_threads(cfg)
    torch.set_num_threads(threads)
    return threads


class ThreadsLog(Callback):
    """Logs each step's thread count as ``train/threads``, and says so if anything changed it mid-run."""

    priority = 10  # before the job's MLflow callback, which logs the step's metrics

    def __init__(self, threads: int):
        self.threads = threads

    def on_train_start(self, start: TrainStart) -> None:
        self.check()

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        metrics["train/threads"] = self.check()  # the threads this step ran with

    def check(self) -> int:
        import torch

        now = torch.get_num_threads()
        if now != self.threads:
            log.warning(
                "Torch threads changed from %d to %d during the run; its losses may not reproduce.", self.threads, now
            )
            self.threads = now
        return now


def threads_log(cfg: Any) -> list[Callback]:
    """``[ThreadsLog(...)]`` for the job of ``cfg``, its count the one :func:`fix_threads` set."""
    return [ThreadsLog(job_threads(cfg))]
