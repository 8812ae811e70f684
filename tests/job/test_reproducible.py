"""The same config launched twice gives bit-identical train/loss on the CPU, whatever its siblings do
(issue #27, item 10): a job's torch threads are fixed when it starts (polypythia/job/threads.py), and a
replicate (the same seeds trained again) measures the nondeterminism floor the analysis reports."""

import os
import subprocess
import sys
import uuid

import pytest
from helpers import REPO, child_runs, launch
from mlflow.tracking import MlflowClient

STEPS = 24  # long enough that the sweep's tail (seed 3 alone on two cores) trains for many steps


def loss_curve(client, run) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))


@pytest.mark.integration
@pytest.mark.slow  # long: runs in make test-slow (CI runs both)
def test_seed_3_in_a_sweep_and_alone_later_gives_bit_identical_losses(tmp_path, mlflow_uri, cache_dir):
    study = f"repro-{uuid.uuid4().hex[:8]}"
    common = ["model=tiny", "budget=smoke", f"budget.steps={STEPS}", f"study={study}", f"data.cache_dir={cache_dir}"]
    sweep = launch(tmp_path / "a", "-m", "seed=1,2,3", *common, uri=mlflow_uri)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    # later, alone, from another home (another run folder): the same seeds again, as replicate 1
    alone = launch(tmp_path / "b", "-m", "seed=3", "replicate=1", *common, uri=mlflow_uri)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    assert "tiny-seed3-rep1: finished" in alone.stdout

    # and literally the same command alone, into a study of its own (its run name would be taken here)
    literal = launch(tmp_path / "c", "-m", "seed=3", *common[:-2], f"study={study}-alone", common[-1], uri=mlflow_uri)
    assert literal.returncode == 0, literal.stdout[-3000:] + literal.stderr[-3000:]

    client = MlflowClient(mlflow_uri)
    _, alone_runs = child_runs(client, f"{study}-alone")
    assert [r.info.run_name for r in alone_runs] == ["tiny-seed3"]
    _, children = child_runs(client, study)
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == ["tiny-seed1", "tiny-seed2", "tiny-seed3", "tiny-seed3-rep1"]
    first, again = loss_curve(client, by_name["tiny-seed3"]), loss_curve(client, by_name["tiny-seed3-rep1"])
    assert [s for s, _ in first] == list(range(1, STEPS + 1))
    assert first == again  # bit-identical, step by step
    assert loss_curve(client, alone_runs[0]) == first
    assert loss_curve(client, by_name["tiny-seed2"]) != first
    for child in children:  # one thread each, from the first step to the last (launcher.num_cpus_per_job=1)
        threads = {m.value for m in client.get_metric_history(child.info.run_id, "train/threads")}
        assert threads == {1.0}, (child.info.run_name, threads)
    assert by_name["tiny-seed3-rep1"].data.tags["replicate"] == "1"

    # the analysis keeps the replicate out of the seeds and reports the nondeterminism floor beside them
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    done = subprocess.run(
        [sys.executable, "-m", "analysis", study], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "Nondeterminism floor of tiny train/loss: replicate SD 0 (largest difference 0, 2 runs of 1 seed(s)"
        in done.stdout
    ), done.stdout
    assert "over 3 seeds" in done.stdout and "seed variance exceeds it" in done.stdout
    assert "rep1" not in done.stdout.split("Nondeterminism floor")[0]  # no column of its own in the seed table


def test_a_replicate_is_in_the_run_name_only_when_nonzero(tmp_path, cache_dir):
    from helpers import tiny_job

    from polypythia.errors import ConfigError

    assert tiny_job(tmp_path, cache_dir).run_name == "tiny-seed1"
    assert tiny_job(tmp_path, cache_dir, replicate=2).run_name == "tiny-seed1-rep2"
    assert tiny_job(tmp_path, cache_dir, data_seed=2, replicate=1).run_name == "tiny-wseed1-dseed2-rep1"
    with pytest.raises(ConfigError, match=r"^replicate must be a non-negative integer, got -1\.$"):
        tiny_job(tmp_path, cache_dir, replicate=-1)


def test_a_replicate_is_no_sibling_seed_of_the_live_monitor(tmp_path, cache_dir):
    """Its twin would narrow the band it is judged by; the analysis sets replicates aside too."""
    from helpers import tiny_job

    from polypythia.driver.seedband import plan_groups

    jobs = [tiny_job(tmp_path, cache_dir, seed=s, replicate=r) for s, r in ((1, 0), (2, 0), (3, 0), (1, 1))]
    assert [group.members for group in plan_groups(jobs)] == [[0, 1, 2]]


def test_the_same_seed_twice_in_one_sweep_points_to_replicate(tmp_path, cache_dir):
    """``seed=1,1`` would be one run folder trained twice: refused before anything starts, with the way to replicates."""
    out = launch(tmp_path, "-m", "seed=1,1", "model=tiny", "budget=smoke", f"data.cache_dir={cache_dir}")
    assert out.returncode != 0
    assert "The sweep has the same run more than once (polypythia/tiny-seed1)" in out.stderr
    assert "add replicate=1,2,...: a run each" in out.stderr and "Traceback" not in out.stderr
