"""Evaluate every checkpoint of a study, once: weight statistics, validation loss, downstream tasks.

Sources. A *study* is either the child runs (tag ``polypythia.kind=job``) of an MLflow experiment,
whose checkpoints lie under each run's ``run_dir`` tag, or a *folder* of Hugging Face checkpoints
laid out ``<name>/step<S>/`` as the published Pythia / PolyPythias checkpoints are (``<name>`` like
``pythia-160m-seed3`` or ``70m-seed1``; ``<name>/checkpoints/step<S>/``, a polypythia run folder,
works too). Each run becomes a :class:`RunTarget`, plain data that crosses into a Ray task.

What is computed per checkpoint ("what" below): ``weights`` (the 14 features of weight_stats.py),
``valid`` (validation loss and perplexity, when validation rows are known: a run trained here
rebuilds its config from the run's MLflow params; a folder needs ``--valid-data``) and one entry
per downstream task (accuracy and per-item predictions, from tasks.py via lm-eval).

Idempotence. Each what of each checkpoint is kept in one JSON result file, written atomically
(temporary file + rename), under ``<checkpoint>/eval/`` for runs trained here and under
``<out>/results/<name>/step<S>/`` for a folder of checkpoints (which may be read-only or shared).
Before any work the driver *plans*: a what whose file exists is done; weights and validation
values that training already logged to MLflow (evaluate/callback.py does at every checkpoint) are
copied into their file without loading a model. Only what is left is computed, one Ray task per
run (or in-process with ``use_ray=False``); the driver then logs to MLflow every value of a
result file that the run lacks at that step, and writes the tables from the result files.
A second pass therefore loads no model and logs nothing: it prints "nothing to do".

Task results are tied to ``limit_items``: a file written with another limit counts as missing and
is recomputed (MLflow keeps the value first logged at a step; the table uses the file).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from polypythia import tracking
from polypythia.errors import PolypythiaError
from polypythia.evaluate.tasks import TASK_NAMES
from polypythia.evaluate.weight_stats import FEATURE_NAMES
from polypythia.train.checkpoint import STEP_DIR

log = logging.getLogger(__name__)

WEIGHTS = "weights"
VALID = "valid"
TIDY_COLUMNS = ["model", "seed", "step", "metric", "value"]
AGREEMENT_COLUMNS = ["model", "task", "seed", "step", "kind", "kappa"]
# "pythia-160m-seed3" -> (160m, 3); "70m-seed1" -> (70m, 1); "pythia-410m" -> (410m, 0): the original run.
_RUN_NAME = re.compile(r"^(?:pythia-)?(?P<model>.+?)(?:-seed(?P<seed>\d+))?$")


class EvaluationError(PolypythiaError, ValueError):
    """A study, folder or option that the checkpoint evaluation cannot work with."""


@dataclass
class EvalOptions:
    """What to compute and how (plain data: it travels into Ray tasks)."""

    tasks: tuple[str, ...] = TASK_NAMES
    limit_items: int | None = None  # keep each task's first items only (quick checks)
    batch_size: int = 8  # lm-eval batch size
    device: str = "cpu"
    valid_batch_size: int = 4  # rows per forward pass of the validation loss

    def check(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASK_NAMES))
        if unknown:
            raise EvaluationError(f"Unknown task(s) {unknown}; choose from {list(TASK_NAMES)}.")
        if self.limit_items is not None and self.limit_items < 1:
            raise EvaluationError(f"--limit-items must be at least 1, got {self.limit_items}.")


@dataclass
class CheckpointTarget:
    step: int
    path: str  # the Hugging Face checkpoint folder
    results_dir: str  # where this checkpoint's result files go


@dataclass
class RunTarget:
    """One run to evaluate: its checkpoints, its MLflow run (if any) and its validation rows."""

    name: str
    model: str
    seed: int
    checkpoints: list[CheckpointTarget]
    run_id: str | None = None
    # {"kind": "config", "config": {...}} (a run trained here) or
    # {"kind": "indexed", "prefix": ..., "seq_length": ..., "max_rows": ...}; None: no validation data
    valid: dict | None = None
    plan: dict[int, list[str]] = field(default_factory=dict)  # step -> whats to compute


# ----------------------------------------------------------------------------- names and sources


def parse_run_name(name: str) -> tuple[str, int]:
    """(model, seed) from a run folder name; a name without ``-seed<k>`` is seed 0 (the original Pythia)."""
    match = _RUN_NAME.match(name)
    if not match or not match.group("model"):
        raise EvaluationError(f"Cannot read a model name from the folder name '{name}'; name it like pythia-70m-seed3.")
    return match.group("model"), int(match.group("seed") or 0)


def step_folders(run_folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of ``step<S>/`` (or ``checkpoints/step<S>/``) folders holding a config.json."""
    found = []
    for parent in (run_folder, run_folder / "checkpoints"):
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / "config.json").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def targets_from_folder(root: str | Path, out_dir: str | Path, valid: dict | None = None) -> list[RunTarget]:
    """One target per ``<name>/`` under ``root`` that holds step folders; results go under ``out_dir``."""
    root = Path(root)
    if not root.is_dir():
        raise EvaluationError(f"{root} is not a folder; give a folder of <name>/step<S>/ checkpoints or an MLflow experiment name.")
    targets = []
    for run_folder in sorted(p for p in root.iterdir() if p.is_dir()):
        steps = step_folders(run_folder)
        if not steps:
            continue
        model, seed = parse_run_name(run_folder.name)
        checkpoints = [CheckpointTarget(step, str(path), str(Path(out_dir) / "results" / run_folder.name / f"step{step}"))
                       for step, path in steps]
        targets.append(RunTarget(run_folder.name, model, seed, checkpoints, valid=valid))
    if not targets:
        raise EvaluationError(f"{root} holds no <name>/step<S>/ folders with a config.json; point at the folder above them.")
    return targets


