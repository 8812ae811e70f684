"""Command line: ``python -m analysis <source> [--out DIR]``, and ``python -m analysis power ...``.

Without ``--out`` (or with ``--summary``) it prints the final-loss summary of a sweep; with
``--out`` it runs the whole analysis into that folder. User errors print one sentence and exit 2.
A first argument ``power`` runs :mod:`analysis.power_cli` (how many seeds); a study literally named
``power`` is ``python -m analysis -- power`` (or ``./power`` for a folder). The arguments and the
options they give are in :mod:`analysis.cli`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd

from analysis.cli import options_from, parser
from analysis.errors import AnalysisError


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
