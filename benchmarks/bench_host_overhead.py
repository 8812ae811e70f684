"""Host overhead of a training step: aten ops dispatched and host time per optimizer step, a plain
PyTorch loop against polypythia's step, on CPU in a dispatch-bound configuration.

On a GPU a small model's step is host-bound: the CPU spends its time issuing kernels, and each aten op
it dispatches is at least one launch. On a CPU with tiny tensors every op finishes about as fast as it
is issued, so the step's wall time is that host work, and the ops a step dispatches are counted
exactly (a ``TorchDispatchMode`` sees every aten op below autograd, backward included). The shapes
keep Pythia's layer structure (``--models``: the number of layers and heads, hence of tensors and
ops, of 70m and 160m) at a narrow width (``--hidden``, 0: the shape's own) and a small vocabulary,
micro-batch 1, ``--seq-length`` tokens.

For each shape and precision (fp32; bf16; fp16 with dynamic loss scaling):

- ``plain``: the loop a researcher writes: autocast to bf16/fp16 (fp32 weights; ``GradScaler`` under
  fp16), SDPA, torch AdamW with ``fused=True``, ``clip_grad_norm_(foreach=True)``, loss and gradient
  norm read back as floats;
- ``ours``: ``polypythia.train.step.train_step`` on the DeepSpeed engine exactly as a job builds it
  (``build_training_model``, ``build_engine``; one rank: ZeRO stage 0 in fp32, the configured stage
  ``train.autocast`` in bf16/fp16, the default: fp32 weights at ZeRO 0; with ``--no-autocast``, DeepSpeed's
  bf16/fp16 weights at the configured stage), monitor off;
- ``ours+probe``: the same step probed by the stability monitor (every signal, as on its sampled steps).

Ops and host reads (``item()``, ``float()``, ``tolist()`` of a tensor: a device synchronisation each on a
GPU) are counted on one step after ``--warmup``; host time is the median step over ``--rounds``
interleaved rounds of ``--steps`` steps (plain, ours, ours+probe in turn). Ratios: ops ours/plain,
host time plain/ours. The last two lines are the worst monitor-off path's
``ops/step ratio`` and ``host time ratio``.

    python benchmarks/bench_host_overhead.py [--models 70m,160m] [--precisions fp32,bf16,fp16] [--hidden 64] [--no-autocast]
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from common import bench_home, job_dict, machine_description, median, model_shape
from torch.utils._python_dispatch import TorchDispatchMode

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class Plain:
    """The plain loop: fp32 weights, autocast, fused AdamW, foreach clipping, GradScaler under fp16."""

    def __init__(self, cfg, vocab: int, precision: str):
        from polypythia.train.engine import build_training_model, param_groups

        self.model = build_training_model(cfg, vocab).train()
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, t.weight_decay),
            lr=cfg.model.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            fused=True,
        )
        self.dtype = AUTOCAST[precision]
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=precision == "fp16")
        self.clip = t.gradient_clipping

    def step(self, rows) -> tuple[float, float]:
        batch = torch.from_numpy(rows)
        with torch.autocast("cpu", dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            logits = self.model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), float(norm)


class Ours:
    """polypythia's step on the engine a job builds; ``probed``: the stability monitor probes every step."""

    def __init__(self, cfg, vocab: int, probed: bool):
        from polypythia.train.callbacks import TrainStart
        from polypythia.train.engine import build_engine, build_training_model
        from polypythia.train.monitor import StabilityMonitor

        model = build_training_model(cfg, vocab)
        self.engine = build_engine(cfg, model, 1)
        self.micro = cfg.budget.micro_batch_size
        self.monitor = None
        if probed:
            self.monitor = StabilityMonitor.from_config(cfg)
            self.monitor.every_steps = 1
            self.monitor.on_train_start(
                TrainStart(
                    0,
                    1,
                    0,
                    vocab,
                    self.engine.zero_optimization_stage(),
                    sum(p.numel() for p in model.parameters()),
                    (),
                    None,
                    self.engine,
                )
            )
        self.done = 0

    def step(self, rows) -> tuple[float, float]:
        from polypythia.train.step import train_step

        self.done += 1
        probes = [self.monitor.probe(self.done)] if self.monitor else []
        loss, norm, _ = train_step(self.engine, self.engine, rows, self.micro, probes)
        if self.monitor:
            self.monitor.on_step_end(self.done, {"train/loss": loss, "train/grad_norm": norm})
        return loss, norm


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's CPU accelerator says it has no fp16 (``is_fp16_supported``), and the engine refuses
    it; lifting that one answer runs the fp16 engine's own code path (ZeRO optimizer, dynamic loss
    scaling) on CPU, which is what the op count is about."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if not torch.cuda.is_available():
        accelerator.is_fp16_supported = lambda: True


