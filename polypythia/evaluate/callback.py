"""Evaluation at every checkpoint during training: validation loss/perplexity and weight statistics.

Runs on rank 0 before a checkpoint is sealed, so its points are flushed to the tracker together
with the training points the checkpoint stands for (a resume never has to recompute them).
"""

from __future__ import annotations

import time

import torch

from polypythia.config import JobConfig
from polypythia.evaluate.perplexity import validation_loss
from polypythia.evaluate.weight_stats import weight_stats
from polypythia.train.callbacks import Callback, TrainStart


class CheckpointEvalCallback(Callback):
    """Computes ``valid/loss``, ``valid/ppl`` and ``weights/<feature>`` at each checkpoint step.

    The weight statistics follow ``train.weight_stats`` (``polypythias`` or ``hu``, see weight_stats.py);
    job.py records that definition as the run's ``weight_stats`` tag.
    """

    def __init__(self, cfg: JobConfig, log):
        self.cfg = cfg
        self.log = log  # log(step, {key: value})
        self.valid_rows = None

    def on_train_start(self, start: TrainStart) -> None:
        self.valid_rows = start.data.sequences.valid_rows(self.cfg.train.valid_max_rows)  # the job's own data

    def before_checkpoint(self, step: int, model: torch.nn.Module) -> None:
        started = time.perf_counter()
        metrics = {f"weights/{k}": v for k, v in weight_stats(model, definition=self.cfg.train.weight_stats).items()}
        if len(self.valid_rows):
            was_training = model.training
            device = next(model.parameters()).device
            loss, ppl = validation_loss(model, torch.from_numpy(self.valid_rows).to(device), self.cfg.budget.micro_batch_size)
            model.train(was_training)
            metrics.update({"valid/loss": loss, "valid/ppl": ppl})
        metrics["eval/seconds"] = time.perf_counter() - started
        self.log(step, metrics)
