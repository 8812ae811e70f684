"""The suite never sees the user's own state: the default home a ``make demo`` filled (its run folders
and its running MLflow server), nor ``MLFLOW_TRACKING_URI``, ``RAY_ADDRESS`` and the like in the shell
(``tests/conftest.py``'s autouse fixtures).

The check copies the repository's tracked files (a clone, as CI has), plants that state in the copy's
default home the way a user's machine has it after ``make demo``, and runs a slice of the suite (a tiny
sweep, ``analysis`` and ``evaluate`` without a tracking URI) in a child pytest of the copy, from its
root, as ``make test`` runs. The planted server is a sentinel that answers ``/health`` like a live
MLflow server and records every request it gets: any request, or any change under the planted home,
means a test read or wrote the user's state. (The repository's own ``.polypythia/`` is never touched.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.integration

PLANTED_ENV = "POLYPYTHIA_TEST_PLANTED"  # set in the child pytest only; the sweep test below runs there

SENTINEL = textwrap.dedent("""
    import http.server, sys
    log = open(sys.argv[1], "a", buffering=1)
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            log.write(self.command + " " + self.path + "\\n")
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"OK")
        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
""")

SLICE = (
    "tests/test_user_state.py::test_a_tiny_sweep_uses_the_home_the_suite_gives_it",  # a tiny sweep, no tracking URI
    "tests/evaluate/test_runner.py::test_help_and_unknown_experiment",  # evaluate: "give --tracking-uri"
    "tests/analysis/test_summary_and_cli.py::test_cli_errors_exit_2_without_traceback",  # analysis
)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time (ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def copy_of_repository(dest: Path) -> Path:
    """The files git tracks (and the untracked ones it does not ignore), copied to ``dest``."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture
def planted(tmp_path):
    """A copy of the repository whose default home ``.polypythia/`` holds a run folder and the record of a
    live-looking MLflow server (the sentinel, whose command line names the folder's database as an MLflow
    server's does)."""
    user = copy_of_repository(tmp_path / "repo")
    home = user / ".polypythia"
    server_dir = home / "mlflow"
    run_dir = home / "runs" / "polypythia" / "tiny-seed1"
    run_dir.mkdir(parents=True)
    server_dir.mkdir(parents=True)
    (run_dir / "run_config.json").write_text('{"planted": true}\n')
    requests = tmp_path / "requests.log"
    requests.touch()
    sentinel = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SENTINEL,
            str(requests),
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{server_dir.resolve() / 'mlflow.db'}",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        port = int(sentinel.stdout.readline())
        uri = f"http://127.0.0.1:{port}"
        (server_dir / "server.json").write_text(
            json.dumps({"pid": sentinel.pid, "uri": uri, "host": "127.0.0.1", "port": port})
        )
        yield user, home, uri, requests
    finally:
        sentinel.kill()
        sentinel.wait(timeout=10)


def test_the_planted_server_looks_live_to_polypythia(planted):
    """The premise: without the suite's isolation, polypythia would take the planted server as the
    user's running one."""
    from polypythia.tracking import client as tracking

    user, home, uri, requests = planted
    assert tracking.running_server(home / "mlflow") == uri
    assert "GET /health" in requests.read_text()


@pytest.mark.slow  # long: runs in make test-slow (CI runs both)
def test_a_slice_of_the_suite_neither_reads_nor_writes_the_users_state(planted, tmp_path):
    user, home, uri, requests = planted
    requests.write_text("")
    before = snapshot(home)
    env = {
        **os.environ,
        PLANTED_ENV: "1",
        "MLFLOW_TRACKING_URI": uri,
        "RAY_ADDRESS": uri.removeprefix("http://"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("POLYPYTHIA_HOME", None)  # as in the user's shell: the default home, .polypythia/ in the folder
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'child'}", *SLICE],
        cwd=user,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert f"{len(SLICE)} passed" in out.stdout, out.stdout[-2000:]
    assert requests.read_text() == "", "a test talked to the user's MLflow server"
    assert snapshot(home) == before, "a test wrote into the user's default home"


@pytest.mark.skipif(not os.environ.get(PLANTED_ENV), reason="runs in the child pytest of the test above")
def test_a_tiny_sweep_uses_the_home_the_suite_gives_it(tmp_path, cache_dir):
    """A sweep with no tracking URI starts its local server in ``$POLYPYTHIA_HOME``, the test's own."""
    from polypythia.tracking import client as tracking

    home = Path(os.environ["POLYPYTHIA_HOME"])
    assert not os.environ.get("MLFLOW_TRACKING_URI") and not os.environ.get("RAY_ADDRESS")
    assert Path.cwd() == REPO  # the copy of the repository, where its default home is planted
    try:
        out = subprocess.run(
            [
                sys.executable,
                "launch.py",
                "-m",
                "seed=1",
                "model=tiny",
                "budget=smoke",
                f"data.cache_dir={cache_dir}",
                "launcher.progress=false",
            ],
            cwd=REPO,
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "tiny-seed1: finished" in out.stdout
        assert tracking.running_server(home / "mlflow") is not None
        assert (home / "runs" / "polypythia" / "tiny-seed1" / "checkpoints").is_dir()
    finally:
        tracking.stop_server(home / "mlflow")