def job_cfg(home, name: str, precision: str, args):
    from polypythia.config.jobconfig import job_config

    raw = job_dict(
        home,
        name,
        10,
        threads=args.threads,
        checkpoints=False,
        seq_length=args.seq_length,
        global_batch_size=1,
        micro_batch_size=1,
    )
    if args.hidden:
        raw["model"]["hidden_size"] = args.hidden
    raw["model"]["vocab_size"] = args.vocab
    raw["train"]["precision"] = precision
    raw["train"]["autocast"] = not args.no_autocast
    if precision == "fp16":  # the config refuses fp16 without a GPU; the engine is tried on CPU all the same
        raw["launcher"]["num_gpus_per_job"] = 1
    return job_config(raw)


def count_ops(variant, rows) -> tuple[collections.Counter, int]:
    """The aten ops of one step, and its host reads: each ``item()``/``float()`` of a tensor is an aten
    ``_local_scalar_dense``, and each ``tolist()`` (which dispatches no aten op on CPU) is counted here; on
    a GPU each is a device synchronisation."""
    tolist, calls = torch.Tensor.tolist, [0]

    def counted_tolist(self):
        calls[0] += 1
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with OpCounter() as counter:
            variant.step(rows)
    finally:
        torch.Tensor.tolist = tolist
    return counter.ops, counter.ops["aten._local_scalar_dense"] + calls[0]


def measure(home, name: str, precision: str, args) -> dict:
    """Ops of one step and median host seconds per step of each variant, rounds interleaved."""
    import numpy as np

    cfg = job_cfg(home, name, precision, args)
    variants = {
        "plain": Plain(cfg, args.vocab, precision),
        "ours": Ours(cfg, args.vocab, False),
        "ours+probe": Ours(cfg, args.vocab, True),
    }
    rng = np.random.default_rng(0)
    rows = rng.integers(0, args.vocab, (1, args.seq_length + 1), dtype=np.int64)
    for variant in variants.values():
        for _ in range(args.warmup):
            variant.step(rows)
    ops = {key: count_ops(variant, rows) for key, variant in variants.items()}
    times = {key: [] for key in variants}
    for _ in range(args.rounds):
        for key, variant in variants.items():
            for _ in range(args.steps):
                started = time.perf_counter()
                variant.step(rows)
                times[key].append(time.perf_counter() - started)
    return {key: (*ops[key], median(times[key])) for key in variants}


def report(name: str, precision: str, result: dict, top: int) -> list[tuple[str, float, float]]:
    """Prints the shape's lines; returns (variant, ops ratio, host time ratio) of ours and ours+probe."""
    plain_ops, _, plain_s = result["plain"]
    rows = []
    for key, (ops, reads, seconds) in result.items():
        n = sum(ops.values())
        line = (
            f"{name:>5} {precision:<5} {key:<11} {n:7d} ops/step  {reads:2d} host reads  {seconds * 1e3:8.2f} ms/step"
        )
        if key != "plain":
            ops_ratio, time_ratio = n / sum(plain_ops.values()), plain_s / seconds
            line += f"   ops ratio {ops_ratio:5.2f}  host time ratio {time_ratio:5.2f}"
            rows.append((f"{name} {precision} {key}", ops_ratio, time_ratio))
        print(line, flush=True)
    extra = result["ours"][0] - plain_ops
    if top and extra:
        print("      most extra ops (ours - plain): " + ", ".join(f"{op} +{n}" for op, n in extra.most_common(top)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--models", default="70m,160m")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument(
        "--hidden", type=int, default=96, help="width (0: the shape's own); 96 divides by 8 and 12 heads"
    )
    parser.add_argument("--vocab", type=int, default=8192, help="at least the embedded tokenizer's 8,192")
    parser.add_argument("--seq-length", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-autocast", action="store_true", help="ours with train.autocast=false: DeepSpeed's bf16/fp16 weights"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--top", type=int, default=8, help="extra ops to name per shape (0: none)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from polypythia.train.distributed import init_distributed

    init_distributed()
    if "fp16" in args.precisions:
        allow_fp16_on_cpu()
    print(machine_description())
    print(
        f"hidden {args.hidden or 'as the shape'}, vocab {args.vocab}, seq {args.seq_length}, micro-batch 1, "
        f"{args.threads} thread(s); {args.rounds} rounds x {args.steps} steps after {args.warmup}; "
        f"train.autocast={str(not args.no_autocast).lower()}"
    )
    found = []
    with bench_home("polypythia-host-") as home:
        for name in args.models.split(","):
            model_shape(name)  # fails early on an unknown shape
            for precision in args.precisions.split(","):
                found += report(name, precision, measure(home, name, precision, args), args.top)
    off = [row for row in found if row[0].endswith("ours")]
    probed = [row for row in found if row[0].endswith("probe")]
    print(
        f"worst probed: ops ratio {max(r[1] for r in probed):.2f} ({max(probed, key=lambda r: r[1])[0]}), "
        f"host time ratio {min(r[2] for r in probed):.2f} ({min(probed, key=lambda r: r[2])[0]})"
    )
    worst_ops, worst_time = max(off, key=lambda r: r[1]), min(off, key=lambda r: r[2])
    print(f"ops/step ratio: {worst_ops[1]:.2f}  ({worst_ops[0]}, monitor off)")
    print(f"host time ratio: {worst_time[2]:.2f}  ({worst_time[0]}, monitor off)")


if __name__ == "__main__":
    main()
