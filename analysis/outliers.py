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
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from polypythia import stability
from polypythia.stability import (  # re-exported: the calibration lives with the live monitor's rule
    CALIBRATION_STUDIES as CALIBRATION_STUDIES,
)
from polypythia.stability import (
    MAD_TO_SD,
    _others,
    decision_threshold,
    for_study_length,
    pooled_deviation,
)
from polypythia.stability import (
    NULL_MODELS as NULL_MODELS,
)
from polypythia.stability import (
    _deviation_array as _deviation_array,
)
from polypythia.stability import (
    _window_mean as _window_mean,
)
from polypythia.stability import (
    largest_null_deviations as largest_null_deviations,
)
from polypythia.stability import (
    null_studies as null_studies,
)
from polypythia.study import PER_STEP_FAMILIES, label_order, parse_run_label

DEFAULT_TASKS = ("arc_easy", "lambada_openai", "piqa", "sciq")
STANDARDISED_METRIC = "standardised_accuracy"
OUTLIER_COLUMNS = [
    "model",
    "seed",
    "weight_seed",
    "data_seed",
    "metric",
    "rule",
    "onset_step",
    "end_step",
    "n_checkpoints_out",
    "onset_deviation_sd",
    "max_deviation_sd",
    "band_deviation_sd",
    "threshold_sd",
    "recovered",
    "recovery_step",
]
# Metric families that are not trajectories to judge runs by: the per-step families (spikes.py and
# the replay's smoothed loss look at training curves) and the weight statistics (training maps).
NOT_OUTLIER_TARGETS = (*PER_STEP_FAMILIES, "weights/")


class OutlierRule(stability.OutlierRule):
    """The knobs of the trajectory rule (see the module docstring; the rule's numeric core is
    :mod:`polypythia.stability`, shared with the sweep's live monitor); a bad knob is an AnalysisError."""

    error = AnalysisError


# ---------------------------------------------------------------------------------------------
# Deviations


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


