"""The registry of evaluators: what is measured at every checkpoint, one evaluator per measure.

An :class:`Evaluator` has a ``name`` (its result file, ``<name>.json``, see results.py) and
declares

- ``keys``: the MLflow metric keys its results hold;
- :meth:`~Evaluator.wanted`: whether a pass with these options runs it (a task: if asked for);
- :meth:`~Evaluator.is_current`: whether a stored result still answers this pass (weights: of the
  same weight-statistics definition; tasks: written with the same ``limit_items``); a stale one
  counts as missing and is recomputed;
- :meth:`~Evaluator.from_mlflow`: a result made from the values the run already logged at that step
  (training logs weights and validation loss at every checkpoint), so that no model is loaded;
- :meth:`~Evaluator.available`: whether the run has what computing needs (validation rows);
- :meth:`~Evaluator.log_conflict` / :meth:`~Evaluator.tags_when_logged`: when its values must not go
  to a run's MLflow metrics, and which run tags say what they are;
- :meth:`~Evaluator.compute`: the result for one checkpoint (or :meth:`~Evaluator.compute_all`, for
  evaluators of one class computed together: one lm-eval run serves every task of a checkpoint).

runner.py plans, executes and logs, and tables.py tabulates, through this interface only; results
with per-item ``predictions`` (``per_item``) also feed the agreement table. To add a measure, write
an Evaluator subclass here and :func:`register` an instance (registration order is table order).

Weight statistics have two definitions (``EvalOptions.weight_stats``, ``polypythias`` or ``hu``,
see weight_stats.py). Each weights file records its own (key ``weight_stats``; a file without it
predates the choice and holds ``hu`` values). A run's ``weight_stats`` tag says which definition
its ``weights/*`` metrics follow (a training job sets it when it opens its MLflow run,
:func:`polypythia.job.mlflowrun.run_tags`, from ``train.weight_stats``; a run without it that has
weights predates it: ``hu``). Weights are copied from MLflow only when that definition is the one
asked for, and logged to a run only when it has no weights yet or weights of the same definition
(this evaluator's :meth:`tags_when_logged` then sets the tag); otherwise the values stay in the
result files and tables, so that no series mixes definitions.
"""

from __future__ import annotations

from dataclasses import dataclass

from polypythia import study
from polypythia.evaluate import downstream
from polypythia.evaluate import weight_stats as weight_stats_module
from polypythia.evaluate.downstream import TASK_NAMES
from polypythia.evaluate.targets import CheckpointTarget, EvaluationError, RunTarget
from polypythia.evaluate.weight_stats import DEFAULT_DEFINITION, DEFINITIONS, FEATURE_NAMES

Logged = dict[str, dict[int, float]]  # metric key -> {step: value} that a run already has in MLflow


@dataclass
class EvalOptions:
    """What to compute and how (plain data: it travels into Ray tasks)."""

    tasks: tuple[str, ...] = TASK_NAMES
    limit_items: int | None = None  # keep each task's first items only (quick checks)
    batch_size: int = 8  # lm-eval batch size
    device: str = "cpu"
    valid_batch_size: int = 4  # rows per forward pass of the validation loss
    weight_stats: str = DEFAULT_DEFINITION  # the definition of the weight statistics (weight_stats.WEIGHT_STATISTICS)

    def check(self) -> None:
        if self.weight_stats not in DEFINITIONS:
            raise EvaluationError(
                f"Unknown weight-statistics definition '{self.weight_stats}'; choose one of {', '.join(DEFINITIONS)}."
            )
        unknown = sorted(set(self.tasks) - set(TASK_NAMES))
        if unknown:
            raise EvaluationError(f"Unknown task(s) {unknown}; choose from {list(TASK_NAMES)}.")
        if self.limit_items is not None and self.limit_items < 1:
            raise EvaluationError(f"--limit-items must be at least 1, got {self.limit_items}.")


