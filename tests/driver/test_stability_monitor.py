"""The sweep's seed-band monitor (polypythia/driver/seedband.py), fed like the driver feeds it: jobs'
progress reports into a progress board, the board's rows polled into the monitor. Unit tests need no
Ray and no MLflow (a fake client records what would be written); one integration test runs the real
launcher with a diverging seed."""

from __future__ import annotations

import math
import uuid
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_job

from polypythia.driver.progress import ProgressBoard, SmoothedLoss, line, render
from polypythia.driver.seedband import Group, SeedBandMonitor, decision_steps, loss_window, plan_groups
from polypythia.driver.seedbandlog import MonitorLog

STEPS = 40
SEEDS = (1, 2, 3, 4, 5)
BAD_SEED, BAD_FROM = 3, 8


def sweep_jobs(tmp_path, window=4, seeds=SEEDS, **overrides):
    return [
        tiny_job(
            tmp_path, tmp_path / "cache", seed=s, budget__steps=STEPS, monitor__loss_window_steps=window, **overrides
        )
        for s in seeds
    ]


def losses_of(seed: int, boost_from: int | None = None) -> dict[int, float]:
    """A healthy loss curve with its own noise and a small offset per seed; boosted after ``boost_from``."""
    rng = np.random.default_rng(seed)
    curve = {}
    for step in range(1, STEPS + 1):
        loss = 2.0 + 6.0 * math.exp(-step / 12) + 0.01 * seed + rng.normal(0, 0.03)
        if boost_from is not None and step >= boost_from:
            loss += 0.4 * (step - boost_from + 1)
        curve[step] = loss
    return curve


def curves(seeds=SEEDS):
    return {i: losses_of(s, BAD_FROM if s == BAD_SEED else None) for i, s in enumerate(seeds)}


def feed(board, monitor, curves, starts, chunk=3, log=None):
    """Report every run's losses ``chunk`` steps at a time (as a job reports once a second), run ``i``
    starting ``starts[i]`` polls late, and poll the monitor after every round; returns every decision
    and band, in order."""
    decisions, bands = [], []
    position = {i: 0 for i in curves}
    for poll in range(10_000):
        for i, curve in curves.items():
            if poll < starts[i] or position[i] >= STEPS:
                continue
            if position[i] == 0:
                board.update(i, {"state": "running", "step": 0, "total": STEPS, "attempt_start": True})
            steps = range(position[i] + 1, min(STEPS, position[i] + chunk) + 1)
            position[i] = steps[-1]
            board.update(
                i,
                {
                    "state": "running",
                    "step": steps[-1],
                    "total": STEPS,
                    "loss": curve[steps[-1]],
                    "losses": {s: curve[s] for s in steps},
                },
            )
            if position[i] == STEPS:
                board.update(i, {"state": "finished"})
        rows = board.snapshot()
        if log is not None:
            log.watch(rows)
        new_decisions, new_bands = monitor.observe(rows) if log is None else ([], [])
        decisions += new_decisions
        bands += new_bands
        if all(p == STEPS for p in position.values()):
            return decisions, bands
    raise AssertionError("the runs never finished")


def smoothed(curve, step, window):
    return float(np.mean([curve[s] for s in range(max(1, step - window + 1), step + 1)]))


def test_only_the_diverging_seed_alerts_after_its_divergence_and_the_band_is_right(tmp_path):
    jobs = sweep_jobs(tmp_path)
    monitor = SeedBandMonitor(plan_groups(jobs))
    board = ProgressBoard([j.run_name for j in jobs], monitor.plans())
    runs = curves()
    # two waves, as on a machine with room for three jobs at a time: seeds 4 and 5 start late
    decisions, bands = feed(board, monitor, runs, starts={0: 0, 1: 0, 2: 0, 3: 6, 4: 9})
    grid = decision_steps(jobs[0])
    assert grid[:6] == (1, 2, 3, 4, 6, 8) and grid[-1] == STEPS

    bad = SEEDS.index(BAD_SEED)
    assert set(monitor.alerts) == {bad}
    alert = monitor.alerts[bad]
    assert BAD_FROM <= alert.step <= 16 and alert.deviation > alert.threshold > 5
    assert alert.describe() == f"step={alert.step} signal=loss deviation={alert.deviation:+.2f}"
    # every run is decided once at every decision step (the first ones: too few steps pooled yet)
    assert sorted((d.index, d.step) for d in decisions) == sorted((i, s) for i in runs for s in grid)
    healthy = [d for d in decisions if d.index != bad and not math.isnan(d.deviation)]
    assert healthy and max(abs(d.deviation) for d in healthy) < alert.threshold / 2
    assert all(d.siblings >= 3 for d in decisions)

    # the band at every decision step, once, over the five runs' smoothed losses
    assert [b.step for b in bands] == list(grid)
    for band in bands:
        values = [smoothed(runs[i], band.step, 4) for i in runs]
        assert band.study == jobs[0].study
        assert band.metrics == pytest.approx(
            {
                "seeds/loss_median": np.median(values),
                "seeds/loss_p25": np.percentile(values, 25),
                "seeds/loss_p75": np.percentile(values, 75),
                "seeds/loss_min": min(values),
                "seeds/loss_max": max(values),
            }
        )


