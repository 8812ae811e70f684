"""The registry of outlier rules: what calls a run an outlier, one rule per module of this package.

A rule (:class:`Rule`) has a ``name`` (the key of the registry and of its knobs) and declares

- ``knobs``: the dataclass of its settings, whose defaults are the rule's defaults (``knobs()``
  gives them);
- :meth:`~Rule.label`: the ``rule`` column of its rows under these knobs (``calibrated``, ``mad_3.5``);
- :meth:`~Rule.judge`: its outlier rows (columns ``OUTLIER_COLUMNS``, made by :func:`outlier_frame`)
  on a :class:`Judged` study;
- :meth:`~Rule.describe`: the paragraph of ``report.md`` that says how it decides;
- :meth:`~Rule.first_alerts`: each run's first alert when the study is replayed causally, step by step
  (``analysis/replay.py``), or None for a rule that cannot decide before the study ends.

:class:`BaseRule` gives the defaults (no knobs, no replay), so that a rule needs a name and a judge.
A rule's rows need ``model``, ``seed``, ``metric``, ``rule`` and ``onset_step``; :func:`outlier_frame`
fills the seeds and leaves the other columns empty.

:func:`analysis.outliers.find_outliers`, the report (``analysis/markdown.py``) and the replay iterate
:func:`registered` and know no rule by name. To add a rule, write one module here that builds a rule
and :func:`register`\\ s it (``docs/analysis.md``, "Adding an outlier rule"): every module of this
package whose name does not start with ``_`` is imported on the first call of :func:`registered`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import pandas as pd

from polypythia.study import label_order, parse_run_label

OUTLIER_COLUMNS = [
    "model",
    "seed",
    "weight_seed",
    "data_seed",
    "metric",
    "rule",
    "onset_step",
    "end_step",
    "n_checkpoints_out",
    "onset_deviation_sd",
    "max_deviation_sd",
    "band_deviation_sd",
    "threshold_sd",
    "recovered",
    "recovery_step",
]


@dataclass(frozen=True)
class Judged:
    """What a rule judges: the study's tidy rows (``model, seed, step, metric, value``), the trajectories
    chosen for trajectory rules (metric -> the tidy rows holding it; the standardised accuracy's own
    table), and :func:`analysis.tidy_table.run_blocks` of ``metrics`` when the caller has them."""

    metrics: pd.DataFrame
    trajectories: Mapping[str, pd.DataFrame]
    blocks: pd.DataFrame | None = None

    def present(self) -> set[str]:
        """The metric names of the study's rows."""
        return set(map(str, self.metrics["metric"].unique()))


class Rule(Protocol):
    """One way of calling a run an outlier (see the module docstring)."""

    name: str
    knobs: type

    def label(self, knobs: Any) -> str: ...

    def judge(self, study: Judged, knobs: Any) -> pd.DataFrame: ...

    def describe(self, knobs: Any) -> str: ...

    def first_alerts(self, table: pd.DataFrame, signal: str, knobs: Any) -> list[dict] | None: ...


@dataclass(frozen=True)
class NoKnobs:
    """The knobs of a rule that has none."""


class BaseRule:
    """Defaults for a rule: no knobs, its name as its label, its docstring's first line as its
    description, and no causal replay; a subclass sets ``name`` and writes :meth:`judge`."""

    name: str
    knobs: type = NoKnobs

    def label(self, knobs: Any) -> str:
        return self.name

    def judge(self, study: Judged, knobs: Any) -> pd.DataFrame:
        raise NotImplementedError(f"The outlier rule {self.name!r} has no judge(); write one.")

    def describe(self, knobs: Any) -> str:
        first = (type(self).__doc__ or "").strip().splitlines()
        return f"`{self.label(knobs)}`: {first[0] if first else 'no description.'}"

    def first_alerts(self, table: pd.DataFrame, signal: str, knobs: Any) -> list[dict] | None:
        return None


REGISTRY: dict[str, Rule] = {}
_discovered = False


def register(rule: Rule) -> Rule:
    """Add ``rule`` to the registry (its name must be new); returns it."""
    if rule.name in REGISTRY:
        raise ValueError(f"An outlier rule named '{rule.name}' is registered already; give the new one another name.")
    REGISTRY[rule.name] = rule
    return rule


def unregister(name: str) -> None:
    """Remove a rule (a test's toy rule, for example)."""
    REGISTRY.pop(name, None)


def registered() -> list[Rule]:
    """Every rule, those of this package's modules first, in the order of their module names."""
    global _discovered
    if not _discovered:
        for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True
    return list(REGISTRY.values())


def knobs_of(rule: Rule, knobs: Mapping[str, Any] | None) -> Any:
    """The rule's knobs in ``knobs`` (by its name), or its defaults."""
    given = (knobs or {}).get(rule.name)
    return rule.knobs() if given is None else given


def outlier_frame(rows: list[dict]) -> pd.DataFrame:
    """Outlier rows with the seeds of each run label filled in, in the column order of OUTLIER_COLUMNS."""
    for row in rows:
        seeds = parse_run_label(row["seed"])
        row["weight_seed"], row["data_seed"] = seeds if seeds else (None, None)
    frame = pd.DataFrame(rows, columns=OUTLIER_COLUMNS)
    return frame.astype({"recovery_step": "Int64", "weight_seed": "Int64", "data_seed": "Int64", "seed": str})


def concat_outliers(frames) -> pd.DataFrame:
    """The outlier rows of several judgements in one table; :func:`outlier_frame`'s empty table if none has any."""
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else outlier_frame([])


def wide_by_seed(metrics: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    """Per model, a (step x run) table of one metric, runs in seed order."""
    rows = metrics[metrics["metric"] == metric]
    tables = {}
    for model, group in rows.groupby("model", observed=True):
        table = group.pivot_table(index="step", columns="seed", values="value", aggfunc="last", observed=True)
        tables[str(model)] = table[sorted(table.columns, key=label_order)]
    return tables
