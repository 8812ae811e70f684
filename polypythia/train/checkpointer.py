"""Writing a run's checkpoints during training: when (the Pythia schedule) and how (every rank
writes its engine state, rank 0 the weights, tokenizer and trainer state, then seals them).

The on-disk layout, sealing and verification are :mod:`polypythia.train.checkpoint`; reading a
checkpoint back to continue is :mod:`polypythia.train.resume`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from polypythia.config.jobconfig import JobConfig, to_dict
from polypythia.qknorm import write_loading_note
from polypythia.train import checkpoint as ckpt
from polypythia.train.callbacks import Callback
from polypythia.train.data import TrainingData
from polypythia.train.distributed import barrier
from polypythia.train.engine import fp32_weights, resolve_precision


class Checkpointer:
    """Saves the checkpoints of ``schedule``; ``saved`` lists those this process sealed (rank 0)."""

    def __init__(
        self, cfg: JobConfig, engine, data: TrainingData, schedule: Sequence[int], callbacks: Sequence[Callback]
    ):
        self.cfg, self.engine, self.data, self.callbacks = cfg, engine, data, callbacks
        self.run_dir = Path(cfg.run_dir)
        self.schedule = frozenset(schedule)
        self.saved: list[str] = []

    def save_if_due(self, step: int, loss: float) -> None:
        """Save the checkpoint of ``step`` if the schedule has one there; ``loss`` is that of the
        step's batch, kept in the trainer state."""
        if step in self.schedule:
            self.save(step, loss)

    def keeps_resume_state(self, step: int) -> bool:
        """Whether checkpoint ``step`` gets a resume state (``state/``: DeepSpeed's model and optimizer,
        about three times the weights) besides its weights: on the regular grid (every
        ``budget.checkpoint_every_steps``), at the last step, and at log-spaced steps from half an
        interval on. An early log-spaced checkpoint (1, 2, 4, ...) protects less work than writing its
        state costs, so a job killed before half an interval resumes from the one before, or starts
        afresh from its seed (which rebuilds the same run)."""
        every = self.cfg.budget.checkpoint_every_steps
        return step % every == 0 or step == self.cfg.budget.steps or 2 * step >= every

    def save(self, step: int, loss: float) -> None:
        """Every rank writes its part into ``step<S>.partial``; once all have, rank 0 runs the
        ``before_checkpoint`` callbacks (what the checkpoint stands for is then durable), seals the
        checkpoint, drops old resume states and runs the ``on_checkpoint`` callbacks."""
        cfg, engine = self.cfg, self.engine
        rank = torch.distributed.get_rank()
        if rank == 0:
            ckpt.begin(self.run_dir, step)
        barrier()
        directory = ckpt.partial_dir(self.run_dir, step)
        with ckpt.writing(directory, step):  # a full disk: one line, the half-written folder removed
            self._write(directory, step, loss, rank)
        barrier()
        if rank == 0:
            for cb in self.callbacks:
                cb.before_checkpoint(step, engine.module)
            final = ckpt.commit(self.run_dir, step)
            ckpt.prune_resume_states(self.run_dir, cfg.train.keep_resume_states)
            self.saved.append(str(final))
            for cb in self.callbacks:
                cb.on_checkpoint(step, str(final), engine.module)
        barrier()

    def _write(self, directory: Path, step: int, loss: float, rank: int) -> None:
        cfg, engine = self.cfg, self.engine
        if self.keeps_resume_state(step):
            engine.save_checkpoint(str(directory / "state"), tag=ckpt.STATE_TAG)
        if rank == 0:
            engine.module.save_pretrained(directory, safe_serialization=True)
            if cfg.model.qk_layernorm:  # not loadable by GPTNeoXForCausalLM: the folder says how to load it
                write_loading_note(directory)
            self.data.save_tokenizer(directory)
            kept = {key: value for cb in self.callbacks for key, value in cb.trainer_state().items()}
            ckpt.save_trainer_state(
                directory,
                {
                    **kept,
                    "step": step,
                    "weight_seed": cfg.effective_weight_seed,
                    "data_seed": cfg.effective_data_seed,
                    "world_size": torch.distributed.get_world_size(),
                    "zero_stage": engine.zero_optimization_stage(),
                    "precision": resolve_precision(cfg.train.precision),
                    "fp32_weights": fp32_weights(cfg, torch.distributed.get_world_size()),
                    "loss": loss,
                    # what a relaunch without run_config.json is checked against
                    "config": to_dict(cfg),
                },
            )
