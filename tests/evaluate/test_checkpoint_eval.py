"""Checkpoint evaluation off the step loop (polypythia/evaluate/background.py), and the job's threads
fixed when it starts (polypythia/job/threads.py)."""

import uuid
from pathlib import Path

import pytest
from helpers import child_runs, launch
from mlflow.tracking import MlflowClient

from polypythia.job.threads import job_threads

CHECKPOINT_STEPS = [0, 1, 2, 3, 4, 6]  # budget=smoke: log-spaced and every 3 steps, of 6


@pytest.mark.integration
@pytest.mark.slow  # long: runs in make test-slow (CI runs both)
def test_a_job_killed_while_evaluating_logs_every_checkpoint_exactly_once(tmp_path, mlflow_uri, cache_dir):
    """The job is SIGKILLed as soon as an evaluation pass (a Ray task beside training) has evaluated
    one checkpoint; Ray starts it again, it resumes, and every checkpoint's weights/* and valid/*
    end up in MLflow once, as does every step's train/loss."""
    study = f"evalkill-{uuid.uuid4().hex[:8]}"
    out = launch(
        tmp_path,
        "-m",
        "seed=1",
        "model=tiny",
        "budget=smoke",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
        "train.fault.kill_in_evaluation=true",
        "launcher.max_retries=1",
        "tracking.system_metrics=false",
        uri=mlflow_uri,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "tiny-seed1: finished (retried 1x)" in out.stdout, out.stdout[-2000:]
    run_dir = next(tmp_path.glob(f"runs/{study}/tiny-seed1"))
    assert (run_dir / "fault-killed-in-evaluation").exists()
    client = MlflowClient(mlflow_uri)
    _, (child,) = child_runs(client, study)
    run_id = child.info.run_id
    assert child.info.status == "FINISHED"
    for key in ("valid/loss", "valid/ppl", "weights/spectral", "weights/l2"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == CHECKPOINT_STEPS, (key, steps)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, 7))
    for step in CHECKPOINT_STEPS:  # each checkpoint's results are on disk, beside its weights
        assert (run_dir / "checkpoints" / f"step{step}" / "eval" / "valid.json").exists()


@pytest.mark.parametrize(
    "threads, cpus, expected",
    [
        (None, 1.0, 1),  # the CPUs the job asks for, whatever its siblings leave free
        (None, 2.0, 2),
        (None, 0.5, 1),  # a fraction of a CPU: one thread
        (3, 1.0, 3),  # train.threads wins
    ],
)
def test_a_jobs_threads_follow_its_config_alone(threads, cpus, expected):
    from types import SimpleNamespace

    cfg = SimpleNamespace(train=SimpleNamespace(threads=threads), launcher=SimpleNamespace(num_cpus_per_job=cpus))
    assert job_threads(cfg) == expected


def test_the_live_table_says_when_a_job_waits_for_the_tracking_server():
    """The job's progress reports carry the metrics logger's outage state; the table shows it."""
    from polypythia.driver.progress import ProgressBoard, line, render
    from polypythia.job.run import ProgressCallback

    board = ProgressBoard(["tiny-seed1"])
    away = [False]
    callback = ProgressCallback(lambda report: board.update(0, report), total_steps=6, waiting=lambda: away[0])
    callback.report({"state": "running", "attempt_start": True, "step": 0, "total": 6})
    callback.on_step_end(1, {"train/loss": 5.0, "train/tokens_per_s": 100.0})
    assert "waiting" not in line(board.rows[0])
    away[0] = True
    callback._last = 0.0  # the next report is due
    callback.on_step_end(2, {"train/loss": 4.9, "train/tokens_per_s": 100.0})
    assert "(waiting for the tracking server)" in line(board.rows[0])
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render(board.rows))
    assert "waiting for the tracking server" in console.export_text()
    board.update(0, {"state": "running", "evaluating": True, "tracking_waiting": False})
    assert "(evaluating checkpoints)" in line(board.rows[0])


