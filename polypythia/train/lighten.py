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
  exactly as DeepSpeed's (stage 1 and 2 on the GPU or CPU, without offload; the rest keep DeepSpeed's).
"""

from __future__ import annotations

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


def lighten_step(engine) -> None:
    """Switch ``engine``'s step to the foreach forms above, where its configuration allows."""
    zero = engine.zero_optimization_stage()
    if zero and engine.fp16_enabled() and getattr(engine.optimizer, "compute_grad_norm", False):
        engine.optimizer.check_grad_overflow = False  # the global norm it computes decides instead
    if zero in (1, 2) and not getattr(engine.optimizer, "cpu_offload", True) and engine.mpu is None:
        optimizer = engine.optimizer
        original = optimizer.get_grad_norm_direct
        optimizer.get_grad_norm_direct = lambda grads, params, norm_type=2: (
            _zero_grad_norm(optimizer, grads) if float(norm_type) == 2.0 else original(grads, params, norm_type)
        )
    elif not (zero or engine.fp16_enabled() or engine.bfloat16_enabled()):
        engine.clip_fp32_gradients = lambda: _clip_fp32(engine)


@torch.no_grad()
def _clip_fp32(engine) -> None:
    """Clip as DeepSpeed's ``clip_fp32_gradients`` does (coefficient ``max / (norm + 1e-6)`` capped at 1;
    without ZeRO every rank holds the averaged gradient, so every rank's norm is the same)."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
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
    ``engine.get_global_grad_norm()``: DeepSpeed's ZeRO and bf16/fp16 optimizers do, and so does
    the fp32 clipping of :func:`lighten_step`."""
    return bool(
        engine.zero_optimization_stage()
        or engine.fp16_enabled()
        or engine.bfloat16_enabled()
        or engine.gradient_clipping()
    )
