"""Command line: ``python -m analysis <source> [--out DIR]``, and ``python -m analysis power ...``.

Without ``--out`` (or with ``--summary``) it prints the final-loss summary of a sweep; with
``--out`` it runs the whole analysis into that folder. User errors print one sentence and exit 2.
A first argument ``power`` runs :mod:`analysis.power_cli` (how many seeds); a study literally named
``power`` is ``python -m analysis -- power`` (or ``./power`` for a folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from analysis.errors import AnalysisError
from polypythia.tracking.client import default_tracking_uri

EPILOG = """\
source is auto-detected:
  a folder          lm-evaluation-harness results laid out as PolyPythias published them (v0.4),
                    pythia-<size>[-seed<k>]/step<S>/.../results_<timestamp>.json, or as the Pythia
                    suite did (v0.3, EleutherAI/pythia evals/pythia-v1/), pythia-<size>[-deduped]/
                    zero-shot/<name>_step<S>.json; no -seed<k> = seed 0, the original Pythia run
                    (a folder without such files: its name, as an MLflow experiment name)
  a .csv/.tsv file  tidy table with columns model, seed, step, metric, value
  anything else     an MLflow experiment name (--tracking-uri, MLFLOW_TRACKING_URI or the local server)

examples:
  python -m analysis my-study --tracking-uri http://127.0.0.1:5050            # final-loss summary
  python -m analysis my-study --parent-run 3f2a... --out results/my-study     # full analysis
  python -m analysis polypythias-evals/ --out results/evals --tasks arc_easy piqa
  python -m analysis study.csv --out results/csv --metrics 'train/*' 'weights/*'
  python -m analysis training_maps.tsv --out results/map --outlier-metric score --steps polypythias
  python -m analysis polypythias-evals/ --check --steps polypythias              # integrity (exit 1: problems)
  python -m analysis power --effect 1                                  # seeds per arm (see: power --help)

outliers: a run starts an outlier episode where its distance from the other runs (leave-one-out,
their SD pooled over recent checkpoints) exceeds the level that healthy studies of the same shape
exceed with probability --false-alarm-rate; the study's +/-2 SD band deviation is a column of
outliers.csv. See docs/analysis.md for the method and its measured false-alarm and detection rates.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Cross-seed analysis of a polypythia study: "
        "statistics, loss spikes, outlier runs, training maps, plots and a report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="MLflow experiment name, folder of lm-eval results, or .csv/.tsv file")
    p.add_argument("--out", type=Path, help="folder for the tables, plots and report.md (omit: print the summary)")
    p.add_argument("--summary", action="store_true", help="print the final train/loss summary (also with --out)")
    p.add_argument(
        "--tracking-uri",
        default=default_tracking_uri(),
        help="MLflow tracking URI (default: env MLFLOW_TRACKING_URI, else the local server "
        "that sweeps started under $POLYPYTHIA_HOME, i.e. .polypythia/mlflow)",
    )
    p.add_argument("--parent-run", help="restrict to the child runs of this sweep's parent run id")
    p.add_argument("--metrics", nargs="+", help="metrics to read/keep; 'prefix/*' matches a prefix (default: all)")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="tasks of the standardised accuracy (default: arc_easy lambada_openai piqa sciq)",
    )
    p.add_argument("--map-features", nargs="+", help="features of the training maps (default: every weights/* metric)")
    p.add_argument(
        "--steps",
        help="keep only these steps: a comma list (0,1,2,512) or 'polypythias' (the study's 27 evaluation checkpoints)",
    )
    p.add_argument("--model", help="model name for a table without a model column (default: a size in the file name)")
    p.add_argument(
        "--outlier-metric",
        action="append",
        metavar="NAME",
        help="judge outlier runs on this metric as it is (repeatable; default: the standardised "
        "accuracy when task accuracies are present, and valid/loss; failing both, every "
        "continuous checkpoint metric); the rule does not depend on the metric's scale",
    )
    p.add_argument(
        "--false-alarm-rate",
        type=float,
        default=0.001,
        help="chance that a study of healthy runs of the same shape has any outlier episode, per "
        "model and metric; sets the decision threshold (default 0.001)",
    )
    p.add_argument(
        "--band-sd",
        type=float,
        default=2.0,
        help="the study's band in SDs: an episode lasts while the run is beyond it (default 2)",
    )
    p.add_argument(
        "--mad-threshold", type=float, default=3.5, help="robust z-score limit of the final-loss rule (default 3.5)"
    )
    p.add_argument(
        "--min-checkpoints",
        type=int,
        default=1,
        help="checkpoints beyond the threshold needed to start an episode (default 1)",
    )
    p.add_argument("--spike-window", type=int, default=1000, help="rolling window of the spike score, in values")
    p.add_argument("--spike-threshold", type=float, default=7.0, help="spike threshold in rolling SDs (default 7)")
    p.add_argument("--max-states", type=int, default=8, help="largest number of HMM states tried (default 8)")
    p.add_argument(
        "--restarts",
        type=int,
        default=5,
        help="HMM restarts per number of states: the first N of the PolyPythias random states "
        "5329 2332 4642 6432 4754 (default 5)",
    )
    p.add_argument("--states", type=int, help="fit the training maps with exactly N HMM states (default: choose)")
    p.add_argument(
        "--map-criterion",
        choices=("bic", "aic", "ll"),
        default="bic",
        help="how the number of HMM states is chosen on the held-out checkpoint rows: lowest BIC "
        "(default), lowest AIC, or highest log-likelihood",
    )
    p.add_argument(
        "--map-heldout-fraction",
        type=float,
        default=0.2,
        help="share of checkpoint rows held out to choose the number of states (default 0.2)",
    )
    p.add_argument("--map-split-seed", type=int, default=2546, help="random state of that split (default 2546)")
    p.add_argument(
        "--map-steps",
        help="decode and draw the maps only at these steps: a comma list or 'polypythias' (default: every checkpoint)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the bootstraps (default 0)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-mlflow-log", action="store_true", help="do not log the output folder to MLflow")
    p.add_argument(
        "--replay",
        action="store_true",
        help="replay the study in step order, each decision from data up to that step only, as the "
        "live monitor would have: print each run's first alert and its lead time over the "
        "offline outlier onset (and write alerts.csv into --out)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check the integrity of the study's artefacts instead: missing checkpoints, identical "
        "neighbouring checkpoints, checkpoints not descended from their run's step 0 (checkpoint "
        "folders), lm-eval files naming another model; prints a table and writes check.csv (into "
        "--out, else the current folder). Exit code 0: nothing found, 1: problems found, 2: user error",
    )
    return p


