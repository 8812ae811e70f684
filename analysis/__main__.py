"""Command line: ``python -m analysis <source> [--out DIR]``.

Without ``--out`` (or with ``--summary``) it prints the final-loss summary of a sweep; with
``--out`` it runs the whole analysis into that folder. User errors print one sentence and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from analysis.errors import AnalysisError
from polypythia.tracking import default_tracking_uri

EPILOG = """\
source is auto-detected:
  a folder          lm-evaluation-harness v0.4 results laid out as
                    pythia-<size>[-seed<k>]/step<S>/.../results_<timestamp>.json
  a .csv/.tsv file  tidy table with columns model, seed, step, metric, value
  anything else     an MLflow experiment name (--tracking-uri, MLFLOW_TRACKING_URI or the local server)

examples:
  python -m analysis my-study --tracking-uri http://127.0.0.1:5050            # final-loss summary
  python -m analysis my-study --parent-run 3f2a... --out results/my-study     # full analysis
  python -m analysis polypythias-evals/ --out results/evals --tasks arc_easy piqa
  python -m analysis study.csv --out results/csv --metrics 'train/*' 'weights/*'
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description="Cross-seed analysis of a polypythia study: "
                                "statistics, loss spikes, outlier runs, training maps, plots and a report.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="MLflow experiment name, folder of lm-eval results, or .csv/.tsv file")
    p.add_argument("--out", type=Path, help="folder for the tables, plots and report.md (omit: print the summary)")
    p.add_argument("--summary", action="store_true", help="print the final train/loss summary (also with --out)")
    p.add_argument("--tracking-uri", default=default_tracking_uri(),
                   help="MLflow tracking URI (default: env MLFLOW_TRACKING_URI, else the local server "
                        "that sweeps started under $POLYPYTHIA_HOME, i.e. .polypythia/mlflow)")
    p.add_argument("--parent-run", help="restrict to the child runs of this sweep's parent run id")
    p.add_argument("--metrics", nargs="+", help="metrics to read/keep; 'prefix/*' matches a prefix (default: all)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="tasks of the standardised accuracy (default: arc_easy lambada_openai piqa sciq)")
    p.add_argument("--map-features", nargs="+", help="features of the training maps (default: every weights/* metric)")
    p.add_argument("--band-sd", type=float, default=2.0, help="outlier band half-width in SDs (default 2)")
    p.add_argument("--mad-threshold", type=float, default=3.5, help="robust z-score limit of the MAD rule (default 3.5)")
    p.add_argument("--min-checkpoints", type=int, default=3,
                   help="consecutive checkpoints outside the band that make an outlier episode (default 3)")
    p.add_argument("--spike-window", type=int, default=1000, help="rolling window of the spike score, in values")
    p.add_argument("--spike-threshold", type=float, default=7.0, help="spike threshold in rolling SDs (default 7)")
    p.add_argument("--max-states", type=int, default=8, help="largest number of HMM states tried (default 8)")
    p.add_argument("--restarts", type=int, default=3, help="random restarts per number of HMM states (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed of bootstraps and HMM fits (default 0)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-mlflow-log", action="store_true", help="do not log the output folder to MLflow")
    return p


def options_from(args):
    from analysis.outliers import DEFAULT_TASKS
    from analysis.report import AnalysisOptions

    return AnalysisOptions(
        tasks=tuple(args.tasks or DEFAULT_TASKS), band_sd=args.band_sd, mad_threshold=args.mad_threshold,
        min_checkpoints=args.min_checkpoints, spike_window_values=args.spike_window,
        spike_threshold_sd=args.spike_threshold, map_features=args.map_features, max_states=args.max_states,
        n_restarts=args.restarts, random_state=args.seed, make_plots=not args.no_plots)


def is_file_source(source: str) -> bool:
    path = Path(source)
    return path.exists() or path.suffix.lower() in (".csv", ".tsv")


def summarise(args) -> None:
    """Print the final-loss summary of the source."""
    from rich.console import Console

    from analysis.load import load_study
    from analysis.summary import final_loss_summary, print_summary, summary_table

    if not is_file_source(args.source):
        print_summary(args.tracking_uri, args.source, args.parent_run)
        return
    study = load_study(args.source)
    Console().print(summary_table(final_loss_summary(study.metrics, study.runs), f"Final train/loss of {args.source}"))


def analyse(args) -> None:
    """Run the whole analysis into ``args.out``."""
    from rich.console import Console

    from analysis.load import load_study
    from analysis.report import run_analysis

    console = Console(stderr=True)
    with console.status(f"Loading {args.source} ..."):
        study = load_study(args.source, tracking_uri=args.tracking_uri, parent_run_id=args.parent_run,
                           metrics=args.metrics)
    with console.status("Analysing ..."):
        result = run_analysis(study, args.out, options_from(args), log_to_mlflow=not args.no_mlflow_log)
    console.print(f"Wrote {result.out_dir / 'report.md'} ({len(result.outliers)} outlier episodes, "
                  f"{len(result.spikes)} spikes).")
    for note in study.notes:
        console.print(note)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.out is None or args.summary:
            summarise(args)
        if args.out is not None:
            analyse(args)
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
