"""One training job end to end: its MLflow run, the callbacks that feed it, and the training itself.

:func:`run` is called once per (model, seed) with everything it needs as arguments: in a sweep by
:func:`polypythia.job.worker.run_job`, inside the Ray task the sweep submitted for the job; without
``-m`` by :func:`run_from_hydra`, Hydra's task function (``launch.py``), in the launching process.
The job owns the run's folder while it runs, and checks it against its config before it touches
MLflow (:mod:`polypythia.runfolder`); the MLflow run id is remembered there, so a job that is
started again (a retry, a re-launch) continues the same run (:mod:`polypythia.job.mlflowrun`) and skips
the steps already logged.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional, Sequence

from polypythia import runfolder
from polypythia.config.jobconfig import JobConfig
from polypythia.errors import DivergenceError, PolypythiaError
from polypythia.job import rewindlog
from polypythia.job.mlflowrun import open_run
from polypythia.train.threads import threads_log
from polypythia.jobspec import TASK_STARTED_ENV, RewindRequest
from polypythia.runtime.env import quiet_libraries
from polypythia.tracking import client as tracking
from polypythia.tracking import ui as mlflow_ui
from polypythia.train.callbacks import Callback, TrainResult, TrainStart
from polypythia.train.loop import train

log = logging.getLogger(__name__)


class MLflowCallback(Callback):
    """Sends every step's metrics and each checkpoint's path to the job's MLflow run."""

    def __init__(self, logger: tracking.MetricsLogger, mlflow_client, run_id: str):
        self.logger = logger
        self.client = mlflow_client
        self.run_id = run_id
        self.pending_tags: dict[str, str] = {}
        self.step_ended = (-1, 0.0)  # (step, when): a checkpoint's seconds are counted from its step's end

    def on_train_start(self, start: TrainStart) -> None:
        self.step_ended = (start.start_step, time.perf_counter())
        self.client.set_tag(self.run_id, "num_params", str(start.num_params))
        self.client.set_tag(self.run_id, "world_size", str(start.world_size))
        self.client.set_tag(self.run_id, "zero_stage", str(start.zero_stage))
        self.client.set_tag(self.run_id, "process_started", f"{_process_start_time():.3f}")  # start-up: bench_sweep.py
        if os.environ.get(TASK_STARTED_ENV):  # a sweep's job: when its Ray task began (the process may be older)
            self.client.set_tag(self.run_id, "task_started", os.environ[TASK_STARTED_ENV])
        if start.start_step:
            self.client.set_tag(self.run_id, "resumed_from_step", str(start.start_step))

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.logger.log(step, metrics)
        self.step_ended = (step, time.perf_counter())
        if any(key.startswith("monitor/spike/") for key in metrics):  # rare; no I/O in the step
            heights = ", ".join(
                f"{key.rpartition('/')[2]} {value:.1f} SD"
                for key, value in sorted(metrics.items())
                if key.startswith("monitor/spike/")
            )
            self.pending_tags[f"stability.spike.step{step}"] = f"{heights}; batch: polypythia-batch --step {step}"

    def send_pending_tags(self) -> None:
        """The spike tags, a tag per spike (visible in the runs table). Sent at checkpoints and at the
        end, never inside a step: a tracking-server outage must not fail the run (the metrics logger
        rides it out), so a failed send keeps them for the next try."""
        for key, value in list(self.pending_tags.items()):
            try:
                self.client.set_tag(self.run_id, key, value)
            except Exception as exc:  # the server is away: the logger's outage handling decides the run's fate
                log.warning("Could not tag the run with %s yet (%s); trying again at the next checkpoint.", key, exc)
                return
            del self.pending_tags[key]

    def before_checkpoint(self, step: int, model) -> None:
        if self.logger.waiting:
            log.warning(
                "Checkpoint step %d waits for the MLflow server at %s to store the points before it "
                "(up to tracking.max_outage_s).",
                step,
                self.logger.uri,
            )
        self.logger.flush()  # a resume from this checkpoint must find every earlier point stored

    def on_checkpoint(self, step: int, path: str, model) -> None:
        if self.step_ended[0] == step:  # writing, sealing and flushing: what a checkpoint costs the step loop
            self.logger.log(step, {"train/checkpoint_seconds": time.perf_counter() - self.step_ended[1]})
        self.client.set_tag(self.run_id, f"checkpoint.step{step}", path)
        self.client.set_tag(self.run_id, "checkpoint.latest_step", str(step))
        self.send_pending_tags()

    def on_train_end(self, result) -> None:
        self.send_pending_tags()


