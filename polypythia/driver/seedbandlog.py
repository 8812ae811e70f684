"""The sweep's live cross-seed monitor: each run's smoothed loss against its sibling seeds', decided
while the sweep trains, with the rule of :mod:`polypythia.stability` (the offline analysis's).

Each run's smoothed loss (the mean of its ``train/loss`` over the last ``monitor.loss_window_steps``
steps, default 1% of the budget) is kept by the progress board at a fixed grid of decision steps:
its checkpoint steps, or every ``monitor.cross_seed_every_steps`` steps, the same for every run of a
group (one study and model). :class:`CrossSeedMonitor` compares a run with its siblings at a step as
soon as at least ``rule.min_runs`` of the group have a smoothed loss there, from that step's and
earlier steps' values only, and alerts when |deviation| exceeds :func:`decision_threshold` for the
group's runs x planned decision steps, so that a group of healthy seeds alerts anywhere with
probability ``rule.false_alarm_rate`` (0.1%). :class:`MonitorLog` writes what it decides to MLflow:
``monitor/band_deviation`` on each run at every decision step, the ``stability.alert`` tag on a run
that alerts, and the band (``seeds/loss_median``, ``_p25``, ``_p75``, ``_min``, ``_max``) on the
sweep's parent run once every run of the group has reached the step or ended.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polypythia.stability import OutlierRule, _deviation_array, decision_threshold, for_study_length
from polypythia.study import search_job_runs
from polypythia.tracking.client import MAX_METRICS_PER_BATCH
from polypythia.tracking.ui import SEEDS_PREFIX, seeds_band_metrics

log = logging.getLogger(__name__)

ENDED_STATES = ("finished", "failed", "diverged", "stopped")  # a run in these reaches no further step


def decision_steps(cfg: Any) -> tuple[int, ...]:
    """The steps at which a run of ``cfg`` (a JobConfig) is compared with its siblings: every
    ``monitor.cross_seed_every_steps`` steps and the last, or (null) its checkpoint steps but 0."""
    from polypythia.train.schedule import checkpoint_steps

    budget, every = cfg.budget, cfg.monitor.cross_seed_every_steps
    if every:
        steps = set(range(every, budget.steps + 1, every)) | {budget.steps}
    else:
        steps = set(checkpoint_steps(budget.steps, budget.checkpoint_every_steps, budget.log_spaced_checkpoints))
    return tuple(sorted(s for s in steps if s > 0))


def loss_window(cfg: Any) -> int:
    """Steps in a run's smoothed loss: ``monitor.loss_window_steps``, or 1% of the budget (as the replay)."""
    return cfg.monitor.loss_window_steps or max(1, cfg.budget.steps // 100)


@dataclass
class Group:
    """Sibling runs, compared with each other: one study and model, the same decision steps and window."""

    study: str
    model: str
    grid: tuple[int, ...]  # the decision steps
    window: int  # steps in the smoothed loss
    members: list[int] = field(default_factory=list)  # job indices
    prefix: str = SEEDS_PREFIX  # of the band's metrics in the study's parent run

    @property
    def name(self) -> str:
        return f"{self.study}/{self.model}"


def plan_groups(jobs: list[Any]) -> list[Group]:
    """The sibling groups of a sweep's jobs (JobConfigs) with ``monitor.cross_seed`` on. A study with
    several groups names each one's band ``seeds/<model>/loss_*``. A replicate (``replicate`` > 0, the
    same seeds trained again) is no sibling seed: its twin would narrow the band it is judged by."""
    groups: dict[tuple, Group] = {}
    for index, job in enumerate(jobs):
        if job.monitor.cross_seed and not getattr(job, "replicate", 0):
            key = (job.study, job.model.name, decision_steps(job), loss_window(job))
            groups.setdefault(key, Group(*key)).members.append(index)
    for group in groups.values():
        if sum(g.study == group.study for g in groups.values()) > 1:
            group.prefix = f"{SEEDS_PREFIX}{group.model}/"
    return list(groups.values())


@dataclass(frozen=True)
class Decision:
    """One run's smoothed loss against its siblings' at one decision step."""

    index: int  # the job
    group: str
    step: int
    loss: float  # its smoothed loss
    deviation: float  # from the others' mean, in their pooled SDs (NaN: the rule leaves it undefined)
    threshold: float
    siblings: int  # other runs of the group with a smoothed loss at this step

    @property
    def alert(self) -> bool:
        return abs(self.deviation) > self.threshold  # False for NaN

    def describe(self) -> str:
        """The ``stability.alert`` tag: ``step=<s> signal=loss deviation=<d>``."""
        return f"step={self.step} signal=loss deviation={self.deviation:+.2f}"


@dataclass(frozen=True)
class Band:
    """The cross-seed band of a group at one decision step, once every run has reached it or ended."""

    study: str
    step: int
    metrics: dict[str, float]


class CrossSeedMonitor:
    """Decides from the progress board's rows (``row["smoothed"]``: step -> smoothed loss) which runs
    leave their siblings' band; :meth:`observe` returns what is new since the last call.

    Each (run, step) is decided once, as soon as the run and at least ``rule.min_runs`` - 1 siblings
    have a smoothed loss there and every sibling that is training has reached it (a sibling not
    started yet is not waited for), from the rows of that step and earlier ones only; the threshold is
    :func:`decision_threshold` for the runs compared x the group's planned decision steps (while
    siblings lag, the higher threshold of fewer runs). A deviation the rule
    leaves undefined (too few steps pooled yet, or too few siblings once a far run is left out) is
    tried again as more siblings reach the step, and is final (NaN, no alert) once every run has
    reached it or ended. A run's first alert is kept in :attr:`alerts`. A run's values after its row's
    ``step`` are not its own (a rewound run's abandoned branch, see :mod:`polypythia.driver.actions`):
    they are not read, and :meth:`forget` lets the new branch be decided again."""

    def __init__(self, groups: list[Group], rule: OutlierRule = OutlierRule()):
        self.groups = [g for g in groups if g.members]
        self.rule = rule
        self.latest: dict[int, Decision] = {}  # each run's last decision with a deviation
        self.alerts: dict[int, Decision] = {}  # each run's first alert
        self._decided: set[tuple[int, int]] = set()  # (job, step)
        self._banded: set[tuple[int, int]] = set()  # (group, step)
        self._attempts: dict[tuple[int, int], tuple[int, bool]] = {}  # (group, step) -> (values, complete) when tried
        self._tables: dict[int, _Table] = {}  # per group: its smoothed losses, kept from poll to poll

    def forget(self, index: int, step: int) -> None:
        """Job ``index`` went back to ``step`` (a rewind): its decisions after it are undone, to be
        made again on the new branch's values."""
        self._decided = {(i, s) for i, s in self._decided if i != index or s <= step}
        for number, group in enumerate(self.groups):
            if index in group.members:
                self._attempts = {k: v for k, v in self._attempts.items() if k[0] != number or k[1] <= step}
                if number in self._tables:
                    self._tables[number].reopen_after(step)
        if index in self.latest and self.latest[index].step > step:
            del self.latest[index]
        if index in self.alerts and self.alerts[index].step > step:
            del self.alerts[index]

    def plans(self) -> dict[int, tuple[tuple[int, ...], int]]:
        """What the progress board keeps per job: its decision steps and its loss window."""
        return {i: (g.grid, g.window) for g in self.groups for i in g.members}

    def threshold(self, group: Group, present: int | None = None) -> float:
        """The alert threshold of a decision comparing ``present`` runs of ``group`` (None: all of
        them). A decision taken while siblings lag compares fewer runs, whose band is less sure: it
        gets the threshold calibrated for that many runs (higher), never the full group's."""
        rule = for_study_length(self.rule, len(group.grid))
        full = decision_threshold(len(group.members), len(group.grid), rule)
        if present is None or present >= len(group.members):
            return full
        return max(full, decision_threshold(present, len(group.grid), rule))

    def observe(self, rows: dict[int, dict[str, Any]]) -> tuple[list[Decision], list[Band]]:
        decisions: list[Decision] = []
        bands: list[Band] = []
        for number, group in enumerate(self.groups):
            self._observe(number, group, rows, decisions, bands)
        for decision in decisions:
            if not math.isnan(decision.deviation):
                self.latest[decision.index] = decision
            if decision.alert:
                self.alerts.setdefault(decision.index, decision)
        return decisions, bands

    def _observe(
        self, number: int, group: Group, rows: dict[int, dict[str, Any]], decisions: list[Decision], bands: list[Band]
    ) -> None:
        rule = for_study_length(self.rule, len(group.grid))
        table = self._tables.setdefault(number, _Table(group))
        table.update(rows)  # the new smoothed losses only (a run gone back to an earlier step: its column anew)
        ended = np.array([rows.get(i, {}).get("state") in ENDED_STATES for i in group.members])
        running = np.array([rows.get(i, {}).get("state") == "running" for i in group.members])
        for position in table.open_positions():  # steps done (banded, every run there decided) are not looked at again
            step, reached, present = group.grid[position], table.reached[position], ~np.isnan(table.values[position])
            complete = bool(reached.any() and (reached | ended).all())  # no run will add a value at this step
            ready = bool((reached | ended | ~running).all())  # every sibling that trains now is there
            undecided = [k for k in np.flatnonzero(reached) if (group.members[k], step) not in self._decided]
            attempt = (int(present.sum()), complete)
            if undecided and ready and attempt[0] >= rule.min_runs and self._attempts.get((number, step)) != attempt:
                self._attempts[(number, step)] = attempt  # decide again only when a sibling has come or ended
                deviation = _deviation_array(table.values[: position + 1], rule)[-1]
                threshold = self.threshold(group, attempt[0])
                for k in undecided:
                    if np.isnan(deviation[k]) and not complete:
                        continue  # too few comparable siblings yet (a far run is left out of the band)
                    self._decided.add((group.members[k], step))
                    decisions.append(
                        Decision(
                            group.members[k],
                            group.name,
                            step,
                            float(table.values[position, k]),
                            float(deviation[k]),
                            threshold,
                            int(present.sum() - present[k]),
                        )
                    )
            if complete and (number, step) not in self._banded:
                self._banded.add((number, step))
                band = seeds_band_metrics({i: table.values[position, k] for k, i in enumerate(group.members)})
                bands.append(
                    Band(
                        group.study,
                        step,
                        {group.prefix + key.removeprefix(SEEDS_PREFIX): value for key, value in band.items()},
                    )
                )
            if (
                complete
                and (number, step) in self._banded
                and all((group.members[k], step) in self._decided for k in np.flatnonzero(reached))
            ):
                table.close(position)


class _Table:
    """A group's smoothed losses (decision steps x runs) kept from poll to poll: each poll adds only a run's
    new values; a run whose step went back (a retry or rewind from a checkpoint) or that started a new
    attempt has its column read anew, without the values after its step (its abandoned branch). Steps
    that are done (banded, every run that reached them decided) are closed, and reopened by a rewind."""

    def __init__(self, group: Group):
        self.grid = group.grid
        self.members = group.members
        self.values = np.full((len(group.grid), len(group.members)), np.nan)
        self.reached = np.zeros((len(group.grid), len(group.members)), dtype=bool)
        self.filled = [0] * len(group.members)  # per run: grid positions read so far
        self.seen: list[tuple] = [(None, None)] * len(group.members)  # per run: (step, attempt) at the last poll
        self.closed = np.zeros(len(group.grid), dtype=bool)

    def update(self, rows: dict[int, dict[str, Any]]) -> None:
        for k, index in enumerate(self.members):
            row = rows.get(index, {})
            smoothed, step, attempt = row.get("smoothed") or {}, row.get("step"), row.get("attempt")
            last_step = self.seen[k][0]
            if attempt != self.seen[k][1] or (step is not None and last_step is not None and step < last_step):
                self.values[:, k], self.reached[:, k], self.filled[k] = np.nan, False, 0
            self.seen[k] = (step, attempt)
            position, limit = self.filled[k], math.inf if step is None else step
            while position < len(self.grid) and self.grid[position] <= limit:  # a step it passed without a value
                if self.grid[position] in smoothed:  # (one before the checkpoint it resumed from) gets none later
                    value = smoothed[self.grid[position]]
                    self.values[position, k] = (
                        value if math.isfinite(value) else np.nan
                    )  # non-finite: no place in the band
                    self.reached[position, k] = True
                position += 1
            self.filled[k] = position

    def open_positions(self) -> list[int]:
        """The positions to look at: not closed, up to the furthest any run has reached."""
        last = max(self.filled, default=0)
        return [p for p in range(last) if not self.closed[p]]

    def close(self, position: int) -> None:
        self.closed[position] = True

    def reopen_after(self, step: int) -> None:
        self.closed &= np.asarray(self.grid) <= step


class MonitorLog:
    """Feeds the board's rows to a :class:`CrossSeedMonitor` and writes what it decides: a log line
    per alert, and MLflow (the runs' ``monitor/band_deviation`` and ``stability.alert``, the parent
    runs' band). An MLflow error is logged, never raised: the monitor must not fail a sweep."""

    def __init__(self, monitor: CrossSeedMonitor, client: Any, parent_runs: dict[str, str], jobs: list[Any]):
        self.monitor = monitor
        self.client = client
        self.parent_runs = parent_runs  # study -> the sweep's run in it
        self.names = {i: (job.study, job.run_name) for i, job in enumerate(jobs)}
        self.run_ids: dict[int, str] = {}  # job -> its MLflow run, once found
        self.untagged: list[Decision] = []  # alerts whose tag is not written yet (retried at each watch)
        self.alerted: dict[int, int] = {}  # job -> its alerts tagged: stability.alert, then stability.alert.2, ...
        self.logged: set[tuple[int, int]] = set()  # (job, step) with a monitor/band_deviation point

    def watch(self, rows: dict[int, dict[str, Any]]) -> None:
        try:
            decisions, bands = self.monitor.observe(rows)
        except Exception:  # noqa: BLE001 - a monitor's fault must not stop the training it watches
            log.exception("The cross-seed monitor failed; it is off for the rest of the sweep.")
            self.monitor.groups = []
            return
        alerts = [d for d in decisions if self.monitor.alerts.get(d.index) is d]
        self.untagged += alerts
        for d in alerts:
            log.warning(
                "Cross-seed alert: %s at step %d: its smoothed train/loss %.4f is %+.1f SDs from its %d "
                "siblings' in %s (threshold %.1f).",
                self.names[d.index][1],
                d.step,
                d.loss,
                d.deviation,
                d.siblings,
                d.group,
                d.threshold,
            )
        try:
            self._write(decisions, bands)
        except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not stop the sweep
            log.warning("Could not write the cross-seed monitor's decisions to MLflow: %s", exc)

    def marks(self, rows: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """``rows`` with each run's verdict: ``deviation`` (its latest) and ``alert`` (its first alert's step)."""
        marked = {}
        for i, row in rows.items():
            latest, alert = self.monitor.latest.get(i), self.monitor.alerts.get(i)
            marked[i] = {
                **row,
                "deviation": None if latest is None else latest.deviation,
                "alert": None if alert is None else alert.step,
            }
        return marked

    def _write(self, decisions: list[Decision], bands: list[Band]) -> None:
        from mlflow.entities import Metric

        for d in list(self.untagged):  # the alerts first: they matter most (a rewound run's next: .2, .3, ...)
            if (run_id := self._run_id(d.index)) is not None:
                count = self.alerted.get(d.index, 0) + 1
                self.client.set_tag(run_id, "stability.alert" + (f".{count}" if count > 1 else ""), d.describe())
                self.alerted[d.index] = count
                self.untagged.remove(d)
        now = int(time.time() * 1000)
        points: dict[int, list] = {}
        for d in decisions:  # a step decided again (a rewound run's) keeps its first point: none twice
            if not math.isnan(d.deviation) and (d.index, d.step) not in self.logged:
                self.logged.add((d.index, d.step))
                points.setdefault(d.index, []).append(Metric("monitor/band_deviation", d.deviation, now, d.step))
        for index, metrics in points.items():
            self._log(self._run_id(index), metrics)
        by_study: dict[str, list] = {}
        for band in bands:
            by_study.setdefault(band.study, []).extend(Metric(k, v, now, band.step) for k, v in band.metrics.items())
        for study, metrics in by_study.items():
            self._log(self.parent_runs[study], metrics)

    def _log(self, run_id: str | None, metrics: list) -> None:
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH) if run_id else ():
            self.client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])

    def _run_id(self, index: int) -> str | None:
        """The job's MLflow run: the child of the sweep's parent run that has the job's run name."""
        if index not in self.run_ids:
            study = self.names[index][0]
            parent = self.parent_runs[study]
            experiment = self.client.get_run(parent).info.experiment_id
            found = {run.info.run_name: run.info.run_id for run in search_job_runs(self.client, experiment, parent)}
            self.run_ids.update({i: found[name] for i, (s, name) in self.names.items() if s == study and name in found})
        return self.run_ids.get(index)
