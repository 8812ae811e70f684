"""Turn a study into one tidy table: ``model, seed, step, metric, value`` (:mod:`analysis.tidy_table`).

Three sources are understood:

* an MLflow experiment written by the training side (one child run per (model, seed) job,
  tagged ``polypythia.kind=job``; :func:`analysis.mlflow_load.load_mlflow`),
* a folder of lm-evaluation-harness result files: v0.4 in the published PolyPythias layout
  ``pythia-<size>[-seed<k>]/step<S>/.../results_<timestamp>.json``, v0.3 in the Pythia suite's
  ``pythia-<size>[-deduped]/zero-shot/<name>_step<S>.json`` (:func:`analysis.lmeval.load_lm_eval_folder`),
* a tidy CSV/TSV file with the five columns, or a wide one with ``seed``, ``step`` and one column
  per metric such as the study's released training map table (:func:`analysis.table_file.load_tidy_file`).

``load_study(..., steps=POLYPYTHIAS_EVAL_STEPS)`` keeps only the study's 27 evaluation checkpoints.

:func:`load_study` picks one by looking at the source and returns a :class:`Study`: the tidy
metrics table plus a runs table (one row per (model, seed) with its status, so that diverged or
failed runs are kept and can be reported).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.errors import AnalysisError
from analysis.lmeval import load_lm_eval_folder
from analysis.lmeval_layout import LM_EVAL_LAYOUTS, has_lm_eval_results
from analysis.mlflow_load import load_mlflow
from analysis.table_file import load_tidy_file
from analysis.tidy_table import Study, select_metrics

log = logging.getLogger(__name__)

# The 27 checkpoints the PolyPythias analyses use (van der Wal et al., "PolyPythias", ICLR 2025,
# arXiv 2503.09543; EleutherAI/pythia branch polypythias, polypythias/data/training_maps.tsv):
# step 0, the log-spaced steps 1, 2, 4, ..., 512, then 1000, 3000 and every 10,000 from 13,000 to 143,000.
POLYPYTHIAS_EVAL_STEPS: tuple[int, ...] = (0, *(2**i for i in range(10)), 1000, 3000, *range(13000, 143001, 10000))
STEP_PRESETS = {"polypythias": POLYPYTHIAS_EVAL_STEPS}


@dataclass
class SourceChoice:
    """What a source names: ``kind`` "lm-eval" (a folder), "table" (a file) or "mlflow" (an experiment)."""

    kind: str
    name: str  # the path, or the experiment's name
    folder: str | None = None  # a folder without lm-eval results, read as the experiment ``name``
    note: str | None = None  # the sentence that says so


def choose_source(source: str | os.PathLike) -> SourceChoice:
    """A folder of lm-eval results, a table file, or else an MLflow experiment name. A folder without
    lm-eval results is never taken for data (``python -m analysis polypythia`` run in the repository,
    where ``polypythia/`` is the package): its name is read as an experiment name, and a note says so."""
    path = Path(source)
    if path.is_dir():
        if has_lm_eval_results(path):
            return SourceChoice("lm-eval", str(source))
        name = Path(os.path.abspath(path)).name
        note = (
            f"The folder {source} holds no lm-eval result files laid out as {LM_EVAL_LAYOUTS}, so it is read "
            f"as the MLflow experiment name {name!r}."
        )
        return SourceChoice("mlflow", name, folder=str(source), note=note)
    if path.suffix.lower() in (".csv", ".tsv", ".txt") or path.is_file():
        return SourceChoice("table", str(source))
    return SourceChoice("mlflow", str(source))


@contextmanager
def read_as_experiment(choice: SourceChoice):
    """Errors about the experiment a folder's name was read as also say that the folder held no results."""
    try:
        yield
    except AnalysisError as error:
        if choice.folder is None:
            raise
        text = str(error)
        text = text[0].lower() + text[1:] if text[:2].istitle() else text
        raise AnalysisError(
            f"The folder {choice.folder} holds no lm-eval result files laid out as {LM_EVAL_LAYOUTS}, "
            f"so it was read as the MLflow experiment name {choice.name!r}, and {text}"
        ) from None


