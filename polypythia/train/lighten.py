"""DeepSpeed's optimizer step without its per-tensor host work, with the same arithmetic.

A small model's step on a GPU is host-bound: the CPU's time goes into issuing kernels, and DeepSpeed
(0.19, ``runtime/engine.py`` and ``runtime/zero/stage_1_and_2.py``) issues several for every
gradient tensor where torch has one foreach kernel for all of them. ``benchmarks/bench_host_overhead.py``
counts the ops a step dispatches against a plain PyTorch loop; what it found, and what is changed here
(the config switches are in :func:`polypythia.train.engine.deepspeed_config`):

- ZeRO stage 1 copied every gradient twice, tensor by tensor, on its way to the optimizer
  (``contiguous_gradients``, off for stage 1 in the config);
- without ZeRO in fp32 the engine clips with its own ``clip_grad_norm_``: a norm, a cast and a
  ``mul_`` per tensor. :func:`lighten_step` clips with torch's foreach kernels instead (the same
  coefficient) and keeps the norm as ``engine.get_global_grad_norm()``, so the step computes it once;
- ZeRO under fp16 checks every gradient tensor for inf/NaN (``has_overflow_partitioned_grads_serial``,
  about 13 ops each), then computes the global gradient norm, and treats a non-finite norm as an
  overflow too. The norm sums every element's square in fp32, so it is non-finite exactly when some
  gradient is: with the per-tensor check off the norm alone decides (the same skipped steps and loss
  scale updates, agreed over the ranks as the norm is all-reduced);
- ZeRO's global norm takes one ``vector_norm`` (and a cast) per tensor: :func:`lighten_step` gives
  the optimizer a ``get_grad_norm_direct`` with one ``torch._foreach_norm``, combined and reduced
  exactly as DeepSpeed's (stage 1 and 2 on the GPU or CPU, without offload; the rest keep DeepSpeed's);
- what is left of ZeRO-1 in bf16/fp16 on one rank (flattening, casts and copies between the low-precision
  weights and the fp32 master, about 9 ops a tensor) goes with ``train.autocast``: fp32 weights at ZeRO-0,
  where fp16's dynamic loss scaling is :class:`DeepSpeedLossScaling` (see
  :func:`polypythia.train.engine.autocast_dtype`).
"""

from __future__ import annotations

import math

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


def lighten_step(engine) -> None:
    """Switch ``engine``'s step to the foreach forms above, where its configuration allows."""
    zero = engine.zero_optimization_stage()
    fp32_weights = not (zero or engine.fp16_enabled() or engine.bfloat16_enabled())  # fp32 or train.autocast
    params = tuple(engine.module.parameters()) if fp32_weights else ()  # listed once, not walked each step
    if zero and engine.fp16_enabled() and getattr(engine.optimizer, "compute_grad_norm", False):
        engine.optimizer.check_grad_overflow = False  # the global norm it computes decides instead
    if zero in (1, 2) and not getattr(engine.optimizer, "cpu_offload", True) and engine.mpu is None:
        optimizer = engine.optimizer
        original = optimizer.get_grad_norm_direct
        optimizer.get_grad_norm_direct = lambda grads, params, norm_type=2: (
            _zero_grad_norm(optimizer, grads) if float(norm_type) == 2.0 else original(grads, params, norm_type)
        )
    elif scales_with_deepspeed_under_autocast(engine):
        engine.clip_fp32_gradients = lambda: None  # the loss scaling's unscale_ clips, with the same norm
    elif fp32_weights:
        engine.clip_fp32_gradients = lambda: _clip_fp32(engine, params)
    if fp32_weights:  # engine.zero_grad runs after the step (DeepSpeed's own optimizers clear their own)
        engine.zero_grad = _zero_grad_of(params)


def _zero_grad_of(params: tuple):
    """DeepSpeed's ``engine.zero_grad`` sets every gradient to None through ``module.named_parameters()``,
    a generator walk of the module tree every step (about 0.5 ms of a 70m step's 18 ms of host time on
    CPU, ``benchmarks/bench_host_overhead.py``); the same over the parameters listed once."""

    def zero_grad() -> None:
        for param in params:
            param.grad = None

    return zero_grad


