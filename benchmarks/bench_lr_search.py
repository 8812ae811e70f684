"""The learning-rate search behind the laptop study: at which peak learning rate do some seeds, but
not all, of a small GPT-NeoX go unstable by themselves?

Each cell of the grid is (a learning rate, a variant: a named set of Hydra overrides such as no
warmup or no gradient clipping) trained for a few seeds through the product's own job path: one
``launch.py -m`` sweep per cell (real Ray, DeepSpeed and MLflow), the cell's own study name
``lrs-<variant>-lr<lr>``, one fresh ``POLYPYTHIA_HOME`` (``--home``) for every cell. Nothing is
injected and nothing is seed-specific.

Whether a run went unstable is decided by the product's analysis of the finished cell, never by
eye (:func:`unstable_runs`); a run is unstable when any of these holds:

  diverged   its MLflow run ended in a non-finite loss or not FINISHED (``analysis.load``); every
             cell trains with ``train.loss_ceiling`` = ln(vocabulary), the loss of a uniform guess,
             and ``train.loss_ceiling_steps=50``, so a run that stays worse than chance for 50
             steps is stopped by the job's own divergence check (``polypythia.train.guards``)
  outlier    an outlier episode against its sibling seeds in the same cell: the calibrated
             trajectory rule of ``analysis.outliers.find_outliers`` on ``valid/loss`` at every
             checkpoint, or its final-value MAD rule (5 or more seeds), both with the defaults of
             ``python -m analysis``; the trajectory rule decides only with 4 or more seeds (its
             ``min_runs``), so a cell of 3 seeds is judged by the other two rules alone
  spike      a loss spike of ``train/loss`` (``analysis.spikes.find_spikes``) upwards, with the
             rule OLMo-core's live monitor uses (6 SD above the mean of the previous 128 values;
             ``--spike-window``, ``--spike-sd``): the analysis's own default window of 1,000
             values never fills in a run of a few hundred steps

Printed per cell and written to ``<home>/lr_search.csv`` (one row per run, rewritten after each
cell): the fraction of seeds unstable and why, the median final ``train/loss`` (mean of the last
1% of steps, ``analysis.summary.final_values``) and the largest attention logit any run logged
(``monitor/attn_logit_max``, Wortsman et al. 2023's signal, sampled every ``monitor.every_steps``).

Resumable: a seed that already has a FINISHED or FAILED run in its cell's MLflow experiment under
``--home`` is not trained again, so rerunning the same command only analyses, and adding seeds
(``--seeds 1-9``) trains only the new ones.

    nice -n 15 python benchmarks/bench_lr_search.py --home /tmp/lrs --lrs 0.01,0.1,1 --seeds 1-4
    nice -n 15 python benchmarks/bench_lr_search.py --home /tmp/lrs --lrs 0.3 \\
        --variant "nowarmup-noclip: budget.warmup_fraction=0 train.gradient_clipping=0" --seeds 1-4
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO, child_env, load_average, machine_description

UNSTABLE_COLUMNS = [
    "cell",
    "variant",
    "lr",
    "seed",
    "status",
    "unstable",
    "reasons",
    "final_train_loss",
    "train_loss_max",
    "attn_logit_max",
    "grad_norm_max",
]
SEARCH_METRICS = ["train/loss", "train/grad_norm", "valid/loss", "monitor/attn_logit_max"]
DONE_STATUSES = ("FINISHED", "FAILED")


@dataclass(frozen=True)
class Cell:
    """One grid cell: a learning rate under a variant's overrides."""

    lr: float
    variant: str = "base"
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def study(self) -> str:
        return f"lrs-{self.variant}-lr{self.lr:g}"


