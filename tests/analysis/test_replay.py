"""Causal replay: every decision from data up to its step; alerts at the collapse, not before."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import find_outliers
from analysis.__main__ import main
from analysis.replay import SMOOTHED_LOSS, replay
from analysis.synthetic import Dip, correlated_study


def test_replay_alerts_at_a_planted_late_collapse_and_not_before():
    study = correlated_study(dips=(Dip(seed=5, onset_step=113_000, depth_sd=12.0),), random_state=21)
    alerts = replay(study, find_outliers(study, outlier_metrics=["score"]), ["score"])
    assert alerts[["seed", "signal", "alert_step", "onset_step", "lead_steps"]].values.tolist() == [
        ["5", "score", 113_000, 113_000, 0]
    ]


def test_replay_is_quiet_on_healthy_runs(stable_study):
    alerts = replay(stable_study, find_outliers(stable_study))
    assert alerts.empty


def test_replay_reads_the_smoothed_training_loss(outlier_study):
    alerts = replay(outlier_study, find_outliers(outlier_study))
    assert set(alerts["seed"]) <= {"3", "7"}  # only the collapsing 410m seeds may alert
    assert not (alerts["signal"] == SMOOTHED_LOSS).any()  # their loss curves were never planted


def test_replay_command_writes_alerts(tmp_path):
    study = correlated_study(dips=(Dip(seed=2, onset_step=93_000, depth_sd=15.0),), random_state=3)
    path = tmp_path / "study.csv"
    study.to_csv(path, index=False)
    assert main([str(path), "--replay", "--outlier-metric", "score", "--out", str(tmp_path / "out")]) == 0
    alerts = pd.read_csv(tmp_path / "out" / "alerts.csv")
    assert alerts[["seed", "alert_step", "lead_steps"]].values.tolist() == [[2, 93_000, 0]]


def test_the_replayed_per_step_signal_is_a_parameter(outlier_study):
    """replay(..., loss_signal=...) smooths that signal: the mean of each run's values over the window."""
    import numpy as np

    from analysis.replay import smoothed_loss, smoothed_name

    rows = smoothed_loss(outlier_study, np.array([10_000]), 1_000, "train/grad_norm")
    assert set(rows["metric"]) == {smoothed_name("train/grad_norm")} == {"train/grad_norm (smoothed)"}
    run = outlier_study[
        (outlier_study["metric"] == "train/grad_norm")
        & (outlier_study["model"] == "70m")
        & (outlier_study["seed"].astype(str) == "2")
    ]
    expected = run.loc[(run["step"] > 9_000) & (run["step"] <= 10_000), "value"].mean()
    (got,) = rows.loc[(rows["model"] == "70m") & (rows["seed"] == "2"), "value"]
    assert got == pytest.approx(expected)
    alerts = replay(outlier_study, find_outliers(outlier_study), loss_signal="train/grad_norm")
    assert SMOOTHED_LOSS not in set(alerts["signal"])
