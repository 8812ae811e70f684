"""One training job end to end: its MLflow run, the callbacks that feed it (:mod:`polypythia.job.reporting`),
and the training itself.

:func:`run` is called once per (model, seed) with everything it needs as arguments: in a sweep by
:func:`polypythia.job.worker.run_job`, inside the Ray task the sweep submitted for the job; without
``-m`` by :func:`polypythia.driver.single.run_from_hydra`, Hydra's task function (``launch.py``), in the
launching process.
The job owns the run's folder while it runs, and checks it against its config before it touches
MLflow (:mod:`polypythia.runfolder`); the MLflow run id is remembered there, so a job that is
started again (a retry, a re-launch) continues the same run (:mod:`polypythia.job.mlflowrun`) and skips
the steps already logged.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

from polypythia import runfolder
from polypythia.config.jobconfig import JobConfig
from polypythia.errors import DivergenceError, PolypythiaError
from polypythia.job import rewindlog
from polypythia.job.mlflowrun import OpenedRun, open_run
from polypythia.job.reporting import MLflowCallback, ProgressCallback
from polypythia.jobspec import JobState, RewindRequest
from polypythia.tracking import client as tracking
from polypythia.tracking import ui as mlflow_ui
from polypythia.train.callbacks import Callback, TrainResult
from polypythia.train.loop import train
from polypythia.train.threads import threads_log

log = logging.getLogger(__name__)


def run(
    cfg: JobConfig,
    tracking_uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    overrides: Sequence[str] = (),
    progress: Optional[Callable[[dict], None]] = None,
    rewind: Optional[RewindRequest] = None,
    task_started: Optional[float] = None,
) -> dict:
    """Train one job, tracked in MLflow; returns a plain summary dict.

    ``tracking_uri``: the MLflow server (None: the one ``cfg.tracking`` names, started if need be);
    ``parent_run_id``: the sweep's run, if any; ``overrides``: the command-line overrides that made
    ``cfg``, logged with the run; ``progress``: called with ``{"state", "step", "loss", ...}``;
    ``rewind``: the sweep's seed-band monitor rolls the run back first (:mod:`polypythia.job.rewindlog`);
    ``task_started``: when the sweep's Ray task of the job began (Unix seconds; the ``task_started`` tag).

    The job owns the run's folder while it runs (a second job of the same run stops at once), and
    checks the folder against ``cfg`` before it touches MLflow (:func:`runfolder.check_relaunch`).
    """
    with runfolder.claim(cfg.run_dir):
        runfolder.check_relaunch(cfg)
        if tracking_uri is None:  # a job on its own (no sweep): find or start the server, and say where
            tracking_uri = tracking.resolve_tracking_uri(
                cfg.tracking.uri,
                cfg.tracking.dir,
                cfg.tracking.host,
                cfg.tracking.port,
                cfg.tracking.backend_store_uri,
                cfg.tracking.artifacts_destination,
            )
            print(f"MLflow tracking server: {tracking_uri}", flush=True)
        return _run_owned(cfg, tracking_uri, parent_run_id, overrides, progress, rewind, task_started)


def _run_owned(
    cfg: JobConfig,
    tracking_uri: str,
    parent_run_id: Optional[str],
    overrides: Sequence[str],
    progress: Optional[Callable[[dict], None]],
    rewind: Optional[RewindRequest] = None,
    task_started: Optional[float] = None,
) -> dict:
    opened = _open_tracked_run(cfg, tracking_uri, parent_run_id, overrides)
    mlflow_client, run_id = opened.client, opened.run_id
    sampler = _system_metrics(cfg, tracking_uri, run_id, opened.resumed)
    logger = _metrics_logger(cfg, tracking_uri, opened, rewind)
    evaluation = _checkpoint_evaluation(cfg, tracking_uri, run_id, progress)
    callbacks = _callbacks(cfg, logger, opened, evaluation, progress, task_started)
    try:
        result: TrainResult = train(cfg, callbacks)
        logger.close()
        if evaluation is not None:  # the checkpoints' weights and validation loss, all of them
            _finish_evaluation(evaluation)
    except BaseException as exc:
        _stop(sampler)
        _close_quietly(logger)
        _record_failure(opened, exc)
        raise
    _stop(sampler)
    if cfg.train.evaluate_after_training:
        _evaluate(cfg, tracking_uri, run_id, progress)
    mlflow_client.set_tag(run_id, "status", JobState.FINISHED.value)
    mlflow_client.set_terminated(run_id, status="FINISHED")
    return {
        "run_id": run_id,
        "run_name": cfg.run_name,
        "final_loss": result.final_loss,
        "start_step": result.start_step,
        "steps": result.steps,
        "checkpoints": result.checkpoints,
    }


def _open_tracked_run(
    cfg: JobConfig, tracking_uri: str, parent_run_id: Optional[str], overrides: Sequence[str]
) -> OpenedRun:
    """The job's MLflow run, new or continued. A folder without a config to check against (older than
    run_config.json) is checked against its MLflow run's params; the config is recorded only once it
    has passed."""
    opened = open_run(cfg, tracking_uri, parent_run_id, check_params=not runfolder.config_known(cfg))
    runfolder.record_config(cfg)
    mlflow_ui.join_sweep_view(opened.client, opened.run_id, parent_run_id, cfg.run_name)  # its sweep's view, its colour
    if not opened.resumed:
        _log_config_artifacts(opened.client, opened.run_id, cfg, overrides)
    return opened


def _metrics_logger(cfg: JobConfig, tracking_uri: str, opened: OpenedRun, rewind: Optional[RewindRequest]):
    """The logger of the run's points, skipping the steps a continued run has logged already; after a
    rewind, one that keeps the re-trained steps' points as an artifact (:mod:`polypythia.job.rewindlog`)."""
    client, run_id = opened.client, opened.run_id
    already = tracking.logged_through(client, run_id) if opened.resumed else {}
    logger = tracking.MetricsLogger(
        tracking_uri, run_id, cfg.tracking.flush_interval_s, cfg.tracking.max_outage_s, already
    )
    rewound = rewindlog.start(cfg.run_dir, rewind, client, run_id, already)
    return logger if rewound is None else rewindlog.RewoundLogger(logger, rewound, client, run_id, cfg.run_dir)


