"""The tables a pass writes from the current result files: every metric, and the agreement (kappa).

- ``checkpoint_metrics.csv``: tidy :data:`polypythia.study.TIDY_COLUMNS_WITH_SEEDS` rows, one per
  (run, step, metric) of every current result of the evaluators the pass ran;
- ``agreement.csv``: :data:`AGREEMENT_COLUMNS`, from the per-item predictions of the evaluators that
  keep them (the downstream tasks): self-consistency against each run's last step, and inter-seed
  agreement against a reference run at the same step (agreement.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from polypythia.evaluate.evaluators import EvalOptions, Evaluator, selected
from polypythia.evaluate.results import read_result
from polypythia.evaluate.targets import EvaluationError, RunTarget
from polypythia.study import TIDY_COLUMNS_WITH_SEEDS, parse_run_label, run_label

log = logging.getLogger(__name__)

RunKey = tuple[int, int]  # a run of a model: (weight seed, data seed)
AGREEMENT_COLUMNS = ["model", "task", "seed", "weight_seed", "data_seed", "step", "kind", "kappa"]


def metrics_table(targets: list[RunTarget], options: EvalOptions) -> pd.DataFrame:
    """Tidy ``model, seed, weight_seed, data_seed, step, metric, value`` rows from every current result file.

    ``seed`` is the run label (:func:`polypythia.study.run_label`): ``"3"``, or ``"w1-d2"`` when the seeds differ.
    """
    rows = []
    evaluators = selected(options)
    for target in targets:
        for checkpoint in target.checkpoints:
            for evaluator in evaluators:
                result = read_result(checkpoint, evaluator.name)
                if not evaluator.is_current(result, options):
                    continue
                for key, value in result.get("metrics", {}).items():
                    rows.append(
                        (
                            target.model,
                            target.seed,
                            target.weight_seed,
                            target.data_seed,
                            checkpoint.step,
                            key,
                            float(value),
                        )
                    )
    return pd.DataFrame(rows, columns=TIDY_COLUMNS_WITH_SEEDS).sort_values(
        ["model", "weight_seed", "data_seed", "metric", "step"], kind="stable"
    )


def predictions(
    targets: list[RunTarget], evaluator: Evaluator, options: EvalOptions
) -> dict[str, dict[RunKey, dict[int, list]]]:
    """model -> (weight seed, data seed) -> step -> per-item predictions (current result files only)."""
    out: dict[str, dict[RunKey, dict[int, list]]] = {}
    for target in targets:
        for checkpoint in target.checkpoints:
            result = read_result(checkpoint, evaluator.name)
            if evaluator.is_current(result, options):
                out.setdefault(target.model, {}).setdefault(target.run_key, {})[checkpoint.step] = result["predictions"]
    return out


def reference_run(reference_seed: int | str | RunKey | None) -> RunKey | None:
    """The run a ``--reference-seed`` names: a seed k is (k, k), a label ``w1-d2`` is (1, 2)."""
    if reference_seed is None or isinstance(reference_seed, tuple):
        return reference_seed
    seeds = parse_run_label(reference_seed)
    if seeds is None:
        raise EvaluationError(
            f"'{reference_seed}' is neither a seed (3) nor a run label w<weight seed>-d<data seed> "
            "(w1-d2); give one of those."
        )
    return seeds


def agreement_rows(
    model: str, task: str, by_run: dict[RunKey, dict[int, list]], reference: RunKey | None
) -> list[tuple]:
    """Rows of AGREEMENT_COLUMNS for one model and task; the reference is the smallest run unless given."""
    from polypythia.evaluate.agreement import inter_seed_agreement, self_consistency

    rows = []
    for run, by_step in sorted(by_run.items()):
        kappas = self_consistency(by_step, final_step=max(by_step))
        rows.extend(
            (model, task, run_label(*run), *run, step, "self_consistency", kappa) for step, kappa in kappas.items()
        )
    chosen = min(by_run) if reference is None else reference
    if chosen in by_run and len(by_run) > 1:
        kappas = inter_seed_agreement(by_run, reference_seed=chosen)
        rows.extend(
            (model, task, run_label(*run), *run, step, "inter_seed", kappa) for (run, step), kappa in kappas.items()
        )
    elif reference is not None:
        log.warning(
            "Model %s has no run %s for task %s; its inter-seed agreement is left out.", model, run_label(*chosen), task
        )
    return rows


def agreement_table(
    targets: list[RunTarget], options: EvalOptions, reference_seed: int | str | RunKey | None = None
) -> pd.DataFrame:
    """Self-consistency (against each run's last step) and inter-seed kappa (against the reference run).

    The reference is ``reference_seed`` (a seed, a label like ``"w1-d2"`` or a (weight seed, data seed)
    pair), by default each model's run with the smallest (weight seed, data seed).
    """
    from polypythia.evaluate.agreement import AgreementError

    reference = reference_run(reference_seed)
    rows = []
    for evaluator in selected(options):
        if not evaluator.per_item:
            continue
        for model, by_run in sorted(predictions(targets, evaluator, options).items()):
            try:
                rows.extend(agreement_rows(model, evaluator.name, by_run, reference))
            except AgreementError as exc:
                log.warning("Agreement of %s on %s left out: %s", model, evaluator.name, exc)
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def write_tables(
    targets: list[RunTarget], options: EvalOptions, out_dir: str | Path, reference_seed: int | str | RunKey | None
) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / "checkpoint_metrics.csv", "agreement": out_dir / "agreement.csv"}
    metrics_table(targets, options).to_csv(paths["metrics"], index=False)
    agreement_table(targets, options, reference_seed).to_csv(paths["agreement"], index=False)
    return paths
