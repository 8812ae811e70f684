"""Shared fixtures: a session-wide data cache and a real MLflow server on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One embedded corpus + tokenizer for the whole session (built on first use)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A real ``mlflow server`` (SQLite backend) on 127.0.0.1, stopped at the end of the session."""
    from polypythia import tracking

    server_dir = tmp_path_factory.mktemp("mlflow")
    uri = tracking.start_server(server_dir, port=0)
    yield uri
    tracking.stop_server(server_dir)


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A fresh ``mlflow server`` for one test (SQLite backend in tmp_path, a free loopback port); stopped afterwards."""
    from polypythia import tracking

    server_dir = tmp_path / "mlflow"
    uri = tracking.start_server(server_dir, port=0)
    try:
        yield uri
    finally:
        tracking.stop_server(server_dir)
