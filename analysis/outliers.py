"""Outlier runs: seeds whose trajectory leaves the cross-seed band.

Two rules, both reported per episode (a stretch of consecutive checkpoints outside the band):

* ``band_2sd`` - the PolyPythias rule on the *standardised accuracy* (each task's accuracy
  z-scored over all (seed, step) rows of a size, then averaged over ARC-Easy, LAMBADA, PIQA and
  SciQ, or whichever of them are present). At each step a seed is compared with the mean and SD
  of the *other* seeds (leave-one-out), so an outlier does not widen its own band, and seeds
  more than 4 such SDs away are left out of the others' bands as well (two simultaneous
  outliers do not mask each other); it is outside when more than ``band_sd`` (2) SDs away.
* ``mad`` - a robust rule for studies with few seeds, usable on any metric (including the final
  train loss): outside when |x - median| / (1.4826 MAD) > ``threshold`` (3.5), with median and
  MAD taken over all seeds at that step.

Noise alone puts a seed outside a 2-SD leave-one-out band at about one step in ten (10 seeds), so
an episode counts only when it stays on one side of the band for ``min_checkpoints`` consecutive
checkpoints (default 3: about 1e-4 per window for independent noise; a single step is enough when
only one step is looked at, e.g. the final loss). An episode has recovered when the next
checkpoint is back inside the band (``recovery_step``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError

DEFAULT_TASKS = ("arc_easy", "lambada_openai", "piqa", "sciq")
STANDARDISED_METRIC = "standardised_accuracy"
OUTLIER_COLUMNS = ["model", "seed", "metric", "rule", "onset_step", "end_step", "n_checkpoints_out",
                   "onset_deviation_sd", "max_deviation_sd", "recovered", "recovery_step"]
MAD_TO_SD = 1.4826


def accuracy_metric(task: str, metrics: set[str]) -> str | None:
    """The metric holding a task's accuracy: ``<task>/acc`` (lm-eval files) or ``eval/<task>/acc`` (MLflow)."""
    for name in (f"{task}/acc", f"eval/{task}/acc", task):
        if name in metrics:
            return name
    return None


def standardised_accuracy(metrics: pd.DataFrame, tasks=DEFAULT_TASKS) -> pd.DataFrame:
    """Tidy rows of the standardised accuracy per (model, seed, step), metric ``standardised_accuracy``.

    Each task's accuracy is z-scored over all (seed, step) rows of a size, then the z-scores are
    averaged over the tasks present at that (seed, step). Raises when none of ``tasks`` is present.
    """
    present = set(map(str, metrics["metric"].unique()))
    names = {accuracy_metric(t, present): t for t in tasks}
    names.pop(None, None)
    if not names:
        raise AnalysisError(f"None of the tasks {', '.join(tasks)} has an accuracy metric in the study; "
                            "name tasks it holds with --tasks.")
    rows = metrics[metrics["metric"].isin(list(names))].copy()
    rows["metric"] = rows["metric"].astype(str)
    grouped = rows.groupby(["model", "metric"], observed=True)["value"]
    rows["z"] = (rows["value"] - grouped.transform("mean")) / grouped.transform("std")
    score = rows.groupby(["model", "seed", "step"], observed=True)["z"].mean().reset_index()
    score = score.rename(columns={"z": "value"}).assign(metric=STANDARDISED_METRIC)
    score["model"] = score["model"].astype(str)
    return score[["model", "seed", "step", "metric", "value"]].dropna()