class Evaluator:
    """One measure taken at every checkpoint; subclasses override what differs from these defaults."""

    name: str  # the result file's name, and the key of the registry
    keys: tuple[str, ...]  # the metric keys of its results
    per_item = False  # results hold per-item "predictions" (the agreement table uses them)

    def wanted(self, options: EvalOptions) -> bool:
        return True

    def is_current(self, result: dict | None, options: EvalOptions) -> bool:
        return result is not None

    def available(self, run: RunTarget) -> bool:
        return True

    def from_mlflow(self, run: RunTarget, options: EvalOptions, logged: Logged, step: int) -> dict | None:
        """A result built from the run's logged values at ``step``, or None (compute it)."""
        return None

    def log_conflict(self, run: RunTarget, options: EvalOptions, logged: Logged) -> str | None:
        """Why this pass's values must not be logged to the run (they stay in files and tables), or None."""
        return None

    def tags_when_logged(self, options: EvalOptions) -> dict[str, str]:
        """Tags the run gets once values of this evaluator were logged to it."""
        return {}

    def compute(self, checkpoint: CheckpointTarget, run: RunTarget, options: EvalOptions, cache: dict) -> dict:
        """The result for one checkpoint; ``cache`` lives as long as the run's task (one per run)."""
        raise NotImplementedError

    @classmethod
    def compute_all(
        cls,
        evaluators: list[Evaluator],
        checkpoint: CheckpointTarget,
        run: RunTarget,
        options: EvalOptions,
        cache: dict,
    ) -> dict[str, dict]:
        """Results of several evaluators of this class for one checkpoint (by default one at a time)."""
        return {e.name: e.compute(checkpoint, run, options, cache) for e in evaluators}

    def copied(self, logged: Logged, step: int) -> dict[str, float] | None:
        """Every key's logged value at ``step``, or None if one is missing."""
        if all(step in logged.get(key, {}) for key in self.keys):
            return {key: logged[key][step] for key in self.keys}
        return None


REGISTRY: dict[str, Evaluator] = {}


def register(evaluator: Evaluator) -> Evaluator:
    if evaluator.name in REGISTRY:
        raise ValueError(f"An evaluator named '{evaluator.name}' is registered already.")
    REGISTRY[evaluator.name] = evaluator
    return evaluator


def selected(options: EvalOptions) -> list[Evaluator]:
    """The evaluators a pass with these options runs, in registration order."""
    return [e for e in REGISTRY.values() if e.wanted(options)]


def metric_keys(name: str) -> list[str]:
    return list(REGISTRY[name].keys)


# ----------------------------------------------------------------------------- weights


class WeightsEvaluator(Evaluator):
    """The weight statistics of weight_stats.WEIGHT_STATISTICS, from the safetensors file (no model built)."""

    name = "weights"
    keys = tuple(f"weights/{feature}" for feature in FEATURE_NAMES)

    def is_current(self, result, options):
        return result is not None and result_weight_stats(result) == options.weight_stats

    def logged_definition(self, run: RunTarget, logged: Logged) -> str | None:
        """The definition of the ``weights/*`` metrics the run already has: None when it has none, else
        its ``weight_stats`` tag, or ``hu`` for runs logged before that tag existed."""
        if not any(logged.get(key) for key in self.keys):
            return None
        return run.mlflow_weight_stats or "hu"

    def from_mlflow(self, run, options, logged, step):
        definition = self.logged_definition(run, logged)
        metrics = self.copied(logged, step) if definition == options.weight_stats else None
        return None if metrics is None else {"metrics": metrics, "source": "mlflow", "weight_stats": definition}

    def log_conflict(self, run, options, logged):
        definition = self.logged_definition(run, logged)
        if definition in (None, options.weight_stats):
            return None
        return (
            f"has weights/* metrics of the '{definition}' definition in MLflow; its '{options.weight_stats}' "
            "weight statistics are in the result files and tables only"
        )

    def tags_when_logged(self, options):
        return {study.WEIGHT_STATS_TAG: options.weight_stats}

    def compute(self, checkpoint, run, options, cache):
        features = weight_stats_module.weight_stats_from_checkpoint(checkpoint.path, definition=options.weight_stats)
        return {
            "metrics": {f"weights/{k}": v for k, v in features.items()},
            "source": "computed",
            "weight_stats": options.weight_stats,
        }


