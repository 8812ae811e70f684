"""The sweep's live progress: a table of every job's state, step, loss, speed and ETA.

Jobs report to a :class:`ProgressBoard` (a Ray actor in a sweep); the driver polls it and redraws
a rich table on a terminal, or prints one readable line per job now and then when the output is a
file or a pipe (CI logs, ``nohup``).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


class ProgressBoard:
    """Latest report of every job, by job index (plain dicts)."""

    def __init__(self, names: list[str]):
        self.rows: dict[int, dict[str, Any]] = {
            i: {"name": n, "state": "pending", "step": 0, "total": None, "loss": math.nan,
                "tokens_per_s": math.nan, "started": None, "first_step": None, "attempt": 0}
            for i, n in enumerate(names)
        }

    def update(self, index: int, report: dict[str, Any]) -> None:
        row = self.rows[index]
        now = time.time()
        if report.pop("attempt_start", False):  # a (re)started job process
            row["started"] = now
            row["first_step"] = report.get("step", 0)
            row["attempt"] += 1
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


def render(rows: dict[int, dict[str, Any]]) -> Table:
    table = Table(title="polypythia sweep", expand=False)
    for col, justify in (("job", "left"), ("state", "left"), ("step", "right"), ("loss", "right"),
                         ("tokens/s", "right"), ("ETA", "right")):
        table.add_column(col, justify=justify)
    now = time.time()
    colours = {"running": "cyan", "finished": "green", "failed": "red", "diverged": "yellow", "retrying": "magenta"}
    for _, row in sorted(rows.items()):
        total = row.get("total")
        step = f"{row.get('step', 0)}/{total}" if total else "-"
        loss = row.get("loss", math.nan)
        tps = row.get("tokens_per_s", math.nan)
        state = row["state"]
        table.add_row(
            row["name"], f"[{colours.get(state, 'white')}]{state}[/]", step,
            "-" if loss != loss else f"{loss:.4f}", "-" if tps != tps else f"{tps:,.0f}",
            _fmt_eta(eta_seconds(row, now)) if state == "running" else "-",
        )
    return table


def line(row: dict[str, Any]) -> str:
    loss = row.get("loss", math.nan)
    tps = row.get("tokens_per_s", math.nan)
    return (f"[progress] {row['name']}: {row['state']} step {row.get('step', 0)}/{row.get('total') or '?'}"
            + ("" if loss != loss else f" loss {loss:.4f}")
            + ("" if tps != tps else f" {tps:,.0f} tok/s")
            + f" eta {_fmt_eta(eta_seconds(row, time.time()))}")


class ProgressDisplay:
    """Draws the board: a live table on a terminal, plain lines every ``line_every_s`` otherwise."""

    def __init__(self, enabled: bool = True, line_every_s: float = 15.0, console: Console | None = None):
        self.console = console or Console(file=sys.stdout)
        self.enabled = enabled
        self.live: Live | None = None
        self.line_every_s = line_every_s
        self._last_line = 0.0
        self._last_states: dict[int, str] = {}

    def __enter__(self) -> "ProgressDisplay":
        if self.enabled and self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def update(self, rows: dict[int, dict[str, Any]]) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(render(rows))
            return
        now = time.time()
        changed = {i for i, r in rows.items() if self._last_states.get(i) != r["state"]}
        due = now - self._last_line >= self.line_every_s  # every row, now and then; else changes only
        if changed or due:
            for i, row in sorted(rows.items()):
                if due or i in changed:
                    print(line(row), flush=True)
            if due:
                self._last_line = now
            self._last_states = {i: r["state"] for i, r in rows.items()}

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
