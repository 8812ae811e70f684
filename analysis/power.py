"""How many seeds a comparison needs: ``python -m analysis power`` (issue #23, item 4).

The method is Colas, Sigaud and Oudeyer 2018, "How Many Random Seeds? Statistical Power Analysis in
Deep Reinforcement Learning Experiments" (arXiv 1806.08295): the seed-to-seed spread of a metric, from a
pilot study, sets how many seeds per arm a t-test needs to detect a difference with a given power. Here:

* seeds per arm for an effect of d seed SDs (Cohen's d): the smallest n at which Student's two-sample
  t-test (equal variances, n seeds per arm; two-sided unless ``one_sided``) at level ``alpha`` reaches
  ``power``, from the noncentral t distribution (``scipy.stats.nct``), the exact power that Cohen's
  tables (Statistical Power Analysis, 1988, Table 2.4.1) and G*Power give; checked by simulating
  studies with ``scipy.stats.power``. Paired (each seed run in both arms): the one-sample t-test on the
  per-seed differences, d being their mean over their SD (d_z), n pairs;
* how well n seeds pin down the seed SD: the chi-square interval of the true SD as a multiple of the
  one measured, ``sqrt((n - 1) / chi2(n - 1).ppf(1 - a/2))`` to ``sqrt((n - 1) / chi2(n - 1).ppf(a/2))``;
* how far from the mean of n reference seeds a new seed must lie to be an outlier: the prediction
  interval ``t(n - 1).ppf(1 - a/2) * sqrt(1 + 1/n)`` reference SDs.

Colas et al. size Welch's t-test (unequal variances) with an approximation from t quantiles and test one
direction; with equal seeds per arm and one seed SD for both arms, as here, Welch's and Student's tests
nearly agree, and the noncentral t gives the exact n (``--one-sided`` for their direction-only test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from analysis.errors import AnalysisError

CURVE_SEEDS = range(2, 31)  # the power curve and the table: 2 to 30 seeds
MAX_SEEDS = 100_000  # beyond this the effect is too small to plan for with seeds


@dataclass(frozen=True)
class Design:
    """A comparison of two arms: the effect in seed SDs and the test's level and power."""

    effect_sd: float  # Cohen's d: difference of the arms' means / seed SD (paired: d_z, see the module docstring)
    alpha: float = 0.05
    power: float = 0.8
    paired: bool = False
    one_sided: bool = False

    def describe(self) -> str:
        test = "paired t-test on the per-seed differences" if self.paired else "two-sample t-test"
        return f"{test}, {'one' if self.one_sided else 'two'}-sided, alpha {self.alpha:g}, power {self.power:g}"


def check_design(design: Design) -> None:
    """One-sentence errors for a design that has no answer."""
    if not (math.isfinite(design.effect_sd) and design.effect_sd > 0):
        raise AnalysisError(
            f"The effect must be a positive number of seed SDs (Cohen's d), not {design.effect_sd:g}; "
            "give the size of the difference to detect, e.g. --effect 1."
        )
    if not 0 < design.alpha < 1:
        raise AnalysisError(f"--alpha must lie between 0 and 1 (the usual level: 0.05), not {design.alpha:g}.")
    if not design.alpha < design.power < 1:
        raise AnalysisError(
            f"--power must lie between --alpha ({design.alpha:g}) and 1 (the usual target: 0.8), not {design.power:g}."
        )


def power_at(n, design: Design):
    """The power of the test with ``n`` seeds per arm (paired: ``n`` pairs), from the noncentral t."""
    n = np.asarray(n, dtype="float64")
    if design.paired:
        df, ncp = n - 1, design.effect_sd * np.sqrt(n)
    else:
        df, ncp = 2 * n - 2, design.effect_sd * np.sqrt(n / 2)
    if design.one_sided:
        return stats.nct.sf(stats.t.ppf(1 - design.alpha, df), df, ncp)
    critical = stats.t.ppf(1 - design.alpha / 2, df)
    return stats.nct.sf(critical, df, ncp) + stats.nct.cdf(-critical, df, ncp)


def seeds_per_arm(design: Design) -> int:
    """The smallest number of seeds per arm (at least 2) whose power reaches ``design.power``."""
    check_design(design)
    low, high = 1, 2  # power_at(low) < target <= power_at(high) once the doubling stops
    while power_at(high, design) < design.power:
        low, high = high, high * 2
        if high > MAX_SEEDS:
            raise AnalysisError(
                f"An effect of {design.effect_sd:g} seed SDs needs more than {MAX_SEEDS:,} seeds per "
                "arm; plan for a larger effect."
            )
    while high - low > 1:  # the power rises with n
        middle = (low + high) // 2
        low, high = (middle, high) if power_at(middle, design) < design.power else (low, middle)
    return high


