"""Agreement between per-item predictions of checkpoints: Cohen's kappa, as in PolyPythias.

Self-consistency compares each checkpoint's predictions with the same seed's final checkpoint;
inter-seed agreement compares each seed with a reference seed (seed 0, the original Pythia run)
at the same step (van der Wal et al., "PolyPythias", ICLR 2025, arXiv 2503.09543). A "seed" here
is any sortable key of a run: an int, or a (weight seed, data seed) pair when runs share a seed but
not their data order (the evaluation runner keys runs so). Predictions are per-item labels of one
task (e.g. the chosen answer index of each multiple-choice item), in the same item order everywhere.

Degenerate case. Kappa is (p_o - p_e) / (1 - p_e); when both prediction vectors hold one and
the same constant label, p_e = 1 and kappa is 0/0 (scikit-learn returns nan with a warning).
Early checkpoints often answer every item the same way, so this case is common. Here it is
defined as 1.0, since the two raters agree on every item; pass ``constant_kappa=float("nan")``
to keep it undefined instead. Two different constant vectors give 0.0 (no case needs a rule).
"""

from __future__ import annotations

from typing import Hashable, Mapping

import numpy as np
from sklearn.metrics import cohen_kappa_score

from polypythia.errors import PolypythiaError


class AgreementError(PolypythiaError, ValueError):
    """Predictions that cannot be compared (different lengths, empty, missing steps)."""


def _as_labels(predictions, name: str) -> np.ndarray:
    labels = np.asarray(predictions)
    if labels.ndim != 1 or labels.size == 0:
        raise AgreementError(
            f"{name} must be a non-empty 1-D sequence of per-item predictions, got shape {labels.shape}."
        )
    return labels


def cohen_kappa(a, b, *, constant_kappa: float = 1.0) -> float:
    """Cohen's kappa between two equal-length label vectors (scikit-learn's, unweighted).

    ``constant_kappa`` is returned when both vectors are the same single label (kappa is 0/0 there).
    """
    a, b = _as_labels(a, "a"), _as_labels(b, "b")
    if a.shape != b.shape:
        raise AgreementError(
            f"Predictions cover different numbers of items ({a.size} vs {b.size}); compare the same items."
        )
    if np.unique(np.concatenate([a, b])).size == 1:
        return float(constant_kappa)
    return float(cohen_kappa_score(a, b))


def self_consistency(
    preds_by_step: Mapping[int, object], final_step: int, *, constant_kappa: float = 1.0
) -> dict[int, float]:
    """Step -> kappa of that checkpoint's predictions against the ``final_step`` checkpoint's."""
    if final_step not in preds_by_step:
        raise AgreementError(
            f"final_step {final_step} has no predictions; the steps given are {sorted(preds_by_step)}."
        )
    final = preds_by_step[final_step]
    return {
        step: cohen_kappa(preds, final, constant_kappa=constant_kappa) for step, preds in sorted(preds_by_step.items())
    }


def inter_seed_agreement(
    preds_by_seed_step: Mapping[Hashable, Mapping[int, object]],
    reference_seed: Hashable = 0,
    *,
    constant_kappa: float = 1.0,
) -> dict[tuple[Hashable, int], float]:
    """(seed, step) -> kappa of that seed's predictions against ``reference_seed`` at the same step.

    ``preds_by_seed_step`` maps seed -> step -> predictions; a seed is any sortable run key (an int,
    or a (weight seed, data seed) pair). The reference seed itself is left out,
    and so are steps the reference seed has no predictions for (e.g. a run that stopped early).
    """
    if reference_seed not in preds_by_seed_step:
        raise AgreementError(
            f"reference seed {reference_seed} has no predictions; the seeds given are {sorted(preds_by_seed_step)}."
        )
    reference = preds_by_seed_step[reference_seed]
    agreement = {}
    for seed, by_step in sorted(preds_by_seed_step.items()):
        if seed == reference_seed:
            continue
        for step, preds in sorted(by_step.items()):
            if step in reference:
                agreement[(seed, step)] = cohen_kappa(preds, reference[step], constant_kappa=constant_kappa)
    return agreement