def parse_seeds(text: str) -> list[int]:
    """``1-3`` or ``1,2,5`` (or a mix) -> sorted distinct seeds."""
    seeds: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        seeds.update(range(int(low), int(high or low) + 1))
    return sorted(seeds)


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """``"name: key=value key=value"`` -> (name, overrides)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"a variant is 'NAME: KEY=VALUE ...' with a NAME of letters, digits, - and _; got {text!r}")
    return name, tuple(rest.split())


# ---------------------------------------------------------------------------------------------
# The decision (pure: a Study in, a verdict per run out; tests/test_lr_search.py feeds it synthetic curves)


def unstable_runs(study, spike_window: int = 128, spike_sd: float = 6.0) -> dict[str, list[str]]:
    """Per run label (seed) of ``study`` (an :class:`analysis.tidy_table.Study` of one cell), the reasons it
    counts as unstable (empty: stable); see the module docstring for the three rules."""
    from analysis.outliers import find_outliers
    from analysis.spikes import find_spikes

    reasons: dict[str, list[str]] = {str(run.seed): [] for run in study.runs.itertuples()}
    for run in study.runs.itertuples():
        if run.diverged or run.status != "FINISHED":
            reasons[str(run.seed)].append("diverged" if run.diverged else f"status {run.status}")
    for row in find_outliers(study.metrics).itertuples():  # the defaults of python -m analysis
        reasons.setdefault(str(row.seed), []).append(
            f"outlier {row.metric} {row.rule} at {row.onset_step} ({row.onset_deviation_sd:+.1f} SD)"
        )
    _, spikes = find_spikes(
        study.metrics, spike_metrics=("train/loss",), window_values=spike_window, threshold_sd=spike_sd
    )
    for row in spikes[spikes["height_sd"] > 0].itertuples():
        reasons.setdefault(str(row.seed), []).append(f"loss spike at {row.step} ({row.height_sd:+.1f} SD)")
    return reasons


def run_rows(cell: Cell, study, spike_window: int, spike_sd: float) -> list[dict]:
    """One CSV row per run of a finished cell: its verdict, final loss and largest signals."""
    from analysis.summary import final_values

    reasons = unstable_runs(study, spike_window, spike_sd)
    metrics = study.metrics.astype({"seed": str, "metric": str})

    def per_seed(name: str, how: str) -> dict[str, float]:
        rows = metrics[metrics["metric"] == name]
        if rows.empty:
            return {}
        if how == "final":
            return dict(zip(*final_values(rows)[["seed", "value"]].to_numpy().T))
        return rows.groupby("seed")["value"].max().to_dict()

    final, peak = per_seed("train/loss", "final"), per_seed("train/loss", "max")
    attn, grad = per_seed("monitor/attn_logit_max", "max"), per_seed("train/grad_norm", "max")
    status = {str(r.seed): r.status for r in study.runs.itertuples()}
    return [
        {
            "cell": cell.study,
            "variant": cell.variant,
            "lr": cell.lr,
            "seed": seed,
            "status": status.get(seed, "?"),
            "unstable": bool(why),
            "reasons": "; ".join(why),
            "final_train_loss": final.get(seed, float("nan")),
            "train_loss_max": peak.get(seed, float("nan")),
            "attn_logit_max": attn.get(seed, float("nan")),
            "grad_norm_max": grad.get(seed, float("nan")),
        }
        for seed, why in sorted(reasons.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0)
    ]


# ---------------------------------------------------------------------------------------------
# Training the cells


def done_seeds(uri: str | None, study: str) -> set[int]:
    """Seeds of ``study`` that already have a FINISHED or FAILED job run (none when it does not exist yet)."""
    if uri is None:
        return set()
    from analysis.errors import AnalysisError
    from analysis.mlflow_load import find_experiment, mlflow_client, runs_table
    from polypythia.study import search_job_runs

    try:
        client, _ = mlflow_client(uri)
        experiment = find_experiment(client, study)
    except AnalysisError:
        return set()
    table = runs_table(search_job_runs(client, experiment.experiment_id))
    return {int(r.weight_seed) for r in table.itertuples() if r.status in DONE_STATUSES}


def launch_cell(home: Path, cell: Cell, seeds: list[int], args: argparse.Namespace) -> float:
    """Train ``seeds`` of ``cell`` with one ``launch.py -m`` sweep; returns its wall seconds."""
    cpus = max(math.floor(args.cpus / len(seeds) * 1e4) / 1e4, 0.01)  # Ray schedules in steps of 0.0001
    cmd = [
        sys.executable,
        str(REPO / "launch.py"),
        "-m",
        "seed=" + ",".join(map(str, seeds)),
        f"model={args.model}",
        f"budget={args.budget}",
        f"model.lr={cell.lr:g}",
        f"study={cell.study}",
        f"data.vocab_size={args.vocab}",
        f"train.loss_ceiling={math.log(args.vocab):.2f}",
        "train.loss_ceiling_steps=50",
        f"launcher.num_cpus_per_job={cpus:g}",
        "train.threads=1",
        "launcher.progress=false",
        "tracking.system_metrics=false",
        *args.override,
        *cell.overrides,
    ]
    env = child_env(home)
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # the home's own server, a local Ray runtime
        env.pop(key, None)
    started = time.time()
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=args.cell_timeout)
    if proc.returncode != 0:  # a diverged run fails its job: reported, and the cell is still analysed
        tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-6:]
        print(f"  note: the sweep of {cell.study} exited with {proc.returncode}; its last lines:", flush=True)
        for line in tail:
            print("    " + line.strip()[:200], flush=True)
    return time.time() - started


def tracking_uri(home: Path, start: bool) -> str | None:
    """The home's MLflow server (started when ``start`` and not running)."""
    from polypythia.tracking import client as tracking

    uri = tracking.running_server(home / "mlflow")
    if uri is None and start:
        uri = tracking.start_server(home / "mlflow", port=0)
    return uri


