"""Causal replay of a finished study: when would the live monitor have raised each alert?

``python -m analysis SOURCE --replay`` walks the study in step order and, at every decision step,
runs the outlier rule (:mod:`analysis.outliers`) on the data up to that step only; the run's
first alert on each signal is its alert. The signals are the metrics the outlier rule judges
(the standardised accuracy, ``valid/loss`` or ``--outlier-metric``) and, when the study has
per-step training losses, the smoothed ``train/loss`` (mean over the previous
``loss_window_steps`` steps), compared across runs at the same decision steps, which is what the
live monitor sees while a sweep trains.

Each alert's lead time is measured against the outlier onsets of the full (offline) analysis:
``lead_steps = onset_step - alert_step``, positive when the replay alerts earlier.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.outliers import (
    STANDARDISED_METRIC,
    OutlierRule,
    decision_threshold,
    default_outlier_metrics,
    for_study_length,
    pooled_deviation,
    wide_by_seed,
)
from analysis.stats import checkpoint_steps
from polypythia.study import label_order, parse_run_label

ALERT_COLUMNS = [
    "model",
    "seed",
    "weight_seed",
    "data_seed",
    "signal",
    "alert_step",
    "deviation_sd",
    "threshold_sd",
    "onset_step",
    "lead_steps",
]
SMOOTHED_LOSS = "train/loss (smoothed)"


def smoothed_loss(metrics: pd.DataFrame, steps: np.ndarray, window_steps: int) -> pd.DataFrame:
    """Tidy rows of each run's mean ``train/loss`` over the ``window_steps`` steps up to each of ``steps``."""
    rows = []
    for (model, seed), run in metrics[metrics["metric"] == "train/loss"].groupby(["model", "seed"], observed=True):
        run = run.sort_values("step")
        at, values = run["step"].to_numpy(), run["value"].to_numpy(dtype="float64")
        totals = np.r_[0.0, np.cumsum(values)]
        stop = np.searchsorted(at, steps, side="right")
        start = np.searchsorted(at, steps - window_steps, side="right")
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (totals[stop] - totals[start]) / (stop - start)
        keep = stop > start
        rows.append(
            pd.DataFrame(
                {
                    "model": str(model),
                    "seed": str(seed),
                    "step": steps[keep],
                    "metric": SMOOTHED_LOSS,
                    "value": mean[keep],
                }
            )
        )
    return (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(columns=["model", "seed", "step", "metric", "value"])
    )


def first_alerts(table: pd.DataFrame, signal: str, rule: OutlierRule) -> list[dict]:
    """Each run's first alert on one (step x run) table, deciding at every step from rows up to it."""
    table = table.dropna(how="all")
    rule = for_study_length(rule, table.shape[0])
    threshold = decision_threshold(table.shape[1], table.shape[0], rule)  # the planned schedule is known ahead
    alerts: dict[str, dict] = {}
    for position, step in enumerate(table.index):
        latest = pooled_deviation(table.iloc[: position + 1], rule).iloc[-1]  # nothing after `step` is read
        for seed, deviation in latest.items():
            if str(seed) not in alerts and np.isfinite(deviation) and abs(deviation) > threshold:
                alerts[str(seed)] = {
                    "seed": str(seed),
                    "signal": signal,
                    "alert_step": int(step),
                    "deviation_sd": float(deviation),
                    "threshold_sd": float(threshold),
                }
    return list(alerts.values())


def replay(
    metrics: pd.DataFrame,
    outliers: pd.DataFrame,
    outlier_metrics: list[str] | None = None,
    rule: OutlierRule = OutlierRule(),
    score: pd.DataFrame | None = None,
    loss_window_steps: int | None = None,
) -> pd.DataFrame:
    """The alerts of a causal replay (columns ``ALERT_COLUMNS``), with lead times against ``outliers``
    (the offline analysis's episodes, :func:`analysis.outliers.find_outliers`)."""
    signals = []
    if outlier_metrics is None:
        outlier_metrics = default_outlier_metrics(metrics, score is not None)
    for metric in outlier_metrics:
        source = score if metric == STANDARDISED_METRIC and score is not None else metrics
        signals.append((metric, source))
    if (metrics["metric"] == "train/loss").any():
        steps = checkpoint_steps(metrics)
        last = int(metrics["step"].max())
        window = loss_window_steps or max(1, last // 100)
        signals.append((SMOOTHED_LOSS, smoothed_loss(metrics, steps[steps > 0], window)))
    rows = []
    for signal, source in signals:
        for model, table in wide_by_seed(source, signal).items():
            rows += [{"model": model, **alert} for alert in first_alerts(table, signal, rule)]
    frame = pd.DataFrame(rows, columns=["model", "seed", "signal", "alert_step", "deviation_sd", "threshold_sd"])
    onsets = (
        (
            outliers[outliers["rule"] == "calibrated"]
            .groupby(["model", "seed"])["onset_step"]
            .min()
            .rename("onset_step")
            .reset_index()
        )
        if not outliers.empty
        else pd.DataFrame(columns=["model", "seed", "onset_step"])
    )
    frame = frame.merge(onsets.astype({"model": str, "seed": str}), on=["model", "seed"], how="left")
    frame["lead_steps"] = frame["onset_step"] - frame["alert_step"]
    seeds = [parse_run_label(label) or (None, None) for label in frame["seed"]]
    frame["weight_seed"] = pd.array([w for w, _ in seeds], dtype="Int64")
    frame["data_seed"] = pd.array([d for _, d in seeds], dtype="Int64")
    order = frame["seed"].map(label_order)
    frame = (
        frame.assign(_order=order).sort_values(["model", "_order", "alert_step"], kind="stable").drop(columns="_order")
    )
    return frame[ALERT_COLUMNS].astype({"onset_step": "Int64", "lead_steps": "Int64"}).reset_index(drop=True)