def wide_by_seed(metrics: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    """Per model, a (step x run) table of one metric, runs in seed order."""
    rows = metrics[metrics["metric"] == metric]
    tables = {}
    for model, group in rows.groupby("model", observed=True):
        table = group.pivot_table(index="step", columns="seed", values="value", aggfunc="last", observed=True)
        tables[str(model)] = table[sorted(table.columns, key=label_order)]
    return tables


def band_deviation(table: pd.DataFrame) -> pd.DataFrame:
    """The study's band: each run's distance from the mean of all other runs at that step, in their SD."""
    values = table.to_numpy(dtype="float64")
    present = ~np.isnan(values)
    count, mean, variance = _others(np.nan_to_num(values), present)
    with np.errstate(invalid="ignore", divide="ignore"):
        deviation = (values - mean) / np.sqrt(variance)
    deviation[~present | (count < 2) | ~(variance > 0)] = np.nan
    return pd.DataFrame(deviation, index=table.index, columns=table.columns)


def robust_deviation(table: pd.DataFrame) -> pd.DataFrame:
    """Each run's distance from the median over runs, in robust SDs (1.4826 x MAD) (step x run)."""
    values = table.to_numpy(dtype="float64")
    median = np.nanmedian(values, axis=1, keepdims=True)
    mad = np.nanmedian(np.abs(values - median), axis=1, keepdims=True) * MAD_TO_SD
    # With MAD = 0 (half the seeds identical) fall back to the mean absolute deviation.
    fallback = np.nanmean(np.abs(values - median), axis=1, keepdims=True) * 1.2533
    scale = np.where(mad > 0, mad, fallback)
    with np.errstate(invalid="ignore", divide="ignore"):
        deviation = (values - median) / scale
    deviation[(scale == 0).repeat(values.shape[1], axis=1)] = 0.0
    return pd.DataFrame(deviation, index=table.index, columns=table.columns)


# ---------------------------------------------------------------------------------------------
# Episodes


def episodes(
    steps: np.ndarray,
    deviation: np.ndarray,
    threshold: float,
    band_sd: float,
    min_checkpoints: int = 1,
    band: np.ndarray | None = None,
) -> list[dict]:
    """Stretches that start where |deviation| > threshold and last while the run stays beyond
    ``band_sd`` on the same side and more than ``band_sd`` away from its own level before the onset
    (the median of its last three deviations: a healthy run may sit persistently off-centre);
    recovered when a later checkpoint is back inside the band or at its own level."""
    valid = ~np.isnan(deviation)
    steps, deviation = steps[valid], deviation[valid]
    band = band[valid] if band is not None else np.full(len(steps), np.nan)
    found, start = [], 0
    while start < len(steps):
        if abs(deviation[start]) <= threshold:
            start += 1
            continue
        side = np.sign(deviation[start])
        level = float(np.median(deviation[max(0, start - 3) : start])) if start else 0.0
        stop = start + 1
        while stop < len(steps) and side * deviation[stop] > band_sd and side * (deviation[stop] - level) > band_sd:
            stop += 1
        stretch = deviation[start:stop]
        if np.sum(np.abs(stretch) > threshold) >= min_checkpoints:
            recovered = stop < len(steps)
            found.append(
                {
                    "onset_step": int(steps[start]),
                    "end_step": int(steps[stop - 1]),
                    "n_checkpoints_out": int(stop - start),
                    "onset_deviation_sd": float(stretch[0]),
                    "max_deviation_sd": float(stretch[np.argmax(np.abs(stretch))]),
                    "band_deviation_sd": float(band[start]),
                    "threshold_sd": float(threshold),
                    "recovered": bool(recovered),
                    "recovery_step": int(steps[stop]) if recovered else None,
                }
            )
        start = stop
    return found


def outlier_frame(rows: list[dict]) -> pd.DataFrame:
    """Outlier rows with the seeds of each run label filled in, in the column order of OUTLIER_COLUMNS."""
    for row in rows:
        seeds = parse_run_label(row["seed"])
        row["weight_seed"], row["data_seed"] = seeds if seeds else (None, None)
    frame = pd.DataFrame(rows, columns=OUTLIER_COLUMNS)
    return frame.astype({"recovery_step": "Int64", "weight_seed": "Int64", "data_seed": "Int64", "seed": str})


def flag_trajectory_outliers(metrics: pd.DataFrame, metric: str, rule: OutlierRule = OutlierRule()) -> pd.DataFrame:
    """Outlier episodes of every run of every model on one metric (the calibrated rule)."""
    rows = []
    for model, table in wide_by_seed(metrics, metric).items():
        table = table.dropna(how="all")
        rule = for_study_length(rule, table.shape[0])
        threshold = decision_threshold(table.shape[1], table.shape[0], rule)
        if not np.isfinite(threshold):
            continue
        deviation, band = pooled_deviation(table, rule), band_deviation(table)
        steps = table.index.to_numpy()
        for seed in table.columns:
            for episode in episodes(
                steps, deviation[seed].to_numpy(), threshold, rule.band_sd, rule.min_checkpoints, band[seed].to_numpy()
            ):
                rows.append({"model": model, "seed": str(seed), "metric": metric, "rule": "calibrated", **episode})
    return outlier_frame(rows)


def final_row(table: pd.DataFrame, final_fraction: float = 0.01) -> pd.DataFrame:
    """One row holding each run's final value: the mean of its values in the last ``final_fraction``
    of its steps (1%: 1,430 steps of a 143,000-step loss curve, the last checkpoint or two of an
    evaluation metric), because a single step of a training loss is too noisy to compare seeds.
    Runs may stop at different steps (e.g. after divergence); each uses its own last steps."""
    finals = {}
    for seed in table.columns:
        values = table[seed].dropna()
        if values.empty:
            continue
        steps = values.index.to_numpy()
        start = steps[-1] - final_fraction * (steps[-1] - steps[0])
        finals[seed] = values[steps >= start].mean()
    return pd.DataFrame([finals], index=[table.index[-1]])


def finals_from_blocks(
    metrics: pd.DataFrame, metric: str, final_fraction: float, blocks: pd.DataFrame
) -> dict[str, pd.DataFrame] | None:
    """:func:`final_rows` from run slices (None when a run of ``metric`` has a non-finite value)."""
    steps, values = metrics["step"].to_numpy(), metrics["value"].to_numpy(dtype="float64")
    out: dict[str, pd.DataFrame] = {}
    runs = blocks[(blocks["metric"] == metric).to_numpy()]
    for model, group in runs.groupby("model", sort=False):
        finals, last_step = {}, None
        for run in sorted(group.itertuples(), key=lambda run: label_order(str(run.seed))):
            run_steps, run_values = steps[run.start : run.stop], values[run.start : run.stop]
            if not np.isfinite(run_values).all():
                return None
            first_kept = run_steps[-1] - final_fraction * (run_steps[-1] - run_steps[0])
            finals[str(run.seed)] = pd.Series(run_values[run_steps >= first_kept]).mean()
            last_step = int(run_steps[-1]) if last_step is None else max(last_step, int(run_steps[-1]))
        out[str(model)] = pd.DataFrame([finals], index=[last_step])
    return out


def final_rows(
    metrics: pd.DataFrame, metric: str, final_fraction: float = 0.01, blocks: pd.DataFrame | None = None
) -> dict[str, pd.DataFrame]:
    """Per model, :func:`final_row` of its (step x run) table of ``metric`` (:func:`wide_by_seed`).

    The same numbers without building that table when, as :func:`analysis.load.tidy` leaves them, each
    run's rows are contiguous, with rising steps and finite values: a dense loss curve of 143,000
    steps per run would otherwise be pivoted into a (steps x runs) table only to average its last 1%.
    Otherwise the table is built. ``blocks``: :func:`analysis.load.run_blocks` of ``metrics`` (then the
    runs are read as slices, without selecting the metric's rows first)."""
    if blocks is not None:
        finals_by_model = finals_from_blocks(metrics, metric, final_fraction, blocks)
        if finals_by_model is not None:
            return finals_by_model
    rows = metrics[(metrics["metric"] == metric).to_numpy()]
    out: dict[str, pd.DataFrame] = {}
    for model, group in rows.groupby("model", observed=True, sort=True):
        codes, labels = pd.factorize(group["seed"])  # run labels: a few categories, not a string per row
        steps, values = group["step"].to_numpy(), group["value"].to_numpy(dtype="float64")
        starts = np.r_[0, np.flatnonzero(codes[1:] != codes[:-1]) + 1]
        ends = np.r_[starts[1:], len(codes)]
        seeds = np.asarray([str(labels[code]) for code in codes[starts]], dtype=object)
        within = np.ones(len(steps), dtype=bool)
        within[starts] = False
        contiguous = (
            len(set(seeds)) == len(starts) and (np.diff(steps)[within[1:]] > 0).all() and np.isfinite(values).all()
        )
        if not contiguous:
            out[str(model)] = final_row(wide_by_seed(group, metric)[str(model)], final_fraction)
            continue
        finals = {}
        for seed, start, end in sorted(zip(seeds, starts, ends), key=lambda block: label_order(block[0])):
            run_steps = steps[start:end]
            first_kept = run_steps[-1] - final_fraction * (run_steps[-1] - run_steps[0])
            finals[seed] = pd.Series(values[start:end][run_steps >= first_kept]).mean()
        out[str(model)] = pd.DataFrame([finals], index=[int(steps.max())])
    return out


MIN_SEEDS_FOR_MAD = 5  # with 3 or 4 runs the MAD is one neighbour's distance: too unstable to flag on


def mad_flags(values: pd.Series, threshold: float, min_relative_deviation: float = 0.01) -> list[str]:
    """The final-value rule on one value per run (index: run labels): the runs whose robust z-score
    |x - median| / (1.4826 MAD) exceeds ``threshold`` and whose distance from the median exceeds
    ``min_relative_deviation`` x |median|. With ten runs from one distribution the MAD itself is so
    noisy that some run exceeds 3.5 in about one study in eight; the relative floor keeps a run 0.3%
    off from being called an outlier. Needs ``MIN_SEEDS_FOR_MAD`` runs; fewer flag nothing."""
    if len(values) < MIN_SEEDS_FOR_MAD:
        return []
    deviation = robust_deviation(values.to_frame().T).iloc[0]
    median = values.median()
    flagged = (deviation.abs() > threshold) & ((values - median).abs() > min_relative_deviation * abs(median))
    return sorted((str(seed) for seed in values.index[flagged]), key=label_order)


def flag_mad_outliers(
    metrics: pd.DataFrame,
    metric: str,
    threshold: float = 3.5,
    min_relative_deviation: float = 0.01,
    blocks: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Outlier rows of :func:`mad_flags` on each run's final value (:func:`final_row`) of ``metric``."""
    rows = []
    for model, final in final_rows(metrics, metric, blocks=blocks).items():
        values = final.iloc[0].dropna()
        deviation = robust_deviation(final).iloc[0]
        for seed in mad_flags(values, threshold, min_relative_deviation):
            dev = float(deviation[seed])
            rows.append(
                {
                    "model": model,
                    "seed": str(seed),
                    "metric": metric,
                    "rule": f"mad_{threshold:g}",
                    "onset_step": int(final.index[0]),
                    "end_step": int(final.index[0]),
                    "n_checkpoints_out": 1,
                    "onset_deviation_sd": dev,
                    "max_deviation_sd": dev,
                    "band_deviation_sd": np.nan,
                    "threshold_sd": threshold,
                    "recovered": False,
                    "recovery_step": None,
                }
            )
    return outlier_frame(rows)


def default_outlier_metrics(metrics: pd.DataFrame, has_score: bool) -> list[str]:
    """What the trajectory rule judges when no metric is named: the standardised accuracy when task
    accuracies are present, and ``valid/loss``; failing both, every checkpoint metric that takes
    continuous values (not ``train/*``, ``weights/*`` and other per-step or feature families, and
    not integer codes such as an HMM state)."""
    present = [str(m) for m in metrics["metric"].unique()]
    chosen = ([STANDARDISED_METRIC] if has_score else []) + [m for m in present if m == "valid/loss"]
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


def find_outliers(
    metrics: pd.DataFrame,
    tasks=DEFAULT_TASKS,
    outlier_metrics: list[str] | None = None,
    rule: OutlierRule = OutlierRule(),
    mad_threshold: float = 3.5,
    final_metrics=("train/loss", "valid/loss"),
    final_min_relative_deviation: float = 0.01,
    score: pd.DataFrame | None = None,
    blocks: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """All outlier rows of a study: the calibrated trajectory rule on ``outlier_metrics`` (default:
    :func:`default_outlier_metrics`) and the MAD rule on the final value of ``final_metrics``.
    ``score``: the :func:`standardised_accuracy` of ``metrics`` and ``tasks`` when the caller has it;
    ``blocks``: :func:`analysis.load.run_blocks` of ``metrics`` (or of a table that starts with its rows)."""
    present = set(map(str, metrics["metric"].unique()))
    if score is None and any(accuracy_metric(t, present) for t in tasks):
        score = standardised_accuracy(metrics, tasks)
    if outlier_metrics is None:
        outlier_metrics = default_outlier_metrics(metrics, score is not None)
    frames = []
    for metric in outlier_metrics:
        if metric == STANDARDISED_METRIC:
            if score is None:
                raise AnalysisError(
                    "The standardised accuracy needs task accuracies, and the study has none of "
                    f"{', '.join(tasks)}; name its tasks with --tasks or pick another --outlier-metric."
                )
            frames.append(flag_trajectory_outliers(score, metric, rule))
        elif metric not in present:
            raise AnalysisError(
                f"The study has no metric {metric!r} to judge outliers on; pick one of "
                f"{', '.join(sorted(present)[:12])}{' ...' if len(present) > 12 else ''}."
            )
        else:
            frames.append(flag_trajectory_outliers(metrics, metric, rule))
    for metric in final_metrics:
        if metric in present:
            frames.append(flag_mad_outliers(metrics, metric, mad_threshold, final_min_relative_deviation, blocks))
    frames = [f for f in frames if not f.empty]
    if not frames:
        return outlier_frame([])
    table = pd.concat(frames, ignore_index=True)
    order = table["seed"].map(label_order)
    return (
        table.assign(_order=order)
        .sort_values(["model", "_order", "metric", "rule", "onset_step"], kind="stable")
        .drop(columns="_order")
        .reset_index(drop=True)
    )