def _callbacks(
    cfg: JobConfig,
    logger,
    opened: OpenedRun,
    evaluation,
    progress: Optional[Callable[[dict], None]],
    task_started: Optional[float],
) -> list[Callback]:
    """The job's callbacks, in the order they were always given to the loop: the rewound logger (a
    callback too), the checkpoint evaluation, ``train/threads`` (:mod:`polypythia.train.threads`),
    MLflow, then the progress board."""
    callbacks: list[Callback] = [logger] if isinstance(logger, rewindlog.RewoundLogger) else []
    callbacks += ([evaluation] if evaluation is not None else []) + threads_log(cfg)
    callbacks.append(MLflowCallback(logger, opened.client, opened.run_id, task_started))
    if progress is not None:
        callbacks.append(ProgressCallback(progress, cfg.budget.steps, waiting=lambda: logger.waiting))
    return callbacks


def _record_failure(opened: OpenedRun, exc: BaseException) -> None:
    """Mark the run FAILED with why (a diverged run also gets its ``diverged`` tags), unless it had
    finished before this launch."""
    if isinstance(exc, DivergenceError):
        if not opened.was_finished:
            opened.client.set_tag(opened.run_id, "diverged", "true")
            opened.client.set_tag(opened.run_id, "diverged_step", str(exc.step))
        reason = str(exc)
    else:
        reason = f"{type(exc).__name__}: {exc}"
    _fail(opened.client, opened.run_id, reason, opened.was_finished)


