"""The live stability monitor: signals from inside sampled training steps, and in-run spike detection.

Every ``monitor.every_steps`` optimizer steps (steps counted from 1, as logged), the
:class:`StabilityMonitor` callback hands that step a probe (:class:`~polypythia.train.callbacks.StepProbe`)
and adds what it measured to the step's metrics, which the job logs to MLflow:

``monitor/grad_norm/<group>``
    L2 norm of the group's gradient: averaged over ranks and micro-batches, before clipping,
    unscaled under fp16 (the same gradient as ``train/grad_norm``, whose square is the sum of the
    groups' squares).
``monitor/update_ratio/<group>``, ``monitor/update_ratio``
    ||w_after - w_before|| / ||w_before|| of the optimizer step, on the fp32 weights the optimizer
    updates (DeepSpeed's master copy under bf16/fp16), per group and over all parameters
    (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
    instabilities", https://arxiv.org/abs/2309.14322, track this ratio per layer).
``monitor/adam_rms/<group>``, ``monitor/adam_rms``
    RMS_t = sqrt(mean(g_t^2 / max(v_hat_t, eps^2))) over the group's elements, g_t the gradient
    Adam applies (after clipping), v_hat_t its bias-corrected second moment including g_t (Wortsman
    et al. 2023, "Stable and low-precision training for large-scale vision-language models",
    https://arxiv.org/abs/2304.13013, sec. 3.4: spikes follow an out-of-date second moment, RMS >> 1).
``monitor/attn_logit_max/layer<i>``, ``monitor/attn_logit_max``
    the largest pre-softmax attention logit q.k/sqrt(d) (after rotary embedding, causal positions
    only) of the step's first micro-batch on this rank, per layer and over layers (attention-logit
    growth: Dehghani et al. 2023, https://arxiv.org/abs/2302.05442; Wortsman et al. 2023, proxies).
    With ``model.qk_layernorm`` the queries and keys are those after their norm (the hook reads the
    output of ``query_key_value``, where :class:`polypythia.qknorm.QKNormLinear` normalises them):
    the logits attention uses.
``monitor/logz_mean``, ``monitor/logz_max``
    log Z = logsumexp of the output logits at each token of that micro-batch, mean and max over its
    tokens (output-logit divergence; PaLM's z-loss keeps log Z near 0, https://arxiv.org/abs/2204.02311).
``monitor/loss_scale``
    under fp16: DeepSpeed's dynamic loss scale after the step (it halves at each overflow).

Groups: ``embed`` (input embedding), ``layer<i>.attn`` (input LayerNorm, query/key/value and output
projections), ``layer<i>.mlp`` (post-attention LayerNorm and MLP), ``head`` (final LayerNorm and
unembedding); together they hold every parameter once.

Where the numbers come from under DeepSpeed (0.19): at ZeRO stage 0 every rank holds the whole
reduced gradient (``param.grad``) and the weights and Adam state the optimizer updates (the torch
AdamW on the module's fp32 parameters, or DeepSpeed's bf16/fp16 optimizer's fp32 copies); nothing
crosses ranks. At ZeRO stages 1 and 2 the reduced gradient, the fp32 weights and the Adam state are
partitioned: each rank sums squares over the fragments it owns (DeepSpeed's ``_hp_mapping``, the same
links ``deepspeed.utils.safe_get_full_grad`` reads), and one all-reduce of the per-group sums over
the data-parallel group gives every rank the totals, without gathering any tensor. The gradient is
read after the last micro-batch's backward pass and before ``engine.step()`` (when DeepSpeed has
reduced it and not yet clipped, applied or freed it). The forward signals are per rank (the first
micro-batch of rank 0's share is what the job logs); they hook the training forward itself, or,
with ``train.compile``, a separate no-grad eager forward of the same micro-batch.

Spikes: every step, :class:`~polypythia.train.spikes.SpikeDetector` (OLMo-core's rule: more than
``monitor.spike_threshold_sd`` SDs above the mean of the previous ``monitor.spike_window`` values) watches ``train/loss`` and ``train/grad_norm``; a
spike adds ``monitor/spike/loss`` (or ``monitor/spike/grad_norm``), its height in SDs, to that
step's metrics, logs a warning with the batch behind it, and is kept in ``TrainResult.spikes``
(:class:`Spike` as a dict). The batch of step ``S`` (logged at MLflow step ``S``) is the global
batch at 0-based index ``S - 1``: rows ``[(S-1) B, S B)`` of the seeded order, B the global batch
size, which ``polypythia-batch --step S`` prints. The detectors' windows are kept in every
checkpoint's trainer state (:meth:`StabilityMonitor.trainer_state`), so a resumed or rewound run
judges its next steps against the values before the checkpoint it restarts from.

Cost: the probe of a sampled step copies this rank's fp32 weights once (for the update ratio,
freed after the step), reads the gradient, the Adam state and the weights a few times each, and
computes the attention scores and logsumexp of one micro-batch again; at the default interval this
is under 2% of the step time (``benchmarks/bench_monitor.py --cost``).

The optimizer-side signals live in :mod:`polypythia.train.signals`; the forward-side ones (attention
logits, log Z) and the callback that samples both are here.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Iterator, NamedTuple, Optional

import torch

from polypythia.config.jobconfig import JobConfig
from polypythia.config.monitor import MonitorConfig
from polypythia.config.schema import TrainConfig
from polypythia.train.callbacks import Callback, StepProbe, TrainResult, TrainStart
from polypythia.train.signals import FORWARD_CHUNK, UpdateSignals
from polypythia.train.spikes import SpikeDetector

log = logging.getLogger(__name__)

STATE_KEY = "stability_monitor"  # its entry in a checkpoint's trainer state: the spike windows
SPIKE_METRICS = {"train/loss": "monitor/spike/loss", "train/grad_norm": "monitor/spike/grad_norm"}


@dataclass
class Spike:
    """A spike the monitor flagged: the step, the value, and the batch it trained on."""

    metric: str  # train/loss or train/grad_norm
    step: int  # optimizer steps taken, as logged to MLflow (polypythia-batch --step takes it)
    value: float
    height_sd: float  # (value - window mean) / window SD
    window_mean: float
    window_sd: float
    batch_rows: tuple[int, int]  # [start, end) positions of the step's global batch in the seeded order


class _Layer(NamedTuple):
    """One attention layer's input to its logit maximum, kept by the hooks: the output of
    ``query_key_value`` (a reference, not a copy) and the rotary (cos, sin) the layer was handed."""

    index: int
    attn: torch.nn.Module
    qkv: torch.Tensor
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]]


class ForwardSignals:
    """Attention-logit maxima and output log Z of one forward pass, through forward hooks.

    The attention logits are recomputed a group of layers at a time, not layer by layer: the hooks keep
    each layer's ``query_key_value`` output and rotary (cos, sin), and once a group holds as many
    layers as fit :data:`FORWARD_CHUNK` scores (all of them for a small model), their queries and keys
    are split, rotated and scored in one batched pass, a fixed number of ops whatever the number of
    layers in the group. The kept outputs are held until their group is scored, a group's worth
    at most (``3 x hidden`` values per token and layer, in the activations' dtype, beyond what the
    forward pass keeps: on CPU neither SDPA nor eager attention keeps this tensor for the backward
    pass, it saves the rotated queries and keys and its own copy of the values). All the maxima
    reach the host in one read.
    """

    def __init__(self, model: torch.nn.Module):
        self.attention = [m for m in model.modules() if hasattr(m, "query_key_value") and hasattr(m, "head_size")]
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        try:
            from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb
        except ImportError:  # pragma: no cover - a transformers without GPT-NeoX's rotary helper
            apply_rotary_pos_emb = None
        self.rotary = apply_rotary_pos_emb
        if not self.attention or self.rotary is None:
            log.warning("The stability monitor found no GPT-NeoX attention to hook; monitor/attn_logit_max is off.")
            self.attention = []

    @contextmanager
    def watch(self, metrics: dict[str, float]) -> Iterator[None]:
        found: dict[str, Any] = {"rotary": {}, "group": [], "layers": [], "maxima": []}
        handles = []
        for i, attn in enumerate(self.attention):
            layer = getattr(attn, "layer_idx", None)
            layer = i if layer is None else layer
            handles.append(attn.register_forward_pre_hook(partial(self._keep_rotary, found, layer), with_kwargs=True))
            handles.append(attn.query_key_value.register_forward_hook(partial(self._keep_qkv, found, layer, attn)))
        if self.head is not None:
            handles.append(self.head.register_forward_hook(partial(self._log_z, found)))
        try:
            yield
            self._score(found)  # the last group
        finally:
            for handle in handles:
                handle.remove()
        if found["maxima"]:
            maxima = found["maxima"]
            maxima = (maxima[0] if len(maxima) == 1 else torch.cat(maxima)).tolist()  # the one host read
            metrics.update({f"monitor/attn_logit_max/layer{k}": v for k, v in zip(found["layers"], maxima)})
            metrics["monitor/attn_logit_max"] = max(maxima)
        if "logz" in found:
            mean, top = found["logz"].tolist()
            metrics["monitor/logz_mean"], metrics["monitor/logz_max"] = mean, top

    @staticmethod
    def _keep_rotary(found, layer, module, args, kwargs):
        found["rotary"][layer] = kwargs.get("position_embeddings")

    def _keep_qkv(self, found, layer, attn, module, args, qkv):
        rotary = found["rotary"].pop(layer, None)
        group = found["group"]
        if group and (rotary is None) != (group[0].rotary is None):  # a group is rotated throughout or not at all
            self._score(found)
        group.append(_Layer(layer, attn, qkv, rotary))
        batch, length = qkv.shape[:2]
        heads = qkv.shape[-1] // (3 * attn.head_size)
        if len(group) >= max(1, FORWARD_CHUNK // (batch * heads * length * length)):  # layers of scores that fit
            self._score(found)

    def _score(self, found) -> None:
        """The kept group's logit maxima (a tensor, on the device), appended to ``found``; the group freed."""
        group = found["group"]
        if group:
            found["maxima"].append(self._logit_maxima(group))
            found["layers"].extend(layer.index for layer in group)
            group.clear()

    @torch.no_grad()
    def _logit_maxima(self, group: list[_Layer]) -> torch.Tensor:
        """The largest causal logit q.k/sqrt(d) of each layer of ``group``, in fp32: the layers' q and k
        stacked, rotated as GPT-NeoX rotates them (``apply_rotary_pos_emb``, on the first
        ``rotary_ndims`` of each head), and scored in batches of at most :data:`FORWARD_CHUNK` scores."""
        first = group[0]
        qkv = first.qkv.unsqueeze(0) if len(group) == 1 else torch.stack([layer.qkv for layer in group])
        layers, batch, length = qkv.shape[:3]
        head_size = first.attn.head_size
        q, k, _ = qkv.view(layers, batch, length, -1, 3 * head_size).transpose(2, 3).chunk(3, dim=-1)
        q, k = q.float(), k.float()  # (layers, batch, heads, length, head_size)
        if first.rotary is not None:
            cos, sin = first.rotary  # (batch or 1, length, rotary_ndims); one model: the same for every layer
            unsqueeze = 1
            if any(layer.rotary[0] is not cos or layer.rotary[1] is not sin for layer in group):
                cos, sin = (torch.stack([layer.rotary[i] for layer in group]) for i in (0, 1))
                unsqueeze = 2
            q, k = self.rotary(q, k, cos.float(), sin.float(), unsqueeze_dim=unsqueeze)
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu_(1)
        rows = max(1, FORWARD_CHUNK // (layers * q.shape[2] * length * length))  # batch rows of scores at a time
        maxima = []
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores under train.autocast too
            for start in range(0, batch, rows):
                qs, ks = (q, k) if rows >= batch else (q[:, start : start + rows], k[:, start : start + rows])
                scores = torch.matmul(qs, ks.transpose(-1, -2))
                maxima.append(scores.masked_fill_(future, float("-inf")).amax(dim=(1, 2, 3, 4)))
        top = maxima[0] if len(maxima) == 1 else torch.stack(maxima).amax(0)
        return top * getattr(first.attn, "scaling", head_size**-0.5)

    @staticmethod
    @torch.no_grad()
    def _log_z(found, module, args, logits):
        logits = logits.detach().flatten(0, -2)
        rows = max(1, FORWARD_CHUNK // logits.shape[-1])  # tokens at a time
        # log Z = x_0 - log_softmax(x)_0: log_softmax is one fused kernel, about twice as fast as logsumexp on CPU
        log_z = torch.cat(
            [chunk[:, 0].float() - torch.log_softmax(chunk.float(), dim=-1)[:, 0] for chunk in logits.split(rows)]
        )
        found["logz"] = torch.stack([log_z.mean(), log_z.max()])


# --- the callback ---------------------------------------------------------------------------------


class _Probe(StepProbe):
    """One sampled step's look inside: the forward hooks, then the optimizer-side signals."""

    def __init__(self, monitor: "StabilityMonitor"):
        self.monitor = monitor
        self.metrics: dict[str, float] = {}
        self.kept: Optional[dict] = None

    def watch(self, module: torch.nn.Module):
        forward = self.monitor.forward_signals
        return forward.watch(self.metrics) if forward is not None else nullcontext()

    def before_update(self, engine) -> None:
        self.kept = self.monitor.update_signals.before(engine, self.metrics)

    def after_update(self, engine) -> None:
        if self.kept is not None:
            self.monitor.update_signals.after(engine, self.kept, self.metrics)
            self.kept = None


class StabilityMonitor(Callback):
    """The ``monitor/*`` signals every ``every_steps`` steps and spike detection every step (see the
    module docstring). Runs before the job's own callbacks, so that they log what it adds."""

    priority = 100

    def __init__(self, monitor: MonitorConfig, train: TrainConfig, global_batch_size: int):
        """``monitor``: what to sample and the spike rule; ``train``: the clipping norm and Adam's beta2
        and eps the signals recompute; ``global_batch_size``: to name the rows of a spike's batch."""
        self.every_steps = monitor.every_steps
        self.global_batch_size = global_batch_size
        self.max_grad_norm, self.beta2, self.eps = train.gradient_clipping, train.adam_beta2, train.adam_eps
        self.detectors = (
            {
                metric: SpikeDetector(monitor.spike_window, monitor.spike_threshold_sd, monitor.spike_min_values)
                for metric in SPIKE_METRICS
            }
            if monitor.spikes
            else {}
        )
        self.spikes: list[Spike] = []
        self.rank = 0
        self.update_signals: Optional[UpdateSignals] = None
        self.forward_signals: Optional[ForwardSignals] = None
        self._probe: Optional[_Probe] = None

    @classmethod
    def from_config(cls, cfg: JobConfig) -> "StabilityMonitor":
        return cls(cfg.monitor, cfg.train, cfg.budget.global_batch_size)

    def on_train_start(self, start: TrainStart) -> None:
        self.rank = start.rank
        self.load_state_dict(start.trainer_state.get(STATE_KEY, {}))
        if self.every_steps and start.engine is not None:
            model = start.engine.module
            self.update_signals = UpdateSignals(model, self.max_grad_norm, self.beta2, self.eps)
            self.forward_signals = ForwardSignals(model)

    def probe(self, step: int) -> Optional[StepProbe]:
        if self.update_signals is None or step % self.every_steps:
            return None
        self._probe = _Probe(self)
        return self._probe

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self._probe is not None:
            metrics.update(self._probe.metrics)
            self._probe = None
        for metric, detector in self.detectors.items():
            if metric not in metrics:
                continue
            height = detector.update(metrics[metric])
            if height is None:
                continue
            metrics[SPIKE_METRICS[metric]] = height
            b = self.global_batch_size
            spike = Spike(
                metric, step, float(metrics[metric]), height, detector.mean, detector.sd, ((step - 1) * b, step * b)
            )
            self.spikes.append(spike)
            if self.rank == 0:
                log.warning(
                    "Spike in %s at step %d: %.4g is %.1f SDs above the mean %.4g of the previous %d values; "
                    "its batch is rows [%d, %d) of the seeded order (polypythia-batch --step %d).",
                    metric,
                    step,
                    spike.value,
                    height,
                    detector.mean,
                    detector.count,
                    *spike.batch_rows,
                    step,
                )

    def state_dict(self) -> dict:
        """The spike detectors' windows, as plain data."""
        return {metric: detector.state_dict() for metric, detector in self.detectors.items()}

    def load_state_dict(self, state: dict) -> None:
        """Windows saved by :meth:`state_dict`; a metric it lacks (an older checkpoint) starts empty."""
        for metric, detector in self.detectors.items():
            if metric in state:
                detector.load_state_dict(state[metric])

    def trainer_state(self) -> dict:
        return {STATE_KEY: self.state_dict()} if self.detectors else {}

    def on_train_end(self, result: TrainResult) -> None:
        result.spikes.extend(asdict(s) for s in self.spikes)
