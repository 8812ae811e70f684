"""Runs are (model, weight seed, data seed): runs of one seed with other data seeds stay apart in the tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from polypythia import study
from polypythia.evaluate import runner, tables
from polypythia.evaluate.downstream import TASK_NAMES
from polypythia.evaluate.results import write_result
from polypythia.evaluate.runner import EvalOptions
from polypythia.evaluate.targets import RunTarget, targets_from_folder
from polypythia.evaluate.weight_stats import FEATURE_NAMES

TASK = TASK_NAMES[0]
STEPS = (0, 10)
# Folder name -> per-item predictions at step 10 (step 0: all zeros).
RUNS = {
    "tiny-seed1": [0, 1, 2, 3, 0, 1],
    "tiny-wseed1-dseed2": [0, 1, 2, 0, 0, 1],
    "tiny-wseed1-dseed3": [3, 1, 2, 3, 1, 1],
}


def fake_study(tmp_path: Path) -> tuple[list[RunTarget], EvalOptions, Path]:
    """Three runs of seed 1 with data seeds 1, 2, 3: config-only step folders and their result files."""
    options = EvalOptions(tasks=(TASK,), limit_items=6)
    root, out = tmp_path / "ckpts", tmp_path / "out"
    for name in RUNS:
        for step in STEPS:
            (root / name / f"step{step}").mkdir(parents=True)
            (root / name / f"step{step}" / "config.json").write_text("{}")
    targets = targets_from_folder(root, out)
    for target in targets:
        for checkpoint in target.checkpoints:
            weights = {f"weights/{k}": 100.0 * target.data_seed + checkpoint.step for k in FEATURE_NAMES}
            write_result(checkpoint, "weights", {"metrics": weights, "weight_stats": options.weight_stats})
            predictions = RUNS[target.name] if checkpoint.step == 10 else [0] * 6
            write_result(
                checkpoint,
                TASK,
                {"metrics": {f"eval/{TASK}/acc": 0.5}, "predictions": predictions, "limit_items": options.limit_items},
            )
    return targets, options, out


def test_three_data_seeds_of_one_seed_are_three_runs(tmp_path):
    targets, options, out = fake_study(tmp_path)
    assert sorted((t.model, t.weight_seed, t.data_seed, t.seed) for t in targets) == [
        ("tiny", 1, 1, "1"),
        ("tiny", 1, 2, "w1-d2"),
        ("tiny", 1, 3, "w1-d3"),
    ]
    summary = runner.evaluate_targets(
        targets,
        options,
        out_dir=out,
        execution=runner.Execution(use_ray=False, show_progress=False, echo=lambda _: None),
    )
    assert summary.nothing_to_do  # every result is there: the tables are written from the files

    metrics = pd.read_csv(out / "checkpoint_metrics.csv", dtype={"seed": str})
    assert list(metrics.columns) == study.TIDY_COLUMNS_WITH_SEEDS
    runs = metrics[["seed", "weight_seed", "data_seed"]].drop_duplicates()
    assert sorted(map(tuple, runs.to_numpy().tolist())) == [("1", 1, 1), ("w1-d2", 1, 2), ("w1-d3", 1, 3)]
    assert len(metrics) == 3 * len(STEPS) * (len(FEATURE_NAMES) + 1)  # nothing merged, nothing lost
    l1 = metrics[(metrics["metric"] == "weights/l1") & (metrics["step"] == 10)].set_index("seed")["value"]
    assert l1.to_dict() == {"1": 110.0, "w1-d2": 210.0, "w1-d3": 310.0}

    agreement = pd.read_csv(out / "agreement.csv", dtype={"seed": str})
    assert list(agreement.columns) == tables.AGREEMENT_COLUMNS
    own = agreement[agreement["kind"] == "self_consistency"]
    assert sorted(set(own["seed"])) == ["1", "w1-d2", "w1-d3"] and len(own) == 3 * len(STEPS)
    inter = agreement[agreement["kind"] == "inter_seed"]  # reference: the smallest (weight seed, data seed), (1, 1)
    assert sorted(set(inter["seed"])) == ["w1-d2", "w1-d3"] and len(inter) == 2 * len(STEPS)
    at_10 = inter[inter["step"] == 10].set_index("seed")["kappa"]
    for name, label in (("tiny-wseed1-dseed2", "w1-d2"), ("tiny-wseed1-dseed3", "w1-d3")):
        assert at_10[label] == pytest.approx(cohen_kappa_score(RUNS[name], RUNS["tiny-seed1"]))
    assert set(inter.loc[inter["seed"] == "w1-d3", "data_seed"]) == {3}


@pytest.mark.parametrize("reference", ["w1-d2", (1, 2)])
def test_a_given_reference_run(tmp_path, reference):
    targets, options, _ = fake_study(tmp_path)
    agreement = tables.agreement_table(targets, options, reference_seed=reference)
    inter = agreement[agreement["kind"] == "inter_seed"]
    assert sorted(set(inter["seed"])) == ["1", "w1-d3"]
    at_10 = inter[inter["step"] == 10].set_index("seed")["kappa"]
    assert at_10["1"] == pytest.approx(cohen_kappa_score(RUNS["tiny-seed1"], RUNS["tiny-wseed1-dseed2"]))


def test_a_seed_as_reference_means_both_seeds(tmp_path, caplog):
    targets, options, _ = fake_study(tmp_path)
    inter = tables.agreement_table(targets, options, reference_seed=1).query("kind == 'inter_seed'")
    assert sorted(set(inter["seed"])) == ["w1-d2", "w1-d3"]
    assert (
        tables.agreement_table(targets, options, reference_seed=2).query("kind == 'inter_seed'").empty
    )  # no run (2, 2)
    assert "has no run 2" in caplog.text


def test_seeds_from_mlflow_tags():
    assert study.seeds_from_tags({"seed": "1", "weight_seed": "1", "data_seed": "2"}) == (1, 2)
    assert study.seeds_from_tags({"seed": "3"}) == (3, 3)  # runs logged before weight_seed/data_seed tags
    assert study.seeds_from_tags({}) == (0, 0)