@torch.no_grad()
def _clip_fp32(engine, parameters: tuple) -> None:
    """Clip as DeepSpeed's ``clip_fp32_gradients`` does (coefficient ``max / (norm + 1e-6)`` capped at 1;
    without ZeRO every rank holds the averaged gradient, so every rank's norm is the same)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return
    norm = get_total_norm([p.grad for p in params], foreach=True)
    clip_grads_with_norm_(params, engine.gradient_clipping(), norm, foreach=True)
    engine._global_grad_norm = norm


@torch.no_grad()
def _zero_grad_norm(optimizer, gradients) -> torch.Tensor:
    """DeepSpeed's ``get_grad_norm_direct`` for the L2 norm (no model or pipeline parallelism): the
    same per-tensor norms in the same dtype, from one foreach call, then combined, all-reduced and
    masked (an inf/NaN norm becomes -1) as there."""
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype

    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:
        norms = torch._foreach_norm(grads, 2, dtype=get_norm_dtype())
        total = torch.stack(norms).pow(2.0).sum().float()
    else:
        total = torch.tensor(0.0, dtype=torch.float32, device=optimizer.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
    optimizer._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
    return total


def records_grad_norm(engine) -> bool:
    """Whether ``engine.step()`` leaves the step's gradient norm (before clipping) in
    ``engine.get_global_grad_norm()``: DeepSpeed's ZeRO and bf16/fp16 optimizers do, and so do
    the fp32 clipping of :func:`lighten_step` and :class:`DeepSpeedLossScaling`."""
    return bool(
        engine.zero_optimization_stage()
        or engine.fp16_enabled()
        or engine.bfloat16_enabled()
        or engine.gradient_clipping()
        or scales_with_deepspeed_under_autocast(engine)
    )


def scales_with_deepspeed_under_autocast(engine) -> bool:
    """Whether fp16's loss scaling under ``train.autocast`` is :class:`DeepSpeedLossScaling`, which
    unscales, clips and records the step's gradient norm itself."""
    return isinstance(getattr(engine, "torch_autocast_z0_gradscaler", None), DeepSpeedLossScaling)


class DeepSpeedLossScaling:
    """fp16's dynamic loss scaling at ZeRO-0 with fp32 weights (``train.autocast``): DeepSpeed's own
    ``DynamicLossScaler``, built from the same ``fp16`` config section as its ZeRO optimizer builds it,
    behind the four calls the engine makes of the ``torch.amp.GradScaler`` it would use there otherwise
    (``scale``, ``unscale_``, ``step``, ``update``; torch's scaler has no hysteresis and doubles every
    2,000 steps, not Pythia's 1,000). As ZeRO's step: the global norm of the scaled gradients decides an
    overflow (one host read); an overflow skips the update, the LR schedule's step included, and reports
    an infinite norm; otherwise one foreach multiply unscales and clips, with ZeRO's combined factor
    ``scale * max(1, (norm / scale + 1e-6) / max_norm)``. The scaler's state is saved and loaded with the
    optimizer's state dict (``loss_scaler``), so a resume continues its scale, hysteresis and window."""

    def __init__(self, engine, fp16_section: dict):
        from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
        from deepspeed.runtime.precision_config import DeepSpeedFP16Config

        args = DeepSpeedFP16Config(enabled=True, **fp16_section).dynamic_loss_scale_args()
        self.scaler = CreateLossScaler(torch.float16, 0, True, args)
        self.engine = engine
        self.overflow: bool | None = None  # of the step being taken, once unscale_ decided it
        engine.optimizer.register_state_dict_post_hook(self._save)
        engine.optimizer.register_load_state_dict_pre_hook(self._load)

    @property
    def cur_scale(self) -> float:
        return self.scaler.cur_scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scaler.cur_scale

    @torch.no_grad()
    def unscale_(self, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scaled = get_total_norm(grads, foreach=True) if grads else torch.zeros(())
        self.overflow = not math.isfinite(float(scaled))
        if self.overflow:
            self.engine._global_grad_norm = float("inf")
            return
        scale, max_norm = self.scaler.cur_scale, self.engine.gradient_clipping()
        norm = scaled / scale
        combined = torch.clamp((norm + 1e-6) / max_norm, min=1.0) * scale if max_norm > 0 else scale
        torch._foreach_mul_(grads, 1.0 / combined)
        self.engine._global_grad_norm = norm

    def step(self, optimizer) -> None:
        if self.overflow is None:  # no clipping: the engine did not unscale first
            self.unscale_(optimizer)
        optimizer.overflow = self.overflow  # the engine then skips the LR schedule's step, as under ZeRO
        if not self.overflow:
            optimizer.step()

    def update(self) -> None:
        self.scaler.update_scale(self.overflow)
        self.overflow = None

    _KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

    def _save(self, optimizer, state_dict: dict) -> dict:
        state_dict["loss_scaler"] = {key: getattr(self.scaler, key) for key in self._KEYS}
        return state_dict

    def _load(self, optimizer, state_dict: dict) -> dict:
        state_dict = dict(state_dict)
        for key, value in state_dict.pop("loss_scaler", {}).items():
            setattr(self.scaler, key, value)
        return state_dict
