"""What a checkpoint evaluation works on: the runs of a study and their checkpoints.

A *study* is either the job runs (tag ``polypythia.kind=job``) of an MLflow experiment, whose
checkpoints lie under each run's ``run_dir`` tag, or a *folder* of Hugging Face checkpoints laid
out ``<name>/step<S>/`` as the published Pythia / PolyPythias checkpoints are (``<name>`` like
``pythia-160m-seed3`` or ``70m-seed1``; ``<name>/checkpoints/step<S>/``, a polypythia run folder,
works too). Each run becomes a :class:`RunTarget`, plain data that crosses into a Ray task.

Run identity. A run is (model, weight seed, data seed) (polypythia.study): runs of one seed with
different data seeds (``tiny-seed1``, ``tiny-wseed1-dseed2``; or MLflow tags ``weight_seed`` /
``data_seed``) stay apart. The tables label each run in a ``seed`` column with
:func:`polypythia.study.run_label`: ``"3"`` when both seeds are 3, ``"w1-d2"`` when they differ.

Validation rows (``RunTarget.valid``): a run trained here rebuilds its config from the run's
MLflow params; a folder needs ``--valid-data`` (a ``.bin/.idx`` prefix); without either, none.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polypythia import study
from polypythia.errors import PolypythiaError
from polypythia.tracking import client as tracking
from polypythia.train.checkpoint import STEP_DIR

log = logging.getLogger(__name__)

# "pythia-160m-seed3" -> (160m, 3, 3); "70m-seed1" -> (70m, 1, 1); "tiny-wseed1-dseed2" -> (tiny, 1, 2);
# "pythia-410m" -> (410m, 0, 0): the original run.
_RUN_NAME = re.compile(r"^(?:pythia-)?(?P<model>.+?)(?:-seed(?P<seed>\d+)|-wseed(?P<w>\d+)-dseed(?P<d>\d+))?$")


class EvaluationError(PolypythiaError, ValueError):
    """A study, folder or option that the checkpoint evaluation cannot work with."""


@dataclass
class CheckpointTarget:
    step: int
    path: str  # the Hugging Face checkpoint folder
    results_dir: str  # where this checkpoint's result files go


@dataclass
class RunTarget:
    """One run to evaluate: its checkpoints, its MLflow run (if any) and its validation rows.

    A run is (model, weight_seed, data_seed); ``seed`` is its label in the tables.
    """

    name: str
    model: str
    weight_seed: int
    data_seed: int
    checkpoints: list[CheckpointTarget]
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # the MLflow run's tags (evaluators read and set some)
    # {"kind": "config", "config": {...}} (a run trained here) or
    # {"kind": "indexed", "prefix": ..., "seq_length": ..., "max_rows": ...}; None: no validation data
    valid: dict | None = None
    plan: dict[int, list[str]] = field(default_factory=dict)  # step -> names of the evaluators to run

    @property
    def run_key(self) -> tuple[int, int]:
        return self.weight_seed, self.data_seed

    @property
    def seed(self) -> str:
        return study.run_label(self.weight_seed, self.data_seed)

    @property
    def mlflow_weight_stats(self) -> str | None:
        """The run's ``weight_stats`` tag: the definition of the ``weights/*`` metrics it logged."""
        return self.tags.get(study.WEIGHT_STATS_TAG)

    @mlflow_weight_stats.setter
    def mlflow_weight_stats(self, definition: str | None) -> None:
        if definition is None:
            self.tags.pop(study.WEIGHT_STATS_TAG, None)
        else:
            self.tags[study.WEIGHT_STATS_TAG] = definition

    @classmethod
    def from_dict(cls, data: dict) -> "RunTarget":
        """The inverse of ``dataclasses.asdict`` (how a target travels into a Ray task)."""
        return cls(**{**data, "checkpoints": [CheckpointTarget(**c) for c in data["checkpoints"]]})


# ----------------------------------------------------------------------------- folders


def parse_run_name(name: str) -> tuple[str, int, int]:
    """(model, weight seed, data seed) from a run folder name.

    ``<model>-seed<k>`` is (model, k, k), ``<model>-wseed<w>-dseed<d>`` is (model, w, d) (the names
    training gives its run folders), a leading ``pythia-`` is dropped, and a name without seeds is
    seed 0 (the original Pythia run).
    """
    match = _RUN_NAME.match(name)
    if not match or not match.group("model"):
        raise EvaluationError(f"Cannot read a model name from the folder name '{name}'; name it like pythia-70m-seed3.")
    if match.group("w") is not None:
        return match.group("model"), int(match.group("w")), int(match.group("d"))
    seed = int(match.group("seed") or 0)
    return match.group("model"), seed, seed


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
        raise EvaluationError(
            f"{root} is not a folder; give a folder of <name>/step<S>/ checkpoints or an MLflow experiment name."
        )
    targets = []
    for run_folder in sorted(p for p in root.iterdir() if p.is_dir()):
        steps = step_folders(run_folder)
        if not steps:
            continue
        model, weight_seed, data_seed = parse_run_name(run_folder.name)
        checkpoints = [
            CheckpointTarget(step, str(path), str(Path(out_dir) / "results" / run_folder.name / f"step{step}"))
            for step, path in steps
        ]
        targets.append(RunTarget(run_folder.name, model, weight_seed, data_seed, checkpoints, valid=valid))
    if not targets:
        raise EvaluationError(
            f"{root} holds no <name>/step<S>/ folders with a config.json; point at the folder above them."
        )
    return targets


