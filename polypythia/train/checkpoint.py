"""Checkpoints on the Pythia schedule: Hugging Face weights to evaluate, plus state to resume from.

Layout of ``<run_dir>/checkpoints/step<S>/``::

    config.json, model.safetensors, tokenizer.json, ...  # loads with GPTNeoXForCausalLM.from_pretrained
    state/<tag>/...                                      # DeepSpeed model, optimizer and LR state
    trainer_state.json                                   # step, seeds, last loss, callbacks' state, RNG states
    trainer_state.safetensors                            # torch (and CUDA) RNG states (train/trainerstate.py)
    MANIFEST.json                                        # size and sha256 of every file above

A checkpoint is written under ``step<S>.partial`` and renamed to ``step<S>`` only once every file
and the manifest are on disk, so a half-written checkpoint is never taken for complete; at resume
the manifest is verified, and a checkpoint that fails is reported in one line and skipped.
Only the newest ``train.keep_resume_states`` checkpoints keep ``state/`` (see
:func:`prune_resume_states`); older ones keep their weights for evaluation.

Reading a checkpoint runs no code from it: the trainer state is JSON and safetensors, and a
trainer state left as a pickle by older versions (``trainer_state.pt``) is read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. DeepSpeed's
own loader does unpickle ``state/`` in full; before it runs, :func:`verify` checks every file there
against the manifest and refuses files the manifest does not list (the trust boundary this leaves
is described in docs/training.md, "Trust boundary").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from polypythia.errors import CheckpointError, DiskFullError
from polypythia.train import diskfull
from polypythia.train.trainerstate import LEGACY_TRAINER_STATE, RNG_TENSORS, TRAINER_STATE, write_trainer_state

log = logging.getLogger(__name__)

STATE_TAG = "state"
STEP_DIR = re.compile(r"^step(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step{step}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    _save_manifest(
        directory, {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    )


def _save_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / "MANIFEST.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, directory / "MANIFEST.json")


def verify(directory: Path) -> None:
    """Raise :class:`CheckpointError` unless every file of the manifest is present and intact, and
    every file that resuming reads (``state/`` and the trainer state) is one the manifest lists.

    Files added next to the weights afterwards (evaluation results) are allowed; a file added to
    ``state/`` is not, since DeepSpeed's loader and converter pick up files there by name.
    """
    manifest_path = directory / "MANIFEST.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"Checkpoint {directory} has no MANIFEST.json (it was never completed).")
    manifest = _read_manifest(directory)
    _check_listed(directory, manifest)
    read_at_resume = [
        *(directory / "state").rglob("*"),
        *(directory / name for name in (TRAINER_STATE, RNG_TENSORS, LEGACY_TRAINER_STATE)),
    ]
    for path in read_at_resume:
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in manifest:
            raise CheckpointError(
                f"Checkpoint {directory} has {rel}, which its manifest does not list "
                "(it was added after the checkpoint was sealed)."
            )


def verify_weights(directory: Path) -> None:
    """Raise :class:`CheckpointError` unless every file the manifest lists outside ``state/`` (the
    weights, config and tokenizer that evaluation reads) is present and intact. A folder without a
    manifest (a published checkpoint, or one written by other tools) has nothing to verify."""
    if (directory / "MANIFEST.json").is_file():
        _check_listed(
            directory, {rel: meta for rel, meta in _read_manifest(directory).items() if not rel.startswith("state/")}
        )


def _read_manifest(directory: Path) -> dict:
    try:
        return json.loads((directory / "MANIFEST.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"Checkpoint {directory} has an unreadable MANIFEST.json.") from None


def _check_listed(directory: Path, manifest: dict) -> None:
    for rel, meta in manifest.items():
        path = directory / rel
        if not path.is_file() or path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            raise CheckpointError(
                f"Checkpoint {directory} is corrupt: {rel} is missing or does not match its checksum."
            )


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Completed (renamed) checkpoints, oldest first; not yet verified."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append(Checkpoint(int(match.group(1)), child))
    return sorted(found, key=lambda c: c.step)


def is_resumable(directory: Path) -> bool:
    return (directory / "state").is_dir() and any(
        (directory / name).is_file() for name in (TRAINER_STATE, LEGACY_TRAINER_STATE)
    )


def latest_valid_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The newest resumable checkpoint that verifies; each corrupt one is reported in one warning line."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        if not is_resumable(ckpt.path):  # weights only: its resume state was pruned
            continue
        try:
            verify(ckpt.path)
            return ckpt
        except CheckpointError as exc:
            log.warning("%s Falling back to the previous checkpoint.", exc)
    return None


def conversion_dir(checkpoint: Path) -> Path:
    """Where a checkpoint's state is rewritten for another worker count (see train/universal.py)."""
    return checkpoint.parent / f"{checkpoint.name}.universal"


