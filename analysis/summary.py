"""The end-of-sweep summary: final training loss per seed and its spread, per model.

Printed at the end of every training sweep and by ``python -m analysis <experiment>`` (no
``--out``). Reading MLflow is kept to one search: the final loss of a run is its latest
``train/loss`` value (``run.data.metrics``), so no metric histories are fetched.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.configs import check_one_training_config
from analysis.errors import AnalysisError
from analysis.mlflow_load import find_experiment, mlflow_client, runs_table
from analysis.outliers import MIN_SEEDS_FOR_MAD, mad_flags
from analysis.tidy_table import sort_models
from analysis.values import final_per_run
from polypythia.study import label_order, parse_run_label, search_job_runs

SUMMARY_COLUMNS = [
    "model",
    "n_seeds",
    "final_loss_by_seed",
    "mean",
    "std",
    "min",
    "max",
    "flagged_seeds",
    "diverged_or_failed_seeds",
]


def final_loss_summary(
    df: pd.DataFrame,
    runs: pd.DataFrame | None = None,
    metric: str = "train/loss",
    mad_threshold: float = 3.5,
    min_relative_deviation: float = 0.01,
) -> pd.DataFrame:
    """Per model: each run's final ``metric`` (runs keyed by their label, so seed variants stay apart)
    (mean over the last 1% of its steps, see :func:`analysis.values.final_per_run`); mean/std (ddof=1)/min/max across
    the runs that trained to their end, and the seeds a median/MAD rule flags among them; and the
    runs that ended early: tagged diverged, or not FINISHED in ``runs`` (failed, or stopped by the
    cross-seed monitor). A run that ended early shows its last value in ``final_loss_by_seed`` but is
    left out of the spread and the flags: its last loss is from an earlier step than the others'
    final loss (or is the last finite value before a divergence), not a final value to compare."""
    rows = df[df["metric"] == metric]
    if rows.empty:
        raise AnalysisError(f"The study has no {metric!r} values to summarise; check that the runs logged it.")
    finals = final_per_run(rows)
    bad = {}
    if runs is not None and not runs.empty:
        flagged_runs = runs[runs["diverged"].astype(bool) | (runs["status"].astype(str) != "FINISHED")]
        for row in flagged_runs.itertuples():
            bad.setdefault(str(row.model), []).append(str(row.seed))
    summary = []
    for model in sort_models(finals["model"].unique()):
        shown = finals[finals["model"] == model].set_index("seed")["value"]
        shown = shown.iloc[sorted(range(len(shown)), key=lambda i: label_order(shown.index[i]))]
        ended_early = sorted(bad.get(model, []), key=label_order)
        values = shown[~shown.index.isin(ended_early)]
        summary.append(
            {
                "model": model,
                "n_seeds": len(shown),
                "final_loss_by_seed": shown.to_dict(),
                "mean": values.mean() if len(values) else np.nan,
                "std": values.std(ddof=1) if len(values) > 1 else np.nan,
                "min": values.min() if len(values) else np.nan,
                "max": values.max() if len(values) else np.nan,
                "flagged_seeds": mad_flags(values, mad_threshold, min_relative_deviation),
                "diverged_or_failed_seeds": ended_early,
            }
        )
    return pd.DataFrame(summary, columns=SUMMARY_COLUMNS)


def final_losses_from_mlflow(
    tracking_uri: str | None, experiment: str, parent_run_id: str | None, metric: str = "train/loss"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tidy final values of ``metric`` (one row per run, from the run's latest value) and the runs table."""
    client, _ = mlflow_client(tracking_uri)
    runs = search_job_runs(client, find_experiment(client, experiment).experiment_id, parent_run_id)
    table = runs_table(runs)
    if table.empty:
        raise AnalysisError(
            f"No runs tagged polypythia.kind=job were found in experiment {experiment!r}"
            f"{' under parent run ' + parent_run_id if parent_run_id else ''}; check the names."
        )
    check_one_training_config(runs, table)  # seeds of one model differ in their seeds alone (analysis.configs)
    by_id = {run.info.run_id: run for run in runs}
    rows = [
        (row.model, row.seed, 0, metric, by_id[row.run_id].data.metrics[metric])
        for row in table.itertuples()
        if metric in by_id[row.run_id].data.metrics
    ]
    return pd.DataFrame(rows, columns=["model", "seed", "step", "metric", "value"]), table


def summary_table(summary: pd.DataFrame, title: str):
    """A rich Table: one row per model, one column per seed, then the spread across seeds."""
    from rich.table import Table

    seeds = sorted({seed for losses in summary["final_loss_by_seed"] for seed in losses}, key=label_order)
    caption = (
        (
            "mean, std, min, max and the flags are over the runs that trained to their end; a run that ended early "
            "shows its last value"
        )
        if any(len(r) for r in summary["diverged_or_failed_seeds"])
        else None
    )
    table = Table(title=title, caption=caption, show_lines=False)
    table.add_column("model", style="bold")
    for seed in seeds:
        table.add_column(f"seed {seed}" if parse_run_label(seed) and "-" not in seed else seed, justify="right")
    for name in ("mean", "std", "min", "max"):
        table.add_column(name, justify="right")
    table.add_column(f"flagged (MAD, >={MIN_SEEDS_FOR_MAD} seeds)", style="red")
    table.add_column("ended early (diverged, failed, stopped)", style="red")
    for row in summary.itertuples():
        losses = [f"{row.final_loss_by_seed[s]:.4f}" if s in row.final_loss_by_seed else "-" for s in seeds]
        spread = [f"{v:.4f}" if np.isfinite(v) else "-" for v in (row.mean, row.std, row.min, row.max)]
        table.add_row(
            row.model,
            *losses,
            *spread,
            " ".join(map(str, row.flagged_seeds)) or "-",
            " ".join(map(str, row.diverged_or_failed_seeds)) or "-",
        )
    return table


def print_summary(
    tracking_uri: str | None, experiment: str, parent_run_id: str | None = None, console=None
) -> pd.DataFrame:
    """Read the sweep's runs from MLflow and print the final-loss summary table; returns the summary."""
    from rich.console import Console

    from analysis.replicates import floor_lines, floor_table, set_aside, without_runs_of

    finals, runs = final_losses_from_mlflow(tracking_uri, experiment, parent_run_id)
    if finals.empty:
        raise AnalysisError(
            f"No run in experiment {experiment!r} has logged train/loss yet; "
            "wait for the runs to log a step or check the experiment name."
        )
    finals, replicates = set_aside(finals)  # the same seeds trained again: the nondeterminism floor, not seeds
    runs = without_runs_of(runs, replicates)
    summary = final_loss_summary(finals, runs)
    if console is None:  # a log file or pipe gets wide lines rather than truncated numbers
        import sys

        console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(summary_table(summary, f"Final train/loss of {experiment}"))
    missing = runs[~runs.set_index(["model", "seed"]).index.isin(finals.set_index(["model", "seed"]).index)]
    for row in missing.itertuples():
        console.print(
            f"[yellow]model {row.model} run {row.seed} (MLflow run {row.run_id}, {row.status}) logged no train/loss."
        )
    for line in floor_lines(floor_table(finals, replicates, curves=False)) if len(replicates) else []:
        console.print(line, highlight=False)
    return summary