def options_from(args):
    from analysis.load import parse_steps
    from analysis.outliers import DEFAULT_TASKS, OutlierRule
    from analysis.report import AnalysisOptions

    if not 0 < args.map_heldout_fraction < 1 or (args.states is not None and args.states < 1) or args.restarts < 1:
        raise AnalysisError(
            "--map-heldout-fraction must lie between 0 and 1 (the study: 0.2), and --states and "
            "--restarts must be at least 1."
        )
    if args.max_states < 1 or args.spike_window < 2 or args.min_checkpoints < 1:
        raise AnalysisError(
            f"--max-states ({args.max_states}) and --min-checkpoints ({args.min_checkpoints}) must be "
            f"at least 1 and --spike-window ({args.spike_window}) at least 2 (a rolling SD needs two "
            "values); the defaults are 8, 1 and 1000."
        )
    rule = OutlierRule(
        false_alarm_rate=args.false_alarm_rate, band_sd=args.band_sd, min_checkpoints=args.min_checkpoints
    )
    return AnalysisOptions(
        tasks=tuple(args.tasks or DEFAULT_TASKS),
        outlier_metrics=args.outlier_metric,
        outlier_rule=rule,
        mad_threshold=args.mad_threshold,
        spike_window_values=args.spike_window,
        spike_threshold_sd=args.spike_threshold,
        map_features=args.map_features,
        max_states=args.max_states,
        n_restarts=args.restarts,
        map_states=args.states,
        map_criterion=args.map_criterion,
        map_heldout_fraction=args.map_heldout_fraction,
        map_split_seed=args.map_split_seed,
        map_steps=None if args.map_steps is None else parse_steps(args.map_steps),
        random_state=args.seed,
        make_plots=not args.no_plots,
    )


def is_file_source(source: str) -> bool:
    """Whether the source is a folder of lm-eval results or a table file rather than an MLflow experiment."""
    from analysis.load import choose_source

    return choose_source(source).kind != "mlflow"


def check_out(out: Path | None) -> None:
    """``--out`` must be a folder, or a path where one can be made: before anything is loaded."""
    if out is None:
        return
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing == out and not out.is_dir():
        raise AnalysisError(
            f"--out {out} is a file, not a folder; give a folder for the tables, plots and report "
            "(it is made when missing)."
        )
    if not existing.is_dir():
        raise AnalysisError(f"--out {out} cannot be made: {existing} is a file, not a folder; give another --out.")


