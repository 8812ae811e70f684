"""The job's callbacks that report its training as it goes: :class:`MLflowCallback` to the job's MLflow
run (every step's metrics, each checkpoint's path, the spike tags) and :class:`ProgressCallback` to the
sweep's progress board (the live table, and the smoothed loss the seed-band monitor reads). Both are
made by :func:`polypythia.job.run.run`.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from polypythia.jobspec import JobState
from polypythia.tracking import client as tracking
from polypythia.train.callbacks import Callback, TrainStart

log = logging.getLogger(__name__)


class MLflowCallback(Callback):
    """Sends every step's metrics and each checkpoint's path to the job's MLflow run."""

    def __init__(
        self, logger: tracking.MetricsLogger, mlflow_client, run_id: str, task_started: Optional[float] = None
    ):
        self.logger = logger
        self.client = mlflow_client
        self.run_id = run_id
        self.task_started = task_started  # a sweep's job: when its Ray task began (Unix seconds)
        self.pending_tags: dict[str, str] = {}
        self.step_ended = (-1, 0.0)  # (step, when): a checkpoint's seconds are counted from its step's end

    def on_train_start(self, start: TrainStart) -> None:
        self.step_ended = (start.start_step, time.perf_counter())
        self.client.set_tag(self.run_id, "num_params", str(start.num_params))
        self.client.set_tag(self.run_id, "world_size", str(start.world_size))
        self.client.set_tag(self.run_id, "zero_stage", str(start.zero_stage))
        self.client.set_tag(self.run_id, "process_started", f"{_process_start_time():.3f}")  # start-up: bench_sweep.py
        if self.task_started is not None:  # a sweep's job: when its Ray task began (the process may be older)
            self.client.set_tag(self.run_id, "task_started", f"{self.task_started:.3f}")
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
            except Exception as exc:  # noqa: BLE001 - the server is away: the logger's outage handling decides the run's fate
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
    step's loss since the last report (the board keeps the smoothed loss the seed-band monitor reads)."""

    def __init__(self, report: Callable[[dict], None], total_steps: int, waiting: Callable[[], bool] = lambda: False):
        self.report = report
        self.total_steps = total_steps
        self.waiting = waiting  # points held back while the tracking server is away (shown in the table)
        self._last = 0.0
        self._losses: dict[int, float] = {}

    def on_train_start(self, start: TrainStart) -> None:
        self.report(
            {
                "state": JobState.RUNNING,
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
                    "state": JobState.RUNNING,
                    "step": step,
                    "total": self.total_steps,
                    "losses": losses,
                    "loss": metrics["train/loss"],
                    "tokens_per_s": metrics["train/tokens_per_s"],
                    "tracking_waiting": self.waiting(),
                }
            )


def _process_start_time() -> float:
    """When this process started (Unix seconds)."""
    import psutil

    return psutil.Process().create_time()
