"""The sweep driver's CPU per poll with many jobs: what one poll of polypythia.driver.sweep.Sweep.run costs the
machine the driver runs on, at ten times the PolyPythias study (450 jobs) by default.

Each poll the driver (every 2 s) reads the progress board's rows (Ray pickles them: simulated with
pickle), checks every job for a stall (polypythia.driver.watchdog),
runs the cross-seed monitor and writes its decisions (polypythia.driver.seedbandlog.MonitorLog.watch, against
an MLflow client that only counts calls), looks for alerts to act on (polypythia.driver.actions) and redraws
the live table (polypythia.driver.progress.ProgressDisplay, a rich Live table on a simulated terminal of 50
lines, whose redraws are counted too). Side by side, on the same simulated rows: the driver before this
change (the monitor rebuilt every group's table at every poll, and rich redrew the table of every job twice
a second) and now (the table kept from poll to poll; one redraw a poll, of the rows that fit). The jobs are simulated: groups of seeds of one model, each with the
Pythia budget's 154 checkpoint steps as decision steps, each job advancing a random number of steps a
poll with a smoothed loss at every decision step it passes (what polypythia.driver.progress.ProgressBoard keeps).

CPU is time.process_time() of this process (all its threads) over the timed polls, per poll and as a
share of one core at the 2 s poll interval.

    python benchmarks/bench_driver.py [--jobs 450] [--seeds 10] [--polls 30] [--steps-per-poll 800]
"""

from __future__ import annotations

import argparse
import io
import math
import pickle
import random
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from common import REPO, bench_home, load_average, machine_description

sys.path.insert(0, str(REPO / "tests"))  # the monitor before the change, kept in tests/driver/test_driver_speed.py

POLL_S = 2.0  # polypythia.driver.sweep: ray.wait(..., timeout=2.0)


class CountingClient:
    """An MLflow client that answers what MonitorLog asks and counts what it would send."""

    def __init__(self, names: list[str]):
        self.calls = Counter()
        self.runs = [SimpleNamespace(info=SimpleNamespace(run_name=n, run_id=f"run-{n}")) for n in names]

    def get_run(self, run_id):
        self.calls["get_run"] += 1
        return SimpleNamespace(info=SimpleNamespace(experiment_id="1"))

    def search_runs(self, experiment_ids, filter_string="", max_results=1000, page_token=None):
        self.calls["search_runs"] += 1
        return _Page(self.runs)

    def log_batch(self, run_id, metrics=(), **kw):
        self.calls["log_batch"] += 1
        self.calls["points"] += len(metrics)

    def set_tag(self, run_id, key, value):
        self.calls["set_tag"] += 1


class _Page(list):
    token = None


def make_jobs(home: Path, n_jobs: int, seeds: int) -> list:
    """``n_jobs`` validated JobConfigs: groups of ``seeds`` seeds of one model each, the Pythia budget's
    checkpoint grid (143,000 steps, log-spaced then every 1,000), attached to a cluster."""
    from polypythia.config.jobconfig import job_config

    model = {"name": "m", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "lr": 1e-3}
    budget = {
        "name": "pythia",
        "steps": 143000,
        "global_batch_size": 1024,
        "micro_batch_size": 16,
        "seq_length": 2048,
        "checkpoint_every_steps": 1000,
    }
    jobs = []
    for i in range(n_jobs):
        group, seed = divmod(i, seeds)
        jobs.append(
            job_config(
                {
                    "model": {**model, "name": f"m{group}"},
                    "budget": budget,
                    "seed": seed + 1,
                    "data": {"cache_dir": str(home / "cache")},
                    "home": str(home),
                    "runs_dir": str(home / "runs"),
                    "tracking": {"dir": str(home / "mlflow")},
                    "launcher": {"address": "127.0.0.1:6379", "num_gpus_per_job": 1},
                    "study": "bench",
                }
            )
        )
    return jobs


class SimulatedBoard:
    """The board's rows as jobs train: each poll every running job advances 0..2x ``steps_per_poll`` steps."""

    def __init__(self, jobs: list, plans: dict, steps_per_poll: int, rng: random.Random):
        self.plans, self.steps_per_poll, self.rng = plans, steps_per_poll, rng
        now = time.time()
        self.rows = {
            i: {
                "name": j.run_name,
                "state": "running",
                "step": rng.randrange(0, 3000),
                "total": j.budget.steps,
                "loss": 10.0,
                "tokens_per_s": 2e5,
                "started": now,
                "first_step": 0,
                "attempt": 1,
                "updated": now,
                "smoothed": {},
            }
            for i, j in enumerate(jobs)
        }
        self.offset = {i: rng.gauss(0, 0.05) for i in self.rows}

    def advance(self) -> None:
        for i, row in self.rows.items():
            if row["state"] != "running":
                continue
            step = min(row["total"], row["step"] + self.rng.randrange(0, 2 * self.steps_per_poll + 1))
            grid = self.plans[i][0]
            for s in grid:
                if row["step"] < s <= step:
                    row["smoothed"][s] = 2.0 + 8.0 / math.sqrt(s) + self.offset[i] + self.rng.gauss(0, 0.01)
            row.update(step=step, loss=2.0 + 8.0 / math.sqrt(max(step, 1)), updated=time.time())
            if step >= row["total"]:
                row["state"] = "finished"

    def snapshot(self) -> dict:
        return pickle.loads(pickle.dumps(self.rows))  # what ray.get(board.snapshot.remote()) costs the driver


