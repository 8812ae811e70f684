"""The cross-seed outlier rule's numeric core: each run's deviation from its sibling seeds, and the
threshold a healthy study of the same shape exceeds with a chosen probability.

``analysis/outliers.py`` documents the rule and re-exports everything here; it lives in
``polypythia`` so that one implementation decides offline, in the causal replay of a finished study
(``analysis/replay.py``) and live while a sweep trains (:mod:`polypythia.driver.seedband`). A row's
deviation uses that step and earlier rows only, so a live decision is the one the replay makes.
Numpy and pandas only.

The arithmetic is arranged for speed (calibrating one threshold judges 24,000 simulated studies):
sorts instead of ``np.median``'s partition, sums in place, windows from row-by-row cumulative sums.
It gives the numbers of the rule written out plainly bit for bit; ``tests/driver/test_stability_speed.py``
holds that plain version and compares the two.
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
    DEFAULT: ClassVar[OutlierRule]  # every knob at its default (one shared instance: the rule is frozen)

    def __post_init__(self):
        if not 0 < self.false_alarm_rate < 0.5:
            raise self.error(
                f"The false-alarm rate must lie between 0 and 0.5, not {self.false_alarm_rate}; give e.g. 0.01."
            )
        if self.band_sd <= 0 or self.scale_window < 1 or self.min_runs < 3 or self.min_checkpoints < 1:
            raise self.error(
                "The outlier rule needs band_sd > 0, scale_window >= 1, min_runs >= 3 and "
                "min_checkpoints >= 1; check the --band-sd / --min-checkpoints options."
            )


OutlierRule.DEFAULT = OutlierRule()


def for_study_length(rule: OutlierRule, n_steps: int) -> OutlierRule:
    """The rule with its window cut to a study of ``n_steps`` checkpoints (so that a short study is
    judged at all, against the higher threshold that less pooling calibrates to)."""
    return dataclasses.replace(rule, scale_window=max(1, min(rule.scale_window, n_steps)))


# ---------------------------------------------------------------------------------------------
# Deviations


def _others(values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray | float, np.ndarray, np.ndarray]:
    """Per entry: count, mean and variance (ddof=1) of the kept entries of the *other* runs in its row
    (the count a number when every entry is kept). In place where it can be: the same numbers as the
    textbook expressions (an integer count converts to float exactly)."""
    every = bool(keep.all())
    kept = values if every else np.where(keep, values, 0.0)
    squares = kept * kept
    count = (
        float(values.shape[-1] - 1) if every else np.subtract(keep.sum(axis=-1, keepdims=True), keep, dtype="float64")
    )
    mean = np.subtract(kept.sum(axis=-1, keepdims=True), kept)
    variance = np.subtract(squares.sum(axis=-1, keepdims=True), squares, out=squares)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean /= count
        spread = np.multiply(mean, mean)
        spread *= count
        variance -= spread  # (sum of squares - count * mean ** 2) / (count - 1)
        variance /= count - 1
    return count, mean, np.maximum(variance, 0, out=variance)


def _median(values: np.ndarray, complete: bool) -> np.ndarray:
    """Median over the last axis (keepdims): ``np.nanmedian`` unless ``complete`` (no NaN in ``values``),
    then ``np.median``'s numbers from a sorted copy: the mean of the middle one or two values, NaN in
    a row holding NaN. numpy's own partition (its middle elements and the last, for that NaN check)
    takes several times longer than a sort of a hundred values."""
    size = values.shape[-1]
    if not complete or size == 0:
        return (np.median if complete else np.nanmedian)(values, axis=-1, keepdims=True)
    ordered = np.sort(values, axis=-1)
    median = np.mean(ordered[..., (size - 1) // 2 : size // 2 + 1], axis=-1, keepdims=True)
    np.copyto(median, ordered[..., -1:], where=np.isnan(ordered[..., -1:]))
    return median


def _cumulative(values: np.ndarray) -> np.ndarray:
    """``np.cumsum`` over axis -2 with a row of zeros first: row i holds the sum of rows before i. A
    large array adds row by row, which numpy's accumulation along a middle axis does several times
    slower (the same additions in the same order)."""
    shape = values.shape[:-2] + (values.shape[-2] + 1, values.shape[-1])
    out = np.zeros(shape, dtype=values.dtype if values.dtype.kind == "f" else np.dtype(np.int_))
    if values.size < 100_000 or values.shape[-1] == 1:
        np.cumsum(values, axis=-2, out=out[..., 1:, :])
        return out
    if values.shape[-2]:
        out[..., 1, :] = values[..., 0, :]
    for row in range(1, values.shape[-2]):
        np.add(out[..., row, :], values[..., row, :], out=out[..., row + 1, :])
    return out


def _rows(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``np.take(values, index, axis=-2)``, a view when ``index`` is a run of consecutive rows."""
    if len(index) and (np.diff(index) == 1).all():
        return values[..., index[0] : index[-1] + 1, :]
    return np.take(values, index, axis=-2)