def own_checkpoints(run_dir: str | Path) -> list[CheckpointTarget]:
    """The completed checkpoints of a run trained here; results are kept inside each one."""
    from polypythia.train.checkpoint import list_checkpoints

    return [CheckpointTarget(c.step, str(c.path), str(c.path / "eval")) for c in list_checkpoints(run_dir)
            if (c.path / "config.json").is_file()]


def config_from_params(params: dict[str, str]) -> dict:
    """The nested config dict from a run's flattened ``section.key`` MLflow params (job.py logs them)."""
    import yaml

    nested: dict[str, Any] = {}
    for dotted, text in params.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = None if text == "None" else yaml.safe_load(text)
    return nested


def valid_from_params(params: dict[str, str]) -> dict | None:
    """A validation spec from a run's params, or None (with a warning) when they do not make a config."""
    from polypythia.config import job_config, to_dict

    try:
        return {"kind": "config", "config": to_dict(job_config(config_from_params(params)))}
    except (PolypythiaError, ValueError, TypeError) as exc:
        log.warning("No validation data for this run: its params do not rebuild a config (%s).", exc)
        return None


def targets_from_mlflow(mlflow_client, experiment: str, parent_run_id: str | None = None) -> list[RunTarget]:
    """One target per child run (tag ``polypythia.kind=job``) of ``experiment`` with checkpoints on disk."""
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None:
        raise EvaluationError(f"MLflow has no experiment named '{experiment}'; check the name and --tracking-uri.")
    query = "tags.`polypythia.kind` = 'job'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = mlflow_client.search_runs([exp.experiment_id], filter_string=query, max_results=5000)
    targets = []
    for run in runs:
        tags = run.data.tags
        checkpoints = own_checkpoints(tags.get("run_dir", ""))
        if not checkpoints:
            log.warning("Run %s (%s) has no checkpoints under %s; skipped.", run.info.run_name, run.info.run_id, tags.get("run_dir"))
            continue
        targets.append(RunTarget(run.info.run_name or run.info.run_id, tags.get("model", "?"), int(tags.get("seed", 0)),
                                 checkpoints, run_id=run.info.run_id, valid=valid_from_params(run.data.params)))
    if not targets:
        raise EvaluationError(f"No run of experiment '{experiment}' has checkpoints on this machine; train first or check the run_dir tags.")
    return sorted(targets, key=lambda t: (t.model, t.seed))


