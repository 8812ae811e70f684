"""Evaluate every checkpoint of a study, once: plan, compute what is missing, log it, write the tables.

The pieces: targets.py finds the runs and checkpoints (an MLflow study or a folder of Hugging Face
checkpoints), evaluators.py holds the registry of what is measured per checkpoint (weights,
validation loss, each downstream task), results.py keeps one result file per (checkpoint,
evaluator), and tables.py writes the metrics and agreement tables. This module knows no evaluator
by name: it asks the registry.

Idempotence. Before any work the driver *plans*: an evaluator whose stored result is current is
done; one whose values the run already has in MLflow (runs trained before evaluation moved off the
step loop logged them at every checkpoint) gets its result file from them without loading a model. Only what is left is computed,
one Ray task per run (or in-process with ``Execution(use_ray=False)``); the driver then logs to MLflow every
value of a current result file that the run lacks at that step (unless the evaluator says the run's
metrics are of another kind), and writes the tables from the result files. A second pass therefore
loads no model and logs nothing: it prints "nothing to do". A stale result (e.g. a task run with
another ``limit_items``) is recomputed; MLflow keeps the value first logged at a step, the table
uses the file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from safetensors import SafetensorError

from polypythia.errors import CheckpointError, PolypythiaError
from polypythia.evaluate.evaluators import REGISTRY, EvalOptions, Logged, selected
from polypythia.evaluate.integrity import checkpoint_problem, corrupt_message
from polypythia.evaluate.results import read_result, write_result
from polypythia.evaluate.tables import RunKey, reference_run, write_tables
from polypythia.evaluate.targets import CheckpointTarget, EvaluationError, RunTarget, target_for_run_dir
from polypythia.runtime import raysetup
from polypythia.runtime.env import quiet_libraries
from polypythia.tracking import client as tracking

log = logging.getLogger(__name__)

__all__ = ["EvalOptions", "EvaluationError", "Summary", "evaluate_run", "evaluate_targets"]


# ----------------------------------------------------------------------------- planning (driver)


def logged_metrics(mlflow_client, run_id: str | None, keys: list[str]) -> Logged:
    """key -> {step: value} of the run's stored points for ``keys`` (empty without a run)."""
    if mlflow_client is None or run_id is None:
        return {}
    return tracking.stored_points(mlflow_client, run_id, keys)


def plan_run(target: RunTarget, options: EvalOptions, logged: Logged) -> dict[str, int]:
    """Fill ``target.plan`` with what is left to compute; returns counts (done, from_mlflow, unavailable)."""
    counts = {"done": 0, "from_mlflow": 0, "unavailable": 0}
    target.plan = {}
    evaluators = selected(options)
    for checkpoint in target.checkpoints:
        todo = []
        for evaluator in evaluators:
            if evaluator.is_current(read_result(checkpoint, evaluator.name), options):
                counts["done"] += 1
            elif (result := evaluator.from_mlflow(target, options, logged, checkpoint.step)) is not None:
                write_result(checkpoint, evaluator.name, result)
                counts["from_mlflow"] += 1
            elif not evaluator.available(target):
                counts["unavailable"] += 1
            else:
                todo.append(evaluator.name)
        if todo:
            target.plan[checkpoint.step] = todo
    return counts


# ----------------------------------------------------------------------------- computing (worker)


def compute_checkpoint(
    checkpoint: CheckpointTarget, todo: list[str], run: RunTarget, options: EvalOptions, cache: dict
) -> None:
    """Compute and write each evaluator of ``todo`` for one checkpoint; evaluators of one class together."""
    groups: dict[type, list] = {}
    for name in todo:
        evaluator = REGISTRY[name]
        groups.setdefault(type(evaluator), []).append(evaluator)
    for kind, evaluators in groups.items():
        for name, result in kind.compute_all(evaluators, checkpoint, run, options, cache).items():
            write_result(checkpoint, name, result)


def compute_run(target: dict, options: dict) -> Iterator[dict]:
    """Compute a run's plan, checkpoint by checkpoint; yields one report per checkpoint (plain dicts)."""
    quiet_libraries()
    run = RunTarget.from_dict(target)
    opts = EvalOptions(**options)
    cache: dict = {}  # what a run's evaluators share between its checkpoints (validation rows)
    for checkpoint in run.checkpoints:
        todo = run.plan.get(checkpoint.step)
        if not todo:
            continue
        started = time.perf_counter()
        try:
            readable(checkpoint)
            compute_checkpoint(checkpoint, todo, run, opts, cache)
            yield {
                "name": run.name,
                "step": checkpoint.step,
                "computed": todo,
                "seconds": time.perf_counter() - started,
            }
        except PolypythiaError as exc:
            yield {"name": run.name, "step": checkpoint.step, "computed": [], "error": str(exc)}
        except SafetensorError as exc:  # corrupt in a way the header and manifest checks do not see
            yield {
                "name": run.name,
                "step": checkpoint.step,
                "computed": [],
                "error": corrupt_message(checkpoint.path, f"{type(exc).__name__}: {exc}"),
            }


