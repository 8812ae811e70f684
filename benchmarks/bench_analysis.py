"""Time each stage of the analysis on a study of PolyPythias size, or a multiple of it.

``--runs 50`` (the default): 5 sizes x 10 seeds, as the study; ``--runs 500``: 5 sizes x 100 seeds.
Every run has 154 checkpoints x 14 weight features (+ validation loss and four task accuracies) and
per-step train/loss and train/grad_norm curves of 143,000 steps. Two seeds of 410m collapse late,
one 70m seed has loss spikes. Prints the seconds per stage, the total, the time to generate the
study and the load average; the target is a minute in all for 500 runs on 2 cores.

The training maps are fitted with the study's settings (EleutherAI/pythia, branch polypythias,
``polypythias/training-maps/training_map.py``: 1..8 states x 5 restart seeds, ``n_iter=10000``,
hmmlearn's default ``tol=0.01``) unless ``--maps-restarts`` or ``--maps-max-states`` say otherwise.

    python benchmarks/bench_analysis.py [--runs 500] [--out DIR] [--final-step 143000] [--no-plots]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from analysis.report import AnalysisOptions, run_analysis
from analysis.synthetic import Collapse, Spike, StudySpec, synthetic_study
from analysis.tidy_table import Study, runs_from_metrics

SIZES = ("14m", "31m", "70m", "160m", "410m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        type=int,
        default=50,
        help="runs in all, a multiple of 5 (5 sizes x runs/5 seeds; default 50, the study's)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary one)")
    parser.add_argument("--final-step", type=int, default=143_000)
    parser.add_argument("--maps-restarts", type=int, default=5, help="HMM restarts per number of states (study: 5)")
    parser.add_argument("--maps-max-states", type=int, default=8, help="largest number of HMM states (study: 8)")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    args = parser.parse_args()
    if args.runs < len(SIZES) or args.runs % len(SIZES):
        parser.error(f"--runs must be a multiple of {len(SIZES)} (one seed count for each of {', '.join(SIZES)})")
    wall = time.perf_counter()
    spec = StudySpec(
        models=SIZES,
        n_seeds=args.runs // len(SIZES),
        final_step=args.final_step,
        collapses=[Collapse("410m", 3, 100_000, 120_000), Collapse("410m", 7, 110_000, None)],
        spikes=[Spike("70m", 2, 50_000), Spike("70m", 2, 90_000, height_sd=15)],
    )
    start = time.perf_counter()
    metrics = synthetic_study(spec)
    study = Study(metrics=metrics, runs=runs_from_metrics(metrics), source="synthetic", kind="table")
    generate_s = time.perf_counter() - start
    print(
        f"study: {len(metrics):,} rows, {metrics['metric'].nunique()} metrics, {len(study.runs)} runs "
        f"(generated in {generate_s:.1f} s)",
        flush=True,
    )
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_analysis_"))
    options = AnalysisOptions(
        n_restarts=args.maps_restarts, max_states=args.maps_max_states, make_plots=not args.no_plots
    )
    start = time.perf_counter()
    result = run_analysis(study, out, options)
    total_s = time.perf_counter() - start
    cpu = result.cpu_seconds_by_stage
    print(f"{'stage':>16}  {'wall':>7}  {'CPU here':>8}")
    for stage, seconds in result.seconds_by_stage.items():
        note = {
            "training_maps": "  (from the start of the analysis: overlaps the stages above)",
            "plots": "  (loss curves and metrics drawn while the HMM fits run, then the maps)",
        }.get(stage, "")
        print(f"{stage:>16}: {seconds:6.1f} s  {cpu.get(stage, 0.0):6.1f} s{note}")
    print(f"{'total':>16}: {total_s:6.1f} s  (analysis; tables, plots and report in {out})")
    print(f"{'with generation':>16}: {time.perf_counter() - wall:6.1f} s")
    print(f"CPU: this process {time.process_time():.1f} s, HMM worker processes {worker_cpu_seconds():.1f} s")
    print(
        f"found: {len(result.spikes)} spikes, {len(result.outliers)} outlier episodes, "
        f"{len(result.maps.departures) if result.maps else 0} seeds departing from their training map; "
        f"states chosen: {chosen_states(result)}"
    )
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {os.cpu_count()} cores")


def worker_cpu_seconds() -> float:
    """CPU seconds of the worker processes that fitted the HMMs (stopped here so that they are counted)."""
    import resource

    from joblib.externals.loky import reusable_executor

    if reusable_executor._executor is not None:
        reusable_executor._executor.shutdown(wait=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def chosen_states(result) -> str:
    """'14m 4, 31m 4, ...': the number of HMM states each size's map uses."""
    if result.maps is None:
        return "-"
    return ", ".join(f"{row.model} {row.n_states}" for row in result.maps.chosen().itertuples())


if __name__ == "__main__":
    main()
