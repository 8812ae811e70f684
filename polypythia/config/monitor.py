"""The ``monitor`` section of a job's configuration: the live stability monitor and what is done on
an instability (a section of :mod:`polypythia.config.schema`, in a module of its own)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from polypythia.errors import ConfigError

ACTIONS = ("none", "stop", "rewind", "skip_step")
DRIVER_ACTIONS = ("stop", "rewind")  # taken by the sweep's driver on a cross-seed alert (polypythia.driver.actions)


@dataclass
class MonitorConfig:
    """The live stability monitor (:mod:`polypythia.train.monitor`): signals from inside sampled steps,
    logged as ``monitor/*`` metrics, and in-run spike detection on the loss and the gradient norm.

    The spike rule is OLMo-core's (``StabilityMonitorCallback``, ``SkipStepAdamW``): a value more
    than ``spike_threshold_sd`` SDs above the mean of the previous ``spike_window`` values.

    ``action``: ``stop`` and ``rewind`` act on a run's cross-seed alert (:mod:`polypythia.driver.actions`);
    ``skip_step`` acts inside the job, on every step: OLMo-core's ``SkipStepOptimizer`` rule skips the
    optimizer update of a step whose loss or gradient norm is more than ``skip_threshold_sd`` SDs above
    the mean of the previous ``skip_window`` values (:mod:`polypythia.train.skipstep`)."""

    every_steps: int = 10  # the in-step signals every this many optimizer steps (0: off)
    spikes: bool = True  # spike detection on train/loss and train/grad_norm, every step
    spike_window: int = 128  # OLMo-core StabilityMonitorCallback: window_size=128 ...
    spike_threshold_sd: float = 6.0  # ... threshold_std=6
    spike_min_values: Optional[int] = None  # previous values a verdict needs (null: the whole window)
    cross_seed: bool = True  # in a sweep, the driver compares each run's smoothed train/loss with its sibling seeds' (polypythia.stability)
    cross_seed_every_steps: Optional[int] = (
        None  # its decision steps: every this many steps (null: the checkpoint steps)
    )
    loss_window_steps: Optional[int] = None  # steps in the smoothed loss (null: 1% of budget.steps, at least 1)
    # none (alert only); on a run's cross-seed alert: stop, or rewind (as PaLM); in the job, every step: skip_step (OLMo-core)
    action: str = "none"
    skip_batches: Optional[int] = None  # batches a rewind skips (null: as many as steps rewound; 0: replay them)
    max_rewinds: int = 2  # rewinds per run; an alert after the last is an alert only
    skip_window: int = 128  # skip_step: previous values of the loss and of the gradient norm it compares with ...
    skip_threshold_sd: float = 6.0  # ... and how many SDs above their mean a skipped step's value lies

    def check(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(
                f"monitor.action must be none (alert only), stop, rewind or skip_step, got '{self.action}'."
            )
        if (self.skip_batches is not None and self.skip_batches < 0) or self.max_rewinds < 0:
            raise ConfigError("monitor.skip_batches (or null) and monitor.max_rewinds must be 0 or more.")
        if self.action in DRIVER_ACTIONS and not self.cross_seed:
            raise ConfigError(f"monitor.action={self.action} acts on cross-seed alerts; set monitor.cross_seed=true.")
        if self.every_steps < 0:
            raise ConfigError(
                f"monitor.every_steps must be 0 (off) or a positive number of steps, got {self.every_steps}."
            )
        if any(v is not None and v < 1 for v in (self.cross_seed_every_steps, self.loss_window_steps)):
            raise ConfigError(
                "monitor.cross_seed_every_steps and monitor.loss_window_steps must be at least 1 step, or null."
            )
        if self.spike_window < 2:
            raise ConfigError(f"monitor.spike_window must be at least 2 values, got {self.spike_window}.")
        if not (self.spike_threshold_sd > 0 and math.isfinite(self.spike_threshold_sd)):
            raise ConfigError(
                f"monitor.spike_threshold_sd must be a positive number of SDs, got {self.spike_threshold_sd}."
            )
        if self.spike_min_values is not None and not 2 <= self.spike_min_values <= self.spike_window:
            raise ConfigError(
                f"monitor.spike_min_values must lie between 2 and monitor.spike_window ({self.spike_window}), "
                f"got {self.spike_min_values}."
            )
        if self.skip_window < 4:
            raise ConfigError(
                f"monitor.skip_window must be at least 4 values (OLMo-core: 128), got {self.skip_window}."
            )
        if not (self.skip_threshold_sd > 0 and math.isfinite(self.skip_threshold_sd)):
            raise ConfigError(
                f"monitor.skip_threshold_sd must be a positive number of SDs (OLMo-core: 6), "
                f"got {self.skip_threshold_sd}."
            )
