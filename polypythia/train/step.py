"""One optimizer step over a global batch, and the metrics the job reports for it.

A step is several micro-batches through the DeepSpeed engine, which accumulates their gradients
and applies the optimizer at the last one (DeepSpeed's ``backward``/``step`` contract:
https://www.deepspeed.ai/getting-started/#training). Throughput is reported as tokens/s and, where
the accelerator's peak is known, as model FLOPs utilisation (MFU, as defined in the PaLM paper,
https://arxiv.org/abs/2204.02311 appendix B).
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import Sequence

import numpy as np
import torch

from polypythia.config.jobconfig import JobConfig
from polypythia.train.callbacks import StepProbe
from polypythia.train.distributed import global_mean
from polypythia.train.lighten import records_grad_norm
from polypythia.train.schedule import lr_at
from polypythia.train.skipstep import SkipStep

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name fragment, for model FLOPs utilisation.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_length: int) -> float:
    """Training FLOPs per token: 6N for the matrix multiplies plus 12 L d T for attention (PaLM, app. B).

    N counts the weights a token is multiplied by (:func:`matmul_params`)."""
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_length


def matmul_params(model: torch.nn.Module) -> int:
    """N of :func:`flops_per_token`: every parameter but the input embedding, which is a table look-up.

    PaLM ties its input and output embeddings, so its N holds the embedding once, as the output
    layer; Pythia's are separate (GPT-NeoX ``embed_in`` and ``embed_out``), and only ``embed_out`` is
    a matrix multiply. torchtitan counts the same way (``get_nparams_and_flops``: the ``nn.Embedding``
    parameters are left out of the 6N term), as does GPT-NeoX's own ``get_flops`` (after Narayanan et
    al. 2021, https://arxiv.org/abs/2104.04473: one vocabulary term, the logits)."""
    total = sum(p.numel() for p in model.parameters())
    embed_in, embed_out = model.get_input_embeddings(), model.get_output_embeddings()
    if embed_out is not None and embed_out.weight is embed_in.weight:  # tied: the one table is the output layer
        return total
    return total - embed_in.weight.numel()


def peak_flops(configured_tflops: float | None) -> float | None:
    """The accelerator's peak FLOP/s: configured, or looked up from the GPU's name; None on CPU."""
    if configured_tflops:
        return configured_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def train_step(
    engine,
    forward,
    rows: np.ndarray,
    micro_batch_size: int,
    probes: Sequence[StepProbe] = (),
    z_loss: float = 0.0,
    skip: SkipStep | None = None,
) -> tuple[float, float, dict[str, float]]:
    """Train on this rank's ``rows`` of the global batch; returns (cross-entropy loss averaged over
    every rank's micro-batches, gradient norm before clipping, further ``train/*`` metrics).

    ``forward`` is the engine, or its module compiled by ``torch.compile`` (the engine still does
    the backward pass and the optimizer step). ``probes`` look inside the step (see
    :class:`~polypythia.train.callbacks.StepProbe`). ``z_loss`` > 0 adds ``z_loss * mean(log(Z)^2)``
    to the loss that is trained (PaLM's z-loss; ``train/z_loss`` is that term); ``skip`` (the
    skip-step action) is told the step's loss before the update, which it may then skip.
    """
    device = engine.device
    losses, z_terms = [], []
    own_grad_norm = mean_loss = None
    for i in range(0, len(rows), micro_batch_size):
        batch = torch.from_numpy(rows[i : i + micro_batch_size]).to(device, non_blocking=True)
        if probes and i == 0:  # the probes watch the forward pass of the step's first micro-batch
            logits = _watched_forward(engine, forward, batch, probes)
        elif forward is engine:
            logits = engine(input_ids=batch[:, :-1]).logits
        else:
            with autocast(engine):
                logits = forward(input_ids=batch[:, :-1]).logits
        logits = logits.flatten(0, 1).float()
        loss = torch.nn.functional.cross_entropy(logits, batch[:, 1:].flatten())
        if z_loss:
            z_term = z_loss * torch.logsumexp(logits, dim=-1).square().mean()
            engine.backward(loss + z_term)
            z_terms.append(z_term.detach())
        else:
            engine.backward(loss)
        losses.append(loss.detach())
        if engine.is_gradient_accumulation_boundary():
            if not records_grad_norm(engine):
                own_grad_norm = _grad_norm(engine.module)
            for probe in probes:
                probe.before_update(engine)
            if skip is not None:
                mean_loss = global_mean(torch.stack(losses).mean())
                skip.before_update(mean_loss, None if own_grad_norm is None else float(own_grad_norm))
        engine.step()
    for probe in probes:
        probe.after_update(engine)
    extra = {"train/z_loss": global_mean(torch.stack(z_terms).mean())} if z_terms else {}
    if mean_loss is None:
        mean_loss = global_mean(torch.stack(losses).mean())
    return mean_loss, _reported_grad_norm(engine, own_grad_norm), extra


