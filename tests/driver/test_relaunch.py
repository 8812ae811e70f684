"""Launching a run again: same config or refused, one job per run folder, a finished run stays
finished, and the run folder's records are written atomically and read with clear errors."""

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
from helpers import REPO, tiny_job
from mlflow.tracking import MlflowClient

from polypythia import runfolder
from polypythia.errors import ConfigError, TrackingError
from polypythia.files import FileLock
from polypythia.job import mlflowrun
from polypythia.job import run as job

QUIET = {"tracking__system_metrics": False, "train__eval_every_checkpoint": False, "train__threads": 1}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, mlflow_uri, cache_dir):
    """One tiny run trained to the end in this process, logged to the session's MLflow server."""
    home = tmp_path_factory.mktemp("home")
    study = f"relaunch-{uuid.uuid4().hex[:8]}"
    cfg = tiny_job(home, cache_dir, study=study, **QUIET)
    try:
        summary = job.run(cfg, tracking_uri=mlflow_uri)
    finally:
        job.teardown()
    return home, cfg, summary


def same_run(finished_run, cache_dir, **overrides):
    home, cfg, _ = finished_run
    return tiny_job(home, cache_dir, study=cfg.study, **{**QUIET, **overrides})


def test_a_relaunch_with_another_training_config_is_refused_before_anything_starts(finished_run, mlflow_uri, cache_dir):
    home, cfg, summary = finished_run
    assert (
        json.loads((home / "runs" / cfg.study / "tiny-seed1" / "run_config.json").read_text())["budget"]["steps"] == 6
    )
    with pytest.raises(ConfigError, match=r"budget\.steps=1000 \(was 6\)\); .*another study=.*delete .*tiny-seed1"):
        runfolder.check_relaunch(same_run(finished_run, cache_dir, budget__steps=1000))
    # what does not change the training may change
    runfolder.check_relaunch(
        same_run(
            finished_run,
            cache_dir,
            tracking__flush_interval_s=9.0,
            launcher__workers_per_run=2,
            launcher__progress=False,
            budget__micro_batch_size=1,
            train__threads=2,
            train__fault__kill_at_step=5,
            train__evaluate_after_training=True,
            data__cache_dir=str(home / "elsewhere"),
        )
    )

    env = {**os.environ, "POLYPYTHIA_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_uri}
    started = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "-m",
            "seed=1,2",
            "model=tiny",
            "budget=smoke",
            "budget.steps=1000",
            f"study={cfg.study}",
            f"data.cache_dir={cache_dir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(f"refused launch: {time.monotonic() - started:.1f} s")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("polypythia: error:")]
    assert len(errors) == 1 and "Job #0: Run " in errors[0] and "budget.steps=1000 (was 6)" in errors[0], out.stderr
    assert "MLflow tracking server" not in out.stdout  # nothing started
    assert not (home / "runs" / cfg.study / "tiny-seed2").exists()
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.study).experiment_id])
    assert [r.info.run_id for r in runs] == [summary["run_id"]]
    assert runs[0].data.params["budget.steps"] == "6" and runs[0].info.status == "FINISHED"


def test_a_second_job_of_the_same_run_stops_at_once_naming_the_owner(tmp_path, mlflow_uri, cache_dir):
    cfg = tiny_job(tmp_path, cache_dir, **QUIET)
    lock_file = tmp_path / "runs" / cfg.study / cfg.run_name / "run.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom polypythia.files import FileLock\n"
            "assert FileLock(sys.argv[1]).try_acquire()\nprint('held', flush=True)\ntime.sleep(120)",
            str(lock_file),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = rf"in use by another job \(pid {holder.pid} on \S+ since .*\); wait for that job to end"
        with pytest.raises(runfolder.RunInUseError, match=owner):  # the launch's check, before anything starts
            runfolder.check_relaunch(cfg)
        started = time.monotonic()
        with pytest.raises(runfolder.RunInUseError, match=owner):  # a job that starts anyway
            job.run(cfg, tracking_uri=mlflow_uri)
        assert time.monotonic() - started < 5
        assert sorted(p.name for p in lock_file.parent.iterdir()) == ["run.lock"]  # no MLflow run, no checkpoint
    finally:
        holder.kill()
        holder.wait()
    with runfolder.claim(lock_file.parent):  # the lock died with its process
        with runfolder.claim(lock_file.parent):  # claims of one process nest ...
            assert not FileLock(lock_file).try_acquire()  # ... and exclude any other holder
        runfolder.check_relaunch(cfg)  # this process owns it: no conflict with itself
    released = FileLock(lock_file)
    assert released.try_acquire()
    released.release()


