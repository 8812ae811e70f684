"""The sweep's live progress: a table of every job's state, step, loss, speed, ETA and deviation
from its seed band.

Jobs report to a :class:`ProgressBoard` (a Ray actor in a sweep); the driver polls it and redraws
a rich table on a terminal, or prints one readable line per job now and then when the output is a
file or a pipe (CI logs, ``nohup``). The board also keeps, per job that has a plan, its smoothed loss
at each decision step (:class:`SmoothedLoss`), which the seed-band monitor
(:mod:`polypythia.driver.seedband`) reads; the driver adds the monitor's verdicts to the rows it draws.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter, deque
from typing import Any, Optional

from rich.console import Console
from rich.live import Live
from rich.table import Table

from polypythia.jobspec import JobState


class SmoothedLoss:
    """A run's mean loss over its last ``window`` steps, kept at each of the steps in ``grid``."""

    def __init__(self, grid: tuple[int, ...], window: int):
        self.grid = frozenset(grid)
        self.window = window
        self.recent: deque[tuple[int, float]] = deque()  # (step, loss) of the last ``window`` steps

    def add(self, losses: dict[int, float]) -> dict[int, float]:
        """Take steps' losses (in any order); return the smoothed loss at the grid steps among them."""
        found = {}
        for step, loss in sorted(losses.items()):
            while self.recent and self.recent[-1][0] >= step:  # a step trained again (a resumed job)
                self.recent.pop()
            self.recent.append((step, float(loss)))
            while self.recent[0][0] <= step - self.window:
                self.recent.popleft()
            if step in self.grid:
                found[step] = sum(value for _, value in self.recent) / len(self.recent)
        return found


class ProgressBoard:
    """Latest report of every job, by job index (plain dicts). ``plans``: per job, the decision steps
    and loss window of its smoothed loss (``row["smoothed"]``: step -> value); reports may carry
    ``losses`` (step -> loss of every step since the last report)."""

    def __init__(self, names: list[str], plans: Optional[dict[int, tuple[tuple[int, ...], int]]] = None):
        self.rows: dict[int, dict[str, Any]] = {
            i: {
                "name": n,
                "state": JobState.PENDING,
                "step": 0,
                "total": None,
                "loss": math.nan,
                "tokens_per_s": math.nan,
                "started": None,
                "first_step": None,
                "attempt": 0,
            }
            for i, n in enumerate(names)
        }
        self.smoothers = {i: SmoothedLoss(grid, window) for i, (grid, window) in (plans or {}).items()}
        for i in self.smoothers:
            self.rows[i]["smoothed"] = {}

    def update(self, index: int, report: dict[str, Any]) -> None:
        row = self.rows[index]
        now = time.time()
        if report.pop("attempt_start", False):  # a (re)started job process
            row["started"] = now
            row["first_step"] = report.get("step", 0)
            row["attempt"] += 1
        losses = report.pop("losses", None)
        if losses and index in self.smoothers:
            row["smoothed"].update(self.smoothers[index].add(losses))
        row.update(report)
        row["updated"] = now

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return {i: dict(r) for i, r in self.rows.items()}


def eta_seconds(row: dict[str, Any], now: float) -> float | None:
    total, step, first, started = row.get("total"), row.get("step", 0), row.get("first_step"), row.get("started")
    if not total or started is None or first is None or step <= first:
        return None
    rate = (step - first) / max(now - started, 1e-6)
    return (total - step) / rate


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def cross_seed_text(row: dict[str, Any], markup: bool = True) -> str:
    """The monitor's verdict on a row (``alert``: the first alert's step, ``deviation``: the latest)."""
    if row.get("alert") is not None:
        text = f"ALERT@{row['alert']}"
        return f"[bold red]{text}[/]" if markup else text
    deviation = row.get("deviation")
    return "-" if deviation is None else f"{deviation:+.1f} SD"


def state_note(row: dict[str, Any], markup: bool = False) -> str:
    """What a running job is doing besides training: waiting for the tracking server (its points are
    held back, see :class:`polypythia.tracking.client.MetricsLogger`), or evaluating its checkpoints."""
    if row["state"] != JobState.RUNNING:
        return ""
    if row.get("tracking_waiting"):
        return " [yellow](waiting for the tracking server)[/]" if markup else " (waiting for the tracking server)"
    return " (evaluating checkpoints)" if row.get("evaluating") else ""


URGENT_STATES = (JobState.FAILED, JobState.DIVERGED, JobState.STALLED, JobState.REWINDING)


