"""Attaching a sweep to a Ray cluster started separately (`ray start --head`), here on loopback."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from helpers import child_runs, launch
from mlflow.tracking import MlflowClient

from polypythia.net import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def ray_head(tmp_path):
    port = free_port()
    short_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
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
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={short_tmp}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "ray-head.log").read_text()
                time.sleep(0.5)
        time.sleep(3)  # the raylet registers after the GCS listens
        yield f"127.0.0.1:{port}"
    finally:
        _kill_group(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(head.pid, signal.SIGKILL)  # anything of that cluster still alive in its session
        head.wait()
        log.close()
        shutil.rmtree(short_tmp, ignore_errors=True)


def _kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@pytest.mark.slow  # long: runs in make test-slow (CI runs both)
def test_two_seed_sweep_on_an_existing_cluster(tmp_path, ray_head, mlflow_uri, cache_dir):
    study = f"cluster-{uuid.uuid4().hex[:8]}"
    out = launch(
        tmp_path,
        "-m",
        "seed=1,2",
        "model=tiny",
        "budget=smoke",
        f"launcher.address={ray_head}",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
        uri=mlflow_uri,
        env_extra={"RAY_AUTH_MODE": "disabled"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, children = child_runs(MlflowClient(mlflow_uri), study)
    assert sorted(c.data.tags["seed"] for c in children) == ["1", "2"]
    assert all(c.info.status == "FINISHED" for c in children)
    # the cluster's workers do not share the driver's environment: paths were resolved by the driver
    assert all(c.data.tags["run_dir"].startswith(str(tmp_path)) for c in children)


def test_unreachable_cluster_is_a_clear_error(tmp_path):
    out = launch(
        tmp_path, "-m", "seed=1", "model=tiny", "budget=smoke", f"launcher.address=127.0.0.1:{free_port()}", timeout=300
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Cannot connect to the Ray cluster" in out.stderr
    assert not (tmp_path / "mlflow").exists()  # no tracking server was started (none left running)