def attach_folder_runs(mlflow_client, experiment: str, targets: list[RunTarget]) -> None:
    """Give each folder target an MLflow run named after its folder (found again on a later pass)."""

    exp_id = tracking.experiment_id(mlflow_client, experiment)
    for target in targets:
        found = mlflow_client.search_runs([exp_id], filter_string=f"tags.`mlflow.runName` = '{target.name}'", max_results=1)
        if found:
            target.run_id = found[0].info.run_id
            continue
        tags = {"polypythia.kind": "job", "model": target.model, "seed": str(target.seed),
                "source_dir": str(Path(target.checkpoints[0].path).parent)}
        run = mlflow_client.create_run(exp_id, run_name=target.name, tags=tags)
        mlflow_client.set_terminated(run.info.run_id, status="FINISHED")
        target.run_id = run.info.run_id


# ----------------------------------------------------------------------------- result files


def metric_keys(what: str) -> list[str]:
    if what == WEIGHTS:
        return [f"weights/{name}" for name in FEATURE_NAMES]
    if what == VALID:
        return ["valid/loss", "valid/ppl"]
    return [f"eval/{what}/acc"]


def result_path(checkpoint: CheckpointTarget, what: str) -> Path:
    return Path(checkpoint.results_dir) / f"{what}.json"


def read_result(checkpoint: CheckpointTarget, what: str) -> dict | None:
    path = result_path(checkpoint, what)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:  # cannot happen with atomic writes, unless edited by hand
        log.warning("Unreadable result file %s; it will be recomputed.", path)
        return None


def write_result(checkpoint: CheckpointTarget, what: str, result: dict) -> None:
    """Write one result file atomically: a reader sees the old file or the whole new one."""
    path = result_path(checkpoint, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def is_current(result: dict | None, what: str, options: EvalOptions) -> bool:
    """A result file answers this pass (task results only for the same ``limit_items``)."""
    if result is None:
        return False
    return what in (WEIGHTS, VALID) or result.get("limit_items") == options.limit_items


# ----------------------------------------------------------------------------- planning (driver)


def logged_metrics(mlflow_client, run_id: str | None, keys: list[str]) -> dict[str, dict[int, float]]:
    """key -> {step: value} of the run's stored points for ``keys`` (empty without a run)."""
    if mlflow_client is None or run_id is None:
        return {}
    return tracking.stored_points(mlflow_client, run_id, keys)


def whats(options: EvalOptions) -> list[str]:
    return [WEIGHTS, VALID, *options.tasks]


def plan_run(target: RunTarget, options: EvalOptions, logged: dict[str, dict[int, float]]) -> dict[str, int]:
    """Fill ``target.plan`` with what is left to compute; returns counts (done, from_mlflow, unavailable)."""
    counts = {"done": 0, "from_mlflow": 0, "unavailable": 0}
    target.plan = {}
    for checkpoint in target.checkpoints:
        todo = []
        for what in whats(options):
            if is_current(read_result(checkpoint, what), what, options):
                counts["done"] += 1
                continue
            keys = metric_keys(what)
            if what in (WEIGHTS, VALID) and all(checkpoint.step in logged.get(k, {}) for k in keys):
                values = {k: logged[k][checkpoint.step] for k in keys}
                write_result(checkpoint, what, {"metrics": values, "source": "mlflow"})
                counts["from_mlflow"] += 1
            elif what == VALID and target.valid is None:
                counts["unavailable"] += 1
            else:
                todo.append(what)
        if todo:
            target.plan[checkpoint.step] = todo
    return counts


# ----------------------------------------------------------------------------- computing (worker)


def validation_rows(valid: dict):
    """(token rows [n, seq + 1], batch size or None) for a validation spec."""
    import numpy as np

    if valid["kind"] == "config":
        from polypythia.config import job_config
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

    from polypythia.evaluate.perplexity import validation_loss

    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, torch_dtype=torch.float32).to(device)
    loss, ppl = validation_loss(model, torch.from_numpy(rows), batch_size)
    return {"metrics": {"valid/loss": loss, "valid/ppl": ppl}, "rows": int(rows.shape[0])}


