"""How code outside the training loop takes part in it: the :class:`Callback` hooks and the events
they receive.

The loop itself has no side effects beyond training and checkpoints; tracking, progress reports,
evaluation at checkpoints, divergence detection and fault injection are callbacks. The shape
follows OLMo-core's trainer callbacks (https://github.com/allenai/OLMo-core,
``src/olmo_core/train/callbacks/callback.py``): every hook optional, and a class-level
``priority`` that orders callbacks, so that the job's own guards run after the callbacks that
record a step.

Two hooks reach inside a step: :meth:`Callback.on_batch` sees (and fault injection may replace)
the rows a step trains on, and :meth:`Callback.probe` hands the step a :class:`StepProbe`, which
``train_step`` calls around the forward pass and the optimizer update (the stability monitor's
gradient, update and attention signals).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, ContextManager, Iterable, Optional

import numpy as np

if TYPE_CHECKING:  # annotations only: the sweep's driver imports the callbacks and needs no torch
    import torch

    from polypythia.train.data import TrainingData


@dataclass(frozen=True)
class TrainStart:
    """What a job knows once it is set up, before its first step."""

    rank: int
    world_size: int
    start_step: int  # optimizer steps already taken (the step of the checkpoint resumed, or 0)
    vocab_size: int
    zero_stage: int  # the stage the engine runs (see engine.effective_zero_stage)
    num_params: int
    checkpoint_steps: tuple[int, ...]
    data: "TrainingData"  # the job's dataset, order and tokenizer, for callbacks that read it too
    # the DeepSpeed engine (its .module, .optimizer, .lr_scheduler), for callbacks that look inside
    # the training (the stability monitor) or change it (fault injection); read, never step it
    engine: Any = None
    # the trainer state of the checkpoint resumed from (empty on a fresh start): what callbacks kept
    # there through Callback.trainer_state
    trainer_state: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    run_name: str
    steps: int
    start_step: int
    final_loss: float
    losses: list[float] = field(default_factory=list)  # of the steps this process ran
    checkpoints: list[str] = field(default_factory=list)  # on rank 0: the checkpoints it wrote
    # the spikes the stability monitor flagged in this process's steps (see polypythia.train.monitor.Spike)
    spikes: list[dict] = field(default_factory=list)


class StepProbe:
    """A look inside one optimizer step, handed to ``train_step`` by :meth:`Callback.probe`.

    ``train_step`` calls, in order: :meth:`watch` around the forward pass of the step's first
    micro-batch (forward hooks go in and come out there), :meth:`before_update` once the whole
    batch's gradients are reduced and before the optimizer step, :meth:`after_update` after it.
    A probe only reads: the step trains exactly as it would without it.
    """

    def watch(self, module: torch.nn.Module) -> ContextManager:
        return nullcontext()

    def before_update(self, engine) -> None: ...

    def after_update(self, engine) -> None: ...


class Callback:
    """Hooks into the training job; every method is optional.

    Callbacks run in order of ``priority``, higher first; callbacks of equal priority run in the
    order they were given (the job's own callbacks are all 0).
    """

    priority: ClassVar[int] = 0

    def on_train_start(self, start: TrainStart) -> None: ...

    def on_batch(self, step: int, rows: np.ndarray) -> np.ndarray:
        """The rows this rank trains on in optimizer step ``step`` (1-based, as in
        :meth:`on_step_end`); return them, or (fault injection) others of the same shape."""
        return rows

    def probe(self, step: int) -> Optional[StepProbe]:
        """A :class:`StepProbe` to run inside optimizer step ``step`` (1-based), or None."""
        return None

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """After optimizer step ``step`` (1-based). A callback may change ``metrics`` in place:
        callbacks after it, and the loss the job records, see the change."""

    def before_checkpoint(self, step: int, model: torch.nn.Module) -> None:
        """Called on rank 0 before the checkpoint of ``step`` is sealed: evaluate, and make
        durable what the checkpoint stands for."""

    def on_checkpoint(self, step: int, path: str, model: torch.nn.Module) -> None: ...

    def trainer_state(self) -> dict:
        """Plain (JSON) values to keep in each checkpoint's trainer state, under keys of the callback's
        own; a resume hands them back in :attr:`TrainStart.trainer_state`."""
        return {}

    def on_train_end(self, result: TrainResult) -> None: ...


def in_order(callbacks: Iterable[Callback]) -> list[Callback]:
    """``callbacks`` by priority, higher first; a stable sort, so equal priorities keep their order."""
    return sorted(callbacks, key=lambda cb: -cb.priority)