def load_study(
    source: str | os.PathLike,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    metrics: list[str] | None = None,
    steps: Iterable[int] | str | None = None,
    model: str | None = None,
) -> Study:
    """Load a study from an MLflow experiment name, a folder of lm-eval results or a CSV/TSV file.

    ``metrics`` optionally restricts which metric keys are read (MLflow) or kept (files);
    an entry ending in ``*`` is a prefix (``"weights/*"``). ``steps`` optionally keeps only those
    training steps, from any source: a list of steps, or text that :func:`parse_steps` reads
    (``"polypythias"`` = :data:`POLYPYTHIAS_EVAL_STEPS`, or ``"0,1,2,512"``). ``model`` names the
    model of a table that has no ``model`` column (see :func:`load_tidy_file`).
    """
    wanted_steps = None if steps is None else parse_steps(steps)
    choice = choose_source(source)
    if choice.kind == "lm-eval":
        study = load_lm_eval_folder(choice.name, steps=wanted_steps)
    elif choice.kind == "table":
        study = load_tidy_file(choice.name, model=model)
    else:
        with read_as_experiment(choice):
            study = load_mlflow(
                choice.name, tracking_uri=tracking_uri, parent_run_id=parent_run_id, metric_keys=metrics
            )
        if choice.note:
            log.warning(choice.note)
            study.notes.insert(0, choice.note)
    if metrics:
        study.metrics = study.metrics[select_metrics(study.metrics["metric"], metrics)].reset_index(drop=True)
        study.metrics["metric"] = study.metrics["metric"].cat.remove_unused_categories()
    if wanted_steps is not None:
        restrict_steps(study, wanted_steps)
    if not study.metrics.empty:
        from analysis.replicates import set_study_replicates_aside

        set_study_replicates_aside(study)
    if study.metrics.empty:
        matching = " and ".join(
            what for what, given in (("--metrics", metrics), ("--steps", wanted_steps)) if given is not None
        )
        raise AnalysisError(
            f"The source {source} holds no metric values{' matching ' + matching if matching else ''}; "
            "check the path or experiment name."
        )
    return study


def parse_steps(text) -> list[int]:
    """The steps a ``--steps`` value names, sorted and unique: a preset (``"polypythias"``), a comma list
    (``"0,1,2,512"``), or already a list of step numbers."""
    if not isinstance(text, str):
        return sorted({int(step) for step in text})
    cleaned = text.strip()
    if cleaned.lower() in STEP_PRESETS:
        return list(STEP_PRESETS[cleaned.lower()])
    parts = [part.strip() for part in cleaned.split(",")]
    if not cleaned or not all(re.fullmatch(r"\d+", part) for part in parts):
        presets = ", ".join(repr(name) for name in STEP_PRESETS)
        raise AnalysisError(
            f"The steps {text!r} are neither a comma-separated list of whole step numbers "
            f"(such as 0,1,2,512) nor a preset ({presets}); give one of those."
        )
    return sorted({int(part) for part in parts})


def restrict_steps(study: Study, steps: Iterable[int]) -> None:
    """Keep only the metric rows at ``steps`` (in place); a note lists requested steps the source lacks."""
    wanted = sorted({int(s) for s in steps})
    metrics = study.metrics
    present = set(pd.unique(metrics["step"]).tolist())
    study.metrics = metrics[metrics["step"].isin(wanted)].reset_index(drop=True)
    for column in ("model", "metric"):
        if isinstance(study.metrics[column].dtype, pd.CategoricalDtype):
            study.metrics[column] = study.metrics[column].cat.remove_unused_categories()
    missing = [s for s in wanted if s not in present]
    if missing and not study.metrics.empty:
        shown = ", ".join(str(s) for s in missing[:10]) + (", ..." if len(missing) > 10 else "")
        study.notes.append(f"{len(missing)} of the {len(wanted)} requested steps are not in the source: {shown}.")
