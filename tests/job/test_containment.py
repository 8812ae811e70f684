"""Issue #27, items 1, 8 (the tracking CLI) and 9 (launcher, tracking and train settings): a name
that would put a run's files outside its folder, a port the tracking CLI cannot use, and a duration or
count below what works are one line each, through the real entry points, before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, job, tiny_job

from polypythia.config.jobconfig import check_folder_name, job_config
from polypythia.errors import ConfigError
from polypythia.train.distributed import RENDEZVOUS_ENV


def quick(home: Path, *args: str, module: str | None = None) -> subprocess.CompletedProcess:
    """``launch.py args`` (or ``python -m module args``) with ``POLYPYTHIA_HOME=home``, expected to stop at once."""
    env = {k: v for k, v in os.environ.items() if k not in (*RENDEZVOUS_ENV, "MLFLOW_TRACKING_URI")}
    env["POLYPYTHIA_HOME"] = str(home)
    command = ["-m", module] if module else ["launch.py"]
    return subprocess.run(
        [sys.executable, *command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def one_line(out: subprocess.CompletedProcess, *fragments: str) -> str:
    err = out.stderr.strip()
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    assert "\n" not in err and err.startswith("polypythia: error: ") and err.endswith("."), err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---------------------------------------------------------------------------------------------
# item 1: names that become paths stay under their folder


@pytest.mark.parametrize(
    "key, value",
    [
        ("study", ".."),
        ("study", "."),
        ("study", "a/b"),
        ("study", ""),
        ("study", "/abs"),
        ("study", "x\0y"),
        ("model__name", "../../../../x/pwn"),
        ("model__name", ".."),
        ("model__name", "a/b"),
        ("model__name", ""),
    ],
)
def test_a_name_that_leaves_its_folder_is_one_error(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"{key.replace('__', '.')} must be a plain name .*got ") as caught:
        tiny_job(tmp_path, tmp_path / "cache", **{key: value})
    assert "\n" not in str(caught.value) and str(caught.value).endswith(".")


@pytest.mark.parametrize("name", ["pythia-seeds", "v1.2", "..x", "a..b", "tiny_2", "Stab ility"])
def test_plain_names_are_fine(name):
    check_folder_name("study", name)


def test_the_run_folder_is_checked_to_lie_in_its_study_folder(tmp_path):
    cfg = tiny_job(tmp_path, tmp_path / "cache")
    assert os.path.dirname(cfg.run_dir) == os.path.join(cfg.runs_dir, cfg.study)
    cfg.study = ".."  # past the name check (a config changed after validation): the second line still holds
    with pytest.raises(ConfigError, match=r"The run folder .* would lie outside runs_dir="):
        cfg.check_run_dir()


def test_a_traversing_model_name_writes_nothing_outside_through_launch_py(tmp_path):
    """``launch.py -m model=tiny budget=smoke 'model.name=../../../../<dir>/pwn'`` wrote checkpoints,
    ``run.lock`` and the JSON records under ``<dir>/pwn-seed1/`` and exited 0."""
    target = tmp_path / "outside"
    home = tmp_path / "home"
    out = quick(home, "-m", "model=tiny", "budget=smoke", f"model.name=../../../..{target}/pwn")
    one_line(out, "Job #0: model.name must be a plain name", "got '../../../..")
    assert not target.exists() and not (home / "runs").exists()
    assert "MLflow" not in out.stdout and "Ray" not in out.stdout


# ---------------------------------------------------------------------------------------------
# item 9: durations and counts below what works


@pytest.mark.parametrize(
    "key, value, match",
    [
        (
            "launcher__stall_timeout_s",
            0.001,
            r"launcher\.stall_timeout_s must be at least 5 \(or 0 for off\), got 0\.001: "
            r"a job reports its progress at most once a second",
        ),
        ("launcher__stall_timeout_s", 4.9, r"launcher\.stall_timeout_s must be at least 5"),
        ("launcher__stall_timeout_s", float("inf"), r"launcher\.stall_timeout_s must be at least 5"),
        (
            "tracking__flush_interval_s",
            0.001,
            r"tracking\.flush_interval_s must be at least 0\.1, got 0\.001: .*CPU core",
        ),
        ("train__threads", 0, r"train\.threads must be at least 1, got 0: .*null"),
        (
            "data__vocab_size",
            -3,
            r"data\.vocab_size must be at least 258, got -3: the embedded tokenizer is byte-level",
        ),
        ("train__loss_ceiling_steps", 0, r"train\.loss_ceiling_steps must be at least 1"),
        ("train__valid_max_rows", 0, r"train\.valid_max_rows must be at least 1"),
        ("train__eval_limit_items", 0, r"train\.eval_limit_items must be at least 1, got 0: .*null for every item"),
        ("train__peak_tflops", -5.0, r"train\.peak_tflops must be above 0, got -5\.0"),
        (
            "launcher__num_cpus_per_job",
            0.00001,
            r"launcher\.num_cpus_per_job must be a multiple of 0\.0001 .*got 1e-05",
        ),
        ("launcher__num_gpus_per_job", 0.33333, r"launcher\.num_gpus_per_job must be a multiple of 0\.0001"),
    ],
)
def test_a_duration_or_count_below_what_works_is_one_error(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match) as caught:
        job_config(job(tmp_path, **{key: value}))
    assert "\n" not in str(caught.value) and str(caught.value).endswith(".")


@pytest.mark.parametrize(
    "key, value",
    [
        ("launcher__stall_timeout_s", 0.0),
        ("launcher__stall_timeout_s", 5.0),
        ("tracking__flush_interval_s", 0.1),
        ("data__vocab_size", 258),
        ("train__threads", None),
        ("train__threads", 1),
        ("train__eval_limit_items", None),
        ("train__peak_tflops", None),
        ("launcher__num_cpus_per_job", 0.5),
        ("launcher__num_cpus_per_job", 2.25),
        ("launcher__num_cpus_per_job", 0.0001),
    ],
)
def test_the_bounds_themselves_are_fine(tmp_path, key, value):
    job_config(job(tmp_path, **{key: value}))


def test_a_stall_timeout_below_the_reporting_interval_is_refused_by_launch_py(tmp_path):
    """``launcher.stall_timeout_s=0.001`` killed every job as stalled."""
    out = quick(tmp_path, "-m", "model=tiny", "budget=smoke", "launcher.stall_timeout_s=0.001")
    one_line(out, "Job #0: launcher.stall_timeout_s must be at least 5 (or 0 for off), got 0.001")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow").exists()


# ---------------------------------------------------------------------------------------------
# item 8: the tracking CLI


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["start", "--port", "99999"], "port must be a TCP port from 1 to 65535 (or 0 for any free port), got 99999"),
        (["start", "--port", "0", "--host", "nosuch.invalid"], "cannot listen on nosuch.invalid"),
    ],
)
def test_the_tracking_cli_refuses_what_it_cannot_serve_in_one_line(tmp_path, args, fragment):
    """``python -m polypythia.tracking.client start --port 99999`` was an OverflowError traceback."""
    out = quick(tmp_path, *args, module="polypythia.tracking.client")
    one_line(out, fragment)
    assert not (tmp_path / "mlflow").exists()


def test_the_tracking_cli_names_a_folder_it_cannot_create(tmp_path):
    (tmp_path / "file").write_text("x")
    out = quick(
        tmp_path,
        "start",
        "--port",
        "0",
        "--dir",
        str(tmp_path / "file" / "mlflow"),
        module="polypythia.tracking.client",
    )
    one_line(out, f"folder {tmp_path / 'file' / 'mlflow'} cannot be created (Not a directory); give --dir")


# ---------------------------------------------------------------------------------------------
# item 4: a Ray address held by a program that is not Ray


@pytest.fixture
def not_ray(tmp_path):
    """``python -m http.server`` on a free loopback port: answers TCP, speaks HTTP/1, not Ray's gRPC."""
    from polypythia.net import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import socket
        import time

        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def test_an_address_that_is_not_ray_is_told_apart(not_ray):
    from polypythia.runtime import raysetup

    assert raysetup.gcs_problem(not_ray) == "it does not speak gRPC, Ray's protocol"
    with pytest.raises(
        ConfigError,
        match=rf"The program at launcher\.address={not_ray} is not a Ray cluster's head "
        r"\(it does not speak gRPC, Ray's protocol\); give launcher\.address the address",
    ):
        raysetup.check_reachable(not_ray)


