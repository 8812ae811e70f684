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

STATS_COLUMNS = [
    "model",
    "step",
    "metric",
    "n",
    "mean",
    "std",
    "cv",
    "median",
    "iqr",
    "min",
    "max",
    "ci_low",
    "ci_high",
]


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
    return metrics.pivot_table(
        index=["model", "step", "metric"], columns="seed", values="value", aggfunc="last", observed=True
    )


def bootstrap_mean_ci(
    values: np.ndarray, n_resamples: int, confidence: float, random_state: int, groups_per_batch: int = 2000
) -> np.ndarray:
    """Percentile bootstrap interval of the mean for each row of a (groups, seeds) matrix without NaN.

    The interval ``scipy.stats.bootstrap((row,), np.mean, n_resamples=n_resamples, method="percentile",
    confidence_level=confidence, rng=np.random.default_rng(random_state))`` gives for every row, computed
    for all rows at once: the same resampling indices (``rng.integers(0, n, (n_resamples, n))``, as
    scipy's ``_bootstrap_resample`` draws them), each resample's mean as a product with its counts of
    each seed (a matrix product instead of a (groups, resamples, seeds) copy of the data), and the
    interval by ``scipy.stats.quantile`` as scipy takes it. Equal to scipy's up to floating-point
    rounding (``tests/analysis/test_stats.py``).
    """
    out = np.full((len(values), 2), np.nan)
    n = values.shape[1]
    if n < 2:
        return out
    draws = np.random.default_rng(random_state).integers(0, n, (n_resamples, n))
    counts = np.zeros((n_resamples, n))
    np.add.at(counts, (np.repeat(np.arange(n_resamples), n), draws.ravel()), 1.0)
    tail = (1 - confidence) / 2
    levels = np.array([tail, 1 - tail])
    for start in range(0, len(values), groups_per_batch):
        chunk = values[start : start + groups_per_batch]
        means = (chunk @ counts.T) / n  # (groups, resamples)
        out[start : start + groups_per_batch] = scipy_stats.quantile(means, levels, axis=-1)
    return out


def cross_seed_stats(
    metrics: pd.DataFrame, steps=None, n_resamples: int = 2000, confidence: float = 0.95, random_state: int = 0
) -> pd.DataFrame:
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
            table = pd.DataFrame(
                {
                    "n": n,
                    "mean": mean,
                    "std": np.where(n > 1, std, np.nan),
                    "cv": np.where(n > 1, std / np.abs(mean), np.nan),
                    "median": median,
                    "iqr": q75 - q25,
                    "min": np.nanmin(matrix, axis=1),
                    "max": np.nanmax(matrix, axis=1),
                },
                index=wide.index,
            )
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
        raise AnalysisError(
            "Multi-Bootstrap scores must be a (seeds,) or (seeds, items) array without NaN; "
            "drop missing seeds or items first."
        )
    return matrix


def resampled_means(matrix: np.ndarray, item_weights: np.ndarray | None, seed_draws: np.ndarray) -> np.ndarray:
    """Mean over resampled seeds of the mean over resampled items, for each bootstrap draw."""
    if item_weights is None:
        per_seed = np.repeat(matrix[:, :1], seed_draws.shape[0], axis=1)  # (seeds, draws)
    else:
        per_seed = matrix @ item_weights.T / matrix.shape[1]  # (seeds, draws)
    draws = np.arange(seed_draws.shape[0])[:, None]
    return per_seed.T[draws, seed_draws].mean(axis=1)


def multi_bootstrap(
    scores_a,
    scores_b,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    paired_seeds: bool = False,
    random_state: int = 0,
) -> BootstrapComparison:
    """Compare two arms (two sizes or two configurations) with the Multi-Bootstrap.

    Each arm is a (seeds, items) matrix of per-example scores, or a (seeds,) vector of per-seed
    scores when per-item data is absent (then only seeds are resampled). Seeds are resampled per
    arm (or jointly when ``paired_seeds``, for arms that share seeds), items jointly for both arms
    (they are the same test examples). Returns the means, the difference B - A with a percentile
    interval and the one-sided p-value for "B > A".
    """
    a, b = as_seed_item_matrix(scores_a), as_seed_item_matrix(scores_b)
    if a.shape[1] != b.shape[1]:
        raise AnalysisError(
            f"The two arms score different numbers of items ({a.shape[1]} and {b.shape[1]}); "
            "give per-item scores on the same examples, in the same order."
        )
    if paired_seeds and a.shape[0] != b.shape[0]:
        raise AnalysisError("paired_seeds needs the same seeds in both arms; drop unmatched seeds or unpair them.")
    rng = np.random.default_rng(random_state)
    n_items = a.shape[1] if a.shape[1] > 1 else 0
    item_weights = None
    if n_items:
        item_draws = rng.integers(0, n_items, size=(n_resamples, n_items))
        flat = (item_draws + np.arange(n_resamples)[:, None] * n_items).ravel()
        item_weights = (
            np.bincount(flat, minlength=n_resamples * n_items).reshape(n_resamples, n_items).astype("float64")
        )
    seeds_a = rng.integers(0, a.shape[0], size=(n_resamples, a.shape[0]))
    seeds_b = seeds_a if paired_seeds else rng.integers(0, b.shape[0], size=(n_resamples, b.shape[0]))
    differences = resampled_means(b, item_weights, seeds_b) - resampled_means(a, item_weights, seeds_a)
    tail = (1 - confidence) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    mean_a, mean_b = float(a.mean()), float(b.mean())
    return BootstrapComparison(
        mean_a,
        mean_b,
        mean_b - mean_a,
        float(low),
        float(high),
        float(np.mean(differences <= 0)),
        a.shape[0],
        b.shape[0],
        n_items,
        n_resamples,
    )


