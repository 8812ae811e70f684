"""Cross-seed statistics: spread per (model, step, metric), Multi-Bootstrap comparisons, spread tests.

All statistics treat the seed as the unit of replication: ``n`` is the number of seeds that
have a value for that (model, step, metric).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from analysis.errors import AnalysisError
from polypythia.study import PER_STEP_FAMILIES

STATS_COLUMNS = ["model", "step", "metric", "n", "mean", "std", "cv", "median", "iqr", "min", "max",
                 "ci_low", "ci_high"]


def checkpoint_steps(metrics: pd.DataFrame, max_dense_steps: int = 200) -> np.ndarray:
    """Steps at which to summarise a study.

    Steps where any checkpoint metric was logged (not one of ``PER_STEP_FAMILIES``: ``train/``,
    ``monitor/``, ``system/``, ``seeds/``) when there are such metrics; otherwise up to ``max_dense_steps`` steps spread log-uniformly and uniformly over the
    logged ones, so that dense loss curves of 143,000 steps do not make 143,000 rows per metric.
    """
    dense_names = [n for n in map(str, metrics["metric"].unique()) if n.startswith(PER_STEP_FAMILIES)]
    is_dense = metrics["metric"].isin(dense_names).to_numpy()
    if (~is_dense).any():
        return np.unique(metrics["step"].to_numpy()[~is_dense])
    steps = np.unique(metrics["step"].to_numpy())
    if len(steps) <= max_dense_steps:
        return steps
    half = max_dense_steps // 2
    targets = np.r_[np.geomspace(max(steps[0], 1), steps[-1], half), np.linspace(steps[0], steps[-1], half)]
    positions = np.clip(np.searchsorted(steps, targets), 0, len(steps) - 1)
    return np.unique(np.r_[steps[positions], steps[0], steps[-1]])


def by_seed_matrix(metrics: pd.DataFrame) -> pd.DataFrame:
    """Wide table: index (model, step, metric), one column per seed."""
    return metrics.pivot_table(index=["model", "step", "metric"], columns="seed", values="value",
                               aggfunc="last", observed=True)


def bootstrap_mean_ci(values: np.ndarray, n_resamples: int, confidence: float,
                      random_state: int, groups_per_batch: int = 2000) -> np.ndarray:
    """Percentile bootstrap interval of the mean for each row of a (groups, seeds) matrix without NaN."""
    out = np.full((len(values), 2), np.nan)
    if values.shape[1] < 2:
        return out
    for start in range(0, len(values), groups_per_batch):
        chunk = values[start:start + groups_per_batch]
        result = scipy_stats.bootstrap((chunk,), np.mean, axis=-1, vectorized=True, n_resamples=n_resamples,
                                       confidence_level=confidence, method="percentile",
                                       rng=np.random.default_rng(random_state))
        out[start:start + groups_per_batch] = np.c_[result.confidence_interval.low, result.confidence_interval.high]
    return out


def cross_seed_stats(metrics: pd.DataFrame, steps=None, n_resamples: int = 2000, confidence: float = 0.95,
                     random_state: int = 0) -> pd.DataFrame:
    """Spread across seeds for every (model, step, metric).

    Columns: n, mean, std (ddof=1), cv (std / |mean|), median, iqr (75th - 25th percentile),
    min, max and ci_low/ci_high, a percentile bootstrap interval of the mean over seeds
    (``scipy.stats.bootstrap``; NaN when n < 2). ``steps`` restricts the steps (see
    :func:`checkpoint_steps`); by default every logged step is used.
    """
    if steps is not None:
        metrics = metrics[metrics["step"].isin(np.asarray(steps))]
    if metrics.empty:
        return pd.DataFrame(columns=STATS_COLUMNS)
    wide = by_seed_matrix(metrics)
    matrix = wide.to_numpy(dtype="float64")
    n = np.sum(~np.isnan(matrix), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(matrix, axis=1)
            std = np.nanstd(matrix, axis=1, ddof=1)
            q25, median, q75 = np.nanpercentile(matrix, [25, 50, 75], axis=1)
            table = pd.DataFrame({
                "n": n, "mean": mean, "std": np.where(n > 1, std, np.nan),
                "cv": np.where(n > 1, std / np.abs(mean), np.nan), "median": median, "iqr": q75 - q25,
                "min": np.nanmin(matrix, axis=1), "max": np.nanmax(matrix, axis=1),
            }, index=wide.index)
    ci = np.full((len(matrix), 2), np.nan)
    for count in np.unique(n):
        rows = np.flatnonzero(n == count)
        dense = matrix[rows]
        if count < matrix.shape[1]:  # move the NaN of missing seeds to the end, keep the real values
            dense = np.sort(dense, axis=1)[:, :count]
        ci[rows] = bootstrap_mean_ci(dense, n_resamples, confidence, random_state)
    table["ci_low"], table["ci_high"] = ci[:, 0], ci[:, 1]
    table = table.reset_index()
    table["model"] = table["model"].astype(str)
    table["metric"] = table["metric"].astype(str)
    return table[STATS_COLUMNS]


# ---------------------------------------------------------------------------------------------
# Multi-Bootstrap (MultiBERTs, Sellam et al., ICLR 2022)


@dataclass
class BootstrapComparison:
    """Result of a Multi-Bootstrap comparison of arm B against arm A (difference = B - A)."""

    mean_a: float
    mean_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float  # one-sided: share of resampled differences <= 0 (evidence that B > A)
    n_seeds_a: int
    n_seeds_b: int
    n_items: int  # 0 when only seed-level values were given
    n_resamples: int

    def as_dict(self) -> dict:
        return asdict(self)


def as_seed_item_matrix(scores) -> np.ndarray:
    """Scores as a (seeds, items) matrix; seed-level values become a single column."""
    matrix = np.asarray(scores, dtype="float64")
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2 or matrix.shape[0] < 1 or np.isnan(matrix).any():
        raise AnalysisError("Multi-Bootstrap scores must be a (seeds,) or (seeds, items) array without NaN; "
                            "drop missing seeds or items first.")
    return matrix


def resampled_means(matrix: np.ndarray, item_weights: np.ndarray | None, seed_draws: np.ndarray) -> np.ndarray:
    """Mean over resampled seeds of the mean over resampled items, for each bootstrap draw."""
    if item_weights is None:
        per_seed = np.repeat(matrix[:, :1], seed_draws.shape[0], axis=1)  # (seeds, draws)
    else:
        per_seed = matrix @ item_weights.T / matrix.shape[1]  # (seeds, draws)
    draws = np.arange(seed_draws.shape[0])[:, None]
    return per_seed.T[draws, seed_draws].mean(axis=1)


def multi_bootstrap(scores_a, scores_b, n_resamples: int = 2000, confidence: float = 0.95,
                    paired_seeds: bool = False, random_state: int = 0) -> BootstrapComparison:
    """Compare two arms (two sizes or two configurations) with the Multi-Bootstrap.

    Each arm is a (seeds, items) matrix of per-example scores, or a (seeds,) vector of per-seed
    scores when per-item data is absent (then only seeds are resampled). Seeds are resampled per
    arm (or jointly when ``paired_seeds``, for arms that share seeds), items jointly for both arms
    (they are the same test examples). Returns the means, the difference B - A with a percentile
    interval and the one-sided p-value for "B > A".
    """
    a, b = as_seed_item_matrix(scores_a), as_seed_item_matrix(scores_b)
    if a.shape[1] != b.shape[1]:
        raise AnalysisError(f"The two arms score different numbers of items ({a.shape[1]} and {b.shape[1]}); "
                            "give per-item scores on the same examples, in the same order.")
    if paired_seeds and a.shape[0] != b.shape[0]:
        raise AnalysisError("paired_seeds needs the same seeds in both arms; drop unmatched seeds or unpair them.")
    rng = np.random.default_rng(random_state)
    n_items = a.shape[1] if a.shape[1] > 1 else 0
    item_weights = None
    if n_items:
        item_draws = rng.integers(0, n_items, size=(n_resamples, n_items))
        flat = (item_draws + np.arange(n_resamples)[:, None] * n_items).ravel()
        item_weights = np.bincount(flat, minlength=n_resamples * n_items).reshape(n_resamples, n_items).astype("float64")
    seeds_a = rng.integers(0, a.shape[0], size=(n_resamples, a.shape[0]))
    seeds_b = seeds_a if paired_seeds else rng.integers(0, b.shape[0], size=(n_resamples, b.shape[0]))
    differences = resampled_means(b, item_weights, seeds_b) - resampled_means(a, item_weights, seeds_a)
    tail = (1 - confidence) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    mean_a, mean_b = float(a.mean()), float(b.mean())
    return BootstrapComparison(mean_a, mean_b, mean_b - mean_a, float(low), float(high),
                               float(np.mean(differences <= 0)), a.shape[0], b.shape[0], n_items, n_resamples)


def final_values(metrics: pd.DataFrame, metric: str, step: int | None = None) -> pd.DataFrame:
    """One value per (model, seed) of ``metric``: at ``step``, or at each run's last logged step."""
    rows = metrics[metrics["metric"] == metric]
    if rows.empty:
        raise AnalysisError(f"The study has no metric {metric!r}; pick one of the metrics it holds.")
    if step is not None:
        rows = rows[rows["step"] == step]
    else:
        rows = rows.sort_values("step").groupby(["model", "seed"], observed=True).tail(1)
    return rows[["model", "seed", "step", "value"]].astype({"model": str}).reset_index(drop=True)