def test_live_decisions_are_the_causal_replays(tmp_path):
    """Runs in lockstep: the monitor's first alert is the offline replay's (analysis/replay.py), from
    the same smoothed losses; one implementation of the rule."""
    from analysis.outliers import OutlierRule, wide_by_seed
    from analysis.replay import SMOOTHED_LOSS, first_alerts, smoothed_loss

    jobs = sweep_jobs(tmp_path, window=3)
    monitor = SeedBandMonitor(plan_groups(jobs))
    board = ProgressBoard([j.run_name for j in jobs], monitor.plans())
    runs = curves()
    feed(board, monitor, runs, starts={i: 0 for i in runs}, chunk=5)
    metrics = pd.DataFrame(
        [
            {"model": "tiny", "seed": str(SEEDS[i]), "step": s, "metric": "train/loss", "value": v}
            for i, curve in runs.items()
            for s, v in curve.items()
        ]
    )
    grid = np.array(decision_steps(jobs[0]))
    table = wide_by_seed(smoothed_loss(metrics, grid, 3), SMOOTHED_LOSS)["tiny"]
    rows = board.snapshot()
    live = pd.DataFrame({str(SEEDS[i]): pd.Series(rows[i]["smoothed"]) for i in runs}).sort_index()
    assert np.allclose(live.to_numpy(), table.to_numpy())
    (replayed,) = first_alerts(table, SMOOTHED_LOSS, OutlierRule())
    alert = monitor.alerts[SEEDS.index(BAD_SEED)]
    assert (replayed["seed"], replayed["alert_step"]) == (str(BAD_SEED), alert.step)
    assert replayed["deviation_sd"] == pytest.approx(alert.deviation)
    assert replayed["threshold_sd"] == pytest.approx(alert.threshold)


class Page(list):
    """One page of MLflow's search_runs: the runs, and no token for a next page."""

    token = None


class FakeClient:
    """What MonitorLog asks of an MlflowClient, recorded."""

    def __init__(self, parent: str, names: list[str]):
        self.parent = parent
        self.children = {name: f"run-{name}" for name in names}
        self.metrics: dict[str, list] = {}
        self.tags: dict[str, dict[str, str]] = {}

    def get_run(self, run_id):
        return SimpleNamespace(info=SimpleNamespace(experiment_id="7"))

    def search_runs(self, experiment_ids, filter_string, max_results=1000, page_token=None):
        assert experiment_ids == ["7"] and self.parent in filter_string and "'job'" in filter_string
        return Page(SimpleNamespace(info=SimpleNamespace(run_name=n, run_id=r)) for n, r in self.children.items())

    def log_batch(self, run_id, metrics=()):
        self.metrics.setdefault(run_id, []).extend(metrics)

    def set_tag(self, run_id, key, value):
        self.tags.setdefault(run_id, {})[key] = value


