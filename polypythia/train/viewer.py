"""``polypythia-batch``: the exact tokens and text a run trained on at one step - to tie a loss spike to its data.

    polypythia-batch --step 120 -- model=70m seed=3 budget=demo      # the overrides the run used
    polypythia-batch --step 120 --data-seed 3 --budget demo          # or the few flags that matter
    polypythia-batch --step 120 --data-path data/c --tokenizer data/c.tokenizer.json --json batch.json

Step numbering follows MLflow: ``train/loss`` at step ``S`` is logged after ``S`` optimizer steps,
and it is the loss of the batch that the ``S``-th update trained on, the batch at 0-based index
``S - 1``. So ``--step S`` shows ``TrainingData.batch(S - 1)``: the rows behind the loss plotted at
``S``. The batch depends only on the dataset, ``budget.seq_length``, ``budget.global_batch_size``
and the data seed (see :mod:`polypythia.data.sequences`), so this runs anywhere, without the run's
checkpoints, and gives the same ids in every process and on every machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from polypythia.config.jobconfig import JobConfig, job_config
from polypythia.errors import ConfigError, PolypythiaError

EDGE_TOKENS = 8  # ids shown at each end of a row unless --full
EDGE_CHARS = 160  # characters of text shown at each end of a row unless --full


def default_config_dir() -> Path:
    """The repository's ``conf/`` folder (the project is installed editable)."""
    import polypythia

    return Path(polypythia.__file__).resolve().parent.parent / "conf"


def compose_job_config(overrides: list[str], config_dir: str | Path | None = None) -> JobConfig:
    """The validated config that ``python launch.py <overrides>`` would run, composed from ``conf/``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conf = Path(config_dir or default_config_dir()).expanduser().resolve()
    if not (conf / "config.yaml").is_file():
        raise ConfigError(f"{conf} holds no config.yaml; pass --config-dir with the repository's conf/ folder.")
    try:
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            raw = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        msg = str(exc).strip().splitlines()[0].rstrip(".")
        raise ConfigError(f"Cannot compose the config from {list(overrides)}: {msg}; check the overrides.") from None
    raw.launcher.allow_slow = True  # the viewer reads the data order; nothing trains, however long the budget
    return job_config(raw)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The Hydra overrides equivalent to the explicit flags (they come after, so they win)."""
    out: list[str] = []
    if args.seed is not None:
        out.append(f"seed={args.seed}")
    if args.data_seed is not None:
        out.append(f"data_seed={args.data_seed}")
    if args.budget is not None:
        out.append(f"budget={args.budget}")
    if (args.data_path is None) != (args.tokenizer is None):
        raise ConfigError("Give --data-path and --tokenizer together: the .bin/.idx prefix and its tokenizer.json.")
    if args.data_path is not None:
        if not any(o.split("=", 1)[0].lstrip("+~") == "data" for o in args.overrides):
            out.append("data=indexed")
        out += [f"data.path={args.data_path}", f"data.tokenizer={args.tokenizer}"]
    if args.cache_dir is not None:
        out.append(f"data.cache_dir={args.cache_dir}")
    return out


@dataclass
class BatchRow:
    row: int  # global index of the row in the dataset's token stream
    order_position: int  # place in the data seed's order (across epochs)
    epoch: int
    ids: list[int]  # seq_length + 1 tokens: inputs are ids[:-1], targets ids[1:]
    text: str


@dataclass
class BatchView:
    step: int  # the MLflow step whose train/loss this batch produced
    batch_index: int  # 0-based: TrainingData.batch(batch_index)
    data_seed: int
    rank: int
    workers: int
    global_batch_size: int
    seq_length: int
    num_train_rows: int
    dataset: str
    tokenizer: str
    rows: list[BatchRow] = field(default_factory=list)


