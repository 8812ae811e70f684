"""The optimizer-side signals of the stability monitor (:mod:`polypythia.train.monitor`): the
parameter groups, and per group the gradient norm, the update-to-weight ratio and the RMS of
g^2 / v_hat of Adam's second moment, read from whatever DeepSpeed holds at each ZeRO stage
(whole fp32 parameters at stage 0, this rank's flat fragments at stages 1 and 2, summed over the
data-parallel group with one all-reduce per phase).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def group_of(name: str) -> str:
    """The monitor's group of a GPT-NeoX parameter name (see the module docstring)."""
    layer = _LAYER.search(name)
    if layer:
        index, rest = layer.groups()
        return f"layer{index}.attn" if rest.startswith(("attention.", "input_layernorm.")) else f"layer{index}.mlp"
    if "embed_in." in name:
        return "embed"
    if name.startswith(("embed_out.", "lm_head.")) or "final_layer_norm." in name:
        return "head"
    return "other"


def _group_order(group: str) -> tuple:
    if group == "embed":
        return (0, 0, "")
    layer = re.fullmatch(r"layer(\d+)\.(attn|mlp)", group)
    if layer:
        return (1, int(layer.group(1)), layer.group(2))
    return (2, 0, group)


# --- the optimizer-side signals -------------------------------------------------------------------


@dataclass
class _Fragment:
    """This rank's share of one parameter: the fp32 weights the optimizer updates (1-D), where its
    gradient is, and the optimizer state of the tensor it lies in (from ``start``, ``numel`` long)."""

    group: int
    weight: torch.Tensor
    grad: Callable[[], Optional[torch.Tensor]]
    state: Optional[dict]
    start: int

    def exp_avg_sq(self) -> Optional[torch.Tensor]:
        value = self.state.get("exp_avg_sq") if self.state else None
        if value is None:
            return None
        if value.shape == self.weight.shape:  # a whole parameter's state, as the parameter: as it is
            return value
        value = value if value.dim() == 1 else value.view(-1)  # ZeRO's flat state: 1-D already
        return value if value.numel() == self.weight.numel() else value.narrow(0, self.start, self.weight.numel())


def total_and_adam_steps(total: torch.Tensor, frags: list[_Fragment]) -> tuple[float, dict[int, float]]:
    """``total`` (a 0-dim tensor) and the updates Adam has made so far, by ``id`` of optimizer state:
    the step counters (tensors under torch's fused and foreach AdamW) stacked with ``total`` and read in
    one host sync, not one per state."""
    states = {id(f.state): f.state for f in frags if f.state and f.state.get("step") is not None}
    counters = [state["step"] for state in states.values()]
    if all(torch.is_tensor(c) and c.dim() == 0 for c in counters):
        steps = torch.stack(counters).to(total.device, torch.float64) if counters else total.new_empty(0)
        values = torch.cat([total.reshape(1).double(), steps]).tolist()
    else:
        values = [float(total)] + [float(c) for c in counters]
    return values[0], dict(zip(states, values[1:]))