def test_the_driver_writes_alert_tag_deviations_and_parent_band(tmp_path, caplog):
    jobs = sweep_jobs(tmp_path)
    monitor = SeedBandMonitor(plan_groups(jobs))
    board = ProgressBoard([j.run_name for j in jobs], monitor.plans())
    client = FakeClient("parent-1", [j.run_name for j in jobs])
    log = MonitorLog(monitor, client, {jobs[0].study: "parent-1"}, jobs)
    with caplog.at_level("WARNING", logger="polypythia.driver.seedbandlog"):
        feed(board, monitor, curves(), starts={0: 0, 1: 0, 2: 0, 3: 6, 4: 9}, log=log)
    grid = decision_steps(jobs[0])
    bad = jobs[SEEDS.index(BAD_SEED)].run_name
    assert client.tags == {f"run-{bad}": {"stability.alert": monitor.alerts[SEEDS.index(BAD_SEED)].describe()}}
    assert [r.message for r in caplog.records if "Cross-seed alert" in r.message] == [caplog.records[0].message]
    assert bad in caplog.records[0].message
    for job in jobs:
        points = client.metrics[f"run-{job.run_name}"]
        assert {p.key for p in points} == {"monitor/band_deviation"}
        steps = [p.step for p in points]
        assert len(steps) == len(set(steps)) and set(steps) <= set(grid) and max(steps) == STEPS
    parent = client.metrics["parent-1"]
    for stat in ("median", "p25", "p75", "min", "max"):
        assert sorted(p.step for p in parent if p.key == f"seeds/loss_{stat}") == list(grid)
    rows = log.marks(board.snapshot())
    assert rows[SEEDS.index(BAD_SEED)]["alert"] == monitor.alerts[SEEDS.index(BAD_SEED)].step
    assert rows[0]["alert"] is None and abs(rows[0]["deviation"]) < 5
    assert "ALERT@" in line(rows[SEEDS.index(BAD_SEED)]) and "ALERT" not in line(rows[0])
    render(rows)  # the live table draws the marks


def test_a_tracking_hiccup_delays_the_alert_tag_and_never_stops_the_sweep(tmp_path, caplog):
    jobs = sweep_jobs(tmp_path)
    monitor = SeedBandMonitor(plan_groups(jobs))
    board = ProgressBoard([j.run_name for j in jobs], monitor.plans())
    client = FakeClient("parent-1", [j.run_name for j in jobs])
    tag, away = client.set_tag, [1]

    def flaky_set_tag(*args):
        if away[0]:
            away[0] -= 1
            raise ConnectionError("the tracking server is away")
        tag(*args)

    client.set_tag = flaky_set_tag
    log = MonitorLog(monitor, client, {jobs[0].study: "parent-1"}, jobs)
    feed(board, monitor, curves(), starts={i: 0 for i in range(5)}, log=log)
    bad = jobs[SEEDS.index(BAD_SEED)].run_name
    assert client.tags == {f"run-{bad}": {"stability.alert": monitor.alerts[SEEDS.index(BAD_SEED)].describe()}}
    assert "the tracking server is away" in caplog.text and not log.untagged


def test_healthy_seeds_never_alert(tmp_path):
    jobs = sweep_jobs(tmp_path, window=1, seeds=range(1, 9))
    monitor = SeedBandMonitor(plan_groups(jobs))
    board = ProgressBoard([j.run_name for j in jobs], monitor.plans())
    runs = {i: losses_of(100 + i) for i in range(8)}
    decisions, _ = feed(board, monitor, runs, starts={i: i % 3 for i in runs}, chunk=2)
    assert not monitor.alerts and any(not math.isnan(d.deviation) for d in decisions)


def test_groups_grids_and_windows(tmp_path):
    jobs = (
        sweep_jobs(tmp_path, window=None, seeds=(1, 2, 3, 4))
        + [
            tiny_job(
                tmp_path,
                tmp_path / "cache",
                seed=s,
                model__name="other",
                budget__steps=STEPS,
                monitor__cross_seed_every_steps=10,
            )
            for s in (1, 2, 3, 4)
        ]
        + [tiny_job(tmp_path, tmp_path / "cache", seed=9, monitor__cross_seed=False)]
    )
    groups = plan_groups(jobs)
    assert [(g.model, g.members, g.window) for g in groups] == [("tiny", [0, 1, 2, 3], 1), ("other", [4, 5, 6, 7], 1)]
    assert groups[1].grid == (10, 20, 30, 40) and decision_steps(jobs[0])[:4] == (1, 2, 3, 4)
    assert [g.prefix for g in groups] == ["seeds/tiny/", "seeds/other/"]  # two models in one study: seeds/tiny/loss_*
    assert loss_window(tiny_job(tmp_path, tmp_path / "cache", budget__steps=1000)) == 10
    _, (band,) = SeedBandMonitor([Group("s", "tiny", (5,), 1, [0, 1, 2, 3], prefix="seeds/tiny/")]).observe(
        {i: {"state": "finished", "smoothed": {5: float(i)}} for i in range(4)}
    )
    assert band.metrics["seeds/tiny/loss_median"] == 1.5 and band.metrics["seeds/tiny/loss_max"] == 3.0
    # three runs are too few for the rule: the group is never decided, and the board keeps nothing for seed 9
    small = SeedBandMonitor(plan_groups(sweep_jobs(tmp_path, seeds=(1, 2, 3))))
    board = ProgressBoard(["a", "b", "c"], small.plans())
    decisions, bands = feed(board, small, curves((1, 2, 3)), starts={0: 0, 1: 0, 2: 0})
    assert not decisions and len(bands) == len(decision_steps(jobs[0]))
    assert 8 not in SeedBandMonitor(groups).plans()


