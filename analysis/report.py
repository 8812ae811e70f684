"""The whole analysis of a study into one folder: CSV tables, PNG plots and ``report.md``.

:func:`run_analysis` is what ``python -m analysis <source> --out DIR`` runs. Files written:

* ``stats.csv`` - cross-seed statistics per (model, step, metric) at the checkpoint steps
* ``spikes.csv`` - one row per loss / gradient-norm spike; ``spike_scores.csv`` - score per run
* ``outliers.csv`` - one row per outlier episode (rule, onset, depth, recovery)
* ``training_maps.csv`` - HMM state per (model, seed, step); ``training_map_departures.csv``,
  ``training_map_selection.csv`` (held-out log-likelihood, BIC and AIC per (model, n_states, restart))
* ``comparisons.csv`` (Multi-Bootstrap between neighbouring sizes), ``spread_tests.csv``
  (Brown-Forsythe), ``runs.csv``
* ``analysis_*.png`` and ``report.md``
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.errors import AnalysisError
from analysis.outliers import (
    DEFAULT_TASKS,
    STANDARDISED_METRIC,
    OutlierRule,
    accuracy_metric,
    find_outliers,
    rule_knobs,
    standardised_score,
    with_standardised_accuracy,
)
from analysis.spikes import find_spikes
from analysis.stats import checkpoint_steps, compare_models, cross_seed_stats, final_values, spread_test
from analysis.tidy_table import Study, run_blocks, sort_models
from analysis.training_maps import MapOptions, MapsJob, TrainingMaps, start_training_maps

log = logging.getLogger(__name__)


@dataclass
class AnalysisOptions:
    """Knobs of :func:`run_analysis` (defaults follow the PolyPythias and OLMo 2 papers)."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    outlier_metrics: list[str] | None = None  # None: the standardised accuracy and valid/loss (see outliers.py)
    outlier_rule: OutlierRule = field(default_factory=OutlierRule)
    mad_threshold: float | None = None  # the mad rule's threshold (None: its default, 3.5)
    rule_knobs: dict = field(default_factory=dict)  # other knobs per outlier rule name (analysis/rules/)
    spike_window_values: int = 1000
    spike_threshold_sd: float = 7.0
    map_features: list[str] | None = None  # default: every weights/* metric
    max_states: int = 8
    n_restarts: int = 5  # how many of the PolyPythias restart random states each number of HMM states gets
    map_states: int | None = None  # fix the number of HMM states (None: choose it by map_criterion)
    map_criterion: str = "bic"  # "bic", "aic" (lowest on the held-out rows) or "ll" (highest held-out log-likelihood)
    map_heldout_fraction: float = 0.2  # share of checkpoint rows held out (PolyPythias: 0.2, split seed 2546)
    map_split_seed: int = 2546
    map_steps: list[int] | None = None  # checkpoints decoded and drawn (None: all)
    map_jobs: int | None = None  # worker processes for the HMM fits (None: every core for a large study)
    n_resamples: int = 2000
    random_state: int = 0
    make_plots: bool = True

    def knobs(self) -> dict:
        """The knobs of each outlier rule (:func:`analysis.outliers.rule_knobs`)."""
        return rule_knobs(self.outlier_rule, self.mad_threshold, self.rule_knobs)


@dataclass
class AnalysisResult:
    """Everything :func:`run_analysis` computed, plus where it wrote it."""

    out_dir: Path
    stats: pd.DataFrame
    spike_scores: pd.DataFrame
    spikes: pd.DataFrame
    outliers: pd.DataFrame
    maps: TrainingMaps | None
    comparisons: pd.DataFrame
    spread_tests: pd.DataFrame
    figures: list[Path] = field(default_factory=list)
    seconds_by_stage: dict[str, float] = field(default_factory=dict)
    cpu_seconds_by_stage: dict[str, float] = field(default_factory=dict)  # this process only (not the map workers)


def key_metrics(metrics: pd.DataFrame, tasks) -> list[str]:
    """Metrics worth a comparison, a spread test and a plot: losses, task accuracies, the standardised score."""
    present = set(map(str, metrics["metric"].unique()))
    names = ["train/loss", "valid/loss", *(accuracy_metric(t, present) for t in tasks), STANDARDISED_METRIC]
    return [n for n in names if n in present]


