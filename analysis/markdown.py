"""``report.md``: the analysis tables in markdown, with links to the plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.outliers import STANDARDISED_METRIC
from analysis.rules import knobs_of, registered
from analysis.tidy_table import sort_models
from polypythia.study import label_order, seed_design

MAX_TABLE_ROWS = 40


def markdown_table(frame: pd.DataFrame, max_rows: int = MAX_TABLE_ROWS, digits: int = 4) -> str:
    """A GitHub markdown table (no extra dependency); long tables are cut with a note."""
    if frame.empty:
        return "_none_\n"
    shown = frame.head(max_rows)

    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            return "" if np.isnan(value) else f"{value:.{digits}g}"
        return "" if value is None or value is pd.NA else str(value)

    lines = ["| " + " | ".join(map(str, shown.columns)) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    if len(frame) > max_rows:
        lines.append(f"\n_{len(frame) - max_rows} more rows in the CSV file._")
    return "\n".join(lines) + "\n"


def final_step_stats(stats: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The cross-seed statistics of the key metrics at each model's last step."""
    rows = stats[stats["metric"].isin(names)]
    last = rows.groupby(["model", "metric"])["step"].transform("max")
    columns = ["model", "metric", "step", "n", "mean", "std", "cv", "median", "iqr", "min", "max", "ci_low", "ci_high"]
    return by_model_order(rows[rows["step"] == last][columns]).sort_values("metric", kind="stable")


def by_model_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by model size (a stable sort: the order within a model is kept)."""
    order = {m: i for i, m in enumerate(sort_models(frame["model"].astype(str).unique()))}
    return frame.sort_values("model", key=lambda s: s.astype(str).map(order), kind="stable")


def runs_section(study, runs: pd.DataFrame) -> list[str]:
    """Runs per model, which seed the study varied, and the runs that did not finish cleanly."""
    rows = []
    for model, group in by_model_order(runs).groupby("model", sort=False):
        rows.append(
            {
                "model": model,
                "runs": len(group),
                "seeds": ", ".join(sorted(map(str, group["seed"]), key=label_order)),
                "varied": seed_design(group["weight_seed"], group["data_seed"]),
            }
        )
    counts = pd.DataFrame(rows, columns=["model", "runs", "seeds", "varied"])
    bad = runs[runs["diverged"].astype(bool) | (runs["status"].astype(str) != "FINISHED")]
    lines = ["## Runs\n", f"Source: `{study.source}` ({study.kind}).\n", markdown_table(counts)]
    if not bad.empty:
        lines += [
            "Runs tagged diverged or not FINISHED (still analysed):\n",
            markdown_table(bad[["model", "seed", "run_id", "status", "diverged"]]),
        ]
    return lines


def outliers_section(outliers: pd.DataFrame, knobs: dict) -> list[str]:
    """How each registered outlier rule decides (:mod:`analysis.rules`), then the outlier rows."""
    judged = ", ".join(f"`{m}`" for m in sorted(set(outliers["metric"]))) or "none flagged"
    described = " ".join(rule.describe(knobs_of(rule, knobs)) for rule in registered())
    return ["## Outlier runs\n", f"{described} Metrics with outliers: {judged}.\n", markdown_table(outliers)]


def maps_section(maps) -> list[str]:
    if maps is None:
        return ["## Training maps\n", "_Not computed (no weight statistics in the study)._\n"]
    chosen = maps.chosen()
    how = {"bic": "the lowest BIC", "aic": "the lowest AIC", "ll": "the highest log-likelihood"}
    if maps.criterion == "fixed":
        choice = "The number of states was fixed (`--states`)"
    else:
        choice = (
            f"The number of states is the one with {how[maps.criterion]} on the held-out rows "
            f"(`--map-criterion {maps.criterion}`)"
        )
    per_model = "; ".join(f"{row.model}: {row.n_states} states" for row in chosen.itertuples())
    settings = maps.settings
    tried = settings.get("states") or f"1..{settings.get('max_states')}"
    restarts = len(settings.get("restarts", []))
    best = maps.best_per_n()[["model", "n_states", "heldout_log_likelihood", "bic", "aic", "converged", "chosen"]]
    lines = [
        "## Training maps\n",
        f"Gaussian HMM (diagonal covariance) on {len(maps.features)} features, fitted as the PolyPythias release "
        f"does: {settings.get('heldout_fraction', 0.2):g} of the checkpoint rows held out (split seed "
        f"{settings.get('split_seed', 2546)}), each seed z-scored within each split, {tried} states with "
        f"{restarts} restarts each, the restart with the best held-out "
        f"log-likelihood kept per number of states. {choice}: {per_model}. States are numbered by when in "
        "training they are visited. Every restart: `training_map_selection.csv`; paths: `training_maps.csv`.\n",
        "Kept restart per number of states (held-out rows):\n",
        markdown_table(best),
        "Seeds whose order of states departs from the majority path:\n",
        markdown_table(maps.departures),
    ]
    for model in chosen["model"]:
        lines.append(f"![training map {model}](analysis_training_map_{model}.png)\n")
        lines.append(f"![training map model selection {model}](analysis_map_selection_{model}.png)\n")
    return lines


def write_report(study, tables: dict, result, options, path: Path) -> Path:
    """Write ``report.md`` tying the tables and figures together."""
    names = tables["names"]
    lines = ["# Cross-seed analysis\n"]
    lines += runs_section(study, study.runs)
    lines += [
        "## Cross-seed statistics at the last step\n",
        "Spread across seeds (std with ddof=1; ci = 95% percentile bootstrap interval of the mean over seeds). "
        f"Every checkpoint step: `stats.csv`. `{STANDARDISED_METRIC}`: each task's accuracy z-scored over all "
        f"(seed, step) rows of a size, averaged over {', '.join(options.tasks)} (those present).\n",
        markdown_table(final_step_stats(tables["stats"], names)),
    ]
    if (Path(path).parent / "analysis_metrics.png").exists():
        lines.append("![metrics over steps](analysis_metrics.png)\n")
    lines += [
        "## Size comparisons (Multi-Bootstrap over seeds) and spread tests\n",
        "Difference = model_b - model_a of each run's final value; p_value is one-sided for model_b > model_a.\n",
        markdown_table(tables["comparisons"]),
        "Brown-Forsythe test (Levene, median-centred) of whether the cross-seed spread differs between sizes:\n",
        markdown_table(tables["spread"]),
    ]
    spikes = tables["spike_scores"]
    lines += [
        "## Loss spikes\n",
        f"A spike value lies at least {options.spike_threshold_sd:g} rolling SDs from the mean of the previous "
        f"{options.spike_window_values} values (OLMo 2). Runs with spikes:\n",
        markdown_table(spikes[spikes["n_spikes"] > 0]),
        "Spikes:\n",
        markdown_table(tables["spikes"]),
    ]
    if (Path(path).parent / "analysis_loss_curves.png").exists():
        lines.append("![loss curves](analysis_loss_curves.png)\n")
    lines += outliers_section(tables["outliers"], options.knobs())
    lines += maps_section(tables["maps"])
    if study.notes:
        lines += ["## Notes\n", *[f"- {note}" for note in study.notes], ""]
    timing = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.seconds_by_stage.items())
    lines.append(f"\n_Computed in {timing}._\n")
    Path(path).write_text("\n".join(lines))
    return Path(path)