def result_weight_stats(result: dict) -> str:
    """The definition a weights result file holds (files written before the choice existed: ``hu``)."""
    return result.get("weight_stats", "hu")


def mlflow_weight_stats(run: RunTarget, logged: Logged) -> str | None:
    return REGISTRY["weights"].logged_definition(run, logged)


# ----------------------------------------------------------------------------- validation loss


class ValidEvaluator(Evaluator):
    """Validation loss and perplexity on the run's validation rows (RunTarget.valid)."""

    name = "valid"
    keys = ("valid/loss", "valid/ppl")

    def available(self, run):
        return run.valid is not None

    def from_mlflow(self, run, options, logged, step):
        metrics = self.copied(logged, step)
        return None if metrics is None else {"metrics": metrics, "source": "mlflow"}

    def compute(self, checkpoint, run, options, cache):
        if "rows" not in cache:
            cache["rows"] = validation_rows(run.valid)
        rows, batch_size = cache["rows"]
        return compute_valid(checkpoint, rows, batch_size or options.valid_batch_size, options.device)


def validation_rows(valid: dict):
    """(token rows [n, seq + 1], batch size or None) for a validation spec."""
    import numpy as np

    if valid["kind"] == "config":
        from polypythia.config.jobconfig import job_config
        from polypythia.train.data import load_training_data

        cfg = job_config(valid["config"])
        return load_training_data(cfg).sequences.valid_rows(cfg.train.valid_max_rows), cfg.budget.micro_batch_size
    from polypythia.data.indexed import IndexedDataset
    from polypythia.data.sequences import TokenSequences

    sequences = TokenSequences(IndexedDataset(valid["prefix"]), valid["seq_length"])
    return sequences.rows(np.arange(min(valid["max_rows"], sequences.num_train_rows))), None


def compute_valid(checkpoint: CheckpointTarget, rows, batch_size: int, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import polypythia.qknorm  # noqa: F401  (registers the qk-layernorm model type with the Auto classes)
    from polypythia.evaluate.perplexity import validation_loss

    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, torch_dtype=torch.float32).to(device)
    loss, ppl = validation_loss(model, torch.from_numpy(rows), batch_size)
    return {"metrics": {"valid/loss": loss, "valid/ppl": ppl}, "rows": int(rows.shape[0])}


# ----------------------------------------------------------------------------- downstream tasks


class TaskEvaluator(Evaluator):
    """One offline lm-eval task (downstream.py): accuracy and per-item predictions."""

    per_item = True

    def __init__(self, task: str):
        self.name = task
        self.keys = (f"eval/{task}/acc",)

    def wanted(self, options):
        return self.name in options.tasks

    def is_current(self, result, options):
        return result is not None and result.get("limit_items") == options.limit_items

    @classmethod
    def compute_all(cls, evaluators, checkpoint, run, options, cache):
        tasks = tuple(e.name for e in evaluators)  # one lm-eval run for all of them
        results = downstream.evaluate_checkpoint(
            checkpoint.path, tasks, options.batch_size, options.device, options.limit_items
        )
        return {
            task: {
                "metrics": {f"eval/{task}/acc": result.accuracy},
                "predictions": result.predictions.tolist(),
                "limit_items": options.limit_items,
            }
            for task, result in results.items()
        }

    def compute(self, checkpoint, run, options, cache):
        return self.compute_all([self], checkpoint, run, options, cache)[self.name]


register(WeightsEvaluator())
register(ValidEvaluator())
for _task in TASK_NAMES:
    register(TaskEvaluator(_task))
