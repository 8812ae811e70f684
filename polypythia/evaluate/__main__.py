"""Command line: ``python -m polypythia.evaluate <source> [--out DIR]`` evaluates every checkpoint once.

The source is an MLflow experiment (the study's child runs and their checkpoints on disk) or a
folder of Hugging Face checkpoints laid out ``<name>/step<S>/``. See runner.py and docs/evaluate.md.
User errors print one sentence and exit 2; a checkpoint that fails to evaluate makes the exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from polypythia.errors import PolypythiaError, exit_with
from polypythia.evaluate.downstream import TASK_NAMES
from polypythia.runtime.env import home as polypythia_home
from polypythia.tracking.client import default_tracking_uri

# weight_stats.DEFINITIONS, spelled out so that --help does not import torch (a test keeps them equal)
WEIGHT_STATS_DEFINITIONS = ("polypythias", "hu")

EPILOG = """\
source is auto-detected:
  an existing folder  Hugging Face checkpoints laid out <name>/step<S>/ (e.g. pythia-160m-seed3/step1000/);
                      model and seeds come from <name>: <model>-seed<k>, <model>-wseed<w>-dseed<d>;
                      a name without seeds is seed 0 (a folder without such checkpoints: its name,
                      as an MLflow experiment name)
  anything else       an MLflow experiment name (--tracking-uri, MLFLOW_TRACKING_URI or the local server)

examples:
  python -m polypythia.evaluate my-study --tracking-uri http://127.0.0.1:5050
  python -m polypythia.evaluate my-study --parent-run 3f2a... --limit-items 50 --no-ray
  python -m polypythia.evaluate downloads/polypythias/ --out results/polypythias \\
      --valid-data data/pile_val_text_document --valid-seq-length 2048
  python -m polypythia.evaluate downloads/polypythias/ --tracking-uri http://127.0.0.1:5050 --experiment polypythias
  python -m polypythia.evaluate my-study --weight-stats hu --out results/my-study-hu