def last_row_per_run(rows: pd.DataFrame) -> np.ndarray:
    """Positions of each (model, seed) run's row with the largest step (of equal steps, the later row),
    runs in (model, seed) order: the categories' order (sizes by parameter count, run labels 0, 1, ...,
    10) or, for plain columns, sorted. One pass over the rows when, as :func:`analysis.tidy_table.tidy` leaves
    them, each run's rows are contiguous with rising steps; otherwise a stable sort."""

    def codes(column: pd.Series) -> np.ndarray:
        if isinstance(column.dtype, pd.CategoricalDtype):
            return column.cat.codes.to_numpy().astype("int64")
        from polypythia.study import label_order

        order = {value: i for i, value in enumerate(sorted(pd.unique(column), key=label_order))}
        return column.map(order).to_numpy().astype("int64")

    if rows.empty:
        return np.empty(0, dtype="int64")
    seed = codes(rows["seed"])
    key = codes(rows["model"]) * (int(seed.max()) + 1) + seed
    steps = rows["step"].to_numpy()
    key_step, step_step = np.diff(key), np.diff(steps)
    if ((key_step > 0) | ((key_step == 0) & (step_step > 0))).all():
        return np.r_[np.flatnonzero(key_step), len(rows) - 1]
    order = np.lexsort((np.arange(len(rows)), steps, key))
    ends = np.r_[np.flatnonzero(np.diff(key[order])), len(rows) - 1]
    return order[ends]


def final_values(
    metrics: pd.DataFrame, metric: str, step: int | None = None, blocks: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One value per (model, seed) of ``metric``: at ``step``, or at each run's last logged step (runs in
    model and run-label order, see :func:`last_row_per_run`). ``blocks``: :func:`analysis.tidy_table.run_blocks`
    of ``metrics``, to read each run's last row directly."""
    if step is None and blocks is not None:
        runs = blocks[(blocks["metric"] == metric).to_numpy()]
        if len(runs):
            last = metrics.iloc[runs["stop"].to_numpy() - 1]
            return last[["model", "seed", "step", "value"]].astype({"model": str}).reset_index(drop=True)
    rows = metrics[(metrics["metric"] == metric).to_numpy()]
    if rows.empty:
        raise AnalysisError(f"The study has no metric {metric!r}; pick one of the metrics it holds.")
    if step is not None:
        rows = rows[rows["step"] == step]
    else:
        rows = rows.iloc[last_row_per_run(rows)]
    return rows[["model", "seed", "step", "value"]].astype({"model": str}).reset_index(drop=True)


def compare_models(
    metrics: pd.DataFrame,
    metric: str,
    model_a: str,
    model_b: str,
    step: int | None = None,
    n_resamples: int = 2000,
    random_state: int = 0,
    values: pd.DataFrame | None = None,
) -> BootstrapComparison:
    """Multi-Bootstrap over seeds of ``metric`` (at ``step`` or each run's final step): ``model_b`` vs ``model_a``.
    ``values``: :func:`final_values` of ``metrics``, when the caller already has them."""
    values = final_values(metrics, metric, step) if values is None else values
    arm_a = values.loc[values["model"] == str(model_a), "value"].to_numpy()
    arm_b = values.loc[values["model"] == str(model_b), "value"].to_numpy()
    if len(arm_a) == 0 or len(arm_b) == 0:
        raise AnalysisError(
            f"Model {model_a if len(arm_a) == 0 else model_b!r} has no {metric!r} values; "
            "pick models present in the study."
        )
    return multi_bootstrap(arm_a, arm_b, n_resamples=n_resamples, random_state=random_state)


def spread_test(
    metrics: pd.DataFrame, metric: str, step: int | None = None, models=None, values: pd.DataFrame | None = None
) -> dict:
    """Brown-Forsythe test (Levene, centred on the median) of whether the cross-seed spread differs by size.

    Uses each run's value at ``step`` (default: each run's last step). Returns statistic, p_value
    and the models and seed counts used; NaN statistic when fewer than two models have >= 2 seeds.
    ``values``: :func:`final_values` of ``metrics``, when the caller already has them.
    """
    values = final_values(metrics, metric, step) if values is None else values
    groups = {m: g["value"].to_numpy() for m, g in values.groupby("model", sort=False)}
    if models is not None:
        groups = {m: groups[m] for m in map(str, models) if m in groups}
    groups = {m: v for m, v in groups.items() if len(v) >= 2}
    result = {
        "metric": metric,
        "step": step,
        "models": ",".join(groups),
        "n_seeds": ",".join(str(len(v)) for v in groups.values()),
        "statistic": np.nan,
        "p_value": np.nan,
    }
    if len(groups) >= 2:
        test = scipy_stats.levene(*groups.values(), center="median")
        result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
    return result