def _checkpoint_evaluation(cfg: JobConfig, uri: str, run_id: str, progress: Optional[Callable[[dict], None]]):
    """Weight statistics and validation loss of each checkpoint, off the step loop
    (:mod:`polypythia.evaluate.background`); None when ``train.eval_every_checkpoint`` is off."""
    if not cfg.train.eval_every_checkpoint:
        return None
    from polypythia.config.jobconfig import to_dict
    from polypythia.evaluate.background import CheckpointEvaluation

    heartbeat = (lambda: progress({"state": JobState.RUNNING, "evaluating": True})) if progress is not None else None
    return CheckpointEvaluation(to_dict(cfg), uri, run_id, heartbeat=heartbeat)


def _finish_evaluation(evaluation) -> None:
    errors = evaluation.finish()
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise PolypythiaError(
            f"Checkpoint evaluation failed: {errors[0]}{more}; fix the cause and launch the run "
            "again: it evaluates only what is missing."
        )


def _log_config_artifacts(mlflow_client, run_id: str, cfg: JobConfig, overrides: Sequence[str]) -> None:
    """The resolved config and the overrides that produced it, as files in the run."""
    from omegaconf import OmegaConf

    from polypythia.config.jobconfig import to_dict

    mlflow_client.log_text(run_id, OmegaConf.to_yaml(to_dict(cfg)), "config/resolved.yaml")
    mlflow_client.log_text(run_id, "\n".join(overrides) + "\n", "config/overrides.txt")


def _system_metrics(cfg: JobConfig, uri: str, run_id: str, resumed: bool):
    """MLflow's sampler of CPU, memory (and GPU, where present) as ``system/*`` metrics."""
    if not cfg.tracking.system_metrics:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=15, resume_logging=resumed, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - optional telemetry must never stop training
        log.warning("System metrics are off for this run: %s", exc)
        return None


def _stop(monitor) -> None:
    if monitor is not None:
        try:
            monitor.finish()
        except Exception as exc:  # noqa: BLE001
            log.warning("Could not stop the system-metrics sampler: %s", exc)


def _evaluate(cfg: JobConfig, uri: str, run_id: str, progress: Optional[Callable[[dict], None]]) -> None:
    """Downstream tasks and agreement inputs for every checkpoint; what exists is skipped. Each
    evaluated checkpoint is reported as progress, so a sweep's stall watchdog sees a job that evaluates."""
    from polypythia.evaluate.runner import EvalOptions, Execution, evaluate_run

    heartbeat = (lambda: progress({"state": JobState.RUNNING})) if progress is not None else None
    evaluate_run(
        cfg.run_dir,
        cfg=cfg,
        tracking_uri=uri,
        run_id=run_id,
        options=EvalOptions(limit_items=cfg.train.eval_limit_items),
        execution=Execution(use_ray=False, show_progress=False, echo=log.info, heartbeat=heartbeat),
    )


def _close_quietly(logger: tracking.MetricsLogger) -> None:
    try:
        logger.close()
    except PolypythiaError as exc:
        log.error("%s", exc)


def _fail(mlflow_client, run_id: str, reason: str, was_finished: bool = False) -> None:
    """Mark the run FAILED with ``reason``; a run that had finished stays FINISHED (the failed
    relaunch is noted in its ``relaunch_failure`` tag)."""
    try:
        if was_finished:
            mlflow_client.set_tag(run_id, "relaunch_failure", reason[:5000])
            log.error("This launch of finished MLflow run %s failed (%s); the run stays FINISHED.", run_id, reason)
            return
        mlflow_client.set_tag(run_id, "status", JobState.FAILED.value)
        mlflow_client.set_tag(run_id, "failure_reason", reason[:5000])
        mlflow_client.set_terminated(run_id, status="FAILED")
    except Exception as exc:  # noqa: BLE001 - the tracking server may be the thing that failed
        log.error("Could not mark MLflow run %s as failed: %s", run_id, exc)


def teardown() -> None:
    """Flush what the job printed. The process group stays: DeepSpeed caches it per process, and a
    sweep gives every job a fresh process anyway (Ray ``max_calls=1``)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
