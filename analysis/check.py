"""``python -m analysis SOURCE --check``: the integrity of a study's artefacts (issue #14, item 15).

Per run it lists:

* missing checkpoints: steps of the schedule without values (the run's own schedule from its MLflow
  params when known; else the Pythia schedule 0, 1, 2, 4, ..., 512, 1000, ..., 143000 within the run's
  step range; with ``--steps`` the steps asked for within that range);
* identical metrics at consecutive checkpoints (every ``weights/*`` value equal, or every metric when
  there are none): a hint that the checkpoints are the same (published Pythia: step 0 = step 1);
* lm-eval result files whose config names another model, step or number of shots than their path
  (:mod:`analysis.lmeval` reads them as their config says, or leaves them out when it names no Pythia model).

A folder of checkpoints (``<name>/step<S>/`` with config.json and weights) is checked on the weights
themselves by :mod:`polypythia.evaluate.integrity` (identical files, descent from the run's own step 0).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.errors import AnalysisError
from analysis.lmeval import disagreeing_files
from analysis.load import choose_source, load_study, parse_steps
from polypythia.evaluate import integrity
from polypythia.evaluate.integrity import FOREIGN_FILE, IDENTICAL_HINT, Problem
from polypythia.study import parse_run_label, run_label
from polypythia.train.schedule import checkpoint_steps

_NOT_CHECKPOINT_METRICS = ("train/", "system/")
# An lm-eval file whose config (revision=, num_fewshot) gives another step or number of shots than its path.
CONFIG_PATH_DISAGREE = "evaluation file's config and path disagree"


def foreign_files(root: str | Path, steps=None) -> dict[tuple[str, str], list[tuple[int, str, str, str]]]:
    """(model, run label) of the path -> [(step, file relative to ``root``, the problem, what the file says it is
    and what became of it)] for the lm-eval result files whose config contradicts their path
    (``load_lm_eval_folder`` reads them as their config says, or leaves out one that names no Pythia model):
    :data:`FOREIGN_FILE` when it names another model, :data:`CONFIG_PATH_DISAGREE` another step or number of shots."""
    found: dict[tuple[str, str], list[tuple[int, str, str, str]]] = {}
    for file, kind, said, read in disagreeing_files(root, steps):
        problem = FOREIGN_FILE if kind == "model" else CONFIG_PATH_DISAGREE
        fate = "it was read as its config says" if read else "it was left out"
        found.setdefault((file.model, run_label(file.seed, file.seed)), []).append(
            (file.step, str(file.path.relative_to(root)), problem, f"{said}; {fate}")
        )
    return found


def mlflow_schedules(study) -> dict[tuple[str, str], list[int]]:
    """(model, run label) -> checkpoint schedule from each MLflow run's ``budget.*`` params, where readable."""
    if study.kind != "mlflow" or "run_id" not in study.runs:
        return {}
    from polypythia.tracking import client as tracking

    schedules = {}
    try:
        client = tracking.client(study.tracking_uri)
        for row in study.runs.itertuples():
            params = client.get_run(row.run_id).data.params
            if "budget.steps" in params and "budget.checkpoint_every_steps" in params:
                log_spaced = str(params.get("budget.log_spaced_checkpoints", "True")).lower() not in ("false", "0")
                schedules[(str(row.model), str(row.seed))] = checkpoint_steps(
                    int(params["budget.steps"]), int(params["budget.checkpoint_every_steps"]), log_spaced
                )
    except Exception:  # noqa: BLE001 - no schedule: the Pythia one is used
        return schedules
    return schedules


