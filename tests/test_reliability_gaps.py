"""The last failure cases of issue #14, each reproduced: a home Hydra cannot write, a disk that fills
during a checkpoint, a corrupt checkpoint in ``python -m polypythia.evaluate``, and token ids beyond
the model's vocabulary. Each is one line saying what and how to fix it; nothing earlier is lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from polypythia.train.distributed import RENDEZVOUS_ENV

# ---------------------------------------------------------------------------------------------
# a POLYPYTHIA_HOME that Hydra cannot write its own folder into (issue #14, item 12)


def launch_quick(home: Path, *args: str) -> subprocess.CompletedProcess:
    """``launch.py`` with ``POLYPYTHIA_HOME=home``: expected to stop before anything starts."""
    env = {k: v for k, v in os.environ.items() if k not in (*RENDEZVOUS_ENV, "MLFLOW_TRACKING_URI")}
    env["POLYPYTHIA_HOME"] = str(home)
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def assert_one_line(out: subprocess.CompletedProcess, *fragments: str) -> str:
    err = out.stderr.strip()
    assert out.returncode == 2 and "\n" not in err and "Traceback" not in out.stderr + out.stdout, out.stderr
    assert err.startswith("polypythia: error: ") and err.endswith("to a folder you can write to."), err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("mode", [["-m", "seed=1,2"], ["seed=1"]], ids=["sweep", "single-job"])
def test_a_home_under_a_file_is_one_line_and_starts_nothing(tmp_path, mode):
    """A home that cannot be created (here a path under a regular file: mkdir fails with
    NotADirectoryError, for root too) was a NotADirectoryError traceback from Hydra's mkdir."""
    (tmp_path / "file").write_text("x")
    home = tmp_path / "file" / "home"
    out = launch_quick(home, *mode, "model=tiny", "budget=smoke")
    assert_one_line(out, f"POLYPYTHIA_HOME={home} cannot be written ({tmp_path / 'file'} is a file, not a folder)",
                    "set POLYPYTHIA_HOME (or home=...)")
    assert "Ray" not in out.stdout and "MLflow" not in out.stdout  # nothing started


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_home_on_a_file_system_nobody_can_write_is_one_line(tmp_path):
    """/proc refuses new folders even to root, whatever os.access says: the folder is really created."""
    out = launch_quick(Path("/proc/polypythia-home"), "-m", "seed=1", "model=tiny", "budget=smoke")
    assert_one_line(out, "POLYPYTHIA_HOME=/proc/polypythia-home cannot be written (")


def test_output_folder_problem_names_the_key_outside_the_home(tmp_path, monkeypatch):
    from hydra_plugins.polypythia_launcher.output_folder import output_folder_problem

    (tmp_path / "file").write_text("x")
    monkeypatch.delenv("POLYPYTHIA_HOME", raising=False)
    assert output_folder_problem(str(tmp_path / "home"), "hydra.run.dir", str(tmp_path / "home" / "hydra" / "t")) is None
    assert (tmp_path / "home" / "hydra" / "t").is_dir()  # created, as Hydra would next
    message = output_folder_problem(str(tmp_path / "home"), "hydra.sweep.dir", str(tmp_path / "file" / "x"))
    assert message == (f"hydra.sweep.dir={tmp_path / 'file' / 'x'} cannot be written ({tmp_path / 'file'} is a file, "
                       "not a folder); set hydra.sweep.dir to a folder you can write to.")
    home = tmp_path / "file" / "home"
    message = output_folder_problem(str(home), "hydra.run.dir", str(home / "hydra" / "t"))
    assert message.startswith(f"home={home} (POLYPYTHIA_HOME) cannot be written")


def test_read_only_home_as_os_access_reports_it(tmp_path, monkeypatch):
    """A home with mode 0500, as anyone but root sees it (these tests run as root)."""
    from hydra_plugins.polypythia_launcher.output_folder import output_folder_problem

    home = tmp_path / "home"
    home.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: (
        False if Path(path) == home and mode & os.W_OK else real(path, mode, *a, **k)))
    monkeypatch.setenv("POLYPYTHIA_HOME", str(home))
    assert output_folder_problem(str(home), "hydra.sweep.dir", str(home / "hydra" / "multirun" / "t")) == (
        f"POLYPYTHIA_HOME={home} cannot be written (the folder {home} is not writable), so Hydra cannot create "
        f"{home / 'hydra' / 'multirun' / 't'}; set POLYPYTHIA_HOME (or home=...) to a folder you can write to.")
    assert not (home / "hydra").exists()
