"""The cross-seed outlier rule's numeric core: each run's deviation from its sibling seeds, and the
threshold a healthy study of the same shape exceeds with a chosen probability.

``analysis/outliers.py`` documents the rule and re-exports everything here; it lives in
``polypythia`` so that one implementation decides offline, in the causal replay of a finished study
(``analysis/replay.py``) and live while a sweep trains (:mod:`polypythia.crossseed`). A row's
deviation uses that step and earlier rows only, so a live decision is the one the replay makes.
Numpy and pandas only.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class OutlierRule:
    """The knobs of the trajectory rule (see ``analysis/outliers.py``)."""

    false_alarm_rate: float = 0.001  # chance that a healthy study of this shape has any episode
    band_sd: float = 2.0  # the study's band: an episode lasts while the run is beyond it
    scale_window: int = 13  # checkpoints whose spread is pooled; decisions start once half are there
    exclude_sd: float = 6.0  # robust SDs from the median beyond which a run leaves the others' band
    min_runs: int = 4  # fewer runs at a checkpoint: no decision there
    min_checkpoints: int = 1  # checkpoints beyond the threshold needed to start an episode
    causal: bool = True  # pool over past checkpoints only (False: centred window, offline only)
    error: ClassVar[type[Exception]] = ValueError  # what a bad knob raises (the analysis: AnalysisError)

    def __post_init__(self):
        if not 0 < self.false_alarm_rate < 0.5:
            raise self.error(f"The false-alarm rate must lie between 0 and 0.5, not {self.false_alarm_rate}; "
                             "give e.g. 0.01.")
        if self.band_sd <= 0 or self.scale_window < 1 or self.min_runs < 3 or self.min_checkpoints < 1:
            raise self.error("The outlier rule needs band_sd > 0, scale_window >= 1, min_runs >= 3 and "
                             "min_checkpoints >= 1; check the --band-sd / --min-checkpoints options.")


def for_study_length(rule: OutlierRule, n_steps: int) -> OutlierRule:
    """The rule with its window cut to a study of ``n_steps`` checkpoints (so that a short study is
    judged at all, against the higher threshold that less pooling calibrates to)."""
    return dataclasses.replace(rule, scale_window=max(1, min(rule.scale_window, n_steps)))


# ---------------------------------------------------------------------------------------------
# Deviations


def _others(values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per entry: count, mean and variance (ddof=1) of the kept entries of the *other* runs in its row."""
    kept = np.where(keep, values, 0.0)
    count = keep.sum(axis=-1, keepdims=True) - keep
    total = kept.sum(axis=-1, keepdims=True) - kept
    square = (kept ** 2).sum(axis=-1, keepdims=True) - kept ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        variance = np.clip((square - count * mean ** 2) / (count - 1), 0, None)
    return count, mean, variance


def _window_mean(values: np.ndarray, window: int, causal: bool, min_count: int = 1) -> np.ndarray:
    """Mean over a window of rows (axis -2), NaN ignored: the current and previous ``window - 1`` rows
    when ``causal``, else the ``window`` rows centred on the current one (fewer at the edges); NaN
    where fewer than ``min_count`` rows have values."""
    finite = np.isfinite(values)
    pad = [(0, 0)] * values.ndim
    pad[-2] = (1, 0)
    totals = np.pad(np.cumsum(np.where(finite, values, 0.0), axis=-2), pad)  # row i: sum of rows < i
    counts = np.pad(np.cumsum(finite, axis=-2), pad)
    rows = values.shape[-2]
    ahead = 0 if causal else window // 2
    stop = np.minimum(np.arange(rows) + ahead + 1, rows)
    start = np.maximum(stop - window, 0)
    total = np.take(totals, stop, axis=-2) - np.take(totals, start, axis=-2)
    count = np.take(counts, stop, axis=-2) - np.take(counts, start, axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count >= min_count, total / np.maximum(count, 1), np.nan)


