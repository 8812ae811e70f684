"""What a study may mix, through ``python -m analysis`` (issue #27, items 5, 7, 8b, 9b, 10): replicates
beside seeds (the nondeterminism floor), runs of other training configs, impossible values, a file-store
tracking URI, and options that would compute nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.synthetic import StudySpec, synthetic_study

KEEP = ("train/loss", "valid/loss", "eval/arc_easy/acc", "weights/w_var", "weights/trace")


@pytest.fixture(scope="module")
def small_study() -> pd.DataFrame:
    study = synthetic_study(StudySpec(models=("70m",), n_seeds=6, final_step=3000, random_state=3))
    study = study[study["metric"].astype(str).isin(KEEP)]
    dense = study["metric"].astype(str).str.startswith("train/")
    return study[~dense | (study["step"] % 20 == 0)].astype({"seed": str, "metric": str, "model": str})


def with_runs(study: pd.DataFrame) -> pd.DataFrame:
    """Seed 1 trained again (replicate 1: the same values) and with another data order (w1-d2: nearly the same)."""
    one = study[study["seed"] == "1"]
    variant = one.assign(seed="w1-d2", value=one["value"] * (1 + 1e-4))
    return pd.concat([study, one.assign(seed="1-rep1"), variant], ignore_index=True)


def test_replicates_give_the_floor_and_stay_out_of_the_seeds(tmp_path, small_study, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # the whole summary table
    path = tmp_path / "study.csv"
    with_runs(small_study).to_csv(path, index=False)
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    table, floor = out.split("Nondeterminism floor")[0], out.split("Nondeterminism floor")[1]
    assert "1-rep1" not in table and "w1-d2" in table  # the replicate has no column; the data-seed variant has one
    assert floor.startswith(
        " of 70m train/loss: replicate SD 0 (largest difference 0, 2 runs of 1 seed(s); every "
        "replicate's curve is identical to its seed run's) vs seed spread (SD over 7 seeds)"
    )
    assert "seed variance exceeds it" in floor

    result = tmp_path / "out"
    assert main([str(path), "--out", str(result), "--no-plots", "--max-states", "2", "--restarts", "1"]) == 0
    runs = pd.read_csv(result / "runs.csv", dtype={"seed": str})
    assert sorted(runs["seed"]) == ["0", "1", "2", "3", "4", "5", "w1-d2"]
    outliers = pd.read_csv(result / "outliers.csv", dtype={"seed": str})
    assert not set(outliers["seed"]) & {"1", "1-rep1", "w1-d2"}, outliers
    stats = pd.read_csv(result / "stats.csv")
    assert set(stats.loc[stats.metric == "valid/loss", "n"]) == {7}  # six seeds and the variant, not the replicate
    floor = pd.read_csv(result / "nondeterminism_floor.csv")
    assert floor.loc[0, "replicate_sd"] == 0 and bool(floor.loc[0, "curves_identical"])
    assert "Nondeterminism floor of 70m train/loss" in (result / "report.md").read_text()


def test_impossible_values_are_set_aside_with_one_note(tmp_path, small_study, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # the note on one line
    study = small_study.copy()
    acc = np.flatnonzero((study["metric"] == "eval/arc_easy/acc").to_numpy())
    study.iloc[acc[5], study.columns.get_loc("value")] = 1e300  # the reproduction: mean 3e299, std inf
    study.iloc[acc[9], study.columns.get_loc("value")] = -0.5
    study.iloc[acc[12], study.columns.get_loc("value")] = np.inf
    valid = np.flatnonzero((study["metric"] == "valid/loss").to_numpy())
    study.iloc[valid[3], study.columns.get_loc("value")] = np.nan
    path = tmp_path / "study.csv"
    study.to_csv(path, index=False)
    result = tmp_path / "out"
    assert main([str(path), "--out", str(result), "--no-plots", "--max-states", "2", "--restarts", "1"]) == 0
    err = capsys.readouterr().err
    note = (
        "Set aside 4 value(s) that cannot be measurements (2 NaN or infinite, 2 outside their metric's range "
        "such as an accuracy outside [0, 1]) of eval/arc_easy/acc (3), valid/loss (1); they enter no statistic."
    )
    assert note in err  # printed at the end (and logged while loading)
    stats = pd.read_csv(result / "stats.csv")
    accuracy = stats[stats.metric == "eval/arc_easy/acc"]
    assert accuracy["max"].max() <= 1 and accuracy["min"].min() >= 0 and np.isfinite(accuracy["std"]).all()
    assert note in (result / "report.md").read_text()


def job_run(client, experiment_id, seed, steps, lr="0.001", losses=(3.0, 2.5)):
    """A job run as polypythia logs it: tags, its config as params, a train/loss curve."""
    run = client.create_run(
        experiment_id,
        run_name=f"tiny-seed{seed}",
        tags={"polypythia.kind": "job", "model": "tiny", "seed": str(seed), "budget": "smoke"},
    )
    params = {
        "budget.steps": str(steps),
        "train.lr": lr,
        "budget.global_batch_size": "4",
        "seed": str(seed),
        "launcher.num_cpus_per_job": "1.0",
    }
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    for step, loss in enumerate(losses, start=1):
        client.log_metric(run.info.run_id, "train/loss", loss + seed / 100, step=step)
    client.set_terminated(run.info.run_id)


def test_runs_of_other_training_configs_are_refused_naming_the_keys(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    mixed, same = client.create_experiment("mixed"), client.create_experiment("same")
    for seed, steps, lr in ((1, 6, "0.001"), (2, 6, "0.001"), (3, 400, "0.001"), (4, 1000, "0.0003")):
        job_run(client, mixed, seed, steps, lr)
    for seed in (1, 2, 3):
        job_run(client, same, seed, 6)
    capsys.readouterr()
    for extra in ([], ["--out", str(tmp_path / "out"), "--no-plots"]):
        assert main(["mixed", "--tracking-uri", uri, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert (
            "error: The runs of model tiny were trained with different configs (budget.steps 6 (runs 1, 2) / "
            "400 (run 3) / 1000 (run 4); train.lr 0.001 (runs 1, 2, 3) / 0.0003 (run 4)), so their spread is "
            "not a seed spread;"
        ) in err
    assert not (tmp_path / "out").exists()
    assert main(["same", "--tracking-uri", uri]) == 0  # seeds of one config (the seed params differ, as they must)
    assert "Final train/loss of same" in capsys.readouterr().out


@pytest.mark.parametrize(
    "option", [["--spike-window", "0"], ["--max-states", "0"], ["--min-checkpoints", "0"], ["--states", "99"]]
)
def test_options_that_would_compute_nothing_are_one_line_errors(tmp_path, small_study, capsys, option):
    path = tmp_path / "study.csv"
    small_study.to_csv(path, index=False)
    assert main([str(path), "--out", str(tmp_path / "out"), "--no-plots", "--restarts", "1", *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert option[0] in err
    if option[0] == "--states":
        assert "is more than the" in err and "checkpoint rows the training map of 70m is fitted on" in err


def test_a_file_store_tracking_uri_is_one_line(tmp_path, capsys):
    assert main(["polypythia", "--tracking-uri", f"file:{tmp_path / 'mlruns'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is an MLflow file store" in err and "Traceback" not in err


def test_a_replay_of_one_run_says_there_is_nothing_to_compare(tmp_path, small_study, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # the line unwrapped
    path = tmp_path / "one.csv"
    small_study[small_study["seed"] == "2"].to_csv(path, index=False)
    assert main([str(path), "--replay"]) == 0
    out = capsys.readouterr().out
    assert "holds one run per model, and a run cannot be compared with siblings" in out
    assert "every run stayed with its siblings" not in out
