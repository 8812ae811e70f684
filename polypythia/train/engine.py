"""The model, optimizer and DeepSpeed engine of a training job, built from its config.

Pythia's recipe (GPT-NeoX): AdamW with weight decay on the weight matrices only, the LR schedule
of :mod:`polypythia.train.schedule`, gradient clipping, and fp16 with dynamic loss scaling on a
GPU. DeepSpeed (https://www.deepspeed.ai/docs/config-json/) runs the data parallelism, the ZeRO
partitioning of optimizer state, mixed precision and the engine's checkpoints.
"""

from __future__ import annotations

import torch

from polypythia.config.jobconfig import FP16_ZERO0_REFUSED, JobConfig
from polypythia.errors import ConfigError
from polypythia.train.lighten import DeepSpeedLossScaling, lighten_step
from polypythia.train.schedule import lr_at
from polypythia.train.skipstep import SkipStepAdamW


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "fp16" if torch.cuda.is_available() else "fp32"
    return precision


FP16_SCALING = {"loss_scale": 0, "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1}  # Pythia's
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(cfg: JobConfig, world_size: int) -> torch.dtype | None:
    """The compute dtype of ``train.autocast``, or None where DeepSpeed's bf16/fp16 weights train.

    One worker in bf16 or fp16 (``train.autocast``, the default) trains fp32 weights at ZeRO stage 0 with
    DeepSpeed's ``torch_autocast`` section: the forward pass under ``torch.autocast``, torch's fused
    AdamW on the parameters themselves, and under fp16 DeepSpeed's own dynamic loss scaler
    (:class:`polypythia.train.lighten.DeepSpeedLossScaling`: Pythia's initial scale 2**12, window 1000,
    hysteresis 2, minimum 1). It is the plain PyTorch AMP loop, where DeepSpeed's bf16/fp16 weights
    at ZeRO-1 flatten, copy and cast every tensor around the optimizer even on one rank
    (``benchmarks/bench_host_overhead.py`` on CPU, 70m/160m layer structures, 2026-12-07: aten ops per
    step against the plain loop 1.44-1.48 at ZeRO-1, 1.00 here; ``benchmarks/host_overhead.md``).

    Memory per parameter: 16 bytes (fp32 weight and gradient, two Adam moments) plus autocast's bf16/fp16
    copies of the matrices (2) from the forward to the backward pass; ZeRO-1 on one rank holds 16 (bf16/fp16
    weight and gradient, fp32 master, two moments) plus an fp32 copy of the gradients (4) in the step. A
    checkpoint is as large either way (fp32 weights and moments, 12 bytes, plus ``model.safetensors`` in fp32,
    4; against bf16/fp16 weights, fp32 master and moments, 14, plus 2). The numerics are autocast's (fp32
    weights, layer norms and softmax in fp32), not GPT-NeoX's fp16 weights: ``train.autocast=false`` keeps
    those, on any number of workers. Several workers or ZeRO-2 take DeepSpeed's path either way; a run resumed
    on another worker count crosses between the two (:mod:`polypythia.train.resume` says so in its log)."""
    precision = resolve_precision(cfg.train.precision)
    if cfg.train.autocast and world_size == 1 and precision in AUTOCAST_DTYPES and cfg.train.zero_stage < 2:
        return AUTOCAST_DTYPES[precision]
    return None


def fp32_weights(cfg: JobConfig, world_size: int) -> bool:
    """Whether the module's weights are fp32 (fp32 training, or ``train.autocast``): at ZeRO stage 0 its
    optimizer state is then torch AdamW's over those weights, which any worker count can load."""
    return resolve_precision(cfg.train.precision) == "fp32" or autocast_dtype(cfg, world_size) is not None


def effective_zero_stage(cfg: JobConfig, world_size: int) -> int:
    """ZeRO partitions optimizer state across data-parallel ranks; with one rank of fp32 weights (fp32, or
    ``train.autocast``) there is nothing to partition and stage 1 only adds copies (about 15% of a 70m
    step on CPU), so use stage 0. DeepSpeed's bf16/fp16 weights keep the configured stage: there its ZeRO
    optimizer is what keeps the fp32 master weights, and what reads checkpoints from other worker counts.
    fp16 at stage 0 is refused (:data:`polypythia.config.jobconfig.FP16_ZERO0_REFUSED`)."""
    precision = resolve_precision(cfg.train.precision)
    if world_size == 1 and fp32_weights(cfg, world_size):
        return 0
    if precision == "fp16" and cfg.train.zero_stage == 0:  # "auto" on a GPU the launcher did not ask for
        raise ConfigError(FP16_ZERO0_REFUSED)
    return cfg.train.zero_stage


def zero_config(stage: int) -> dict:
    """ZeRO's section. Stage 1 reduces the gradients once, after the last micro-batch; DeepSpeed's
    default ``contiguous_gradients`` then copies every gradient tensor into a bucket and again into a
    partition buffer (about 11 ops a tensor, and a second full-size gradient buffer), where without
    it the bucket is flattened and all-reduced in one piece (``buffered_reduce_fallback``). Stage 2
    reduces during the backward pass, where the contiguous buffer avoids fragmentation: kept there."""
    return {"stage": stage, "contiguous_gradients": False} if stage == 1 else {"stage": stage}


def deepspeed_config(cfg: JobConfig, world_size: int, load_universal: bool = False) -> dict:
    budget, train = cfg.budget, cfg.train
    micro_per_step = budget.global_batch_size // (budget.micro_batch_size * world_size)
    ds = {
        "train_batch_size": budget.global_batch_size,
        "train_micro_batch_size_per_gpu": budget.micro_batch_size,
        "gradient_accumulation_steps": micro_per_step,
        "gradient_clipping": train.gradient_clipping,
        "zero_optimization": zero_config(effective_zero_stage(cfg, world_size)),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if load_universal:  # resuming a checkpoint written by another number of workers
        ds["checkpoint"] = {"load_universal": True}
    precision = resolve_precision(train.precision)
    if autocast_dtype(cfg, world_size):  # fp32 weights; fp16's loss scaler is set by build_engine
        ds["torch_autocast"] = {"enabled": True, "dtype": precision}
    elif precision == "fp16":  # Pythia: fp16 with dynamic loss scaling
        ds["fp16"] = {"enabled": True, **FP16_SCALING}
    elif precision == "bf16":
        # bf16 has fp32's exponent range: no loss scale to lower, so no per-tensor overflow check
        # (DeepSpeed's default checks every gradient tensor, ~13 ops each, and skips the step)
        ds["bf16"] = {"enabled": True, "check_grad_overflow": False}
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


def build_training_model(cfg: JobConfig, vocab_size: int) -> torch.nn.Module:
    """The run's model with its seeded initial weights, set up for training as configured."""
    m = cfg.model
    model = m.build(vocab_size, cfg.effective_weight_seed, cfg.train.attn_implementation)
    if cfg.train.activation_checkpointing:  # renamed in transformers 5
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model


def build_engine(cfg: JobConfig, model: torch.nn.Module, world_size: int, load_universal: bool = False):
    """The DeepSpeed engine around ``model``, with Pythia's AdamW and LR schedule.

    The schedule is a torch ``LambdaLR`` handed to DeepSpeed, which steps it once per optimizer
    step (not per micro-batch), so the LR at step ``s`` is exactly ``lr_at(s)``.
    """
    import deepspeed

    train = cfg.train
    # monitor.action=skip_step: the same AdamW, whose update a step may skip (train/skipstep.py)
    adamw = SkipStepAdamW if cfg.monitor.action == "skip_step" else torch.optim.AdamW
    optimizer = adamw(  # fused: one kernel for all tensors, on CPU too (torch >= 2.4)
        param_groups(model, train.weight_decay),
        lr=cfg.model.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        fused=True,
    )
    peak = cfg.model.lr
    budget = cfg.budget
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_at(s, budget.steps, peak, budget.warmup_fraction, budget.min_lr_ratio) / peak,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(cfg, world_size, load_universal),
    )
    if world_size == 1 and not engine.zero_optimization_stage():
        # One rank, no ZeRO: DeepSpeed would still flatten every gradient into a buffer, all-reduce it
        # over a group of one and copy it back, each step (~4% of a 70m step on CPU); the mean over one
        # rank is the gradient itself. DeepSpeed turns the same switch off where it has no backend.
        engine.enable_backward_allreduce = False
    if autocast_dtype(cfg, world_size) == torch.float16:  # DeepSpeed's scaler, not torch's GradScaler
        engine.torch_autocast_z0_gradscaler = DeepSpeedLossScaling(engine, FP16_SCALING)
    lighten_step(engine)
    return engine
