"""The command line's arguments (:func:`parser`, one group per part of the analysis) and the analysis
options they give (:func:`options_from`), checked before anything is loaded; :mod:`analysis.__main__` runs them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.errors import AnalysisError
from polypythia.tracking.client import default_tracking_uri

EPILOG = """\
source is auto-detected:
  a folder          lm-evaluation-harness results laid out as PolyPythias published them (v0.4),
                    pythia-<size>[-seed<k>]/step<S>/.../results_<timestamp>.json, or as the Pythia
                    suite did (v0.3, EleutherAI/pythia evals/pythia-v1/), pythia-<size>[-deduped]/
                    zero-shot/<name>_step<S>.json; no -seed<k> = seed 0, the original Pythia run
                    (a folder without such files: its name, as an MLflow experiment name)
  a .csv/.tsv file  tidy table with columns model, seed, step, metric, value, or a wide one:
                    seed, step and one column per metric (no model column: --model, else the size in the file name)
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
    """The command line, one argument group per part of the analysis (``--help`` lists them so)."""
    p = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Cross-seed analysis of a polypythia study: "
        "statistics, loss spikes, outlier runs, training maps, plots and a report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_source_arguments(p)
    add_mode_arguments(p.add_argument_group("instead of the summary and the analysis"))
    add_outlier_arguments(p.add_argument_group("outlier runs"))
    add_spike_arguments(p.add_argument_group("loss spikes"))
    add_map_arguments(p.add_argument_group("training maps (HMM)"))
    return p


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """What to read (source, tracking server, metrics, steps) and where to write."""
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
        "--steps",
        help="keep only these steps: a comma list (0,1,2,512) or 'polypythias' (the study's 27 evaluation checkpoints)",
    )
    p.add_argument("--model", help="model name for a table without a model column (default: a size in the file name)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the bootstraps (default %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-mlflow-log", action="store_true", help="do not log the output folder to MLflow")


def add_mode_arguments(group) -> None:
    """The two other things the command does with a study: replay it as the live monitor would, check it."""
    group.add_argument(
        "--replay",
        action="store_true",
        help="replay the study in step order, each decision from data up to that step only, as the "
        "live monitor would have: print each run's first alert and its lead time over the "
        "offline outlier onset (and write alerts.csv into --out)",
    )
    group.add_argument(
        "--check",
        action="store_true",
        help="check the integrity of the study's artefacts instead: missing checkpoints, identical "
        "neighbouring checkpoints, checkpoints not descended from their run's step 0 (checkpoint "
        "folders), lm-eval files naming another model; prints a table and writes check.csv (into "
        "--out, else the current folder). Exit code 0: nothing found, 1: problems found, 2: user error",
    )


def add_outlier_arguments(group) -> None:
    """Which metrics judge a run an outlier, and the rule's knobs (docs/analysis.md)."""
    group.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="tasks of the standardised accuracy (default: arc_easy lambada_openai piqa sciq)",
    )
    group.add_argument(
        "--outlier-metric",
        action="append",
        metavar="NAME",
        help="judge outlier runs on this metric as it is (repeatable; default: the standardised "
        "accuracy when task accuracies are present, and valid/loss; failing both, every "
        "continuous checkpoint metric); the rule does not depend on the metric's scale",
    )
    group.add_argument(
        "--false-alarm-rate",
        type=float,
        default=0.001,
        help="chance that a study of healthy runs of the same shape has any outlier episode, per "
        "model and metric; sets the decision threshold (default %(default)s)",
    )
    group.add_argument(
        "--band-sd",
        type=float,
        default=2.0,
        help="the study's band in SDs: an episode lasts while the run is beyond it (default %(default)s)",
    )
    group.add_argument(
        "--mad-threshold",
        type=float,
        default=3.5,
        help="robust z-score limit of the final-loss rule (default %(default)s)",
    )
    group.add_argument(
        "--min-checkpoints",
        type=int,
        default=1,
        help="checkpoints beyond the threshold needed to start an episode (default %(default)s)",
    )


def add_spike_arguments(group) -> None:
    """The spike score's window and threshold (:mod:`analysis.spikes`)."""
    group.add_argument(
        "--spike-window",
        type=int,
        default=1000,
        help="rolling window of the spike score, in values (default %(default)s)",
    )
    group.add_argument(
        "--spike-threshold", type=float, default=7.0, help="spike threshold in rolling SDs (default %(default)s)"
    )


def add_map_arguments(group) -> None:
    """The training maps' features, number of HMM states and its choice (:mod:`analysis.training_maps`)."""
    group.add_argument(
        "--map-features", nargs="+", help="features of the training maps (default: every weights/* metric)"
    )
    group.add_argument(
        "--max-states", type=int, default=8, help="largest number of HMM states tried (default %(default)s)"
    )
    group.add_argument(
        "--restarts",
        type=int,
        default=5,
        help="HMM restarts per number of states: the first N of the PolyPythias random states "
        "5329 2332 4642 6432 4754 (default %(default)s)",
    )
    group.add_argument("--states", type=int, help="fit the training maps with exactly N HMM states (default: choose)")
    group.add_argument(
        "--map-criterion",
        choices=("bic", "aic", "ll"),
        default="bic",
        help="how the number of HMM states is chosen on the held-out checkpoint rows: lowest BIC "
        "(default), lowest AIC, or highest log-likelihood",
    )
    group.add_argument(
        "--map-heldout-fraction",
        type=float,
        default=0.2,
        help="share of checkpoint rows held out to choose the number of states (default %(default)s)",
    )
    group.add_argument(
        "--map-split-seed", type=int, default=2546, help="random state of that split (default %(default)s)"
    )
    group.add_argument(
        "--map-steps",
        help="decode and draw the maps only at these steps: a comma list or 'polypythias' (default: every checkpoint)",
    )


def options_from(args):
    """The :class:`analysis.report.AnalysisOptions` the arguments give; an out-of-range number is an error
    here, before anything is loaded (report and outliers load lazily: ``--help`` stays quick)."""
    from analysis.load import parse_steps
    from analysis.outliers import DEFAULT_TASKS, OutlierRule
    from analysis.report import AnalysisOptions

    check_ranges(args)
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


def check_ranges(args) -> None:
    """Counts at least 1 (a rolling SD's window at least 2) and the held-out share strictly between 0 and 1."""
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
