"""``monitor.action=skip_step``: skip the optimizer update of a step whose loss or gradient norm spikes.

The rule is OLMo-core's ``SkipStepOptimizer`` (https://github.com/allenai/OLMo-core,
``src/olmo_core/optim/skip_step_optimizer.py``, ``get_step_factor``): it keeps the losses and the
gradient norms of the last ``rolling_interval_length=128`` steps; while fewer than
``max(2, 128 // 2) = 64`` values (the current one included) exist, every step proceeds; then the
step proceeds only if ``value - mean <= sigma_factor * std`` (``sigma_factor=6``) for the loss and
for the gradient norm, mean and std (``torch.std_mean``: sample SD, ddof 1) over the window without
the current value. A skipped step's values still enter the window. The test is one-sided: a loss
far *below* the recent ones is no reason to skip. ``SkipStepAdamW`` multiplies weight decay, both
moment updates, the parameter update and Adam's step count by the step factor, so a skipped step
changes nothing of the optimizer; here the wrapped torch AdamW's ``step`` is simply not run.
The loss is the cross-entropy (OLMo-core sets ``latest_loss = ce_batch_loss``, without its z-loss);
the gradient norm is the total norm before clipping.

The windows are :class:`~polypythia.train.spikes.SpikeDetector` (the monitor's spike rule) with
``ddof=1`` and ``min_values = 63`` previous values. Two things differ from OLMo-core, on purpose:
a non-finite value (a NaN loss, an fp16 overflow's infinite gradient norm) neither skips nor enters
the window (the divergence check stops a NaN loss, DeepSpeed's loss scaler skips an overflow itself;
in OLMo-core one NaN in the window would skip every later step), and a window flatter than
:data:`~polypythia.train.spikes.MIN_SD` skips nothing.

How it reaches inside DeepSpeed's step: ``train_step`` hands :meth:`SkipStep.before_update` the
step's loss (averaged over ranks) and the gradient norm where it measured one itself (fp32 at ZeRO
stage 0 without clipping, :func:`polypythia.train.lighten.records_grad_norm`); DeepSpeed then calls the
optimizer's ``step``, :class:`SkipStepAdamW`, which asks :meth:`SkipStep.should_skip`. Otherwise the
gradient norm is the one computed for this step just before the torch optimizer runs: by DeepSpeed's
ZeRO 1/2 or bf16/fp16 optimizer (its ``_global_grad_norm``, once per parameter group at ZeRO 1/2: the
decision is taken at the first call), or by the engine's fp32 clipping (``lighten._clip_fp32``). The
learning-rate schedule goes on counting a skipped step, as in OLMo-core (its scheduler follows the
trainer's step). The windows are in every checkpoint's trainer state, so a resumed run skips exactly
as one that never stopped.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from polypythia.config.monitor import MonitorConfig
from polypythia.train.callbacks import Callback, TrainStart
from polypythia.train.spikes import SpikeDetector

log = logging.getLogger(__name__)

STATE_KEY = "skip_step"  # its entry in a checkpoint's trainer state
METRIC = "train/skipped_step"  # 1 on a skipped step, 0 otherwise


def min_previous_values(window: int) -> int:
    """Previous values a verdict needs: OLMo-core proceeds while ``len(values) < max(2, window // 2)``,
    the current value counted (63 previous of a 128 window); at least 2, for a sample SD."""
    return max(2, max(2, window // 2) - 1)


class SkipStepRule:
    """OLMo-core's skip decision on the loss and the gradient norm (see the module docstring)."""

    def __init__(self, window: int, threshold_sd: float):
        minimum = min_previous_values(window)
        self.loss = SpikeDetector(window, threshold_sd, minimum, ddof=1)
        self.grad_norm = SpikeDetector(window, threshold_sd, minimum, ddof=1)
        self.last_heights: tuple[Optional[float], Optional[float]] = (None, None)

    def decide(self, loss: float, grad_norm: float) -> bool:
        """Whether the step with these values skips its update; both values enter the windows."""
        heights = (self.loss.update(loss), self.grad_norm.update(grad_norm))
        self.last_heights = heights
        return any(h is not None for h in heights)

    def state_dict(self) -> dict:
        return {"loss": self.loss.state_dict(), "grad_norm": self.grad_norm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        self.grad_norm.load_state_dict(state["grad_norm"])


class SkipStepAdamW(torch.optim.AdamW):
    """torch's AdamW whose ``step`` does nothing when its :class:`SkipStep` gate says so: no weight
    decay, no moment update, no parameter update, Adam's step count unchanged."""

    gate: Optional["SkipStep"] = None  # set by SkipStep.on_train_start

    def step(self, closure=None):
        if self.gate is not None and self.gate.should_skip():
            return None
        return super().step(closure)


class SkipStep(Callback):
    """The skip-step action: decides each update (through :class:`SkipStepAdamW`), logs
    ``train/skipped_step``, and keeps its windows in the checkpoints' trainer state."""

    priority = 150  # before the job's own callbacks, so that they log train/skipped_step

    def __init__(self, monitor: MonitorConfig):
        """``monitor.skip_window`` and ``monitor.skip_threshold_sd`` set the rule."""
        self.rule = SkipStepRule(monitor.skip_window, monitor.skip_threshold_sd)
        self.rank = 0
        self.skipped_steps: list[int] = []  # of this process's steps
        self._values: Optional[tuple[float, Optional[float]]] = None
        self._grad_norm_source = None
        self._decision: Optional[bool] = None

    def on_train_start(self, start: TrainStart) -> None:
        self.rank = start.rank
        engine = start.engine
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's wrapper, if any, holds ours
        if not isinstance(inner, SkipStepAdamW):
            raise TypeError("monitor.action=skip_step needs the engine built with SkipStepAdamW (train/engine.py)")
        inner.gate = self
        # where the caller did not measure the norm, the object that holds this step's norm when our
        # AdamW's step runs: DeepSpeed's ZeRO/bf16/fp16 wrapper, or the engine itself, whose fp32
        # clipping (train/lighten.py) records the norm just before the optimizer's step
        self._grad_norm_source = engine.optimizer if engine.optimizer is not inner else engine
        if STATE_KEY in start.trainer_state:
            self.rule.load_state_dict(start.trainer_state[STATE_KEY])

    def before_update(self, loss: float, grad_norm: Optional[float]) -> None:
        """The step's loss (mean over ranks) and, where the caller measured it, its gradient norm."""
        self._values, self._decision = (loss, grad_norm), None

    def should_skip(self) -> bool:
        """Asked by the optimizer inside DeepSpeed's step; decided once per step."""
        if self._decision is None:
            loss, grad_norm = self._values if self._values is not None else (float("nan"), None)
            if grad_norm is None:  # DeepSpeed's (or the fp32 clipping's) norm of this step, before clipping
                reported = getattr(self._grad_norm_source, "_global_grad_norm", None)
                grad_norm = float("nan") if reported is None else float(reported)
            self._decision = self.rule.decide(loss, grad_norm)
        return self._decision

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        skipped = bool(self._decision)  # None: DeepSpeed skipped the optimizer itself (fp16 overflow)
        self._values, self._decision = None, None
        metrics[METRIC] = float(skipped)
        if not skipped:
            return
        self.skipped_steps.append(step)
        if self.rank == 0:
            loss_h, grad_h = self.rule.last_heights
            log.warning(
                "Skipped the update of step %d (monitor.action=skip_step): %s.",
                step,
                "; ".join(
                    f"{name} {h:.1f} SDs above the mean of the previous values"
                    for name, h in (("loss", loss_h), ("gradient norm", grad_h))
                    if h is not None and math.isfinite(h)
                ),
            )

    def trainer_state(self) -> dict:
        return {STATE_KEY: self.rule.state_dict()}
