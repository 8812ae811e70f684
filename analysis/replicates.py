"""Replicates: the same seeds trained again, and the nondeterminism floor they measure.

A study may hold a run's seeds trained more than once (``launch.py -m seed=1 replicate=0,1,2``;
its labels ``1``, ``1-rep1``, ``1-rep2``). Run-to-run nondeterminism alone (thread scheduling, GPU
atomics, reduction order) can give a spread of final results comparable to the spread between seeds
(Zhuang et al., "Randomness in neural network training: characterizing the impact of tooling",
MLSys 2022), so a seed comparison means something only where the seed spread exceeds the replicate
spread. The replicates are therefore kept out of every seed statistic (a replicate of seed 1 is not
an eleventh seed, nor an outlier beside its twin): :func:`set_aside` keeps one run per seed (the
lowest replicate) in the study and the rest apart; :func:`floor_table` puts, per model, the spread
between replicates next to the spread between seeds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.values import final_per_run
from polypythia.study import label_replicate, seed_label

FLOOR_COLUMNS = [
    "model",
    "metric",
    "seeds_replicated",
    "replicate_runs",
    "replicate_sd",
    "replicate_max_diff",
    "seed_runs",
    "seed_sd",
    "curves_identical",
]


def _run_keys(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, run label) with its seeds' label and its replicate number."""
    runs = metrics[["model", "seed"]].drop_duplicates().astype(str)  # the few runs, not every row as text
    return runs.assign(seeds=runs["seed"].map(seed_label), replicate=runs["seed"].map(label_replicate))


def set_aside(metrics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the seed runs, the further replicates): per model and seeds, the run with the lowest replicate
    number stays a seed run; every other replicate of the same seeds is set apart."""
    column = metrics["seed"]
    labels = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else pd.unique(column)
    if not any(label_replicate(label) for label in labels):  # no replicate at all: nothing to look at per row
        return metrics, metrics.iloc[0:0]
    runs = _run_keys(metrics)
    lowest = runs.groupby(["model", "seeds"])["replicate"].transform("min")
    extra = runs[runs["replicate"] != lowest]
    if extra.empty:
        return metrics, metrics.iloc[0:0]
    keys = pd.MultiIndex.from_frame(metrics[["model", "seed"]].astype(str))
    apart = keys.isin(pd.MultiIndex.from_frame(extra[["model", "seed"]]))
    kept, others = metrics[~apart].reset_index(drop=True), metrics[apart].reset_index(drop=True)
    for frame in (kept, others):
        if isinstance(frame["seed"].dtype, pd.CategoricalDtype):
            frame["seed"] = frame["seed"].cat.remove_unused_categories()
    return kept, others


def _finals(rows: pd.DataFrame) -> pd.Series:
    """Each run's final value as the summary takes it (the mean over its last 1% of steps), by run label."""
    if rows.empty:
        return pd.Series(dtype="float64")
    return final_per_run(rows).set_index("seed")["value"]


def _curves_identical(rows: pd.DataFrame, runs: pd.DataFrame) -> bool:
    """Whether every replicate's curve equals its seed run's value for value at every common step."""
    wide = rows.astype({"seed": str}).pivot_table(index="step", columns="seed", values="value", aggfunc="last")
    for _, group in runs.groupby("seeds"):
        columns = [c for c in group["seed"] if c in wide.columns]
        if len(columns) > 1:
            block = wide[columns].dropna()
            if block.empty or not (block.to_numpy() == block.iloc[:, [0]].to_numpy()).all():
                return False
    return True


