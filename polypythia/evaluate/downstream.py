"""Small offline downstream tasks for lm-evaluation-harness, built from Python's own source.

The PolyPythias tasks (ARC, LAMBADA, PIQA, SciQ, ...) need data sets from the Hub; these two run
anywhere, offline, on JSONL shipped in ``polypythia/evaluate/tasks/`` (the folder of lm-eval task
files beside this module: a custom task over local files, loaded through
``lm_eval.tasks.TaskManager(include_path=...)``; lm-evaluation-harness docs, "New task guide"):

- ``polypythia_stdlib_next_line``: multiple choice, four lines of standard-library source as
  context, pick the next line among four (chance 0.25). Per-item prediction: the chosen index.
- ``polypythia_stdlib_cloze``: LAMBADA-style cloze, source up to the last name of a line; acc is
  whether that name is the model's greedy continuation. Per-item prediction: 1 if so, else 0.

The items are written once by :func:`write_task_data` from a fixed list of stdlib modules and a
seed; the shipped JSONL is the reference (stdlib source differs between Python versions).
:func:`evaluate_checkpoint` runs lm-eval's ``hf`` model on a local checkpoint folder with the Hub
switched off, and returns each task's accuracy and per-item predictions (for agreement.py).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polypythia.errors import PolypythiaError
from polypythia.runtime.env import apply as apply_runtime_env

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASK_NAMES = ("polypythia_stdlib_next_line", "polypythia_stdlib_cloze")
SOURCE_MODULES = ("json.decoder", "textwrap", "argparse", "configparser", "csv", "difflib", "fractions", "shlex")
_CONTEXT_LINES = 4
_CHOICES = 4
_CLOZE_LINE = re.compile(r"^(.*\W)([A-Za-z_][A-Za-z0-9_]{2,})\)?:?$")


class TaskError(PolypythiaError, ValueError):
    """A checkpoint or task request that the downstream evaluation cannot run."""


@dataclass
class TaskResult:
    """One task's accuracy and its per-item predictions, in item (doc_id) order."""

    accuracy: float
    predictions: np.ndarray


def _source_lines(module_name: str) -> list[str]:
    path = importlib.util.find_spec(module_name).origin
    lines = [line.rstrip() for line in Path(path).read_text().splitlines()]
    return [line for line in lines if 10 <= len(line.strip()) <= 80 and not line.strip().startswith("#")]


def next_line_items(items_per_module: int, seed: int) -> list[dict]:
    """Multiple-choice items: {context, choices, answer} with distractors from other modules' lines."""
    rng = random.Random(seed)
    lines_by_module = {name: _source_lines(name) for name in SOURCE_MODULES}
    pool = [line for lines in lines_by_module.values() for line in lines]
    items = []
    for lines in lines_by_module.values():
        for end in rng.sample(range(_CONTEXT_LINES, len(lines)), items_per_module):
            answer_line = lines[end]
            distractors = set()
            while len(distractors) < _CHOICES - 1:
                candidate = rng.choice(pool)
                if candidate.strip() != answer_line.strip():
                    distractors.add(candidate)
            choices = sorted(distractors) + [answer_line]
            rng.shuffle(choices)
            context = "\n".join(lines[end - _CONTEXT_LINES : end])
            items.append({"context": context, "choices": choices, "answer": choices.index(answer_line)})
    return items


def cloze_items(items_per_module: int, seed: int) -> list[dict]:
    """Cloze items: {context, target}, the target being the last name on a source line."""
    rng = random.Random(seed)
    items = []
    for name in SOURCE_MODULES:
        lines = _source_lines(name)
        ends = [i for i in range(_CONTEXT_LINES, len(lines)) if _CLOZE_LINE.match(lines[i])]
        for end in rng.sample(ends, min(items_per_module, len(ends))):
            head, target = _CLOZE_LINE.match(lines[end]).groups()
            context = "\n".join(lines[end - _CONTEXT_LINES : end] + [head])
            items.append({"context": context, "target": target})
    return items


def write_task_data(items_per_module: int = 25, seed: int = 0, tasks_dir: Path = TASKS_DIR) -> None:
    """(Re)write the two tasks' JSONL files from this Python's standard library."""
    for file_name, items in (
        ("stdlib_next_line.jsonl", next_line_items(items_per_module, seed)),
        ("stdlib_cloze.jsonl", cloze_items(items_per_module, seed)),
    ):
        with open(tasks_dir / file_name, "w") as handle:
            handle.writelines(json.dumps(item) + "\n" for item in items)


def _item_prediction(sample: dict, output_type: str) -> int:
    """The per-item prediction agreement.py compares: chosen index, or 1/0 for an exact greedy match."""
    responses = sample["filtered_resps"]
    if output_type == "multiple_choice":
        return int(np.argmax([float(loglikelihood) for loglikelihood, _ in responses]))
    return int(bool(responses[0][1]))


def _task_result(task_name: str, results: dict) -> TaskResult:
    samples = sorted(results["samples"][task_name], key=lambda sample: sample["doc_id"])
    output_type = "multiple_choice" if task_name.endswith("next_line") else "loglikelihood"
    predictions = np.array([_item_prediction(sample, output_type) for sample in samples])
    return TaskResult(accuracy=float(results["results"][task_name]["acc,none"]), predictions=predictions)


def evaluate_checkpoint(
    checkpoint_dir: str | Path,
    tasks: tuple[str, ...] = TASK_NAMES,
    batch_size: int = 8,
    device: str = "cpu",
    limit_items: int | None = None,
) -> dict[str, TaskResult]:
    """Run the offline tasks on a Hugging Face checkpoint folder (model + tokenizer) with lm-eval.

    ``limit_items`` keeps only each task's first items (for quick checks).
    """
    checkpoint_dir = Path(checkpoint_dir).resolve()
    if not (checkpoint_dir / "config.json").exists():
        raise TaskError(f"{checkpoint_dir} has no config.json; point at a folder written by save_pretrained.")
    unknown = sorted(set(tasks) - set(TASK_NAMES))
    if unknown:
        raise TaskError(f"Unknown task(s) {unknown}; the offline tasks are {list(TASK_NAMES)}.")
    apply_runtime_env(offline=True)
    import lm_eval
    from lm_eval.tasks import TaskManager

    import polypythia.qknorm  # noqa: F401  (lm-eval loads with AutoModelForCausalLM: a qk-layernorm checkpoint too)

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={checkpoint_dir},tokenizer={checkpoint_dir}",
        tasks=list(tasks),
        # only our folder: indexing lm-eval's ~14,000 bundled task files costs ~20 s per call
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        batch_size=batch_size,
        device=device,
        log_samples=True,
        limit=limit_items,
    )
    return {name: _task_result(name, results) for name in tasks}
