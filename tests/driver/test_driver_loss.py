"""The sweep's driver dies (SIGKILL) in the middle of a study: its jobs stop with it, and the same
command again closes the dead sweep's MLflow runs, skips the finished run, resumes the other from its
checkpoint in its own MLflow run, and logs every step once (polypythia/driver/orphans.py)."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
from helpers import REPO, child_runs, launch
from mlflow.tracking import MlflowClient

STEPS, EVERY, HANG = 40, 10, 25  # seed 2 stops making progress at step 25: its last checkpoint is step 20


def wait_for(what, check, timeout_s=300, proc=None):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc is None or proc.poll() is None, f"the driver ended before {what}: {proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


@pytest.mark.integration
def test_a_killed_driver_leaves_nothing_training_and_a_relaunch_resumes_every_run_once(tmp_path, mlflow_uri, cache_dir):
    study = f"driver-{uuid.uuid4().hex[:8]}"
    args = [
        "-m",
        "seed=1,2",
        "model=tiny",
        "budget=smoke",
        f"budget.steps={STEPS}",
        f"budget.checkpoint_every_steps={EVERY}",
        "budget.log_spaced_checkpoints=false",
        "train.eval_every_checkpoint=false",
        "tracking.system_metrics=false",
        "tracking.flush_interval_s=0.5",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
    ]
    env = {**os.environ, "POLYPYTHIA_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": mlflow_uri}
    driver = subprocess.Popen(
        [sys.executable, "launch.py", *args, f"train.fault.hang_at_step={HANG}", "train.fault.hang_seeds=[2]"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = MlflowClient(mlflow_uri)

    def runs():
        exp = client.get_experiment_by_name(study)
        return {r.info.run_name: r for r in child_runs(client, study)[1]} if exp else {}

    def steps(run_id):
        return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))

    try:
        wait_for(
            "seed 1 to finish and seed 2 to log step 25",
            lambda: (
                (r := runs())
                and len(r) == 2
                and r["tiny-seed1"].info.status == "FINISHED"
                and steps(r["tiny-seed2"].info.run_id)[-1:] == [HANG]
            ),
            proc=driver,
        )
        training = [
            p for p in psutil.Process(driver.pid).children(recursive=True) if "mlflow" not in " ".join(p.cmdline())
        ]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    # nothing of the sweep trains on: the job's worker and the Ray runtime end with their driver
    ray_agents = []
    deadline = time.monotonic() + 60
    while alive := [p for p in training if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        ray_agents = [p for p in alive if p.name() in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")]
        if len(ray_agents) == len(alive) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for p in ray_agents:  # Ray's per-node agents outlive their raylet by a minute or two; they train nothing
        p.kill()
    assert not [p for p in alive if p not in ray_agents], [" ".join(p.cmdline())[:100] for p in alive]
    before = runs()
    parent = child_runs(client, study)[0][0]
    assert (
        parent.info.status == "RUNNING" and before["tiny-seed2"].info.status == "RUNNING"
    )  # what a dead driver leaves

    out = launch(tmp_path, *args, uri=mlflow_uri)  # the same command again (the fault gone: it may change)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[relaunch] tiny-seed1: already finished" in out.stdout, out.stdout[-3000:]
    resumed = [line for line in out.stdout.splitlines() if line.startswith("[relaunch] tiny-seed2: resumes")]
    assert (
        resumed
        and f"at step {HANG - HANG % EVERY} " in resumed[0]
        and f"up to {HANG}: {HANG % EVERY} step(s)" in resumed[0]
    )
    assert f"[relaunch] {parent.info.run_name}: closed (KILLED) with 1 job run(s)" in out.stdout
    assert "tiny-seed1: finished (already finished before this launch)" in out.stdout
    old = client.get_run(parent.info.run_id)
    assert old.info.status == "KILLED" and old.data.tags["failure_reason"].startswith("driver lost: its driver (pid ")
    parents, after = child_runs(client, study)
    new = next(p for p in parents if p.info.run_id != parent.info.run_id)
    assert new.info.status == "FINISHED" and len(after) == 2
    for name, run in runs().items():  # each run continued in its own MLflow run, every step logged once
        assert run.info.run_id == before[name].info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == new.info.run_id
        assert steps(run.info.run_id) == list(range(1, STEPS + 1)), name
    run_dir = tmp_path / "runs" / study / "tiny-seed2"
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == before["tiny-seed2"].info.run_id
    assert runs()["tiny-seed2"].data.tags["resumed_from_step"] == str(HANG - HANG % EVERY)


def test_a_driver_is_gone_when_its_process_ended_here_or_its_heartbeat_stopped_elsewhere(tmp_path):
    import socket

    from polypythia.driver import orphans as driverloss

    now = time.time()
    here = driverloss.driver_tags(now)
    assert driverloss.driver_gone(here, now) is None  # this very process
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    gone = driverloss.driver_gone({**here, driverloss.PID_TAG: str(ended.pid)}, now)
    assert gone == f"its driver (pid {ended.pid} on {socket.gethostname()}) has ended"
    reused = {**here, driverloss.PID_STARTED_TAG: "12.00"}  # the pid now belongs to a later process
    assert driverloss.driver_gone(reused, now).endswith("has ended")
    elsewhere = {**here, driverloss.HOST_TAG: "node-7"}
    assert driverloss.driver_gone(elsewhere, now + driverloss.STALE_S - 1) is None
    assert "has sent no heartbeat for 3" in driverloss.driver_gone(elsewhere, now + driverloss.STALE_S + 1)
    assert driverloss.driver_gone({}, now) is None  # a sweep of an older version names no driver: left alone
    for step, state in ((0, True), (10, True), (20, False)):  # step20 kept its weights only
        (tmp_path / "checkpoints" / f"step{step}" / ("state" if state else "weights")).mkdir(parents=True)
    assert driverloss.resume_step(tmp_path) == 10 and driverloss.resume_step(tmp_path / "none") == 0
    assert driverloss.Plan("resumes", "r", checkpoint_step=10, logged_step=17).lost_steps == 7
