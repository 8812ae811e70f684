"""Rewinding a run to a checkpoint before an instability and skipping data, as PaLM did.

PaLM (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", section 5.1) met
loss spikes by restarting "from a checkpoint roughly 100 steps before the spike started" and
skipping "roughly 200-500 data batches" around it. A sweep does the same when a run leaves its
sibling seeds' band and ``monitor.action=rewind`` (the driver's side is :mod:`polypythia.driver.actions`):
the job, before training starts, applies the :class:`~polypythia.jobspec.RewindRequest` it was given
(:func:`apply`):

1. the target is the newest checkpoint strictly before the alert's decision step that can still be
   resumed (it keeps its ``state/``: see ``train.keep_resume_states``) and verifies, and not older
   than the run's previous rewind;
2. every checkpoint newer than the target (the abandoned branch) is moved to
   ``<run_dir>/rewound/rewind<N>/``, so no resume can pick it up again (half-written ones are removed);
3. the rewind is appended to ``<run_dir>/rewinds.json`` (written atomically): the target, the
   batches skipped ``[start, stop)`` and the checkpoints moved aside.

From then on every start of the run (a retry, a relaunch) reads ``rewinds.json`` and trains 0-based
step ``s`` on batch :func:`batch_index` ``(s)``: ``s`` plus the batches skipped by every rewind at or
before ``s``, so the skip persists. A request already recorded is not applied again (a retried
process), and a rewind never goes back past the previous one, so the skips add up in step order.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from polypythia.errors import CheckpointError
from polypythia.files import read_json, write_json_atomic
from polypythia.jobspec import RewindRequest
from polypythia.train import checkpoint as ckpt

log = logging.getLogger(__name__)

RECORD = "rewinds.json"
ABANDONED = "rewound"  # <run_dir>/rewound/rewind<N>/step<S>: the abandoned branch's checkpoints


@dataclass(frozen=True)
class Rewind:
    """One rewind of a run, as ``rewinds.json`` keeps it."""

    number: int  # 1, 2, ... in the order they happened
    decision_step: int  # the alert's step
    checkpoint_step: int  # training went on from this checkpoint
    skip_start: int  # the batches skipped: [skip_start, skip_stop), indices of the run's seeded batch order
    skip_stop: int
    abandoned: tuple[int, ...] = ()  # the checkpoint steps moved aside
    reason: str = ""  # the alert
    # per metric key, the last step MLflow held when the run was rewound (written by the job, see
    # polypythia.job.rewindlog): re-trained points up to it go to an artifact, not into the series
    logged_through: Optional[dict[str, int]] = None

    @property
    def skipped(self) -> int:
        return self.skip_stop - self.skip_start

    def describe(self) -> str:
        return (
            f"alert at step {self.decision_step}; back to checkpoint step {self.checkpoint_step}; "
            f"batches [{self.skip_start}, {self.skip_stop}) skipped"
        )


@dataclass(frozen=True)
class Refused:
    """A rewind that could not be done (nothing to go back to); the run goes on, alert only."""

    number: int
    reason: str = ""


def record_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECORD


def load(run_dir: str | Path) -> list[Rewind]:
    """The run's rewinds, oldest first ([] when it never rewound)."""
    path = record_path(run_dir)
    if not path.is_file():
        return []
    data = read_json(
        path,
        CheckpointError,
        "the run's rewinds",
        "restore it from a backup: it says which batches the run skipped (deleting it replays them)",
    )
    return [Rewind(**{**r, "abandoned": tuple(r.get("abandoned", ()))}) for r in data["rewinds"]]


def save(run_dir: str | Path, rewinds: list[Rewind]) -> None:
    write_json_atomic(record_path(run_dir), {"rewinds": [asdict(r) for r in rewinds]})


def record_logged_through(run_dir: str | Path, number: int, logged: dict[str, int]) -> Rewind:
    """Keep, with rewind ``number``, the last step MLflow held per metric when the run was rewound."""
    rewinds = load(run_dir)
    rewinds = [replace(r, logged_through=dict(logged)) if r.number == number else r for r in rewinds]
    save(run_dir, rewinds)
    return next(r for r in rewinds if r.number == number)


def batch_index(step: int, rewinds: list[Rewind]) -> int:
    """The batch (index in the run's seeded order) trained at 0-based optimizer step ``step``."""
    return step + sum(r.skipped for r in rewinds if r.checkpoint_step <= step)


def target(run_dir: str | Path, decision_step: int, floor: int = 0) -> Optional[ckpt.Checkpoint]:
    """The newest resumable, verified checkpoint at a step in [``floor``, ``decision_step``)."""
    for candidate in reversed(ckpt.list_checkpoints(run_dir)):
        if not floor <= candidate.step < decision_step or not ckpt.is_resumable(candidate.path):
            continue
        try:
            ckpt.verify(candidate.path)
            return candidate
        except CheckpointError as exc:
            log.warning("%s Not rewinding to it.", exc)
    return None


def apply(run_dir: str | Path, request: RewindRequest) -> Rewind | Refused | None:
    """Apply ``request`` to the run folder (its owner, rank 0, before any rank trains); None when it
    was applied before. See the module docstring."""
    rewinds = load(run_dir)
    if any(r.number >= request.number for r in rewinds):
        return None
    floor = rewinds[-1].checkpoint_step if rewinds else 0
    found = target(run_dir, request.decision_step, floor)
    if found is None:
        kept = [c.step for c in ckpt.list_checkpoints(run_dir) if ckpt.is_resumable(c.path)]
        return Refused(
            request.number,
            f"no checkpoint from step {floor} to before step {request.decision_step} keeps "
            f"its resume state (resumable: {kept or 'none'}; train.keep_resume_states=null "
            "keeps them all)",
        )
    abandoned = _move_aside(run_dir, found.step, request.number)
    start = batch_index(found.step, rewinds)
    skip = request.skip_batches if request.skip_batches is not None else request.decision_step - found.step
    rewind = Rewind(request.number, request.decision_step, found.step, start, start + skip, abandoned, request.reason)
    save(run_dir, [*rewinds, rewind])
    log.warning(
        "Rewound %s: %s; checkpoints %s moved to %s.",
        Path(run_dir).name,
        rewind.describe(),
        list(abandoned) or "none",
        Path(run_dir) / ABANDONED / f"rewind{request.number}",
    )
    return rewind


def _move_aside(run_dir: str | Path, step: int, number: int) -> tuple[int, ...]:
    """Move the checkpoints after ``step`` to ``rewound/rewind<number>/`` (each a rename) and remove
    half-written ones; returns the steps now there (also those moved by an attempt that died)."""
    root = ckpt.checkpoints_dir(run_dir)
    aside = Path(run_dir) / ABANDONED / f"rewind{number}"
    for later in [c for c in ckpt.list_checkpoints(run_dir) if c.step > step]:
        aside.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(aside / later.path.name, ignore_errors=True)
        later.path.rename(aside / later.path.name)
    for leftover in [*root.glob("step*.partial"), *root.glob("step*.universal")] if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
    found = (ckpt.STEP_DIR.match(p.name) for p in aside.glob("step*")) if aside.is_dir() else ()
    return tuple(sorted(int(m.group(1)) for m in found if m))