def checkpoint_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of one run that stand for checkpoints: ``weights/*`` when present, else all but train/system."""
    names = rows["metric"].astype(str)
    weights = rows[names.str.startswith("weights/").to_numpy()]
    if not weights.empty:
        return weights
    kept = rows[~names.str.startswith(_NOT_CHECKPOINT_METRICS).to_numpy()]
    return kept if not kept.empty else rows


def check_study(
    study, steps: list[int] | None = None, schedules: dict | None = None, foreign: dict | None = None
) -> list[Problem]:
    """The problems of a loaded study, run by run (see the module docstring)."""
    schedules, foreign = schedules or {}, foreign or {}
    metrics = study.metrics.astype({"model": str, "seed": str, "metric": str})
    groups = dict(iter(metrics.groupby(["model", "seed"], sort=False)))
    runs = study.runs.astype({"model": str, "seed": str})
    problems: list[Problem] = []
    for row in runs.itertuples():
        key = (row.model, row.seed)
        ident = (row.model, row.seed, int(row.weight_seed), int(row.data_seed))
        rows = checkpoint_rows(groups[key]) if key in groups else None
        if rows is not None and not rows.empty:
            present = sorted(set(rows["step"].astype(int)))
            if steps is not None:
                expected = [s for s in steps if present[0] <= s <= present[-1]]
                where = "the requested --steps in the run's step range"
            elif key in schedules:
                expected, where = schedules[key], "the run's schedule (MLflow params)"
            else:
                expected, where = integrity.expected_steps(present), "the Pythia schedule in the run's step range"
            found = integrity.missing_problem(*ident, present, expected, where)
            problems += [found] if found else []
            vectors = [
                (int(step), tuple(sorted(zip(g["metric"], g["value"])))) for step, g in rows.groupby("step", sort=True)
            ]
            for group in integrity.identical_runs(vectors):
                problems.append(
                    Problem(
                        *ident,
                        IDENTICAL_HINT,
                        integrity.step_list(group),
                        f"all {len(vectors[0][1])} checkpoint metrics are equal at these steps; "
                        "the checkpoints may be the same",
                    )
                )
        problems += foreign_problems(ident, foreign.get(key, []))
    listed = set(zip(runs["model"], runs["seed"]))
    for (model, seed), files in foreign.items():  # runs of which every file was left out
        if (model, seed) not in listed:
            problems += foreign_problems((model, seed, *parse_run_label(seed)), files)
    return problems


def foreign_problems(ident: tuple, files: list[tuple[int, str, str, str]]) -> list[Problem]:
    return [Problem(*ident, problem, str(step), f"{path} is for {said}") for step, path, problem, said in files]


def checkpoint_folder(source: str) -> bool:
    """Whether ``source`` is a folder of ``<name>/step<S>/`` checkpoints (and not of lm-eval results)."""
    from polypythia.evaluate.__main__ import choose_source as evaluate_source

    return Path(source).is_dir() and choose_source(source).kind != "lm-eval" and evaluate_source(source)[0]


def check(args) -> int:
    """Run the check of ``args.source``: print the table, write check.csv (into --out, else here); 1 on problems."""
    from polypythia.evaluate.targets import targets_from_folder

    out = (args.out or Path(".")) / integrity.CHECK_FILE
    if checkpoint_folder(args.source):
        problems = integrity.check_targets(targets_from_folder(args.source, args.out or Path(".")))
        return integrity.report(problems, f"Checkpoints of {args.source}", out)
    steps = None if args.steps is None else parse_steps(args.steps)
    foreign = foreign_files(args.source, steps) if choose_source(args.source).kind == "lm-eval" else {}
    try:
        study = load_study(
            args.source,
            tracking_uri=args.tracking_uri,
            parent_run_id=args.parent_run,
            metrics=args.metrics,
            steps=steps,
            model=args.model,
        )
    except AnalysisError:
        if not foreign:
            raise
        problems = [
            p
            for (model, seed), files in foreign.items()  # every file was left out: list them
            for p in foreign_problems((model, seed, *parse_run_label(seed)), files)
        ]
        return integrity.report(problems, f"Integrity of {args.source}", out)
    problems = check_study(study, steps, mlflow_schedules(study), foreign)
    return integrity.report(problems, f"Integrity of {args.source}", out)
