"""The sweep's stall watchdog (``launcher.stall_timeout_s``) and interruptions (Ctrl-C, SIGTERM):
a hung job is killed, retried and failed as stalled; an interrupted sweep leaves no MLflow run RUNNING."""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from helpers import REPO
from mlflow.tracking import MlflowClient

from polypythia.driver import watchdog
from polypythia.train.distributed import RENDEZVOUS_ENV


def _env(tmp_path, uri):
    env = {**os.environ, "POLYPYTHIA_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": uri}
    for key in RENDEZVOUS_ENV:
        env.pop(key, None)
    return env


def _runs(client, study):
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if r.data.tags.get("polypythia.kind") == "sweep"]
    return parents, [r for r in runs if r.data.tags.get("polypythia.kind") == "job"]


# -- the decision, without Ray -------------------------------------------------------------------


def test_a_running_job_without_a_report_for_the_timeout_is_stalled():
    row = {"state": "running", "updated": 100.0}
    assert watchdog.stalled(row, now=110.0, timeout_s=10)
    assert not watchdog.stalled(row, now=109.0, timeout_s=10)
    assert not watchdog.stalled(row, now=1e9, timeout_s=0)  # 0: off
    for state in ("pending", "finished", "failed", "stalled", "retrying"):
        assert not watchdog.stalled({**row, "state": state}, now=1e9, timeout_s=10)
    assert not watchdog.stalled({"state": "running"}, now=1e9, timeout_s=10)  # never reported


def test_the_stall_report_shows_the_last_lines_of_the_jobs_log(tmp_path):
    log_file = tmp_path / "job.log"
    log_file.write_text("".join(f"line {i}\n" for i in range(20)))
    config = {"handlers": {"console": {"class": "logging.StreamHandler"}, "file": {"filename": str(log_file)}}}
    assert watchdog.last_lines(config, {}, n=3) == ["line 17", "line 18", "line 19"]
    row = {"state": "running", "step": 4, "total": 6}
    assert watchdog.last_lines(None, row) == ["last report: state running step 4/6"]


def test_the_hang_fault_is_a_check_of_the_config():
    from polypythia.config.schema import FaultConfig, LauncherConfig
    from polypythia.errors import ConfigError

    with pytest.raises(ConfigError, match="hang_at_step"):
        FaultConfig(hang_at_step=0).check()
    with pytest.raises(ConfigError, match="stall_timeout_s"):
        LauncherConfig(stall_timeout_s=-1).check()


# -- through the launcher ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow  # long: runs in make test-slow (CI runs both)
def test_a_hung_job_is_killed_retried_and_failed_as_stalled(tmp_path, mlflow_uri, cache_dir):
    study = f"stall-{uuid.uuid4().hex[:8]}"
    start = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "-m",
            "seed=1",
            "model=tiny",
            "budget=smoke",
            f"study={study}",
            f"data.cache_dir={cache_dir}",
            "train.fault.hang_at_step=4",
            "launcher.stall_timeout_s=8",
            "launcher.max_retries=1",
        ],
        cwd=REPO,
        env=_env(tmp_path, mlflow_uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert text.count("[watchdog]") == 2, text[-3000:]  # the first attempt and its retry
    assert "stalled (no progress for 8 s" in text and "retrying it" in text and "failed after 2 stall(s)" in text
    assert "stalled: no progress for 8 s" in out.stdout  # the sweep's outcome
    parents, children = _runs(MlflowClient(mlflow_uri), study)
    assert [c.info.status for c in children] == ["FAILED"]
    assert children[0].data.tags["failure_reason"] == "stalled"
    assert [p.info.status for p in parents] == ["FAILED"]
    print(f"stall test took {time.time() - start:.0f} s")


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_sweep_stops_in_one_line_and_leaves_no_run_running(tmp_path, mlflow_uri, cache_dir, signum):
    study = f"interrupt-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_uri)
    with open(tmp_path / "out.txt", "w") as stdout, open(tmp_path / "err.txt", "w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "launch.py",
                "-m",
                "seed=1",
                "model=tiny",
                "budget=smoke",
                f"study={study}",
                f"data.cache_dir={cache_dir}",
                "train.fault.hang_at_step=2",
                "launcher.stall_timeout_s=0",
            ],
            cwd=REPO,
            env=_env(tmp_path, mlflow_uri),
            stdout=stdout,
            stderr=stderr,
        )
        try:
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:  # until the job has logged a step
                _, children = _runs(client, study)
                if children and client.get_metric_history(children[0].info.run_id, "train/loss"):
                    break
                time.sleep(1)
            assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
            proc.send_signal(signum)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err, err[-3000:]
    assert (out + err).count("polypythia: interrupted") == 1
    parents, children = _runs(client, study)
    assert [c.info.status for c in children] == ["KILLED"]
    assert children[0].data.tags["failure_reason"] == "interrupted"
    assert [p.info.status for p in parents] == ["KILLED"]
    assert parents[0].data.tags["failure_reason"] == "interrupted"


def test_only_the_named_runs_still_running_are_closed_with_their_reason():
    from types import SimpleNamespace as NS

    class Page(list):
        token = None

    class Client:
        def __init__(self):
            self.calls = []

        def get_run(self, run_id):
            return NS(info=NS(experiment_id="7"))

        def search_runs(self, experiments, filter_string, max_results, page_token):
            assert experiments == ["7"] and "parent" in filter_string
            return Page(
                [
                    NS(info=NS(run_id=f"id-{name}", run_name=name, status=status), data=NS(tags=tags))
                    for name, status, tags in (
                        ("a", "RUNNING", {}),
                        ("b", "FINISHED", {}),
                        ("c", "RUNNING", {}),
                        ("d", "RUNNING", {}),
                        ("e", "FAILED", {"failure_reason": "x"}),
                        ("f", "FAILED", {"failure_reason": "KeyboardInterrupt: "}),
                    )
                ]
            )

        def set_tag(self, run_id, key, value):
            self.calls.append(("tag", run_id, key, value))

        def set_terminated(self, run_id, status):
            self.calls.append(("end", run_id, status))

    client = Client()
    watchdog.close_open_runs(
        client,
        "parent",
        {
            "a": ("KILLED", "interrupted"),
            "b": ("FAILED", "x"),
            "c": ("FAILED", "stalled"),
            "e": ("KILLED", "interrupted"),
            "f": ("KILLED", "interrupted"),
        },
    )
    assert client.calls == [
        ("tag", "id-a", "failure_reason", "interrupted"),
        ("end", "id-a", "KILLED"),
        ("tag", "id-c", "failure_reason", "stalled"),
        ("end", "id-c", "FAILED"),
        ("tag", "id-f", "failure_reason", "interrupted"),
        ("end", "id-f", "KILLED"),
    ]