def test_the_threads_log_says_the_count_each_step_ran_with():
    """train/threads is what torch ran the step with, also when something changed it mid-run."""
    import torch

    from polypythia.job.threads import ThreadsLog

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        threads, metrics = ThreadsLog(1), {}
        threads.on_step_end(1, metrics)
        assert metrics["train/threads"] == 1
        torch.set_num_threads(2)
        threads.on_step_end(2, metrics)
        assert metrics["train/threads"] == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "every, steps, with_state",
    [
        (3, 6, [0, 2, 3, 4, 6]),  # budget=smoke
        (35, 70, [0, 32, 35, 64, 70]),  # budget=demo: 5 resume states instead of 10
        (1000, 143000, [0, 512, 1000]),  # Pythia, the first of them
    ],
)
def test_early_log_spaced_checkpoints_keep_weights_only(every, steps, with_state):
    from types import SimpleNamespace

    from polypythia.train.checkpointer import Checkpointer
    from polypythia.train.schedule import checkpoint_steps

    checkpointer = Checkpointer.__new__(Checkpointer)
    checkpointer.cfg = SimpleNamespace(budget=SimpleNamespace(checkpoint_every_steps=every, steps=steps))
    schedule = [s for s in checkpoint_steps(steps, every, True) if s <= max(with_state)]
    assert [s for s in schedule if checkpointer.keeps_resume_state(s)] == with_state


@pytest.mark.integration
def test_a_gpu_job_stops_the_cpu_pass_and_finishes_evaluation_itself(tmp_path, mlflow_uri, cache_dir):
    """A job with a GPU does not wait at its end for a CPU pass: finish() cancels the pass in flight
    and runs the last pass in the job's process, on its GPU (here on the CPU, ``finish_device``
    standing in for the GPU this machine lacks; tests/train/test_gpu.py has the GPU's validation loss).
    Real Ray tasks, a real MLflow server: every checkpoint is still logged exactly once."""
    import json
    import os
    import shutil

    import ray
    from helpers import tiny_job, train_here

    from polypythia.config.jobconfig import to_dict
    from polypythia.evaluate.background import LOCK_FILE, PASSES_FILE, CheckpointEvaluation
    from polypythia.job.mlflowrun import open_run

    cfg = tiny_job(tmp_path, cache_dir, tracking__system_metrics=False)
    run_dir = Path(cfg.run_dir)
    run_id = open_run(cfg, mlflow_uri, None).run_id
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        evaluation = CheckpointEvaluation(to_dict(cfg), mlflow_uri, run_id, use_ray=True, finish_device="cpu")
        train_here(cfg, [evaluation])  # a pass as a Ray task at each checkpoint, when none is running
        assert evaluation.in_flight is not None
        evaluation.in_flight_done.result()
        for results in run_dir.glob("checkpoints/step*/eval"):  # every checkpoint to compute again (logged already)
            shutil.rmtree(results)
        evaluation._start_pass()  # one more pass, stopped half-way: finish() comes while it holds the run's lock
        stopped = evaluation.in_flight
        wait_for_lock_holder(run_dir / LOCK_FILE, evaluation.in_flight_done)
        assert evaluation.finish() == []
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(stopped)
    finally:
        ray.shutdown()
    passes = [json.loads(line) for line in (run_dir / PASSES_FILE).open()]
    assert passes[-1]["pid"] == os.getpid()  # the last pass ran in the job's process
    client = MlflowClient(mlflow_uri)
    for key in ("valid/loss", "valid/ppl", "weights/spectral", "weights/l2"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == CHECKPOINT_STEPS, (key, steps)


def wait_for_lock_holder(lock_path, done, timeout_s: float = 120.0) -> None:
    """Until another process holds ``lock_path`` (an evaluation pass has begun its work)."""
    import fcntl
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert not done.done(), "the pass ended before it was seen at work"
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(lock, fcntl.LOCK_UN)
        time.sleep(0.02)
    raise AssertionError(f"no pass took {lock_path} within {timeout_s:.0f} s")


@pytest.mark.parametrize(
    "gpu_error, devices, errors",
    [
        ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", ["cuda", "cpu"], []),
        (
            "ConnectionError: the tracking server did not answer",
            ["cuda"],
            ["ConnectionError: the tracking server did not answer"],
        ),
    ],
)
def test_a_last_pass_out_of_gpu_memory_finishes_on_the_cpu(monkeypatch, gpu_error, devices, errors):
    """The training's model and optimizer may still fill the GPU when the job evaluates its last
    checkpoints there: out of memory, the CPU does the rest; any other failure is reported as it is."""
    from polypythia.evaluate import background

    calls = []

    def fake_pass(*args, device="cpu", heartbeat=None):
        calls.append(device)
        return [gpu_error] if device == "cuda" else []

    monkeypatch.setattr(background, "evaluation_pass", fake_pass)
    evaluation = background.CheckpointEvaluation({}, None, None, use_ray=False, finish_device="cuda")
    assert evaluation.finish(attempts=1) == errors
    assert calls == devices