def _watched_forward(engine, forward, batch: torch.Tensor, probes: Sequence[StepProbe]) -> torch.Tensor:
    """The logits of ``batch`` with the probes' hooks in the model. Eager, the hooks see the training
    forward itself; compiled (a graph would not run hooks added between steps, or would recompile
    for them), they see a separate no-grad eager forward of the same batch, and the compiled one trains."""
    with ExitStack() as stack:
        for probe in probes:
            stack.enter_context(probe.watch(engine.module))
        if forward is engine:
            return engine(input_ids=batch[:, :-1]).logits
        with torch.no_grad(), autocast(engine):
            engine.module(input_ids=batch[:, :-1])
    with autocast(engine):
        return forward(input_ids=batch[:, :-1]).logits


def autocast(engine):
    """``train.autocast``'s ``torch.autocast`` for a forward pass that does not go through the engine
    (which applies its ``torch_autocast`` section itself): the compiled module, the probes' eager one."""
    if getattr(engine, "torch_autocast_enabled", bool)():
        return torch.autocast(engine.device.type, dtype=engine.torch_autocast_dtype())
    return nullcontext()


@torch.no_grad()
def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all gradients (already averaged over ranks), before clipping (torch's
    ``get_total_norm``: the per-tensor norms in one foreach call, as ``clip_grad_norm_`` computes them)."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]  # fp16 grads: no overflow
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _reported_grad_norm(engine, own: torch.Tensor | None) -> float:
    value = engine.get_global_grad_norm()
    if value is None:
        value = own
    if value is None:
        return float("nan")
    value = float(value)
    return float("inf") if value < 0 else value  # ZeRO's -1 stands for an inf/NaN norm


class StepMetrics:
    """Turns what a step measured into the ``train/*`` metrics the callbacks receive."""

    def __init__(self, cfg: JobConfig, num_params: int, world_size: int):
        """``num_params``: the model's :func:`matmul_params`."""
        budget, model = cfg.budget, cfg.model
        self.budget, self.peak_lr, self.world_size = budget, model.lr, world_size
        self.tokens_per_step = budget.global_batch_size * budget.seq_length
        self.flops_per_step = self.tokens_per_step * flops_per_token(
            num_params, model.num_layers, model.hidden_size, budget.seq_length
        )
        self.peak = peak_flops(cfg.train.peak_tflops)

    def __call__(self, step: int, loss: float, grad_norm: float, elapsed_s: float) -> dict[str, float]:
        """Metrics of the step that started at ``step`` (0-based), which took ``elapsed_s``."""
        b = self.budget
        metrics = {
            "train/loss": loss,
            "train/lr": lr_at(step, b.steps, self.peak_lr, b.warmup_fraction, b.min_lr_ratio),
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": self.tokens_per_step / elapsed_s,
        }
        if self.peak:  # model FLOPs utilisation of all workers together
            metrics["train/mfu"] = self.flops_per_step / elapsed_s / (self.peak * self.world_size)
        return metrics