def compute_checkpoint(checkpoint: CheckpointTarget, todo: list[str], valid: dict | None, options: EvalOptions,
                       rows_cache: dict) -> None:
    """Compute and write each what of ``todo`` for one checkpoint."""
    from polypythia.evaluate.tasks import evaluate_checkpoint
    from polypythia.evaluate.weight_stats import weight_stats_from_checkpoint

    if WEIGHTS in todo:
        features = weight_stats_from_checkpoint(checkpoint.path)
        write_result(checkpoint, WEIGHTS, {"metrics": {f"weights/{k}": v for k, v in features.items()}, "source": "computed"})
    if VALID in todo:
        if "rows" not in rows_cache:
            rows_cache["rows"] = validation_rows(valid)
        rows, batch_size = rows_cache["rows"]
        write_result(checkpoint, VALID, compute_valid(checkpoint, rows, batch_size or options.valid_batch_size, options.device))
    tasks = tuple(w for w in todo if w not in (WEIGHTS, VALID))
    if tasks:
        results = evaluate_checkpoint(checkpoint.path, tasks, options.batch_size, options.device, options.limit_items)
        for task, result in results.items():
            write_result(checkpoint, task, {"metrics": {f"eval/{task}/acc": result.accuracy},
                                            "predictions": result.predictions.tolist(), "limit_items": options.limit_items})


def compute_run(target: dict, options: dict) -> Iterator[dict]:
    """Compute a run's plan, checkpoint by checkpoint; yields one report per checkpoint (plain dicts)."""
    from polypythia.job import quiet_libraries

    quiet_libraries()
    run = RunTarget(**{**target, "checkpoints": [CheckpointTarget(**c) for c in target["checkpoints"]]})
    opts = EvalOptions(**options)
    rows_cache: dict = {}
    for checkpoint in run.checkpoints:
        todo = run.plan.get(checkpoint.step)
        if not todo:
            continue
        started = time.perf_counter()
        try:
            compute_checkpoint(checkpoint, todo, run.valid, opts, rows_cache)
            yield {"name": run.name, "step": checkpoint.step, "computed": todo, "seconds": time.perf_counter() - started}
        except PolypythiaError as exc:
            yield {"name": run.name, "step": checkpoint.step, "computed": [], "error": str(exc)}


# ----------------------------------------------------------------------------- running the plan


def run_locally(targets: list[RunTarget], options: EvalOptions, on_report) -> None:
    for target in targets:
        for report in compute_run(asdict(target), asdict(options)):
            on_report(report)


