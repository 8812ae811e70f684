"""The ``calibrated`` rule: a run's trajectory leaves its sibling seeds' band by more than a healthy
study of the same shape would (the rule and its calibration: ``analysis/outliers.py``; the numeric
core, shared with the sweep's live monitor: :mod:`polypythia.stability`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.rules import BaseRule, Judged, concat_outliers, outlier_frame, register, wide_by_seed
from polypythia import stability
from polypythia.stability import _others, decision_threshold, for_study_length, pooled_deviation


class OutlierRule(stability.OutlierRule):
    """The knobs of the trajectory rule (see ``analysis/outliers.py``; the rule's numeric core is
    :mod:`polypythia.stability`, shared with the sweep's live monitor); a bad knob is an AnalysisError."""

    error = AnalysisError


def band_deviation(table: pd.DataFrame) -> pd.DataFrame:
    """The study's band: each run's distance from the mean of all other runs at that step, in their SD."""
    values = table.to_numpy(dtype="float64")
    present = ~np.isnan(values)
    count, mean, variance = _others(np.nan_to_num(values), present)
    with np.errstate(invalid="ignore", divide="ignore"):
        deviation = (values - mean) / np.sqrt(variance)
    deviation[~present | (count < 2) | ~(variance > 0)] = np.nan
    return pd.DataFrame(deviation, index=table.index, columns=table.columns)


def episode_end(deviation: np.ndarray, start: int, band_sd: float) -> int:
    """Where the episode starting at ``start`` ends (exclusive): the first later checkpoint back inside
    ``band_sd`` on its side, or within ``band_sd`` of the run's own level before the onset (the median
    of its last three deviations: a healthy run may sit persistently off-centre)."""
    side = np.sign(deviation[start])
    level = float(np.median(deviation[max(0, start - 3) : start])) if start else 0.0
    stop = start + 1
    while stop < len(deviation) and side * deviation[stop] > band_sd and side * (deviation[stop] - level) > band_sd:
        stop += 1
    return stop


def episodes(
    steps: np.ndarray,
    deviation: np.ndarray,
    threshold: float,
    band_sd: float,
    min_checkpoints: int = 1,
    band: np.ndarray | None = None,
) -> list[dict]:
    """Stretches that start where |deviation| > threshold and last while the run stays beyond
    ``band_sd`` (:func:`episode_end`); recovered when a later checkpoint is back inside the band or at
    its own level."""
    valid = ~np.isnan(deviation)
    steps, deviation = steps[valid], deviation[valid]
    band = band[valid] if band is not None else np.full(len(steps), np.nan)
    found, start = [], 0
    while start < len(steps):
        if abs(deviation[start]) <= threshold:
            start += 1
            continue
        stop = episode_end(deviation, start, band_sd)
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


def flag_trajectory_outliers(metrics: pd.DataFrame, metric: str, rule: OutlierRule | None = None) -> pd.DataFrame:
    """Outlier episodes of every run of every model on one metric (the calibrated rule)."""
    rule, rows = rule or OutlierRule(), []
    for model, table in wide_by_seed(metrics, metric).items():
        table = table.dropna(how="all")
        fitted = for_study_length(rule, table.shape[0])
        threshold = decision_threshold(table.shape[1], table.shape[0], fitted)
        if not np.isfinite(threshold):
            continue
        deviation, band = pooled_deviation(table, fitted), band_deviation(table)
        steps = table.index.to_numpy()
        for seed in table.columns:
            found = episodes(
                steps,
                deviation[seed].to_numpy(),
                threshold,
                fitted.band_sd,
                fitted.min_checkpoints,
                band[seed].to_numpy(),
            )
            rows += [{"model": model, "seed": str(seed), "metric": metric, "rule": "calibrated", **e} for e in found]
    return outlier_frame(rows)


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


class CalibratedRule(BaseRule):
    """Judges every chosen trajectory (:attr:`Judged.trajectories`); replayable step by step."""

    name = "calibrated"
    knobs = OutlierRule

    def label(self, knobs: OutlierRule) -> str:
        return "calibrated"

    def judge(self, study: Judged, knobs: OutlierRule) -> pd.DataFrame:
        return concat_outliers(
            flag_trajectory_outliers(rows, metric, knobs) for metric, rows in study.trajectories.items()
        )

    def describe(self, knobs: OutlierRule) -> str:
        return (
            f"`calibrated`: a run starts an episode where its distance from the other runs (leave-one-out mean, "
            f"their SD pooled over up to {knobs.scale_window} past checkpoints) exceeds `threshold_sd`, the level a "
            f"healthy study of the same shape exceeds anywhere with probability {knobs.false_alarm_rate:g} "
            f"(correlated-noise null models, see docs/analysis.md); the episode lasts while the run stays beyond "
            f"the study's +/-{knobs.band_sd:g} SD band and has recovered when it is back inside. "
            f"`band_deviation_sd` is the study's plain leave-one-out deviation at the onset."
        )

    def first_alerts(self, table: pd.DataFrame, signal: str, knobs: OutlierRule) -> list[dict]:
        return first_alerts(table, signal, knobs)


register(CalibratedRule())