def summarise(args) -> None:
    """Print the final-loss summary of the source."""
    from rich.console import Console

    from analysis.load import choose_source, load_study, read_as_experiment
    from analysis.summary import final_loss_summary, print_summary, summary_table

    choice = choose_source(args.source)
    if choice.kind == "mlflow":
        with read_as_experiment(choice):
            print_summary(args.tracking_uri, choice.name, args.parent_run)
        if choice.note:
            print(choice.note, file=sys.stderr, flush=True)
        return
    study = load_study(args.source, steps=args.steps, model=args.model)
    if not (study.metrics["metric"] == "train/loss").any():  # evaluations only: say what was read
        Console().print(contents_table(study))  # the loader has logged its notes
        return
    Console().print(summary_table(final_loss_summary(study.metrics, study.runs), f"Final train/loss of {args.source}"))
    from analysis.replicates import floor_lines

    for line in floor_lines(study.floor) if study.floor is not None else []:
        print(line)


def contents_table(study):
    """What a source without train/loss (a folder of evaluations) holds: per model and run, its steps and metrics."""
    from rich.table import Table

    table = Table(title=f"{study.source}: no train/loss to summarise; read (--out DIR runs the analysis)")
    for column in ("model", "run", "steps", "first-last step", "metrics"):
        table.add_column(column, justify="left" if column in ("model", "run") else "right")
    grouped = study.metrics.groupby(["model", "seed"], observed=True, sort=True)
    for (model, seed), rows in grouped:
        steps = rows["step"]
        table.add_row(
            str(model), str(seed), str(steps.nunique()), f"{steps.min()}-{steps.max()}", str(rows["metric"].nunique())
        )
    return table


def analyse(args) -> None:
    """Run the whole analysis into ``args.out``."""
    from rich.console import Console

    from analysis.load import load_study
    from analysis.report import run_analysis

    console = Console(stderr=True)
    with console.status(f"Loading {args.source} ..."):
        study = load_study(
            args.source,
            tracking_uri=args.tracking_uri,
            parent_run_id=args.parent_run,
            metrics=args.metrics,
            steps=args.steps,
            model=args.model,
        )
    with console.status("Analysing ..."):
        result = run_analysis(study, args.out, options_from(args), log_to_mlflow=not args.no_mlflow_log)
    console.print(
        f"Wrote {result.out_dir / 'report.md'} ({len(result.outliers)} outlier episodes, {len(result.spikes)} spikes)."
    )
    for note in study.notes:
        console.print(note)


def replay_study(args) -> None:
    """The causal replay: alerts per run and signal, with lead times; alerts.csv into ``args.out``."""
    from rich.console import Console
    from rich.table import Table

    from analysis.load import load_study
    from analysis.outliers import find_outliers
    from analysis.replay import replay
    from analysis.report import standardised_score

    options = options_from(args)
    study = load_study(
        args.source,
        tracking_uri=args.tracking_uri,
        parent_run_id=args.parent_run,
        metrics=args.metrics,
        steps=args.steps,
        model=args.model,
    )
    score = standardised_score(study.metrics, options.tasks)
    outliers = find_outliers(
        study.metrics, options.tasks, options.outlier_metrics, options.outlier_rule, options.mad_threshold, score=score
    )
    alerts = replay(study.metrics, outliers, options.outlier_metrics, options.outlier_rule, score=score)
    table = Table(title=f"Causal replay of {args.source}: first alert per run and signal")
    for column in ("model", "run", "signal", "alert step", "deviation (SD)", "outlier onset", "lead (steps)"):
        table.add_column(column, justify="right" if column not in ("model", "run", "signal") else "left")
    for row in alerts.itertuples():
        onset = "-" if row.onset_step is pd.NA else str(row.onset_step)
        lead = "-" if row.lead_steps is pd.NA else str(row.lead_steps)
        table.add_row(row.model, row.seed, row.signal, str(row.alert_step), f"{row.deviation_sd:.1f}", onset, lead)
    console = Console()
    console.print(table if len(alerts) else no_alert_line(args.source, study))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        alerts.to_csv(args.out / "alerts.csv", index=False)
        console.print(f"Wrote {args.out / 'alerts.csv'}.")


def no_alert_line(source: str, study) -> str:
    """What a replay without alerts says: that the runs stayed together, or that there was nothing to compare."""
    sizes = study.runs.groupby("model", observed=True).size() if len(study.runs) else pd.Series(dtype=int)
    if sizes.empty or sizes.max() < 2:
        return (
            f"No alert in {source}: it holds one run per model, and a run cannot be compared with siblings it does "
            "not have; the replay needs two or more seeds of a model."
        )
    lone = [str(m) for m, n in sizes.items() if n < 2]
    also = f" (model(s) {', '.join(lone)} have one run, with no sibling to compare)" if lone else ""
    return f"No alert in {source}: every run stayed with its siblings{also}."


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["power"]:  # the subcommand; a study named "power": python -m analysis -- power
        from analysis.power_cli import main as power_main

        return power_main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        options_from(args)  # a bad option is an error before anything is loaded
        check_out(args.out)
        if args.check:
            from analysis.check import check

            return check(args)
        if args.replay:
            replay_study(args)
            return 0
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
