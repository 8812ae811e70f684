"""Failures a long study meets: killed processes, NaN losses, several workers, impossible requests."""

import json
import uuid

import numpy as np
import pytest
from helpers import child_runs, launch, tiny_job, train_here
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration


def reference_losses(tmp_path, cache_dir):
    """An uninterrupted in-process run with the one thread a Ray job of num_cpus=1 gets."""
    import torch

    threads = torch.get_num_threads()
    try:
        return train_here(tiny_job(tmp_path / "reference", cache_dir, train__threads=1)).losses
    finally:
        torch.set_num_threads(threads)


def history(client, run_id, key="train/loss"):
    points = client.get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in points)


def test_killed_job_is_retried_and_diverged_job_is_stopped(tmp_path, mlflow_uri, cache_dir):
    study = f"faults-{uuid.uuid4().hex[:8]}"
    out = launch(
        tmp_path,
        "-m",
        "seed=1,2,3",
        "model=tiny",
        "budget=smoke",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
        "train.fault.kill_at_step=4",
        "train.fault.kill_seeds=[1]",
        "train.fault.nan_at_step=3",
        "train.fault.nan_seeds=[2]",
        uri=mlflow_uri,
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "tiny-seed1: finished (retried 1x)" in out.stdout
    assert "tiny-seed2: diverged" in out.stdout and "loss at step 3 is nan" in out.stdout
    assert "tiny-seed3: finished" in out.stdout
    assert "1 of 3 jobs did not finish" in out.stdout
    client = MlflowClient(mlflow_uri)
    _, children = child_runs(client, study)
    runs = {c.data.tags["seed"]: c for c in children}
    assert len(children) == 3
    killed = runs["1"]
    assert killed.info.status == "FINISHED" and killed.data.tags["resumed_from_step"] == "3"
    reference = reference_losses(tmp_path, cache_dir)
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert [s for s, _ in history(client, killed.info.run_id, key)] == list(range(1, 7)), key
    assert [v for _, v in history(client, killed.info.run_id)] == reference  # bit-identical after resume
    diverged = runs["2"]
    assert diverged.info.status == "FAILED"
    assert diverged.data.tags["diverged"] == "true" and diverged.data.tags["diverged_step"] == "3"
    assert [s for s, _ in history(client, diverged.info.run_id)] == [1, 2, 3]
    assert runs["3"].info.status == "FINISHED"


def test_sigkill_then_relaunch_resumes_the_same_run(tmp_path, mlflow_uri, cache_dir):
    """Without Ray: the process dies mid-run; launching the same command again finishes it."""
    study = f"resume-{uuid.uuid4().hex[:8]}"
    args = (
        "model=tiny",
        "budget=smoke",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
        "train.fault.kill_at_step=5",
        "train.threads=1",
    )
    first = launch(tmp_path, *args, uri=mlflow_uri)
    assert first.returncode == -9, first.stderr[-2000:]
    run_dir = tmp_path / "runs" / study / "tiny-seed1"
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    # the second launch also evaluates the checkpoints on the downstream tasks after training
    second = launch(tmp_path, *args, "train.evaluate_after_training=true", "train.eval_limit_items=4", uri=mlflow_uri)
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id
    client = MlflowClient(mlflow_uri)
    assert len(client.search_runs([client.get_experiment_by_name(study).experiment_id])) == 1
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "4"
    points = history(client, run_id)
    assert [s for s, _ in points] == list(range(1, 7))
    assert [v for _, v in points] == reference_losses(tmp_path, cache_dir)
    for task in ("polypythia_stdlib_next_line", "polypythia_stdlib_cloze"):
        assert [s for s, _ in history(client, run_id, f"eval/{task}/acc")] == [0, 1, 2, 3, 4, 6]


@pytest.mark.slow  # long: runs in make test-slow (CI runs both)
def test_two_workers_match_one_worker(tmp_path, mlflow_uri, cache_dir):
    study = f"dp-{uuid.uuid4().hex[:8]}"
    out = launch(
        tmp_path,
        "-m",
        "seed=1",
        "model=tiny",
        "budget=smoke",
        "launcher.workers_per_run=2",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
        uri=mlflow_uri,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    _, (run,) = child_runs(client, study)
    assert run.data.tags["world_size"] == "2"
    two_workers = [v for _, v in history(client, run.info.run_id)]
    reference = reference_losses(tmp_path, cache_dir)
    np.testing.assert_allclose(two_workers, reference, rtol=1e-5, atol=1e-6)
    assert run.data.tags["zero_stage"] == "1"


@pytest.mark.slow  # long: runs in make test-slow (CI runs both)
def test_a_run_of_two_workers_that_died_resumes_on_one(tmp_path, mlflow_uri, cache_dir):
    """A node is lost for good: the 2-worker run (ZeRO-1) dies after step 5 and is not retried;
    launched again with one worker, it converts its step-4 checkpoint and finishes in the same
    MLflow run, every step logged once (both directions and ZeRO-0/2: tests/train/test_data_parallel.py)."""
    study = f"dp-shrink-{uuid.uuid4().hex[:8]}"
    common = ("-m", "seed=1", "model=tiny", "budget=smoke", f"study={study}", f"data.cache_dir={cache_dir}")
    out = launch(
        tmp_path,
        *common,
        "launcher.workers_per_run=2",
        "launcher.max_retries=0",
        "train.fault.kill_at_step=5",
        uri=mlflow_uri,
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    out = launch(tmp_path, *common, "launcher.workers_per_run=1", uri=mlflow_uri)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    _, (run,) = child_runs(client, study)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "4"
    assert (run.data.tags["world_size"], run.data.tags["zero_stage"]) == ("1", "0")
    points = history(client, run.info.run_id)
    assert [s for s, _ in points] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in points], reference_losses(tmp_path, cache_dir), rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "runs" / study / "tiny-seed1" / "checkpoints").glob("*.universal"))


@pytest.mark.slow  # long: runs in make test-slow (CI runs both)
def test_a_dead_rank_restarts_the_whole_run(tmp_path, mlflow_uri, cache_dir):
    study = f"dp-kill-{uuid.uuid4().hex[:8]}"
    out = launch(
        tmp_path,
        "-m",
        "seed=1",
        "model=tiny",
        "budget=smoke",
        "launcher.workers_per_run=2",
        "train.fault.kill_at_step=5",
        "train.fault.kill_ranks=[1]",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
        uri=mlflow_uri,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "tiny-seed1: finished (retried 1x)" in out.stdout
    client = MlflowClient(mlflow_uri)
    _, (run,) = child_runs(client, study)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "4"
    assert "failure_reason" not in run.data.tags
    points = history(client, run.info.run_id)
    assert [s for s, _ in points] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in points], reference_losses(tmp_path, cache_dir), rtol=1e-5, atol=1e-6)


def test_asking_for_missing_gpus_is_an_error_at_launch(tmp_path):
    """Counted over all of a run's workers (a placement group asking for more would wait forever)."""
    out = launch(
        tmp_path,
        "-m",
        "seed=1",
        "model=tiny",
        "budget=smoke",
        "launcher.num_gpus_per_job=64",
        "launcher.workers_per_run=2",
        timeout=180,
    )
    assert out.returncode == 2
    assert "asks for 128 GPU(s) (64 per worker x 2 workers)" in out.stderr and "the Ray cluster has" in out.stderr
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "mlflow").exists()  # no tracking server was started (none left running)
