"""The training guards, switched on by the job's config: the divergence check (``train.loss_ceiling``;
a non-finite loss always), the stability monitor (:mod:`polypythia.train.monitor`, ``monitor.*``) and
the skip-step action (:mod:`polypythia.train.skipstep`, ``monitor.action=skip_step``); beside them, the
faults ``train.fault`` injects to test them (:mod:`polypythia.train.faults`).

Their priorities place them around the callbacks a job is given: the monitor adds its signals before
the job's callbacks log them; the divergence check comes last, so the step is recorded before the
run stops.
"""

from __future__ import annotations

import math

from polypythia.config.jobconfig import JobConfig
from polypythia.errors import DivergenceError
from polypythia.train.callbacks import Callback
from polypythia.train.faults import fault_callbacks
from polypythia.train.monitor import StabilityMonitor
from polypythia.train.skipstep import SkipStep


class DivergenceCheck(Callback):
    """Stops the run (:class:`DivergenceError` carrying the step) at a non-finite loss, or when the
    loss stays above ``ceiling`` for ``patience`` consecutive steps."""

    priority = -200

    def __init__(self, ceiling: float | None, patience: int):
        self.ceiling = ceiling
        self.patience = patience
        self.above_ceiling = 0  # consecutive steps so far

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        loss = metrics["train/loss"]
        if not math.isfinite(loss):
            raise DivergenceError(
                f"Training diverged: the loss at step {step} is {loss}; the run was stopped and its checkpoints kept.",
                step,
            )
        ceiling = self.ceiling
        self.above_ceiling = self.above_ceiling + 1 if ceiling is not None and loss > ceiling else 0
        if self.above_ceiling and self.above_ceiling >= self.patience:
            raise DivergenceError(
                f"Training diverged: the loss stayed above train.loss_ceiling={ceiling} for "
                f"{self.above_ceiling} steps (to step {step}); the run was stopped and its checkpoints kept.",
                step,
            )


def callbacks_from_config(cfg: JobConfig) -> list[Callback]:
    """The job's own callbacks: the divergence check, the stability monitor, the skip-step action
    (``monitor.action=skip_step``), and the faults ``train.fault`` injects into this job."""
    callbacks: list[Callback] = [DivergenceCheck(cfg.train.loss_ceiling, cfg.train.loss_ceiling_steps)]
    if cfg.monitor.every_steps or cfg.monitor.spikes:
        callbacks.append(StabilityMonitor.from_config(cfg))
    if cfg.monitor.action == "skip_step":
        callbacks.append(SkipStep(cfg.monitor))
    return callbacks + fault_callbacks(cfg)
