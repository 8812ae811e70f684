"""Reading lm-evaluation-harness result files into tidy rows (``model, seed, step, metric, value``).

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
names no Pythia model cannot be placed and is left out. :func:`analysis.load.load_study` calls
:func:`lm_eval_rows`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from analysis.errors import AnalysisError
from analysis.lmeval_layout import LM_EVAL_LAYOUTS, ResultFile, pythia_identity, result_files
from polypythia.study import TIDY_COLUMNS

log = logging.getLogger(__name__)

_REVISION = re.compile(r"^step(?P<step>\d+)$")  # lm-eval model_args: revision=step143000


def lm_eval_named_models(data: dict, inner_folders: tuple[str, ...]) -> list[str]:
    """The model names an lm-eval result file gives for itself: its output folder(s) named after the
    model (``EleutherAI__pythia-410m``), the ``pretrained=`` entry of ``config.model_args``, and the
    top-level ``model_name`` that newer lm-eval versions write."""
    names = [folder for folder in inner_folders if pythia_identity(folder)]
    for name in (model_args(data).get("pretrained"), data.get("model_name")):
        if isinstance(name, str) and pythia_identity(name):
            names.append(name.strip())
    return names


def model_args(data: dict) -> dict:
    """``config.model_args`` as a dict: lm-eval writes ``"pretrained=...,revision=step1000"`` (or a dict)."""
    config = data.get("config")
    args = config.get("model_args") if isinstance(config, dict) else None
    if isinstance(args, dict):
        return args
    if isinstance(args, str):
        return dict(part.split("=", 1) for part in args.split(",") if "=" in part)
    return {}


def disagreement(file: ResultFile, data: dict) -> tuple[str, str] | None:
    """``("model" | "step" | "shots", what the file says it is)`` where its own config (or lm-eval's output
    folder) contradicts its path; None when they agree or the file does not say."""
    path_says = (file.model.lower(), file.seed)
    others = [n for n in lm_eval_named_models(data, file.inner) if pythia_identity(n) != path_says]
    if others:
        return "model", others[0]
    args = model_args(data)
    pretrained = args.get("pretrained")
    if file.suite and isinstance(pretrained, str) and pythia_identity(pretrained) is None:
        return "model", pretrained.strip()  # no Pythia model: the suite's intervention-pythia-... models
    revision = _REVISION.match(str(args.get("revision", "")).strip())
    if revision and int(revision["step"]) != file.step:
        return "step", f"step {int(revision['step'])}"
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    shots = config.get("num_fewshot")
    if file.shots is not None and type(shots) is int and shots != file.shots:
        return "shots", f"{shots}-shot"
    return None


def config_identity(file: ResultFile, data: dict) -> tuple[str, int, int] | None:
    """(model, seed, step) as the file's own config gives it: the model and seed from ``pretrained=`` (else
    lm-eval 0.4's output folder, else ``model_name``), the step from ``revision=step<S>``; what the config
    does not say comes from the path. None when the file cannot be placed: its config names a model that is
    no Pythia model, or the names it gives for itself are of different models."""
    args = model_args(data)
    pretrained = args.get("pretrained")
    if isinstance(pretrained, str) and pythia_identity(pretrained) is None:
        return None
    identities = {pythia_identity(name) for name in lm_eval_named_models(data, file.inner)}
    if len(identities) > 1:
        return None
    model, seed = identities.pop() if identities else (file.model, file.seed)
    revision = _REVISION.match(str(args.get("revision", "")).strip())
    return model, seed, int(revision["step"]) if revision else file.step


def task_shots(data: dict) -> dict[str, int]:
    """Few-shot examples per task of ``results``: lm-eval 0.4's ``n-shot`` block, else lm-eval 0.3's
    ``config.num_fewshot`` (one number for every task of the file); 0 when neither says."""
    n_shot = data.get("n-shot") if isinstance(data.get("n-shot"), dict) else {}
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    shots = {}
    for task in data["results"]:
        value = n_shot.get(task, config.get("num_fewshot"))
        shots[task] = value if type(value) is int and value > 0 else 0
    return shots


def read_lm_eval_file(path: Path) -> dict:
    """The JSON object of one lm-eval result file; anything else is an AnalysisError naming the file."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as error:
        raise AnalysisError(
            f"The result file {path} could not be read ({error.strerror or error}); "
            "check its permissions, or remove it."
        ) from None
    except UnicodeDecodeError:
        raise AnalysisError(
            f"The result file {path} is not JSON text (it holds binary data); remove or repair it."
        ) from None
    except json.JSONDecodeError as error:
        raise AnalysisError(
            f"The result file {path} is not valid JSON ({error.msg} at line {error.lineno}); remove or repair it."
        ) from None
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", type(None): "null"}.get(type(data), "a number")
        raise AnalysisError(f"The result file {path} holds {kind}, not an lm-eval result object; remove or repair it.")
    if not isinstance(data.get("results"), dict):
        raise AnalysisError(
            f"The result file {path} has no 'results' object, so it is not an lm-eval result file; remove or repair it."
        )
    return data