def view_batch(cfg: JobConfig, step: int, rank: int = 0, workers: int = 1, max_rows: int | None = None) -> BatchView:
    """The rows (ids and decoded text) behind the ``train/loss`` logged at MLflow step ``step``."""
    from tokenizers import Tokenizer

    from polypythia.train.data import dataset_files, load_training_data

    _check_request(cfg, step, rank, workers, max_rows)
    data = load_training_data(cfg)
    from polypythia.train import rewind

    batch_index = rewind.batch_index(step - 1, rewind.load(cfg.run_dir))  # a rewound run skipped batches
    indices = data.order.batch_indices(batch_index, data.global_batch_size, rank, workers)
    ids = data.sequences.rows(indices)  # exactly what TrainingData.batch(batch_index, rank, workers) returns
    first_position = batch_index * data.global_batch_size + rank * (data.global_batch_size // workers)
    tokenizer = Tokenizer.from_file(data.tokenizer_file)
    view = BatchView(
        step,
        batch_index,
        cfg.effective_data_seed,
        rank,
        workers,
        data.global_batch_size,
        data.sequences.seq_length,
        data.sequences.num_train_rows,
        dataset_files(cfg)[0],
        data.tokenizer_file,
    )
    count = len(indices) if max_rows is None else min(max_rows, len(indices))
    for j in range(count):
        position = first_position + j
        row_ids = [int(t) for t in ids[j]]
        view.rows.append(
            BatchRow(
                int(indices[j]),
                position,
                position // data.sequences.num_train_rows,
                row_ids,
                tokenizer.decode(row_ids, skip_special_tokens=False),
            )
        )
    return view


def _check_request(cfg: JobConfig, step: int, rank: int, workers: int, max_rows: int | None) -> None:
    if step < 1:
        raise ConfigError(
            f"--step must be at least 1, got {step}: MLflow logs the first train/loss at step 1 (the batch at "
            "0-based index 0)."
        )
    if workers < 1 or not 0 <= rank < workers:
        raise ConfigError(
            f"--rank must lie in [0, --workers) and --workers be at least 1, got rank {rank} of {workers}."
        )
    if cfg.budget.global_batch_size % workers:
        raise ConfigError(
            f"budget.global_batch_size ({cfg.budget.global_batch_size}) is not divisible by --workers {workers}; "
            "give the number of workers the run used."
        )
    if max_rows is not None and max_rows < 1:
        raise ConfigError(f"--rows must be at least 1, got {max_rows}.")
    if step > cfg.budget.steps:
        print(
            f"polypythia-batch: note: step {step} is past the budget's last step ({cfg.budget.steps}); "
            "showing the batch the order would give, which no run of this budget trained on.",
            file=sys.stderr,
        )


def _ids_excerpt(ids: list[int], full: bool) -> str:
    if full or len(ids) <= 2 * EDGE_TOKENS:
        return " ".join(map(str, ids))
    head, tail = ids[:EDGE_TOKENS], ids[-EDGE_TOKENS:]
    return f"{' '.join(map(str, head))} ... {' '.join(map(str, tail))}"


def _text_excerpt(text: str, full: bool) -> str:
    if full:
        return "\n".join("    | " + line for line in text.split("\n"))
    if len(text) > 2 * EDGE_CHARS:
        return f"    {json.dumps(text[:EDGE_CHARS])} ... {json.dumps(text[-EDGE_CHARS:])}"
    return f"    {json.dumps(text)}"


def format_view(view: BatchView, full: bool = False) -> str:
    """Readable: a header saying which batch this is, then each row's index, ids and text."""
    share = "" if view.workers == 1 else f", rank {view.rank} of {view.workers} workers"
    lines = [
        f"Batch behind train/loss at step {view.step} (0-based batch index {view.batch_index}), "
        f"data seed {view.data_seed}{share}: {len(view.rows)} row{'' if len(view.rows) == 1 else 's'} "
        f"x {view.seq_length + 1} tokens (global batch {view.global_batch_size}).",
        f"dataset {view.dataset} ({view.num_train_rows:,} training rows), tokenizer {view.tokenizer}",
    ]
    for r in view.rows:
        lines.append("")
        where = f"row {r.row} (order position {r.order_position}, epoch {r.epoch})"
        lines.append(f"{where} ids: {_ids_excerpt(r.ids, full)}")
        lines.append(_text_excerpt(r.text, full))
    return "\n".join(lines)


def format_ids(view: BatchView) -> str:
    """One line of space-separated ids per row, for pipes."""
    return "\n".join(" ".join(map(str, r.ids)) for r in view.rows)


def write_json(view: BatchView, path: str) -> None:
    text = json.dumps(asdict(view), indent=1)
    if path == "-":
        print(text)
    else:
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(path).expanduser().write_text(text + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polypythia-batch",
        description="Show the token ids and text of the batch behind the train/loss that MLflow logged at "
        "--step S (the batch at 0-based index S-1). Compose the run's config from Hydra overrides, "
        "explicit flags, or both.",
        epilog="example: polypythia-batch --step 120 -- model=70m seed=3 budget=demo",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as given to launch.py (after --)")
    parser.add_argument("--step", type=int, required=True, help="MLflow step S of the loss (>= 1); shows batch S-1")
    parser.add_argument("--seed", type=int, help="same as the override seed=N")
    parser.add_argument("--data-seed", type=int, help="same as the override data_seed=N")
    parser.add_argument("--budget", help="budget config name, same as budget=NAME (e.g. demo, pythia)")
    parser.add_argument("--data-path", help="a .bin/.idx prefix, same as data=indexed data.path=PREFIX")
    parser.add_argument("--tokenizer", help="its tokenizer.json, same as data.tokenizer=PATH")
    parser.add_argument("--cache-dir", help="where the embedded corpus is cached, same as data.cache_dir=DIR")
    parser.add_argument("--config-dir", help="the conf/ folder to compose from (default: the repository's)")
    parser.add_argument("--rank", type=int, default=0, help="show this worker's share of the global batch ...")
    parser.add_argument(
        "--workers", type=int, default=1, help="... out of this many workers (default: the whole batch)"
    )
    parser.add_argument("--rows", type=int, help="show at most this many rows")
    parser.add_argument("--json", metavar="FILE", help="also write every row's ids and text as JSON ('-': stdout only)")
    parser.add_argument("--ids-only", action="store_true", help="print only the ids, one row per line")
    parser.add_argument("--full", action="store_true", help="print every id and the whole text of each row")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = compose_job_config(list(args.overrides) + flag_overrides(args), args.config_dir)
        view = view_batch(cfg, args.step, args.rank, args.workers, args.rows)
    except PolypythiaError as exc:
        print(f"polypythia-batch: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        write_json(view, args.json)
        if args.json == "-":
            return 0
    print(format_ids(view) if args.ids_only else format_view(view, args.full))
    return 0


if __name__ == "__main__":
    sys.exit(main())
