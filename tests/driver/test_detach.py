"""A detached study: a sweep submitted as a Ray job to a real `ray start --head` (dashboard on) on
loopback; status, logs and stop are one command each, and stop leaves the runs KILLED with their reason."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from helpers import REPO, child_runs
from mlflow.tracking import MlflowClient

from polypythia.net import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def ray_head_with_dashboard(tmp_path):
    port, dashboard, agent = free_port(), free_port(), free_port()  # Ray's agent port is fixed (52365) unless given
    short_tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            "--disable-usage-stats",
            f"--temp-dir={short_tmp}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 180
        address = f"http://127.0.0.1:{dashboard}"
        while True:
            try:
                socket.create_connection(("127.0.0.1", dashboard), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "ray-head.log").read_text()
                time.sleep(0.5)
        yield address
    finally:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                pass
            try:
                head.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
        log.close()
        shutil.rmtree(short_tmp, ignore_errors=True)


def detach(*args, uri=None, home=None, timeout=360):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.update({"MLFLOW_TRACKING_URI": uri} if uri else {})
    env.update({"POLYPYTHIA_HOME": str(home)} if home else {})
    return subprocess.run(
        [sys.executable, "-m", "polypythia.driver.detach", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_detached_study_submits_at_once_and_status_logs_and_stop_are_one_command_each(
    tmp_path, ray_head_with_dashboard, mlflow_uri, cache_dir
):
    address = ray_head_with_dashboard
    study = f"detached-{uuid.uuid4().hex[:8]}"
    began = time.monotonic()
    out = detach(
        "submit",
        "--address",
        address,
        "--python",
        sys.executable,
        "--",
        "-m",
        "seed=1,2",
        "model=tiny",
        "budget=smoke",
        "budget.steps=12",
        "train.eval_every_checkpoint=false",
        "tracking.system_metrics=false",
        "train.fault.hang_at_step=4",
        "train.fault.hang_seeds=[2]",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
        uri=mlflow_uri,
        home=tmp_path,
    )
    submit_s = time.monotonic() - began
    assert out.returncode == 0, out.stderr[-3000:]
    sid = re.search(r"Ray job (polypythia-\S+) to", out.stdout).group(1)
    assert f"python -m polypythia.driver.detach stop {sid}" in out.stdout, out.stdout
    print(f"submit returned in {submit_s:.1f} s")
    client = MlflowClient(mlflow_uri)

    def runs():
        exp = client.get_experiment_by_name(study)
        return {r.info.run_name: r for r in child_runs(client, study)[1]} if exp else {}

    from ray.job_submission import JobSubmissionClient

    jobs, deadline = JobSubmissionClient(address), time.monotonic() + 400
    while not (
        (r := runs()) and r.get("tiny-seed1") and r["tiny-seed1"].info.status == "FINISHED" and "tiny-seed2" in r
    ):
        ended = jobs.get_job_status(sid).is_terminal()
        assert time.monotonic() < deadline and not ended, detach("logs", sid, "--address", address).stdout[-3000:]
        time.sleep(2)
    status = detach("status", sid, "--address", address)
    assert status.returncode == 0 and status.stdout.startswith(f"{sid}: RUNNING"), status.stdout + status.stderr
    logs = detach("logs", sid, "--address", address)
    assert "[progress] tiny-seed1: finished step 12/12" in logs.stdout, logs.stdout[-3000:]
    # the working dir went without the virtual environment (gigabytes); Ray logs the size when it uploads
    # (not when the same package is on the cluster already)
    size = re.search(r"Pushing file package '\S+' \(([\d.]+)MiB\)", out.stderr)
    assert size is None or float(size.group(1)) < 10, out.stderr[-2000:]
    assert detach("list", "--address", address).stdout.count(sid) == 1

    stopped = detach("stop", sid, "--address", address, timeout=200)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert any(line.startswith(f"{sid}: STOPPED") for line in stopped.stdout.splitlines()), stopped.stdout
    parent = child_runs(client, study)[0][0]
    after = runs()
    assert after["tiny-seed1"].info.status == "FINISHED"  # what had finished stays finished
    for run in (after["tiny-seed2"], client.get_run(parent.info.run_id)):
        assert run.info.status == "KILLED", run.info
        assert (
            run.data.tags["failure_reason"]
            == f"stopped: python -m polypythia.driver.detach stop {sid} (the study's Ray job was stopped)"
        )
    assert parent.data.tags["ray.submission_id"] == sid and parent.data.tags["driver.host"] == socket.gethostname()

    unknown = detach("status", "polypythia-nosuch", "--address", address)
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        f"polypythia: error: The Ray cluster at {address} has no job 'polypythia-nosuch'; python -m polypythia.driver.detach "
        "list shows the studies submitted to it."
    ], unknown.stderr