def _deviation_array(values: np.ndarray, rule: OutlierRule) -> np.ndarray:
    """:func:`pooled_deviation` on an array (..., steps, runs); leading axes are independent studies."""
    present = ~np.isnan(values)
    median_of = np.median if present.all() else np.nanmedian  # nanmedian is several times slower
    with np.errstate(invalid="ignore"):
        median = median_of(values, axis=-1, keepdims=True)
        centred = values - median  # centring first keeps the variance sums exact for large values
        mad = median_of(np.abs(centred), axis=-1, keepdims=True) * MAD_TO_SD
    robust_scale = np.sqrt(_window_mean(mad ** 2, rule.scale_window, rule.causal))
    far = present & (np.abs(np.nan_to_num(centred)) > rule.exclude_sd * robust_scale)
    count, mean, variance = _others(np.nan_to_num(centred), present & ~far)
    variance = np.where(count >= rule.min_runs - 1, variance, np.nan)
    pooled = np.sqrt(_window_mean(variance, rule.scale_window, rule.causal, rule.scale_window // 2 + 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        deviation = (centred - mean) / pooled
    deviation[~present | ~(pooled > 0)] = np.nan
    return deviation


def pooled_deviation(table: pd.DataFrame, rule: OutlierRule = OutlierRule()) -> pd.DataFrame:
    """Each run's distance from the other runs, in their SDs pooled over recent checkpoints (step x run).

    Causal: the row of a step depends on that step and earlier rows only (see the module docstring).
    """
    deviation = _deviation_array(table.to_numpy(dtype="float64"), rule)
    return pd.DataFrame(deviation, index=table.index, columns=table.columns)



# ---------------------------------------------------------------------------------------------
# The calibrated threshold

# Healthy studies the threshold is calibrated on: (correlation between consecutive checkpoints of
# the changing part of each run's noise, share of the variance that is a constant per-run offset).
NULL_MODELS = ((0.0, 0.0), (0.9, 0.0), (0.5, 0.5), (0.9, 0.5))
CALIBRATION_STUDIES = 6000
_CALIBRATION_CHUNK_VALUES = 2_000_000  # values simulated at once: bounds the memory of a calibration


def null_studies(n_studies: int, n_steps: int, n_runs: int, correlation: float, rng: np.random.Generator,
                 offset_share: float = 0.0) -> np.ndarray:
    """(studies, steps, runs) of unit-variance Gaussian noise: a constant per-run offset carrying
    ``offset_share`` of the variance plus AR(1) noise with the given step-to-step correlation."""
    noise = rng.standard_normal((n_studies, n_steps, n_runs))
    innovation = np.sqrt(1.0 - correlation ** 2)
    for step in range(1, n_steps):
        noise[:, step] = correlation * noise[:, step - 1] + innovation * noise[:, step]
    offsets = rng.standard_normal((n_studies, 1, n_runs))
    return np.sqrt(offset_share) * offsets + np.sqrt(1.0 - offset_share) * noise


def largest_null_deviations(n_runs: int, n_steps: int, rule: OutlierRule, correlation: float, offset_share: float,
                            n_studies: int, rng: np.random.Generator) -> np.ndarray:
    """The largest |deviation| of each of ``n_studies`` simulated healthy studies (0 where none is defined)."""
    chunk = max(1, _CALIBRATION_CHUNK_VALUES // (n_steps * n_runs))
    largest = []
    for start in range(0, n_studies, chunk):
        studies = null_studies(min(chunk, n_studies - start), n_steps, n_runs, correlation, rng, offset_share)
        deviation = np.abs(_deviation_array(studies, rule)).reshape(len(studies), -1)
        largest.append(np.nan_to_num(np.nanmax(np.where(np.isnan(deviation), -np.inf, deviation), axis=1),
                                     neginf=0.0))
    return np.concatenate(largest)


@functools.lru_cache(maxsize=256)
def decision_threshold(n_runs: int, n_steps: int, rule: OutlierRule = OutlierRule()) -> float:
    """The |deviation| that healthy studies of ``n_runs`` x ``n_steps`` exceed anywhere with
    probability ``rule.false_alarm_rate`` (the worst of :data:`NULL_MODELS`); inf below ``min_runs``."""
    if n_runs < rule.min_runs or n_steps < 1:
        return float("inf")
    rng = np.random.default_rng(20250309)  # fixed: the same study always gets the same threshold
    quantiles = [np.quantile(largest_null_deviations(n_runs, n_steps, rule, correlation, share,
                                                     CALIBRATION_STUDIES, rng), 1.0 - rule.false_alarm_rate)
                 for correlation, share in NULL_MODELS]
    return float(max(max(quantiles), rule.band_sd))