def poll(jobs, board, watch, actions, display, pending, outcomes) -> None:
    """One poll's work in Sweep.run, in its order (the Ray calls replaced by the simulated board)."""
    from polypythia.driver import watchdog

    rows = board.snapshot()
    now = time.time()
    for index in pending.values():
        watchdog.stalled(rows[index], now, jobs[index].launcher.stall_timeout_s)
    actions.restarted(rows)
    watch.watch(rows)
    actions.due(pending, outcomes)
    display.update(watch.marks(rows))


class RedrawingDisplay:
    """The live table as it was before (commit 54874b8): every row, redrawn by rich twice a second."""

    def __init__(self, console):
        from rich.live import Live

        self.live = Live(console=console, refresh_per_second=2, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def update(self, rows) -> None:
        from polypythia.driver.progress import render

        self.live.update(render(rows))

    def __exit__(self, *exc) -> None:
        self.live.__exit__(*exc)


def measure(args: argparse.Namespace, jobs: list, before: bool) -> tuple[list[float], list[float], dict]:
    """CPU of each poll (and of the table's redraws until the next) over the simulated sweep, with the
    monitor and display of now, or (``before``) those that rebuilt the table and redrew every row."""
    from rich.console import Console
    from test_driver_speed import RebuildingMonitor  # the monitor before, kept verbatim as the tests' reference

    from polypythia.driver.actions import MonitorActions
    from polypythia.driver.progress import ProgressDisplay
    from polypythia.driver.seedband import SeedBandMonitor, plan_groups
    from polypythia.driver.seedbandlog import MonitorLog

    monitor = (RebuildingMonitor if before else SeedBandMonitor)(plan_groups(jobs))
    client = CountingClient([j.run_name for j in jobs])
    watch = MonitorLog(monitor, client, {"bench": "parent"}, jobs)
    actions = MonitorActions(jobs, monitor)
    board = SimulatedBoard(jobs, monitor.plans(), args.steps_per_poll, random.Random(0))  # the same rows both times
    pending, outcomes = {f"ref{i}": i for i in range(len(jobs))}, {}
    console = Console(file=io.StringIO(), force_terminal=True, width=160, height=50)
    cpu, work = [], []  # per poll: all the process's CPU until the next poll; the poll's own call
    with RedrawingDisplay(console) if before else ProgressDisplay(enabled=True, console=console) as display:
        for _ in range(args.warmup + args.polls):
            board.advance()
            began, started = time.monotonic(), time.process_time()
            poll(jobs, board, watch, actions, display, pending, outcomes)
            work.append(time.process_time() - started)
            time.sleep(max(0.0, args.interval_s - (time.monotonic() - began)))  # the live table redraws meanwhile
            cpu.append(time.process_time() - started)
    steps = sorted(r["step"] for r in board.rows.values())
    return (
        cpu[args.warmup :],
        work[args.warmup :],
        {
            "decisions": len(monitor._decided),
            "points": client.calls["points"],
            "steps": (steps[0], steps[-1]),
            "groups": len(monitor.groups),
        },
    )


def run(args: argparse.Namespace, home: Path) -> None:
    started = time.perf_counter()
    jobs = make_jobs(home, args.jobs, args.seeds)
    print(
        f"{len(jobs)} jobs in groups of {args.seeds} seeds, 153 decision steps each (Pythia's checkpoints); "
        f"set up in {time.perf_counter() - started:.1f} s"
    )
    results = {}
    for label, before in (("before (table rebuilt, every row redrawn 2x/s)", True), ("now", False)):
        cpu, own, facts = measure(args, jobs, before)
        per_poll = sum(cpu) / len(cpu)
        results[label] = per_poll
        print(
            f"{label}: {args.polls} polls (jobs at steps {facts['steps'][0]}..{facts['steps'][1]} of 143000 at the end; "
            f"{facts['decisions']} decisions, {facts['points']} points): driver CPU per poll {per_poll * 1000:.1f} ms "
            f"(max {max(cpu) * 1000:.1f}; the poll itself {sum(own) / len(own) * 1000:.1f} ms), "
            f"{per_poll / POLL_S * 100:.2f}% of one core at a poll every {POLL_S:g} s ({load_average()})"
        )
    before, now = results.values()
    print(f"ratio now/before: {now / before:.3f}; now {now / POLL_S * 100:.2f}% of one core (target < 5%)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--jobs", type=int, default=450)
    parser.add_argument("--seeds", type=int, default=10, help="seeds per model (one cross-seed group each)")
    parser.add_argument("--polls", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--steps-per-poll",
        type=int,
        default=800,
        help="mean steps a job advances between polls (high, so that decisions happen)",
    )
    parser.add_argument(
        "--interval-s", type=float, default=POLL_S, help="seconds from one poll to the next (the sweep's: 2)"
    )
    args = parser.parse_args()
    print(machine_description())
    with bench_home("bench_driver_") as home:
        run(args, home)


if __name__ == "__main__":
    main()
