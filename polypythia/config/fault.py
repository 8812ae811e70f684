"""The ``train.fault`` section of a job's configuration: fault injection (:mod:`polypythia.train.faults`),
a section of :mod:`polypythia.config.schema` in a module of its own."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from polypythia.errors import ConfigError


@dataclass
class FaultConfig:
    """Fault injection, for testing how a study survives failures and how the stability monitor sees
    an instability (all off by default). Steps count optimizer steps from 1, as the logged metrics do."""

    nan_at_step: Optional[int] = None  # report a NaN loss at this step ...
    nan_seeds: Optional[list[int]] = None  # ... in jobs with these seeds (null: every job)
    kill_at_step: Optional[int] = None  # SIGKILL the job's process once, after this step ...
    kill_seeds: Optional[list[int]] = None  # ... in jobs with these seeds (null: every job) ...
    kill_ranks: Optional[list[int]] = None  # ... and these data-parallel ranks (null: every rank)
    lr_boost_at_step: Optional[int] = None  # multiply the learning rate of this optimizer step and every later one ...
    lr_boost: float = 10.0  # ... by this factor ...
    lr_boost_seeds: Optional[list[int]] = None  # ... in jobs with these seeds (null: every job)
    repeat_batch_at_step: Optional[int] = None  # train this step on a batch of one token repeated ...
    repeat_batch_steps: int = 1  # ... and as many steps from it as this ...
    repeat_batch_seeds: Optional[list[int]] = None  # ... in jobs with these seeds (null: every job)
    hang_at_step: Optional[int] = None  # sleep forever after this step (the stall watchdog's test) ...
    hang_seeds: Optional[list[int]] = None  # ... in jobs with these seeds (null: every job)
    kill_in_evaluation: bool = (
        False  # SIGKILL the job once, as soon as a checkpoint evaluation pass has done one checkpoint
    )

    def check(self) -> None:
        for key in ("nan_at_step", "kill_at_step", "lr_boost_at_step", "repeat_batch_at_step", "hang_at_step"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"train.fault.{key} must be a step of at least 1 (steps count from 1), got {value}.")
        if not (self.lr_boost > 0 and math.isfinite(self.lr_boost)):
            raise ConfigError(
                f"train.fault.lr_boost must be a positive factor on the learning rate, got {self.lr_boost}."
            )
        if self.repeat_batch_steps < 1:
            raise ConfigError(f"train.fault.repeat_batch_steps must be at least 1, got {self.repeat_batch_steps}.")
