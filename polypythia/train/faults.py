"""Fault injection (``train.fault``), as callbacks: to test how a study survives failures (a NaN
loss at a step, a SIGKILL after a step, a hang) and how the stability monitor sees an instability
(a learning rate boosted from a step on, a batch of one repeated token). All off by default; the
training guards that catch what these faults cause are :mod:`polypythia.train.guards`.

Steps count optimizer steps from 1, as the logged metrics do: the fault of step ``S`` shows at
MLflow step ``S``. Their priorities place them around the callbacks a job is given: the NaN is
injected first, so tracking and progress see it as if training had produced it; the kill comes
last, so the step is recorded before the process dies.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from polypythia.config.jobconfig import JobConfig
from polypythia.train.callbacks import Callback, TrainStart


class InjectNaN(Callback):
    """Fault injection: reports the loss of ``step`` as NaN (the divergence check then stops the run)."""

    priority = 200

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            metrics["train/loss"] = float("nan")


class KillAtStep(Callback):
    """Fault injection: dies by SIGKILL after ``step``, like an out-of-memory kill, once per run
    and rank (a marker file in the run's folder remembers, so the retried job goes on)."""

    priority = -100

    def __init__(self, step: int, run_dir: str, ranks: list[int] | None):
        self.step = step
        self.run_dir = Path(run_dir)
        self.ranks = ranks  # None: every rank
        self.rank = 0

    def on_train_start(self, start: TrainStart) -> None:
        self.rank = start.rank

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step != self.step or (self.ranks is not None and self.rank not in self.ranks):
            return
        marker = self.run_dir / f"fault-killed-at-step{step}-rank{self.rank}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("killed\n")
        os.kill(os.getpid(), signal.SIGKILL)


class BoostLR(Callback):
    """Fault injection: multiplies the learning rate of optimizer step ``step`` and of every later
    one by ``factor`` (an instability on demand: Wortsman et al. 2023, "Small-scale proxies for
    large-scale Transformer training instabilities", https://arxiv.org/abs/2309.14322, reproduce
    large-model instabilities in small models by raising the learning rate).

    The schedule's own function is wrapped (the engine's ``LambdaLR`` recomputes every step's rate
    from it), so the boost holds through the schedule, and again after a resume from past ``step``;
    ``train/lr`` reports the boosted rate.
    """

    priority = 200

    def __init__(self, step: int, factor: float):
        self.step = step
        self.factor = factor

    def on_train_start(self, start: TrainStart) -> None:
        scheduler = start.engine.lr_scheduler
        first = self.step - 1  # the scheduler counts steps from 0
        scheduler.lr_lambdas = [_boosted(schedule, first, self.factor) for schedule in scheduler.lr_lambdas]
        for group, base_lr, schedule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)  # the rate of the next step, boosted if due

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self.step:
            metrics["train/lr"] *= self.factor


def _boosted(schedule, first: int, factor: float):
    """``schedule`` times ``factor`` from 0-based step ``first`` on (a plain function, which
    ``LambdaLR.state_dict`` leaves out of checkpoints, as it does the schedule's own lambda)."""

    def boosted(index: int) -> float:
        return schedule(index) * (factor if index >= first else 1.0)

    return boosted


class RepeatBatch(Callback):
    """Fault injection: optimizer steps ``step`` to ``step + steps - 1`` train on a batch whose every
    token is the first token of the rows (this rank's share of the batch) they replace (degenerate, repetitive data, a known trigger
    of loss spikes: PaLM, https://arxiv.org/abs/2204.02311 sec. 5.1)."""

    priority = 200

    def __init__(self, step: int, steps: int):
        self.steps = range(step, step + steps)

    def on_batch(self, step: int, rows: np.ndarray) -> np.ndarray:
        if step not in self.steps:
            return rows
        return np.full_like(rows, rows.flat[0])


class HangAtStep(Callback):
    """Fault injection: sleeps forever after ``step`` (in every attempt), a job that stops making
    progress without dying; the sweep's stall watchdog (``launcher.stall_timeout_s``) must kill it."""

    priority = -100

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        while step == self.step:
            time.sleep(3600)


def fault_callbacks(cfg: JobConfig) -> list[Callback]:
    """The faults ``train.fault`` injects into this job (by its seed); none by default."""
    fault = cfg.train.fault
    callbacks: list[Callback] = []
    if fault.nan_at_step is not None and _applies(cfg, fault.nan_seeds):
        callbacks.append(InjectNaN(fault.nan_at_step))
    if fault.kill_at_step is not None and _applies(cfg, fault.kill_seeds):
        callbacks.append(KillAtStep(fault.kill_at_step, cfg.run_dir, fault.kill_ranks))
    if fault.lr_boost_at_step is not None and _applies(cfg, fault.lr_boost_seeds):
        callbacks.append(BoostLR(fault.lr_boost_at_step, fault.lr_boost))
    if fault.repeat_batch_at_step is not None and _applies(cfg, fault.repeat_batch_seeds):
        callbacks.append(RepeatBatch(fault.repeat_batch_at_step, fault.repeat_batch_steps))
    if fault.hang_at_step is not None and _applies(cfg, fault.hang_seeds):
        callbacks.append(HangAtStep(fault.hang_at_step))
    return callbacks


def _applies(cfg: JobConfig, seeds: list[int] | None) -> bool:
    return seeds is None or cfg.seed in seeds
