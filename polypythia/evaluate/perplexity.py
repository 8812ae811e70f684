"""Validation loss and perplexity of a causal LM on fixed rows of tokens.

Each row holds ``seq + 1`` tokens, as Pythia's batch viewer reads them (EleutherAI/pythia,
``utils/batch_viewer.py``): the model reads ``row[:-1]`` and is scored on predicting ``row[1:]``. The loss is
the mean next-token cross entropy (nats) over every target token of every row, so rows weigh
by their token count and the result does not depend on ``batch_size``; perplexity is
``exp(mean loss)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from polypythia.errors import PolypythiaError


class PerplexityError(PolypythiaError, ValueError):
    """Token rows or a batch size that a validation loss cannot be computed on."""


def _as_token_rows(token_rows) -> torch.Tensor:
    rows = token_rows if isinstance(token_rows, torch.Tensor) else torch.from_numpy(np.asarray(token_rows))
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] < 2:
        raise PerplexityError(
            f"token_rows must be a 2-D array [rows, seq + 1] with at least one row of 2+ tokens, got shape {tuple(rows.shape)}."
        )
    if rows.is_floating_point():
        raise PerplexityError(f"token_rows must hold integer token ids, got dtype {rows.dtype}.")
    return rows.long()


@torch.no_grad()
def summed_token_loss(model: torch.nn.Module, rows: torch.Tensor) -> float:
    """Sum of next-token cross entropies (nats) over every target token of ``rows``."""
    logits = model(input_ids=rows[:, :-1]).logits
    targets = rows[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()


def validation_loss(model: torch.nn.Module, token_rows, batch_size: int) -> tuple[float, float]:
    """(mean next-token loss in nats, perplexity) of ``model`` on ``token_rows`` [n, seq + 1].

    Runs in eval mode without gradients on the model's device, ``batch_size`` rows at a time,
    and puts the model back in the mode it was in.
    """
    if batch_size < 1:
        raise PerplexityError(f"batch_size must be a positive number of rows, got {batch_size}.")
    rows = _as_token_rows(token_rows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        total_loss_nats = sum(
            summed_token_loss(model, rows[start : start + batch_size].to(device))
            for start in range(0, rows.shape[0], batch_size)
        )
    finally:
        model.train(was_training)
    mean_token_loss = total_loss_nats / (rows.shape[0] * (rows.shape[1] - 1))
    return mean_token_loss, math.exp(mean_token_loss)
