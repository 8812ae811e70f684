"""A rewound run in MLflow: the same run goes on, no step is logged twice, nothing is hidden.

When the sweep rewinds a run (``monitor.action=rewind``, :mod:`polypythia.train.rewind`), the run
re-trains the steps from the checkpoint it went back to. MLflow cannot delete or replace a point of
a metric's history, and logging a step again would leave two values at one step. So:

- the abandoned branch's points stay in the run's series as they were logged (the instability the
  monitor saw stays visible, where it happened);
- the new branch's points for steps the series already holds (from the checkpoint step up to the
  last step MLflow held when the run was rewound, per metric) go to the artifact
  ``rewinds/rewind<N>.csv`` (``step,key,value``; kept in the run folder as
  ``rewound/rewind<N>/retrained_metrics.csv`` too) instead; every later point goes to the series;
- the tag ``stability.rewind.<N>`` says which steps these are and which batches were skipped.

So a series reads: the original run up to the alert's aftermath, then the new branch; the artifact
fills the re-trained stretch.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Optional

from polypythia.jobspec import RewindRequest
from polypythia.train import rewind as rw
from polypythia.train.callbacks import Callback

log = logging.getLogger(__name__)

TAG = "stability.rewind."  # + N


def artifact_path(number: int) -> str:
    return f"rewinds/rewind{number}.csv"


def tag_text(r: rw.Rewind) -> str:
    through = (r.logged_through or {}).get("train/loss", r.checkpoint_step)
    moved = ", ".join(map(str, r.abandoned)) or "none"
    return (
        f"{r.describe()}; checkpoints after it (steps {moved}) moved to {rw.ABANDONED}/rewind{r.number}; "
        f"this run's points of steps {r.checkpoint_step + 1}-{through} are the abandoned branch's, the new "
        f"branch's values there are in the artifact {artifact_path(r.number)}"
    )


def start(
    run_dir: str, request: Optional[RewindRequest], client: Any, run_id: str, logged: dict[str, int]
) -> Optional[rw.Rewind]:
    """At the job's start, before training: the run's latest rewind, with what MLflow held when it
    happened (recorded, and the run tagged, the first time); a rewind that could not be done is a
    tag and a warning. None when the run was never rewound."""
    if request is not None:
        applied = rw.apply(run_dir, request)  # done already by the worker (before other ranks start): then None
        if isinstance(applied, rw.Refused):
            text = f"not done ({request.reason}): {applied.reason}; the run goes on, alert only"
            log.warning("Rewind %d of %s %s.", request.number, Path(run_dir).name, text)
            client.set_tag(run_id, f"{TAG}{request.number}", text)
    rewinds = rw.load(run_dir)
    if not rewinds:
        return None
    latest = rewinds[-1]
    if latest.logged_through is None:
        latest = rw.record_logged_through(run_dir, latest.number, logged)
        client.set_tag(run_id, f"{TAG}{latest.number}", tag_text(latest)[:5000])
    return latest


class RewoundLogger(Callback):
    """Stands in for the job's :class:`~polypythia.tracking.client.MetricsLogger` after a rewind: a point
    MLflow already holds a value for (a re-trained step) goes to ``rewinds/rewind<N>.csv``, every
    other point to the logger. Written at each checkpoint and at the end."""

    def __init__(self, logger: Any, rewind: rw.Rewind, client: Any, run_id: str, run_dir: str):
        self.logger, self.rewind, self.client, self.run_id = logger, rewind, client, run_id
        self.path = Path(run_dir) / rw.ABANDONED / f"rewind{rewind.number}" / "retrained_metrics.csv"
        self.rows: list[tuple[int, str, float]] = []

    def __getattr__(self, name: str) -> Any:  # flush, close, waiting, uri, ...: the logger's
        if name == "logger":
            raise AttributeError(name)
        return getattr(self.logger, name)

    def log(self, step: int, metrics: dict[str, float], timestamp_ms: Optional[int] = None) -> None:
        bound, kept = self.rewind.logged_through or {}, {}
        for key, value in metrics.items():
            if self.rewind.checkpoint_step < step <= bound.get(key, -1):
                self.rows.append((step, key, float(value)))
            else:
                kept[key] = value
        if kept:
            self.logger.log(step, kept, timestamp_ms)

    def before_checkpoint(self, step: int, model) -> None:
        self.save()

    def on_train_end(self, result) -> None:
        self.save()

    def save(self) -> None:
        """Append the new rows to the run folder's file, then upload it, each (step, key) once (the
        latest: a retried attempt re-trains the steps after its checkpoint)."""
        if not self.rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerows(self.rows)
        self.rows = []
        latest: dict[tuple[int, str], str] = {}
        with self.path.open(newline="") as f:
            for step, key, value in csv.reader(f):
                latest[(int(step), key)] = value
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["step", "key", "value"])
        writer.writerows([step, key, value] for (step, key), value in sorted(latest.items()))
        try:
            self.client.log_text(self.run_id, out.getvalue(), artifact_path(self.rewind.number))
        except Exception as exc:  # noqa: BLE001 - kept in the run folder; uploaded again at the next checkpoint
            log.warning("Could not upload %s yet: %s", artifact_path(self.rewind.number), exc)
