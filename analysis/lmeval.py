"""Reading lm-evaluation-harness result files into tidy rows (``model, seed, step, metric, value``).

:func:`analysis.load.load_study` calls :func:`lm_eval_rows` for a folder of result files; the parsing of
paths, model names and ``results`` blocks lives here so that ``--check`` (:mod:`analysis.check`) judges
the files exactly as the loader reads them.
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
from polypythia.study import TIDY_COLUMNS

log = logging.getLogger(__name__)

# lm-eval: "pythia-410m", "pythia-410m-seed3", "pythia-410m-seed10", "pythia-410m-deduped-seed3"
# (size = "410m-deduped"); the same pattern reads model names ("EleutherAI/pythia-410m-seed3").
_LM_EVAL_MODEL_DIR = re.compile(r"^pythia-(?P<size>.+?)(?:-seed(?P<seed>\d+))?$", re.IGNORECASE)
_LM_EVAL_STEP_DIR = re.compile(r"^step(?P<step>\d+)$")
_LM_EVAL_RESULT_FILE = re.compile(r"^results_(?P<stamp>.+)\.json$")
# lm-eval names its output folder after the model with "/" (and other path characters) replaced by
# "__": "EleutherAI/pythia-410m" -> "EleutherAI__pythia-410m" (lm_eval.utils, model_name_sanitized).
_LM_EVAL_NAME_SEPARATOR = "__"
_LM_EVAL_LAYOUT = "pythia-<size>[-seed<k>]/step<S>/.../results_<timestamp>.json"


def has_lm_eval_results(root: Path) -> bool:
    """Whether any ``results_*.json`` below ``root`` is laid out as lm-eval result files are."""
    return any(lm_eval_layout(path, root) is not None for path in root.rglob("results_*.json"))


def parse_lm_eval_path(path: Path, root: Path) -> tuple[str, int, int, str] | None:
    """(model, seed, step, timestamp) from ``pythia-<size>[-seed<k>]/step<S>/.../results_<ts>.json``.

    The seed folder ``pythia-<size>`` without ``-seed<k>`` is seed 0, the original Pythia run.
    """
    layout = lm_eval_layout(path, root)
    return None if layout is None else layout[:4]


def lm_eval_layout(path: Path, root: Path) -> tuple[str, int, int, str, tuple[str, ...]] | None:
    """Like :func:`parse_lm_eval_path`, plus the folder names between ``step<S>`` and the file."""
    file_match = _LM_EVAL_RESULT_FILE.match(path.name)
    if not file_match:
        return None
    parts = path.relative_to(root).parts[:-1]
    for index in range(len(parts) - 1):
        model_match = _LM_EVAL_MODEL_DIR.match(parts[index])
        step_match = _LM_EVAL_STEP_DIR.match(parts[index + 1])
        if model_match and step_match:
            seed = int(model_match.group("seed") or 0)
            return (model_match.group("size"), seed, int(step_match.group("step")), file_match.group("stamp"),
                    parts[index + 2:])
    return None


def pythia_identity(name: str) -> tuple[str, int] | None:
    """(size, seed) of a model name such as ``EleutherAI/pythia-410m-seed3`` or the folder lm-eval names
    after it, ``EleutherAI__pythia-410m-seed3`` (seed 0 without -seed<k>).

    The last ``/``- or ``__``-separated component that reads as ``pythia-...`` counts (so local paths
    work too); None when no component does (a name that says nothing about which Pythia model it is).
    """
    components = re.split(r"/+|" + _LM_EVAL_NAME_SEPARATOR + "+", str(name).strip())
    for component in reversed([c for c in components if c]):
        match = _LM_EVAL_MODEL_DIR.match(component)
        if match:
            return match.group("size").lower(), int(match.group("seed") or 0)
    return None


def lm_eval_named_models(data: dict, inner_folders: tuple[str, ...]) -> list[str]:
    """The model names an lm-eval result file gives for itself: its output folder(s) named after the
    model (``EleutherAI__pythia-410m``), the ``pretrained=`` entry of ``config.model_args``, and the
    top-level ``model_name`` that newer lm-eval versions write."""
    names = [folder for folder in inner_folders if pythia_identity(folder)]
    config = data.get("config")
    model_args = config.get("model_args") if isinstance(config, dict) else None
    if isinstance(model_args, dict):
        pretrained = model_args.get("pretrained")
    elif isinstance(model_args, str):
        entries = dict(part.split("=", 1) for part in model_args.split(",") if "=" in part)
        pretrained = entries.get("pretrained")
    else:
        pretrained = None
    for name in (pretrained, data.get("model_name")):
        if isinstance(name, str) and pythia_identity(name):
            names.append(name.strip())
    return names


def read_lm_eval_file(path: Path) -> dict:
    """The JSON object of one lm-eval result file; anything else is an AnalysisError naming the file."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as error:
        raise AnalysisError(f"The result file {path} could not be read ({error.strerror or error}); "
                            "check its permissions, or remove it.") from None
    except UnicodeDecodeError:
        raise AnalysisError(f"The result file {path} is not JSON text (it holds binary data); "
                            "remove or repair it.") from None
    except json.JSONDecodeError as error:
        raise AnalysisError(f"The result file {path} is not valid JSON ({error.msg} at line {error.lineno}); "
                            "remove or repair it.") from None
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", type(None): "null"}.get(type(data), "a number")
        raise AnalysisError(f"The result file {path} holds {kind}, not an lm-eval result object; "
                            "remove or repair it.")
    if not isinstance(data.get("results"), dict):
        raise AnalysisError(f"The result file {path} has no 'results' object, so it is not an lm-eval v0.4 "
                            "result file; remove or repair it.")
    return data


