"""The MLflow loader, summary and analysis against a real ``mlflow server`` (integration)."""

import io

import numpy as np
import pytest
from rich.console import Console

from analysis import load_study, print_summary, run_analysis
from analysis.report import AnalysisOptions

pytestmark = pytest.mark.integration
EXPERIMENT = "polypythia-test-study"


def log_fake_sweep(tracking_uri: str) -> tuple[str, dict]:
    """A parent run (polypythia.kind=sweep) and three 70m child runs; seed 2 diverges and fails."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    parent = client.create_run(experiment_id, run_name="sweep", tags={"polypythia.kind": "sweep"}).info.run_id
    rng = np.random.default_rng(0)
    finals = {}
    for seed in range(3):
        tags = {
            "mlflow.parentRunId": parent,
            "polypythia.kind": "job",
            "model": "70m",
            "seed": str(seed),
            "weight_seed": str(seed),
            "data_seed": str(seed),
            "budget": "demo",
        }
        if seed == 2:
            tags["diverged"] = "true"
        run_id = client.create_run(experiment_id, run_name=f"70m-seed{seed}", tags=tags).info.run_id
        steps = np.arange(0, 200)
        loss = 6 * (steps + 5.0) ** -0.2 + rng.normal(0, 0.01, len(steps)) + (1.0 if seed == 2 else 0.0) * (steps > 150)
        metrics = [Metric("train/loss", float(v), 0, int(s)) for s, v in zip(steps, loss)]
        metrics += [Metric("train/grad_norm", 1.0, 0, int(s)) for s in steps]
        for step in (0, 50, 100, 150, 199):
            metrics += [
                Metric(f"weights/f{i}", float(np.log1p(step) * (i + 1) + rng.normal(0, 0.1)), 0, step) for i in range(3)
            ]
            metrics += [
                Metric("valid/loss", float(loss[step]), 0, step),
                Metric("eval/piqa/acc", float(0.5 + step / 1000 + rng.normal(0, 0.01)), 0, step),
            ]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        client.set_terminated(run_id, "FAILED" if seed == 2 else "FINISHED")
        finals[seed] = float(loss[-1])
    return parent, finals


def log_data_seed_sweep(tracking_uri: str) -> str:
    """What ``launch.py -m seed=1 data_seed=1,2,3 model=tiny`` logs: three runs of seed 1, three data orders."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parent = client.create_run(experiment_id, run_name="sweep-variants", tags={"polypythia.kind": "sweep"}).info.run_id
    for data_seed, name in ((1, "tiny-seed1"), (2, "tiny-wseed1-dseed2"), (3, "tiny-wseed1-dseed3")):
        tags = {
            "mlflow.parentRunId": parent,
            "polypythia.kind": "job",
            "model": "tiny",
            "seed": "1",
            "weight_seed": "1",
            "data_seed": str(data_seed),
            "budget": "smoke",
        }
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        client.log_batch(
            run_id,
            metrics=[Metric("train/loss", 5.0 - 0.1 * step + 0.01 * data_seed, 0, step) for step in range(6)]
            + [Metric("valid/loss", 5.0 + 0.01 * data_seed, 0, step) for step in (0, 4)],
        )
        client.set_terminated(run_id, "FINISHED")
    return parent


def test_seed_variants_stay_apart(mlflow_server, tmp_path):
    log_fake_sweep(mlflow_server)
    parent = log_data_seed_sweep(mlflow_server)
    study = load_study(EXPERIMENT, tracking_uri=mlflow_server, parent_run_id=parent)
    assert study.runs[["seed", "weight_seed", "data_seed"]].values.tolist() == [
        ["1", 1, 1],
        ["w1-d2", 1, 2],
        ["w1-d3", 1, 3],
    ]
    console = Console(file=io.StringIO(), width=200)
    summary = print_summary(mlflow_server, EXPERIMENT, parent_run_id=parent, console=console).iloc[0]
    assert summary["n_seeds"] == 3 and list(summary["final_loss_by_seed"]) == ["1", "w1-d2", "w1-d3"]
    out = tmp_path / "analysis"
    run_analysis(study, out, AnalysisOptions(n_resamples=200, make_plots=False), log_to_mlflow=False)
    import pandas as pd

    assert len(pd.read_csv(out / "runs.csv")) == 3
    stats = pd.read_csv(out / "stats.csv")
    assert set(stats.loc[stats.metric == "valid/loss", "n"]) == {3}
    assert "data seed only (weight seed 1)" in (out / "report.md").read_text()


def test_mlflow_study_summary_and_analysis(mlflow_server, tmp_path):
    parent, finals = log_fake_sweep(mlflow_server)
    study = load_study(EXPERIMENT, tracking_uri=mlflow_server, parent_run_id=parent)
    metrics = study.metrics
    assert sorted(metrics["seed"].unique()) == ["0", "1", "2"]  # run labels
    assert set(metrics["model"].astype(str)) == {"70m"}
    loss = metrics[(metrics.metric == "train/loss") & (metrics.seed == "1")].sort_values("step")
    assert len(loss) == 200 and loss["value"].iloc[-1] == pytest.approx(finals[1])
    runs = study.runs.set_index("seed")
    assert runs.loc["2", "status"] == "FAILED" and runs.loc["2", "diverged"] and not runs.loc["0", "diverged"]

    console = Console(file=io.StringIO(), width=200)
    summary = print_summary(mlflow_server, EXPERIMENT, parent_run_id=parent, console=console).iloc[0]
    assert summary["final_loss_by_seed"] == pytest.approx({str(k): v for k, v in finals.items()})
    assert summary["diverged_or_failed_seeds"] == ["2"]
    assert "70m" in console.file.getvalue()

    out = tmp_path / "analysis"
    result = run_analysis(study, out, AnalysisOptions(max_states=2, n_restarts=1, n_resamples=200))
    assert (out / "report.md").is_file() and (out / "training_maps.csv").is_file()
    assert result.maps is not None and set(result.maps.paths["seed"].astype(str)) == {"0", "1", "2"}

    from mlflow.tracking import MlflowClient

    logged = [f.path for f in MlflowClient(mlflow_server).list_artifacts(parent, "analysis")]
    assert "analysis/report.md" in logged and "analysis/stats.csv" in logged