def _hp_grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """This rank's fragment of ``param``'s reduced gradient under ZeRO-1/2 or DeepSpeed's bf16
    optimizer, as ``deepspeed.utils.tensor_fragment.get_full_hp_grad`` takes it (without its all-reduce)."""
    mapping = param._hp_mapping
    grad = mapping.get_lp_grad_fragment(param._index_in_param_group)
    grad = grad if grad.dim() == 1 else grad.reshape(-1)
    if grad.numel() == param.numel():  # a full-size buffer: keep the part this rank owns
        grad = grad.narrow(0, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
    return grad


def _full_grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    return None if param.grad is None else param.grad.reshape(-1)


def _grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    return param.grad


def fragments(engine, group_index: dict[int, int]) -> tuple[list[_Fragment], bool]:
    """This rank's fragments of every parameter, and whether they are partitioned across ranks.

    ``group_index`` maps ``id(param)`` to its group's index.
    """
    opt = engine.optimizer
    params = list(engine.module.parameters())
    out: list[_Fragment] = []
    if any(hasattr(p, "_hp_mapping") for p in params):  # ZeRO-1/2 (or the bf16 optimizer): partitioned
        flats = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_groups_flat_partition
        for p in params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # no part of it on this rank
                continue
            state = opt.optimizer.state.get(flats[mapping.param_group_index])
            out.append(
                _Fragment(
                    group_index[id(p)],
                    mapping.hp_fragment,
                    partial(_hp_grad, p),
                    state,
                    mapping.hp_fragment_address.start,
                )
            )
        return out, True
    if hasattr(opt, "fp16_groups") and hasattr(
        opt, "fp32_groups_flat"
    ):  # fp16/bf16, ZeRO-0, fused: one flat fp32 copy per group
        for lp_group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
            state, offset = opt.optimizer.state.get(flat), 0
            for p in lp_group:
                out.append(
                    _Fragment(
                        group_index[id(p)],
                        flat.detach().narrow(0, offset, p.numel()),
                        partial(_full_grad, p),
                        state,
                        offset,
                    )
                )
                offset += p.numel()
    elif hasattr(opt, "fp16_groups") and hasattr(
        opt, "fp32_groups"
    ):  # fp16/bf16, ZeRO-0, unfused: an fp32 copy per parameter
        for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
            for p, hp in zip(lp_group, hp_group):
                out.append(
                    _Fragment(
                        group_index[id(p)],
                        hp.detach().reshape(-1),
                        partial(_full_grad, p),
                        opt.optimizer.state.get(hp),
                        0,
                    )
                )
    else:  # fp32, ZeRO-0: the torch optimizer updates the module's own parameters (read as they are: no op per tensor)
        for p in params:
            out.append(_Fragment(group_index[id(p)], p, partial(_grad, p), opt.state.get(p), 0))
    return out, False


def loss_scale(engine) -> Optional[float]:
    """fp16's current dynamic loss scale (None without fp16)."""
    scaling = getattr(engine, "torch_autocast_z0_gradscaler", None)  # train.autocast's (train/lighten.py)
    if hasattr(scaling, "cur_scale"):
        return float(scaling.cur_scale)
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None)
    if scale is None and getattr(opt, "loss_scale_config", None) is not None:
        scale = opt.loss_scale_config.cur_scale
    return float(scale) if scale is not None else None


