"""Where lm-evaluation-harness result files lie and which model, seed and step their path names.

The two layouts :mod:`analysis.lmeval` reads (see there): the published PolyPythias evaluations
(lm-eval 0.4, ``pythia-<size>[-seed<k>]/step<S>/.../results_<timestamp>.json``) and the Pythia suite's
own (lm-eval 0.3, ``pythia-<size>[-deduped]/zero-shot/<name>_step<S>.json``). Only paths are looked at
here; the files' contents are read by :mod:`analysis.lmeval`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# lm-eval: "pythia-410m", "pythia-410m-seed3", "pythia-410m-seed10", "pythia-410m-deduped-seed3"
# (size = "410m-deduped"); the same pattern reads model names ("EleutherAI/pythia-410m-seed3").
# The Pythia suite's lm-eval 0.3 files name a model as it was called then: "EleutherAI/pythia-v1.1-160m"
# is today's pythia-160m (EleutherAI/pythia, evals/pythia-v1/pythia-160m/zero-shot/160m_step143000.json).
_LM_EVAL_MODEL_DIR = re.compile(r"^pythia-(?:v1\.1-)?(?P<size>.+?)(?:-seed(?P<seed>\d+))?$", re.IGNORECASE)
_LM_EVAL_STEP_DIR = re.compile(r"^step(?P<step>\d+)$")
_LM_EVAL_RESULT_FILE = re.compile(r"^results_(?P<stamp>.+)\.json$")
# lm-eval names its output folder after the model with "/" (and other path characters) replaced by
# "__": "EleutherAI/pythia-410m" -> "EleutherAI__pythia-410m" (lm_eval.utils, model_name_sanitized).
_LM_EVAL_NAME_SEPARATOR = "__"
# The Pythia suite's layout: a model folder whose name starts with a size (so "pythia-v1" is none), the
# file in it or in one setting folder; the file name's prefix is not trusted (pythia-1b-bf16/zero-shot/
# holds 1b-bf16-5shot_step1000.json, a 0-shot evaluation by its config).
_SUITE_MODEL_DIR = re.compile(r"^pythia-(?P<size>\d+(?:\.\d+)?[mb](?:-.+?)?)(?:-seed(?P<seed>\d+))?$", re.IGNORECASE)
_SUITE_FILE = re.compile(r"^.+_step(?P<step>\d+)\.json$")
_SHOT_DIR = re.compile(r"^(?:(?P<k>\d+)|(?P<word>zero|one|five))-shot$", re.IGNORECASE)
_SHOT_WORDS = {"zero": 0, "one": 1, "five": 5}
LM_EVAL_LAYOUTS = (
    "pythia-<size>[-seed<k>]/step<S>/.../results_<timestamp>.json (lm-eval 0.4) or "
    "pythia-<size>[-deduped]/zero-shot/<name>_step<S>.json (lm-eval 0.3)"
)


@dataclass(frozen=True)
class ResultFile:
    """A result file laid out as one of the two layouts, with the identity its path gives."""

    path: Path
    model: str
    seed: int
    step: int
    stamp: str = ""  # the file name's timestamp; "" for the suite's lm-eval 0.3 files, which have none
    inner: tuple[str, ...] = ()  # folders between step<S> and the file (lm-eval 0.4 names one after the model)
    shots: int | None = None  # from a zero-shot / five-shot / <k>-shot folder
    suite: bool = False  # the Pythia suite's layout
    aside: bool = False  # in another setting folder below the source (the suite's baseline/, intervention/)


def result_files(root: Path, first_only: bool = False) -> list[ResultFile]:
    """The ``*.json`` files below ``root`` laid out as one of the layouts, in path order."""
    found = []
    for path in sorted(root.rglob("*.json")) if not first_only else root.rglob("*.json"):
        layout = lm_eval_layout(path, root)
        file = ResultFile(path, *layout) if layout is not None else suite_layout(path, root)
        if file is not None:
            found.append(file)
            if first_only:
                break
    return found


def suite_layout(path: Path, root: Path) -> ResultFile | None:
    """The identity of a file laid out as the Pythia suite's, ``pythia-<size>[-deduped][-seed<k>]/
    [<setting>/]<name>_step<S>.json``. The setting folder ``zero-shot``, ``five-shot`` or ``<k>-shot`` gives
    the number of shots; files in any other setting folder below ``root`` are set aside (``aside``): the
    suite re-evaluated some checkpoints for its gender-bias case study there (``baseline/``,
    ``intervention/``), with values that differ from the ``zero-shot/`` ones of the same checkpoint."""
    file_match = _SUITE_FILE.match(path.name)
    if not file_match:
        return None
    folders = Path(os.path.abspath(path)).parts[:-1]
    for depth in (1, 2):  # the model folder holds the file, or holds the setting folder that holds it
        model_match = _SUITE_MODEL_DIR.match(folders[-depth]) if len(folders) > depth else None
        if model_match is None:
            continue
        setting = folders[-1] if depth == 2 else None
        shot = _SHOT_DIR.match(setting or "")
        shots = None if shot is None else int(shot["k"]) if shot["k"] else _SHOT_WORDS[shot["word"].lower()]
        chosen = Path(os.path.abspath(path.parent)) == Path(os.path.abspath(root))  # the source is that folder
        return ResultFile(
            path,
            model_match["size"],
            int(model_match["seed"] or 0),
            int(file_match["step"]),
            shots=shots,
            suite=True,
            aside=setting is not None and shot is None and not chosen,
        )
    return None


def has_lm_eval_results(root: Path) -> bool:
    """Whether any ``*.json`` below ``root`` is laid out as lm-eval result files are (by its path only)."""
    return bool(result_files(root, first_only=True))


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
            return (
                model_match.group("size"),
                seed,
                int(step_match.group("step")),
                file_match.group("stamp"),
                parts[index + 2 :],
            )
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