def remove_conversions(run_dir: str | Path) -> None:
    """Remove conversions left by a resume that died before it could clean up."""
    for path in checkpoints_dir(run_dir).glob("step*.universal"):
        shutil.rmtree(path, ignore_errors=True)


def partial_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step{step}.partial"


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh ``step<S>.partial`` folder to write into (a stale one from a crash is removed), once
    the disk has room for a checkpoint as large as the previous one (else a DiskFullError)."""
    path = partial_dir(run_dir, step)
    shutil.rmtree(path, ignore_errors=True)
    previous = list_checkpoints(run_dir)
    problem = diskfull.space_problem(checkpoints_dir(run_dir), previous[-1].path if previous else None)
    if problem:
        raise diskfull.disk_full_error(checkpoints_dir(run_dir), step, problem, previous[-1].step)
    with writing(path, step):
        path.mkdir(parents=True)
    return path


@contextmanager
def writing(partial: Path, step: int) -> Iterator[Path]:
    """Write into ``partial`` (``<run_dir>/checkpoints/step<S>.partial``): a full disk on the way
    (however the writer reports it, see :mod:`polypythia.train.diskfull`) becomes one DiskFullError
    line, and the half-written folder is removed to give its space back. Earlier checkpoints are
    untouched: the newest stays the one a relaunch resumes from (older resume states are dropped
    only after a checkpoint is sealed)."""
    try:
        yield partial
    except Exception as exc:
        if not isinstance(exc, DiskFullError) and not diskfull.is_disk_full(exc, partial):
            raise
        if partial.name.endswith(".partial"):
            diskfull.remove_quietly(partial)
        if isinstance(exc, DiskFullError):
            raise
        kept = list_checkpoints(partial.parent.parent) if partial.parent.name == "checkpoints" else []
        raise diskfull.disk_full_error(
            partial.parent, step, diskfull.error_reason(exc), kept[-1].step if kept else None
        ) from exc


def commit(run_dir: str | Path, step: int) -> Path:
    """Seal ``step<S>.partial`` with its manifest and rename it to ``step<S>``."""
    src, dst = partial_dir(run_dir, step), step_dir(run_dir, step)
    with writing(src, step):
        write_manifest(src)
    if dst.exists():  # an earlier attempt wrote this step but failed verification
        shutil.rmtree(dst)
    os.replace(src, dst)
    return dst


def prune_resume_states(run_dir: str | Path, keep: int | None) -> list[int]:
    """Drop the DeepSpeed state of all but the newest ``keep`` resumable checkpoints.

    The Hugging Face weights stay (they are what evaluation and training maps read); only the
    optimizer and model state needed to resume go, which is most of a checkpoint's size. Each
    pruned checkpoint's manifest drops the entries of ``state/`` (the rest keep the checksums
    taken when the checkpoint was sealed), so it still verifies.
    """
    if keep is None:
        return []
    resumable = [c for c in list_checkpoints(run_dir) if is_resumable(c.path)]
    pruned = []
    for ckpt in resumable[: max(0, len(resumable) - keep)]:
        shutil.rmtree(ckpt.path / "state")
        manifest = json.loads((ckpt.path / "MANIFEST.json").read_text())
        _save_manifest(ckpt.path, {rel: meta for rel, meta in manifest.items() if not rel.startswith("state/")})
        pruned.append(ckpt.step)
    return pruned


def save_trainer_state(directory: Path, state: dict) -> None:
    """Write ``state`` (plain values: step, seeds, loss, ...) with this process's RNG states as
    ``trainer_state.json``, and the torch RNG states (tensors) as ``trainer_state.safetensors``."""
    with writing(directory, state.get("step", -1)):
        write_trainer_state(directory, state)