def test_a_failing_relaunch_never_touches_or_downgrades_a_finished_run(
    finished_run, mlflow_uri, cache_dir, monkeypatch
):
    home, cfg, summary = finished_run
    client = MlflowClient(mlflow_uri)
    run_id = summary["run_id"]
    deeper = same_run(finished_run, cache_dir, model__num_layers=3)
    with pytest.raises(ConfigError, match=r"model\.num_layers=3 \(was 2\)"):
        job.run(deeper, tracking_uri=mlflow_uri)
    record = home / "runs" / cfg.study / "tiny-seed1" / "run_config.json"
    saved = record.read_text()
    record.unlink()  # a run from before the config was recorded: its checkpoint still tells
    try:
        with pytest.raises(
            ConfigError, match=r"step6 holds another network .*model\.num_layers=3 \(the checkpoint has 2\)"
        ):
            job.run(deeper, tracking_uri=mlflow_uri)
    finally:
        record.write_text(saved)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(job, "train", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        job.run(cfg, tracking_uri=mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    assert run.data.tags["relaunch_failure"] == "RuntimeError: disk full" and "failure_reason" not in run.data.tags


def test_the_mlflow_record_is_replaced_atomically_and_read_with_a_clear_error(tmp_path, cache_dir, monkeypatch):
    cfg = tiny_job(tmp_path, cache_dir)
    run_dir = tmp_path / "runs" / cfg.study / cfg.run_name
    runfolder.write_mlflow_record(run_dir, "abc", "http://127.0.0.1:5050")

    def crash(*args):
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        runfolder.write_mlflow_record(run_dir, "def", "http://127.0.0.1:5051")
    monkeypatch.undo()
    assert runfolder.read_mlflow_record(run_dir)["run_id"] == "abc"  # the old record, whole
    assert sorted(p.name for p in run_dir.iterdir()) == ["mlflow_run.json"]  # no temporary file left
    record = run_dir / "mlflow_run.json"
    record.write_text("")
    with pytest.raises(
        ConfigError,
        match=rf"{re.escape(str(record))} should hold the id of the run's MLflow run but cannot be read "
        r"\(it is empty\); delete it",
    ):
        runfolder.check_relaunch(cfg)
    record.write_text('{"tracking_uri": "x"}')
    with pytest.raises(ConfigError, match="has no run_id"):
        runfolder.check_relaunch(cfg)


def test_a_run_deleted_in_the_mlflow_ui_is_one_clear_error(tmp_path, mlflow_uri, cache_dir):
    cfg = tiny_job(tmp_path, cache_dir, study=f"deleted-{uuid.uuid4().hex[:8]}")
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment(cfg.study)).info.run_id
    client.delete_run(run_id)
    runfolder.write_mlflow_record(cfg.run_dir, run_id, mlflow_uri)
    with pytest.raises(
        TrackingError, match=rf"run {run_id} of .* was deleted in the MLflow UI; restore it .*, or delete "
    ):
        mlflowrun.open_run(cfg, mlflow_uri, None)
    runfolder.write_mlflow_record(cfg.run_dir, "0" * 32, "http://127.0.0.1:1")
    with pytest.raises(
        TrackingError, match=r"is not on the tracking server at .* \(it was logged to http://127.0.0.1:1"
    ):
        mlflowrun.open_run(cfg, mlflow_uri, None)
    assert client.get_run(run_id).info.lifecycle_stage == "deleted"  # nothing was changed


def _without_config_records(run_dir, legacy: bool):
    """Take away ``run_config.json`` (and with ``legacy`` the config in every checkpoint's trainer state, as
    checkpoints written before they kept it); returns a function that puts everything back."""
    saved = {run_dir / "run_config.json": (run_dir / "run_config.json").read_text()}
    (run_dir / "run_config.json").unlink()
    for path in (run_dir / "checkpoints").glob("step*/trainer_state.json") if legacy else ():
        saved[path] = path.read_text()
        path.write_text(json.dumps({k: v for k, v in json.loads(saved[path]).items() if k != "config"}))

    def restore():
        for path, text in saved.items():
            path.write_text(text)

    return restore


def test_a_relaunch_without_the_config_record_is_checked_against_the_checkpoint(finished_run, mlflow_uri, cache_dir):
    """Issue #27, item 2: ``$B seed=2``, ``rm .../run_config.json``, then ``$B seed=2 budget.steps=1000`` resumed
    the 6-step run in the same MLflow run (its params still said 6; the learning rate warmed up again)."""
    home, cfg, summary = finished_run
    run_dir = home / "runs" / cfg.study / "tiny-seed1"
    state = json.loads((run_dir / "checkpoints" / "step6" / "trainer_state.json").read_text())
    assert state["config"]["budget"]["steps"] == 6 and state["step"] == 6
    restore = _without_config_records(run_dir, legacy=False)
    try:
        runfolder.check_relaunch(same_run(finished_run, cache_dir))  # the same config: resumes
        with pytest.raises(
            ConfigError,
            match=r"has no run_config\.json, and its newest checkpoint step6 was trained with "
            r"another training configuration \(budget\.warmup_fraction=0\.5 \(was 0\.01\)\)",
        ):
            runfolder.check_relaunch(same_run(finished_run, cache_dir, budget__warmup_fraction=0.5))  # the schedule too
        env = {**os.environ, "POLYPYTHIA_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_uri}
        out = subprocess.run(
            [
                sys.executable,
                "launch.py",
                "-m",
                "seed=1",
                "model=tiny",
                "budget=smoke",
                "budget.steps=1000",
                f"study={cfg.study}",
                f"data.cache_dir={cache_dir}",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("polypythia: error:")]
        assert len(errors) == 1 and "Job #0: Run " in errors[0] and "has no run_config.json" in errors[0], out.stderr
        assert "budget.steps=1000 (was 6)" in errors[0] and "MLflow tracking server" not in out.stdout
        assert not (run_dir / "run_config.json").exists()  # nothing written
    finally:
        restore()
    run = MlflowClient(mlflow_uri).get_run(summary["run_id"])
    assert run.data.params["budget.steps"] == "6" and run.info.status == "FINISHED"


def test_a_run_older_than_both_records_is_checked_against_its_mlflow_params(finished_run, mlflow_uri, cache_dir):
    """A folder whose checkpoints predate the config in the trainer state, without ``run_config.json``: the
    launch cannot tell, so the job compares its MLflow run's params before it changes anything."""
    home, cfg, summary = finished_run
    run_dir = home / "runs" / cfg.study / "tiny-seed1"
    before = MlflowClient(mlflow_uri).get_run(summary["run_id"]).data
    restore = _without_config_records(run_dir, legacy=True)
    try:
        longer = same_run(finished_run, cache_dir, budget__steps=1000)
        runfolder.check_relaunch(longer)  # nothing to compare with here ...
        assert not runfolder.config_known(longer)
        with pytest.raises(
            ConfigError,
            match=rf"has no run_config\.json, and its MLflow run {summary['run_id']} .* was "
            r"trained with another training configuration \(budget\.steps='1000' \(was '6'\)\)",
        ):
            job.run(longer, tracking_uri=mlflow_uri)  # ... the job's MLflow run can
        assert not (run_dir / "run_config.json").exists()
        params = MlflowClient(mlflow_uri).get_run(summary["run_id"]).data.params
        runfolder.check_mlflow_params(
            same_run(finished_run, cache_dir), params, summary["run_id"]
        )  # the same config passes
    finally:
        restore()
    run = MlflowClient(mlflow_uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and (run.data.tags, run.data.params) == (
        before.tags,
        before.params,
    )  # untouched