def test_smoothed_loss_restarts_cleanly_after_a_resume():
    smooth = SmoothedLoss((2, 4, 6), window=2)
    assert smooth.add({1: 1.0, 2: 3.0, 3: 5.0}) == {2: 2.0}
    # a resumed job trains steps 2-3 again: their new losses replace the old ones
    assert smooth.add({2: 30.0, 3: 50.0, 4: 70.0}) == {2: 30.0, 4: 60.0}
    board = ProgressBoard(["a"])  # no plan: losses are dropped, not kept in the row
    board.update(0, {"state": "running", "step": 3, "losses": {1: 1.0}})
    assert "losses" not in board.rows[0] and "smoothed" not in board.rows[0]


@pytest.mark.integration
def test_a_sweep_tags_the_diverging_seed_logs_the_band_and_stops_it(tmp_path, mlflow_uri, cache_dir):
    """Five tiny seeds, seed 3's learning rate x100 from step 8 (it then learns faster than its
    siblings: its loss leaves their band downwards): seed 3 alone carries stability.alert, and the
    parent run holds seeds/* at every decision step. With ``monitor.action=stop`` the driver then ends
    seed 3 (KILLED, with the monitor's reason, not retried) while the others finish, and the sweep
    succeeds. All five train at once (0.4 CPU each). Seed 3 hangs after step 39 (a test fault) so that
    it is still running whenever its alert is decided (a tiny run may otherwise finish first, and a
    run that trained all its steps is not stopped: its alert is an alert only)."""
    from helpers import child_runs, launch
    from mlflow.tracking import MlflowClient

    study = f"monitor-{uuid.uuid4().hex[:8]}"
    out = launch(
        tmp_path,
        "-m",
        "seed=1,2,3,4,5",
        "model=tiny",
        "budget=smoke",
        f"budget.steps={STEPS}",
        "budget.checkpoint_every_steps=10",
        "monitor.loss_window_steps=4",
        "launcher.num_cpus_per_job=0.4",
        "train.eval_every_checkpoint=false",
        "tracking.system_metrics=false",
        "monitor.action=stop",
        "train.fault.lr_boost_at_step=8",
        "train.fault.lr_boost=100",
        "train.fault.lr_boost_seeds=[3]",
        f"train.fault.hang_at_step={STEPS - 1}",
        "train.fault.hang_seeds=[3]",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
        "hydra.sweep.subdir=${hydra.job.num}",  # short names
        uri=mlflow_uri,
    )
    client = MlflowClient(mlflow_uri)
    (parent,), children = child_runs(client, study)
    assert len(children) == 5, out.stdout[-3000:] + out.stderr[-3000:]
    alerts = {c.data.tags["seed"]: c.data.tags.get("stability.alert") for c in children}
    assert [seed for seed, tag in alerts.items() if tag] == ["3"], alerts
    step = int(alerts["3"].split()[0].removeprefix("step="))
    assert step >= 8 and alerts["3"].split()[1] == "signal=loss"
    assert "Cross-seed alert: tiny-seed3" in out.stdout + out.stderr
    grid = [1, 2, 4, 8, 10, 16, 20, 30, 32, 40]
    for child in children:
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "monitor/band_deviation"))
        assert steps and set(steps) <= set(grid) and len(steps) == len(set(steps))
        assert steps[-1] == STEPS or child.data.tags["seed"] == "3"
    for stat in ("median", "p25", "p75", "min", "max"):
        history = client.get_metric_history(parent.info.run_id, f"seeds/loss_{stat}")
        assert sorted(m.step for m in history) == grid, stat

    # monitor.action=stop: seed 3 ended by the monitor, the others finished, the parent too
    stopped = next(c for c in children if c.data.tags["seed"] == "3")
    assert stopped.info.status == "KILLED", stopped.data.tags
    assert stopped.data.tags["failure_reason"].startswith(
        "stopped by the cross-seed monitor (monitor.action=stop) at step"
    )
    assert stopped.data.tags["stability.action"].startswith("stopped at step")
    assert {c.info.status for c in children if c is not stopped} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert "tiny-seed3: stopped: stopped by the cross-seed monitor" in out.stdout
    assert "[monitor] tiny-seed3: stopped at step" in out.stdout and "retried" not in out.stdout
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]  # a run stopped as asked is no failure


