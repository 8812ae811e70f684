"""A corrupt checkpoint in ``python -m polypythia.evaluate`` (issue #14, item 12): it is skipped with
one line naming it and the fix, the other checkpoints are evaluated, and the command exits 1."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from polypythia.evaluate import downstream
from polypythia.evaluate.downstream import TASK_NAMES, TaskResult
from polypythia.evaluate.integrity import checkpoint_problem
from polypythia.evaluate.results import read_result
from polypythia.train.checkpoint import write_manifest

NAMES = ("pythia-tiny-seed1", "pythia-tiny-seed2")


@pytest.fixture
def fake_lm_eval(monkeypatch):
    """lm-eval replaced by a fixed answer (the tasks are not what is tested here)."""

    def evaluate_checkpoint(checkpoint_dir, task_names, batch_size, device, limit_items):
        return {t: TaskResult(accuracy=0.5, predictions=np.array([0, 1])) for t in task_names}

    monkeypatch.setattr(downstream, "evaluate_checkpoint", evaluate_checkpoint)


def study(root: Path, make_tiny_model) -> Path:
    """Two runs of steps 0 and 10, each checkpoint sealed with a manifest as training seals it."""
    for index, name in enumerate(NAMES):
        for step in (0, 10):
            folder = root / name / f"step{step}"
            make_tiny_model(seed=index * 100 + step).save_pretrained(folder)
            write_manifest(folder)
    return root


def truncate(path: Path, cut: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:-cut])


def flip_a_byte(path: Path) -> None:
    """Same size, same header, one weight changed: only the manifest notices."""
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_checkpoints_are_skipped_with_one_line_and_exit_1(tmp_path, make_tiny_model, fake_lm_eval, capsys):
    from polypythia.evaluate.__main__ import main

    root = study(tmp_path / "study", make_tiny_model)
    truncated = root / NAMES[0] / "step10"
    flipped = root / NAMES[1] / "step0"
    truncate(truncated / "model.safetensors")  # was: one SafetensorError aborted the whole evaluation
    flip_a_byte(flipped / "model.safetensors")

    out = tmp_path / "out"
    assert main([str(root), "--no-ray", "--limit-items", "2", "--out", str(out)]) == 1
    stdout = capsys.readouterr().out
    failed = [line for line in stdout.splitlines() if line.startswith("failed: ")]
    fix = "so it was skipped; restore it from a copy or download it again (or delete the folder), then run the command again"
    assert sorted(failed) == sorted(
        [
            f"failed: {NAMES[0]} step 10: Checkpoint {truncated} is corrupt or incomplete (model.safetensors: Error while "
            f"deserializing header: incomplete metadata, file not fully covered), {fix} to evaluate it.",
            f"failed: {NAMES[1]} step 0: Checkpoint {flipped} is corrupt or incomplete (model.safetensors is missing or does "
            f"not match its checksum), {fix} to evaluate it.",
        ]
    ), stdout
    assert "Traceback" not in stdout

    from polypythia.evaluate.targets import targets_from_folder

    done = {
        (t.name, c.step): read_result(c, "weights") is not None and read_result(c, TASK_NAMES[0]) is not None
        for t in targets_from_folder(root, out)
        for c in t.checkpoints
    }
    assert done == {(NAMES[0], 0): True, (NAMES[0], 10): False, (NAMES[1], 0): False, (NAMES[1], 10): True}

    with (out / "check.csv").open() as handle:  # the integrity check at the end names the unreadable one
        rows = [r for r in csv.DictReader(handle) if r["problem"] == "unreadable checkpoint"]
    assert [(r["seed"], r["steps"]) for r in rows] == [("1", "10")]


def test_checkpoint_problem(tmp_path, make_tiny_model):
    folder = tmp_path / "step0"
    make_tiny_model().save_pretrained(folder)
    assert checkpoint_problem(folder, verify_manifest=True) is None  # no manifest: a published checkpoint
    write_manifest(folder)
    assert checkpoint_problem(folder, verify_manifest=True) is None
    flip_a_byte(folder / "model.safetensors")
    assert checkpoint_problem(folder) is None  # the header still reads
    assert (
        checkpoint_problem(folder, verify_manifest=True)
        == "model.safetensors is missing or does not match its checksum"
    )
    (folder / "config.json").write_text("{")
    assert checkpoint_problem(folder).startswith("config.json: Expecting property name")
