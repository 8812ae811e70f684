"""The training job: a Pythia model, its seeded data order and a DeepSpeed engine, step by step.

Nothing here knows about Ray, Hydra or MLflow. Side effects (metrics, progress, tracking of
checkpoints) go through :class:`Callback` hooks; the job that calls :func:`train` chooses them.
One process runs one data-parallel rank; ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
``MASTER_PORT`` in the environment say which (a single process gets defaults and a free port).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from polypythia.config import JobConfig
from polypythia.errors import CheckpointError, DivergenceError
from polypythia.model import build_model, padded_vocab_size
from polypythia.net import free_port
from polypythia.train import checkpoint as ckpt
from polypythia.train import universal
from polypythia.train.data import TrainingData, load_training_data
from polypythia.train.schedule import checkpoint_steps, lr_at

log = logging.getLogger(__name__)


class Callback:
    """Hooks into the training job; every method is optional."""

    def on_train_start(self, info: dict) -> None:
        """``info``: rank, world_size, start_step, vocab_size, zero_stage, num_params,
        checkpoint_steps and data (the job's :class:`TrainingData`)."""

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None: ...

    def before_checkpoint(self, step: int, model: torch.nn.Module) -> None:
        """Called on rank 0 before the checkpoint of ``step`` is sealed: evaluate, and make
        durable what the checkpoint stands for (callbacks run in list order)."""

    def on_checkpoint(self, step: int, path: str, model: torch.nn.Module) -> None: ...

    def on_train_end(self, result: "TrainResult") -> None: ...


@dataclass
class TrainResult:
    run_name: str
    steps: int
    start_step: int
    final_loss: float
    losses: list[float] = field(default_factory=list)  # of the steps this process ran
    checkpoints: list[str] = field(default_factory=list)


# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name fragment, for model FLOPs utilisation.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_length: int) -> float:
    """Training FLOPs per token: 6N for the matrix multiplies plus 12 L d T for attention (PaLM, app. B)."""
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_length


def peak_flops(configured_tflops: float | None) -> float | None:
    """The accelerator's peak FLOP/s: configured, or looked up from the GPU's name; None on CPU."""
    if configured_tflops:
        return configured_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


RENDEZVOUS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def set_rendezvous(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """Tell this process which rank it is and where rank 0 hosts the process group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                      MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))


def clear_rendezvous() -> None:
    """Forget a rendezvous this process inherited (a Ray worker gets its raylet's environment), so
    a single-rank job picks a free port of its own instead of one another job may hold."""
    for key in RENDEZVOUS_ENV:
        os.environ.pop(key, None)


def init_distributed() -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world_size).

    A launcher that runs several ranks sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; a process on its own gets rank 0 of 1 on a free loopback port (tried again
    with another port if someone else took it in between).
    """
    import deepspeed

    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "MASTER_PORT" in os.environ:
            torch.distributed.init_process_group(backend)
        else:
            _init_alone(backend)
    deepspeed.init_distributed(verbose=False)  # wraps the existing group
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _init_alone(backend: str, attempts: int = 5) -> None:
    for attempt in range(attempts):
        set_rendezvous(0, 1, "127.0.0.1", free_port())
        try:
            torch.distributed.init_process_group(backend)
            return
        except torch.distributed.DistNetworkError:
            if attempt == attempts - 1:
                raise
        except RuntimeError as exc:
            if "EADDRINUSE" not in str(exc) or attempt == attempts - 1:
                raise


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "fp16" if torch.cuda.is_available() else "fp32"
    return precision


def effective_zero_stage(cfg: JobConfig, world_size: int) -> int:
    """ZeRO partitions optimizer state across data-parallel ranks; with one fp32 rank there is
    nothing to partition and stage 1 only adds copies (about 15% of a 70m step on CPU), so use
    stage 0. Mixed precision keeps the configured stage: there DeepSpeed's ZeRO optimizer is
    what keeps the fp32 master weights, and what reads checkpoints from other worker counts."""
    if world_size == 1 and resolve_precision(cfg.train.precision) == "fp32":
        return 0
    return cfg.train.zero_stage


def deepspeed_config(cfg: JobConfig, world_size: int, load_universal: bool = False) -> dict:
    budget, train = cfg.budget, cfg.train
    micro_per_step = budget.global_batch_size // (budget.micro_batch_size * world_size)
    ds = {
        "train_batch_size": budget.global_batch_size,
        "train_micro_batch_size_per_gpu": budget.micro_batch_size,
        "gradient_accumulation_steps": micro_per_step,
        "gradient_clipping": train.gradient_clipping,
        "zero_optimization": {"stage": effective_zero_stage(cfg, world_size)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if load_universal:  # resuming a checkpoint written by another number of workers
        ds["checkpoint"] = {"load_universal": True}
    precision = resolve_precision(train.precision)
    if precision == "fp16":  # Pythia: fp16 with dynamic loss scaling
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1}
    elif precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """GPT-NeoX decays weight matrices only; biases and LayerNorm parameters are not decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_order(model: torch.nn.Module) -> list[str]:
    """Parameter names in the order :func:`param_groups` hands them to the optimizer."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in param_groups(model, 0.0) for p in group["params"]]


def build_engine(cfg: JobConfig, model: torch.nn.Module, world_size: int, load_universal: bool = False):
    import deepspeed

    train = cfg.train
    fused = torch.cuda.is_available()
    optimizer = torch.optim.AdamW(
        param_groups(model, train.weight_decay),
        lr=cfg.model.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        fused=fused,
    )
    peak = cfg.model.lr
    budget = cfg.budget
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_at(s, budget.steps, peak, budget.warmup_fraction, budget.min_lr_ratio) / peak,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(cfg, world_size, load_universal)
    )
    return engine


def set_threads(cfg: JobConfig) -> None:
    threads = cfg.train.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    if threads:
        torch.set_num_threads(threads)


def _check_divergence(cfg: JobConfig, step: int, loss: float, above_ceiling: int) -> int:
    if not math.isfinite(loss):
        raise DivergenceError(f"Training diverged: the loss at step {step} is {loss}; the run was stopped and its checkpoints kept.", step)
    ceiling = cfg.train.loss_ceiling
    above_ceiling = above_ceiling + 1 if ceiling is not None and loss > ceiling else 0
    if above_ceiling and above_ceiling >= cfg.train.loss_ceiling_steps:
        raise DivergenceError(
            f"Training diverged: the loss stayed above train.loss_ceiling={ceiling} for "
            f"{above_ceiling} steps (to step {step}); the run was stopped and its checkpoints kept.",
            step,
        )
    return above_ceiling


def train(cfg: JobConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; returns its losses and checkpoints."""
    set_threads(cfg)
    rank, world_size = init_distributed()
    data: TrainingData = load_training_data(cfg)
    vocab_size = cfg.model.vocab_size or padded_vocab_size(data.tokenizer_vocab_size)
    model = build_model(
        cfg.model.num_layers,
        cfg.model.hidden_size,
        cfg.model.num_heads,
        vocab_size,
        cfg.effective_weight_seed,
        cfg.model.max_positions,
        cfg.train.attn_implementation,
    )
    if cfg.train.activation_checkpointing:  # renamed in transformers 5
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    run_dir = Path(cfg.run_dir)
    plan = _resume_plan(cfg, run_dir, world_size)
    engine = build_engine(cfg, model, world_size, load_universal=plan.universal and plan.stage > 0)
    forward = torch.compile(engine.module) if cfg.train.compile else engine

    schedule = checkpoint_steps(cfg.budget.steps, cfg.budget.checkpoint_every_steps, cfg.budget.log_spaced_checkpoints)
    start_step, resumed_loss = _resume(engine, plan)
    info = {"rank": rank, "world_size": world_size, "start_step": start_step, "vocab_size": vocab_size,
            "zero_stage": plan.stage,
            "num_params": sum(p.numel() for p in model.parameters()), "checkpoint_steps": schedule,
            "data": data}
    for cb in callbacks:
        cb.on_train_start(info)

    result = TrainResult(cfg.run_name, cfg.budget.steps, start_step, resumed_loss)
    if start_step == 0 and 0 in schedule:
        _save(cfg, engine, data, 0, callbacks, result)
    micro = cfg.budget.micro_batch_size
    tokens_per_step = cfg.budget.global_batch_size * cfg.budget.seq_length
    peak = peak_flops(cfg.train.peak_tflops)
    flops_per_step = tokens_per_step * flops_per_token(
        info["num_params"], cfg.model.num_layers, cfg.model.hidden_size, cfg.budget.seq_length)
    device = engine.device
    above_ceiling = 0
    for step in range(start_step, cfg.budget.steps):
        started = time.perf_counter()
        rows = data.batch(step, rank, world_size)
        losses = []
        own_grad_norm = None
        for i in range(0, len(rows), micro):
            batch = torch.from_numpy(rows[i : i + micro]).to(device, non_blocking=True)
            logits = forward(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and not engine.zero_optimization_stage():
                own_grad_norm = _grad_norm(engine.module)  # DeepSpeed records it only under ZeRO
            engine.step()
            losses.append(loss.detach())
        loss_value = _global_mean(torch.stack(losses).mean(), world_size)
        done = step + 1  # optimizer steps taken; the loss is that of the batch before this update
        elapsed_s = time.perf_counter() - started
        metrics = {
            "train/loss": loss_value,
            "train/lr": lr_at(step, cfg.budget.steps, cfg.model.lr, cfg.budget.warmup_fraction, cfg.budget.min_lr_ratio),
            "train/grad_norm": _reported_grad_norm(engine, own_grad_norm),
            "train/tokens_per_s": tokens_per_step / elapsed_s,
        }
        if peak:  # model FLOPs utilisation of all workers together
            metrics["train/mfu"] = flops_per_step / elapsed_s / (peak * world_size)
        if done == cfg.train.fault.nan_at_step and _fault_applies(cfg, cfg.train.fault.nan_seeds):
            loss_value = metrics["train/loss"] = float("nan")
        result.losses.append(loss_value)
        for cb in callbacks:
            cb.on_step_end(done, metrics)
        _maybe_kill(cfg, done)
        above_ceiling = _check_divergence(cfg, done, loss_value, above_ceiling)
        if done in schedule:
            _save(cfg, engine, data, done, callbacks, result)
    if result.losses:
        result.final_loss = result.losses[-1]
    for cb in callbacks:
        cb.on_train_end(result)
    return result


@torch.no_grad()
def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all gradients (already averaged over ranks), before clipping."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _reported_grad_norm(engine, own: torch.Tensor | None) -> float:
    value = engine.get_global_grad_norm()
    if value is None:
        value = own
    return float(value) if value is not None else float("nan")


def _fault_applies(cfg: JobConfig, seeds: list[int] | None) -> bool:
    return seeds is None or cfg.seed in seeds


def _maybe_kill(cfg: JobConfig, step: int) -> None:
    """Fault injection: die like an out-of-memory kill, once per run (a marker file remembers)."""
    fault = cfg.train.fault
    if step != fault.kill_at_step or not _fault_applies(cfg, fault.kill_seeds):
        return
    rank = torch.distributed.get_rank()
    if fault.kill_ranks is not None and rank not in fault.kill_ranks:
        return
    marker = Path(cfg.run_dir) / f"fault-killed-at-step{step}-rank{rank}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("killed\n")
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _global_mean(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world_size
    return float(value)


@dataclass
class ResumePlan:
    checkpoint: ckpt.Checkpoint | None  # the newest valid checkpoint, if any
    state: dict  # its trainer state
    stage: int  # ZeRO stage of this run
    universal: bool  # written by another worker count or stage: load through the universal layout


def _resume_plan(cfg: JobConfig, run_dir: Path, world_size: int) -> ResumePlan:
    stage = effective_zero_stage(cfg, world_size)
    if torch.distributed.get_rank() == 0:
        ckpt.remove_conversions(run_dir)  # left by a resume that died half-way
    latest = ckpt.latest_valid_checkpoint(run_dir)
    if latest is None:
        return ResumePlan(None, {}, stage, False)
    state = ckpt.load_trainer_state(latest.path)
    saved_world, saved_stage = state.get("world_size", 1), state.get("zero_stage", 0)
    if not universal.needs_conversion(saved_world, saved_stage, world_size, stage):
        return ResumePlan(latest, state, stage, False)
    if state["step"] == 0:  # the initial weights, which this run builds identically from its seed
        return ResumePlan(None, {}, stage, False)
    precision = resolve_precision(cfg.train.precision)
    saved_precision = state.get("precision", "fp32")
    if (stage == 0 and precision != "fp32") or (saved_stage == 0 and saved_precision != "fp32"):
        raise CheckpointError(
            f"Checkpoint {latest.path} (ZeRO stage {saved_stage}, {saved_world} worker(s), {saved_precision}) cannot "
            f"resume at ZeRO stage {stage} on {world_size} worker(s) in {precision}: DeepSpeed's mixed-precision "
            "optimizer state at ZeRO stage 0 cannot be repartitioned; resume with the worker count and "
            "train.zero_stage it was written with."
        )
    if torch.distributed.get_rank() == 0:
        log.info("Checkpoint step %d was written by %d worker(s) at ZeRO stage %d; converting it for %d "
                 "worker(s) at ZeRO stage %d.", latest.step, saved_world, saved_stage, world_size, stage)
    return ResumePlan(latest, state, stage, True)


def _resume(engine, plan: ResumePlan) -> tuple[int, float]:
    """(step to continue from, loss of the last step before it) from the newest valid checkpoint."""
    latest, state = plan.checkpoint, plan.state
    if latest is None:
        return 0, float("nan")
    if plan.universal:
        _load_across_worker_counts(engine, latest, state)
    else:
        engine.load_checkpoint(str(latest.path / "state"), tag=ckpt.STATE_TAG, load_module_strict=True)
    ckpt.set_rng_state(state["rng"])
    log.info("Resuming %s from checkpoint step %d.", latest.path.parent.parent.name, latest.step)
    return int(state["step"]), float(state.get("loss", float("nan")))


def _load_across_worker_counts(engine, latest: ckpt.Checkpoint, state: dict) -> None:
    """Rank 0 rewrites the checkpoint's state in the universal layout next to it; every rank loads
    that, then it is removed (the checkpoint itself is left as it was).

    The other ranks wait for the conversion on a gloo group with a long timeout (converting a large
    model's state can outlast NCCL's collective timeout), and an error on rank 0 is raised on every
    rank instead of leaving them waiting.
    """
    import datetime

    rank = torch.distributed.get_rank()
    converted = ckpt.conversion_dir(latest.path)
    waiting = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
    outcome: list = [None]
    try:
        if rank == 0:
            try:
                universal.to_universal(latest.path / "state" / ckpt.STATE_TAG, converted / ckpt.STATE_TAG,
                                       state.get("zero_stage", 0), optimizer_order(engine.module))
            except Exception as exc:  # every rank raises it, below
                outcome[0] = f"{type(exc).__name__}: {exc}"
        torch.distributed.broadcast_object_list(outcome, src=0, group=waiting)
        if outcome[0] is not None:
            raise CheckpointError(f"Converting checkpoint {latest.path} for another number of workers failed: "
                                  f"{outcome[0]}")
        universal.load(engine, converted, ckpt.STATE_TAG)
        _barrier()
    finally:
        if rank == 0:
            shutil.rmtree(converted, ignore_errors=True)
        torch.distributed.destroy_process_group(waiting)


def _save(cfg: JobConfig, engine, data: TrainingData, step: int, callbacks, result: TrainResult) -> None:
    run_dir = Path(cfg.run_dir)
    rank = torch.distributed.get_rank()
    if rank == 0:
        ckpt.begin(run_dir, step)
    _barrier()
    directory = ckpt.partial_dir(run_dir, step)
    engine.save_checkpoint(str(directory / "state"), tag=ckpt.STATE_TAG)
    if rank == 0:
        engine.module.save_pretrained(directory, safe_serialization=True)
        data.save_tokenizer(directory)
        ckpt.save_trainer_state(directory, {"step": step, "weight_seed": cfg.effective_weight_seed,
                                            "data_seed": cfg.effective_data_seed,
                                            "world_size": torch.distributed.get_world_size(),
                                            "zero_stage": engine.zero_optimization_stage(),
                                            "precision": resolve_precision(cfg.train.precision),
                                            "loss": result.losses[-1] if result.losses else result.final_loss})
    _barrier()
    if rank == 0:
        for cb in callbacks:
            cb.before_checkpoint(step, engine.module)
        final = ckpt.commit(run_dir, step)
        ckpt.prune_resume_states(run_dir, cfg.train.keep_resume_states)
        result.checkpoints.append(str(final))
        for cb in callbacks:
            cb.on_checkpoint(step, str(final), engine.module)
    _barrier()


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