def run_on_ray(targets: list[RunTarget], options: EvalOptions, on_report, address: str | None, num_gpus: float) -> None:
    """One Ray task per run (num_cpus=1), streaming one report per checkpoint back to the driver."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        env_vars = {"MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1"}
        runtime_env: dict[str, Any] = {"env_vars": env_vars}
        if address:  # a cluster's workers may not have this checkout: ship the package with the tasks
            runtime_env["py_modules"] = [str(Path(__file__).resolve().parents[1])]
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env=runtime_env, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise EvaluationError(f"Cannot connect to the Ray cluster at {address} ({exc}); start it or fix --ray-address.") from None
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


def log_new_metrics(mlflow_client, target: RunTarget, options: EvalOptions, logged: dict[str, dict[int, float]]) -> int:
    """Log every result-file value the run lacks at its step; returns how many points were sent."""
    from mlflow.entities import Metric

    if mlflow_client is None or target.run_id is None:
        return 0
    now_ms = int(time.time() * 1000)
    points = []
    for checkpoint in target.checkpoints:
        for what in whats(options):
            result = read_result(checkpoint, what)
            for key, value in (result or {}).get("metrics", {}).items():
                if checkpoint.step not in logged.get(key, {}):
                    points.append(Metric(key=key, value=float(value), timestamp=now_ms, step=checkpoint.step))
    for start in range(0, len(points), tracking.MAX_METRICS_PER_BATCH):
        mlflow_client.log_batch(target.run_id, metrics=points[start : start + tracking.MAX_METRICS_PER_BATCH], synchronous=True)
    return len(points)


# ----------------------------------------------------------------------------- tables


def metrics_table(targets: list[RunTarget], options: EvalOptions) -> pd.DataFrame:
    """Tidy ``model, seed, step, metric, value`` rows from every result file."""
    rows = []
    for target in targets:
        for checkpoint in target.checkpoints:
            for what in whats(options):
                result = read_result(checkpoint, what)
                for key, value in (result or {}).get("metrics", {}).items():
                    rows.append((target.model, target.seed, checkpoint.step, key, float(value)))
    return pd.DataFrame(rows, columns=TIDY_COLUMNS).sort_values(["model", "seed", "metric", "step"], kind="stable")


def task_predictions(targets: list[RunTarget], task: str, options: EvalOptions) -> dict[str, dict[int, dict[int, list]]]:
    """model -> seed -> step -> per-item predictions of ``task`` (current result files only)."""
    out: dict[str, dict[int, dict[int, list]]] = {}
    for target in targets:
        for checkpoint in target.checkpoints:
            result = read_result(checkpoint, task)
            if is_current(result, task, options):
                out.setdefault(target.model, {}).setdefault(target.seed, {})[checkpoint.step] = result["predictions"]
    return out


def agreement_rows(model: str, task: str, by_seed: dict[int, dict[int, list]], reference_seed: int | None) -> list[tuple]:
    from polypythia.evaluate.agreement import inter_seed_agreement, self_consistency

    rows = []
    for seed, by_step in sorted(by_seed.items()):
        kappas = self_consistency(by_step, final_step=max(by_step))
        rows.extend((model, task, seed, step, "self_consistency", kappa) for step, kappa in kappas.items())
    reference = min(by_seed) if reference_seed is None else reference_seed
    if reference in by_seed and len(by_seed) > 1:
        kappas = inter_seed_agreement(by_seed, reference_seed=reference)
        rows.extend((model, task, seed, step, "inter_seed", kappa) for (seed, step), kappa in kappas.items())
    elif reference_seed is not None:
        log.warning("Model %s has no seed %d for task %s; its inter-seed agreement is left out.", model, reference, task)
    return rows


def agreement_table(targets: list[RunTarget], options: EvalOptions, reference_seed: int | None = None) -> pd.DataFrame:
    """Self-consistency (against each seed's last step) and inter-seed kappa (against the reference seed)."""
    from polypythia.evaluate.agreement import AgreementError

    rows = []
    for task in options.tasks:
        for model, by_seed in sorted(task_predictions(targets, task, options).items()):
            try:
                rows.extend(agreement_rows(model, task, by_seed, reference_seed))
            except AgreementError as exc:
                log.warning("Agreement of %s on %s left out: %s", model, task, exc)
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def write_tables(targets: list[RunTarget], options: EvalOptions, out_dir: str | Path, reference_seed: int | None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / "checkpoint_metrics.csv", "agreement": out_dir / "agreement.csv"}
    metrics_table(targets, options).to_csv(paths["metrics"], index=False)
    agreement_table(targets, options, reference_seed).to_csv(paths["agreement"], index=False)
    return paths


# ----------------------------------------------------------------------------- the whole pass


@dataclass
class Summary:
    """What one pass did; ``nothing_to_do`` when it computed and logged nothing."""

    computed: dict[str, int] = field(default_factory=dict)  # what -> checkpoints computed
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


def evaluate_targets(targets: list[RunTarget], options: EvalOptions, mlflow_client=None, *, use_ray: bool = True,
                     ray_address: str | None = None, num_gpus_per_run: float = 0.0, out_dir: str | Path | None = None,
                     reference_seed: int | None = None, show_progress: bool = True, echo=print) -> Summary:
    """Plan, compute what is missing, log it to MLflow, and write the tables (when ``out_dir`` is given)."""
    options.check()
    summary = Summary()
    logged = {}
    keys = [k for what in whats(options) for k in metric_keys(what)]
    for target in targets:
        logged[target.name] = logged_metrics(mlflow_client, target.run_id, keys)
        for kind, count in plan_run(target, options, logged[target.name]).items():
            summary.skipped[kind] = summary.skipped.get(kind, 0) + count
    work = [t for t in targets if t.plan]
    total = sum(len(t.plan) for t in work)
    if work:
        echo(f"Evaluating {total} checkpoint(s) of {len(work)} run(s)" + ("" if use_ray else " in-process") + ".")
        bar = _progress_bar(total, show_progress)

        def on_report(report: dict) -> None:
            bar.update(1)
            if report.get("error"):
                summary.errors.append(f"{report['name']} step {report['step']}: {report['error']}")
            for what in report["computed"]:
                summary.computed[what] = summary.computed.get(what, 0) + 1

        try:
            if use_ray:
                run_on_ray(work, options, on_report, ray_address, num_gpus_per_run)
            else:
                run_locally(work, options, on_report)
        finally:
            bar.close()
    for target in targets:
        summary.logged_points += log_new_metrics(mlflow_client, target, options, logged[target.name])
    if out_dir is not None:
        summary.tables = write_tables(targets, options, out_dir, reference_seed)
    echo(describe(summary))
    return summary


def describe(summary: Summary) -> str:
    """A few lines: what was computed, what was skipped and why, what went to MLflow and where the tables are."""
    skipped = (f"skipped {summary.skipped.get('done', 0)} already done, {summary.skipped.get('from_mlflow', 0)} taken "
               f"from MLflow, {summary.skipped.get('unavailable', 0)} without validation data")
    if summary.nothing_to_do:
        lines = [f"nothing to do ({skipped})."]
    else:
        computed = ", ".join(f"{what} x{count}" for what, count in sorted(summary.computed.items())) or "nothing"
        lines = [f"computed: {computed}; {skipped}; logged {summary.logged_points} MLflow point(s)."]
    lines += [f"failed: {error}" for error in summary.errors]
    lines += [f"wrote {path}" for path in summary.tables.values()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- hook for training


def evaluate_run(run_dir: str | Path, *, cfg=None, tracking_uri: str | None = None, run_id: str | None = None,
                 options: EvalOptions | None = None, out_dir: str | Path | None = None, use_ray: bool = False,
                 show_progress: bool = False, echo=log.info) -> Summary:
    """Evaluate every checkpoint of one run trained here (e.g. right after training), in-process by default.

    ``cfg`` (a JobConfig) gives the validation rows and names; without it they come from the run's
    MLflow params. The MLflow run is ``run_id`` or the one recorded in ``<run_dir>/mlflow_run.json``.
    """
    from polypythia.config import to_dict

    record = Path(run_dir) / "mlflow_run.json"
    if run_id is None and record.is_file():
        saved = json.loads(record.read_text())
        run_id, tracking_uri = saved["run_id"], tracking_uri or saved.get("tracking_uri")
    mlflow_client = tracking.client(tracking_uri) if tracking_uri and run_id else None
    if cfg is not None:
        model, seed, valid = cfg.model.name, cfg.seed, {"kind": "config", "config": to_dict(cfg)}
    elif mlflow_client is not None:
        run = mlflow_client.get_run(run_id)
        model, seed = run.data.tags.get("model", "?"), int(run.data.tags.get("seed", 0))
        valid = valid_from_params(run.data.params)
    else:
        (model, seed), valid = parse_run_name(Path(run_dir).name), None
    checkpoints = own_checkpoints(run_dir)
    if not checkpoints:
        raise EvaluationError(f"{run_dir} has no completed checkpoints under checkpoints/step<S>/; train the run first.")
    target = RunTarget(Path(run_dir).name, model, seed, checkpoints, run_id=run_id if mlflow_client else None, valid=valid)
    return evaluate_targets([target], options or EvalOptions(), mlflow_client, use_ray=use_ray, out_dir=out_dir,
                            show_progress=show_progress, echo=echo)
