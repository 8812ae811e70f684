"""Sweep-wide launcher.* and tracking.* keys: one value per sweep, or one line naming the key."""

import subprocess
import sys

import pytest
from helpers import REPO, tiny_job

from polypythia.config.jobconfig import JobConfig, to_dict
from polypythia.config.sweepwide import PER_JOB, SWEEP_WIDE
from polypythia.driver.sweep import Sweep
from polypythia.errors import ConfigError
from polypythia.jobspec import JobRequest


def requests(tmp_path, cache_dir, *per_job):
    return [JobRequest(config=to_dict(tiny_job(tmp_path, cache_dir, seed=i + 1, **kw))) for i, kw in enumerate(per_job)]


@pytest.mark.parametrize(
    "key, values",
    [
        ("launcher__address", ("127.0.0.1:6379", "127.0.0.1:6380")),
        ("launcher__progress", (True, False)),
        ("tracking__uri", ("http://127.0.0.1:5050", "http://127.0.0.1:5051")),
        ("tracking__port", (5050, 5051)),
    ],
)
def test_a_sweep_wide_key_that_differs_between_jobs_is_one_line_naming_it(tmp_path, cache_dir, key, values):
    with pytest.raises(ConfigError) as info:
        Sweep(requests(tmp_path, cache_dir, {}, {key: values[0]}, {key: values[1]}), launch_dir=str(tmp_path))
    dotted = key.replace("__", ".")
    text = str(info.value)
    assert text.startswith(f"{dotted} differs between the jobs of this sweep (job #0: ") and "\n" not in text


def test_per_job_keys_stay_per_job(tmp_path, cache_dir):
    sweep = Sweep(
        requests(
            tmp_path,
            cache_dir,
            {"launcher__num_cpus_per_job": 1.0, "launcher__stall_timeout_s": 60.0, "tracking__flush_interval_s": 1.0},
            {
                "launcher__num_cpus_per_job": 2.0,
                "launcher__stall_timeout_s": 0.0,
                "tracking__flush_interval_s": 5.0,
                "launcher__max_retries": 0,
            },
        ),
        launch_dir=str(tmp_path),
    )
    assert [sweep._task_options(i)["num_cpus"] for i in (0, 1)] == [1.0, 2.0]
    assert [sweep._task_options(i)["max_retries"] for i in (0, 1)] == [2, 0]
    assert [j.launcher.stall_timeout_s for j in sweep.jobs] == [60.0, 0.0]
    assert [j.tracking.flush_interval_s for j in sweep.jobs] == [1.0, 5.0]


def test_every_launcher_and_tracking_key_is_either_sweep_wide_or_per_job():
    import dataclasses

    fields = {
        f"{section}.{f.name}"
        for section in ("launcher", "tracking")
        for f in dataclasses.fields(JobConfig.__dataclass_fields__[section].default_factory())
    }
    assert set(SWEEP_WIDE) | set(PER_JOB) == fields and not set(SWEEP_WIDE) & set(PER_JOB)


def test_the_launcher_refuses_a_sweep_with_two_addresses_before_anything_starts(tmp_path):
    out = subprocess.run(
        [sys.executable, "launch.py", "-m", "seed=1", "model=tiny", "budget=smoke", "tracking.port=5050,5051"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "POLYPYTHIA_HOME": str(tmp_path)},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("polypythia: error:")]
    assert len(errors) == 1 and "tracking.port differs between the jobs of this sweep" in errors[0], out.stderr
    assert "MLflow tracking server" not in out.stdout and not (tmp_path / "mlflow").exists()