def simulated_power(n: int, design: Design, studies: int = 10_000, seed: int = 0) -> float:
    """The power with ``n`` seeds per arm found by simulating ``studies`` studies of normal seed values
    (``scipy.stats.power`` with ``scipy.stats.ttest_ind`` or, paired, ``ttest_1samp`` on the differences)."""
    if not hasattr(stats, "power"):  # pyproject admits scipy 1.11, which predates it
        raise AnalysisError(
            f"This scipy ({__import__('scipy').__version__}) has no scipy.stats.power to simulate "
            "the test with; upgrade scipy, or pass --simulations 0."
        )
    rng = np.random.default_rng(seed)
    alternative = "greater" if design.one_sided else "two-sided"
    if design.paired:

        def test(differences, axis):
            return stats.ttest_1samp(differences, 0.0, axis=axis, alternative=alternative).pvalue

        rvs, sizes = (lambda size: rng.normal(design.effect_sd, 1.0, size),), (n,)
    else:

        def test(control, treated, axis):
            return stats.ttest_ind(treated, control, axis=axis, alternative=alternative).pvalue

        rvs = (lambda size: rng.normal(0.0, 1.0, size), lambda size: rng.normal(design.effect_sd, 1.0, size))
        sizes = (n, n)
    return float(stats.power(test, rvs, sizes, significance=design.alpha, n_resamples=studies).power)


def sd_interval(n, level: float = 0.95) -> tuple:
    """Where the true seed SD lies, as multiples of the SD measured on ``n`` seeds (chi-square interval)."""
    n = np.asarray(n, dtype="float64")
    tail = (1 - level) / 2
    return np.sqrt((n - 1) / stats.chi2.ppf(1 - tail, n - 1)), np.sqrt((n - 1) / stats.chi2.ppf(tail, n - 1))


def outlier_distance_sd(n, level: float = 0.95):
    """How many reference SDs from the mean of ``n`` reference seeds a new seed lies outside the ``level``
    prediction interval (normal seed values): beyond it, it is an outlier at that level."""
    n = np.asarray(n, dtype="float64")
    return stats.t.ppf(1 - (1 - level) / 2, n - 1) * np.sqrt(1 + 1 / n)


def power_table(design: Design, level: float = 0.95, seeds=CURVE_SEEDS) -> pd.DataFrame:
    """Per number of seeds: the power, the SD interval and the outlier distance."""
    seeds = np.asarray(list(seeds))
    low, high = sd_interval(seeds, level)
    return pd.DataFrame(
        {
            "seeds": seeds,
            "power": power_at(seeds, design),
            "sd_low": low,
            "sd_high": high,
            "outlier_sd": outlier_distance_sd(seeds, level),
        }
    )


# ---------------------------------------------------------------------------------------------
# The seed SD of a study


@dataclass(frozen=True)
class SeedSpread:
    """The spread across seeds of one metric of one model at one step."""

    model: str
    metric: str
    step: int
    values: pd.Series  # by run label
    left_out: tuple[str, ...]  # runs of the model with no value at that step
    design: str  # which seeds the runs vary (polypythia.study.seed_design)

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def sd(self) -> float:
        return float(self.values.std(ddof=1))


def seed_spread(study, metric: str, model: str | None = None, step: int | None = None) -> SeedSpread:
    """The seeds' values of ``metric`` for ``model`` (required when the study has several) at ``step``
    (default: the model's last step of that metric)."""
    from polypythia.study import label_order, parse_run_label, seed_design

    metrics = study.metrics
    rows = metrics[metrics["metric"].astype(str) == metric]
    if rows.empty:
        raise AnalysisError(
            f"The source {study.source} has no metric {metric!r}{similar(metric, metrics)}; "
            "give one of its metrics with --metric."
        )
    models = list(pd.unique(rows["model"].astype(str)))
    if model is None and len(models) > 1:
        raise AnalysisError(f"The source holds {metric} for the models {', '.join(models)}; choose one with --model.")
    model = model or models[0]
    if model not in models:
        raise AnalysisError(f"The source has no {metric} for model {model!r}; choose one of {', '.join(models)}.")
    rows = rows[rows["model"].astype(str) == model]
    step = int(rows["step"].max()) if step is None else int(step)
    at = rows[rows["step"] == step]
    if at.empty:
        raise AnalysisError(
            f"Model {model} has no {metric} at step {step}; its steps run from {rows['step'].min()} to "
            f"{rows['step'].max()}: choose one of them with --step."
        )
    values = at.set_index(at["seed"].astype(str))["value"]
    values = values.iloc[sorted(range(len(values)), key=lambda i: label_order(values.index[i]))]
    if len(values) < 2:
        raise AnalysisError(
            f"Model {model} has {metric} at step {step} for only {len(values)} seed; the seed SD needs "
            "at least 2 seeds: give a study with more seeds, or another --step."
        )
    every = sorted(set(rows["seed"].astype(str)), key=label_order)
    seeds = [parse_run_label(label) or (0, 0) for label in values.index]
    return SeedSpread(
        model,
        metric,
        step,
        values,
        tuple(s for s in every if s not in values.index),
        seed_design([w for w, _ in seeds], [d for _, d in seeds]),
    )


def similar(metric: str, metrics: pd.DataFrame) -> str:
    import difflib

    names = [str(name) for name in pd.unique(metrics["metric"].astype(str))]
    close = difflib.get_close_matches(metric, names, n=3, cutoff=0.5)
    return f" (close: {', '.join(close)})" if close else ""
