"""Outlier runs: runs whose trajectory of a metric leaves the band of their sibling seeds.

PolyPythias (Van der Wal et al., ICLR 2025, section 4 and Fig. 4) calls a seed an outlier when
its standardised downstream score leaves the cross-seed band, about +/-2 SD. Read literally, as
"outside 2 SD at some checkpoint", that rule calls healthy seeds outliers: with ten seeds and 27
checkpoints there are 270 chances, consecutive checkpoints are nearly the same model (their noise
is correlated, so "three checkpoints in a row" is not rare), and some seeds sit persistently a
little above or below the rest. So the decision here is made differently, and the study's band
deviation is still reported beside it as a column.

The deviation (:func:`pooled_deviation`). At each checkpoint, each run is compared with the
*other* runs (leave-one-out, so an outlier does not widen its own band): its distance from their
mean, in units of their standard deviation. Runs far from the median (more than ``exclude_sd``
robust SDs, 1.4826 x MAD) are left out of everyone else's band too, so that two runs collapsing
together do not hide each other (410M in the study). Ten seeds give a noisy SD at any one
checkpoint, so the variance is pooled over the current and the previous ``scale_window - 1``
checkpoints. Every number at a checkpoint uses that checkpoint and earlier ones only: the same
code decides offline, live during a sweep, and in a causal replay of a finished study: it lives in
:mod:`polypythia.stability` (the sweep's driver uses it; ``polypythia`` never imports ``analysis``)
and is re-exported here.

The decision (:func:`decision_threshold`). A run starts an outlier episode at the first
checkpoint where |deviation| exceeds a threshold chosen so that a study of healthy runs of the
same shape (runs x checkpoints) has any episode with probability ``false_alarm_rate`` (0.001). The
threshold is the (1 - rate) quantile of the largest |deviation| over 6,000 healthy studies
simulated for each of four null models (``NULL_MODELS``: noise independent between checkpoints;
AR(1) with correlation 0.9; half the variance a constant per-run offset plus AR(1) noise with
correlation 0.5 or 0.9); the largest of the four is used, so that neither correlated checkpoints
nor persistent offsets raise the rate. The deviation does not depend on the metric's location or
scale at a checkpoint, so the threshold holds for any metric. Ten runs and 27 checkpoints give
about 6.9 SD. The episode lasts while the run stays beyond the study's
band (``band_sd``, 2 SD) on the same side, and has *recovered* when it comes back inside.
``docs/analysis.md`` gives the false-alarm and detection rates measured by
``benchmarks/bench_outliers.py``.

A second rule, for studies' final losses: ``mad`` - |x - median| / (1.4826 MAD) > 3.5 over the
runs' final values, which must also be 1% away from the median (a loss 0.3% off is not an
outlier whatever its robust z-score).

The rules are a registry (:mod:`analysis.rules`: ``calibrated`` and ``mad``, one module each):
:func:`find_outliers` prepares what they judge and runs every registered rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.rules import OUTLIER_COLUMNS as OUTLIER_COLUMNS
from analysis.rules import Judged, concat_outliers, knobs_of, outlier_frame, registered, wide_by_seed
from analysis.rules.calibrated import OutlierRule, band_deviation, episodes, first_alerts, flag_trajectory_outliers
from analysis.rules.mad import (
    MIN_SEEDS_FOR_MAD,
    MadKnobs,
    final_row,
    final_rows,
    flag_mad_outliers,
    mad_flags,
    robust_deviation,
)
from polypythia.stability import (  # re-exported: the calibration lives with the live monitor's rule
    CALIBRATION_STUDIES,
    NULL_MODELS,
    _deviation_array,
    _window_mean,
    decision_threshold,
    for_study_length,
    largest_null_deviations,
    null_studies,
    pooled_deviation,
)
from polypythia.study import PER_STEP_FAMILIES, label_order

__all__ = [  # the names other modules and benchmarks import from here
    "CALIBRATION_STUDIES",
    "MIN_SEEDS_FOR_MAD",
    "NULL_MODELS",
    "OUTLIER_COLUMNS",
    "MadKnobs",
    "OutlierRule",
    "_deviation_array",
    "_window_mean",
    "band_deviation",
    "decision_threshold",
    "episodes",
    "final_row",
    "final_rows",
    "first_alerts",
    "flag_mad_outliers",
    "flag_trajectory_outliers",
    "for_study_length",
    "largest_null_deviations",
    "mad_flags",
    "null_studies",
    "outlier_frame",
    "pooled_deviation",
    "robust_deviation",
    "wide_by_seed",
]

DEFAULT_TASKS = ("arc_easy", "lambada_openai", "piqa", "sciq")
STANDARDISED_METRIC = "standardised_accuracy"
DEFAULT_LOSS_SIGNAL = "valid/loss"  # the loss the trajectory rule judges when no metric is named
# Metric families that are not trajectories to judge runs by: the per-step families (spikes.py and
# the replay's smoothed loss look at training curves) and the weight statistics (training maps).
NOT_OUTLIER_TARGETS = (*PER_STEP_FAMILIES, "weights/")


def accuracy_metric(task: str, metrics: set[str]) -> str | None:
    """The metric holding a task's accuracy: ``<task>/acc`` (lm-eval files) or ``eval/<task>/acc`` (MLflow)."""
    for name in (f"{task}/acc", f"eval/{task}/acc", task):
        if name in metrics:
            return name
    return None


