"""Resume a checkpoint on a different number of workers, through DeepSpeed universal checkpoints.

ZeRO-1/2 split the optimizer state across the data-parallel ranks that wrote it, so a checkpoint
only loads as it is on as many workers. To resume on another count, the resume state is first
rewritten in DeepSpeed's *universal* layout, one folder per parameter holding its fp32 master
value and Adam moments, which any partitioning can read::

    <tag>/mp_rank_00_model_states.pt                  # LR schedule, step counters (copied)
    <tag>/zero/optimizer_state.pt                     # param groups, loss scaler, clipping
    <tag>/zero/<param name>/{fp32,exp_avg,exp_avg_sq,step}.pt

A ZeRO-1/2 checkpoint is converted by DeepSpeed's own ``ds_to_universal``; a ZeRO-0 one (what
a single fp32 worker writes) already holds the whole torch AdamW state, which :func:`to_universal`
rewrites per parameter. A ZeRO-1/2 engine loads the result with DeepSpeed's universal loader
(``checkpoint.load_universal``); a ZeRO-0 engine, which that loader does not serve, gets the
values set on its parameters and its torch optimizer by :func:`load`.

The files this module reads itself are read with ``torch.load(weights_only=True)`` (tensors, plain
values and the DeepSpeed classes a ZeRO optimizer state holds: no code runs); the state handed to
DeepSpeed's converter and loader was verified against its checkpoint's manifest first
(:func:`polypythia.train.checkpoint.verify`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import shutil
from argparse import Namespace
from pathlib import Path

import torch

from polypythia.errors import CheckpointError

log = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
# Parameter-group entries that belong to this process's optimizer, not to the training state.
IMPLEMENTATION_KEYS = {"params", "fused", "foreach", "capturable", "differentiable"}


def needs_conversion(saved_world: int, saved_stage: int, world: int, stage: int) -> bool:
    """Whether a checkpoint written by ``saved_world`` workers at ZeRO ``saved_stage`` must go
    through the universal layout to load on ``world`` workers at ZeRO ``stage`` (ZeRO-0 state is
    whole on every rank, so only partitioned state on either side needs it)."""
    return (saved_world, saved_stage) != (world, stage) and (saved_stage > 0 or stage > 0)


def to_universal(tag_dir: Path, out_tag_dir: Path, saved_stage: int, names: list[str]) -> None:
    """Write the universal form of the DeepSpeed state in ``tag_dir`` to ``out_tag_dir``.

    ``names`` are the model's parameter names in the order of the optimizer's parameter groups
    (what a ZeRO-0 torch optimizer's state dict numbers its parameters by).
    """
    shutil.rmtree(out_tag_dir, ignore_errors=True)
    out_tag_dir.parent.mkdir(parents=True, exist_ok=True)
    if saved_stage > 0:
        from deepspeed.checkpoint import ds_to_universal

        args = Namespace(
            input_folder=str(tag_dir),
            output_folder=str(out_tag_dir),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a banner per phase
            ds_to_universal.main(args)
    else:
        _zero0_to_universal(tag_dir, out_tag_dir, names)


def _load_data(path: Path, allowed: tuple = ()):
    """A torch file of tensors, plain values and the ``allowed`` classes, read without running code
    from it (``torch.load(weights_only=True)``)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds more than tensors and plain values, so it is not loaded (loading it could run code from it)."
        ) from None


def _zero_optimizer_classes() -> tuple:
    """What DeepSpeed's ZeRO optimizer state holds besides tensors and plain values (its loss scaler
    and its stage), kept in the ``optimizer_state.pt`` that ``ds_to_universal`` writes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return LossScaler, DynamicLossScaler, ZeroStageEnum


def _zero0_to_universal(tag_dir: Path, out: Path, names: list[str]) -> None:
    states = _load_data(tag_dir / MODEL_STATES)
    optim = states.get("optimizer")
    if not isinstance(optim, dict) or "state" not in optim or "param_groups" not in optim:
        raise CheckpointError(
            f"Checkpoint {tag_dir} was written at ZeRO stage 0 in fp16 or bf16, whose optimizer state cannot "
            "be repartitioned; resume it with the worker count and train.zero_stage it was written with."
        )
    if len(names) != sum(len(g["params"]) for g in optim["param_groups"]):
        raise CheckpointError(f"Checkpoint {tag_dir} has optimizer state for a different model; check model=.")
    zero = out / "zero"
    module = states["module"]
    for index, name in enumerate(names):
        folder = zero / name
        folder.mkdir(parents=True)
        torch.save({"param": module[name].float(), "cat_dim": 0}, folder / "fp32.pt")
        state = optim["state"].get(index)
        if state:  # a parameter that never had a gradient has no moments yet
            for key in ADAM_KEYS:
                torch.save({"param": state[key].float(), "cat_dim": 0}, folder / f"{key}.pt")
            torch.save(torch.as_tensor(state["step"], dtype=torch.float32), folder / "step.pt")
    import deepspeed

    # No loss scaler or clipping entries: the loading engine keeps those of its own configuration.
    torch.save(
        {
            "zero_stage": 0,
            "ds_version": states.get("ds_version") or deepspeed.__version__,
            "param_groups": optim["param_groups"],
        },
        zero / "optimizer_state.pt",
    )
    shutil.copy2(tag_dir / MODEL_STATES, out / MODEL_STATES)


def load(engine, load_dir: Path, tag: str) -> None:
    """Load the universal checkpoint ``load_dir/tag`` into ``engine``.

    A ZeRO-1/2 engine must have been built with ``checkpoint.load_universal``.
    """
    if engine.zero_optimization_stage() > 0:
        engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True)
    else:
        _load_zero0(engine, load_dir, tag)
    _fused_steps_on_device(engine)


def _load_zero0(engine, load_dir: Path, tag: str) -> None:
    optimizer = engine.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):  # DeepSpeed's fp16/bf16 wrapper: master weights
        raise CheckpointError(
            "A ZeRO stage 0 run in fp16 or bf16 cannot load a checkpoint written at ZeRO stage "
            "1/2; resume it with the train.zero_stage it was written with."
        )
    # ZeRO-0: module, LR schedule and step counters as usual, then fp32 values and Adam moments.
    engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True, load_optimizer_states=False)
    zero = load_dir / tag / "zero"
    saved_groups = _load_data(zero / "optimizer_state.pt", _zero_optimizer_classes())["param_groups"]
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):  # lr, betas, ...
        group.update({k: v for k, v in saved.items() if k not in IMPLEMENTATION_KEYS})
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            folder = zero / name
            param.copy_(_load_data(folder / "fp32.pt")["param"].view_as(param))
            if (folder / "exp_avg.pt").exists():
                optimizer.state[param] = {
                    "step": _load_data(folder / "step.pt").float().reshape(()),
                    **{key: _load_data(folder / f"{key}.pt")["param"].to(param).view_as(param) for key in ADAM_KEYS},
                }


def _fused_steps_on_device(engine) -> None:
    """A fused (GPU) AdamW keeps its step counts on the parameters' device; both loaders above
    leave them on the device the files were saved from."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    for group in getattr(inner, "param_groups", []):
        if group.get("fused") or group.get("capturable"):
            for param in group["params"]:
                state = inner.state.get(param)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(param.device)
