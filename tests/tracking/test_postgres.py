"""The tracking server on PostgreSQL: a real server that the test starts (PostgreSQL's own initdb and
pg_ctl, scripts/pg_throwaway.py), MLflow on it over HTTP, and its bad inputs in one line each."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, tiny_job

from polypythia.errors import ConfigError, TrackingError
from polypythia.net import free_port
from polypythia.tracking import client as tracking
from polypythia.tracking import server as tracking_server
from polypythia.tracking import store as trackingstore

sys.path.insert(0, str(REPO / "scripts"))
from pg_throwaway import find_initdb, throwaway_postgres

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def postgres_uri():
    if find_initdb() is None:
        pytest.skip(
            "no PostgreSQL server binaries (initdb) on PATH or under /usr/lib/postgresql/*/bin "
            "(Debian: apt-get install postgresql)"
        )
    try:
        with throwaway_postgres() as uri:
            yield uri
    except RuntimeError as exc:
        pytest.skip(f"PostgreSQL did not start here: {exc}")


def cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "polypythia.tracking.client", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_tracking_server_runs_on_postgresql_from_the_command_line_and_from_the_config(
    postgres_uri, tmp_path, cache_dir
):
    import psycopg

    server_dir, artifacts = tmp_path / "server", tmp_path / "artifacts"
    started = cli(
        "start",
        "--dir",
        str(server_dir),
        "--port",
        "0",
        "--backend-store-uri",
        postgres_uri,
        "--artifacts-destination",
        str(artifacts),
    )
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        uri = started.stdout.strip().rsplit(" ", 1)[-1]
        state = tracking_server.read_state(server_dir)
        command = Path(f"/proc/{state['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        password = postgres_uri.split(":")[2].split("@")[0]
        assert "postgresql://polypythia@127.0.0.1" in command and password not in command  # ps shows no password
        assert password not in (server_dir / "server.json").read_text()
        client = tracking.client(uri)
        run_id = client.create_run(tracking.experiment_id(client, "lab")).info.run_id
        logger = tracking.MetricsLogger(uri, run_id, flush_interval_s=0.2)
        for step in range(1, 51):
            logger.log(step, {"train/loss": 1.0 / step})
        logger.close()
        client.log_text(run_id, "hello", "notes/a.txt")
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 51))
        assert (artifacts / "1" / run_id / "artifacts" / "notes" / "a.txt").read_text() == "hello"
        with psycopg.connect(postgres_uri) as conn, conn.cursor() as cur:  # the points are in PostgreSQL
            cur.execute("select count(*) from metrics where run_uuid = %s", (run_id,))
            assert cur.fetchone()[0] == 50
        # the same database from the config keys, as a sweep starts its server: the running one is reused ...
        cfg = tiny_job(
            tmp_path,
            cache_dir,
            tracking__dir=str(server_dir),
            tracking__backend_store_uri=postgres_uri,
            tracking__artifacts_destination=str(artifacts),
        ).tracking
        assert (
            tracking.resolve_tracking_uri(
                cfg.uri, cfg.dir, cfg.host, cfg.port, cfg.backend_store_uri, cfg.artifacts_destination
            )
            == uri
        )
        # ... and one asked for on another database is refused in one line
        with pytest.raises(
            TrackingError, match=r"serves postgresql://polypythia@127.0.0.1:\d+/mlflow, not sqlite:///.*; stop it first"
        ):
            tracking.start_server(server_dir)
    finally:
        assert cli("stop", "--dir", str(server_dir)).stdout.strip() == "stopped"
    assert not tracking.is_healthy(uri)


def test_a_postgresql_uri_that_does_not_answer_or_refuses_the_password_is_one_line(postgres_uri, tmp_path):
    port = free_port()
    wrong = postgres_uri.replace("throwaway-pw", "wrong-pw")
    for uri, expected in (
        (f"postgresql://polypythia:pw@127.0.0.1:{port}/mlflow", "does not answer"),
        (wrong, "refused the credentials of user 'polypythia'"),
    ):
        began = time.monotonic()
        out = cli("start", "--dir", str(tmp_path / "s"), "--port", "0", "--backend-store-uri", uri)
        assert out.returncode == 2, out.stdout + out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("polypythia: error: The PostgreSQL server at 127.0.0.1:"), lines
        assert expected in lines[0] and "wrong-pw" not in lines[0], lines[0]
        assert time.monotonic() - began < 30
        assert not (tmp_path / "s" / "server.json").exists()  # no server was started


def test_store_keys_are_checked_with_the_config(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"tracking.backend_store_uri=mongodb://u:\*\*\*@h/db is not a database URI"):
        tiny_job(tmp_path, cache_dir, tracking__backend_store_uri="mongodb://u:secret@h/db")
    with pytest.raises(ConfigError, match="names a running one"):
        tiny_job(
            tmp_path, cache_dir, tracking__uri="http://127.0.0.1:5000", tracking__backend_store_uri="postgresql://h/db"
        )
    assert trackingstore.command_uri("postgresql://u:s3cret@h:5432/db") == (
        "postgresql://u@h:5432/db",
        {"PGPASSWORD": "s3cret"},
    )
