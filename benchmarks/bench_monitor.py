"""The live stability monitor, measured: its alerts on injected instabilities and healthy runs, and its cost.

``--detector``: how early the monitor alerts on injected instabilities and whether it alerts on
healthy runs; ``--cost``: what it costs a training job. Without either flag both halves run, the
detector first.

``--detector`` runs sweeps on the CPU through the real launcher (``launch.py -m`` as a subprocess,
one fresh POLYPYTHIA_HOME for all of them, its MLflow server stopped at the end), one study per
fault so that each faulty run is judged live against its own healthy siblings:

  lr-x<F>      ``--healthy`` healthy seeds and ``--faulty`` seeds whose learning rate is multiplied
               by F from step ``--inject-at`` on (``train.fault.lr_boost*``), for each F in
               ``--strengths`` (default 10, 100, 1000)
  repeat-<N>   the same with N steps of a batch of one repeated token from ``--inject-at``
               (``train.fault.repeat_batch*``, ``--repeat-steps``; 0: no such study)
  natural-...  with ``--natural-lr LR``: every seed without gradient clipping
               (``train.gradient_clipping=0``) at peak learning rate LR, nothing injected; any
               instability there happened by itself

Every study uses its own seeds (study k: seeds k*(H+F)+1 ... after ``--seed-offset``), so the
healthy runs counted for false alarms are all different runs. The monitor runs as configured by
default (decision steps = the checkpoint steps, smoothed loss over 1% of the budget, false-alarm
rate 0.001); nothing about it is set here (``--override`` passes extra Hydra overrides to every
sweep, for experiments).

What is reported per run, and how it is decided:

  first alert  the live monitor's first alert: the step in the run's MLflow tag ``stability.alert``
               (written by the sweep's driver while the sweep trained), with its deviation in SDs
               and the number of sibling runs that had reached that step when it was decided (from
               the driver's alert line; the rule's threshold assumes all of them).
               The monitor judges the smoothed ``train/loss`` at its decision steps, so an alert
               can only fall on one of them (printed above the table).
  loss shows   the step at which the offline analysis says the run's loss left its siblings: the
               onset of the run's first outlier episode under the calibrated trajectory rule of
               ``analysis.outliers.find_outliers`` run on the finished study exactly as
               ``python -m analysis STUDY --out/--replay`` runs it (default options). For our
               runs, which have no task accuracies, that rule judges ``valid/loss`` at every
               checkpoint. ``not shown`` when the analysis finds no such episode; nothing is
               inferred from the curves here. (The analysis's final-value MAD rule on
               train/loss and valid/loss is printed per study as extra information; it has no
               onset.) Note the steps' meaning: ``valid/loss`` at checkpoint S is the model after S
               updates, ``train/loss`` at step S the model after S - 1 updates, so an instability
               injected at step S can show offline at checkpoint S and in the train loss only from
               step S + 1, and the monitor sees it at its next decision step. Hence the default
               ``--inject-at 45``, between two decision steps (40 and 50), as an instability that
               starts at an arbitrary step mostly is; ``--inject-at 40`` (a checkpoint step) is the
               monitor's worst case: an abrupt fault there shows offline at 40, live at 50.
  lead         loss shows minus first alert, in steps: >= 0 means the alert came at or before the
               step at which the offline analysis sees the loss leave the band.
  replay       the first alert of ``python -m analysis STUDY --replay`` on the smoothed train/loss
               (the same rule replayed causally on the stored losses, every run present at every
               step; it differs from the live alert when the driver decided before all siblings
               had reached the step: see the siblings count).
  verdict      healthy runs: ``ok`` or ``FALSE ALARM`` (any alert); injected runs: ``in time``
               (lead >= 0), ``LATE`` (alert after the loss showed), ``MISSED`` (no alert, the loss
               showed), ``not shown`` (the offline analysis sees nothing; with or without alert),
               and ``alert before the fault`` when the alert precedes the injection.

The summary counts ``alerts at or before the loss shows the instability: k of n`` over the injected
runs whose loss shows it, and ``false alarms on healthy runs: m of h``.

``--cost`` trains each model with the monitor on (``monitor.every_steps`` = ``--every``, spike
detection on) and off (``monitor.every_steps=0 monitor.spikes=false``), in one process, the runs of
each round interleaved (the order alternates every round) so that machine noise hits both alike,
on the same batches and torch threads. Step time is the interval between consecutive ends of
optimizer steps, taken by a callback that runs after every other one (so it includes the monitor's
``on_step_end``); the first ``--warmup`` steps of every run are left out, and the runs write
checkpoints only at step 0 and at the end. It prints, per model:

  on/off           the mean step time with the monitor over the mean without, per round (the two
                   runs next to each other) and the median over rounds, which one disturbed round
                   does not move (the issue's target: <= 1.02 at the default interval). Means of
                   steps, not medians: the monitor works on one step in ``--every``
  per step         in the "on" runs, the median of the sampled steps minus the median of the
                   others, divided by ``--every``, over the median step without the monitor: the
                   same cost measured within runs, free of run-to-run noise

    python benchmarks/bench_monitor.py --detector                 # 4 studies x 9 tiny seeds, 10-15 min on 2 busy cores
    python benchmarks/bench_monitor.py --detector --healthy 16 --strengths 3,10,30,100,1000 --sweep-steps 200
    python benchmarks/bench_monitor.py --cost                     # tiny and 14m, every 10 steps
    python benchmarks/bench_monitor.py --cost --models 14m --steps 100 --repeats 4 --every 10
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO, StepTimer, bench_home, child_env, job_dict, load_average, machine_description, mean, median

# ---------------------------------------------------------------------------------------------
# --detector


@dataclass(frozen=True)
class StudyPlan:
    """One sweep: its study name, what it injects, into which seeds, and its Hydra overrides."""

    name: str
    fault: str  # what a faulty seed gets, in words ("lr x100 from step 40"); "" when nothing is injected
    seeds: list[int]
    faulty: list[int]
    injected_at: int | None
    overrides: list[str] = field(default_factory=list)


def plan_studies(args: argparse.Namespace) -> list[StudyPlan]:
    """The studies of one detector run (see the module docstring), each with its own seeds."""
    per = args.healthy + args.faulty
    plans: list[StudyPlan] = []

    def seeds_of(k: int) -> tuple[list[int], list[int]]:
        seeds = list(range(args.seed_offset + k * per + 1, args.seed_offset + (k + 1) * per + 1))
        return seeds, seeds[args.healthy :]

    at = args.inject_at
    for factor in args.strengths:
        seeds, faulty = seeds_of(len(plans))
        plans.append(
            StudyPlan(
                f"lr-x{factor:g}",
                f"lr x{factor:g} from step {at}",
                seeds,
                faulty,
                at,
                [
                    f"train.fault.lr_boost_at_step={at}",
                    f"train.fault.lr_boost={factor:g}",
                    f"train.fault.lr_boost_seeds=[{','.join(map(str, faulty))}]",
                ],
            )
        )
    if args.repeat_steps:
        seeds, faulty = seeds_of(len(plans))
        plans.append(
            StudyPlan(
                f"repeat-{args.repeat_steps}",
                f"{args.repeat_steps} repeated-token batches from step {at}",
                seeds,
                faulty,
                at,
                [
                    f"train.fault.repeat_batch_at_step={at}",
                    f"train.fault.repeat_batch_steps={args.repeat_steps}",
                    f"train.fault.repeat_batch_seeds=[{','.join(map(str, faulty))}]",
                ],
            )
        )
    if args.natural_lr:
        seeds, _ = seeds_of(len(plans))
        plans.append(
            StudyPlan(
                f"natural-noclip-lr{args.natural_lr:g}",
                "",
                seeds,
                [],
                None,
                ["train.gradient_clipping=0", f"model.lr={args.natural_lr:g}"],
            )
        )
    return plans


def launch_study(home: Path, plan: StudyPlan, args: argparse.Namespace) -> tuple[float, dict[int, int]]:
    """One ``launch.py -m`` sweep of ``plan`` writing under ``home``; returns its wall seconds and, per
    seed, how many siblings its first alert was decided against (from the driver's alert line). A
    sweep that exits non-zero (e.g. a run that diverged) is reported and still analysed."""
    cmd = [
        sys.executable,
        str(REPO / "launch.py"),
        "-m",
        "seed=" + ",".join(map(str, plan.seeds)),
        f"model={args.model}",
        "budget=smoke",
        f"budget.steps={args.sweep_steps}",
        f"budget.checkpoint_every_steps={args.checkpoint_every}",
        f"launcher.num_cpus_per_job={args.cpus_per_job:g}",
        "launcher.progress=false",
        "tracking.system_metrics=false",
        f"study={plan.name}",
        *plan.overrides,
        *args.override,
    ]
    env = child_env(home)
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # the bench home's own server, a local Ray runtime
        env.pop(key, None)
    env["PYTHONUNBUFFERED"] = "1"
    started = time.time()
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=args.sweep_timeout)
    wall_s = time.time() - started
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).splitlines()
        outcome = lines.index("Sweep outcome:") if "Sweep outcome:" in lines else None
        if outcome is not None:  # the runs that did not finish, as the launcher summed them up
            lines = [line for line in lines[outcome + 1 :] if line.startswith("  ") and ": finished" not in line]
        print(
            f"  note: the sweep of {plan.name} exited with {proc.returncode}; "
            + ("its unfinished runs:" if outcome is not None else "its last output:"),
            flush=True,
        )
        for line in lines[-12:]:
            print("    " + line.strip()[:200], flush=True)
    siblings = {}
    for match in ALERT_LINE.finditer(proc.stdout + proc.stderr):
        siblings.setdefault(int(match.group(1)), int(match.group(3)))
    return wall_s, siblings


# The driver's log line of an alert (polypythia/driver/seedbandlog.py, MonitorLog.watch).
ALERT_LINE = re.compile(r"Cross-seed alert: \S*-seed(\d+) at step (\d+): .*? from its (\d+) siblings'")
ALERT_TAG = re.compile(r"step=(\d+) signal=(\S+) deviation=([-+0-9.eEinfa]+)")


def judge(injected_at: int | None, alert_step: int | None, onset_step: int | None) -> tuple[int | None, str]:
    """The lead time (loss-shows step minus first alert step, None unless both exist) and the verdict
    of one run (see the module docstring). ``injected_at`` None: a run nothing was injected into."""
    lead = onset_step - alert_step if alert_step is not None and onset_step is not None else None
    if injected_at is None:
        if alert_step is None:
            return lead, "ok" if onset_step is None else "ok (but the offline analysis flags it)"
        return lead, "FALSE ALARM" if onset_step is None else "alert; the offline analysis flags it too"
    if alert_step is not None and alert_step < injected_at:
        return lead, "alert before the fault"
    if onset_step is None:
        return lead, "not shown (no alert)" if alert_step is None else "not shown (alert)"
    if alert_step is None:
        return lead, "MISSED"
    if lead >= 0:
        return lead, "in time" if lead == 0 else f"in time ({lead} steps early)"
    return lead, f"LATE ({-lead} steps after)"


def summary_counts(rows: list[dict]) -> dict[str, int]:
    """The summary's counts over :func:`collect` rows: injected runs whose loss shows the instability
    (``shown``), those alerted at or before it (``in_time``), injected runs not shown (``not_shown``,
    ``not_shown_alerted``), healthy runs (``healthy``) and those with an alert (``false_alarms``)."""
    injected = [r for r in rows if r["injected_at"] is not None]
    healthy = [r for r in rows if r["injected_at"] is None and r["kind"] == "healthy"]
    shown = [r for r in injected if r["onset_step"] is not None]
    return {
        "shown": len(shown),
        "in_time": sum(r["lead"] is not None and r["lead"] >= 0 and r["alert_step"] >= r["injected_at"] for r in shown),
        "not_shown": len(injected) - len(shown),
        "not_shown_alerted": sum(r["onset_step"] is None and r["alert_step"] is not None for r in injected),
        "healthy": len(healthy),
        "false_alarms": sum(r["alert_step"] is not None for r in healthy),
    }


def collect(uri: str, plan: StudyPlan) -> tuple[list[dict], list[str]]:
    """Per run of a finished study: its live alert, the offline outlier onset, the replay's alert and
    the verdict; plus notes (the final-value rule's flags, runs that did not finish)."""
    from analysis.load import load_study
    from analysis.outliers import DEFAULT_TASKS, find_outliers
    from analysis.replay import SMOOTHED_LOSS, replay
    from analysis.report import standardised_score
    from polypythia.tracking import client as tracking

    study = load_study(plan.name, tracking_uri=uri)
    score = standardised_score(study.metrics, DEFAULT_TASKS)  # None: our runs have no task accuracies
    outliers = find_outliers(study.metrics, score=score)  # the defaults of python -m analysis
    replayed = replay(study.metrics, outliers, score=score)
    client = tracking.client(uri)
    rows, notes = [], []
    calibrated = outliers[outliers["rule"] == "calibrated"]
    mad = outliers[outliers["rule"] != "calibrated"]
    if not mad.empty:
        notes.append(
            "final-value rule ("
            + ", ".join(sorted(set(mad["rule"])))
            + ") flags: "
            + ", ".join(f"seed {r.seed} on {r.metric} ({r.onset_deviation_sd:+.1f})" for r in mad.itertuples())
        )
    for run in study.runs.itertuples():
        seed = int(run.weight_seed)
        tag = client.get_run(run.run_id).data.tags.get("stability.alert")
        match = ALERT_TAG.search(tag or "")
        alert_step = int(match.group(1)) if match else None
        alert_dev = float(match.group(3)) if match else None
        if tag and not match:
            notes.append(f"seed {seed}: unreadable stability.alert tag {tag!r}")
        episodes = calibrated[calibrated["seed"] == str(run.seed)].sort_values("onset_step")
        onset = episodes.iloc[0] if len(episodes) else None
        again = replayed[(replayed["seed"] == str(run.seed)) & (replayed["signal"] == SMOOTHED_LOSS)]
        injected_at = plan.injected_at if seed in plan.faulty else None
        onset_step = int(onset["onset_step"]) if onset is not None else None
        lead, verdict = judge(injected_at, alert_step, onset_step)
        if not plan.fault:  # nothing injected: say what happened, not whether it is wrong
            alerted = "alert" if alert_step is not None else "no alert"
            verdict = f"{alerted}, {'shown' if onset_step is not None else 'not shown'}"
        if run.status != "FINISHED" or run.diverged:
            notes.append(f"seed {seed}: MLflow status {run.status}{', diverged' if run.diverged else ''}")
        rows.append(
            {
                "study": plan.name,
                "seed": seed,
                "kind": "injected" if seed in plan.faulty else ("healthy" if plan.fault else "natural"),
                "injected_at": injected_at,
                "alert_step": alert_step,
                "alert_dev": alert_dev,
                "onset_step": onset_step,
                "onset_metric": None if onset is None else str(onset["metric"]),
                "onset_dev": None if onset is None else float(onset["onset_deviation_sd"]),
                "replay_step": int(again.iloc[0]["alert_step"]) if len(again) else None,
                "lead": lead,
                "verdict": verdict,
            }
        )
    rows.sort(key=lambda r: r["seed"])
    return rows, notes


def print_table(rows: list[dict]) -> None:
    header = [
        "study",
        "seed",
        "injected at",
        "first alert (SD, siblings)",
        "loss shows (SD, metric)",
        "lead",
        "replay",
        "verdict",
    ]

    def cell(step, dev, siblings=None, none="none"):
        if step is None:
            return none
        return (
            f"{step} ({dev:+.1f}{'' if siblings is None else f', {siblings} sib.'})" if dev is not None else str(step)
        )

    table = [
        [
            r["study"],
            str(r["seed"]),
            "-" if r["injected_at"] is None else str(r["injected_at"]),
            cell(r["alert_step"], r["alert_dev"], r.get("alert_siblings")),
            "not shown"
            if r["onset_step"] is None
            else f"{r['onset_step']} ({r['onset_dev']:+.1f}, {r['onset_metric']})",
            "-" if r["lead"] is None else f"{r['lead']:+d}",
            cell(r["replay_step"], None),
            r["verdict"],
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for number, row in enumerate([header, *table]):
        print(
            "  "
            + "  ".join(
                text.ljust(width) if i in (0, 7) else text.rjust(width)
                for i, (text, width) in enumerate(zip(row, widths))
            ).rstrip()
        )
        if number == 0:
            print("  " + "  ".join("-" * width for width in widths))


def detector(args: argparse.Namespace, home: Path) -> None:
    """Sweeps with injected instabilities; per run the live alert against the offline onset."""
    from polypythia.tracking import client as tracking
    from polypythia.train.schedule import checkpoint_steps

    plans = plan_studies(args)
    grid = [s for s in checkpoint_steps(args.sweep_steps, args.checkpoint_every) if s > 0]
    print(
        f"detector: {len(plans)} studies of {args.healthy} healthy + {args.faulty} faulty {args.model} seeds"
        + (f" (natural study: {args.healthy + args.faulty} seeds, nothing injected)" if args.natural_lr else "")
        + f", budget=smoke with "
        f"{args.sweep_steps} steps, checkpoints and the monitor's decision steps at {','.join(map(str, grid))}"
        + (f"; extra overrides: {' '.join(args.override)}" if args.override else ""),
        flush=True,
    )
    rows, notes = [], []
    for plan in plans:
        wall_s, siblings = launch_study(home, plan, args)
        print(
            f"  study {plan.name}: seeds {plan.seeds[0]}-{plan.seeds[-1]}"
            + (
                f", {plan.fault} in seed(s) {','.join(map(str, plan.faulty))}"
                if plan.fault
                else f", {' '.join(plan.overrides)} for every seed"
            )
            + f"; sweep wall {wall_s:.0f} s ({load_average()})",
            flush=True,
        )
        uri = tracking.running_server(home / "mlflow")
        if uri is None:
            uri = tracking.start_server(home / "mlflow", port=0)
        study_rows, study_notes = collect(uri, plan)
        for row in study_rows:
            row["alert_siblings"] = siblings.get(row["seed"])
        rows += study_rows
        notes += [f"{plan.name}: {note}" for note in study_notes]
    print()
    print_table(rows)
    for note in notes:
        print(f"  note: {note}")
    counts = summary_counts(rows)
    print(
        f"\nalerts at or before the loss shows the instability: {counts['in_time']} of {counts['shown']}"
        f" (injected runs whose loss the offline analysis shows leaving the band)"
    )
    print(
        f"injected runs the offline analysis does not show: {counts['not_shown']}"
        f" (alerted anyway: {counts['not_shown_alerted']})"
    )
    print(f"false alarms on healthy runs: {counts['false_alarms']} of {counts['healthy']}")
    natural = [r for r in rows if r["kind"] == "natural"]
    if natural:
        print(
            f"natural study: {sum(r['onset_step'] is not None for r in natural)} of {len(natural)} runs shown by the "
            f"offline analysis, {sum(r['alert_step'] is not None for r in natural)} alerted live"
        )


# ---------------------------------------------------------------------------------------------
# --cost


def monitored_job(home: Path, model: str, steps: int, threads: int, every: int, tag: str) -> dict:
    """A job config dict for :func:`polypythia.config.jobconfig.job_config`: checkpoints at 0 and the end only,
    the monitor on every ``every`` steps (0: monitor and spike detection off)."""
    raw = job_dict(home, model, steps, threads, cache_dir=home / "cache", checkpoints=False, study=f"bench-{tag}")
    raw["runs_dir"] = str(home / f"runs-{tag}")  # a fresh run folder: a job never resumes another's checkpoints
    raw["monitor"] = {"every_steps": every, "spikes": every > 0}
    return raw


def timed_run(home: Path, model: str, steps: int, threads: int, every: int, tag: str) -> list[float]:
    """Train once in this process; returns the step seconds."""
    from polypythia.config.jobconfig import job_config
    from polypythia.job import run as job
    from polypythia.train import loop

    raw = monitored_job(home, model, steps, threads, every, tag)
    timer = StepTimer()
    try:
        loop.train(job_config(raw), [timer])
    finally:
        job.teardown()
        shutil.rmtree(raw["runs_dir"], ignore_errors=True)
    return timer.step_seconds()


def cost(args: argparse.Namespace, home: Path) -> None:
    """The monitor's share of the step time, per model (see the module docstring)."""
    for model in args.models.split(","):
        runs: dict[str, list[list[float]]] = {"on": [], "off": []}
        ratios = []
        for round_ in range(args.repeats):
            order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
            for variant in order:
                every = args.every if variant == "on" else 0
                seconds = timed_run(home, model, args.steps, args.threads, every, f"{model}-{variant}-{round_}")
                runs[variant].append(seconds[args.warmup :])
            ratios.append(mean(runs["on"][-1]) / mean(runs["off"][-1]))
            print(
                f"  {model} round {round_ + 1}: mean step on {mean(runs['on'][-1]):.4f} s, off "
                f"{mean(runs['off'][-1]):.4f} s, on/off {ratios[-1]:.4f} ({load_average()})",
                flush=True,
            )
        off = [s for run in runs["off"] for s in run]
        sampled, other = [], []
        for run in runs["on"]:
            for i, s in enumerate(run, start=args.warmup + 1):  # i: the step's number, from 1
                (other if i % args.every else sampled).append(s)
        per_step = (median(sampled) - median(other)) / args.every
        print(
            f"{model}: on/off {median(ratios):.4f} (median of {args.repeats} rounds; all steps pooled: "
            f"{mean([s for run in runs['on'] for s in run]) / mean(off):.4f})"
        )
        print(
            f"{model}: per step {per_step * 1000:.2f} ms = {per_step / median(off):.2%} of a step without the monitor "
            f"(sampled steps {median(sampled):.4f} s, others {median(other):.4f} s, every {args.every} steps)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--detector", action="store_true", help="sweeps with injected instabilities: alerts vs onsets")
    parser.add_argument("--cost", action="store_true", help="time steps with the monitor on vs off")
    parser.add_argument("--home", help="folder to write into (default: a fresh temporary one, removed at the end)")
    group = parser.add_argument_group("--detector")
    group.add_argument("--model", default="tiny", help="conf/model of the sweeps (default tiny)")
    group.add_argument("--healthy", type=int, default=8, help="healthy seeds per study (default 8)")
    group.add_argument("--faulty", type=int, default=1, help="seeds with the fault per study (default 1)")
    group.add_argument(
        "--strengths",
        default="10,100,1000",
        help="learning-rate factors, one study each (default 10,100,1000; '' for none)",
    )
    group.add_argument(
        "--repeat-steps",
        type=int,
        default=10,
        help="steps of repeated-token batches in the repeat study (default 10; 0: no such study)",
    )
    group.add_argument(
        "--natural-lr", type=float, help="add a study without clipping at this peak lr, nothing injected"
    )
    group.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="seeds start after this (default 0: study k has seeds k*(healthy+faulty)+1 ...)",
    )
    group.add_argument(
        "--inject-at", type=int, default=45, help="step the faults start at (default 45, between two decision steps)"
    )
    group.add_argument(
        "--sweep-steps", type=int, default=100, help="steps per run (default 100; budget=smoke otherwise)"
    )
    group.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        help="budget.checkpoint_every_steps, besides the log-spaced ones (default 10)",
    )
    group.add_argument(
        "--cpus-per-job",
        type=float,
        default=0.2,
        help="launcher.num_cpus_per_job (default 0.2: every seed of a study trains at once on 2 cores)",
    )
    group.add_argument("--sweep-timeout", type=int, default=1800, help="seconds one sweep may take (default 1800)")
    group.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override for every sweep (repeatable; default none)",
    )
    group = parser.add_argument_group("--cost")
    group.add_argument("--models", default="tiny,14m", help="comma-separated conf/model names (default tiny,14m)")
    group.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    group.add_argument("--warmup", type=int, default=5, help="first steps of each run left out (default 5)")
    group.add_argument("--repeats", type=int, default=3, help="interleaved rounds of on and off (default 3)")
    group.add_argument("--every", type=int, default=10, help="monitor.every_steps of the 'on' runs (default 10)")
    group.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: nproc)")
    args = parser.parse_args()
    if not (args.cost or args.detector):
        args.cost = args.detector = True
    if args.every < 1:
        parser.error("--every must be at least 1")
    try:
        args.strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--strengths must be comma-separated numbers, got {args.strengths!r}")
    if args.detector:
        if args.healthy < 3 or args.faulty < 1:
            parser.error("--healthy must be at least 3 (the monitor needs 4 runs) and --faulty at least 1")
        if not 1 <= args.inject_at <= args.sweep_steps or any(s <= 0 for s in args.strengths):
            parser.error("--inject-at must lie within --sweep-steps, and --strengths must be positive factors")
        if not (args.strengths or args.repeat_steps or args.natural_lr):
            parser.error("the detector needs a study: --strengths, --repeat-steps or --natural-lr")

    print(machine_description())
    with bench_home("bench-monitor-", args.home) as home:
        if args.detector:
            detector(args, home)
        if args.cost:
            cost(args, home)
        else:
            print("monitor cost: not measured in this run (python benchmarks/bench_monitor.py --cost)")
    print(machine_description())


if __name__ == "__main__":
    main()