def attach_folder_runs(mlflow_client, experiment: str, targets: list[RunTarget]) -> None:
    """Give each folder target an MLflow run named after its folder (found again on a later pass)."""
    exp_id = tracking.experiment_id(mlflow_client, experiment)
    for target in targets:
        found = mlflow_client.search_runs(
            [exp_id], filter_string=f"tags.`mlflow.runName` = '{target.name}'", max_results=1
        )
        if found:
            target.run_id, target.tags = found[0].info.run_id, dict(found[0].data.tags)
            continue
        tags = {
            study.KIND_TAG: study.JOB_KIND,
            study.MODEL_TAG: target.model,
            study.SEED_TAG: str(target.weight_seed),
            study.WEIGHT_SEED_TAG: str(target.weight_seed),
            study.DATA_SEED_TAG: str(target.data_seed),
            "source_dir": str(Path(target.checkpoints[0].path).parent),
        }
        run = mlflow_client.create_run(exp_id, run_name=target.name, tags=tags)
        mlflow_client.set_terminated(run.info.run_id, status="FINISHED")
        target.run_id = run.info.run_id


# ----------------------------------------------------------------------------- runs trained here


def own_checkpoints(run_dir: str | Path) -> list[CheckpointTarget]:
    """The completed checkpoints of a run trained here; results are kept inside each one."""
    from polypythia.train.checkpoint import list_checkpoints

    return [
        CheckpointTarget(c.step, str(c.path), str(c.path / "eval"))
        for c in list_checkpoints(run_dir)
        if (c.path / "config.json").is_file()
    ]


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
    from polypythia.config.jobconfig import job_config, to_dict

    try:
        return {"kind": "config", "config": to_dict(job_config(config_from_params(params)))}
    except (PolypythiaError, ValueError, TypeError) as exc:
        log.warning("No validation data for this run: its params do not rebuild a config (%s).", exc)
        return None


def targets_from_mlflow(mlflow_client, experiment: str, parent_run_id: str | None = None) -> list[RunTarget]:
    """One target per job run (tag ``polypythia.kind=job``) of ``experiment`` with checkpoints on disk."""
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None:
        raise EvaluationError(f"MLflow has no experiment named '{experiment}'; check the name and --tracking-uri.")
    targets = []
    for run in study.search_job_runs(mlflow_client, exp.experiment_id, parent_run_id):
        tags = run.data.tags
        checkpoints = own_checkpoints(tags.get(study.RUN_DIR_TAG, ""))
        if not checkpoints:
            log.warning(
                "Run %s (%s) has no checkpoints under %s; skipped.",
                run.info.run_name,
                run.info.run_id,
                tags.get(study.RUN_DIR_TAG),
            )
            continue
        weight_seed, data_seed = study.seeds_from_tags(tags)
        targets.append(
            RunTarget(
                run.info.run_name or run.info.run_id,
                tags.get(study.MODEL_TAG, "?"),
                weight_seed,
                data_seed,
                checkpoints,
                run_id=run.info.run_id,
                tags=dict(tags),
                valid=valid_from_params(run.data.params),
            )
        )
    if not targets:
        raise EvaluationError(
            f"No run of experiment '{experiment}' has checkpoints on this machine; train first or check the run_dir tags."
        )
    return sorted(targets, key=lambda t: (t.model, t.run_key))


def target_for_run_dir(run_dir: str | Path, *, cfg=None, run=None) -> RunTarget:
    """The target of one run trained here: names, seeds and validation rows from ``cfg`` (a JobConfig),
    else from ``run`` (its MLflow run: params and tags), else from the folder's name (no validation rows)."""
    from polypythia.config.jobconfig import to_dict

    tags = dict(run.data.tags) if run is not None else {}
    if cfg is not None:
        model, weight_seed, data_seed = cfg.model.name, cfg.effective_weight_seed, cfg.effective_data_seed
        valid = {"kind": "config", "config": to_dict(cfg)}
    elif run is not None:
        model, (weight_seed, data_seed) = tags.get(study.MODEL_TAG, "?"), study.seeds_from_tags(tags)
        valid = valid_from_params(run.data.params)
    else:
        (model, weight_seed, data_seed), valid = parse_run_name(Path(run_dir).name), None
    checkpoints = own_checkpoints(run_dir)
    if not checkpoints:
        raise EvaluationError(
            f"{run_dir} has no completed checkpoints under checkpoints/step<S>/; train the run first."
        )
    return RunTarget(
        Path(run_dir).name,
        model,
        weight_seed,
        data_seed,
        checkpoints,
        run_id=run.info.run_id if run is not None else None,
        tags=tags,
        valid=valid,
    )