@pytest.mark.integration
@pytest.mark.slow  # long: runs in make test-slow (CI runs both)
def test_a_rewound_seed_goes_on_in_the_same_run_from_an_earlier_checkpoint_on_other_batches(
    tmp_path, mlflow_uri, cache_dir
):
    """``monitor.action=rewind``: seed 3 (learning rate x1000 from step 8) alerts; the driver kills it
    and starts it again, back to its newest checkpoint before the alert's step, skipping as many
    batches as steps rewound (PaLM's remedy). The same MLflow run goes on and finishes with every
    step of train/loss once; the skip is in the tag and in the run folder; the abandoned checkpoints
    are moved aside. The fault is still on after the rewind, so seed 3 alerts again: with
    ``monitor.max_rewinds=1`` that second alert is an alert only. (A tiny run may finish before its
    alert is decided: it is then rewound all the same, its end being the abandoned branch.)"""
    from helpers import child_runs, launch
    from mlflow.tracking import MlflowClient

    from polypythia.train import checkpoint as ckpt
    from polypythia.train import rewind as rw

    study = f"rewind-{uuid.uuid4().hex[:8]}"
    out = launch(
        tmp_path,
        "-m",
        "seed=1,2,3,4,5",
        "model=tiny",
        "budget=smoke",
        f"budget.steps={STEPS}",
        "budget.checkpoint_every_steps=10",
        "monitor.loss_window_steps=4",
        "launcher.num_cpus_per_job=0.4",
        "train.eval_every_checkpoint=false",
        "tracking.system_metrics=false",
        "monitor.action=rewind",
        "monitor.max_rewinds=1",
        "train.keep_resume_states=null",
        "train.fault.lr_boost_at_step=8",
        "train.fault.lr_boost=1000",
        "train.fault.lr_boost_seeds=[3]",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
        "hydra.sweep.subdir=${hydra.job.num}",
        uri=mlflow_uri,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    (parent,), children = child_runs(client, study)
    assert len(children) == 5 and {c.info.status for c in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    run = next(c for c in children if c.data.tags["seed"] == "3")
    tags = run.data.tags
    (record,) = rw.load(tags["run_dir"]) or [out.stdout[-3000:]]
    assert record.decision_step == int(tags["stability.alert"].split()[0].removeprefix("step="))
    assert record.checkpoint_step < record.decision_step
    assert (record.skip_start, record.skip_stop) == (record.checkpoint_step, record.decision_step)
    assert tags["stability.rewind.1"].startswith(record.describe())
    assert tags["stability.action"].startswith("alert only: monitor.max_rewinds=1 reached")
    assert "stability.alert.2" in tags and "[monitor] tiny-seed3: rewind 1 requested" in out.stdout

    for key in ("train/loss", "train/lr", "monitor/band_deviation"):
        logged = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(logged) == len(set(logged)), key
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, STEPS + 1))
    moved = sorted(
        int(p.name[4:]) for p in (ckpt.checkpoints_dir(tags["run_dir"]).parent / "rewound" / "rewind1").glob("step*")
    )
    assert moved and moved == list(record.abandoned) and moved[0] > record.checkpoint_step
    assert max(c.step for c in ckpt.list_checkpoints(tags["run_dir"])) == STEPS  # the new branch's own
    retrained = (
        open(client.download_artifacts(run.info.run_id, "rewinds/rewind1.csv", str(tmp_path))).read().splitlines()
    )
    assert retrained[0] == "step,key,value"
    assert {int(r.split(",")[0]) for r in retrained[1:] if ",train/loss," in r} == set(
        range(record.checkpoint_step + 1, record.logged_through["train/loss"] + 1)
    )
