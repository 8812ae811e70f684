"""The figures of ``report.md`` (drawn by :mod:`analysis.plots`): loss curves and key metrics, which
need no training maps and are drawn while the maps' fits run, and the training maps themselves. Runs
flagged by any outlier rule, or tagged diverged or failed, are marked."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.outliers import STANDARDISED_METRIC
from analysis.tidy_table import sort_models


def outlier_seeds(outliers: pd.DataFrame, runs: pd.DataFrame) -> dict[str, set[str]]:
    """Per model, the run labels flagged by any outlier rule or tagged diverged / not FINISHED."""
    seeds: dict[str, set[str]] = {}
    for row in outliers.itertuples():
        seeds.setdefault(str(row.model), set()).add(str(row.seed))
    bad = runs[(runs["diverged"].astype(bool)) | (runs["status"].astype(str) == "FAILED")]
    for row in bad.itertuples():
        seeds.setdefault(str(row.model), set()).add(str(row.seed))
    return seeds


def curve_figures(tables: dict, runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The PNGs of the report that do not need the training maps: loss curves and key metrics."""
    from analysis import plots  # matplotlib is imported only when figures are drawn

    metrics, flagged = tables["metrics"], outlier_seeds(tables["outliers"], runs)
    blocks = tables.get("blocks")  # each run's rows as slices, when the table is laid out for it
    figures = [
        plots.plot_loss_curves(metrics, flagged, out_dir / "analysis_loss_curves.png", blocks=blocks),
        plots.plot_metrics(
            metrics, [n for n in tables["names"] if n != "train/loss"], out_dir / "analysis_metrics.png", blocks=blocks
        ),
    ]
    return [f for f in figures if f is not None]


def map_figures(tables: dict, runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The PNGs of the training maps (none without maps)."""
    from analysis import plots

    metrics, flagged, figures = tables["metrics"], outlier_seeds(tables["outliers"], runs), []
    maps = tables["maps"]
    if maps is not None:
        names = set(map(str, metrics["metric"].unique()))
        score_name = next(
            (n for n in (STANDARDISED_METRIC, "valid/loss", "train/loss") if n in names), maps.features[0]
        )
        score = metrics[metrics["metric"] == score_name]
        for model in sort_models(maps.paths["model"].unique()):
            departing = set(maps.departures.loc[maps.departures["model"] == model, "seed"])
            figures.append(
                plots.plot_training_map(
                    score,
                    maps.paths,
                    model,
                    flagged.get(model, set()) | departing,
                    out_dir / f"analysis_training_map_{model}.png",
                    score_name,
                )
            )
            figures.append(
                plots.plot_map_selection(maps.selection, model, out_dir / f"analysis_map_selection_{model}.png")
            )
    return [f for f in figures if f is not None]
