"""Loss and gradient-norm spikes as a run goes: a value far above the recent values.

The definition is OLMo-core's (https://github.com/allenai/OLMo-core): its
``StabilityMonitorCallback`` (``src/olmo_core/train/callbacks/stability_monitor.py``) calls a value
a spike when it exceeds the mean of the previous ``window_size=128`` values by more than
``threshold_std=6`` standard deviations (population SD, ddof 0; nothing is flagged until the window
is full, nor when its SD is below 1e-10), and ``SkipStepAdamW`` (``src/olmo_core/optim/
skip_step_optimizer.py``) skips an update on the same 6-sigma rule over the last 128 values
(with the sample SD, ddof 1, once 64 values exist: :mod:`polypythia.train.skipstep` uses this
detector with ``ddof=1``). The
offline analysis (``analysis/spikes.py``) applies a band of the same shape to the logged series
after the fact; :class:`SpikeDetector` is the online half, with no dependency beyond the standard
library, so the driver can run it on values it reads back as well. The window and the threshold
are the job's config (``monitor.spike_window``, ``monitor.skip_window``, ...: :mod:`polypythia.config.monitor`).
"""

from __future__ import annotations

import math
from collections import deque

MIN_SD = 1e-10  # a flatter window flags nothing (OLMo-core's guard against dividing by ~0)


class SpikeDetector:
    """Flags a value more than ``threshold_sd`` SDs above the mean of the ``window`` values before it.

    ``min_values`` (None: the whole window, as OLMo-core) is how many previous values a verdict
    needs; a smaller number lets short runs be checked early, on a shorter, noisier window.
    Non-finite values (a NaN loss, an fp16 overflow's infinite gradient norm) are neither flagged
    nor remembered: a NaN is the divergence check's business, and one would poison the window.
    ``ddof`` 0 is the population SD (``StabilityMonitorCallback``), 1 the sample SD (``torch.std_mean``,
    as ``SkipStepOptimizer``).
    """

    def __init__(
        self,
        window: int,
        threshold_sd: float,
        min_values: int | None = None,
        ddof: int = 0,
    ):
        if window < 2 or threshold_sd <= 0:
            raise ValueError(
                f"a spike window needs at least 2 values and a positive threshold, got {window} and {threshold_sd}"
            )
        self.window = window
        self.threshold_sd = threshold_sd
        self.min_values = window if min_values is None else min_values
        if not 2 <= self.min_values <= window:
            raise ValueError(f"min_values must lie in [2, window={window}], got {self.min_values}")
        self.ddof = ddof
        self.values: deque[float] = deque(maxlen=window)
        self.last_deviation: float | None = None  # of the latest finite value, spike or not
        self.mean = self.sd = float("nan")  # of the window the latest value was measured against ...
        self.count = 0  # ... and how many values it held

    def deviation(self, value: float) -> float | None:
        """``value``'s distance above the window's mean in window SDs, without adding it; None while
        the window is shorter than ``min_values`` or flatter than :data:`MIN_SD`."""
        n = len(self.values)
        if n < self.min_values:
            return None
        mean = math.fsum(self.values) / n
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in self.values) / (n - self.ddof))
        self.mean, self.sd, self.count = mean, sd, n
        if sd < MIN_SD:
            return None
        return (value - mean) / sd

    def update(self, value: float) -> float | None:
        """Add the next value; return its height in SDs if it is a spike, else None."""
        value = float(value)
        if not math.isfinite(value):
            return None
        deviation = self.deviation(value)
        self.values.append(value)
        self.last_deviation = deviation
        return deviation if deviation is not None and deviation > self.threshold_sd else None

    def state_dict(self) -> dict:
        """The window, as plain data (a checkpoint's trainer state keeps it)."""
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in state["values"][-self.window :])