class UpdateSignals:
    """Gradient norm, update-to-weight ratio and Adam RMS per group, around one optimizer step.

    The passes over the fragments use torch's multi-tensor ``_foreach`` kernels (as
    ``torch.nn.utils.clip_grad_norm_`` and the torch optimizers do), a chunk of fragments at a
    time, so that a sampled step costs a few dozen kernel launches and at most
    :data:`CHUNK_ELEMENTS` fp32 elements of scratch beyond the kept copy of the weights. The figures
    reach the host in three reads (the total norm with Adam's step counts, then every figure of each
    phase at once), each a device synchronisation on a GPU.
    """

    def __init__(self, model: torch.nn.Module, max_grad_norm: float, beta2: float, eps: float):
        names = {id(p): n for n, p in model.named_parameters()}
        groups = sorted({group_of(n) for n in names.values()}, key=_group_order)
        self.groups = groups
        self.group_index = {pid: groups.index(group_of(n)) for pid, n in names.items()}
        self.max_grad_norm, self.beta2, self.eps = max_grad_norm, beta2, eps

    @torch.no_grad()
    def before(self, engine, metrics: dict[str, float]) -> dict[str, Any]:
        """Gradient norms and Adam RMS, from the reduced, unclipped gradient; keeps the weights."""
        frags, partitioned = fragments(engine, self.group_index)
        device, n = engine.device, len(self.groups)
        scale = loss_scale(engine) or 1.0
        grads = [f.grad() for f in frags]
        have = [i for i, g in enumerate(grads) if g is not None]
        index = torch.tensor([frags[i].group for i in have], dtype=torch.long, device=device)

        norms = torch._foreach_norm([grads[i] for i in have], 2, dtype=torch.float32) if have else []
        grad_sq = self._sum_groups(norms, index, partitioned, n, square=True)
        grad_sq = grad_sq / scale**2 if scale != 1.0 else grad_sq  # no op where nothing is scaled
        total_sq, steps = total_and_adam_steps(grad_sq.sum(), frags)  # the step's first host read
        total = math.sqrt(total_sq)
        clip = min(1.0, self.max_grad_norm / (total + 1e-6)) if self.max_grad_norm > 0 else 1.0  # as DeepSpeed clips

        # g: the gradient Adam applies (unscaled, clipped); v_t = b2 v_{t-1} + (1 - b2) g^2, bias-corrected
        b2, ratios = self.beta2, []
        for chunk in _chunks(have, [frags[i].weight.numel() for i in have]):
            g2 = torch._foreach_mul(
                [grads[i].float() for i in chunk], clip / scale
            )  # copies: the gradient stays as it is
            torch._foreach_mul_(g2, g2)
            v = [frags[i].exp_avg_sq() for i in chunk]
            v = [torch.zeros_like(g) if vi is None else vi for vi, g in zip(v, g2)]
            v_t = torch._foreach_add(v, g2, alpha=(1 - b2) / b2)
            torch._foreach_mul_(v_t, [b2 / (1 - b2 ** (steps.get(id(frags[i].state), 0.0) + 1)) for i in chunk])
            torch._foreach_clamp_min_(v_t, self.eps**2)
            torch._foreach_div_(g2, v_t)
            ratios.extend(torch._foreach_norm(g2, 1))  # the ratios are >= 0: their sum
        counts = [0] * n
        for f in frags:
            counts[f.group] += f.weight.numel()
        sums = self._sum_groups(
            ratios, index, partitioned, n, extra=torch.tensor(counts, dtype=torch.float64, device=device)
        )
        ratio_sum, count = sums[:n], sums[n:]

        read = torch.cat([grad_sq.sqrt(), (ratio_sum / count).sqrt(), (ratio_sum.sum() / count.sum()).reshape(1)])
        read = read.tolist()  # the second: every figure at once
        values = {f"monitor/grad_norm/{g}": v for g, v in zip(self.groups, read[:n])}
        values.update({f"monitor/adam_rms/{g}": v for g, v in zip(self.groups, read[n : 2 * n])})
        values["monitor/adam_rms"] = math.sqrt(read[2 * n])
        metrics.update(values)
        weights = [f.weight for f in frags]
        return {
            "weights": weights,
            "before": torch._foreach_mul(weights, 1.0) if weights else [],
            "index": index  # every fragment has a gradient (as a rule): the same groups, no new tensor
            if len(have) == len(frags)
            else torch.tensor([f.group for f in frags], dtype=torch.long, device=device),
            "partitioned": partitioned,
        }

    @torch.no_grad()
    def after(self, engine, kept: dict[str, Any], metrics: dict[str, float]) -> None:
        """The update-to-weight ratio of the step just taken."""
        weights, before, index, n = kept["weights"], kept["before"], kept["index"], len(self.groups)
        change = list(torch._foreach_norm(torch._foreach_sub(weights, before))) if weights else []
        weight = list(torch._foreach_norm(before)) if weights else []
        sums = self._sum_groups(change + weight, torch.cat([index, index + n]), kept["partitioned"], 2 * n, square=True)
        change_sq, weight_sq = sums[:n], sums[n:]
        read = torch.cat([change_sq.sqrt() / weight_sq.sqrt(), change_sq.sum().reshape(1), weight_sq.sum().reshape(1)])
        read = read.tolist()  # one host read
        metrics.update({f"monitor/update_ratio/{g}": v for g, v in zip(self.groups, read[:n])})
        metrics["monitor/update_ratio"] = math.sqrt(read[n]) / math.sqrt(read[n + 1])
        scale = loss_scale(engine)
        if scale is not None:
            metrics["monitor/loss_scale"] = scale

    @staticmethod
    def _sum_groups(
        values: list[torch.Tensor],
        index: torch.Tensor,
        partitioned: bool,
        n: int,
        extra: Optional[torch.Tensor] = None,
        square: bool = False,
    ) -> torch.Tensor:
        """Per-group sums of per-fragment scalars (``square``: of their squares; then ``extra``,
        appended), summed over ranks where the fragments are partitioned: one all-reduce."""
        sums = torch.zeros(n, dtype=torch.float64, device=index.device)
        if values:  # a rank may own no fragment at all
            stacked = torch.stack(values)
            sums.index_add_(0, index, (stacked.square() if square else stacked).to(torch.float64))
        if extra is not None:
            sums = torch.cat([sums, extra.to(torch.float64)])
        if partitioned and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(sums)  # the data-parallel group is the whole world here
        return sums


CHUNK_ELEMENTS = 1 << 24  # fp32 elements per multi-tensor pass (64 MiB of scratch, twice)
FORWARD_CHUNK = 1 << 20  # fp32 elements of attention scores or logits at a time (small, reused buffers)


def _chunks(items: list[int], sizes: list[int], limit: int = CHUNK_ELEMENTS) -> Iterator[list[int]]:
    """``items`` in consecutive runs of at most ``limit`` elements (a larger item alone)."""
    run, held = [], 0
    for item, size in zip(items, sizes):
        if run and held + size > limit:
            yield run
            run, held = [], 0
        run.append(item)
        held += size
    if run:
        yield run


# --- the forward-side signals ---------------------------------------------------------------------