def compare_models(metrics: pd.DataFrame, metric: str, model_a: str, model_b: str, step: int | None = None,
                   n_resamples: int = 2000, random_state: int = 0) -> BootstrapComparison:
    """Multi-Bootstrap over seeds of ``metric`` (at ``step`` or each run's final step): ``model_b`` vs ``model_a``."""
    values = final_values(metrics, metric, step)
    arm_a = values.loc[values["model"] == str(model_a), "value"].to_numpy()
    arm_b = values.loc[values["model"] == str(model_b), "value"].to_numpy()
    if len(arm_a) == 0 or len(arm_b) == 0:
        raise AnalysisError(f"Model {model_a if len(arm_a) == 0 else model_b!r} has no {metric!r} values; "
                            "pick models present in the study.")
    return multi_bootstrap(arm_a, arm_b, n_resamples=n_resamples, random_state=random_state)


def spread_test(metrics: pd.DataFrame, metric: str, step: int | None = None, models=None) -> dict:
    """Brown-Forsythe test (Levene, centred on the median) of whether the cross-seed spread differs by size.

    Uses each run's value at ``step`` (default: each run's last step). Returns statistic, p_value
    and the models and seed counts used; NaN statistic when fewer than two models have >= 2 seeds.
    """
    values = final_values(metrics, metric, step)
    groups = {m: g["value"].to_numpy() for m, g in values.groupby("model", sort=False)}
    if models is not None:
        groups = {m: groups[m] for m in map(str, models) if m in groups}
    groups = {m: v for m, v in groups.items() if len(v) >= 2}
    result = {"metric": metric, "step": step, "models": ",".join(groups), "n_seeds": ",".join(str(len(v)) for v in groups.values()),
              "statistic": np.nan, "p_value": np.nan}
    if len(groups) >= 2:
        test = scipy_stats.levene(*groups.values(), center="median")
        result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
    return result
