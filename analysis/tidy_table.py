"""The tidy table every source is read into (``model, seed, step, metric, value``), and a :class:`Study`:
that table plus one row per run.

:func:`tidy` checks and normalises the table the loaders build (:mod:`analysis.table_file`,
:mod:`analysis.lmeval`, :mod:`analysis.mlflow_load`); :func:`runs_from_metrics` gives the runs table of a
source that carries no run metadata, and :func:`non_finite_endings` finds the runs whose loss ended in NaN,
before :func:`tidy` sets those values aside. :func:`run_blocks` lets the statistics take each run's rows as
array slices of the sorted table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.values import set_aside as set_impossible_aside
from polypythia.study import TIDY_COLUMNS, label_order, label_replicate, parse_run_label, run_label

# One row per run: (model, weight_seed, data_seed); ``seed`` is its label (polypythia.study.run_label).
RUN_COLUMNS = ["model", "seed", "weight_seed", "data_seed", "run_id", "status", "diverged", "budget"]

# A run whose last value of one of these is NaN or infinite diverged (tidy() drops the value itself).
DIVERGENCE_METRICS = ("train/loss", "valid/loss")


@dataclass
class Study:
    """A loaded study: tidy per-step metrics and one row per run."""

    metrics: pd.DataFrame
    runs: pd.DataFrame
    source: str = ""
    kind: str = ""  # "mlflow", "lm-eval" or "table"
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    notes: list[str] = field(default_factory=list)
    replicates: pd.DataFrame | None = None  # further replicates of seeds, kept out of metrics (analysis.replicates)
    floor: pd.DataFrame | None = None  # their nondeterminism floor beside the seed spread, per model

    @property
    def models(self) -> list[str]:
        """Model names ordered by size (70m < 160m < 1b)."""
        return sort_models(self.metrics["model"].unique())


def sort_models(models) -> list[str]:
    """Order size names like "14m", "160m", "1.4b" by parameter count; unknown names last, by name."""

    def size_in_params(name: str) -> float:
        match = re.match(r"^(\d+(?:\.\d+)?)([mkb])", str(name).lower())
        if not match:
            return float("inf")
        scale = {"k": 1e3, "m": 1e6, "b": 1e9}[match.group(2)]
        return float(match.group(1)) * scale

    return sorted((str(m) for m in models), key=lambda m: (size_in_params(m), m))


def tidy(frame: pd.DataFrame, notes: list[str] | None = None) -> pd.DataFrame:
    """Check and normalise a tidy table: the five columns, typed, sorted, impossible values (NaN, an
    accuracy outside [0, 1], :mod:`analysis.values`) set aside with a note appended to ``notes`` (a
    run whose loss ended in NaN is found by :func:`non_finite_endings` before)."""
    missing = [c for c in TIDY_COLUMNS if c not in frame.columns]
    if missing:
        raise AnalysisError(
            f"The table lacks the column(s) {', '.join(missing)}; give a table with the columns "
            f"{', '.join(TIDY_COLUMNS)}."
        )
    out = frame[TIDY_COLUMNS].copy()
    out["value"] = pd.to_numeric(out["value"], errors="coerce").astype("float64")
    out["metric"] = as_string_category(out["metric"])
    out, note = set_impossible_aside(out)
    if note and notes is not None:
        notes.append(note)
    out["seed"] = run_label_column(out["seed"])
    out["step"] = pd.to_numeric(out["step"], errors="raise").astype("int64")
    out["model"] = as_string_category(out["model"])
    out["model"] = out["model"].cat.reorder_categories(sort_models(out["model"].cat.categories))
    out["metric"] = out["metric"].cat.remove_unused_categories()
    return out.sort_values(["model", "seed", "metric", "step"], kind="stable").reset_index(drop=True)


def run_label_column(column: pd.Series) -> pd.Series:
    """The ``seed`` column as run labels (categorical strings, see :mod:`polypythia.study`): a seed
    number k (also 3.0, "3" or "w3-d3") becomes "k"; "w1-d2" and a replicate's "3-rep1" stay; anything
    else is an AnalysisError."""
    column = column if isinstance(column.dtype, pd.CategoricalDtype) else column.astype("category")
    column = column.cat.remove_unused_categories()
    labels = []
    for category in column.cat.categories:
        number = pd.to_numeric(pd.Series([category]), errors="coerce").iloc[0]
        label = str(int(number)) if pd.notna(number) and float(number).is_integer() else str(category).strip()
        seeds = parse_run_label(label)
        if seeds is None:
            raise AnalysisError(
                f"The seed column holds {category!r}, which is neither a seed number nor a run "
                "label like w1-d2; give whole seed numbers."
            )
        labels.append(run_label(*seeds, label_replicate(label)))  # one label per run: w3-d3 is run 3
    column = column.cat.rename_categories(range(len(labels))).astype("int64").map(dict(enumerate(labels)))
    order = sorted(set(labels), key=label_order)
    return pd.Series(pd.Categorical(column, categories=order), index=column.index)


def as_string_category(column: pd.Series) -> pd.Series:
    """A categorical column with string categories (converting the few categories, not every row)."""
    if not isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype("category")
    column = column.cat.remove_unused_categories()
    categories = [str(c) for c in column.cat.categories]
    if len(set(categories)) < len(categories):  # 1 and "1" both present: merge them
        return column.astype(str).astype("category")
    return column.cat.rename_categories(categories)


def run_blocks(metrics: pd.DataFrame, names=None) -> pd.DataFrame | None:
    """Where each (model, seed, metric) run of ``metrics`` lies: columns model, seed, metric, start, stop
    (row positions ``start:stop``), in (model, seed, metric) category order; only the metrics in
    ``names`` when given. None unless every run is one contiguous stretch of rows with rising steps,
    as :func:`tidy` leaves them (sorted by model, seed, metric, step), and the three columns are
    categorical: then code can take each run's rows as array slices instead of copying and grouping
    a table of 143 million rows."""
    columns = ("model", "seed", "metric")
    if metrics.empty or not all(isinstance(metrics[c].dtype, pd.CategoricalDtype) for c in columns):
        return None
    codes = [metrics[c].cat.codes.to_numpy() for c in columns]
    if any((code < 0).any() for code in codes):  # a missing model, seed or metric
        return None
    change = np.zeros(len(metrics) - 1, dtype=bool)
    for code in codes:
        change |= code[1:] != code[:-1]
    starts = np.r_[0, np.flatnonzero(change) + 1]
    stops = np.r_[starts[1:], len(metrics)]
    keys = pd.DataFrame({c: code[starts] for c, code in zip(columns, codes)})
    if keys.duplicated().any():
        return None
    blocks = keys.assign(start=starts, stop=stops).sort_values(list(columns), kind="stable")
    for c in columns:  # codes -> names, in category order
        blocks[c] = np.asarray(metrics[c].cat.categories, dtype=object)[blocks[c].to_numpy()]
    if names is not None:
        blocks = blocks[blocks["metric"].isin(list(names)).to_numpy()]
    steps = metrics["step"].to_numpy()
    for start, stop in zip(blocks["start"], blocks["stop"]):
        if stop - start > 1 and not (np.diff(steps[start:stop]) > 0).all():
            return None
    return blocks.reset_index(drop=True)


def non_finite_endings(frame: pd.DataFrame) -> dict[tuple[str, str], tuple[str, int]]:
    """``(model, run label) -> (metric, step)`` of the runs whose last value of a loss
    (:data:`DIVERGENCE_METRICS`) is NaN or infinite, in a table of the five columns before :func:`tidy`
    drops those values: runs that diverged, which would otherwise be summarised with an earlier loss."""
    if not set(TIDY_COLUMNS) <= set(frame.columns):
        return {}
    losses = frame[frame["metric"].isin(DIVERGENCE_METRICS).to_numpy()]
    values = pd.to_numeric(losses["value"], errors="coerce").astype("float64").to_numpy()
    if np.isfinite(values).all():
        return {}
    losses = pd.DataFrame(
        {
            "model": losses["model"].astype(str).to_numpy(),
            "seed": run_label_column(losses["seed"]).astype(str).to_numpy(),
            "metric": losses["metric"].astype(str).to_numpy(),
            "step": pd.to_numeric(losses["step"], errors="coerce").to_numpy(),
            "value": values,
        }
    )
    losses = losses[losses["step"].notna()]
    last = losses.sort_values("step", kind="stable").groupby(["model", "seed", "metric"], sort=False).tail(1)
    ended = last[~np.isfinite(last["value"].to_numpy())]
    return {(row.model, row.seed): (row.metric, int(row.step)) for row in ended.itertuples()}


def diverged_notes(diverged: dict[tuple[str, str], tuple[str, int]]) -> list[str]:
    """One note per run that ended in a non-finite loss."""
    return [
        f"Model {model} run {seed} ends with a non-finite {metric} at step {step}; it is marked diverged "
        "(its earlier, finite values are kept)."
        for (model, seed), (metric, step) in sorted(diverged.items())
    ]


def run_pairs(metrics: pd.DataFrame) -> pd.DataFrame:
    """The distinct (model, seed) pairs as strings, in order of first appearance (``drop_duplicates``);
    for categorical columns sorted as :func:`tidy` leaves them, read off where the codes change
    rather than hashing every row (143 million rows for a 500-run study with dense curves)."""
    model, seed = metrics["model"], metrics["seed"]
    if isinstance(model.dtype, pd.CategoricalDtype) and isinstance(seed.dtype, pd.CategoricalDtype) and len(metrics):
        codes = model.cat.codes.to_numpy().astype("int64") * (len(seed.cat.categories) + 1) + seed.cat.codes.to_numpy()
        if (
            (model.cat.codes.to_numpy() >= 0).all()
            and (seed.cat.codes.to_numpy() >= 0).all()
            and (codes[1:] >= codes[:-1]).all()
        ):
            starts = np.r_[0, np.flatnonzero(codes[1:] != codes[:-1]) + 1]
            return pd.DataFrame(
                {"model": [str(m) for m in model.iloc[starts]], "seed": [str(s) for s in seed.iloc[starts]]},
                index=starts,
            )
    return metrics[["model", "seed"]].drop_duplicates().astype({"model": str, "seed": str})


def runs_from_metrics(metrics: pd.DataFrame, diverged: Iterable[tuple[str, str]] = ()) -> pd.DataFrame:
    """A runs table for sources that carry no run metadata: every (model, run) is FINISHED, its
    weight and data seeds read from its label; the (model, run label) pairs in ``diverged`` (see
    :func:`non_finite_endings`) are marked diverged, and listed even when none of their values was finite."""
    diverged = {(str(m), str(s)) for m, s in diverged}
    pairs = run_pairs(metrics)
    known = set(zip(pairs["model"], pairs["seed"]))
    extra = sorted(pair for pair in diverged if pair not in known)
    if extra:
        pairs = pd.concat([pairs, pd.DataFrame(extra, columns=["model", "seed"])], ignore_index=True)
    seeds = [parse_run_label(label) for label in pairs["seed"]]
    flags = [(m, s) in diverged for m, s in zip(pairs["model"], pairs["seed"])]
    runs = pairs.assign(
        run_id=None,
        status="FINISHED",
        diverged=flags,
        weight_seed=[w for w, _ in seeds],
        data_seed=[d for _, d in seeds],
        budget=None,
    )
    return runs[RUN_COLUMNS].reset_index(drop=True)


def select_metrics(names: pd.Series, patterns: list[str]) -> np.ndarray:
    """Boolean mask of the metric names matched by any pattern (exact name, or prefix ending in '*')."""
    unique = [str(n) for n in pd.unique(names)]
    wanted = [n for n in unique if any(n.startswith(p[:-1]) if p.endswith("*") else n == p for p in patterns)]
    return names.isin(wanted).to_numpy()