Running it again computes nothing that is already done and prints "nothing to do".
At the end it checks the checkpoints (missing from the schedule, identical to their neighbour, not
descended from their run's step 0), prints what it finds and writes check.csv into --out; the exit
code stays the evaluation's.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m polypythia.evaluate",
        description="Evaluate every checkpoint of a study once: weight statistics, validation "
        "loss and offline downstream tasks, logged to MLflow and written as tables.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="MLflow experiment name, or a folder of <name>/step<S>/ checkpoints")
    p.add_argument(
        "--tracking-uri",
        default=default_tracking_uri(),
        help="MLflow tracking URI (default: env MLFLOW_TRACKING_URI, else the local server "
        "that sweeps started under $POLYPYTHIA_HOME, i.e. .polypythia/mlflow)",
    )
    p.add_argument("--parent-run", help="only the child runs of this sweep's parent run id")
    p.add_argument(
        "--experiment", help="folder source: log into runs named after each folder in this MLflow experiment"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="folder for the tables (and a folder source's result files) "
        "(default: $POLYPYTHIA_HOME/eval/<source name>)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=list(TASK_NAMES),
        choices=TASK_NAMES,
        metavar="TASK",
        help=f"downstream tasks (default: all of {' '.join(TASK_NAMES)})",
    )
    p.add_argument("--limit-items", type=int, help="evaluate only each task's first N items (quick checks)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--valid-data", help="folder source: prefix of a .bin/.idx pair to compute the validation loss on")
    p.add_argument(
        "--valid-seq-length", type=int, default=2048, help="tokens per validation row (default 2048, Pythia's)"
    )
    p.add_argument("--valid-rows", type=int, default=64, help="validation rows (default 64)")
    p.add_argument(
        "--reference-seed",
        metavar="SEED",
        help="inter-seed agreement reference: a seed (3) or a run label w<weight seed>-d<data seed> "
        "(w1-d2) (default: each model's run with the smallest weight seed, then data seed)",
    )
    p.add_argument(
        "--weight-stats",
        choices=WEIGHT_STATS_DEFINITIONS,
        default=WEIGHT_STATS_DEFINITIONS[0],
        help="definition of the weight statistics (the 14 of the PolyPythias training maps): polypythias (default) computes what the released "
        "PolyPythias code does (fused QKV as one matrix, input embedding kept, unbiased variances, "
        "lower median); hu follows the prose of Hu et al. 2023 (Q/K/V split, embeddings left out, "
        "population variances). Stored results of the other definition are recomputed",
    )
    p.add_argument("--no-ray", action="store_true", help="compute in this process instead of one Ray task per run")
    p.add_argument("--ray-address", help="Ray cluster to use (default: a local Ray runtime)")
    p.add_argument("--num-gpus-per-run", type=float, default=0.0, help="GPUs per Ray task (default 0)")
    return p


def default_out(source: str) -> Path:
    home = polypythia_home()
    return Path(home) / "eval" / Path(source.rstrip("/")).name


def choose_source(source: str) -> tuple[bool, str, str | None]:
    """(is a checkpoint folder, the folder or experiment name, a note). A folder without ``<name>/step<S>/``
    checkpoint folders is never taken for one (``polypythia`` run in the repository is the package): its
    name is read as an MLflow experiment name, and the note says so."""
    path = Path(source)
    if not path.is_dir():
        return False, source, None
    from polypythia.evaluate.targets import step_folders

    if any(step_folders(child) for child in path.iterdir() if child.is_dir()):
        return True, source, None
    name = Path(os.path.abspath(path)).name
    return (
        False,
        name,
        (
            f"The folder {source} holds no <name>/step<S>/ checkpoint folders with a config.json, "
            f"so it is read as the MLflow experiment name '{name}'."
        ),
    )


def build_targets(args, mlflow_client):
    from polypythia.evaluate import targets

    if args.folder_source:
        valid = None
        if args.valid_data:
            valid = {
                "kind": "indexed",
                "prefix": args.valid_data,
                "seq_length": args.valid_seq_length,
                "max_rows": args.valid_rows,
            }
        found = targets.targets_from_folder(args.source, args.out, valid)
        if mlflow_client is not None:
            targets.attach_folder_runs(mlflow_client, args.experiment, found)
        return found
    if mlflow_client is None:
        raise targets.EvaluationError(
            f"'{args.source}' is not a folder, so it names an MLflow experiment; "
            "give --tracking-uri (or set MLFLOW_TRACKING_URI)."
        )
    return targets.targets_from_mlflow(mlflow_client, args.source, args.parent_run)


def read_as_experiment(error: PolypythiaError, note: str | None) -> PolypythiaError:
    """An error about the experiment a folder's name was read as, saying that it came from a folder."""
    from polypythia.evaluate.targets import EvaluationError

    if not note:
        return error
    text = str(error)
    text = text[0].lower() + text[1:] if text[:2].istitle() else text
    text = text.replace(" is not a folder, so it names an MLflow experiment;", " needs an MLflow server;")
    return EvaluationError(f"{note[:-1]}, and {text}")


def tracking_client(args):
    """The MLflow client to log to, or None (a folder source logs only with --experiment)."""
    from polypythia.tracking import client as tracking

    folder = args.folder_source
    if not args.tracking_uri or (folder and not args.experiment):
        return None
    tracking.require_reachable(args.tracking_uri, "start it or fix --tracking-uri")
    return tracking.client(args.tracking_uri)


def main(argv: list[str] | None = None) -> int:
    from polypythia.evaluate import runner, tables

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.folder_source, args.source, note = choose_source(args.source)
    args.out = args.out or default_out(args.source)
    try:
        if args.valid_data and not os.path.isfile(args.valid_data + ".idx"):
            raise runner.EvaluationError(
                f"--valid-data {args.valid_data} has no .idx file; give the prefix of a .bin/.idx pair."
            )
        if args.experiment and not args.tracking_uri:
            raise runner.EvaluationError("--experiment needs --tracking-uri (or MLFLOW_TRACKING_URI) to log to.")
        options = runner.EvalOptions(
            tasks=tuple(args.tasks),
            limit_items=args.limit_items,
            batch_size=args.batch_size,
            device=args.device or _default_device(),
            weight_stats=args.weight_stats,
        )
        options.check()
        if args.reference_seed is not None:
            tables.reference_run(args.reference_seed)
        try:
            mlflow_client = tracking_client(args)
            targets = build_targets(args, mlflow_client)
        except PolypythiaError as exc:
            raise read_as_experiment(exc, note) from None
        if note:
            print(f"polypythia: {note}", file=sys.stderr, flush=True)
        summary = runner.evaluate_targets(
            targets,
            options,
            mlflow_client,
            out_dir=args.out,
            reference_seed=args.reference_seed,
            execution=runner.Execution(
                use_ray=not args.no_ray, ray_address=args.ray_address, num_gpus_per_run=args.num_gpus_per_run
            ),
        )
    except PolypythiaError as exc:
        exit_with(exc)
    check_integrity(targets, args.out)
    return 1 if summary.errors else 0


def check_integrity(targets, out: Path) -> None:
    """Print the integrity check of the checkpoints (missing, identical, not descended) and write check.csv;
    a failure of the check itself is a warning, never the evaluation's failure."""
    from polypythia.evaluate import integrity

    try:
        integrity.report(integrity.check_targets(targets), "Integrity of the checkpoints", out / integrity.CHECK_FILE)
    except Exception as exc:  # noqa: BLE001 - the evaluation is done; the check is extra
        logging.getLogger(__name__).warning("The checkpoint integrity check failed (%s: %s).", type(exc).__name__, exc)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