def floor_row(
    model: str, metric: str, seeds: pd.DataFrame, replicates: pd.DataFrame, curves: bool = True
) -> dict | None:
    """The nondeterminism floor of one model: replicate spread (pooled within-seed SD, largest
    difference between replicates of one seed) beside the seed spread (SD of the seed runs' finals)."""
    both = pd.concat([seeds, replicates], ignore_index=True)
    runs = _run_keys(both)
    runs = runs[runs["seeds"].isin(_run_keys(replicates)["seeds"])]
    finals = _finals(both)
    groups = [finals[g["seed"]].dropna() for _, g in runs.groupby("seeds")]
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        return None
    within = np.sqrt(np.mean([g.var(ddof=1) for g in groups]))
    seed_finals = _finals(seeds)
    return {
        "model": model,
        "metric": metric,
        "seeds_replicated": len(groups),
        "replicate_runs": int(sum(len(g) for g in groups)),
        "replicate_sd": float(within),
        "replicate_max_diff": float(max(g.max() - g.min() for g in groups)),
        "seed_runs": len(seed_finals),
        "seed_sd": float(seed_finals.std(ddof=1)) if len(seed_finals) > 1 else np.nan,
        "curves_identical": _curves_identical(both, runs) if curves else None,
    }


def floor_table(
    seeds: pd.DataFrame, replicates: pd.DataFrame, metric: str = "train/loss", curves: bool = True
) -> pd.DataFrame:
    """Per model with replicates: the nondeterminism floor of ``metric`` next to its seed spread
    (``curves``: the tables hold whole curves, so whether they are identical is said too)."""
    rows = []
    for model in sorted(set(replicates["model"].astype(str))):
        pick = [
            frame[(frame["model"].astype(str) == model) & (frame["metric"].astype(str) == metric)]
            for frame in (seeds, replicates)
        ]
        row = floor_row(model, metric, *pick, curves=curves) if len(pick[1]) else None
        if row is not None:
            rows.append(row)
    return pd.DataFrame(rows, columns=FLOOR_COLUMNS)


def floor_lines(table: pd.DataFrame) -> list[str]:
    """One sentence per model: the replicate spread, the seed spread, and which is larger."""
    lines = []
    for row in table.itertuples():
        same = "; every replicate's curve is identical to its seed run's" if row.curves_identical is True else ""
        seed = (
            f"seed spread (SD over {row.seed_runs} seeds) {row.seed_sd:.4g}"
            if np.isfinite(row.seed_sd)
            else "no seed spread (one seed)"
        )
        verdict = (
            ""
            if not np.isfinite(row.seed_sd)
            else "; seed variance exceeds it"
            if row.seed_sd > row.replicate_sd
            else "; the seeds differ no more than replicates do"
        )
        lines.append(
            f"Nondeterminism floor of {row.model} {row.metric}: replicate SD {row.replicate_sd:.4g} (largest "
            f"difference {row.replicate_max_diff:.4g}, {row.replicate_runs} runs of {row.seeds_replicated} "
            f"seed(s){same}) vs {seed}{verdict}; replicates are left out of the seed statistics."
        )
    return lines


def set_study_replicates_aside(study) -> None:
    """Move a loaded :class:`analysis.tidy_table.Study`'s further replicates out of its metrics and runs into
    ``study.replicates``; ``study.floor`` and one note per model give the nondeterminism floor."""
    study.metrics, study.replicates = set_aside(study.metrics)
    if study.replicates.empty:
        return
    study.runs = without_runs_of(study.runs, study.replicates)
    apart = study.replicates[["model", "seed"]].astype(str).drop_duplicates()
    study.floor = floor_table(study.metrics, study.replicates)
    lines = floor_lines(study.floor) or [
        f"{len(apart)} replicate run(s) (the same seeds trained again) are left out "
        "of the seed statistics; they hold no train/loss to measure the "
        "nondeterminism floor with."
    ]
    study.notes.extend(lines)


def without_runs_of(runs: pd.DataFrame, replicates: pd.DataFrame) -> pd.DataFrame:
    """The runs table without the runs whose rows ``replicates`` holds."""
    apart = set(zip(replicates["model"].astype(str), replicates["seed"].astype(str)))
    keys = zip(runs["model"].astype(str), runs["seed"].astype(str))
    return runs[[key not in apart for key in keys]].reset_index(drop=True)