class ProgressCallback(Callback):
    """Reports step, loss and speed to the launcher's live table (at most once a second), with every
    step's loss since the last report (the board keeps the smoothed loss the cross-seed monitor reads)."""

    def __init__(self, report: Callable[[dict], None], total_steps: int, waiting: Callable[[], bool] = lambda: False):
        self.report = report
        self.total_steps = total_steps
        self.waiting = waiting  # points held back while the tracking server is away (shown in the table)
        self._last = 0.0
        self._losses: dict[int, float] = {}

    def on_train_start(self, start: TrainStart) -> None:
        self.report(
            {
                "state": "running",
                "step": start.start_step,
                "total": self.total_steps,
                "attempt_start": True,
                "evaluating": False,
            }
        )

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        self._losses[step] = metrics["train/loss"]
        if now - self._last >= 1.0 or step == self.total_steps:
            self._last, losses, self._losses = now, self._losses, {}
            self.report(
                {
                    "state": "running",
                    "step": step,
                    "total": self.total_steps,
                    "losses": losses,
                    "loss": metrics["train/loss"],
                    "tokens_per_s": metrics["train/tokens_per_s"],
                    "tracking_waiting": self.waiting(),
                }
            )


def run(
    cfg: JobConfig,
    tracking_uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    overrides: Sequence[str] = (),
    progress: Optional[Callable[[dict], None]] = None,
    rewind: Optional[RewindRequest] = None,
) -> dict:
    """Train one job, tracked in MLflow; returns a plain summary dict.

    ``tracking_uri``: the MLflow server (None: the one ``cfg.tracking`` names, started if need be);
    ``parent_run_id``: the sweep's run, if any; ``overrides``: the command-line overrides that made
    ``cfg``, logged with the run; ``progress``: called with ``{"state", "step", "loss", ...}``;
    ``rewind``: the sweep's cross-seed monitor rolls the run back first (:mod:`polypythia.job.rewindlog`).

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
        return _run_owned(cfg, tracking_uri, parent_run_id, overrides, progress, rewind)


def _run_owned(
    cfg: JobConfig,
    tracking_uri: str,
    parent_run_id: Optional[str],
    overrides: Sequence[str],
    progress: Optional[Callable[[dict], None]],
    rewind: Optional[RewindRequest] = None,
) -> dict:
    # a folder without a config to check against (older than run_config.json) is checked against its
    # MLflow run's params; the config is recorded only once it has passed
    opened = open_run(cfg, tracking_uri, parent_run_id, check_params=not runfolder.config_known(cfg))
    runfolder.record_config(cfg)
    mlflow_client, run_id, resumed = opened.client, opened.run_id, opened.resumed
    mlflow_ui.join_sweep_view(mlflow_client, run_id, parent_run_id, cfg.run_name)  # its sweep's view, its colour
    if not resumed:
        _log_config_artifacts(mlflow_client, run_id, cfg, overrides)
    monitor = _system_metrics(cfg, tracking_uri, run_id, resumed)
    already = tracking.logged_through(mlflow_client, run_id) if resumed else {}
    logger = tracking.MetricsLogger(
        tracking_uri, run_id, cfg.tracking.flush_interval_s, cfg.tracking.max_outage_s, already
    )
    rewound = rewindlog.start(cfg.run_dir, rewind, mlflow_client, run_id, already)  # re-trained points: an artifact
    logger = logger if rewound is None else rewindlog.RewoundLogger(logger, rewound, mlflow_client, run_id, cfg.run_dir)
    callbacks: list[Callback] = [] if rewound is None else [logger]
    evaluation = _checkpoint_evaluation(cfg, tracking_uri, run_id, progress)
    callbacks += ([evaluation] if evaluation is not None else []) + threads_log(
        cfg
    )  # train/threads: polypythia.train.threads
    callbacks.append(MLflowCallback(logger, mlflow_client, run_id))
    if progress is not None:
        callbacks.append(ProgressCallback(progress, cfg.budget.steps, waiting=lambda: logger.waiting))
    try:
        result: TrainResult = train(cfg, callbacks)
        logger.close()
        if evaluation is not None:  # the checkpoints' weights and validation loss, all of them
            _finish_evaluation(evaluation)
    except DivergenceError as exc:
        _stop(monitor)
        _close_quietly(logger)
        if not opened.was_finished:
            mlflow_client.set_tag(run_id, "diverged", "true")
            mlflow_client.set_tag(run_id, "diverged_step", str(exc.step))
        _fail(mlflow_client, run_id, str(exc), opened.was_finished)
        raise
    except BaseException as exc:
        _stop(monitor)
        _close_quietly(logger)
        _fail(mlflow_client, run_id, f"{type(exc).__name__}: {exc}", opened.was_finished)
        raise
    _stop(monitor)
    if cfg.train.evaluate_after_training:
        _evaluate(cfg, tracking_uri, run_id, progress)
    mlflow_client.set_tag(run_id, "status", "finished")
    mlflow_client.set_terminated(run_id, status="FINISHED")
    return {
        "run_id": run_id,
        "run_name": cfg.run_name,
        "final_loss": result.final_loss,
        "start_step": result.start_step,
        "steps": result.steps,
        "checkpoints": result.checkpoints,
    }


def _checkpoint_evaluation(cfg: JobConfig, uri: str, run_id: str, progress: Optional[Callable[[dict], None]]):
    """Weight statistics and validation loss of each checkpoint, off the step loop
    (:mod:`polypythia.evaluate.background`); None when ``train.eval_every_checkpoint`` is off."""
    if not cfg.train.eval_every_checkpoint:
        return None
    from polypythia.config.jobconfig import to_dict
    from polypythia.evaluate.background import CheckpointEvaluation

    heartbeat = (lambda: progress({"state": "running", "evaluating": True})) if progress is not None else None
    return CheckpointEvaluation(to_dict(cfg), uri, run_id, heartbeat=heartbeat)


def _finish_evaluation(evaluation) -> None:
    errors = evaluation.finish()
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise PolypythiaError(
            f"Checkpoint evaluation failed: {errors[0]}{more}; fix the cause and launch the run "
            "again: it evaluates only what is missing."
        )


def _process_start_time() -> float:
    """When this process started (Unix seconds)."""
    import psutil

    return psutil.Process().create_time()


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

    heartbeat = (lambda: progress({"state": "running"})) if progress is not None else None
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
        mlflow_client.set_tag(run_id, "status", "failed")
        mlflow_client.set_tag(run_id, "failure_reason", reason[:5000])
        mlflow_client.set_terminated(run_id, status="FAILED")
    except Exception as exc:  # the tracking server may be the thing that failed
        log.error("Could not mark MLflow run %s as failed: %s", run_id, exc)


def teardown() -> None:
    """Flush what the job printed. The process group stays: DeepSpeed caches it per process, and a
    sweep gives every job a fresh process anyway (Ray ``max_calls=1``)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()