def shown_rows(rows: dict[int, dict[str, Any]], max_rows: Optional[int]) -> tuple[list, Counter]:
    """The rows a table of ``max_rows`` has room for, in job order: the jobs that need a look first
    (an alert, a failure, a stall, a rewind), then running ones, then the rest; and the states of the
    rows left out (a terminal shows some 40 rows, and drawing 450 costs the driver ~0.2 s of CPU)."""
    if max_rows is None or len(rows) <= max_rows:
        return sorted(rows.items()), Counter()

    def rank(item):
        row = item[1]
        urgent = row.get("alert") is not None or row["state"] in URGENT_STATES
        return (0 if urgent else 1 if row["state"] == JobState.RUNNING else 2, item[0])

    order = sorted(rows.items(), key=rank)
    return sorted(order[:max_rows]), Counter(row["state"] for _, row in order[max_rows:])


def render(rows: dict[int, dict[str, Any]], max_rows: Optional[int] = None) -> Table:
    table = Table(title="polypythia sweep", expand=False)
    for col, justify in (
        ("job", "left"),
        ("state", "left"),
        ("step", "right"),
        ("loss", "right"),
        ("tokens/s", "right"),
        ("ETA", "right"),
        ("vs seeds", "right"),
    ):
        table.add_column(col, justify=justify)
    now = time.time()
    colours = {
        JobState.RUNNING: "cyan",
        JobState.FINISHED: "green",
        JobState.FAILED: "red",
        JobState.DIVERGED: "yellow",
        JobState.STOPPED: "magenta",
        JobState.STALLED: "bold red",
        JobState.REWINDING: "magenta",
    }
    kept, rest = shown_rows(rows, max_rows)
    for _, row in kept:
        total = row.get("total")
        step = f"{row.get('step', 0)}/{total}" if total else "-"
        loss = row.get("loss", math.nan)
        tps = row.get("tokens_per_s", math.nan)
        state = row["state"]
        table.add_row(
            row["name"],
            f"[{colours.get(state, 'white')}]{state}[/]{state_note(row, markup=True)}",
            step,
            "-" if loss != loss else f"{loss:.4f}",
            "-" if tps != tps else f"{tps:,.0f}",
            _fmt_eta(eta_seconds(row, now)) if state == JobState.RUNNING else "-",
            cross_seed_text(row),
        )
    if rest:
        states = ", ".join(f"{n} {state}" for state, n in sorted(rest.items(), key=lambda kv: -kv[1]))
        table.add_row(f"... {sum(rest.values())} more jobs ({states})", "", "", "", "", "", "")
    return table


def line(row: dict[str, Any]) -> str:
    loss = row.get("loss", math.nan)
    tps = row.get("tokens_per_s", math.nan)
    return (
        f"[progress] {row['name']}: {row['state']}{state_note(row)} step {row.get('step', 0)}/{row.get('total') or '?'}"
        + ("" if loss != loss else f" loss {loss:.4f}")
        + ("" if tps != tps else f" {tps:,.0f} tok/s")
        + f" eta {_fmt_eta(eta_seconds(row, time.time()))}"
        + (
            ""
            if row.get("alert") is None and row.get("deviation") is None
            else f" vs seeds {cross_seed_text(row, False)}"
        )
    )


class ProgressDisplay:
    """Draws the board: a live table on a terminal, plain lines every ``line_every_s`` otherwise."""

    def __init__(self, enabled: bool = True, line_every_s: float = 15.0, console: Console | None = None):
        self.console = console or Console(file=sys.stdout)
        self.enabled = enabled
        self.live: Live | None = None
        self.line_every_s = line_every_s
        self._last_line = 0.0
        self._last_states: dict[int, tuple] = {}  # per job: its state and its alert, as last printed

    def __enter__(self) -> "ProgressDisplay":
        if self.enabled and self.console.is_terminal:  # drawn once per poll (not on a clock): the driver's CPU
            self.live = Live(console=self.console, auto_refresh=False, transient=False)
            self.live.__enter__()
        return self

    def max_rows(self) -> int:
        """Job rows that fit the terminal (its height less the title, header, borders and the summary row)."""
        return max(5, self.console.height - 6)

    def update(self, rows: dict[int, dict[str, Any]]) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(render(rows, self.max_rows()), refresh=True)
            return
        now = time.time()
        changed = {i for i, r in rows.items() if self._last_states.get(i) != (r["state"], r.get("alert"))}
        due = now - self._last_line >= self.line_every_s  # every row, now and then; else changes only
        if changed or due:
            for i, row in sorted(rows.items()):
                if due or i in changed:
                    print(line(row), flush=True)
            if due:
                self._last_line = now
            self._last_states = {i: (r["state"], r.get("alert")) for i, r in rows.items()}

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
