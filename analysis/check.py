"""``python -m analysis SOURCE --check``: the integrity of a study's artefacts (issue #14, item 15).

Per run it lists:

* missing checkpoints: steps of the schedule without values (the run's own schedule from its MLflow
  params when known; else the Pythia schedule 0, 1, 2, 4, ..., 512, 1000, ..., 143000 within the run's
  step range; with ``--steps`` the steps asked for within that range);
* identical metrics at consecutive checkpoints (every ``weights/*`` value equal, or every metric when
  there are none): a hint that the checkpoints are the same (published Pythia: step 0 = step 1);
* lm-eval result files that name another model than their folder (the ones :mod:`analysis.load` leaves out).

A folder of checkpoints (``<name>/step<S>/`` with config.json and weights) is checked on the weights
themselves by :mod:`polypythia.evaluate.integrity` (identical files, descent from the run's own step 0).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.lmeval import lm_eval_layout, lm_eval_named_models, pythia_identity, read_lm_eval_file
from analysis.load import choose_source, load_study, parse_steps
from polypythia.evaluate import integrity
from polypythia.evaluate.integrity import FOREIGN_FILE, IDENTICAL_HINT, Problem
from polypythia.study import run_label
from polypythia.train.schedule import checkpoint_steps

_NOT_CHECKPOINT_METRICS = ("train/", "system/")


def foreign_files(root: str | Path, steps=None) -> dict[tuple[str, str], list[tuple[int, str, str]]]:
    """(model, run label) -> [(step, file relative to ``root``, the model it names)] for the lm-eval result
    files that name another model than their seed folder (``load_lm_eval_folder`` leaves them out)."""
    root = Path(root)
    wanted = None if steps is None else set(steps)
    found: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
    for path in sorted(root.rglob("results_*.json")):
        layout = lm_eval_layout(path, root)
        if layout is None or (wanted is not None and layout[2] not in wanted):
            continue
        model, seed, step, _, inner = layout
        others = [n for n in lm_eval_named_models(read_lm_eval_file(path), inner)
                  if pythia_identity(n) != (model.lower(), seed)]
        if others:
            found.setdefault((model, run_label(seed, seed)), []).append((step, str(path.relative_to(root)), others[0]))
    return found


def mlflow_schedules(study) -> dict[tuple[str, str], list[int]]:
    """(model, run label) -> checkpoint schedule from each MLflow run's ``budget.*`` params, where readable."""
    if study.kind != "mlflow" or "run_id" not in study.runs:
        return {}
    from polypythia import tracking

    schedules = {}
    try:
        client = tracking.client(study.tracking_uri)
        for row in study.runs.itertuples():
            params = client.get_run(row.run_id).data.params
            if "budget.steps" in params and "budget.checkpoint_every_steps" in params:
                log_spaced = str(params.get("budget.log_spaced_checkpoints", "True")).lower() not in ("false", "0")
                schedules[(str(row.model), str(row.seed))] = checkpoint_steps(
                    int(params["budget.steps"]), int(params["budget.checkpoint_every_steps"]), log_spaced)
    except Exception:  # no schedule: the Pythia one is used
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


def check_study(study, steps: list[int] | None = None, schedules: dict | None = None,
                foreign: dict | None = None) -> list[Problem]:
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
            vectors = [(int(step), tuple(sorted(zip(g["metric"], g["value"]))))
                       for step, g in rows.groupby("step", sort=True)]
            for group in integrity.identical_runs(vectors):
                problems.append(Problem(*ident, IDENTICAL_HINT, integrity.step_list(group),
                                        f"all {len(vectors[0][1])} checkpoint metrics are equal at these steps; "
                                        "the checkpoints may be the same"))
        for step, path, name in foreign.get(key, []):
            problems.append(Problem(*ident, FOREIGN_FILE, str(step), f"{path} is for {name}; it was left out"))
    return problems


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
    study = load_study(args.source, tracking_uri=args.tracking_uri, parent_run_id=args.parent_run,
                       metrics=args.metrics, steps=steps, model=args.model)
    foreign = foreign_files(args.source, steps) if study.kind == "lm-eval" else {}
    problems = check_study(study, steps, mlflow_schedules(study), foreign)
    return integrity.report(problems, f"Integrity of {args.source}", out)