def standardised_accuracy(metrics: pd.DataFrame, tasks=DEFAULT_TASKS) -> pd.DataFrame:
    """Tidy rows of the standardised accuracy per (model, seed, step), metric ``standardised_accuracy``.

    Each task's accuracy is z-scored over all (seed, step) rows of a size, then the z-scores are
    averaged over the tasks present at that (seed, step) (PolyPythias, section 4). Raises when none
    of ``tasks`` is present.
    """
    present = set(map(str, metrics["metric"].unique()))
    names = {accuracy_metric(t, present): t for t in tasks}
    names.pop(None, None)
    if not names:
        raise AnalysisError(
            f"None of the tasks {', '.join(tasks)} has an accuracy metric in the study; "
            "name tasks it holds with --tasks, or judge another metric with --outlier-metric."
        )
    rows = metrics[metrics["metric"].isin(list(names))].copy()
    rows["metric"] = rows["metric"].astype(str)
    grouped = rows.groupby(["model", "metric"], observed=True)["value"]
    rows["z"] = (rows["value"] - grouped.transform("mean")) / grouped.transform("std")
    score = rows.groupby(["model", "seed", "step"], observed=True)["z"].mean().reset_index()
    score = score.rename(columns={"z": "value"}).assign(metric=STANDARDISED_METRIC)
    score["model"] = score["model"].astype(str)
    return score[["model", "seed", "step", "metric", "value"]].dropna()


def standardised_score(metrics: pd.DataFrame, tasks) -> pd.DataFrame | None:
    """The ``standardised_accuracy`` rows, or None when none of ``tasks`` has accuracies."""
    present = set(map(str, metrics["metric"].unique()))
    if not any(accuracy_metric(t, present) for t in tasks):
        return None
    return standardised_accuracy(metrics, tasks)


def with_standardised_accuracy(metrics: pd.DataFrame, score: pd.DataFrame | None) -> pd.DataFrame:
    """The metrics plus the ``standardised_accuracy`` rows of :func:`standardised_score`, if any."""
    if score is None:
        return metrics
    score = score.copy()
    columns = {}
    for column in ("model", "metric"):  # concatenate as categoricals: 14M strings would take minutes
        categories = list(pd.unique(pd.Series([*map(str, metrics[column].cat.categories), *score[column]])))
        columns[column] = metrics[column].cat.set_categories(categories)
        score[column] = pd.Categorical(score[column], categories=categories)
    # assign: the study's rows are copied once, by the concatenation (a copy first cost 4-8 s at 144M rows)
    return pd.concat([metrics.assign(**columns), score], ignore_index=True)


