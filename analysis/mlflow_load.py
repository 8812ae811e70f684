"""Reading a study from MLflow (:func:`load_mlflow`): the job runs the training side logs under one
experiment (one child run per (model, seed) job, tagged ``polypythia.kind=job``; see
:func:`polypythia.study.search_job_runs`), one runs-table row per run and every logged step of its metrics."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.configs import check_one_training_config
from analysis.errors import AnalysisError
from analysis.tidy_table import RUN_COLUMNS, Study, diverged_notes, non_finite_endings, select_metrics, tidy
from polypythia.study import replicate_from_tags, run_label, search_job_runs, seeds_from_tags

log = logging.getLogger(__name__)


def mlflow_client(tracking_uri: str | None):
    """An MlflowClient for ``tracking_uri`` (or env MLFLOW_TRACKING_URI); error if neither is set."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise AnalysisError(
            "No MLflow tracking URI is set; pass --tracking-uri or set MLFLOW_TRACKING_URI "
            "(or give a folder or .csv/.tsv file as the source)."
        )
    from polypythia.config.preflight import is_file_store
    from polypythia.tracking import client as tracking

    if is_file_store(uri):  # MLflow 3 refuses file stores with a traceback-length message; polypythia never writes one
        raise AnalysisError(
            f"The tracking URI {uri} is an MLflow file store, which polypythia never writes and MLflow "
            "no longer reads by default; give the study's server (http://host:port, as printed by "
            "python -m polypythia.tracking.client status) or its database (sqlite:///.../mlflow.db)."
        )
    try:
        tracking.require_reachable(uri, "start it or fix --tracking-uri / MLFLOW_TRACKING_URI")
    except tracking.TrackingError as error:
        raise AnalysisError(str(error)) from None
    return tracking.client(uri), uri


def find_experiment(client, name: str):
    """The MLflow experiment called ``name``; a clear error when there is none."""
    try:
        experiment = client.get_experiment_by_name(name)
    except Exception as error:  # noqa: BLE001 - connection refused, bad URI, ...
        raise AnalysisError(
            f"The MLflow tracking server could not be reached ({type(error).__name__}); "
            "check --tracking-uri and that the server is running."
        ) from None
    if experiment is None:
        no_path = "" if Path(name).exists() else " and no file or folder has that name"
        raise AnalysisError(
            f"No MLflow experiment is called {name!r}{no_path}; "
            "check the experiment name, the tracking URI or the path."
        )
    return experiment


def run_record(run) -> dict | None:
    """The runs-table row of an MLflow job run, or None when it lacks the model or seed tag."""
    tags = run.data.tags
    if "model" not in tags or "seed" not in tags:
        log.warning("Run %s has no model/seed tag and is skipped.", run.info.run_id)
        return None
    weight_seed, data_seed = seeds_from_tags(tags)
    diverged = str(tags.get("diverged", "false")).lower() not in ("false", "0", "", "no")
    return {
        "model": tags["model"],
        "seed": run_label(weight_seed, data_seed, replicate_from_tags(tags)),
        "weight_seed": weight_seed,
        "data_seed": data_seed,
        "run_id": run.info.run_id,
        "status": run.info.status,
        "diverged": diverged,
        "budget": tags.get("budget"),
        "start_time": run.info.start_time or 0,
    }


def runs_table(runs: list) -> pd.DataFrame:
    """One row per run (model, weight seed, data seed); a run logged twice keeps its latest MLflow run."""
    records = [r for r in (run_record(run) for run in runs) if r is not None]
    if not records:
        return pd.DataFrame(columns=RUN_COLUMNS)
    table = pd.DataFrame(records).sort_values("start_time")
    duplicated = table.duplicated(["model", "seed"], keep="last")
    for _, row in table[duplicated].iterrows():
        log.warning(
            "MLflow run %s repeats model %s run %s (weight seed %s, data seed %s); the later one is used.",
            row.run_id,
            row.model,
            row.seed,
            row.weight_seed,
            row.data_seed,
        )
    return table[~duplicated][RUN_COLUMNS].reset_index(drop=True)


def metric_history(client, run_id: str, key: str) -> np.ndarray:
    """(step, value) pairs of one metric, the last logged value per step."""
    history = client.get_metric_history(run_id, key)
    if not history:
        return np.empty((0, 2))
    pairs = np.array([(m.step, m.timestamp, m.value) for m in history], dtype="float64")
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    last_per_step = np.r_[pairs[1:, 0] != pairs[:-1, 0], True]
    return pairs[last_per_step][:, [0, 2]]


def run_metrics(client, run, keys: list[str] | None, workers: int = 8) -> pd.DataFrame:
    """Tidy rows of every metric key of one run (or of the keys matching ``keys``)."""
    names = list(run.data.metrics.keys())
    if keys:
        names = [n for n, keep in zip(names, select_metrics(pd.Series(names, dtype=str), keys)) if keep]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        histories = list(pool.map(lambda key: metric_history(client, run.info.run_id, key), names))
    frames = [
        pd.DataFrame({"step": h[:, 0], "metric": name, "value": h[:, 1]}) for name, h in zip(names, histories) if len(h)
    ]
    if not frames:
        return pd.DataFrame(columns=["step", "metric", "value"])
    return pd.concat(frames, ignore_index=True)


def load_mlflow(
    experiment: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    metric_keys: list[str] | None = None,
) -> Study:
    """Read all job runs of an MLflow experiment (optionally one sweep's children) into a Study."""
    client, uri = mlflow_client(tracking_uri)
    found = find_experiment(client, experiment)
    runs = search_job_runs(client, found.experiment_id, parent_run_id)
    table = runs_table(runs)
    if table.empty:
        where = f"under parent run {parent_run_id}" if parent_run_id else f"in experiment {experiment!r}"
        raise AnalysisError(
            f"No runs tagged polypythia.kind=job were found {where}; check the experiment name and --parent-run."
        )
    check_one_training_config(runs, table)  # seeds of one model differ in their seeds alone (analysis.configs)
    by_id = {run.info.run_id: run for run in runs}
    frames = []
    for row in table.itertuples():
        rows = run_metrics(client, by_id[row.run_id], metric_keys)
        frames.append(rows.assign(model=row.model, seed=row.seed))
    every_row = pd.concat(frames, ignore_index=True)
    diverged = non_finite_endings(every_row)
    set_aside: list[str] = []
    metrics = tidy(every_row, set_aside)
    if diverged:
        ended = [(m, s) in diverged for m, s in zip(table["model"].astype(str), table["seed"].astype(str))]
        table["diverged"] = table["diverged"].astype(bool) | np.asarray(ended, dtype=bool)
    return Study(
        metrics=metrics,
        runs=table,
        source=experiment,
        kind="mlflow",
        tracking_uri=uri,
        experiment_id=found.experiment_id,
        parent_run_id=parent_run_id,
        notes=set_aside + diverged_notes(diverged),
    )
