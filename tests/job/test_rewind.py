"""Rewinding a run (monitor.action=rewind): the step -> batch mapping with skipped batches, the run
folder's record and its persistence across starts, the abandoned checkpoints moved aside, the
re-trained points kept out of MLflow's series, and the driver's side (the monitor forgets the
abandoned branch; retries share one budget; an interrupted prepare closes its parent run).
No Ray and no MLflow server: fakes record what would be sent."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from helpers import tiny_job, train_here

from polypythia.jobspec import JobOutcome, RewindRequest
from polypythia.train import checkpoint as ckpt
from polypythia.train import rewind as rw


def fake_checkpoint(run_dir, step, resumable=True):
    """A sealed checkpoint folder, with (or without) its resume state."""
    path = ckpt.step_dir(run_dir, step)
    (path / "state").mkdir(parents=True) if resumable else path.mkdir(parents=True)
    if resumable:
        (path / "state" / "model.pt").write_text(f"state {step}")
        (path / ckpt.TRAINER_STATE).write_text(json.dumps({"step": step}))
    (path / "model.safetensors").write_text(f"weights {step}")
    ckpt.write_manifest(path)
    return path


def test_the_batch_of_a_step_skips_the_batches_of_every_rewind_at_or_before_it():
    assert [rw.batch_index(s, []) for s in range(4)] == [0, 1, 2, 3]
    first = rw.Rewind(1, decision_step=16, checkpoint_step=10, skip_start=10, skip_stop=16)
    assert [rw.batch_index(s, [first]) for s in (9, 10, 11)] == [9, 16, 17]
    second = rw.Rewind(2, decision_step=30, checkpoint_step=20, skip_start=26, skip_stop=126)
    assert [rw.batch_index(s, [first, second]) for s in (0, 9, 10, 19, 20, 21)] == [0, 9, 16, 25, 126, 127]


def test_a_rewind_moves_the_newer_checkpoints_aside_records_the_skip_and_is_applied_once(tmp_path):
    run = tmp_path / "run"
    for step in (0, 1, 2, 4, 8):
        fake_checkpoint(run, step, resumable=step >= 2)
    fake_checkpoint(run, 10)
    fake_checkpoint(run, 16)
    ckpt.partial_dir(run, 20).mkdir()  # half-written: removed
    done = rw.apply(run, RewindRequest(1, decision_step=16, reason="step=16 signal=loss deviation=+9.00"))
    assert done == rw.Rewind(1, 16, 10, 10, 16, (16,), "step=16 signal=loss deviation=+9.00")
    assert [c.step for c in ckpt.list_checkpoints(run)] == [0, 1, 2, 4, 8, 10]
    assert (run / "rewound" / "rewind1" / "step16" / "model.safetensors").read_text() == "weights 16"
    assert not ckpt.partial_dir(run, 20).exists()
    assert ckpt.latest_valid_checkpoint(run).step == 10  # the next resume: the rewind's checkpoint
    assert rw.load(run) == [done]
    assert rw.apply(run, RewindRequest(1, decision_step=16)) is None  # a retried process: already done
    assert rw.load(run) == [done]

    # a second rewind: 100 batches from the step it goes back to, never past the first rewind's checkpoint
    fake_checkpoint(run, 16)
    fake_checkpoint(run, 20)
    second = rw.apply(run, RewindRequest(2, decision_step=20, skip_batches=100))
    assert (second.checkpoint_step, second.skip_start, second.skip_stop, second.abandoned) == (16, 22, 122, (20,))
    assert rw.batch_index(16, rw.load(run)) == 122
    refused = rw.apply(run, RewindRequest(3, decision_step=10))  # nothing from step 16 (the floor) before step 10
    assert isinstance(refused, rw.Refused) and "before step 10" in refused.reason and len(rw.load(run)) == 2


def test_a_rewind_needs_a_checkpoint_that_kept_its_resume_state(tmp_path):
    run = tmp_path / "run"
    for step in (0, 4, 8):
        fake_checkpoint(run, step, resumable=False)
    fake_checkpoint(run, 16)
    refused = rw.apply(run, RewindRequest(1, decision_step=16))
    assert isinstance(refused, rw.Refused)
    assert "resumable: [16]" in refused.reason and "train.keep_resume_states=null" in refused.reason
    assert not rw.record_path(run).exists() and [c.step for c in ckpt.list_checkpoints(run)] == [0, 4, 8, 16]


def test_training_reads_the_recorded_skips_at_every_start(tmp_path, cache_dir):
    """The record in the run folder, not the request, decides the batches: a relaunch skips them too."""
    from polypythia.train.callbacks import Callback

    cfg = tiny_job(tmp_path, cache_dir, budget__steps=4, train__eval_every_checkpoint=False)
    rw.save(cfg.run_dir, [rw.Rewind(1, decision_step=3, checkpoint_step=2, skip_start=2, skip_stop=7)])

    class Seen(Callback):
        def on_train_start(self, start):
            self.data, self.rows = start.data, {}

        def on_batch(self, step, rows):
            self.rows[step] = rows.copy()
            return rows

    seen = Seen()
    train_here(cfg, [seen])
    expected = {1: 0, 2: 1, 3: 7, 4: 8}  # 1-based step -> batch index
    for step, batch in expected.items():
        assert (seen.rows[step] == seen.data.batch(batch)).all(), step


class FakeLogger:
    def __init__(self):
        self.points, self.flushed = [], 0

    def log(self, step, metrics, timestamp_ms=None):
        self.points += [(step, k) for k in metrics]

    def flush(self):
        self.flushed += 1


class FakeClient:
    def __init__(self):
        self.tags, self.texts = {}, {}

    def set_tag(self, run_id, key, value):
        self.tags[key] = value

    def log_text(self, run_id, text, path):
        self.texts[path] = text


def test_re_trained_points_go_to_an_artifact_and_the_rest_to_the_series(tmp_path):
    from polypythia.job import rewindlog

    run = tmp_path / "run"
    fake_checkpoint(run, 4)
    fake_checkpoint(run, 8)
    client, logger = FakeClient(), FakeLogger()
    logged = {"train/loss": 9, "valid/loss": 8}
    rewound = rewindlog.start(str(run), RewindRequest(1, decision_step=8, reason="alert"), client, "r", logged)
    assert rewound.logged_through == logged and rw.load(run)[0].logged_through == logged
    tag = client.tags["stability.rewind.1"]
    assert "back to checkpoint step 4" in tag and "batches [4, 8) skipped" in tag and "steps 5-9" in tag
    assert rewindlog.start(str(run), None, FakeClient(), "r", {"train/loss": 99}).logged_through == logged  # kept

    divert = rewindlog.RewoundLogger(logger, rewound, client, "r", str(run))
    for step in range(4, 12):
        divert.log(step, {"train/loss": float(step)})
    divert.log(8, {"valid/loss": 0.5})
    divert.flush()  # the logger's own methods pass through
    assert logger.flushed == 1 and logger.points == [(4, "train/loss"), (10, "train/loss"), (11, "train/loss")]
    divert.before_checkpoint(8, None)
    divert.log(6, {"train/loss": 60.0})  # a retried attempt trains step 6 again: the latest value is kept
    divert.on_train_end(None)
    rows = client.texts["rewinds/rewind1.csv"].splitlines()
    assert rows[0] == "step,key,value" and len(rows) == 1 + 5 + 1
    assert "6,train/loss,60.0" in rows and "8,valid/loss,0.5" in rows and "9,train/loss,9.0" in rows
    assert (run / "rewound" / "rewind1" / "retrained_metrics.csv").is_file()


def test_a_refused_rewind_is_a_tag_and_the_run_goes_on(tmp_path):
    from polypythia.job import rewindlog

    client = FakeClient()
    assert rewindlog.start(str(tmp_path / "run"), RewindRequest(1, 8, reason="step=8"), client, "r", {}) is None
    assert client.tags["stability.rewind.1"].startswith("not done (step=8): no checkpoint")


def test_the_monitor_forgets_a_rewound_runs_abandoned_steps(tmp_path):
    from polypythia.driver.seedband import Group, SeedBandMonitor

    grid = (2, 4, 6, 8)
    monitor = SeedBandMonitor([Group("s", "tiny", grid, 1, [0, 1, 2, 3, 4])])
    healthy = {i: {s: 2.0 + 0.01 * i + 0.001 * s for s in grid} for i in range(4)}
    bad = {2: 2.04, 4: 2.05, 6: 9.0, 8: 9.5}
    rows = {i: {"state": "running", "step": 8, "smoothed": healthy[i]} for i in range(4)}
    rows[4] = {"state": "running", "step": 8, "smoothed": bad}
    decisions, _ = monitor.observe(rows)
    assert monitor.alerts[4].step == 6
    # rewound: its row shows step 0 until the new attempt starts, so the abandoned values are not read
    rows[4] = {"state": "rewinding", "step": 0, "smoothed": bad}
    assert monitor.observe(rows) == ([], [])
    monitor.forget(4, 4)
    assert 4 not in monitor.alerts
    # the new branch, healthy, reaches step 6: decided again there (and at 8 once it gets there)
    rows[4] = {"state": "running", "step": 6, "smoothed": {**bad, 6: 2.046}}
    again, _ = monitor.observe(rows)
    assert [(d.index, d.step) for d in again] == [(4, 6)] and not again[0].alert and 4 not in monitor.alerts


def test_stall_and_process_death_retries_share_one_budget():
    from polypythia.driver.watchdog import failed_attempts

    assert failed_attempts({"attempt": 1}, ended_by_driver=1, rewound=0) == 1  # the stalled first attempt
    assert failed_attempts({"attempt": 2}, ended_by_driver=1, rewound=0) == 2  # Ray restarted a dead one before
    assert failed_attempts({"attempt": 0}, ended_by_driver=3, rewound=0) == 3  # stalls before training started
    assert failed_attempts({"attempt": 3}, ended_by_driver=2, rewound=2) == 1  # two rewinds are no failures


def test_the_monitor_action_is_checked():
    from polypythia.config.schema import MonitorConfig
    from polypythia.errors import ConfigError

    for bad, match in (
        ({"action": "pause"}, "monitor.action must be"),
        ({"skip_batches": -1}, "skip_batches"),
        ({"action": "stop", "cross_seed": False}, "monitor.cross_seed=true"),
    ):
        with pytest.raises(ConfigError, match=match):
            MonitorConfig(**bad).check()
    MonitorConfig(action="rewind", skip_batches=0, max_rewinds=0).check()
    assert JobOutcome(state="stopped").ok and not JobOutcome(state="stopped").finished


def test_an_interrupted_prepare_closes_the_parent_run_it_made(tmp_path, cache_dir, monkeypatch):
    """Ctrl-C after the parent run exists, before the jobs start: KILLED, failure_reason=interrupted."""
    from polypythia.config.jobconfig import to_dict
    from polypythia.driver import sweep
    from polypythia.jobspec import JobRequest
    from polypythia.tracking import client as tracking
    from polypythia.tracking import ui as mlflow_ui

    calls = []
    client = SimpleNamespace(
        create_run=lambda exp, run_name, tags: SimpleNamespace(info=SimpleNamespace(run_id="parent-1")),
        set_tag=lambda run_id, key, value: calls.append(("tag", run_id, key, value)),
        set_terminated=lambda run_id, status: calls.append(("end", run_id, status)),
        search_runs=lambda *a, **k: [],
    )  # no earlier sweep of the study to close (polypythia.driver.orphans)
    monkeypatch.setattr(tracking, "client", lambda uri: client)
    monkeypatch.setattr(tracking, "experiment_id", lambda c, name: "7")
    monkeypatch.setattr(tracking, "resolve_tracking_uri", lambda *a: "http://127.0.0.1:1")

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow_ui, "mark_training_experiment", interrupt)
    s = sweep.Sweep([JobRequest(config=to_dict(tiny_job(tmp_path, cache_dir)))], launch_dir=str(tmp_path))
    for step in ("_build_data_caches", "_init_ray", "_check_resources", "_reserve_workers"):
        monkeypatch.setattr(s, step, lambda: None)
    with pytest.raises(KeyboardInterrupt):
        s.prepare()
    assert calls == [("tag", "parent-1", "failure_reason", "interrupted"), ("end", "parent-1", "KILLED")]


def test_the_stop_action_returns_the_stopped_outcome_and_closes_the_run_at_once(tmp_path, cache_dir, monkeypatch):
    from polypythia.driver import watchdog
    from polypythia.driver.actions import MonitorActions, Taken
    from polypythia.driver.seedband import Decision, SeedBandMonitor
    from polypythia.driver.seedbandlog import MonitorLog
    from polypythia.jobspec import JobState

    jobs = [tiny_job(tmp_path, cache_dir, seed=1, monitor__action="stop")]
    monitor, cancelled, tags, ended = SeedBandMonitor([]), [], {}, []
    monkeypatch.setattr(watchdog, "ended", lambda ref: False)  # its task still runs
    monkeypatch.setattr(watchdog, "cancel", cancelled.append)
    client = SimpleNamespace(
        set_tag=lambda run_id, k, v: tags.__setitem__((run_id, k), v),
        set_terminated=lambda run_id, status: ended.append((run_id, status)),
    )
    watch = MonitorLog(monitor, client, {}, jobs)
    watch.run_ids = {0: "run0"}
    board = SimpleNamespace(update=SimpleNamespace(remote=lambda i, u: None))
    alert = Decision(0, "s/tiny", 16, 9.0, 12.0, 8.0, 4)
    result = MonitorActions(jobs, monitor).act("task-0", 0, alert, {"step": 20, "total": 40}, board, watch)
    assert result.taken is Taken.STOPPED and result.outcome.state is JobState.STOPPED and result.outcome.ok
    assert cancelled == ["task-0"] and ended == [("run0", "KILLED")]
    assert tags[("run0", "failure_reason")].startswith(
        "stopped by the cross-seed monitor (monitor.action=stop) at step 20"
    )


def test_the_driver_rewinds_a_run_that_finished_before_its_alert_and_counts_its_rewinds(tmp_path, cache_dir, capsys):
    from polypythia.driver.actions import KEEP, MonitorActions, Taken
    from polypythia.driver.seedband import Decision, SeedBandMonitor
    from polypythia.driver.seedbandlog import MonitorLog

    jobs = [
        tiny_job(tmp_path, cache_dir, seed=s, monitor__action=a, monitor__max_rewinds=1)
        for s, a in ((1, "rewind"), (2, "stop"), (3, "none"))
    ]
    monitor = SeedBandMonitor([])
    actions = MonitorActions(jobs, monitor)
    updates, tags, statuses = [], {}, []
    board = SimpleNamespace(update=SimpleNamespace(remote=lambda i, u: updates.append((i, u))))
    client = SimpleNamespace(
        set_tag=lambda run_id, k, v: tags.__setitem__((run_id, k), v),
        update_run=lambda run_id, status: statuses.append((run_id, status)),
    )
    watch = MonitorLog(monitor, client, {}, jobs)
    watch.run_ids = {i: f"run{i}" for i in range(3)}  # found already (MonitorLog.run_id)
    finished = {i: JobOutcome(state="finished") for i in range(3)}
    for i in range(3):
        monitor.alerts[i] = Decision(i, "s/tiny", 16, 9.0, 12.0, 8.0, 4)
    due = actions.due({}, finished)
    assert [(ref, i) for ref, i, _ in due] == [(None, 0), (None, 1)]  # action none: nothing to do
    row = {"step": 40, "total": 40, "attempt": 1}
    result = actions.act(None, 0, due[0][2], row, board, watch)
    assert result.taken is Taken.RESUBMIT and result.outcome is None
    assert actions.requests[0] == RewindRequest(1, 16, None, "step=16 signal=loss deviation=+12.00")
    assert statuses == [("run0", "RUNNING")] and updates == [(0, {"state": "rewinding", "step": 0})]
    assert 0 not in monitor.alerts and actions.due({}, finished) == [(None, 1, due[1][2])]
    assert actions.act(None, 1, due[1][2], row, board, watch) == KEEP  # a finished run is not stopped
    assert tags[("run1", "stability.action")].startswith("alert only: the run had trained all its steps")

    actions.restarted({0: {"attempt": 2, "first_step": 10}})  # the new attempt: the monitor forgets, awaits no more
    monitor.alerts[0] = Decision(0, "s/tiny", 20, 9.0, 12.0, 8.0, 4)  # the new branch alerts again
    (again,) = actions.due({}, finished)
    assert actions.act(None, 0, again[2], row, board, watch) == KEEP
    assert tags[("run0", "stability.action")].startswith("alert only: monitor.max_rewinds=1 reached")
    assert "[monitor] tiny-seed1: rewind 1 requested after it had finished" in capsys.readouterr().out
