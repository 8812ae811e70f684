"""The fast numeric core of the cross-seed rule (:mod:`polypythia.stability`) gives exactly the numbers
of the rule written out plainly (np.median / np.nanmedian, np.cumsum windows, np.where): deviations,
simulated null studies, their largest deviations and the calibrated threshold, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from polypythia import stability
from polypythia.stability import OutlierRule

pytestmark = pytest.mark.filterwarnings(
    "ignore:All-NaN slice:RuntimeWarning",  # numpy's, on the NaN tables
    "ignore:Mean of empty slice:RuntimeWarning",
    "ignore:invalid value:RuntimeWarning",
)

# ---------------------------------------------------------------------------------------------
# The rule written out plainly (the implementation before it was made faster)


def plain_others(values, keep):
    kept = np.where(keep, values, 0.0)
    count = keep.sum(axis=-1, keepdims=True) - keep
    total = kept.sum(axis=-1, keepdims=True) - kept
    square = (kept**2).sum(axis=-1, keepdims=True) - kept**2
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        variance = np.clip((square - count * mean**2) / (count - 1), 0, None)
    return count, mean, variance


def plain_window_mean(values, window, causal, min_count=1):
    finite = np.isfinite(values)
    pad = [(0, 0)] * values.ndim
    pad[-2] = (1, 0)
    totals = np.pad(np.cumsum(np.where(finite, values, 0.0), axis=-2), pad)
    counts = np.pad(np.cumsum(finite, axis=-2), pad)
    rows = values.shape[-2]
    stop = np.minimum(np.arange(rows) + (0 if causal else window // 2) + 1, rows)
    start = np.maximum(stop - window, 0)
    total = np.take(totals, stop, axis=-2) - np.take(totals, start, axis=-2)
    count = np.take(counts, stop, axis=-2) - np.take(counts, start, axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count >= min_count, total / np.maximum(count, 1), np.nan)


def plain_deviation(values, rule):
    present = ~np.isnan(values)
    median_of = np.median if present.all() else np.nanmedian
    with np.errstate(invalid="ignore"):
        median = median_of(values, axis=-1, keepdims=True)
        centred = values - median
        mad = median_of(np.abs(centred), axis=-1, keepdims=True) * stability.MAD_TO_SD
    robust_scale = np.sqrt(plain_window_mean(mad**2, rule.scale_window, rule.causal))
    far = present & (np.abs(np.nan_to_num(centred)) > rule.exclude_sd * robust_scale)
    count, mean, variance = plain_others(np.nan_to_num(centred), present & ~far)
    variance = np.where(count >= rule.min_runs - 1, variance, np.nan)
    pooled = np.sqrt(plain_window_mean(variance, rule.scale_window, rule.causal, rule.scale_window // 2 + 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        deviation = (centred - mean) / pooled
    deviation[~present | ~(pooled > 0)] = np.nan
    return deviation


def plain_null_studies(n_studies, n_steps, n_runs, correlation, rng, offset_share):
    noise = rng.standard_normal((n_studies, n_steps, n_runs))
    innovation = np.sqrt(1.0 - correlation**2)
    for step in range(1, n_steps):
        noise[:, step] = correlation * noise[:, step - 1] + innovation * noise[:, step]
    offsets = rng.standard_normal((n_studies, 1, n_runs))
    return np.sqrt(offset_share) * offsets + np.sqrt(1.0 - offset_share) * noise


def plain_threshold(n_runs, n_steps, rule):
    rng = np.random.default_rng(20250309)
    chunk = max(1, stability._CALIBRATION_CHUNK_VALUES // (n_steps * n_runs))
    quantiles = []
    for correlation, share in stability.NULL_MODELS:
        largest = []
        for start in range(0, stability.CALIBRATION_STUDIES, chunk):
            size = min(chunk, stability.CALIBRATION_STUDIES - start)
            deviation = np.abs(
                plain_deviation(plain_null_studies(size, n_steps, n_runs, correlation, rng, share), rule)
            ).reshape(size, -1)
            largest.append(
                np.nan_to_num(np.nanmax(np.where(np.isnan(deviation), -np.inf, deviation), axis=1), neginf=0.0)
            )
        quantiles.append(np.quantile(np.concatenate(largest), 1.0 - rule.false_alarm_rate))
    return float(max(max(quantiles), rule.band_sd))


def identical(a, b) -> bool:
    """Equal bit for bit: the same numbers, NaN in the same places, the same signs of zero."""
    a, b = np.asarray(a, dtype="float64"), np.asarray(b, dtype="float64")
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(b))


# ---------------------------------------------------------------------------------------------

RULES = [
    OutlierRule(),
    OutlierRule(causal=False),
    OutlierRule(scale_window=1),
    OutlierRule(exclude_sd=1.0),
    OutlierRule(scale_window=4, min_runs=3),
    OutlierRule(scale_window=40),
]


def tables(rng):
    """Tables (steps x runs, and stacks of them) with what real data brings: NaN, ties, constant
    rows, infinities, huge values, rows of zeros of either sign, a single run, no rows."""
    for shape in [(27, 10), (154, 12), (6, 4), (1, 5), (13, 3), (3, 27, 10), (2, 30, 101), (5, 1), (0, 6), (4, 30, 20)]:
        values = rng.standard_normal(shape)
        yield values
        yield np.where(rng.random(shape) < 0.2, np.nan, values)
        yield np.round(values * 2) / 2
        yield np.where(rng.random(shape) < 0.7, 3.0, values)
        yield np.where(rng.random(shape) < 0.5, 0.0, -0.0)
        yield values * 1e200 + 1e300
        if values.size:
            spoiled = values.copy()
            spoiled.flat[rng.integers(values.size)] = np.inf
            spoiled.flat[rng.integers(values.size)] = -np.inf
            yield spoiled
            rows = values.copy()
            rows[..., ::3, :] = np.nan
            yield rows


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: f"w{rule.scale_window}-causal{rule.causal}-x{rule.exclude_sd}")
def test_deviation_is_the_plain_rule_bit_for_bit(rule):
    rng = np.random.default_rng(3)
    for values in tables(rng):
        assert identical(stability._deviation_array(values.copy(), rule), plain_deviation(values.copy(), rule)), (
            values.shape,
            rule,
        )


def test_large_stacks_take_the_row_by_row_sums_and_stay_the_same():
    rng = np.random.default_rng(4)
    values = rng.standard_normal((8, 154, 100))  # large enough for the row-by-row cumulative sums
    values[0, 5:9, 7] = np.nan
    for rule in RULES[:2]:
        assert identical(stability._deviation_array(values, rule), plain_deviation(values, rule))
        assert identical(stability._deviation_array(values[1:], rule), plain_deviation(values[1:], rule))
    for window, causal, min_count in [(13, True, 1), (13, False, 7), (200, True, 3)]:
        assert identical(
            stability._window_mean(values, window, causal, min_count),
            plain_window_mean(values, window, causal, min_count),
        )


@pytest.mark.parametrize("correlation, share", stability.NULL_MODELS)
def test_null_studies_and_their_largest_deviations_are_the_plain_ones(correlation, share):
    for n_studies, n_steps, n_runs in [(50, 27, 10), (3, 154, 100), (20, 1, 4)]:
        drawn = stability.null_studies(n_studies, n_steps, n_runs, correlation, np.random.default_rng(8), share)
        assert identical(
            drawn, plain_null_studies(n_studies, n_steps, n_runs, correlation, np.random.default_rng(8), share)
        )
        largest = stability.largest_null_deviations(
            n_runs, n_steps, OutlierRule(), correlation, share, n_studies, np.random.default_rng(9)
        )
        deviation = np.abs(
            plain_deviation(
                plain_null_studies(n_studies, n_steps, n_runs, correlation, np.random.default_rng(9), share),
                OutlierRule(),
            )
        )
        deviation = deviation.reshape(n_studies, -1)
        expected = np.nan_to_num(np.nanmax(np.where(np.isnan(deviation), -np.inf, deviation), axis=1), neginf=0.0)
        assert identical(largest, expected)


@pytest.mark.parametrize(
    "n_runs, n_steps, rule",
    [(10, 27, OutlierRule()), (5, 13, OutlierRule(causal=False)), (4, 2, OutlierRule(false_alarm_rate=0.05))],
)
def test_threshold_is_the_plain_calibration(n_runs, n_steps, rule):
    rule = stability.for_study_length(rule, n_steps)
    threshold = stability.decision_threshold.__wrapped__(n_runs, n_steps, rule)  # not a cached value
    assert threshold == plain_threshold(n_runs, n_steps, rule)
    if (n_runs, n_steps) == (10, 27):
        assert round(threshold, 1) == 6.9  # the study's shape: the threshold the docs give
