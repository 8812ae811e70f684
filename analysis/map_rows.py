"""The rows a training map is fitted on (:mod:`analysis.training_maps`): one row per (seed, checkpoint),
one column per feature, split into training and held-out rows and z-scored within each split, as the
PolyPythias release does (EleutherAI/pythia, branch ``polypythias``, ``training-maps/training_map.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from polypythia.study import label_order

# The held-out split of the released code.
POLYPYTHIAS_SPLIT_SEED = 2546
HELDOUT_FRACTION = 0.2


def wide_features(metrics: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """Rows (seed, step) in (seed, step) order, one column per feature; checkpoints missing one are dropped."""
    rows = metrics[metrics["metric"].isin(features)]
    wide = rows.pivot_table(
        index=["seed", "step"], columns="metric", values="value", aggfunc="last", observed=True
    ).dropna()
    wide.columns = wide.columns.astype(str)
    return sort_rows(wide[[f for f in features if f in wide.columns]])


def sort_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by seed (run-label order: 0, 1, 2, ..., 10) and step."""
    seeds = frame.index.get_level_values("seed")
    order = {s: i for i, s in enumerate(sorted(pd.unique(seeds), key=label_order))}
    keys = np.lexsort((frame.index.get_level_values("step").to_numpy(), np.array([order[s] for s in seeds])))
    return frame.iloc[keys]


def zscore(frame: pd.DataFrame, standardise: str = "run") -> pd.DataFrame:
    """Features z-scored per seed (``"run"``, the study's choice) or over all rows (``"model"``), ddof=0
    like ``scipy.stats.zscore``; a constant feature becomes 0."""
    if frame.empty:
        return frame
    if standardise == "model":
        return (frame - frame.mean()) / frame.std(ddof=0).replace(0, 1).fillna(1)
    grouped = frame.groupby(level="seed", sort=False, observed=True)
    scale = grouped.transform(lambda c: c.std(ddof=0)).replace(0, 1).fillna(1)
    return (frame - grouped.transform("mean")) / scale


def feature_matrix(metrics: pd.DataFrame, features: list[str], standardise: str = "run") -> pd.DataFrame:
    """Rows (seed, step), one column per feature, z-scored per seed (``"run"``) or over all seeds of a
    size (``"model"``); checkpoints missing a feature are dropped."""
    return zscore(wide_features(metrics, features), standardise)


def split_rows(
    n_rows: int, heldout_fraction: float = HELDOUT_FRACTION, split_seed: int = POLYPYTHIAS_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the training and held-out rows, as ``train_test_split(rows, test_size=heldout_fraction,
    random_state=split_seed)`` splits ``n_rows`` rows."""
    from sklearn.model_selection import train_test_split

    try:
        train, heldout = train_test_split(np.arange(n_rows), test_size=heldout_fraction, random_state=split_seed)
    except ValueError as error:
        raise AnalysisError(
            f"Cannot hold out {heldout_fraction:g} of {n_rows} checkpoint rows ({error}); give "
            "more checkpoints or another --map-heldout-fraction."
        ) from None
    return np.sort(train), np.sort(heldout)


@dataclass
class Split:
    """One split's rows as hmmlearn takes them: the z-scored matrix and one length per seed."""

    X: np.ndarray
    lengths: list[int]
    index: pd.MultiIndex

    @classmethod
    def of(cls, raw: pd.DataFrame, standardise: str) -> Split:
        """Rows sorted by (seed, step), z-scored within this split; seeds without rows are left out."""
        frame = zscore(sort_rows(raw), standardise)
        seeds = frame.index.get_level_values("seed")
        lengths = [int(n) for n in pd.Series(seeds).value_counts(sort=False).reindex(pd.unique(seeds))]
        return cls(frame.to_numpy(dtype="float64"), lengths, frame.index)
