"""A job's MLflow run: found again by the id recorded in the run's folder, or made.

A job started again (a retry, a relaunch) continues the MLflow run recorded in
``<run_dir>/mlflow_run.json`` (:mod:`polypythia.runfolder`), found by its id, so the server may have
moved to another address meanwhile; a run that is gone (deleted in the UI, or on another server) is
a one-sentence error. A new run gets the job's config as params.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polypythia import runfolder, study
from polypythia.config.jobconfig import JobConfig, flat_params
from polypythia.errors import TrackingError
from polypythia.tracking import client as tracking


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: JobConfig, parent_run_id: str | None) -> dict[str, str]:
    tags = {
        study.KIND_TAG: study.JOB_KIND,
        study.MODEL_TAG: cfg.model.name,
        study.SEED_TAG: str(cfg.seed),
        study.WEIGHT_SEED_TAG: str(cfg.effective_weight_seed),
        study.DATA_SEED_TAG: str(cfg.effective_data_seed),
        study.REPLICATE_TAG: str(cfg.replicate),
        study.WEIGHT_STATS_TAG: cfg.train.weight_stats,
        "budget": cfg.budget.name,
        "git_commit": git_commit(),
        study.RUN_DIR_TAG: cfg.run_dir,
    }
    if parent_run_id:
        tags[study.PARENT_TAG] = parent_run_id
    return tags


@dataclass(frozen=True)
class OpenedRun:
    client: Any  # an MlflowClient of the tracking URI
    run_id: str
    resumed: bool  # the run recorded in the run folder, continued
    was_finished: bool  # ... and it had finished: a failure of this launch must not mark it FAILED


def open_run(cfg: JobConfig, uri: str, parent_run_id: str | None, check_params: bool = False) -> OpenedRun:
    """The MLflow run recorded in the run folder, found by its id (on whatever address the server
    has now), or a new one. ``check_params``: the run folder had no config to check ``cfg`` against
    (:func:`runfolder.config_known`), so a recorded run's params are, before anything is changed."""
    from mlflow.entities import Param, RunTag

    mlflow_client = tracking.client(uri)
    tags = run_tags(cfg, parent_run_id)
    record = runfolder.read_mlflow_record(cfg.run_dir)
    if record is not None:
        run = _recorded_run(mlflow_client, record, cfg.run_dir, uri)
        if check_params:
            runfolder.check_mlflow_params(cfg, run.data.params, run.info.run_id)
        run_id, finished = run.info.run_id, run.info.status == "FINISHED"
        if not finished:
            mlflow_client.update_run(run_id, status="RUNNING")
        if "failure_reason" in run.data.tags:  # from the attempt before
            mlflow_client.delete_tag(run_id, "failure_reason")
        mlflow_client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if record.get("tracking_uri") != uri:  # the address the run is reached at now (for evaluation)
            runfolder.write_mlflow_record(cfg.run_dir, run_id, uri)
        return OpenedRun(mlflow_client, run_id, resumed=True, was_finished=finished)
    exp_id = tracking.experiment_id(mlflow_client, cfg.study)
    run_id = mlflow_client.create_run(exp_id, run_name=cfg.run_name, tags=tags).info.run_id
    params = [Param(k, v[:6000]) for k, v in flat_params(cfg).items()]
    for i in range(0, len(params), 100):
        mlflow_client.log_batch(run_id, params=params[i : i + 100])
    runfolder.write_mlflow_record(cfg.run_dir, run_id, uri)
    return OpenedRun(mlflow_client, run_id, resumed=False, was_finished=False)


def _recorded_run(mlflow_client, record: dict, run_dir: str, uri: str):
    """The MLflow run of ``record``; a one-sentence :class:`TrackingError` if it is gone."""
    from mlflow.exceptions import MlflowException

    run_id, path = record["run_id"], Path(run_dir) / runfolder.MLFLOW_RECORD
    fresh = f"or delete {path} to log this run into a new MLflow run"
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise TrackingError(
            f"The MLflow run {run_id} recorded in {path} is not on the tracking server at {uri} "
            f"(it was logged to {record.get('tracking_uri', '?')}, or deleted for good); log to the "
            f"server that has it (tracking.uri or MLFLOW_TRACKING_URI), {fresh}."
        ) from None
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(
            f"The MLflow run {run_id} of {run_dir} was deleted in the MLflow UI; restore it "
            f"(MLFLOW_TRACKING_URI={uri} mlflow runs restore --run-id {run_id}), {fresh}."
        )
    return run
