"""One training config per model: the runs a study compares must differ in their seeds alone.

A seed's spread means nothing when the runs beside it trained for another number of steps, with
another learning rate or batch: a study that mixed 6-, 400- and 1,000-step runs was summarised as
one row. Each job run's MLflow params are the config it was launched with; the keys that decide
what a run trains are those :func:`polypythia.runfolder.training_config` keeps (a relaunch of one
run is held to the same keys). Where the runs of one model disagree on any of them, the analysis
*refuses* and names the keys and the runs on each side, rather than splitting the study into one
group per config: every table, plot and statistic is keyed by (model, seed), and a group per config
would be a hidden second dimension in all of them. The researcher picks the runs to compare
(``--parent-run`` for one sweep, or one study per config).
"""

from __future__ import annotations

from collections import defaultdict

from analysis.errors import AnalysisError
from polypythia.runfolder import training_config
from polypythia.study import label_order

SHOWN_KEYS = 4  # keys named in the error; the rest are counted


def differing_keys(configs: dict[str, dict]) -> dict[str, dict[str, list[str]]]:
    """``{key: {value: [run labels]}}`` for each training key that all runs have and on which they differ."""
    if len(configs) < 2:
        return {}
    common = set.intersection(*(set(c) for c in configs.values()))
    found = {}
    for key in sorted(common):
        by_value: dict[str, list[str]] = defaultdict(list)
        for label, config in configs.items():
            by_value[str(config[key])].append(label)
        if len(by_value) > 1:
            found[key] = {value: sorted(labels, key=label_order) for value, labels in by_value.items()}
    return found


def describe(key: str, by_value: dict[str, list[str]]) -> str:
    """``budget.steps 6 (runs 1, 2) / 400 (run 3)``."""
    parts = []
    for value, labels in sorted(by_value.items(), key=lambda item: (-len(item[1]), label_order(item[1][0]))):
        shown = ", ".join(labels[:4]) + (", ..." if len(labels) > 4 else "")
        parts.append(f"{value} ({'runs' if len(labels) > 1 else 'run'} {shown})")
    return f"{key} " + " / ".join(parts)


def check_one_training_config(runs: list, table) -> None:
    """:class:`AnalysisError` naming the keys when the job runs of one model (``runs``: MLflow runs;
    ``table``: their runs table, for the labels) were trained with different configs."""
    labels = dict(zip(table["run_id"], zip(table["model"].astype(str), table["seed"].astype(str))))
    by_model: dict[str, dict[str, dict]] = defaultdict(dict)
    for run in runs:
        if run.info.run_id in labels and run.data.params:
            model, label = labels[run.info.run_id]
            by_model[model][label] = training_config(dict(run.data.params))
    for model, configs in sorted(by_model.items()):
        keys = differing_keys(configs)
        if keys:
            shown = "; ".join(describe(k, v) for k, v in list(keys.items())[:SHOWN_KEYS])
            more = f"; and {len(keys) - SHOWN_KEYS} more key(s)" if len(keys) > SHOWN_KEYS else ""
            raise AnalysisError(
                f"The runs of model {model} were trained with different configs ({shown}{more}), so "
                "their spread is not a seed spread; analyse one sweep with --parent-run, or launch "
                "each config into its own study."
            )
