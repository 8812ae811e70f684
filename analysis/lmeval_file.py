"""What one lm-evaluation-harness result file holds and says it is: its metric values named
``<task>[@<k>shot]/<metric>`` (:func:`lm_eval_metrics`), and the model, seed and step its own config gives
(:func:`config_identity`), checked against its path (:func:`disagreement`). :mod:`analysis.lmeval` reads
a folder of them; :mod:`analysis.lmeval_layout` finds them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from analysis.errors import AnalysisError
from analysis.lmeval_layout import ResultFile, pythia_identity

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