def search_cell(home: Path, cell: Cell, args: argparse.Namespace) -> list[dict]:
    """Train the cell's missing seeds, then judge every run of the cell."""
    from analysis.load import load_study

    missing = [s for s in args.seeds if s not in done_seeds(tracking_uri(home, start=False), cell.study)]
    wall = launch_cell(home, cell, missing, args) if missing else 0.0
    study = load_study(cell.study, tracking_uri=tracking_uri(home, start=True), metrics=SEARCH_METRICS)
    rows = [r for r in run_rows(cell, study, args.spike_window, args.spike_sd) if int(r["seed"]) in args.seeds]
    trained = f"trained seeds {','.join(map(str, missing))} in {wall:.0f} s" if missing else "all seeds already trained"
    print(f"  {cell.study}: {trained} ({load_average()})", flush=True)
    for row in rows:
        if row["unstable"]:
            print(f"    seed {row['seed']}: {row['reasons']}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Output


def finite(rows: list[dict], key: str) -> list[float]:
    """The finite values of ``key`` over ``rows`` (fresh rows hold floats, rows read back from the CSV text)."""
    values = [float(r[key]) for r in rows if str(r[key]) not in ("", "None")]
    return [v for v in values if math.isfinite(v)]


def cell_summary(rows: list[dict]) -> dict:
    """Per cell: seeds, how many unstable, the medians of the final and the peak train loss over seeds,
    and the largest attention logit of any seed."""
    import statistics

    def median(key: str) -> float:
        values = finite(rows, key)
        return statistics.median(values) if values else float("nan")

    return {
        "n": len(rows),
        "unstable": sum(str(r["unstable"]) == "True" for r in rows),
        "final": median("final_train_loss"),
        "peak": median("train_loss_max"),
        "attn": max(finite(rows, "attn_logit_max"), default=float("nan")),
    }


def print_table(rows: list[dict]) -> None:
    """One line per cell of ``rows`` (every cell in the home's CSV, in the order they were searched)."""
    print(
        f"\n  {'variant':<28} {'lr':>7}  {'unstable':>9}  {'final train/loss':>16}  {'peak train/loss':>15}  "
        f"{'max attn logit':>14}"
    )
    for study in dict.fromkeys(r["cell"] for r in rows):
        mine = [r for r in rows if r["cell"] == study]
        s = cell_summary(mine)
        print(
            f"  {mine[0]['variant']:<28} {float(mine[0]['lr']):>7g}  {s['unstable']:>4}/{s['n']:<4}  "
            f"{s['final']:>16.3f}  {s['peak']:>15.2f}  {s['attn']:>14.3g}"
        )
    print("  (final and peak train/loss: medians over the cell's seeds; max attn logit: the largest of any seed)")


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=UNSTABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--home", required=True, help="folder for every cell's runs and MLflow (kept: resumable)")
    parser.add_argument("--lrs", default="0.01,0.1,1", help="comma-separated peak learning rates (default 0.01,0.1,1)")
    parser.add_argument(
        "--seeds", default="1-4", help="seeds per cell, e.g. 1-4 or 1,2,5 (default 1-4: the outlier rule's least)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'NAME: KEY=VALUE ...'",
        help="a named set of Hydra overrides; repeatable (default: one variant 'base' with none)",
    )
    parser.add_argument("--model", default="14m-hot", help="conf/model (default 14m-hot)")
    parser.add_argument("--budget", default="laptop", help="conf/budget (default laptop)")
    parser.add_argument(
        "--vocab",
        type=int,
        default=2048,
        help="data.vocab_size of the embedded tokenizer (default 2048, as experiment=laptop)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override for every cell (repeatable)",
    )
    parser.add_argument(
        "--cpus",
        type=float,
        default=2.0,
        help="Ray CPUs shared by a cell's seeds (default 2: all seeds of a cell at once, 1 thread each)",
    )
    parser.add_argument("--spike-window", type=int, default=128, help="loss-spike window in values (default 128)")
    parser.add_argument("--spike-sd", type=float, default=6.0, help="loss-spike threshold in SDs (default 6)")
    parser.add_argument("--cell-timeout", type=int, default=3600, help="seconds one cell's sweep may take")
    args = parser.parse_args()
    try:
        args.seeds = parse_seeds(args.seeds)
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
        variants = [parse_variant(v) for v in args.variant] or [("base", ())]
    except ValueError as error:
        parser.error(str(error))
    if not lrs or any(lr <= 0 for lr in lrs) or not args.seeds:
        parser.error("--lrs must be positive learning rates and --seeds at least one seed")
    home = Path(args.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    cells = [Cell(lr, name, overrides) for name, overrides in variants for lr in lrs]
    print(machine_description())
    print(
        f"lr search: {args.model}, budget={args.budget}, seeds {args.seeds}, {len(cells)} cells; home {home}",
        flush=True,
    )
    lock = open(home / "bench.lock", "w")
    try:  # one search per home: a second one would relaunch the first one's running seeds and stop its server
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        parser.error(f"another bench_lr_search.py is using {home}; wait for it to end or give another --home")
    csv_path = home / "lr_search.csv"
    previous = list(csv.DictReader(open(csv_path))) if csv_path.exists() else []
    mine = {c.study for c in cells}
    rows = [r for r in previous if r["cell"] not in mine]
    try:
        for cell in cells:
            rows += search_cell(home, cell, args)
            write_csv(csv_path, rows)
    finally:
        from polypythia.tracking import client as tracking

        tracking.stop_server(home / "mlflow")
    print_table(rows)
    print(f"\nper-run rows: {csv_path}")
    print(machine_description())


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
