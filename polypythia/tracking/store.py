"""The stores behind the MLflow server that polypythia starts: its database and its artifact store.

By default the server keeps runs in a SQLite file in its folder (``<tracking.dir>/mlflow.db``) and
artifacts in ``<tracking.dir>/artifacts``. A lab shares one server on PostgreSQL
(``tracking.backend_store_uri=postgresql://user:password@host:5432/mlflow``, or ``--backend-store-uri``
of ``python -m polypythia.tracking.client start``) with an artifact store every node can reach
(``tracking.artifacts_destination``: a shared folder or ``s3://...``), as MLflow's
"remote experiment tracking" setup does (``mlflow server --backend-store-uri postgresql://...
--artifacts-destination ...``). SQLAlchemy 2.1's ``postgresql://`` needs the psycopg (3) driver
(``pip install 'polypythia[postgres]'``); ``postgresql+psycopg2://`` takes psycopg2.

Before the server starts, :func:`check_database` connects once (a 5 s limit), so a database that does
not answer, refuses the credentials or lacks the database is one sentence, not an MLflow server that
exits with a traceback in its log. The password never appears on a command line (which ``ps`` shows
to every user of the machine): the server gets the URI without it, and the password in
``PGPASSWORD``, which libpq (under psycopg 3 and psycopg2) reads when a URI has none.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from polypythia.errors import ConfigError, TrackingError

SQLITE_DATABASE = "mlflow.db"
SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy back-ends MLflow's SQL store supports
FIX = "fix tracking.backend_store_uri (or --backend-store-uri)"


def check_keys(cfg: Any) -> None:
    """The checks of a TrackingConfig's numbers and store keys, one :class:`ConfigError` sentence each."""
    if not (cfg.flush_interval_s > 0 and math.isfinite(cfg.flush_interval_s)):
        raise ConfigError(
            f"tracking.flush_interval_s must be a positive number of seconds (default 2.0), got "
            f"{cfg.flush_interval_s}; with 0 the metrics sender would keep a CPU core busy."
        )
    if not cfg.max_outage_s >= 0:
        raise ConfigError(
            f"tracking.max_outage_s must be 0 or a positive number of seconds (default 300), got {cfg.max_outage_s}."
        )
    if cfg.backend_store_uri and cfg.backend_store_uri.split(":", 1)[0].split("+")[0] not in SCHEMES:
        raise ConfigError(
            f"tracking.backend_store_uri={redact(cfg.backend_store_uri)} is not a database URI MLflow "
            "can store runs in; give postgresql://user:password@host:5432/database (or null for SQLite "
            "in tracking.dir)."
        )
    if cfg.uri and (cfg.backend_store_uri or cfg.artifacts_destination):
        raise ConfigError(
            f"tracking.backend_store_uri and tracking.artifacts_destination set up the server polypythia "
            f"starts, but tracking.uri={cfg.uri} names a running one (which has its own stores); set "
            "tracking.uri=null to start one on those stores, or drop them."
        )


def backend_uri(server_dir: str | Path, backend_store_uri: Optional[str]) -> str:
    """The server's database: ``backend_store_uri``, else SQLite in ``server_dir``."""
    return backend_store_uri or f"sqlite:///{Path(server_dir).resolve() / SQLITE_DATABASE}"


def artifacts_uri(server_dir: str | Path, artifacts_destination: Optional[str]) -> str:
    """The server's artifact store: ``artifacts_destination`` (a relative folder made absolute), else ``<dir>/artifacts``."""
    if not artifacts_destination:
        return str(Path(server_dir).resolve() / "artifacts")
    return artifacts_destination if "://" in artifacts_destination else str(Path(artifacts_destination).resolve())


def _url(uri: str):
    from sqlalchemy.engine import make_url

    return make_url(uri)


def redact(uri: str) -> str:
    """``uri`` with its password replaced by ``***`` (for messages and records)."""
    try:
        return _url(uri).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a database URL: nothing to hide in a way we can parse
        return uri.split("@")[-1] if "@" in uri else uri


def command_uri(uri: str) -> tuple[str, dict[str, str]]:
    """(the URI without its password, the environment that carries the password) for the server's process."""
    if uri.startswith("sqlite"):
        return uri, {}
    url = _url(uri)
    if url.password is None:
        return uri, {}
    from sqlalchemy.engine import URL

    bare = URL.create(
        url.drivername, username=url.username, host=url.host, port=url.port, database=url.database, query=url.query
    )  # (URL.set(password=None) keeps the password)
    return bare.render_as_string(hide_password=False), {"PGPASSWORD": str(url.password)}


def check_database(uri: str, timeout_s: float = 5.0) -> None:
    """Connect to a PostgreSQL ``uri`` once; a one-sentence :class:`TrackingError` when it does not answer,
    refuses the credentials, lacks the database or its driver is missing. Other databases pass."""
    if not uri.startswith("postgresql"):
        return
    from sqlalchemy import create_engine
    from sqlalchemy import exc as sa_exc

    url = _url(uri)
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    try:
        engine = create_engine(uri, connect_args={"connect_timeout": max(1, int(timeout_s))}, poolclass=_null_pool())
    except (ImportError, sa_exc.NoSuchModuleError) as exc:
        raise TrackingError(
            f"tracking.backend_store_uri={redact(uri)} needs a PostgreSQL driver for SQLAlchemy "
            f"({exc}); install it with pip install 'polypythia[postgres]' (psycopg 3)."
        ) from None
    try:
        with engine.connect():
            pass
    except sa_exc.OperationalError as exc:
        raise TrackingError(_connect_problem(str(exc.orig), where, url)) from None
    finally:
        engine.dispose()


def _null_pool():
    from sqlalchemy.pool import NullPool

    return NullPool


def _connect_problem(text: str, where: str, url) -> str:
    """A PostgreSQL connection error as one sentence that says what to do."""
    first = " ".join(text.strip().splitlines()[-1:] or [""]).strip()
    if "password authentication failed" in text or "no password supplied" in text:
        return (
            f"The PostgreSQL server at {where} refused the credentials of user {url.username!r} ({first}); "
            f"{FIX} with the right user and password."
        )
    if "does not exist" in text and "database" in text:
        return (
            f"The PostgreSQL server at {where} has no database {url.database!r}; create it "
            f"(createdb -h {url.host} -p {url.port or 5432} -U {url.username} {url.database}) or {FIX}."
        )
    return f"The PostgreSQL server at {where} does not answer ({first}); start it, or {FIX} with its host and port."


def check_same_backend(server_dir: Path, state: dict, backend: str) -> None:
    """A :class:`TrackingError` when the running server of ``server_dir`` serves another database than asked."""
    running = state.get("backend") or backend_uri(server_dir, None)
    if running != backend:
        raise TrackingError(
            f"The MLflow server of {server_dir} at {state['uri']} serves {redact(running)}, not "
            f"{redact(backend)}; stop it first (python -m polypythia.tracking.client stop --dir {server_dir}) "
            "or give it another tracking.dir."
        )
