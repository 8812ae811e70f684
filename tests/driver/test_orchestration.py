"""The sweep's plumbing without Ray: what the driver hands a worker is plain data, and the package
boundaries hold (the sweep end to end: tests/driver/test_launch.py, tests/job/test_failures.py)."""

import ast
import dataclasses
import pickle

import pytest
from helpers import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from polypythia.config.jobconfig import job_config, to_dict
from polypythia.driver.sweep import Sweep
from polypythia.errors import DivergenceError
from polypythia.job.worker import failure_outcome
from polypythia.jobspec import JobRequest


def composed_job(*overrides):
    """A job's config as the launcher hands it on: composed from conf/, resolved, plain."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def test_a_job_spec_is_plain_data_that_rebuilds_the_validated_config(tmp_path):
    common = ("model=tiny", "budget=smoke", "home=home", "launcher.workers_per_run=2")
    requests = [
        JobRequest(config=composed_job(*common, f"seed={seed}"), overrides=(f"seed={seed}",), debug_loggers=("root",))
        for seed in (1, 2)
    ]
    sweep = Sweep(requests, launch_dir=str(tmp_path))  # validates only: no Ray, no tracking server
    sweep.tracking_uri = "http://127.0.0.1:5050"
    sweep.parent_runs = {"polypythia": "parent-run"}
    spec = sweep.job_spec(1)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert (spec.index, spec.tracking_uri, spec.parent_run_id, spec.overrides) == (
        1,
        "http://127.0.0.1:5050",
        "parent-run",
        ("seed=2",),
    )
    assert (spec.world_size, spec.debug_loggers) == (2, ("root",))
    assert spec.config == to_dict(sweep.jobs[1]) and job_config(spec.config) == sweep.jobs[1]
    assert spec.config["runs_dir"] == str(tmp_path / "home" / "runs")  # relative to where the sweep was launched
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.tracking_uri = "elsewhere"


def test_a_job_that_raised_is_failed_or_diverged_with_a_one_line_reason():
    diverged = failure_outcome(DivergenceError("loss at step 3 is nan", step=3))
    assert (diverged.state, diverged.reason, diverged.finished) == (
        "diverged",
        "DivergenceError: loss at step 3 is nan",
        False,
    )
    failed = pickle.loads(pickle.dumps(failure_outcome(ValueError("bad row"))))
    assert (failed.state, failed.reason, type(failed.error)) == ("failed", "ValueError: bad row", ValueError)


def test_polypythia_imports_neither_analysis_nor_the_launcher():
    offenders = []
    for path in sorted((REPO / "polypythia").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in ("analysis", "hydra_plugins")
            ]
    assert not offenders


def test_a_job_state_is_its_plain_string_wherever_it_goes():
    from polypythia.jobspec import ENDED_STATES, JobOutcome, JobState

    assert JobState.STOPPED == "stopped" and "stopped" in ENDED_STATES and JobState.RUNNING not in ENDED_STATES
    assert (str(JobState.FAILED), f"{JobState.FAILED:>7}", {JobState.RUNNING: 1}["running"]) == ("failed", " failed", 1)
    outcome = pickle.loads(pickle.dumps(JobOutcome(state=JobState.STOPPED)))
    assert outcome.state is JobState.STOPPED and outcome.ok and not outcome.finished
    assert JobOutcome(state="finished").ok  # a plain string still reads as its state


def test_a_set_stop_event_ends_the_sweep_as_an_interrupt_and_closes_its_runs(tmp_path, monkeypatch):
    """The launcher's Ctrl-C/SIGTERM handler sets the event it handed to Sweep.run: the loop ends, the
    pending tasks are cancelled and the parent runs are closed as interrupted (no Ray here)."""
    import threading

    from polypythia.driver import watchdog

    sweep = Sweep([JobRequest(config=composed_job("model=tiny", "budget=smoke", "home=home"))], str(tmp_path))
    cancelled, finished = [], []

    def start_jobs():
        sweep.pending = {"task-0": 0}

    monkeypatch.setattr(sweep, "_start_jobs", start_jobs)
    monkeypatch.setattr(sweep, "_collect_ended", lambda: pytest.fail("the loop polled after the stop"))
    monkeypatch.setattr(sweep, "_finish", lambda outcomes, interrupted: finished.append(interrupted))
    monkeypatch.setattr(watchdog, "cancel", cancelled.append)
    stop = threading.Event()
    stop.set()
    with pytest.raises(KeyboardInterrupt):
        sweep.run(stop)
    assert cancelled == ["task-0"] and finished == [True]
