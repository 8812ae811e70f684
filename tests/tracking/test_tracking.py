"""The tracking path against a real MLflow server: outages, restarts at the same address, one
server per folder, reading back over HTTP; and a job's MLflow run found again by its id."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO, tiny_job
from mlflow.tracking import MlflowClient

from polypythia import runfolder
from polypythia.errors import TrackingError
from polypythia.job import mlflowrun
from polypythia.tracking import client as tracking
from polypythia.tracking import server as tracking_server

pytestmark = pytest.mark.integration


@pytest.fixture
def own_server(tmp_path):
    """A server this test may stop and start again on the same port."""
    server_dir = tmp_path / "mlflow"
    uri = tracking.start_server(server_dir, port=0)
    yield server_dir, uri
    tracking.stop_server(server_dir)


def new_run(uri):
    client = MlflowClient(uri)
    exp = tracking.experiment_id(client, "tracking-test")
    return client, client.create_run(exp).info.run_id


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def mlflow_servers_of(server_dir: Path) -> list[int]:
    """The pids of every `mlflow server` process serving the database in ``server_dir``."""
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and tracking_server.serves(int(p.name), server_dir)
    ]


def test_server_restart_mid_run_loses_and_duplicates_nothing(own_server):
    server_dir, uri = own_server
    client, run_id = new_run(uri)
    logger = tracking.MetricsLogger(uri, run_id, flush_interval_s=0.2, max_outage_s=120)
    for step in range(1, 41):
        logger.log(step, {"train/loss": 10.0 / step, "train/lr": 1e-3})
        time.sleep(0.02)
        if step == 15:
            logger.flush()
            assert tracking.stop_server(server_dir)
            assert not tracking.is_healthy(uri) and mlflow_servers_of(server_dir) == []
            assert tracking_server.read_state(server_dir) == {
                "pid": None,
                "uri": uri,
                "host": "127.0.0.1",
                "port": int(uri.rsplit(":", 1)[1]),
            }
        if step == 30:  # steps 16-30 were logged while the server was away
            assert wait_for(lambda: logger.waiting)  # what a progress display can show
            # started again, twice at once, as `tracking start` does (preferring port 5050): one
            # server, back at the recorded address
            uris: list[str] = []

            def start_one(uris: list[str] = uris) -> None:
                uris.append(tracking.start_server(server_dir))

            starts = [threading.Thread(target=start_one) for _ in range(2)]
            for t in starts:
                t.start()
            for t in starts:
                t.join()
            assert uris == [uri, uri]
            assert mlflow_servers_of(server_dir) == [tracking_server.read_state(server_dir)["pid"]]
    logger.close()
    for key in ("train/loss", "train/lr"):
        steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, 41)), key


def test_server_that_stays_away_fails_the_job_with_a_clear_message(own_server):
    server_dir, uri = own_server
    client, run_id = new_run(uri)
    logger = tracking.MetricsLogger(uri, run_id, flush_interval_s=0.1, max_outage_s=2)
    tracking.stop_server(server_dir)
    logger.log(1, {"train/loss": 1.0})
    assert wait_for(lambda: logger.waiting)
    with pytest.raises(TrackingError, match=r"has not accepted metrics for 2 s.*tracking.max_outage_s"):
        logger.close()


def test_unreachable_configured_server_is_an_error_before_jobs():
    with pytest.raises(TrackingError, match="does not answer"):
        tracking.resolve_tracking_uri("http://127.0.0.1:9", "/nonexistent", "127.0.0.1", 0)


def test_server_is_reused_and_read_back_over_http(own_server, tmp_path):
    server_dir, uri = own_server
    assert tracking.start_server(server_dir) == uri  # reused, not a second server
    assert tracking.running_server(server_dir) == uri
    client, run_id = new_run(uri)
    client.log_text(run_id, "model:\n  name: tiny\n", "config/resolved.yaml")
    logger = tracking.MetricsLogger(uri, run_id, flush_interval_s=0.1)
    logger.log(1, {"train/loss": 2.5})
    logger.close()
    reader = MlflowClient(uri)
    assert [a.path for a in reader.list_artifacts(run_id, "config")] == ["config/resolved.yaml"]
    local = reader.download_artifacts(run_id, "config/resolved.yaml", str(tmp_path))
    assert "tiny" in open(local).read()
    assert reader.get_metric_history(run_id, "train/loss")[0].value == 2.5


def test_stop_leaves_alone_a_process_that_now_has_the_recorded_pid(tmp_path):
    server_dir = tmp_path / "mlflow"
    server_dir.mkdir()
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        (server_dir / "server.json").write_text(json.dumps({"pid": stranger.pid, "uri": "http://127.0.0.1:9"}))
        assert tracking.running_server(server_dir) is None
        assert not tracking.stop_server(server_dir)
        time.sleep(0.2)
        assert stranger.poll() is None  # not signalled
        assert tracking_server.read_state(server_dir)["pid"] is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_corrupt_server_record_is_one_clear_line(tmp_path, capsys, monkeypatch):
    server_dir = tmp_path / "mlflow"
    server_dir.mkdir()
    (server_dir / "server.json").write_text('{"pid": 12')
    message = rf"{server_dir / 'server.json'} should hold the address and pid of the folder's MLflow server but cannot be read"
    with pytest.raises(
        TrackingError, match=message.replace(".", r"\.") + r" \(.*\); delete it and start the server again"
    ):
        tracking.running_server(server_dir)
    with pytest.raises(SystemExit) as exited:
        tracking.main(["status", "--dir", str(server_dir)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("polypythia: error: ") and "server.json" in err[0]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("POLYPYTHIA_HOME", str(tmp_path))
    assert tracking.default_tracking_uri() is None  # the analysis and evaluation tools start anyway, warned


def test_a_relaunch_finds_its_mlflow_run_by_id_on_the_servers_new_address(tmp_path, mlflow_uri, cache_dir):
    cfg = tiny_job(tmp_path, cache_dir, study="moved-server")
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(tracking.experiment_id(client, cfg.study), run_name=cfg.run_name).info.run_id
    runfolder.write_mlflow_record(cfg.run_dir, run_id, "http://127.0.0.1:5050")  # where the server was before
    opened = mlflowrun.open_run(cfg, mlflow_uri, None)
    assert (opened.run_id, opened.resumed, opened.was_finished) == (run_id, True, False)
    assert runfolder.read_mlflow_record(cfg.run_dir) == {"run_id": run_id, "tracking_uri": mlflow_uri}
    assert len(client.search_runs([client.get_experiment_by_name(cfg.study).experiment_id])) == 1


def _session(leader: int) -> list[int]:
    """The live processes of the session ``leader`` started (the server is started as a session leader)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return found


