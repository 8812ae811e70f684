"""The end-of-sweep summary and the command line (file sources; MLflow is in test_mlflow.py)."""

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from analysis import final_loss_summary
from analysis.__main__ import main
from analysis.summary import summary_table


def _finals_frame(finals: dict) -> pd.DataFrame:
    rows = []
    for seed, final in finals.items():
        rows += [("70m", seed, step, "train/loss", value) for step, value in ((0, 10.0), (100, final))]
    return pd.DataFrame(rows, columns=["model", "seed", "step", "metric", "value"])


def _runs(statuses: dict) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": "70m",
            "seed": list(statuses),
            "run_id": [f"r{s}" for s in statuses],
            "status": [status for status, _ in statuses.values()],
            "diverged": [diverged for _, diverged in statuses.values()],
            "weight_seed": list(statuses),
            "data_seed": list(statuses),
            "budget": None,
        }
    )


def test_final_loss_summary_numbers():
    finals = {0: 2.50, 1: 2.52, 2: 2.49, 3: 2.51, 4: 2.50, 5: 3.40}
    frame = _finals_frame(finals)
    summary = final_loss_summary(frame, _runs({s: ("FINISHED", False) for s in finals})).iloc[0]
    values = np.array(list(finals.values()))
    assert summary["final_loss_by_seed"] == {str(seed): value for seed, value in finals.items()}
    assert summary["mean"] == pytest.approx(values.mean()) and summary["std"] == pytest.approx(values.std(ddof=1))
    assert (summary["min"], summary["max"]) == (2.49, 3.40)
    assert summary["flagged_seeds"] == ["5"] and summary["diverged_or_failed_seeds"] == []  # a finished outlier
    console = Console(file=io.StringIO(), width=200)
    console.print(summary_table(final_loss_summary(frame, None), "t"))
    assert "3.4000" in console.file.getvalue()


@pytest.mark.parametrize("status,diverged", [("FAILED", True), ("KILLED", False), ("FINISHED", True)])
def test_a_run_that_ended_early_is_shown_but_left_out_of_the_spread(status, diverged):
    """Failed, stopped by the cross-seed monitor (KILLED) or diverged: its last loss is from an
    earlier step than the others' final loss, so it is no final value to average or flag."""
    finals = {0: 2.50, 1: 2.52, 2: 2.49, 3: 2.51, 4: 2.50, 5: 3.40}
    statuses = {s: ("FINISHED", False) for s in finals} | {5: (status, diverged)}
    summary = final_loss_summary(_finals_frame(finals), _runs(statuses))
    row = summary.iloc[0]
    kept = np.array([finals[s] for s in range(5)])
    assert row["final_loss_by_seed"]["5"] == 3.40 and row["n_seeds"] == 6
    assert row["mean"] == pytest.approx(kept.mean()) and row["std"] == pytest.approx(kept.std(ddof=1))
    assert (row["min"], row["max"]) == (2.49, 2.52)
    assert row["flagged_seeds"] == [] and row["diverged_or_failed_seeds"] == ["5"]
    console = Console(file=io.StringIO(), width=250)
    console.print(summary_table(summary, "t"))
    text = console.file.getvalue()
    assert "3.4000" in text and "ended early" in text and "trained to their end" in text


def test_cli_full_analysis_on_csv(tmp_path, outlier_study, capsys):
    path = tmp_path / "study.csv"
    dense = outlier_study["metric"].astype(str).str.startswith("train/")
    outlier_study[~dense | (outlier_study["step"] % 10 == 0)].to_csv(path, index=False)  # keep the test fast
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--max-states", "4", "--restarts", "1"]) == 0
    for name in (
        "stats.csv",
        "spikes.csv",
        "outliers.csv",
        "training_maps.csv",
        "report.md",
        "analysis_loss_curves.png",
        "analysis_metrics.png",
        "analysis_training_map_410m.png",
    ):
        assert (out / name).is_file(), name
    outliers = pd.read_csv(out / "outliers.csv")
    assert {"model", "seed", "metric", "rule", "onset_step", "recovered"} <= set(outliers.columns)
    calibrated = outliers[outliers.rule == "calibrated"]
    assert set(calibrated["seed"]) == {3, 7} and set(calibrated["metric"]) == {"standardised_accuracy"}
    assert {"weight_seed", "data_seed", "band_deviation_sd", "threshold_sd"} <= set(outliers.columns)
    maps = pd.read_csv(out / "training_maps.csv")
    assert list(maps.columns) == ["model", "seed", "step", "state"]
    report = (out / "report.md").read_text()
    assert "analysis_loss_curves.png" in report and "## Outlier runs" in report
    assert main([str(path)]) == 0  # summary of a file source
    assert "Final train/loss" in capsys.readouterr().out


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main([str(tmp_path / "nope.csv")]) == 2
    assert main(["an-experiment"]) == 2
    assert main(["an-experiment", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 4
