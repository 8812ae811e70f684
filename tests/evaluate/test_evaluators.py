"""The evaluator registry: a measure registered in one place flows through plan, compute, logging and tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from helpers import FakeMlflow

from polypythia.evaluate import evaluators, runner
from polypythia.evaluate.evaluators import EvalOptions, Evaluator
from polypythia.evaluate.results import read_result, write_result
from polypythia.evaluate.targets import targets_from_folder
from polypythia.evaluate.weight_stats import FEATURE_NAMES


class StepDigits(Evaluator):
    """A made-up measure: the number of digits of the step, with per-item predictions."""

    name, keys, per_item = "step_digits", ("misc/step_digits",), True

    def __init__(self):
        self.calls = 0

    def compute(self, checkpoint, run, options, cache):
        self.calls += 1
        step = int(Path(checkpoint.path).name.removeprefix("step"))
        return {"metrics": {"misc/step_digits": float(len(str(step)))}, "predictions": [step % 3, 1, 0, 1]}


def test_a_registered_evaluator_needs_no_other_change(tmp_path, monkeypatch):
    measure = StepDigits()
    monkeypatch.setitem(evaluators.REGISTRY, measure.name, measure)
    options = EvalOptions(tasks=())
    root, out = tmp_path / "ckpts", tmp_path / "out"
    for name in ("tiny-seed1", "tiny-seed2"):
        for step in (0, 10):
            (root / name / f"step{step}").mkdir(parents=True)
            (root / name / f"step{step}" / "config.json").write_text("{}")
    for target in targets_from_folder(root, out):  # weights as if computed: only the new measure is left
        for checkpoint in target.checkpoints:
            write_result(
                checkpoint,
                "weights",
                {"metrics": {f"weights/{k}": 1.0 for k in FEATURE_NAMES}, "weight_stats": options.weight_stats},
            )
    assert [e.name for e in evaluators.selected(options)] == ["weights", "valid", "step_digits"]

    summary = runner.evaluate_targets(
        targets_from_folder(root, out),
        options,
        out_dir=out,
        execution=runner.Execution(use_ray=False, show_progress=False, echo=lambda _: None),
    )
    assert summary.computed == {"step_digits": 4} and measure.calls == 4
    (first, _) = targets_from_folder(root, out)
    assert read_result(first.checkpoints[1], "step_digits")["metrics"] == {"misc/step_digits": 2.0}
    metrics = pd.read_csv(out / "checkpoint_metrics.csv")
    assert metrics.loc[metrics["metric"] == "misc/step_digits", "value"].tolist() == [1.0, 2.0, 1.0, 2.0]
    agreement = pd.read_csv(out / "agreement.csv")
    assert set(agreement["task"]) == {"step_digits"} and len(agreement) == 2 * 2 + 2
    assert (agreement.query("kind == 'inter_seed'")["kappa"] == 1.0).all()  # the predictions depend on the step only

    assert (
        runner.evaluate_targets(
            targets_from_folder(root, out),
            options,
            execution=runner.Execution(use_ray=False, show_progress=False, echo=lambda _: None),
        ).nothing_to_do
        and measure.calls == 4
    )
    first.run_id, client = "run", FakeMlflow()
    assert runner.log_new_metrics(client, first, options, {"misc/step_digits": {0: 1.0}}) == 2 * len(FEATURE_NAMES) + 1
    assert ("misc/step_digits", 10) in client.points and ("misc/step_digits", 0) not in client.points
