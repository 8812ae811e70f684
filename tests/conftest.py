"""Shared fixtures: the user's state kept out of every test, a session-wide data cache and a real
MLflow server on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# The user's own settings that would point a test at the user's state (a tracking server, a Ray
# cluster, a POLYPYTHIA_HOME, compiled extensions, Hugging Face caches, allocator tuning). Every test
# starts without them; a test that wants one sets it itself (monkeypatch.setenv, or a child's env).
USER_ENV = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "POLYPYTHIA_HOME", "TORCH_EXTENSIONS_DIR", "GLIBC_TUNABLES")
USER_ENV_PREFIXES = ("HF_", "MALLOC_")


def _user_env_keys() -> list[str]:
    return [key for key in os.environ if key in USER_ENV or key.startswith(USER_ENV_PREFIXES)]


@pytest.fixture(scope="session", autouse=True)
def _without_user_state(tmp_path_factory):
    """For the whole session (session- and module-scoped fixtures included): none of the user's
    settings above, and a ``POLYPYTHIA_HOME`` of the session's own, so that nothing reads or writes
    the default home (``.polypythia/`` where pytest runs: the one ``make demo`` filled)."""
    with pytest.MonkeyPatch.context() as patch:
        for key in _user_env_keys():
            patch.delenv(key)
        patch.setenv("POLYPYTHIA_HOME", str(tmp_path_factory.mktemp("session-home")))
        yield


@pytest.fixture(autouse=True)
def _own_home(tmp_path_factory, monkeypatch):
    """Each test: its own ``POLYPYTHIA_HOME`` (empty; no local tracking server recorded in it), and
    none of the user's settings, whatever an earlier test left in the environment."""
    for key in _user_env_keys():
        monkeypatch.delenv(key)
    monkeypatch.setenv("POLYPYTHIA_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One embedded corpus + tokenizer for the whole session (built on first use)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A real ``mlflow server`` (SQLite backend) on 127.0.0.1, stopped at the end of the session."""
    from polypythia.tracking import client as tracking

    server_dir = tmp_path_factory.mktemp("mlflow")
    uri = tracking.start_server(server_dir, port=0)
    yield uri
    tracking.stop_server(server_dir)


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A fresh ``mlflow server`` for one test (SQLite backend in tmp_path, a free loopback port); stopped afterwards."""
    from polypythia.tracking import client as tracking

    server_dir = tmp_path / "mlflow"
    uri = tracking.start_server(server_dir, port=0)
    try:
        yield uri
    finally:
        tracking.stop_server(server_dir)