def test_a_sweep_pointed_at_a_program_that_is_not_ray_fails_in_one_line(tmp_path, not_ray):
    """``launcher.address`` at a port held by ``python -m http.server`` printed connection warnings for more
    than 120 s and never failed (the subprocess timeout below is the hang's guard)."""
    out = quick(tmp_path, "-m", "model=tiny", "budget=smoke", f"launcher.address={not_ray}")
    one_line(out, f"launcher.address={not_ray} is not a Ray cluster's head")
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / "runs").exists()  # nothing started ...
    assert not (tmp_path / "cache").exists()  # ... or built


# ---------------------------------------------------------------------------------------------
# item 6: the process group listens on the address its ranks meet at, not on every interface


def test_the_rendezvous_store_listens_on_master_addr_only(monkeypatch):
    import psutil

    from polypythia.net import free_port
    from polypythia.train import distributed

    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    store = distributed.rendezvous_store(0, 1)
    store.set("k", "v")
    listening = {
        c.laddr.ip
        for c in psutil.Process().net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }
    assert listening == {"127.0.0.1"} and store.get("k") == b"v"
    del store


def test_gloo_is_bound_to_the_interface_towards_the_master(monkeypatch):
    from polypythia.train import distributed

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    loopback = distributed.interface_of("127.0.0.1")
    assert loopback  # "lo" on Linux, "lo0" on macOS
    distributed.bind_gloo_near("127.0.0.1")
    assert os.environ["GLOO_SOCKET_IFNAME"] == loopback
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # the user's choice stands
    distributed.bind_gloo_near("127.0.0.1")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"
    assert distributed.local_address_towards("localhost") in ("127.0.0.1", "::1")
