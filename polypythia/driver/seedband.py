"""The sweep's seed-band monitor: each run's smoothed loss against its sibling seeds' band, decided
while the sweep trains, with the rule of :mod:`polypythia.stability` (the offline analysis's). (Not
the in-step signals monitor of each job, :mod:`polypythia.train.monitor`, which watches one run's own
steps.)

Each run's smoothed loss (the mean of its ``train/loss`` over the last ``monitor.loss_window_steps``
steps, default 1% of the budget) is kept by the progress board at a fixed grid of decision steps:
its checkpoint steps, or every ``monitor.cross_seed_every_steps`` steps, the same for every run of a
group (one study and model). :class:`SeedBandMonitor` compares a run with its siblings at a step as
soon as at least ``rule.min_runs`` of the group have a smoothed loss there, from that step's and
earlier steps' values only, and alerts when |deviation| exceeds :func:`decision_threshold` for the
group's runs x planned decision steps, so that a group of healthy seeds alerts anywhere with
probability ``rule.false_alarm_rate`` (0.1%). :class:`~polypythia.driver.seedbandlog.MonitorLog`
writes what it decides to MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polypythia.jobspec import ENDED_STATES, JobState
from polypythia.stability import OutlierRule, _deviation_array, decision_threshold, for_study_length
from polypythia.tracking.ui import SEEDS_PREFIX, seeds_band_metrics


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
    """The seed band of a group at one decision step, once every run has reached it or ended."""

    study: str
    step: int
    metrics: dict[str, float]


class SeedBandMonitor:
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

    def __init__(self, groups: list[Group], rule: OutlierRule = OutlierRule.DEFAULT):
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
        running = np.array([rows.get(i, {}).get("state") == JobState.RUNNING for i in group.members])
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
