"""The paths of a training map (:mod:`analysis.training_maps`): states numbered by when in training
they are visited, the majority path across seeds, and how a seed's order of phases departs from it."""

from __future__ import annotations

import numpy as np
import pandas as pd


def order_states_by_time(states: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Renumber states 0..k-1 by the mean log-step of their visits (earliest phase first)."""
    labels = np.unique(states)
    mean_step = [np.mean(np.log1p(steps[states == label])) for label in labels]
    mapping = {old: new for new, old in enumerate(labels[np.argsort(mean_step, kind="stable")])}
    return np.array([mapping[s] for s in states], dtype="int64")


def collapse(path: np.ndarray, steps: np.ndarray) -> list[tuple[int, int]]:
    """Run-length form of a path: (state, first step) for each stretch of equal states."""
    starts = np.flatnonzero(np.r_[True, path[1:] != path[:-1]])
    return [(int(path[i]), int(steps[i])) for i in starts]


def departure(model: str, seed, path: np.ndarray, steps: np.ndarray, majority: list[tuple[int, int]]) -> dict | None:
    """How a seed's phase order differs from the majority's (None when it follows it)."""
    own = collapse(path, steps)
    own_states, majority_states = [s for s, _ in own], [s for s, _ in majority]
    if own_states == majority_states:
        return None
    first = next(
        (i for i, (a, b) in enumerate(zip(own_states, majority_states)) if a != b),
        min(len(own_states), len(majority_states)),
    )
    departure_step = own[first][1] if first < len(own) else int(steps[-1])
    fall_backs = [step for (previous, _), (state, step) in zip(own, own[1:]) if state < previous]
    counts = pd.Series(own_states).value_counts()
    return {
        "model": model,
        "seed": seed,
        "departure_step": int(departure_step),
        "fell_back": bool(fall_backs),
        "fall_back_step": fall_backs[0] if fall_backs else None,
        "skipped_states": " ".join(str(s) for s in sorted(set(majority_states) - set(own_states))),
        "revisited_states": " ".join(str(s) for s in sorted(counts[counts > 1].index)),
        "extra_states": " ".join(str(s) for s in sorted(set(own_states) - set(majority_states))),
        "path": "-".join(str(s) for s in own_states),
    }


def majority_path(paths: pd.DataFrame) -> pd.DataFrame:
    """The most common state at each step across seeds (ties: the lower state)."""
    counts = paths.groupby(["step", "state"]).size().rename("count").reset_index()
    counts = counts.sort_values(["step", "count", "state"], ascending=[True, False, True])
    return counts.drop_duplicates("step")[["step", "state"]].reset_index(drop=True)
