"""Causal replay of a finished study: when would the live monitor have raised each alert?

``python -m analysis SOURCE --replay`` walks the study in step order and, at every decision step,
runs each registered outlier rule that decides step by step (:mod:`analysis.rules`; today the
``calibrated`` rule) on the data up to that step only; the run's first alert on each signal is its
alert. The signals are the metrics the outlier rules judge (the standardised accuracy, ``valid/loss``
or ``--outlier-metric``) and, when the study has per-step values of ``loss_signal`` (``train/loss``),
that signal smoothed (mean over the previous ``loss_window_steps`` steps), compared across runs at
the same decision steps, which is what the live monitor sees while a sweep trains.

Each alert's lead time is measured against the same rule's outlier onsets in the full (offline)
analysis: ``lead_steps = onset_step - alert_step``, positive when the replay alerts earlier.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from analysis.outliers import STANDARDISED_METRIC, OutlierRule, default_outlier_metrics, rule_knobs
from analysis.rules import knobs_of, registered, wide_by_seed
from analysis.rules.calibrated import first_alerts as first_alerts
from analysis.stats import checkpoint_steps
from polypythia.study import label_order, parse_run_label

ALERT_COLUMNS = [
    "model",
    "seed",
    "weight_seed",
    "data_seed",
    "signal",
    "rule",
    "alert_step",
    "deviation_sd",
    "threshold_sd",
    "onset_step",
    "lead_steps",
]
LOSS_SIGNAL = "train/loss"  # the per-step signal replayed smoothed, as the sweep's live monitor sees it


def smoothed_name(signal: str) -> str:
    """The name of a smoothed per-step signal among the replay's signals."""
    return f"{signal} (smoothed)"


SMOOTHED_LOSS = smoothed_name(LOSS_SIGNAL)


def smoothed_loss(
    metrics: pd.DataFrame, steps: np.ndarray, window_steps: int, signal: str = LOSS_SIGNAL
) -> pd.DataFrame:
    """Tidy rows of each run's mean ``signal`` over the ``window_steps`` steps up to each of ``steps``."""
    rows = []
    for (model, seed), run in metrics[metrics["metric"] == signal].groupby(["model", "seed"], observed=True):
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
                    "metric": smoothed_name(signal),
                    "value": mean[keep],
                }
            )
        )
    return (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(columns=["model", "seed", "step", "metric", "value"])
    )


def signals(
    metrics: pd.DataFrame,
    outlier_metrics: list[str] | None,
    score: pd.DataFrame | None,
    loss_window_steps: int | None,
    loss_signal: str,
) -> list[tuple[str, pd.DataFrame]]:
    """(signal, tidy rows holding it): the metrics the outlier rules judge, and the smoothed
    ``loss_signal`` when the study has per-step values of it."""
    if outlier_metrics is None:
        outlier_metrics = default_outlier_metrics(metrics, score is not None)
    found = [(m, score if m == STANDARDISED_METRIC and score is not None else metrics) for m in outlier_metrics]
    if (metrics["metric"] == loss_signal).any():
        steps = checkpoint_steps(metrics)
        window = loss_window_steps or max(1, int(metrics["step"].max()) // 100)
        smoothed = smoothed_loss(metrics, steps[steps > 0], window, loss_signal)
        found.append((smoothed_name(loss_signal), smoothed))
    return found


def with_lead_times(frame: pd.DataFrame, outliers: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """The alerts with each run's first offline onset of the same rule (``labels``: rule name ->
    its ``rule`` column in ``outliers``) and ``lead_steps = onset_step - alert_step``."""
    onsets = pd.DataFrame(columns=["model", "seed", "rule", "onset_step"])
    if not outliers.empty:
        by_label = {label: name for name, label in labels.items()}
        ours = outliers[outliers["rule"].isin(list(by_label))].assign(rule=lambda f: f["rule"].map(by_label))
        onsets = ours.groupby(["model", "seed", "rule"])["onset_step"].min().rename("onset_step").reset_index()
    frame = frame.merge(
        onsets.astype({"model": str, "seed": str, "rule": str}), on=["model", "seed", "rule"], how="left"
    )
    frame["lead_steps"] = frame["onset_step"] - frame["alert_step"]
    return frame


def replay(
    metrics: pd.DataFrame,
    outliers: pd.DataFrame,
    outlier_metrics: list[str] | None = None,
    rule: OutlierRule | None = None,
    score: pd.DataFrame | None = None,
    loss_window_steps: int | None = None,
    loss_signal: str = LOSS_SIGNAL,
    knobs: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The alerts of a causal replay (columns ``ALERT_COLUMNS``) of every registered rule that decides
    step by step, with lead times against ``outliers`` (the offline analysis's episodes,
    :func:`analysis.outliers.find_outliers`); knobs as :func:`analysis.outliers.rule_knobs` takes them."""
    chosen, labels, rows = rule_knobs(rule, None, knobs), {}, []
    for signal, source in signals(metrics, outlier_metrics, score, loss_window_steps, loss_signal):
        for model, table in wide_by_seed(source, signal).items():
            for each in registered():
                alerts = each.first_alerts(table, signal, knobs_of(each, chosen))
                labels[each.name] = each.label(knobs_of(each, chosen))
                rows += [{"model": model, "rule": each.name, **alert} for alert in alerts or []]
    columns = ["model", "seed", "signal", "rule", "alert_step", "deviation_sd", "threshold_sd"]
    frame = with_lead_times(pd.DataFrame(rows, columns=columns), outliers, labels)
    seeds = [parse_run_label(label) or (None, None) for label in frame["seed"]]
    frame["weight_seed"] = pd.array([w for w, _ in seeds], dtype="Int64")
    frame["data_seed"] = pd.array([d for _, d in seeds], dtype="Int64")
    order = frame["seed"].map(label_order)
    frame = (
        frame.assign(_order=order).sort_values(["model", "_order", "alert_step"], kind="stable").drop(columns="_order")
    )
    return frame[ALERT_COLUMNS].astype({"onset_step": "Int64", "lead_steps": "Int64"}).reset_index(drop=True)
