"""Checkpoint evaluation off the training's critical path: weight statistics and validation loss
of every checkpoint, computed beside or after training instead of inside the step loop.

Training only writes checkpoints. :class:`CheckpointEvaluation` (a training callback, rank 0) starts
an evaluation *pass* over the run's checkpoints whenever one is sealed and no pass is running: in a
sweep a Ray task of one CPU (:func:`evaluation_pass`), which Ray starts when a CPU is free, so that
evaluation fills the cores training leaves idle (the tail of a sweep, a single job on a larger
machine) instead of stalling a step; without Ray (one job run by ``launch.py`` without ``-m``, an
in-process call) the pass runs once training is done. At the end of the job :meth:`finish` waits for
the pass in flight and runs a last one, so the run ends with every checkpoint evaluated. A job that
waits on a Ray task gives its CPU back to Ray for the wait (Ray releases the resources of a task
blocked in ``ray.get``/``ray.wait``; see Ray's docs, "Nested Remote Functions"), so the sweep's next
job starts meanwhile.

A pass is :func:`polypythia.evaluate.runner.evaluate_run` with the weights and validation
evaluators only, so its accounting is the offline evaluation's: each checkpoint's result is a file
in the checkpoint folder (written when computed), and the pass logs to MLflow, at the checkpoint's
step, only the values the run lacks there. A job killed mid-pass therefore loses nothing (what was
computed is on disk) and logs nothing twice (what was logged is skipped); a pass holds
``<run_dir>/eval.lock`` (``fcntl.flock``, released when its process dies), so two passes of one
run, say one left behind by a killed job and the retry's, never plan and log at the same time.

A job with a GPU evaluates beside training the same way (the passes are CPU tasks on the cores the
job leaves idle), but it does not wait for a CPU pass at the end: the GPU is its own and idle then,
and one CPU thread needs about a minute for the validation loss of one 160m checkpoint (seen on an
H100 machine: a 2-seed 160m demo sweep spent minutes in ``finish`` after seconds of training). So
:meth:`finish` stops the pass in flight (``ray.cancel``; what it computed is on disk, what it logged
is not logged again) and runs the last pass in the job's own process, the validation loss on its GPU
(on the CPU instead if the training's model and optimizer leave too little GPU memory for it).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

from polypythia.errors import last_line
from polypythia.train.callbacks import Callback, TrainResult, TrainStart

log = logging.getLogger(__name__)

LOCK_FILE = "eval.lock"
PASSES_FILE = "evaluation_passes.jsonl"  # one line per pass: when, how long, what it computed


def evaluation_pass(
    config: dict,
    tracking_uri: Optional[str],
    run_id: Optional[str],
    job_pid: Optional[int] = None,
    device: str = "cpu",
    heartbeat: Optional[Callable[[], None]] = None,
) -> list[str]:
    """Evaluate (weights, validation loss) every checkpoint of the run that lacks a result, and log
    what its MLflow run lacks; returns the failures, one line each. Runs in a Ray task or in-process;
    ``job_pid`` is the training job's process (``train.fault.kill_in_evaluation`` kills it);
    ``device`` is where the validation loss is computed; ``heartbeat`` is called after each checkpoint."""
    from polypythia.config.jobconfig import job_config
    from polypythia.evaluate.runner import EvalOptions, Execution, evaluate_run
    from polypythia.runtime.env import quiet_libraries

    quiet_libraries()
    cfg = job_config(config)
    lock_path = Path(cfg.run_dir) / LOCK_FILE
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pass of this run first (one a killed job left behind)
        started = time.time()
        try:
            summary = evaluate_run(
                cfg.run_dir,
                cfg=cfg,
                tracking_uri=tracking_uri,
                run_id=run_id,
                options=EvalOptions(tasks=(), device=device),
                execution=Execution(
                    use_ray=False,
                    show_progress=False,
                    echo=log.info,
                    heartbeat=_both(_kill_fault(cfg, job_pid), heartbeat),
                ),
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    record = {"started": started, "seconds": time.time() - started, "computed": summary.computed, "pid": os.getpid()}
    with open(Path(cfg.run_dir) / PASSES_FILE, "a") as passes:  # what evaluation cost (benchmarks/bench_sweep.py)
        passes.write(json.dumps(record) + "\n")
    return list(summary.errors)


def _kill_fault(cfg, job_pid: Optional[int]):
    """Fault injection (``train.fault.kill_in_evaluation``): once per run (a marker file remembers),
    SIGKILL the job's process as soon as this pass has evaluated a checkpoint, like an out-of-memory
    kill in the middle of evaluation; the pass itself goes on if it runs in another process."""
    if not getattr(cfg.train.fault, "kill_in_evaluation", False):
        return None
    marker = Path(cfg.run_dir) / "fault-killed-in-evaluation"
    if marker.exists():
        return None

    def kill() -> None:
        if not marker.exists():
            marker.write_text("killed\n")
            os.kill(job_pid or os.getpid(), signal.SIGKILL)

    return kill


def _both(first: Optional[Callable[[], None]], second: Optional[Callable[[], None]]) -> Optional[Callable[[], None]]:
    if first is None or second is None:
        return first or second
    return lambda: (first(), second())


def own_gpu() -> Optional[str]:
    """``"cuda"`` when this process has a GPU (Ray shows a task only the GPUs it was given), else None."""
    import torch

    return "cuda" if torch.cuda.is_available() else None


def _errors_of(result: Callable[[], list[str]]) -> list[str]:
    """A finished pass task's failures: what it returned, or the error it ended with."""
    try:
        return result()
    except Exception as exc:  # noqa: BLE001 - e.g. its process died twice: the job reports it
        return [f"the evaluation task ended with {last_line(exc)}"]