def lm_eval_metrics(results: dict) -> list[tuple[str, float]]:
    """``(name, value)`` pairs from the ``results`` block of an lm-eval v0.4 file.

    Naming: ``<task>/<metric>`` with the filter suffix dropped when it is ``none``
    (``"acc,none"`` -> ``arc_easy/acc``), kept otherwise (``"exact_match,flexible-extract"``
    -> ``gsm8k/exact_match@flexible-extract``). Standard errors (``*_stderr``) and non-numbers
    are skipped.
    """
    pairs = []
    for task, block in results.items():
        if not isinstance(block, dict):
            continue
        for key, value in block.items():
            if "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            name = f"{task}/{metric}" if filter_name in ("", "none") else f"{task}/{metric}@{filter_name}"
            pairs.append((name, float(value)))
    return pairs


def lm_eval_rows(root: str | os.PathLike, steps: Iterable[int] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The rows (model, seed, step, metric, value) of every ``results_*.json`` below ``root`` (optionally only
    those at ``steps``), one per (model, seed, step, metric), and notes on the files left out.

    Laid out as the published PolyPythias evaluations (HF dataset ``EleutherAI/polypythias-evals``):
    ``pythia-<size>[-seed<k>]/step<S>/EleutherAI__pythia-<size>[-seed<k>]/results_<timestamp>.json``.
    When several files give one (task, metric) of one model, seed and step, the latest timestamp
    wins; this is per metric, not per file, since two files may hold different tasks (as in
    EleutherAI/pythia, branch polypythias, ``polypythias/plots.ipynb``). Files whose own model name
    (output folder, ``config.model_args`` or ``model_name``) differs from their seed folder's hold
    another model's results (e.g. the base model filed under a seed) and are left out, with one
    warning and note counting them. Non-finite values are passed on unchanged.
    """
    root = Path(root)
    wanted = None if steps is None else {int(s) for s in steps}
    rows, foreign, laid_out, other_steps = [], [], 0, set()
    for path in sorted(root.rglob("results_*.json")):
        layout = lm_eval_layout(path, root)
        if layout is None:
            continue
        model, seed, step, stamp, inner = layout
        if wanted is not None and step not in wanted:
            other_steps.add(step)
            continue
        laid_out += 1
        data = read_lm_eval_file(path)
        expected = (model.lower(), seed)
        others = [name for name in lm_eval_named_models(data, inner) if pythia_identity(name) != expected]
        if others:
            foreign.append((path, others[0]))
            continue
        rows.extend((model, seed, step, name, value, stamp, str(path))
                    for name, value in lm_eval_metrics(data["results"]))
    if not laid_out and other_steps:
        shown = ", ".join(str(s) for s in sorted(other_steps)[:10]) + (", ..." if len(other_steps) > 10 else "")
        raise AnalysisError(f"The folder {root} holds no metric values matching --steps (its lm-eval results "
                            f"are at steps {shown}); choose other steps.")
    if not laid_out:
        raise AnalysisError(f"The folder {root} holds no lm-eval result files laid out as "
                            "pythia-<size>[-seed<k>]/step<S>/.../results_<timestamp>.json; check the path.")
    notes = []
    if foreign:
        example, name = foreign[0]
        note = (f"{len(foreign)} of {laid_out} lm-eval result files were left out because they name another "
                f"model than their seed folder (e.g. {example.relative_to(root)} is for {name}).")
        log.warning(note)
        notes.append(note)
    if not rows and foreign:
        raise AnalysisError(f"Every lm-eval result file under {root} names another model than its seed folder "
                            f"(e.g. {foreign[0][0]}); check that the folders hold the right models' results.")
    frame = pd.DataFrame(rows, columns=[*TIDY_COLUMNS, "stamp", "file"])
    # Timestamps are ISO-like ("2024-06-01T12-30-00.123456"), so string order is time order.
    frame = frame.sort_values(["stamp", "file"], kind="stable")
    frame = frame.drop_duplicates(["model", "seed", "step", "metric"], keep="last")
    return frame[TIDY_COLUMNS], notes
