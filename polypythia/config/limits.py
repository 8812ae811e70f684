"""Lower bounds of the duration and count settings whose small values have the right type but break
a sweep or its figures (issue #27, item 9): ``launcher.stall_timeout_s=0.001`` killed every job as
stalled. :func:`check_limits` (called by :meth:`polypythia.config.jobconfig.JobConfig.check`) refuses each in
one sentence naming the key, the bound and why, before anything starts.

The sections' own ``check()`` methods (:mod:`polypythia.config.schema`) keep their checks of sign and type;
the bounds here are the ones that follow from how the values are used elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from polypythia.errors import ConfigError

# Ray counts resources in units of 1/10,000 and refuses a finer fraction when the task is submitted
# (ray.remote: "The precision of the fractional quantity of resource num_cpus cannot go beyond 0.0001").
RAY_RESOURCE_UNIT = 1e-4


@dataclass(frozen=True)
class Bound:
    key: str  # the dotted key of a JobConfig
    least: float  # the smallest value allowed ...
    strict: bool = False  # ... or any value above it (strict)
    off: Optional[float] = None  # a value that turns the setting off, allowed besides the bound
    why: str = ""  # what a smaller value would do, for the error

    def problem(self, value: Any) -> str | None:
        if value is None or (self.off is not None and value == self.off):
            return None
        fine = math.isfinite(value) and (value > self.least if self.strict else value >= self.least)
        if fine:
            return None
        wanted = f"above {self.least:g}" if self.strict else f"at least {self.least:g}"
        off = f" (or {self.off:g} for off)" if self.off is not None else ""
        return f"{self.key} must be {wanted}{off}, got {value}: {self.why}"


BOUNDS = (
    Bound(
        "launcher.stall_timeout_s",
        5.0,
        off=0.0,
        why="a job reports its progress at most once a second and the driver looks every 2 s, so a shorter "
        "timeout kills healthy jobs as stalled; set it well above the longest step, checkpoint or start-up "
        "(default 600)",
    ),
    Bound(
        "tracking.flush_interval_s",
        0.1,
        why="the metrics sender wakes up this often, so a shorter interval keeps a CPU core busy; use the default 2.0",
    ),
    Bound(
        "data.vocab_size",
        258,
        why="the embedded tokenizer is byte-level: 256 byte tokens and 2 special tokens come first (default 8192)",
    ),
    Bound("train.threads", 1, why="torch needs at least one thread; set null for the CPUs Ray gave the job"),
    Bound("train.loss_ceiling_steps", 1, why="it counts consecutive steps above train.loss_ceiling (default 10)"),
    Bound("train.valid_max_rows", 1, why="the validation loss of no rows is undefined (default 64)"),
    Bound("train.eval_limit_items", 1, why="an evaluation of no items scores nothing; set null for every item"),
    Bound(
        "train.peak_tflops", 0.0, strict=True, why="train/mfu divides by it; set null to look it up from the GPU's name"
    ),
)


def _value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_limits(cfg: Any) -> None:
    """A one-sentence :class:`ConfigError` for the first setting of ``cfg`` (a JobConfig) outside its bound."""
    for bound in BOUNDS:
        problem = bound.problem(_value(cfg, bound.key))
        if problem:
            raise ConfigError(problem + ".")
    for key in ("launcher.num_cpus_per_job", "launcher.num_gpus_per_job"):
        value = _value(cfg, key)
        units = value / RAY_RESOURCE_UNIT
        if math.isfinite(units) and value > 0 and (units < 1 or abs(units - round(units)) > 1e-6):
            raise ConfigError(
                f"{key} must be a multiple of {RAY_RESOURCE_UNIT:g} (the finest fraction of a CPU "
                f"or GPU that Ray schedules), got {value}; e.g. 0.5 or 1."
            )
