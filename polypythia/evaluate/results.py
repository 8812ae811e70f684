"""Result files: one JSON file per (checkpoint, evaluator), the evaluation's memory between passes.

A result is ``{"metrics": {key: value}, ...}`` plus whatever its evaluator records to tell later
whether it still answers (``weight_stats``, ``limit_items``, ...) and what else it keeps (a task's
per-item ``predictions``). It lives at ``<results_dir>/<evaluator name>.json``: under
``<checkpoint>/eval/`` for runs trained here (the results follow the checkpoint) and under
``<out>/results/<name>/step<S>/`` for a folder of checkpoints (which may be read-only or shared).
Files are written atomically (temporary file + rename): a reader sees the old file or the new one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from polypythia.evaluate.targets import CheckpointTarget
from polypythia.files import write_json_atomic

log = logging.getLogger(__name__)


def result_path(checkpoint: CheckpointTarget, name: str) -> Path:
    return Path(checkpoint.results_dir) / f"{name}.json"


def read_result(checkpoint: CheckpointTarget, name: str) -> dict | None:
    """The stored result of evaluator ``name`` for this checkpoint, or None."""
    path = result_path(checkpoint, name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:  # cannot happen with atomic writes, unless edited by hand
        log.warning("Unreadable result file %s; it will be recomputed.", path)
        return None


def write_result(checkpoint: CheckpointTarget, name: str, result: dict) -> None:
    """Write one result file atomically: a reader sees the old file or the whole new one."""
    write_json_atomic(result_path(checkpoint, name), result)
