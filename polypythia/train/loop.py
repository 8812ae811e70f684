"""The training job: a Pythia model, its seeded data order and a DeepSpeed engine, step by step.

Nothing here knows about Ray, Hydra or MLflow. Side effects (metrics, progress, tracking of
checkpoints) go through :class:`~polypythia.train.callbacks.Callback` hooks; the job that calls
:func:`train` chooses them. One process runs one data-parallel rank (see
:mod:`polypythia.train.distributed`).

:func:`train` reads top to bottom, one call per piece, in the manner of nanoGPT's ``train.py``
(https://github.com/karpathy/nanoGPT) and torchtitan's trainer (https://github.com/pytorch/torchtitan):
set-up, then for each step the batch, the step, its metrics and the callbacks, then the end. The
pieces live in their own modules: :mod:`~polypythia.train.engine` (model, optimizer, DeepSpeed),
:mod:`~polypythia.train.resume`, :mod:`~polypythia.train.step`, :mod:`~polypythia.train.checkpointer`,
:mod:`~polypythia.train.guards` (the job's own callbacks: divergence detection, the stability monitor of
:mod:`~polypythia.train.monitor`, a callback that probes sampled steps, and
:mod:`~polypythia.train.skipstep`, ``monitor.action=skip_step``: updates skipped inside the step),
:mod:`~polypythia.train.faults` (fault injection, as callbacks) and :mod:`~polypythia.train.rewind`
(the batches a rewound run skips).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from polypythia.config.jobconfig import JobConfig
from polypythia.train.callbacks import Callback, TrainResult, TrainStart, in_order
from polypythia.train.checkpointer import Checkpointer
from polypythia.train.data import load_training_data
from polypythia.train.distributed import init_distributed
from polypythia.train.engine import build_engine, build_training_model
from polypythia.train.guards import callbacks_from_config
from polypythia.train.resume import plan_resume, resume
from polypythia.train.rewind import batch_index
from polypythia.train.rewind import load as load_rewinds
from polypythia.train.schedule import checkpoint_steps
from polypythia.train.skipstep import SkipStep
from polypythia.train.step import StepMetrics, matmul_params, train_step
from polypythia.train.threads import fix_threads

__all__ = ["Callback", "TrainResult", "TrainStart", "train"]


def train(cfg: JobConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; returns its losses and checkpoints."""
    budget = cfg.budget
    fix_threads(cfg)  # before the model is built: the count decides the numbers (polypythia.train.threads)
    rank, world_size = init_distributed()
    data = load_training_data(cfg)
    vocab_size = cfg.model.padded_vocab_size(data.tokenizer_vocab_size)
    model = build_training_model(cfg, vocab_size)
    plan = plan_resume(cfg, world_size)  # before the engine: a resume across worker counts configures it
    engine = build_engine(cfg, model, world_size, load_universal=plan.load_universal)
    forward = torch.compile(engine.module) if cfg.train.compile else engine
    start_step, last_loss = resume(engine, plan)
    rewinds = load_rewinds(cfg.run_dir)  # the batches the run skipped when it was rewound (train/rewind.py)

    schedule = checkpoint_steps(budget.steps, budget.checkpoint_every_steps, budget.log_spaced_checkpoints)
    callbacks = in_order([*callbacks, *callbacks_from_config(cfg)])
    start = TrainStart(
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        vocab_size=vocab_size,
        zero_stage=plan.stage,
        num_params=sum(p.numel() for p in model.parameters()),
        checkpoint_steps=tuple(schedule),
        data=data,
        engine=engine,
        trainer_state=plan.state,
    )
    for cb in callbacks:
        cb.on_train_start(start)
    skip = next((cb for cb in callbacks if isinstance(cb, SkipStep)), None)  # monitor.action=skip_step
    checkpointer = Checkpointer(cfg, engine, data, schedule, callbacks)
    step_metrics = StepMetrics(cfg, matmul_params(model), world_size)
    if start_step == 0:
        checkpointer.save_if_due(0, last_loss)  # the initial weights

    losses: list[float] = []  # of the steps this process runs
    for step in range(start_step, budget.steps):
        started = time.perf_counter()
        done = step + 1  # optimizer steps taken after this one; the loss is that of the batch before this update
        rows = data.batch(batch_index(step, rewinds), rank, world_size)
        for cb in callbacks:  # fault injection may replace the batch
            rows = cb.on_batch(done, rows)
        probes = [p for cb in callbacks if (p := cb.probe(done)) is not None]  # the stability monitor's sampled steps
        loss, grad_norm, extra = train_step(
            engine, forward, rows, budget.micro_batch_size, probes, cfg.train.z_loss, skip
        )
        metrics = {**step_metrics(step, loss, grad_norm, time.perf_counter() - started), **extra}
        # may stop the run (divergence) or change the metrics (fault injection, the monitor's signals)
        for cb in callbacks:
            cb.on_step_end(done, metrics)
        losses.append(metrics["train/loss"])
        checkpointer.save_if_due(done, losses[-1])

    final_loss = losses[-1] if losses else last_loss
    result = TrainResult(cfg.run_name, budget.steps, start_step, final_loss, losses, checkpointer.saved)
    for cb in callbacks:
        cb.on_train_end(result)
    return result