def size_comparisons(
    metrics: pd.DataFrame, names: list[str], options: AnalysisOptions, finals: dict[str, pd.DataFrame] | None = None
) -> pd.DataFrame:
    """Multi-Bootstrap (seeds resampled) of each key metric's final value between neighbouring sizes.
    ``finals``: each metric's :func:`final_values`, when the caller already has them."""
    models, rows = sort_models(metrics["model"].unique()), []
    finals = finals or {}
    for name in (n for n in names if n != STANDARDISED_METRIC):  # the score is z-scored per size
        values = finals.get(name)
        for model_a, model_b in zip(models, models[1:]):
            try:
                result = compare_models(
                    metrics,
                    name,
                    model_a,
                    model_b,
                    n_resamples=options.n_resamples,
                    random_state=options.random_state,
                    values=values,
                )
            except AnalysisError:
                continue
            rows.append({"metric": name, "model_a": model_a, "model_b": model_b, **result.as_dict()})
    return pd.DataFrame(rows)


def timed(seconds: dict, stage: str, cpu_seconds: dict | None = None):
    """Context manager that adds the wall time of a block to ``seconds[stage]`` (and this process's CPU
    time to ``cpu_seconds[stage]``)."""

    class Timer:
        def __enter__(self):
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def __exit__(self, *exc):
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - self.start
            if cpu_seconds is not None:
                cpu_seconds[stage] = cpu_seconds.get(stage, 0.0) + time.process_time() - self.cpu

    return Timer()


def map_options(options: AnalysisOptions) -> MapOptions:
    """The training maps' knobs among the analysis options."""
    return MapOptions(
        features=options.map_features,
        max_states=options.max_states,
        restarts=options.n_restarts,
        states=options.map_states,
        criterion=options.map_criterion,
        heldout_fraction=options.map_heldout_fraction,
        split_seed=options.map_split_seed,
        steps=options.map_steps,
        n_jobs=options.map_jobs,
    )


@dataclass
class MapsStart:
    """The training maps once started (:func:`start_maps`): the running job or the error that stopped it."""

    job: MapsJob | None
    error: AnalysisError | None
    started: float  # perf_counter at the start
    cpu_seconds: float  # this process's CPU time spent starting them


def start_maps(metrics: pd.DataFrame, options: AnalysisOptions) -> MapsStart:
    """Start the HMM fits (in worker processes for a large study, see :func:`analysis.map_fit.fit_all`)."""
    started, cpu = time.perf_counter(), time.process_time()
    job, error = None, None
    try:
        job = start_training_maps(metrics, map_options(options))
    except AnalysisError as failure:
        error = failure
    return MapsStart(job, error, started, time.process_time() - cpu)


def finish_maps(start: MapsStart, study: Study, options: AnalysisOptions, seconds: dict, cpu_seconds: dict | None):
    """Wait for the maps (None when they were skipped, with a note; an error when they were asked for)."""
    maps, waited_cpu = None, time.process_time()
    try:
        if start.error is not None:
            raise start.error
        maps = start.job.result()
        study.notes.extend(maps.notes)
    except AnalysisError as error:
        if options.map_features or options.map_states is not None:  # asked for: an error, not a skipped note
            raise
        study.notes.append(f"Training maps skipped: {error}")
    seconds["training_maps"] = time.perf_counter() - start.started
    if cpu_seconds is not None:  # this process's part: preparing, selecting, decoding (the fits run in workers)
        cpu_seconds["training_maps"] = start.cpu_seconds + time.process_time() - waited_cpu
    return maps


def study_tables(study: Study, metrics: pd.DataFrame, options: AnalysisOptions, score, timer) -> dict:
    """The statistics, spikes and outliers of the study (``timer(stage)``: a :func:`timed` block)."""
    names = key_metrics(metrics, options.tasks)
    with timer("stats"):
        blocks = run_blocks(metrics)  # each run's rows as slices (None unless laid out as tidy() leaves them)
        steps = checkpoint_steps(metrics)
        stats = cross_seed_stats(
            metrics, steps=steps, n_resamples=options.n_resamples, random_state=options.random_state
        )
        finals = {name: final_values(metrics, name, blocks=blocks) for name in names}  # once per metric
        comparisons = size_comparisons(metrics, names, options, finals)
        spread = pd.DataFrame([spread_test(metrics, n, values=finals[n]) for n in names])
    with timer("spikes"):
        spike_scores, spikes = find_spikes(
            metrics, window_values=options.spike_window_values, threshold_sd=options.spike_threshold_sd, blocks=blocks
        )
    with timer("outliers"):
        outliers = find_outliers(
            study.metrics, options.tasks, options.outlier_metrics, score=score, blocks=blocks, knobs=options.knobs()
        )  # study.metrics: a prefix
    return {
        "metrics": metrics,
        "names": names,
        "stats": stats,
        "comparisons": comparisons,
        "spread": spread,
        "spike_scores": spike_scores,
        "spikes": spikes,
        "outliers": outliers,
        "maps": None,
        "blocks": blocks,
    }