def lm_eval_metrics(results: dict, shots: dict[str, int] | None = None) -> list[tuple[str, float]]:
    """``(name, value)`` pairs from the ``results`` block of an lm-eval 0.3 or 0.4 file.

    Naming: ``<task>/<metric>``, the one name for lm-eval 0.3's ``"acc"`` and 0.4's ``"acc,none"``
    (``arc_easy/acc``): 0.4's filter suffix is dropped when it is ``none`` and kept otherwise
    (``"exact_match,flexible-extract"`` -> ``gsm8k/exact_match@flexible-extract``). A task evaluated
    with k > 0 examples in its prompt (``shots``, see :func:`task_shots`) is ``<task>@<k>shot``
    (``arc_easy@5shot/acc``), so that 5-shot values never mix with 0-shot ones. Standard errors
    (``*_stderr``) and non-numbers are skipped.
    """
    pairs = []
    for task, block in results.items():
        if not isinstance(block, dict):
            continue
        k = (shots or {}).get(task, 0)
        label = f"{task}@{k}shot" if k else task
        for key, value in block.items():
            if "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            name = f"{label}/{metric}" if filter_name in ("", "none") else f"{label}/{metric}@{filter_name}"
            pairs.append((name, float(value)))
    return pairs


def lm_eval_rows(root: str | os.PathLike, steps: Iterable[int] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The rows (model, seed, step, metric, value) of every result file below ``root`` in either layout
    (optionally only those at ``steps``), one per (model, seed, step, metric), and notes on the files left out.

    When several files give one (task, metric) of one model, seed and step, the latest timestamp wins;
    this is per metric, not per file, since two files may hold different tasks (as in EleutherAI/pythia,
    branch polypythias, ``polypythias/plots.ipynb``). lm-eval 0.3 files carry no timestamp: two of them
    giving different values is an error. Files whose config contradicts their path (:func:`disagreement`:
    e.g. the base model's results filed under a seed) and the suite's files in other setting folders
    (:func:`analysis.lmeval_layout.suite_layout`) are left out, with a warning and note counting them.
    Non-finite values are passed on unchanged.
    """
    root = Path(root)
    files = result_files(root)
    wanted = None if steps is None else {int(s) for s in steps}
    at_steps = [f for f in files if wanted is None or f.step in wanted]
    if not at_steps:
        present = sorted({f.step for f in files})
        shown = ", ".join(str(s) for s in present[:10]) + (", ..." if len(present) > 10 else "")
        raise AnalysisError(
            f"The folder {root} holds no metric values matching --steps (its lm-eval results are "
            f"at steps {shown}); choose other steps."
            if files
            else f"The folder {root} holds no lm-eval result files laid out as {LM_EVAL_LAYOUTS}; check the path."
        )
    rows, foreign, placed = [], [], []
    read = [f for f in at_steps if not f.aside]
    for file in read:
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
    frame = without_shadowed(pd.DataFrame(rows, columns=[*TIDY_COLUMNS, "stamp", "file", "placed"]))
    check_undated(frame)
    # Timestamps are ISO-like ("2024-06-01T12-30-00.123456"), so string order is time order.
    frame = frame.sort_values(["stamp", "file"], kind="stable")
    frame = frame.drop_duplicates(["model", "seed", "step", "metric"], keep="last")
    return frame[TIDY_COLUMNS], notes


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
