"""Reading a folder of lm-evaluation-harness result files into a :class:`analysis.tidy_table.Study`
(:func:`load_lm_eval_folder`), through tidy rows (``model, seed, step, metric, value``).

Two layouts are read, as their publishers laid them out:

* lm-eval 0.4, the published PolyPythias evaluations (HF dataset ``EleutherAI/polypythias-evals``):
  ``pythia-<size>[-seed<k>]/step<S>/EleutherAI__pythia-<size>[-seed<k>]/results_<timestamp>.json``;
* lm-eval 0.3, the Pythia suite's own evaluations (EleutherAI/pythia, ``evals/pythia-v1/``):
  ``pythia-<size>[-deduped]/zero-shot/<size>[-deduped]_step<S>.json`` (and ``five-shot/``), each file
  with ``results``, ``versions`` and ``config`` whose ``model_args`` is
  ``pretrained=EleutherAI/pythia-v1.1-<size>[-deduped],revision=step<S>``.

A model folder without ``-seed<k>`` is seed 0, the original Pythia run, as PolyPythias numbers it, so
that seeds 1-9 lie beside it; ``-deduped`` (and the suite's other variants, ``-bf16``, ``-0.5MtokBS``)
is part of the model's name, a model of its own. The model, seed and step come from the file's own
config where it has one (``pretrained=`` and ``revision=``, and lm-eval 0.4's output folder named after
the model), from the path otherwise: a file whose config contradicts its path is read as its config
says (e.g. the base model's results filed under a seed's folder count for seed 0, never for that seed),
with a note counting such files, and ``--check`` lists each (:func:`disagreeing_files`); a config that
names no Pythia model cannot be placed and is left out (one file's reading: :mod:`analysis.lmeval_file`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from analysis.errors import AnalysisError
from analysis.lmeval_file import config_identity, disagreement, lm_eval_metrics, read_lm_eval_file, task_shots
from analysis.lmeval_layout import LM_EVAL_LAYOUTS, ResultFile, result_files
from analysis.tidy_table import Study, diverged_notes, non_finite_endings, runs_from_metrics, tidy
from polypythia.study import TIDY_COLUMNS

log = logging.getLogger(__name__)


def load_lm_eval_folder(root: str | os.PathLike, steps: Iterable[int] | None = None) -> Study:
    """Read every lm-eval result file below ``root`` (optionally only those at ``steps``); see
    :func:`lm_eval_rows` for the layout and which files are left out."""
    frame, notes = lm_eval_rows(root, steps)
    diverged = non_finite_endings(frame)
    set_aside: list[str] = []
    metrics = tidy(frame, set_aside)
    for note in set_aside:
        log.warning(note)
    notes += set_aside + diverged_notes(diverged)
    return Study(
        metrics=metrics, runs=runs_from_metrics(metrics, diverged), source=str(root), kind="lm-eval", notes=notes
    )


def lm_eval_rows(root: str | os.PathLike, steps: Iterable[int] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The rows (model, seed, step, metric, value) of every result file below ``root`` in either layout
    (optionally only those at ``steps``), one per (model, seed, step, metric), and notes on the files left out.

    When several files give one (task, metric) of one model, seed and step, the latest timestamp wins;
    this is per metric, not per file, since two files may hold different tasks (as in EleutherAI/pythia,
    branch polypythias, ``polypythias/plots.ipynb``). lm-eval 0.3 files carry no timestamp: two of them
    giving different values is an error. Files whose config contradicts their path (:func:`analysis.lmeval_file.disagreement`:
    e.g. the base model's results filed under a seed) and the suite's files in other setting folders
    (:func:`analysis.lmeval_layout.suite_layout`) are left out, with a warning and note counting them.
    Non-finite values are passed on unchanged.
    """
    root = Path(root)
    files = result_files(root)
    wanted = None if steps is None else {int(s) for s in steps}
    at_steps = files_at_steps(root, files, wanted)
    read = [f for f in at_steps if not f.aside]
    rows, foreign, placed = file_rows(read, wanted)
    laid_out = {f.path for f in files}
    unread = [path for path in sorted(root.rglob("*.json")) if path not in laid_out]
    notes = left_out_notes(root, len(read), foreign, [f for f in at_steps if f.aside], unread, placed)
    for note in notes:
        log.warning(note)
    if not rows:
        example = foreign[0][0] if foreign else at_steps[0].path.parent
        raise AnalysisError(
            f"No lm-eval result file under {root} could be read: each names a model that is no Pythia "
            f"model, or lies aside (e.g. {example}); check that the folders hold the right models' "
            "results, or point the source at the folder to read."
        )
    return latest_values(rows), notes


def files_at_steps(root: Path, files: list[ResultFile], wanted: set[int] | None) -> list[ResultFile]:
    """The result files at the ``wanted`` steps (all when None); an error naming the steps the folder has
    when none is, or saying that the folder holds no result files at all."""
    at_steps = [f for f in files if wanted is None or f.step in wanted]
    if at_steps:
        return at_steps
    if not files:
        raise AnalysisError(
            f"The folder {root} holds no lm-eval result files laid out as {LM_EVAL_LAYOUTS}; check the path."
        )
    present = sorted({f.step for f in files})
    shown = ", ".join(str(s) for s in present[:10]) + (", ..." if len(present) > 10 else "")
    raise AnalysisError(
        f"The folder {root} holds no metric values matching --steps (its lm-eval results are "
        f"at steps {shown}); choose other steps."
    )