def _ray_available() -> bool:
    """Whether passes can be Ray tasks: in a Ray worker, and not in a placement group (a job of several
    data-parallel workers holds every CPU of its group, and a task outside it might find no CPU free
    while the job waits for it: such a job evaluates in its own process after training)."""
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized():
        return False
    from ray.util import get_current_placement_group

    return get_current_placement_group() is None


class CheckpointEvaluation(Callback):
    """Evaluates the run's checkpoints beside training (in a sweep) or after it; see the module doc.

    ``heartbeat`` is called while :meth:`finish` waits (a sweep's stall watchdog counts it as progress).
    ``finish_device``: where the last pass runs in this process instead of waiting for a CPU task
    (default: this process's GPU, if it has one; None: nowhere, wait).
    """

    def __init__(
        self,
        config: dict,
        tracking_uri: Optional[str],
        run_id: Optional[str],
        heartbeat: Optional[Callable[[], None]] = None,
        use_ray: Optional[bool] = None,
        finish_device: Optional[str] = "auto",
    ):
        self.args = (config, tracking_uri, run_id, os.getpid())
        self.heartbeat = heartbeat
        self.use_ray = _ray_available() if use_ray is None else use_ray
        self.finish_device = own_gpu() if finish_device == "auto" else finish_device
        self.rank = 0
        self.in_flight: Any = None  # the Ray task of the pass running now
        self.in_flight_done: Any = None  # its concurrent.futures.Future

    def on_train_start(self, start: TrainStart) -> None:
        self.rank = start.rank
        if start.start_step:  # an earlier attempt may have left checkpoints unevaluated
            self._start_pass()

    def on_checkpoint(self, step: int, path: str, model) -> None:
        self._start_pass()

    def on_train_end(self, result: TrainResult) -> None:
        pass  # the job calls finish() once training is done (and not when it failed)

    def _start_pass(self) -> None:
        if self.rank != 0 or not self.use_ray:
            return
        import ray

        if self.in_flight is not None:
            # Not ray.wait: a task blocked in a Ray call lends its CPU to Ray for the time, and another
            # task could start on it while this one trains on. A future's done() is only Python.
            if not self.in_flight_done.done():
                return  # the running pass, or the last one, takes this checkpoint too
            self._report(_errors_of(self.in_flight_done.result))
        self.in_flight = self._submit(ray)
        self.in_flight_done = self.in_flight.future()

    def _submit(self, ray) -> Any:
        """A pass as a Ray task of one CPU (started by Ray when a CPU is free)."""
        task = ray.remote(num_cpus=1, max_retries=1)(evaluation_pass)
        return task.options(name="checkpoint-evaluation").remote(*self.args)

    def finish(self, attempts: int = 3, pause_s: float = 10.0) -> list[str]:
        """Wait for the pass in flight, then run the last pass (every checkpoint is then evaluated);
        returns the failures of the last pass. A pass that failed (a tracking server that did not
        answer in time, say) is run again, up to ``attempts`` passes: passes are idempotent."""
        if self.use_ray and self.in_flight is not None:
            import ray

            if self.finish_device is not None and not self.in_flight_done.done():
                ray.cancel(self.in_flight, force=True)  # its process dies, and with it the run's eval.lock
                self._wait(self.in_flight, ray)  # gone (or finished meanwhile); a cancelled pass reports nothing
            else:
                self._report(self._wait(self.in_flight, ray))
        self.in_flight = None
        for attempt in range(1, attempts + 1):
            errors = self._last_pass()
            if not errors:
                return []
            for error in errors:
                log.error("Checkpoint evaluation failed (pass %d of at most %d): %s", attempt, attempts, error)
            if attempt < attempts:
                time.sleep(pause_s * attempt)
        return errors

    def _last_pass(self) -> list[str]:
        if not self.use_ray or self.finish_device is not None:
            device = self.finish_device or "cpu"
            errors = self._pass_here(device)
            if device != "cpu" and any("out of memory" in error.lower() for error in errors):
                # the training's model and optimizer state may still hold the GPU (a large model): the
                # pass only computes what is missing, so the CPU takes over where the GPU stopped
                log.warning("Checkpoint evaluation ran out of memory on %s; evaluating the rest on the CPU.", device)
                errors = self._pass_here("cpu")
            return errors
        import ray

        return self._wait(self._submit(ray), ray)

    def _pass_here(self, device: str) -> list[str]:
        try:
            return evaluation_pass(*self.args, device=device, heartbeat=self.heartbeat)
        except Exception as exc:  # noqa: BLE001 - e.g. the tracking server did not answer: tried again
            return [f"{type(exc).__name__}: {exc}"]

    def _wait(self, ref: Any, ray) -> list[str]:
        while True:
            ready, _ = ray.wait([ref], timeout=5.0)
            if ready:
                return _errors_of(lambda: ray.get(ref))
            if self.heartbeat is not None:
                self.heartbeat()

    def _report(self, errors: list[str]) -> None:
        for error in errors:
            log.error("Checkpoint evaluation failed: %s", error)
