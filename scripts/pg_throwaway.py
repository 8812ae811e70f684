"""A throwaway PostgreSQL server in a temporary folder, for the tests and benchmarks of a
PostgreSQL-backed tracking server, and for trying the lab setup on one machine.

    .venv/bin/python scripts/pg_throwaway.py      # prints a postgresql:// URI, serves until Ctrl-C

It runs PostgreSQL's own ``initdb`` and ``pg_ctl`` (on PATH, else Debian's
``/usr/lib/postgresql/<version>/bin``): a cluster with password authentication (scram-sha-256) for
one user, a database ``mlflow``, listening on a free loopback port, its unix socket in the same
temporary folder. ``initdb`` refuses to run as root, so as root the server runs as ``nobody``, in a
folder under /tmp that ``nobody`` owns. :func:`find_initdb` is None where no server binaries are
installed (Debian: ``apt-get install postgresql``); the tests then skip with that reason.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

USER, PASSWORD, DATABASE = "polypythia", "throwaway-pw", "mlflow"


def find_initdb() -> Optional[str]:
    """``initdb`` on PATH, else the newest of Debian's ``/usr/lib/postgresql/*/bin/initdb``."""
    found = shutil.which("initdb")
    if found:
        return found
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(uid: int, gid: int):
    """preexec_fn that drops root to ``uid``/``gid`` (initdb and postgres refuse to run as root)."""

    def drop() -> None:
        os.setgid(gid)
        os.setuid(uid)

    return drop if os.geteuid() == 0 else None


@contextmanager
def throwaway_postgres(timeout_s: float = 60.0) -> Iterator[str]:
    """Start a server, yield its URI (``postgresql://polypythia:...@127.0.0.1:<port>/mlflow``), stop it
    and remove its folder. RuntimeError (with PostgreSQL's own output) if it does not start."""
    initdb = find_initdb()
    if initdb is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb) on PATH or under /usr/lib/postgresql/*/bin")
    bindir = Path(initdb).parent
    folder = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))  # short: the socket path must stay under 107 bytes
    uid, gid = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(folder, uid, gid)
    pwfile, data, port = folder / "pw", folder / "data", _free_port()
    pwfile.write_text(PASSWORD)
    os.chown(pwfile, uid, gid)
    run = dict(preexec_fn=_as_owner(uid, gid), capture_output=True, text=True, timeout=timeout_s, cwd=folder)
    try:
        _check(
            subprocess.run(
                [
                    str(initdb),
                    "-D",
                    str(data),
                    "-U",
                    USER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                **run,
            ),
            "initdb",
        )
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        _check(
            subprocess.run(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-o",
                    options,
                    "-l",
                    str(folder / "log"),
                    "-w",
                    "-t",
                    str(int(timeout_s)),
                    "start",
                ],
                **run,
            ),
            "pg_ctl start",
            folder / "log",
        )
        try:
            _create_database(port)
            yield f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}"
        finally:
            subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], **run)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check(done: subprocess.CompletedProcess, what: str, log: Optional[Path] = None) -> None:
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:] if log is not None and log.is_file() else ""
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}{tail}")


def _create_database(port: int) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            conn = psycopg.connect(
                host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname="postgres", autocommit=True
            )
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {DATABASE}")
    conn.close()


if __name__ == "__main__":
    with throwaway_postgres() as uri:
        print(uri, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