def readable(checkpoint: CheckpointTarget) -> None:
    """A CheckpointError (one line: which checkpoint, why, the fix) unless the checkpoint's config and
    safetensors headers read and its files match its manifest (checkpoints trained here have one):
    a corrupt checkpoint is skipped, the others are evaluated, and the command exits 1 at the end."""
    problem = checkpoint_problem(checkpoint.path, verify_manifest=True)
    if problem:
        raise CheckpointError(corrupt_message(checkpoint.path, problem))


# ----------------------------------------------------------------------------- running the plan


def run_locally(targets: list[RunTarget], options: EvalOptions, on_report) -> None:
    for target in targets:
        for report in compute_run(asdict(target), asdict(options)):
            on_report(report)


def run_on_ray(targets: list[RunTarget], options: EvalOptions, on_report, address: str | None, num_gpus: float) -> None:
    """One Ray task per run (num_cpus=1), streaming one report per checkpoint back to the driver."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:  # workers read local files only (lm-eval); a cluster's get the package shipped
        raysetup.init_ray(address, offline=True, option="--ray-address")
    try:
        task = ray.remote(num_cpus=1, num_gpus=num_gpus, num_returns="streaming")(compute_run)
        pending = [task.remote(asdict(t), asdict(options)) for t in targets]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for generator in ready:
                try:
                    on_report(ray.get(next(generator)))
                    pending.append(generator)
                except StopIteration:
                    pass
    finally:
        if started_here:
            ray.shutdown()


def log_new_metrics(mlflow_client, target: RunTarget, options: EvalOptions, logged: Logged) -> int:
    """Log every current result-file value the run lacks at its step; returns how many points were sent.

    An evaluator may refuse a run (:meth:`~polypythia.evaluate.evaluators.Evaluator.log_conflict`:
    weights go only to a run with none yet or of the same definition); the tags it names are set
    on the run when its values are logged (weights: ``weight_stats``).
    """
    from mlflow.entities import Metric

    if mlflow_client is None or target.run_id is None:
        return 0
    now_ms = int(time.time() * 1000)
    points, tags = [], {}
    for evaluator in selected(options):
        conflict = evaluator.log_conflict(target, options, logged)
        if conflict:
            log.warning("Run %s %s.", target.name, conflict)
            continue
        sent = len(points)
        for checkpoint in target.checkpoints:
            result = read_result(checkpoint, evaluator.name)
            if not evaluator.is_current(result, options):
                continue
            for key, value in result.get("metrics", {}).items():
                if checkpoint.step not in logged.get(key, {}):
                    points.append(Metric(key=key, value=float(value), timestamp=now_ms, step=checkpoint.step))
        if len(points) > sent:
            tags.update(evaluator.tags_when_logged(options))
    for key, value in tags.items():
        if target.tags.get(key) != value:
            mlflow_client.set_tag(target.run_id, key, value)
            target.tags[key] = value
    for start in range(0, len(points), tracking.MAX_METRICS_PER_BATCH):
        mlflow_client.log_batch(
            target.run_id, metrics=points[start : start + tracking.MAX_METRICS_PER_BATCH], synchronous=True
        )
    return len(points)


# ----------------------------------------------------------------------------- the whole pass


@dataclass(frozen=True)
class Execution:
    """Where an evaluation runs and how it reports: on Ray (at ``ray_address``, or a local instance) or
    in this process; a progress bar or not; ``echo`` for its lines; ``heartbeat`` called after each
    evaluated checkpoint (a sweep's stall watchdog counts it as progress)."""

    use_ray: bool = True
    ray_address: str | None = None
    num_gpus_per_run: float = 0.0
    show_progress: bool = True
    echo: Callable[[str], object] = print
    heartbeat: Callable[[], None] | None = None


@dataclass
class Summary:
    """What one pass did; ``nothing_to_do`` when it computed and logged nothing."""

    computed: dict[str, int] = field(default_factory=dict)  # evaluator name -> checkpoints computed
    skipped: dict[str, int] = field(default_factory=dict)  # done / from_mlflow / unavailable
    logged_points: int = 0
    errors: list[str] = field(default_factory=list)
    tables: dict[str, Path] = field(default_factory=dict)

    @property
    def nothing_to_do(self) -> bool:
        return not self.computed and not self.logged_points and not self.errors


def _progress_bar(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="ckpt", desc="evaluating", disable=not show or None)


def evaluate_targets(
    targets: list[RunTarget],
    options: EvalOptions,
    mlflow_client=None,
    *,
    out_dir: str | Path | None = None,
    reference_seed: int | str | RunKey | None = None,
    execution: Execution | None = None,
) -> Summary:
    """Plan, compute what is missing, log it to MLflow, and write the tables (when ``out_dir`` is given).

    ``reference_seed``: the inter-seed agreement reference (see :func:`tables.agreement_table`).
    ``execution``: where the work runs and how it reports (:class:`Execution`; on Ray with a progress bar by default).
    """
    ex = execution or Execution()
    options.check()
    reference_run(reference_seed)  # a malformed label fails before any work
    summary = Summary()
    logged = {}
    keys = [key for evaluator in selected(options) for key in evaluator.keys]
    for target in targets:
        logged[target.name] = logged_metrics(mlflow_client, target.run_id, keys)
        for kind, count in plan_run(target, options, logged[target.name]).items():
            summary.skipped[kind] = summary.skipped.get(kind, 0) + count
    work = [t for t in targets if t.plan]
    total = sum(len(t.plan) for t in work)
    if work:
        ex.echo(f"Evaluating {total} checkpoint(s) of {len(work)} run(s)" + ("" if ex.use_ray else " in-process") + ".")
        bar = _progress_bar(total, ex.show_progress)

        def on_report(report: dict) -> None:
            bar.update(1)
            if ex.heartbeat is not None:
                ex.heartbeat()
            if report.get("error"):
                summary.errors.append(f"{report['name']} step {report['step']}: {report['error']}")
            for name in report["computed"]:
                summary.computed[name] = summary.computed.get(name, 0) + 1

        try:
            if ex.use_ray:
                run_on_ray(work, options, on_report, ex.ray_address, ex.num_gpus_per_run)
            else:
                run_locally(work, options, on_report)
        finally:
            bar.close()
    for target in targets:
        summary.logged_points += log_new_metrics(mlflow_client, target, options, logged[target.name])
    if out_dir is not None:
        summary.tables = write_tables(targets, options, out_dir, reference_seed)
    ex.echo(describe(summary))
    return summary


def describe(summary: Summary) -> str:
    """A few lines: what was computed, what was skipped and why, what went to MLflow and where the tables are."""
    skipped = (
        f"skipped {summary.skipped.get('done', 0)} already done, {summary.skipped.get('from_mlflow', 0)} taken "
        f"from MLflow, {summary.skipped.get('unavailable', 0)} without validation data"
    )
    if summary.nothing_to_do:
        lines = [f"nothing to do ({skipped})."]
    else:
        computed = ", ".join(f"{name} x{count}" for name, count in sorted(summary.computed.items())) or "nothing"
        lines = [f"computed: {computed}; {skipped}; logged {summary.logged_points} MLflow point(s)."]
    lines += [f"failed: {error}" for error in summary.errors]
    lines += [f"wrote {path}" for path in summary.tables.values()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- hook for training


def evaluate_run(
    run_dir: str | Path,
    *,
    cfg=None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    options: EvalOptions | None = None,
    out_dir: str | Path | None = None,
    execution: Execution | None = None,
) -> Summary:
    """Evaluate every checkpoint of one run trained here (e.g. right after training), in-process by default.

    ``cfg`` (a JobConfig) gives the validation rows, names and seeds, and the weight-statistics
    definition (``cfg.train.weight_stats`` replaces ``options.weight_stats``, so that the values match
    those training logged); without it they come from the run's MLflow params and tags. The MLflow run
    is ``run_id`` or the one recorded in the run folder (:func:`polypythia.runfolder.read_mlflow_record`).
    """
    from polypythia.runfolder import read_mlflow_record

    record = read_mlflow_record(run_dir) if run_id is None else None
    if record is not None:
        run_id, tracking_uri = record["run_id"], tracking_uri or record.get("tracking_uri")
    mlflow_client = tracking.client(tracking_uri) if tracking_uri and run_id else None
    options = options or EvalOptions()
    if cfg is not None:
        options = replace(options, weight_stats=cfg.train.weight_stats)
    run = mlflow_client.get_run(run_id) if mlflow_client is not None else None
    target = target_for_run_dir(run_dir, cfg=cfg, run=run)
    execution = execution or Execution(use_ray=False, show_progress=False, echo=log.info)
    return evaluate_targets([target], options, mlflow_client, out_dir=out_dir, execution=execution)
