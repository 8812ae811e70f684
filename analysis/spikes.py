"""Loss spikes per run (OLMo 2 style) on ``train/loss`` and ``train/grad_norm``.

A value is a spike point when it lies at least ``threshold_sd`` rolling standard deviations
from the rolling mean of the previous ``window_values`` values (the value itself is not in its
window). The spike score of a run is the share of such points among the values that have a full
window. Consecutive spike points form one spike; a spike ends at the first later value that is
back inside the band frozen at the spike's onset (onset rolling mean +/- threshold x onset rolling
SD) - freezing the band keeps the spike itself from widening the band it is measured against.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.tidy_table import run_blocks

SPIKE_METRICS = ("train/loss", "train/grad_norm")
SCORE_COLUMNS = ["model", "seed", "metric", "n_values", "n_spike_values", "spike_score", "n_spikes"]
SPIKE_COLUMNS = [
    "model",
    "seed",
    "metric",
    "step",
    "value",
    "height_sd",
    "recovered",
    "recovery_step",
    "steps_to_recover",
]


def rolling_band(values: np.ndarray, window_values: int) -> tuple[np.ndarray, np.ndarray]:
    """Rolling mean and SD (ddof=1) of the previous ``window_values`` values (NaN until the window is full)."""
    previous = pd.Series(values).shift(1).rolling(window_values, min_periods=window_values)
    return previous.mean().to_numpy(), previous.std().to_numpy()


def spike_deviation(values: np.ndarray, window_values: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed deviation of each value from its rolling band, in rolling SDs, with the band's mean and SD."""
    mean, sd = rolling_band(values, window_values)
    with np.errstate(invalid="ignore", divide="ignore"):
        deviation_sd = (values - mean) / sd
    deviation_sd[sd == 0] = np.where(values[sd == 0] == mean[sd == 0], 0.0, np.inf)
    return deviation_sd, mean, sd


def spikes_of_series(
    steps: np.ndarray, values: np.ndarray, window_values: int, threshold_sd: float
) -> tuple[dict, list[dict]]:
    """Spike score and spike list of one metric series of one run (steps ascending)."""
    deviation_sd, mean, sd = spike_deviation(values, window_values)
    has_window = ~np.isnan(deviation_sd)
    is_spike = has_window & (np.abs(np.nan_to_num(deviation_sd)) >= threshold_sd)
    onsets = np.flatnonzero(is_spike)
    spikes, covered_until = [], -1
    for onset in onsets:  # a loop over spikes (few), never over points
        if onset <= covered_until:
            continue
        later = values[onset + 1 :]
        inside = np.abs(later - mean[onset]) < threshold_sd * sd[onset]
        back = onset + 1 + int(np.argmax(inside)) if inside.any() else None
        end = back if back is not None else len(values)
        extreme = onset + int(np.argmax(np.abs(values[onset:end] - mean[onset])))
        spikes.append(
            {
                "step": int(steps[onset]),
                "value": float(values[onset]),
                "height_sd": float((values[extreme] - mean[onset]) / sd[onset]) if sd[onset] > 0 else float("inf"),
                "recovered": back is not None,
                "recovery_step": int(steps[back]) if back is not None else None,
                "steps_to_recover": int(steps[back] - steps[onset]) if back is not None else None,
            }
        )
        covered_until = end - 1
    n_values = int(has_window.sum())
    score = {
        "n_values": n_values,
        "n_spike_values": int(is_spike.sum()),
        "spike_score": float(is_spike.sum() / n_values) if n_values else float("nan"),
        "n_spikes": len(spikes),
    }
    return score, spikes


def runs_of(metrics: pd.DataFrame, names, blocks: pd.DataFrame | None = None):
    """(model, seed, metric), steps and values of each run of the metrics in ``names``, steps ascending,
    in (model, seed, metric) order: array slices of the table when it is laid out as ``tidy`` leaves it
    (:func:`analysis.tidy_table.run_blocks`), else grouped and sorted."""
    blocks = run_blocks(metrics, names) if blocks is None else blocks[blocks["metric"].isin(list(names)).to_numpy()]
    if blocks is not None:
        steps, values = metrics["step"].to_numpy(), metrics["value"].to_numpy(dtype="float64")
        for block in blocks.itertuples():
            yield (
                (block.model, block.seed, block.metric),
                steps[block.start : block.stop],
                values[block.start : block.stop],
            )
        return
    wanted = metrics[metrics["metric"].isin(list(names))]
    for key, run in wanted.groupby(["model", "seed", "metric"], observed=True, sort=True):
        run = run.sort_values("step")
        yield key, run["step"].to_numpy(), run["value"].to_numpy(dtype="float64")


def find_spikes(
    metrics: pd.DataFrame,
    spike_metrics=SPIKE_METRICS,
    window_values: int = 1000,
    threshold_sd: float = 7.0,
    blocks: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Spike scores (one row per run and metric) and the spike list (one row per spike).

    ``window_values`` counts logged values, not steps (a run that logs every 10 steps looks back
    10,000 steps with the default 1,000). ``blocks``: :func:`analysis.tidy_table.run_blocks` of ``metrics``.
    """
    scores, spikes = [], []
    for (model, seed, metric), steps, values in runs_of(metrics, spike_metrics, blocks):
        score, found = spikes_of_series(steps, values, window_values, threshold_sd)
        key = {"model": str(model), "seed": str(seed), "metric": str(metric)}
        scores.append({**key, **score})
        spikes.extend({**key, **spike} for spike in found)
    return (
        pd.DataFrame(scores, columns=SCORE_COLUMNS),
        pd.DataFrame(spikes, columns=SPIKE_COLUMNS).astype({"recovery_step": "Int64", "steps_to_recover": "Int64"}),
    )