def compute(
    study: Study, options: AnalysisOptions, seconds: dict, cpu_seconds: dict | None = None, while_maps_fit=None
) -> dict:
    """All tables of the analysis (no files written).

    The training maps' HMM fits start first and run in worker processes (for a large study, see
    :func:`analysis.map_fit.fit_all`) while this process computes the statistics, spikes and
    outliers, and then calls ``while_maps_fit(tables)`` (when given) with every table but the maps;
    ``seconds["training_maps"]`` is the wall time from their start until the maps are ready, so it
    overlaps the other stages."""
    score = standardised_score(study.metrics, options.tasks)
    metrics = with_standardised_accuracy(study.metrics, score)
    maps = start_maps(metrics, options)
    tables = study_tables(study, metrics, options, score, lambda stage: timed(seconds, stage, cpu_seconds))
    if while_maps_fit is not None:
        while_maps_fit(tables)
    tables["maps"] = finish_maps(maps, study, options, seconds, cpu_seconds)
    return tables


def write_tables(tables: dict, runs: pd.DataFrame, out_dir: Path) -> None:
    """The CSV files of the analysis."""
    tables["stats"].to_csv(out_dir / "stats.csv", index=False)
    tables["spikes"].to_csv(out_dir / "spikes.csv", index=False)
    tables["spike_scores"].to_csv(out_dir / "spike_scores.csv", index=False)
    tables["outliers"].to_csv(out_dir / "outliers.csv", index=False)
    tables["comparisons"].to_csv(out_dir / "comparisons.csv", index=False)
    tables["spread"].to_csv(out_dir / "spread_tests.csv", index=False)
    runs.to_csv(out_dir / "runs.csv", index=False)
    maps = tables["maps"]
    paths = maps.paths if maps else pd.DataFrame(columns=["model", "seed", "step", "state"])
    paths.to_csv(out_dir / "training_maps.csv", index=False)
    if maps:
        maps.departures.to_csv(out_dir / "training_map_departures.csv", index=False)
        maps.selection.to_csv(out_dir / "training_map_selection.csv", index=False)


def run_analysis(
    study: Study, out_dir: str | Path, options: AnalysisOptions | None = None, log_to_mlflow: bool = True
) -> AnalysisResult:
    """Analyse a study into ``out_dir`` (created); when it came from MLflow, also log the folder as artifacts."""
    from analysis.markdown import write_report
    from analysis.report_figures import curve_figures, map_figures

    options = options or AnalysisOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    figures: list[Path] = []

    def draw_curves(tables: dict) -> None:  # while the HMM fits run in worker processes
        with timed(seconds, "plots", cpu_seconds):
            figures.extend(curve_figures(tables, study.runs, out_dir))

    tables = compute(study, options, seconds, cpu_seconds, while_maps_fit=draw_curves if options.make_plots else None)
    write_tables(tables, study.runs, out_dir)
    if study.floor is not None and len(study.floor):  # replicates: analysis.replicates
        study.floor.to_csv(out_dir / "nondeterminism_floor.csv", index=False)
    if options.make_plots:
        with timed(seconds, "plots", cpu_seconds):
            figures.extend(map_figures(tables, study.runs, out_dir))
    result = AnalysisResult(
        out_dir,
        tables["stats"],
        tables["spike_scores"],
        tables["spikes"],
        tables["outliers"],
        tables["maps"],
        tables["comparisons"],
        tables["spread"],
        figures,
        seconds,
        cpu_seconds,
    )
    write_report(study, tables, result, options, out_dir / "report.md")
    if log_to_mlflow and study.kind == "mlflow":
        with timed(seconds, "mlflow_artifacts"):
            log_artifacts(study, out_dir)
    return result


def log_artifacts(study: Study, out_dir: Path) -> str:
    """Log ``out_dir`` under ``analysis/`` of the sweep's parent run, or of a new ``polypythia.kind=analysis`` run."""
    from analysis.mlflow_load import mlflow_client

    client, _ = mlflow_client(study.tracking_uri)
    run_id = study.parent_run_id
    if not run_id:
        run = client.create_run(study.experiment_id, run_name="analysis", tags={"polypythia.kind": "analysis"})
        run_id = run.info.run_id
        client.log_artifacts(run_id, str(out_dir), artifact_path="analysis")
        client.set_terminated(run_id)
    else:
        client.log_artifacts(run_id, str(out_dir), artifact_path="analysis")
    study.notes.append(f"Logged to MLflow run {run_id} under artifacts/analysis.")
    return run_id