def default_outlier_metrics(
    metrics: pd.DataFrame, has_score: bool, loss_signal: str = DEFAULT_LOSS_SIGNAL
) -> list[str]:
    """What the trajectory rule judges when no metric is named: the standardised accuracy when task
    accuracies are present, and ``loss_signal`` (``valid/loss``); failing both, every checkpoint metric
    that takes continuous values (not ``train/*``, ``weights/*`` and other per-step or feature
    families, and not integer codes such as an HMM state)."""
    present = [str(m) for m in metrics["metric"].unique()]
    chosen = ([STANDARDISED_METRIC] if has_score else []) + [m for m in present if m == loss_signal]
    if chosen:
        return chosen
    for name in sorted(present):
        if name.startswith(NOT_OUTLIER_TARGETS):
            continue
        values = metrics.loc[metrics["metric"] == name, "value"].to_numpy(dtype="float64")
        values = values[np.isfinite(values)]
        if len(values) and not np.all(values == np.round(values)):
            chosen.append(name)
    return chosen


def rule_knobs(
    rule: OutlierRule | None = None, mad_threshold: float | None = None, knobs: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The knobs per rule name: ``knobs``, with the command line's two shorthands folded in (``rule``:
    the ``calibrated`` rule's knobs unless ``knobs`` names them; ``mad_threshold``: the ``mad`` rule's
    threshold). Rules not named keep their defaults (:func:`analysis.rules.knobs_of`)."""
    merged = dict(knobs or {})
    if rule is not None and "calibrated" not in merged:
        merged["calibrated"] = rule
    if mad_threshold is not None:
        merged["mad"] = replace(merged.get("mad") or MadKnobs(), threshold=mad_threshold)
    return merged


def trajectories(
    metrics: pd.DataFrame, tasks, outlier_metrics: list[str] | None, score: pd.DataFrame | None
) -> dict[str, pd.DataFrame]:
    """The metrics the trajectory rules judge (``outlier_metrics``, default :func:`default_outlier_metrics`),
    each with the tidy rows holding it; the standardised accuracy is computed unless ``score`` is given."""
    present = set(map(str, metrics["metric"].unique()))
    if score is None and any(accuracy_metric(t, present) for t in tasks):
        score = standardised_accuracy(metrics, tasks)
    if outlier_metrics is None:
        outlier_metrics = default_outlier_metrics(metrics, score is not None)
    chosen = {}
    for metric in outlier_metrics:
        if metric == STANDARDISED_METRIC:
            if score is None:
                raise AnalysisError(
                    "The standardised accuracy needs task accuracies, and the study has none of "
                    f"{', '.join(tasks)}; name its tasks with --tasks or pick another --outlier-metric."
                )
            chosen[metric] = score
        elif metric not in present:
            raise AnalysisError(
                f"The study has no metric {metric!r} to judge outliers on; pick one of "
                f"{', '.join(sorted(present)[:12])}{' ...' if len(present) > 12 else ''}."
            )
        else:
            chosen[metric] = metrics
    return chosen


def find_outliers(
    metrics: pd.DataFrame,
    tasks=DEFAULT_TASKS,
    outlier_metrics: list[str] | None = None,
    rule: OutlierRule | None = None,
    mad_threshold: float | None = None,
    score: pd.DataFrame | None = None,
    blocks: pd.DataFrame | None = None,
    knobs: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """All outlier rows of a study: every registered rule (:func:`analysis.rules.registered`) on the
    :func:`trajectories` of ``outlier_metrics`` and the study's rows, with its knobs from
    :func:`rule_knobs` (``rule``, ``mad_threshold`` and ``knobs``; defaults otherwise).
    ``score``: the :func:`standardised_accuracy` of ``metrics`` and ``tasks`` when the caller has it;
    ``blocks``: :func:`analysis.tidy_table.run_blocks` of ``metrics`` (or of a table that starts with its rows)."""
    judged = Judged(metrics, trajectories(metrics, tasks, outlier_metrics, score), blocks)
    chosen = rule_knobs(rule, mad_threshold, knobs)
    table = concat_outliers(r.judge(judged, knobs_of(r, chosen)) for r in registered())
    if table.empty:
        return table
    order = table["seed"].map(label_order)
    return (
        table.assign(_order=order)
        .sort_values(["model", "_order", "metric", "rule", "onset_step"], kind="stable")
        .drop(columns="_order")
        .reset_index(drop=True)
    )