def wide_by_seed(metrics: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    """Per model, a (step x seed) table of one metric."""
    rows = metrics[metrics["metric"] == metric]
    return {str(model): group.pivot_table(index="step", columns="seed", values="value", aggfunc="last")
            for model, group in rows.groupby("model", observed=True)}


def deviation_from_others(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each entry's distance from the mean of the kept entries of the other seeds in its row, in their SDs."""
    kept = np.where(keep, values, 0.0)
    count = keep.sum(axis=1, keepdims=True) - keep
    total = kept.sum(axis=1, keepdims=True) - kept
    square = (kept ** 2).sum(axis=1, keepdims=True) - kept ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        variance = (square - count * mean ** 2) / (count - 1)
        deviation = (values - mean) / np.sqrt(np.clip(variance, 0, None))
    deviation[count < 3] = np.nan
    return deviation


def leave_one_out_deviation(table: pd.DataFrame, exclude_sd: float = 5.0) -> pd.DataFrame:
    """Each seed's distance from the mean of the other seeds, in SDs of the other seeds (step x seed).

    Seeds whose robust z-score (median / 1.4826 MAD over all seeds) exceeds ``exclude_sd`` are
    left out of the *other* seeds' bands as well, so that two seeds collapsing together (410m in
    the study) do not hide each other by widening each other's band. Noise rarely goes that far
    (about 1 seed-step in 250 with ten seeds), so the band of a healthy study is hardly narrowed.
    """
    values = table.to_numpy(dtype="float64")
    present = ~np.isnan(values)
    far = present & (np.abs(np.nan_to_num(robust_deviation(table).to_numpy())) > exclude_sd)
    plain = deviation_from_others(values, present)
    deviation = deviation_from_others(values, present & ~far)
    deviation = np.where(np.isnan(deviation), plain, deviation)
    deviation[~present] = np.nan
    return pd.DataFrame(deviation, index=table.index, columns=table.columns)


def robust_deviation(table: pd.DataFrame) -> pd.DataFrame:
    """Each seed's distance from the median over seeds, in robust SDs (1.4826 x MAD) (step x seed)."""
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


def episodes(steps: np.ndarray, deviation: np.ndarray, limit: float, min_checkpoints: int) -> list[dict]:
    """Stretches of at least ``min_checkpoints`` consecutive steps with deviation > limit, or < -limit
    (a stretch stays on one side: alternating noise above and below the band does not add up)."""
    valid = ~np.isnan(deviation)
    steps, deviation = steps[valid], deviation[valid]
    if len(steps) == 0:  # fewer than three seeds: no band
        return []
    side = np.where(deviation > limit, 1, np.where(deviation < -limit, -1, 0))
    changes = np.flatnonzero(np.r_[True, side[1:] != side[:-1], True])
    starts, stops = changes[:-1], changes[1:]
    found = []
    for start, stop in zip(starts, stops):
        if side[start] == 0:
            continue
        if stop - start < min(min_checkpoints, len(steps)):
            continue
        stretch = deviation[start:stop]
        found.append({
            "onset_step": int(steps[start]), "end_step": int(steps[stop - 1]), "n_checkpoints_out": int(stop - start),
            "onset_deviation_sd": float(stretch[0]), "max_deviation_sd": float(stretch[np.argmax(np.abs(stretch))]),
            "recovered": bool(stop < len(steps) and side[stop] == 0),
            "recovery_step": int(steps[stop]) if stop < len(steps) and side[stop] == 0 else None,
        })
    return found


def flag_episodes(deviations: dict[str, pd.DataFrame], metric: str, rule: str, limit: float,
                  min_checkpoints: int) -> pd.DataFrame:
    """Outlier rows for every seed of every model from (step x seed) deviation tables."""
    rows = []
    for model, table in deviations.items():
        steps = table.index.to_numpy()
        for seed in table.columns:
            for episode in episodes(steps, table[seed].to_numpy(dtype="float64"), limit, min_checkpoints):
                rows.append({"model": model, "seed": int(seed), "metric": metric, "rule": rule, **episode})
    return pd.DataFrame(rows, columns=OUTLIER_COLUMNS).astype({"recovery_step": "Int64"})


def flag_band_outliers(metrics: pd.DataFrame, metric: str = STANDARDISED_METRIC, band_sd: float = 2.0,
                       min_checkpoints: int = 3) -> pd.DataFrame:
    """The study's rule: leave-one-out mean +/- ``band_sd`` SD at each step (see module docstring)."""
    deviations = {m: leave_one_out_deviation(t) for m, t in wide_by_seed(metrics, metric).items()}
    return flag_episodes(deviations, metric, f"band_{band_sd:g}sd", band_sd, min_checkpoints)


def flag_mad_outliers(metrics: pd.DataFrame, metric: str, threshold: float = 3.5, min_checkpoints: int = 3,
                      final_only: bool = False, min_relative_deviation: float = 0.0) -> pd.DataFrame:
    """Robust rule: |x - median| / (1.4826 MAD) > ``threshold`` over seeds at each step (or the final step only).

    With ten seeds from one distribution the MAD itself is so noisy that some seed exceeds 3.5 in
    about one study in eight; ``min_relative_deviation`` (e.g. 0.01 for losses) also asks that
    |x - median| exceed that share of |median|, so that a seed 0.3% off is never called an outlier.
    """
    tables = wide_by_seed(metrics, metric)
    if final_only:
        tables = {m: final_row(t) for m, t in tables.items()}
    deviations = {m: robust_deviation(t) for m, t in tables.items()}
    if min_relative_deviation > 0:
        for model, table in tables.items():
            median = table.median(axis=1)
            small = table.sub(median, axis=0).abs().le(min_relative_deviation * median.abs(), axis=0)
            deviations[model] = deviations[model].mask(small, 0.0)
    return flag_episodes(deviations, metric, f"mad_{threshold:g}", threshold, min_checkpoints)


def final_row(table: pd.DataFrame, final_fraction: float = 0.01) -> pd.DataFrame:
    """One row holding each seed's final value: the mean of its values in the last ``final_fraction``
    of its steps (1%: 1,430 steps of a 143,000-step loss curve, the last checkpoint or two of an
    evaluation metric), because a single step of a training loss is too noisy to compare seeds.
    Seeds may stop at different steps (e.g. after divergence); each uses its own last steps."""
    finals = {}
    for seed in table.columns:
        values = table[seed].dropna()
        if values.empty:
            continue
        steps = values.index.to_numpy()
        start = steps[-1] - final_fraction * (steps[-1] - steps[0])
        finals[seed] = values[steps >= start].mean()
    return pd.DataFrame([finals], index=[table.index[-1]])


def find_outliers(metrics: pd.DataFrame, tasks=DEFAULT_TASKS, band_sd: float = 2.0, mad_threshold: float = 3.5,
                  min_checkpoints: int = 3, final_metrics=("train/loss", "valid/loss"),
                  final_min_relative_deviation: float = 0.01, score: pd.DataFrame | None = None) -> pd.DataFrame:
    """All outlier rows of a study: the band rule and the MAD rule on the standardised accuracy
    (when task accuracies are present) and the MAD rule on the final value of ``final_metrics``
    (which must also be ``final_min_relative_deviation`` away from the median, see
    :func:`flag_mad_outliers`). ``score``: the :func:`standardised_accuracy` of ``metrics`` and
    ``tasks`` when the caller has it already."""
    frames = []
    present = set(map(str, metrics["metric"].unique()))
    if score is None and any(accuracy_metric(t, present) for t in tasks):
        score = standardised_accuracy(metrics, tasks)
    if score is not None:
        frames.append(flag_band_outliers(score, band_sd=band_sd, min_checkpoints=min_checkpoints))
        frames.append(flag_mad_outliers(score, STANDARDISED_METRIC, mad_threshold, min_checkpoints))
    for metric in final_metrics:
        if metric in present:
            frames.append(flag_mad_outliers(metrics, metric, mad_threshold, min_checkpoints=1, final_only=True,
                                            min_relative_deviation=final_min_relative_deviation))
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=OUTLIER_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values(["model", "seed", "metric", "rule", "onset_step"],
                                                             ignore_index=True)
