"""The driver at ten times the study: the seed-band monitor keeps its table from poll to poll instead of
rebuilding it (polypythia/driver/seedband.py), and decides exactly as the rebuild did; the live table shows
what fits the terminal."""

import copy
import io
import math
import random

import numpy as np
import pytest
from rich.console import Console

from polypythia.driver.progress import ProgressBoard, ProgressDisplay, render
from polypythia.driver.seedband import Band, Decision, Group, SeedBandMonitor
from polypythia.jobspec import ENDED_STATES
from polypythia.stability import _deviation_array, for_study_length
from polypythia.tracking.ui import SEEDS_PREFIX, seeds_band_metrics


class RebuildingMonitor(SeedBandMonitor):
    """The monitor as it was before the incremental table (commit 54874b8): every poll rebuilds each
    group's table from every row. Kept here, verbatim, as the reference the new one must match."""

    def _observe(self, number, group, rows, decisions, bands):
        rule = for_study_length(self.rule, len(group.grid))
        smoothed = [_own_values(rows.get(i, {})) for i in group.members]
        ended = np.array([rows.get(i, {}).get("state") in ENDED_STATES for i in group.members])
        running = np.array([rows.get(i, {}).get("state") == "running" for i in group.members])
        table = np.array([[s.get(step, np.nan) for s in smoothed] for step in group.grid], dtype="float64")
        table[~np.isfinite(table)] = np.nan
        for position, step in enumerate(group.grid):
            reached = np.array([step in s for s in smoothed])
            present = ~np.isnan(table[position])
            complete = bool(reached.any() and (reached | ended).all())
            ready = bool((reached | ended | ~running).all())
            undecided = [k for k in np.flatnonzero(reached) if (group.members[k], step) not in self._decided]
            attempt = (int(present.sum()), complete)
            if undecided and ready and attempt[0] >= rule.min_runs and self._attempts.get((number, step)) != attempt:
                self._attempts[(number, step)] = attempt
                deviation = _deviation_array(table[: position + 1], rule)[-1]
                threshold = self.threshold(group, attempt[0])
                for k in undecided:
                    if np.isnan(deviation[k]) and not complete:
                        continue
                    self._decided.add((group.members[k], step))
                    decisions.append(
                        Decision(
                            group.members[k],
                            group.name,
                            step,
                            float(table[position, k]),
                            float(deviation[k]),
                            threshold,
                            int(present.sum() - present[k]),
                        )
                    )
            if complete and (number, step) not in self._banded:
                self._banded.add((number, step))
                band = seeds_band_metrics({i: table[position, k] for k, i in enumerate(group.members)})
                bands.append(
                    Band(
                        group.study,
                        step,
                        {group.prefix + key.removeprefix(SEEDS_PREFIX): value for key, value in band.items()},
                    )
                )


def _own_values(row):
    smoothed, step = row.get("smoothed") or {}, row.get("step")
    return smoothed if step is None else {s: v for s, v in smoothed.items() if s <= step}


def simulate(seed: int, polls: int = 120):
    """A random sweep of two groups on a real ProgressBoard: runs that lag, stop, fail, die and resume
    from a checkpoint, get rewound, report a non-finite loss, or start from a relaunch's checkpoint;
    one seed of each group drifts away. Yields (rows, forgotten) per poll."""
    rng = random.Random(seed)
    grid = tuple(sorted({1, 2, 4, 8, 16, 32, 50, 60, 80, 100, 120, 140, 160, 180, 200}))
    groups = [Group("s", "a", grid, 5, list(range(0, 7))), Group("s", "b", grid, 5, list(range(7, 12)))]
    board = ProgressBoard([f"j{i}" for i in range(12)], {i: (g.grid, g.window) for g in groups for i in g.members})
    step = {i: 0 for i in range(12)}
    for i in range(12):  # a relaunch: some runs resume from a checkpoint, their smoothed losses before it unknown
        step[i] = rng.choice((0, 0, 0, 40, 100))
        board.update(i, {"state": "running", "step": step[i], "total": 200, "attempt_start": True})
    drifting = {rng.choice(range(7)), rng.choice(range(7, 12))}
    for _ in range(polls):
        forgotten = []
        for i in range(12):
            row = board.rows[i]
            if row["state"] in ENDED_STATES:
                continue
            event = rng.random()
            if event < 0.01:
                board.update(i, {"state": rng.choice(("failed", "stopped"))})
                continue
            if event < 0.04 and step[i] > 20:  # died, or rewound: back to a checkpoint, a new attempt
                back = rng.choice([s for s in (0, 20, 40, 60, 100, 140) if s < step[i]])
                if event < 0.025:
                    board.update(i, {"state": "rewinding", "step": 0})
                    forgotten.append((i, back))
                step[i] = back
                board.update(i, {"state": "running", "step": back, "total": 200, "attempt_start": True})
                continue
            if rng.random() < 0.3:  # lagging this poll
                continue
            new = min(200, step[i] + rng.randrange(1, 15))
            losses = {
                s: 3.0 + 5.0 / math.sqrt(s) + (0.002 * s if i in drifting else 0.0) + rng.gauss(0, 0.01)
                for s in range(step[i] + 1, new + 1)
            }
            if rng.random() < 0.01:
                losses[new] = float("inf")
            step[i] = new
            board.update(i, {"state": "finished" if new == 200 else "running", "step": new, "losses": losses})
        yield board.snapshot(), forgotten, groups


@pytest.mark.parametrize("seed", range(12))
def test_the_incremental_monitor_decides_exactly_as_the_rebuilding_one(seed):
    new = old = None
    alerts = 0
    for rows, forgotten, groups in simulate(seed):
        if new is None:
            new, old = SeedBandMonitor(copy.deepcopy(groups)), RebuildingMonitor(copy.deepcopy(groups))
        for index, back in forgotten:
            new.forget(index, back)
            old.forget(index, back)
        got, expected = new.observe(copy.deepcopy(rows)), old.observe(copy.deepcopy(rows))
        assert repr(got) == repr(expected)
        assert repr(new.alerts) == repr(old.alerts) and repr(new.latest) == repr(old.latest)
        alerts += len(new.alerts)
    assert old._decided and alerts  # the scenario decides, and alerts, often


def test_the_live_table_shows_what_fits_the_terminal_and_counts_the_rest():
    rows = {
        i: {
            "name": f"m-seed{i}",
            "state": "running",
            "step": 5,
            "total": 10,
            "loss": 2.0,
            "tokens_per_s": 1.0,
            "started": 0.0,
            "first_step": 0,
        }
        for i in range(450)
    }
    rows[300]["alert"], rows[7]["state"] = 40, "failed"
    console = Console(file=io.StringIO(), force_terminal=True, width=160, height=30)
    text = _text(render(rows, max_rows=20), console)
    assert text.count("m-seed") == 20 and "m-seed300" in text and "m-seed7 " in text  # the alert and the failure first
    assert "... 430 more jobs (430 running)" in text
    with ProgressDisplay(console=console) as display:
        display.update(rows)
        assert display.max_rows() == 30 - 6


def _text(table, console):
    console.print(table)
    return console.file.getvalue()