def test_a_sigkilled_servers_workers_are_reused_reported_and_stopped(tmp_path):
    """Issue #27, item 3: a SIGKILLed ``mlflow server`` left its uvicorn workers serving the database on
    the old port; ``start`` then started a second server on the same database, ``stop`` said "stopped"
    and ``status`` said "not running" while the old workers kept serving."""
    server_dir = tmp_path / "mlflow"

    def cli(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "polypythia.tracking.client", action, "--dir", str(server_dir), "--port", "0"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
        )

    started = cli("start")
    assert started.returncode == 0, started.stderr[-2000:]
    uri = started.stdout.split("MLflow UI: ")[1].strip()
    leader = tracking_server.read_state(server_dir)["pid"]
    try:
        os.kill(leader, signal.SIGKILL)
        assert wait_for(lambda: leader not in _session(leader))
        workers = _session(leader)
        assert workers and tracking.is_healthy(uri)  # the finding: the workers serve on
        status = cli("status")
        assert (status.returncode, status.stdout.strip()) == (0, f"running at {uri}")
        again = cli("start")
        assert again.stdout.strip() == f"MLflow UI: {uri}", again.stderr[-2000:]
        assert mlflow_servers_of(server_dir) == [] and sorted(_session(leader)) == sorted(workers)  # no second server
        stopped = cli("stop")
        assert stopped.stdout.strip() == "stopped", stopped.stderr[-2000:]
        assert wait_for(lambda: _session(leader) == [], 15) and not tracking.is_healthy(uri)
        status = cli("status")
        assert (status.returncode, status.stdout.strip()) == (1, "not running")
    finally:
        try:
            os.killpg(leader, signal.SIGKILL)  # whatever a failed assertion left
        except OSError:
            pass