def _print_progress(run_name: str, every_s: float = 10.0) -> Callable[[dict], None]:
    """Without a sweep there is no live table: the same board, printed as a line every ``every_s``."""
    from polypythia.driver.progress import ProgressBoard, line

    board = ProgressBoard([run_name])
    last_print = [0.0]

    def report(update: dict) -> None:
        board.update(0, update)
        row = board.rows[0]
        if time.monotonic() - last_print[0] >= every_s or row["step"] == row["total"]:
            last_print[0] = time.monotonic()
            print(line(row), flush=True)

    return report


def run_from_hydra(cfg) -> dict:
    """Hydra's task function for a job without ``-m``: validate this job's config and run it here.

    (A sweep does not call it: each of its jobs runs :func:`polypythia.job.worker.run_job` in a Ray worker.)
    """
    from hydra.core.hydra_config import HydraConfig

    from polypythia.config.jobconfig import job_config
    from polypythia.errors import exit_with

    hydra_cfg = HydraConfig.get()
    try:
        job_cfg = job_config(cfg, hydra_cfg.runtime.cwd)
        quiet_libraries()
        return run(
            job_cfg,
            tracking_uri=None,
            parent_run_id=None,
            overrides=list(hydra_cfg.overrides.task),
            progress=_print_progress(job_cfg.run_name),
        )
    except PolypythiaError as exc:
        exit_with(exc)
    finally:
        teardown()
