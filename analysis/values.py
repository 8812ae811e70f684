"""Values that cannot be measurements, set aside before any statistic sees them.

A metric value that is NaN or infinite, an accuracy outside [0, 1], or a loss or perplexity below 0
is a fault of whatever wrote it (a diverged run, a broken evaluation, a hand-edited table). One such
value would decide a mean or a standard deviation alone (an accuracy of 1e300 gave a mean of 3e299
and an infinite SD), so :func:`set_aside` drops them and says how many, of which metrics, in one note.
A run whose loss *ended* non-finite is also reported as diverged (:func:`analysis.tidy_table.non_finite_endings`).
:func:`final_per_run` is what a run's final value is, in the summary and the nondeterminism floor.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

# Metric names (their last part: arc_easy/acc, acc_norm@5shot, eval/piqa/acc) bounded to [0, 1].
_ACCURACY = re.compile(r"(^|/)(acc|acc_norm|accuracy|exact_match)(@[^/]*)?$")
# ... and bounded below by 0.
_NON_NEGATIVE = re.compile(r"(^|/)(loss|ppl|perplexity|word_perplexity|byte_perplexity)(@[^/]*)?$")


def bounds(metric: str) -> tuple[float, float]:
    """The range a value of ``metric`` can take (the whole line for metrics not known here)."""
    if _ACCURACY.search(metric):
        return 0.0, 1.0
    if _NON_NEGATIVE.search(metric):
        return 0.0, np.inf
    return -np.inf, np.inf


def set_aside(frame: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """``frame`` (a tidy table, ``metric`` categorical, ``value`` float) without its impossible values,
    and a note counting them (None when there were none)."""
    values = frame["value"].to_numpy()
    finite = np.isfinite(values)
    categories = [str(c) for c in frame["metric"].cat.categories]
    low, high = np.array([bounds(c) for c in categories], dtype="float64").reshape(-1, 2).T
    codes = frame["metric"].cat.codes.to_numpy()
    outside = finite & ((values < low[codes]) | (values > high[codes]))
    if finite.all() and not outside.any():
        return frame, None
    bad = ~finite | outside
    counts = pd.Series(np.asarray(categories, dtype=object)[codes[bad]]).value_counts()
    named = ", ".join(f"{name} ({n})" for name, n in counts.head(5).items()) + (", ..." if len(counts) > 5 else "")
    note = (
        f"Set aside {int(bad.sum())} value(s) that cannot be measurements ({int((~finite).sum())} NaN or "
        f"infinite, {int(outside.sum())} outside their metric's range such as an accuracy outside [0, 1]) of "
        f"{named}; they enter no statistic."
    )
    return frame[~bad], note


def final_per_run(rows: pd.DataFrame, final_fraction: float = 0.01) -> pd.DataFrame:
    """Per (model, seed): the mean over the last ``final_fraction`` of the run's steps (the single
    last value when a run has one row, as when read from MLflow's latest values)."""
    rows = rows.astype({"model": str, "seed": str})
    first = rows.groupby(["model", "seed"])["step"].transform("min")
    last = rows.groupby(["model", "seed"])["step"].transform("max")
    tail = rows[rows["step"] >= last - final_fraction * (last - first)]
    return tail.groupby(["model", "seed"])["value"].mean().reset_index()