def file_rows(files: list[ResultFile], wanted: set[int] | None) -> tuple[list[tuple], list, list]:
    """The metric rows of ``files`` (model, seed, step, metric, value, stamp, file, placed), each file placed
    where its config says when that contradicts its path; and the ``(path, what its config says)`` of the
    files left out (config names no Pythia model) and of those placed by their config."""
    rows, foreign, placed = [], [], []
    for file in files:
        data = read_lm_eval_file(file.path)
        found = disagreement(file, data)
        model, seed, step = file.model, file.seed, file.step
        if found:
            identity = config_identity(file, data)
            (placed if identity else foreign).append((file.path, found[1]))
            if identity is None:
                continue
            model, seed, step = identity
            if wanted is not None and step not in wanted:
                continue
        rows.extend(
            (model, seed, step, name, value, file.stamp, str(file.path), bool(found))
            for name, value in lm_eval_metrics(data["results"], task_shots(data))
        )
    return rows, foreign, placed


def latest_values(rows: list[tuple]) -> pd.DataFrame:
    """One tidy row per (model, seed, step, metric) of :func:`file_rows`: a file's own filing over one placed
    by its config, then the latest timestamp (an error where undated files disagree)."""
    frame = without_shadowed(pd.DataFrame(rows, columns=[*TIDY_COLUMNS, "stamp", "file", "placed"]))
    check_undated(frame)
    # Timestamps are ISO-like ("2024-06-01T12-30-00.123456"), so string order is time order.
    frame = frame.sort_values(["stamp", "file"], kind="stable")
    frame = frame.drop_duplicates(["model", "seed", "step", "metric"], keep="last")
    return frame[TIDY_COLUMNS]


def left_out_notes(
    root: Path,
    n_read: int,
    foreign: list[tuple[Path, str]],
    aside: list[ResultFile],
    unread: list[Path],
    placed: list[tuple[Path, str]] = (),
) -> list[str]:
    """A note counting the files read as their config says rather than as their path does, one counting the
    files whose config names no Pythia model, one counting the files set aside and one counting the
    ``.json`` files in neither layout (the Pythia repository's ``evals/pythia-v0/``, whose
    "pythia-1.4b-deduped" is another model than today's, and its OPT and BLOOM baselines)."""
    notes = []
    if unread:
        notes.append(
            f"{len(unread)} .json files below {root} are in neither lm-eval layout and were not read "
            f"(e.g. {unread[0].relative_to(root)})."
        )
    if placed:
        example, name = placed[0]
        notes.append(
            f"{len(placed)} of {n_read} lm-eval result files name another model, step or number of shots in "
            f"their config than their path and were read as their config says, where no file filed under "
            f"that identity gives the same value (e.g. {example.relative_to(root)} is for {name}); --check "
            "lists them."
        )
    if foreign:
        example, name = foreign[0]
        notes.append(
            f"{len(foreign)} of {n_read} lm-eval result files were left out because their config names no "
            f"Pythia model, or models that contradict each other (e.g. {example.relative_to(root)} is for "
            f"{name})."
        )
    if aside:
        folders = ", ".join(sorted({f.path.parent.name + "/" for f in aside}))
        notes.append(
            f"{len(aside)} lm-eval result files in setting folders other than zero-shot/ or five-shot/ were "
            f"not read ({folders} e.g. {aside[0].path.relative_to(root)}); point the source at such a "
            "folder to read it alone."
        )
    return notes


def without_shadowed(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of files placed by their config (``placed``) only where no file filed under its own identity
    gives the same (model, seed, step, metric): the publisher's own filing wins, so that, for example, the
    base model's results filed under a seed's folder never replace the base model's own values."""
    keys = ["model", "seed", "step", "metric"]
    placed = frame["placed"].to_numpy(bool)
    if not placed.any():
        return frame
    own = frame.loc[~placed, keys].drop_duplicates()
    shadowed = frame.loc[placed, keys].merge(own.assign(_own=True), on=keys, how="left")["_own"].notna().to_numpy()
    keep = ~placed
    keep[placed] = ~shadowed
    return frame[keep]


def check_undated(frame: pd.DataFrame) -> None:
    """lm-eval 0.3 files carry no timestamp to tell which of two values of one (model, seed, step, metric) is
    the newer: when an undated file's value differs from another file's, raise an error naming both."""
    keys = ["model", "seed", "step", "metric"]
    undated = frame.loc[frame["stamp"] == "", keys].drop_duplicates()
    if undated.empty:
        return
    rows = frame.merge(undated, on=keys)
    counts = rows.groupby(keys, sort=False)["value"].transform("nunique")
    clash = rows[counts > 1]
    if clash.empty:
        return
    first = clash[(clash[keys] == clash[keys].iloc[0]).all(axis=1)].drop_duplicates("value").head(2)
    (a, b), (x, y) = first["file"].tolist(), first["value"].tolist()
    row = first.iloc[0]
    raise AnalysisError(
        f"The files {a} and {b} give different values of {row.metric} for model {row.model} seed "
        f"{row.seed} step {row.step} ({x:g} and {y:g}), and lm-eval 0.3 files carry no timestamp to "
        "choose the newer; remove one, or point the source at a folder that holds only one."
    )


def disagreeing_files(
    root: str | os.PathLike, steps: Iterable[int] | None = None
) -> list[tuple[ResultFile, str, str, bool]]:
    """``(file, "model" | "step" | "shots", what it says it is, read)`` for each result file below ``root`` (at
    ``steps``) whose config contradicts its path; ``read``: :func:`lm_eval_rows` read it as its config says
    (False: its config names no Pythia model, and it was left out)."""
    wanted = None if steps is None else {int(s) for s in steps}
    found = []
    for file in result_files(Path(root)):
        if file.aside or (wanted is not None and file.step not in wanted):
            continue
        data = read_lm_eval_file(file.path)
        said = disagreement(file, data)
        if said:
            found.append((file, *said, config_identity(file, data) is not None))
    return found