def _window_sums(cumulative: np.ndarray, stop: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Row i: cumulative[stop[i]] - cumulative[start[i]] (rows of :func:`_cumulative`); rows that start
    at row 0 (zeros) keep cumulative[stop[i]], which is what subtracting zero gives."""
    total = _rows(cumulative, stop)
    total = total.copy() if np.may_share_memory(total, cumulative) else total
    first = int(np.count_nonzero(start == 0))  # start never falls: the rows from 0 are the first ones
    total[..., first:, :] -= _rows(cumulative, start[first:])
    return total


def _window_mean(values: np.ndarray, window: int, causal: bool, min_count: int = 1) -> np.ndarray:
    """Mean over a window of rows (axis -2), NaN ignored: the current and previous ``window - 1`` rows
    when ``causal``, else the ``window`` rows centred on the current one (fewer at the edges); NaN
    where fewer than ``min_count`` rows have values."""
    finite = np.isfinite(values)
    every = bool(finite.all())
    rows = values.shape[-2]
    ahead = 0 if causal else window // 2
    stop = np.minimum(np.arange(rows) + ahead + 1, rows)
    start = np.maximum(stop - window, 0)
    total = _window_sums(_cumulative(values if every else np.where(finite, values, 0.0)), stop, start)
    if every:  # every row counts: the count is the window's length
        count = (stop - start)[:, None]
    else:
        count = _window_sums(_cumulative(finite), stop, start)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.divide(total, np.maximum(count, 1), out=total)
    np.copyto(mean, np.nan, where=count < min_count)
    return mean


def _deviation_array(values: np.ndarray, rule: OutlierRule) -> np.ndarray:
    """:func:`pooled_deviation` on a float64 array (..., steps, runs); leading axes are independent studies."""
    present = ~np.isnan(values)
    complete = bool(present.all())  # then no NaN to mask (and np.median's numbers, which a sort gives faster)
    with np.errstate(invalid="ignore"):
        median = _median(values, complete)
        centred = values - median  # centring first keeps the variance sums exact for large values
        distance = np.abs(centred)
        mad = _median(distance, complete) * MAD_TO_SD
    robust_scale = np.sqrt(_window_mean(mad**2, rule.scale_window, rule.causal))
    if not (complete and np.isfinite(distance).all()):
        centred_values = np.nan_to_num(centred)
        distance = np.abs(centred_values)
    else:
        centred_values = centred
    far = distance > rule.exclude_sd * robust_scale
    keep = ~far if complete else present & ~far
    count, mean, variance = _others(centred_values, keep)
    np.copyto(variance, np.nan, where=np.asarray(count < rule.min_runs - 1))
    pooled = _window_mean(variance, rule.scale_window, rule.causal, rule.scale_window // 2 + 1)
    np.sqrt(pooled, out=pooled)
    with np.errstate(invalid="ignore", divide="ignore"):
        deviation = np.subtract(centred, mean, out=mean)
        deviation /= pooled
    np.copyto(deviation, np.nan, where=~(pooled > 0) if complete else ~present | ~(pooled > 0))
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
_CALIBRATION_BLOCK_VALUES = 250_000  # values judged at once (2 MB an array)


def null_studies(
    n_studies: int, n_steps: int, n_runs: int, correlation: float, rng: np.random.Generator, offset_share: float = 0.0
) -> np.ndarray:
    """(studies, steps, runs) of unit-variance Gaussian noise: a constant per-run offset carrying
    ``offset_share`` of the variance plus AR(1) noise with the given step-to-step correlation.
    Computed in place (correlation * previous + innovation * current, as written out)."""
    noise = rng.standard_normal((n_studies, n_steps, n_runs))
    if correlation != 0.0:  # else each step is its own draw (the recursion: x 1.0, + 0.0 x the previous step)
        innovation = np.sqrt(1.0 - correlation**2)
        carried = np.empty((n_studies, n_runs))
        for step in range(1, n_steps):
            noise[:, step] *= innovation
            noise[:, step] += np.multiply(noise[:, step - 1], correlation, out=carried)
    offsets = rng.standard_normal((n_studies, 1, n_runs))
    noise *= np.sqrt(1.0 - offset_share)
    noise += np.sqrt(offset_share) * offsets
    return noise


def largest_null_deviations(
    n_runs: int,
    n_steps: int,
    rule: OutlierRule,
    correlation: float,
    offset_share: float,
    n_studies: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """The largest |deviation| of each of ``n_studies`` simulated healthy studies (0 where none is defined).
    The studies are drawn in chunks of :data:`_CALIBRATION_CHUNK_VALUES` (the random stream) and judged
    in blocks of about :data:`_CALIBRATION_BLOCK_VALUES` (independent studies; the block's arrays stay
    in the processor's cache)."""
    chunk = max(1, _CALIBRATION_CHUNK_VALUES // (n_steps * n_runs))
    block = max(1, _CALIBRATION_BLOCK_VALUES // (n_steps * n_runs))
    largest = np.empty(n_studies)
    for start in range(0, n_studies, chunk):
        studies = null_studies(min(chunk, n_studies - start), n_steps, n_runs, correlation, rng, offset_share)
        for first in range(0, len(studies), block):
            deviation = _deviation_array(studies[first : first + block], rule)
            deviation = np.fmax(np.abs(deviation, out=deviation), 0.0, out=deviation)  # NaN: none (0)
            deviation = deviation.reshape(len(deviation), -1)
            largest[start + first : start + first + len(deviation)] = np.nan_to_num(deviation.max(axis=1))
    return largest


@functools.lru_cache(maxsize=256)
def decision_threshold(n_runs: int, n_steps: int, rule: OutlierRule = OutlierRule()) -> float:
    """The |deviation| that healthy studies of ``n_runs`` x ``n_steps`` exceed anywhere with
    probability ``rule.false_alarm_rate`` (the worst of :data:`NULL_MODELS`); inf below ``min_runs``."""
    if n_runs < rule.min_runs or n_steps < 1:
        return float("inf")
    rng = np.random.default_rng(20250309)  # fixed: the same study always gets the same threshold
    quantiles = [
        np.quantile(
            largest_null_deviations(n_runs, n_steps, rule, correlation, share, CALIBRATION_STUDIES, rng),
            1.0 - rule.false_alarm_rate,
        )
        for correlation, share in NULL_MODELS
    ]
    return float(max(max(quantiles), rule.band_sd))
