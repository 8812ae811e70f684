"""The ``mad`` rule, for a study's final values: a run whose final value (the mean of its last 1% of
steps) lies more than ``threshold`` robust SDs (|x - median| / (1.4826 MAD), 3.5) from the other
runs' median, and at least ``min_relative_deviation`` (1%) of the median away from it (a loss 0.3%
off is not an outlier whatever its robust z-score). It judges ``metrics``, the final training and
validation losses by default, and decides only once a run has ended: the replay does not replay it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.rules import BaseRule, Judged, concat_outliers, outlier_frame, register, wide_by_seed
from polypythia.stability import MAD_TO_SD
from polypythia.study import label_order


@dataclass(frozen=True)
class MadKnobs:
    """The knobs of the final-value rule."""

    threshold: float = 3.5  # robust z-score beyond which a final value is an outlier
    min_relative_deviation: float = 0.01  # and at least this share of |median| away from the median
    metrics: tuple[str, ...] = ("train/loss", "valid/loss")  # the cross-seed signals whose final values it judges

    def __post_init__(self):
        if self.threshold <= 0 or self.min_relative_deviation < 0:
            raise AnalysisError(
                f"The MAD rule needs a threshold > 0 and a relative deviation >= 0, not {self.threshold} and "
                f"{self.min_relative_deviation}; check --mad-threshold."
            )


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

    The same numbers without building that table when, as :func:`analysis.tidy_table.tidy` leaves them, each
    run's rows are contiguous, with rising steps and finite values: a dense loss curve of 143,000
    steps per run would otherwise be pivoted into a (steps x runs) table only to average its last 1%.
    Otherwise the table is built. ``blocks``: :func:`analysis.tidy_table.run_blocks` of ``metrics`` (then the
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
    threshold: float = MadKnobs.threshold,
    min_relative_deviation: float = MadKnobs.min_relative_deviation,
    blocks: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Outlier rows of :func:`mad_flags` on each run's final value (:func:`final_row`) of ``metric``."""
    rows = []
    for model, final in final_rows(metrics, metric, blocks=blocks).items():
        values = final.iloc[0].dropna()
        deviation = robust_deviation(final).iloc[0]
        for seed in mad_flags(values, threshold, min_relative_deviation):
            rows.append(mad_row(model, str(seed), metric, threshold, int(final.index[0]), float(deviation[seed])))
    return outlier_frame(rows)


def mad_row(model: str, seed: str, metric: str, threshold: float, step: int, deviation: float) -> dict:
    """One outlier row of the MAD rule: a one-checkpoint episode at the run's last step."""
    return {
        "model": model,
        "seed": seed,
        "metric": metric,
        "rule": f"mad_{threshold:g}",
        "onset_step": step,
        "end_step": step,
        "n_checkpoints_out": 1,
        "onset_deviation_sd": deviation,
        "max_deviation_sd": deviation,
        "band_deviation_sd": np.nan,
        "threshold_sd": threshold,
        "recovered": False,
        "recovery_step": None,
    }


class MadRule(BaseRule):
    """Judges the final value of each of ``knobs.metrics`` the study has; not replayable."""

    name = "mad"
    knobs = MadKnobs

    def label(self, knobs: MadKnobs) -> str:
        return f"mad_{knobs.threshold:g}"

    def judge(self, study: Judged, knobs: MadKnobs) -> pd.DataFrame:
        present = study.present()
        return concat_outliers(
            flag_mad_outliers(study.metrics, metric, knobs.threshold, knobs.min_relative_deviation, study.blocks)
            for metric in knobs.metrics
            if metric in present
        )

    def describe(self, knobs: MadKnobs) -> str:
        return (
            f"`{self.label(knobs)}`: a final value with |x - median| / (1.4826 MAD) > "
            f"{knobs.threshold:g} and {knobs.min_relative_deviation:.0%} from the median."
        )

    def first_alerts(self, table: pd.DataFrame, signal: str, knobs: MadKnobs) -> None:
        return None  # a final value exists once the run has ended: nothing to replay


register(MadRule())
