"""The checkpoint-evaluation command: folder layout, planning, idempotence, tables, and a real study end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import FakeMlflow

from polypythia.evaluate import downstream, evaluators, runner, weight_stats
from polypythia.evaluate.downstream import TASK_NAMES, TaskResult
from polypythia.evaluate.results import read_result, write_result
from polypythia.evaluate.runner import EvalOptions
from polypythia.evaluate.tables import reference_run
from polypythia.evaluate.targets import EvaluationError, config_from_params, parse_run_name, targets_from_folder
from polypythia.study import run_label
from polypythia.train.distributed import RENDEZVOUS_ENV

REPO = Path(__file__).resolve().parents[2]


def save_folder_study(root: Path, make_model, names=("pythia-tiny-seed1", "pythia-tiny-seed2"), steps=(0, 10)) -> Path:
    """A published-layout folder ``<name>/step<S>/`` of tiny saved GPT-NeoX checkpoints."""
    for index, name in enumerate(names):
        for step in steps:
            make_model(seed=index * 100 + step).save_pretrained(root / name / f"step{step}")
    return root


@pytest.fixture
def counted(monkeypatch):
    """Count model work: weight statistics, validation losses and lm-eval runs (lm-eval replaced by a fake)."""
    calls = {"weights": 0, "valid": 0, "tasks": 0}
    real_weight_stats = weight_stats.weight_stats_from_checkpoint
    real_valid = evaluators.compute_valid

    def fake_evaluate_checkpoint(checkpoint_dir, task_names, batch_size, device, limit_items):
        calls["tasks"] += 1
        step = int(Path(checkpoint_dir).name.removeprefix("step"))
        items = limit_items or 6
        preds = np.array([(i + step) % 4 for i in range(items)])
        return {t: TaskResult(accuracy=float(np.mean(preds == 0)), predictions=preds) for t in task_names}

    def counted_weight_stats(path, **kwargs):
        calls["weights"] += 1
        return real_weight_stats(path, **kwargs)

    def counted_valid(*args, **kwargs):
        calls["valid"] += 1
        return real_valid(*args, **kwargs)

    monkeypatch.setattr(downstream, "evaluate_checkpoint", fake_evaluate_checkpoint)
    monkeypatch.setattr(weight_stats, "weight_stats_from_checkpoint", counted_weight_stats)
    monkeypatch.setattr(evaluators, "compute_valid", counted_valid)
    return calls


def test_folder_names_give_model_and_seed(tmp_path):
    assert parse_run_name("pythia-70m-seed3") == ("70m", 3, 3)
    assert parse_run_name("pythia-70m") == ("70m", 0, 0)  # the original Pythia run is seed 0
    assert parse_run_name("70m-seed1") == ("70m", 1, 1)
    assert parse_run_name("pythia-410m-deduped-seed9") == ("410m-deduped", 9, 9)
    assert parse_run_name("pythia-410m-seed10") == ("410m", 10, 10)
    # run folders of studies trained here: <model>-seed<k>, or <model>-wseed<w>-dseed<d> when the seeds differ
    assert parse_run_name("tiny-seed1") == ("tiny", 1, 1)
    assert parse_run_name("tiny-wseed1-dseed2") == ("tiny", 1, 2)
    assert parse_run_name("160m-wseed12-dseed345") == ("160m", 12, 345)
    assert parse_run_name("tiny") == ("tiny", 0, 0)
    for name, step in (("pythia-70m-seed3", 1000), ("pythia-70m", 0), ("70m-seed1", 512)):
        (tmp_path / "in" / name / f"step{step}").mkdir(parents=True)
        (tmp_path / "in" / name / f"step{step}" / "config.json").write_text("{}")
    (tmp_path / "in" / "pythia-70m-seed3" / "step2000").mkdir()  # no config.json: not a checkpoint
    (tmp_path / "in" / "notes").mkdir()
    targets = {t.name: t for t in targets_from_folder(tmp_path / "in", tmp_path / "out")}
    assert sorted(targets) == ["70m-seed1", "pythia-70m", "pythia-70m-seed3"]
    seeded = targets["pythia-70m-seed3"]
    assert (seeded.model, seeded.weight_seed, seeded.data_seed, [c.step for c in seeded.checkpoints]) == (
        "70m",
        3,
        3,
        [1000],
    )
    assert seeded.seed == "3" and seeded.run_key == (3, 3)
    assert seeded.checkpoints[0].results_dir == str(tmp_path / "out" / "results" / "pythia-70m-seed3" / "step1000")
    assert (targets["pythia-70m"].model, targets["pythia-70m"].run_key) == ("70m", (0, 0))


def test_seed_labels():
    assert run_label(3, 3) == "3" and run_label(1, 2) == "w1-d2" and run_label(10, 10) == "10"
    assert reference_run("3") == (3, 3) and reference_run(12) == (12, 12)
    assert reference_run("w1-d23") == (1, 23)
    for bad in ("w1", "seed3", "-1", "w1-d"):
        with pytest.raises(EvaluationError, match="neither a seed"):
            reference_run(bad)


def test_folder_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(EvaluationError, match="holds no <name>/step<S>/ folders"):
        targets_from_folder(tmp_path, tmp_path / "out")


def test_params_rebuild_the_config():
    params = {
        "model.name": "tiny",
        "model.vocab_size": "None",
        "budget.steps": "6",
        "train.fault.nan_seeds": "[1, 2]",
        "launcher.progress": "True",
        "model.lr": "0.001",
    }
    nested = config_from_params(params)
    assert nested["model"] == {"name": "tiny", "vocab_size": None, "lr": 0.001}
    assert nested["budget"]["steps"] == 6 and nested["train"]["fault"]["nan_seeds"] == [1, 2]
    assert nested["launcher"]["progress"] is True


def test_second_pass_loads_no_model(tmp_path, make_tiny_model, counted):
    root = save_folder_study(tmp_path / "ckpts", make_tiny_model)
    options = EvalOptions(limit_items=5)
    targets = targets_from_folder(root, tmp_path / "out")
    first = runner.evaluate_targets(
        targets, options, out_dir=tmp_path / "out", execution=runner.Execution(use_ray=False, show_progress=False)
    )
    assert counted == {"weights": 4, "valid": 0, "tasks": 4}  # one lm-eval run per checkpoint for both tasks
    assert first.computed == {WHAT: 4 for WHAT in ("weights", *TASK_NAMES)} and first.skipped["unavailable"] == 4
    lines = []
    second = runner.evaluate_targets(
        targets_from_folder(root, tmp_path / "out"),
        options,
        out_dir=tmp_path / "out",
        execution=runner.Execution(use_ray=False, show_progress=False, echo=lines.append),
    )
    assert counted == {"weights": 4, "valid": 0, "tasks": 4} and second.nothing_to_do
    assert lines[0].startswith("nothing to do")
    # another item limit makes the task results stale, but not the weight statistics
    runner.evaluate_targets(
        targets_from_folder(root, tmp_path / "out"),
        EvalOptions(limit_items=3),
        execution=runner.Execution(use_ray=False, show_progress=False, echo=lines.append),
    )
    assert counted == {"weights": 4, "valid": 0, "tasks": 8}


def test_tables_are_tidy_and_agreement_uses_smallest_seed(tmp_path, make_tiny_model, counted):
    root = save_folder_study(tmp_path / "ckpts", make_tiny_model, names=("pythia-tiny-seed2", "pythia-tiny-seed5"))
    out = tmp_path / "out"
    runner.evaluate_targets(
        targets_from_folder(root, out),
        EvalOptions(limit_items=4),
        out_dir=out,
        execution=runner.Execution(use_ray=False, show_progress=False),
    )
    metrics = pd.read_csv(out / "checkpoint_metrics.csv")
    assert list(metrics.columns) == ["model", "seed", "weight_seed", "data_seed", "step", "metric", "value"]
    assert set(metrics["seed"]) == {2, 5} and set(metrics["step"]) == {0, 10}
    per_checkpoint = metrics.groupby(["seed", "step"])["metric"].nunique()
    assert (per_checkpoint == len(weight_stats.FEATURE_NAMES) + len(TASK_NAMES)).all()
    agreement = pd.read_csv(out / "agreement.csv")
    assert list(agreement.columns) == ["model", "task", "seed", "weight_seed", "data_seed", "step", "kind", "kappa"]
    inter = agreement[agreement["kind"] == "inter_seed"]
    assert set(inter["seed"]) == {5} and len(inter) == 2 * len(TASK_NAMES)  # seed 2 is the reference
    assert (inter["kappa"] == 1.0).all()  # the fake predictions depend on the step only
    final = agreement[(agreement["kind"] == "self_consistency") & (agreement["step"] == 10)]
    assert (final["kappa"] == 1.0).all()
    task_file = out / "results" / "pythia-tiny-seed5" / "step10" / f"{TASK_NAMES[0]}.json"
    assert json.loads(task_file.read_text())["predictions"] == [(i + 10) % 4 for i in range(4)]


def test_weight_results_follow_the_definition(tmp_path, make_tiny_model, counted):
    """A weights file records its definition; one of the other definition is recomputed, tasks are not."""
    root = save_folder_study(tmp_path / "ckpts", make_tiny_model)
    out = tmp_path / "out"
    options = EvalOptions(tasks=(TASK_NAMES[0],), limit_items=2)
    assert options.weight_stats == "polypythias"
    runner.evaluate_targets(
        targets_from_folder(root, out), options, execution=runner.Execution(use_ray=False, show_progress=False)
    )
    assert counted == {"weights": 4, "valid": 0, "tasks": 4}
    checkpoint = targets_from_folder(root, out)[0].checkpoints[1]
    stored = read_result(checkpoint, "weights")
    assert stored["weight_stats"] == "polypythias"
    expected = weight_stats.weight_stats_from_checkpoint(checkpoint.path, definition="polypythias")
    assert stored["metrics"] == {f"weights/{k}": v for k, v in expected.items()}

    hu = EvalOptions(tasks=(TASK_NAMES[0],), limit_items=2, weight_stats="hu")
    summary = runner.evaluate_targets(
        targets_from_folder(root, out), hu, out_dir=out, execution=runner.Execution(use_ray=False, show_progress=False)
    )
    assert counted == {"weights": 4 + 1 + 4, "valid": 0, "tasks": 4}  # + 1: the test's own call above
    assert summary.computed == {"weights": 4}
    assert read_result(checkpoint, "weights")["weight_stats"] == "hu"
    metrics = pd.read_csv(out / "checkpoint_metrics.csv")
    hu_l1 = weight_stats.weight_stats_from_checkpoint(checkpoint.path, definition="hu")["l1"]
    row = metrics[(metrics["seed"] == 1) & (metrics["step"] == 10) & (metrics["metric"] == "weights/l1")]
    assert row["value"].tolist() == [pytest.approx(hu_l1)]

    # a file written before the choice existed holds hu values: current for hu, stale for polypythias
    legacy = read_result(checkpoint, "weights")
    del legacy["weight_stats"]
    write_result(checkpoint, "weights", legacy)
    assert evaluators.REGISTRY["weights"].is_current(legacy, hu) and not evaluators.REGISTRY["weights"].is_current(
        legacy, options
    )
    assert runner.evaluate_targets(
        targets_from_folder(root, out), hu, execution=runner.Execution(use_ray=False, show_progress=False)
    ).nothing_to_do


def test_unknown_definition_is_refused():
    with pytest.raises(EvaluationError, match="Unknown weight-statistics definition 'paper'"):
        EvalOptions(weight_stats="paper").check()


def test_definitions_agree_across_cli_config_and_module():
    from polypythia.config.jobconfig import ConfigError, TrainConfig
    from polypythia.evaluate.__main__ import WEIGHT_STATS_DEFINITIONS, parser

    assert WEIGHT_STATS_DEFINITIONS == weight_stats.DEFINITIONS
    assert parser().parse_args(["study"]).weight_stats == weight_stats.DEFAULT_DEFINITION == TrainConfig().weight_stats
    assert parser().parse_args(["study", "--weight-stats", "hu"]).weight_stats == "hu"
    for definition in weight_stats.DEFINITIONS:
        TrainConfig(weight_stats=definition).check()
    with pytest.raises(ConfigError, match="train.weight_stats must be polypythias or hu, got 'paper'"):
        TrainConfig(weight_stats="paper").check()


def config_only_study(root: Path, names, steps=(0, 10)) -> Path:
    """Step folders with just a config.json: enough for targets, nothing a model could be built from."""
    for name in names:
        for step in steps:
            (root / name / f"step{step}").mkdir(parents=True)
            (root / name / f"step{step}" / "config.json").write_text("{}")
    return root


def test_mlflow_weights_are_copied_and_logged_only_for_the_same_definition(tmp_path):
    root = config_only_study(tmp_path / "ckpts", ["pythia-tiny-seed1"])
    weight_keys = evaluators.metric_keys("weights")
    hu_logged = {k: {0: 1.0, 10: 2.0} for k in weight_keys}

    def target(out, tag=None):
        (found,) = targets_from_folder(root, tmp_path / out)
        found.run_id, found.mlflow_weight_stats = "run", tag
        return found

    # weights logged without a weight_stats tag predate it: hu
    untagged = target("a")
    assert (
        evaluators.mlflow_weight_stats(untagged, hu_logged) == "hu"
        and evaluators.mlflow_weight_stats(untagged, {}) is None
    )
    counts = runner.plan_run(untagged, EvalOptions(tasks=(), weight_stats="hu"), hu_logged)
    assert counts["from_mlflow"] == 2 and not untagged.plan
    copied = read_result(untagged.checkpoints[0], "weights")
    assert copied == {"metrics": {k: 1.0 for k in weight_keys}, "source": "mlflow", "weight_stats": "hu"}
    other = target("b")
    counts = runner.plan_run(other, EvalOptions(tasks=()), hu_logged)
    assert counts["from_mlflow"] == 0 and other.plan == {0: ["weights"], 10: ["weights"]}

    for checkpoint in other.checkpoints:  # as if computed
        write_result(checkpoint, "weights", {"metrics": {k: 0.5 for k in weight_keys}, "weight_stats": "polypythias"})
    options = EvalOptions(tasks=())
    client = FakeMlflow()  # the run holds hu weights: polypythias values are not mixed in
    assert runner.log_new_metrics(client, other, options, hu_logged) == 0 and client.tags == {}
    client = FakeMlflow()  # tagged hu by training, but no weights logged: log them and retag
    other.mlflow_weight_stats = "hu"
    assert runner.log_new_metrics(client, other, options, {}) == 2 * len(weight_keys)
    assert client.tags == {"weight_stats": "polypythias"} and other.mlflow_weight_stats == "polypythias"
    client = FakeMlflow()  # polypythias weights at step 0 already: only step 10 is sent
    partly = {k: {0: 0.5} for k in weight_keys}
    assert runner.log_new_metrics(client, other, options, partly) == len(weight_keys)
    assert {step for _, step in client.points} == {10} and client.tags == {}


def test_validation_loss_from_indexed_data(tmp_path, make_tiny_model, counted):
    from polypythia.data.indexed import write_indexed_dataset

    root = save_folder_study(tmp_path / "ckpts", make_tiny_model, names=("pythia-tiny",), steps=(0,))
    prefix = tmp_path / "valid"
    write_indexed_dataset(prefix, [np.arange(200, dtype=np.int64) % 256], np.uint16)
    valid = {"kind": "indexed", "prefix": str(prefix), "seq_length": 16, "max_rows": 5}
    targets = targets_from_folder(root, tmp_path / "out", valid)
    runner.evaluate_targets(
        targets,
        EvalOptions(tasks=(TASK_NAMES[0],), limit_items=2),
        execution=runner.Execution(use_ray=False, show_progress=False),
    )
    result = read_result(targets[0].checkpoints[0], "valid")
    assert counted["valid"] == 1 and result["rows"] == 5
    assert result["metrics"]["valid/ppl"] == pytest.approx(np.exp(result["metrics"]["valid/loss"]))
    assert 4.0 < result["metrics"]["valid/loss"] < 7.0  # about ln(256) = 5.5 for an untrained model


def evaluate_cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in (*RENDEZVOUS_ENV, "MLFLOW_TRACKING_URI")}
    return subprocess.run(
        [sys.executable, "-m", "polypythia.evaluate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_and_unknown_experiment(tmp_path, mlflow_uri):
    assert "experiment" in evaluate_cli("--help", timeout=60).stdout
    out = evaluate_cli("no-such-study", "--tracking-uri", mlflow_uri, "--out", str(tmp_path), timeout=60)
    assert out.returncode == 2
    assert "polypythia: error: MLflow has no experiment named 'no-such-study'" in out.stderr
    out = evaluate_cli("no-such-study", timeout=60)
    assert out.returncode == 2 and "give --tracking-uri" in out.stderr


@pytest.mark.integration
@pytest.mark.slow  # long: runs in make test-slow (CI runs both)
def test_two_seed_study_end_to_end(tmp_path, mlflow_uri, cache_dir):
    from helpers import launch
    from mlflow.tracking import MlflowClient

    study = f"eval-{uuid.uuid4().hex[:8]}"
    trained = launch(
        tmp_path,
        "-m",
        "seed=1,2",
        "model=tiny",
        "budget=smoke",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
        uri=mlflow_uri,
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    out_dir = tmp_path / "eval"
    first = evaluate_cli(study, "--tracking-uri", mlflow_uri, "--limit-items", "8", "--out", str(out_dir))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "computed:" in first.stdout and "taken from MLflow" in first.stdout

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id], "tags.`polypythia.kind` = 'job'")
    assert len(runs) == 2
    keys = ["weights/l2", "weights/sv_var", "valid/loss", "valid/ppl"] + [f"eval/{t}/acc" for t in TASK_NAMES]
    history_lengths = {}
    for run in runs:
        steps = [
            int(tag.removeprefix("checkpoint.step")) for tag in run.data.tags if tag[len("checkpoint.step") :].isdigit()
        ]
        assert sorted(steps) == [0, 1, 2, 3, 4, 6]
        for key in keys:
            logged = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(logged) == sorted(steps), (run.info.run_name, key, logged)
            history_lengths[(run.info.run_id, key)] = len(logged)
        result_file = Path(run.data.tags["run_dir"]) / "checkpoints" / "step6" / "eval" / f"{TASK_NAMES[0]}.json"
        assert len(json.loads(result_file.read_text())["predictions"]) == 8

    agreement = pd.read_csv(out_dir / "agreement.csv")
    assert set(agreement["kind"]) == {"self_consistency", "inter_seed"}
    assert set(agreement.loc[agreement["kind"] == "inter_seed", "seed"]) == {2}  # seed 1 is the reference
    assert len(agreement) == len(TASK_NAMES) * (2 * 6 + 6)
    metrics = pd.read_csv(out_dir / "checkpoint_metrics.csv")
    assert len(metrics) == 2 * 6 * (len(weight_stats.FEATURE_NAMES) + 2 + len(TASK_NAMES))

    mtimes = {p: p.stat().st_mtime_ns for p in Path(runs[0].data.tags["run_dir"]).rglob("eval/*.json")}
    second = evaluate_cli(study, "--tracking-uri", mlflow_uri, "--limit-items", "8", "--out", str(out_dir))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing to do" in second.stdout and "Evaluating" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    for (run_id, key), length in history_lengths.items():
        assert len(client.get_metric_history(run_id, key)) == length  # nothing logged twice
