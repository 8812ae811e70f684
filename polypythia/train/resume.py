"""Resuming a run from its newest valid checkpoint, on as many workers as wrote it or on another number.

Planning comes before the engine is built (whether the state goes through DeepSpeed's universal
layout changes the engine's config, see :mod:`polypythia.train.universal`); loading comes after.
A resume is exact: model, optimizer, LR schedule and RNG states continue where the checkpoint was
written, so the losses after it are those of a run that never stopped.

The checkpoint is verified against its manifest when it is chosen (:func:`plan_resume`), before
anything of it is read: DeepSpeed's loader unpickles ``state/`` in full, so it only ever gets files
that were sealed with the checkpoint (see :func:`polypythia.train.checkpoint.verify`).
"""

from __future__ import annotations

import datetime
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from polypythia.config.jobconfig import JobConfig
from polypythia.errors import CheckpointError
from polypythia.train import checkpoint as ckpt
from polypythia.train import trainerstate as trainer_state
from polypythia.train import universal
from polypythia.train.distributed import barrier
from polypythia.train.engine import effective_zero_stage, fp32_weights, optimizer_order, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class ResumePlan:
    checkpoint: ckpt.Checkpoint | None  # the newest valid checkpoint, if any
    state: dict  # its trainer state
    stage: int  # ZeRO stage of this run
    universal: bool  # written by another worker count or stage: load through the universal layout

    @property
    def load_universal(self) -> bool:
        """Whether DeepSpeed's own universal loader reads the state (it serves ZeRO-1/2 engines;
        a ZeRO-0 engine gets the values set by :func:`universal.load`)."""
        return self.universal and self.stage > 0


def plan_resume(cfg: JobConfig, world_size: int) -> ResumePlan:
    """What this start resumes from, and how; refuses, before any training, a state it cannot load."""
    run_dir = Path(cfg.run_dir)
    stage = effective_zero_stage(cfg, world_size)
    if torch.distributed.get_rank() == 0:
        ckpt.remove_conversions(run_dir)  # left by a resume that died half-way
    latest = ckpt.latest_valid_checkpoint(run_dir)
    if latest is None:
        return ResumePlan(None, {}, stage, False)
    state = trainer_state.load_trainer_state(latest.path)
    saved_world, saved_stage = state.get("world_size", 1), state.get("zero_stage", 0)
    # ZeRO-0 state on both sides loads as it is, unless one side's weights are DeepSpeed's bf16/fp16
    crosses = stage == saved_stage == 0 and _saved_fp32_weights(state) != fp32_weights(cfg, world_size)
    if not universal.needs_conversion(saved_world, saved_stage, world_size, stage) and not crosses:
        return ResumePlan(latest, state, stage, False)
    if state["step"] == 0:  # the initial weights, which this run builds identically from its seed
        return ResumePlan(None, {}, stage, False)
    _check_weights_crossing(cfg, world_size, latest, state)
    if torch.distributed.get_rank() == 0:
        log.info(
            "Checkpoint step %d was written by %d worker(s) at ZeRO stage %d; converting it for %d "
            "worker(s) at ZeRO stage %d.",
            latest.step,
            saved_world,
            saved_stage,
            world_size,
            stage,
        )
    return ResumePlan(latest, state, stage, True)


def _check_weights_crossing(cfg: JobConfig, world_size: int, latest: ckpt.Checkpoint, state: dict) -> None:
    """ZeRO-0 state converts across worker counts where it is torch AdamW's over fp32 weights (fp32, or
    ``train.autocast``); DeepSpeed's bf16/fp16 weights at ZeRO-0 keep a master copy it cannot repartition.
    A resume that crosses between ``train.autocast``'s fp32 weights and DeepSpeed's bf16/fp16 weights
    (one worker and several) is allowed, and logged: the run's numerics change there."""
    stage, saved_stage = effective_zero_stage(cfg, world_size), state.get("zero_stage", 0)
    saved_world, saved_precision = state.get("world_size", 1), state.get("precision", "fp32")
    precision = resolve_precision(cfg.train.precision)
    saved_fp32 = _saved_fp32_weights(state)
    if (stage == 0 and not fp32_weights(cfg, world_size)) or (saved_stage == 0 and not saved_fp32):
        raise CheckpointError(
            f"Checkpoint {latest.path} (ZeRO stage {saved_stage}, {saved_world} worker(s), {saved_precision}) cannot "
            f"resume at ZeRO stage {stage} on {world_size} worker(s) in {precision}: DeepSpeed's mixed-precision "
            "optimizer state at ZeRO stage 0 cannot be repartitioned; resume with the worker count, train.autocast and "
            "train.zero_stage it was written with."
        )
    if precision != "fp32" and saved_fp32 != fp32_weights(cfg, world_size) and torch.distributed.get_rank() == 0:
        log.warning(
            "Checkpoint step %d trained %s weights and this start trains %s ones (train.autocast applies to one "
            "worker only); the losses from here on follow the new numerics. Set train.autocast=false on both "
            "to keep DeepSpeed's %s weights throughout.",
            latest.step,
            "fp32" if saved_fp32 else saved_precision,
            "fp32" if fp32_weights(cfg, world_size) else precision,
            precision,
        )


def _saved_fp32_weights(state: dict) -> bool:
    """Whether the checkpoint's module weights are fp32 (checkpoints from before ``train.autocast``: fp32 runs)."""
    return state.get("fp32_weights", state.get("precision", "fp32") == "fp32")


def resume(engine, plan: ResumePlan) -> tuple[int, float]:
    """Load the planned checkpoint into ``engine``; returns (step to continue from, loss of the
    last step before it), or (0, NaN) for a fresh start."""
    latest, state = plan.checkpoint, plan.state
    if latest is None:
        return 0, float("nan")
    if plan.universal:
        _load_across_worker_counts(engine, latest, state)
    else:
        engine.load_checkpoint(str(latest.path / "state"), tag=ckpt.STATE_TAG, load_module_strict=True)
    trainer_state.set_rng_state(state["rng"])
    log.info("Resuming %s from checkpoint step %d.", latest.path.parent.parent.name, latest.step)
    return int(state["step"]), float(state.get("loss", float("nan")))


def _load_across_worker_counts(engine, latest: ckpt.Checkpoint, state: dict) -> None:
    """Rank 0 rewrites the checkpoint's state in the universal layout next to it; every rank loads
    that, then it is removed (the checkpoint itself is left as it was).

    The other ranks wait for the conversion on a gloo group with a long timeout (converting a large
    model's state can outlast NCCL's collective timeout), and an error on rank 0 is raised on every
    rank instead of leaving them waiting.
    """
    rank = torch.distributed.get_rank()
    converted = ckpt.conversion_dir(latest.path)
    waiting = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
    outcome: list = [None]
    try:
        if rank == 0:
            try:
                universal.to_universal(
                    latest.path / "state" / ckpt.STATE_TAG,
                    converted / ckpt.STATE_TAG,
                    state.get("zero_stage", 0),
                    optimizer_order(engine.module),
                )
            except Exception as exc:  # noqa: BLE001 - every rank raises it, below
                outcome[0] = f"{type(exc).__name__}: {exc}"
        torch.distributed.broadcast_object_list(outcome, src=0, group=waiting)
        if outcome[0] is not None:
            raise CheckpointError(
                f"Converting checkpoint {latest.path} for another number of workers failed: {outcome[0]}"
            )
        universal.load(engine, converted, ckpt.STATE_TAG)
        barrier()
    finally:
        if rank == 0:
            shutil.rmtree(converted, ignore_errors=True)
        torch.distributed.destroy_process_group(waiting)
