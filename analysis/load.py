"""Turn a study into one tidy table: ``model, seed, step, metric, value``.

Three sources are understood:

* an MLflow experiment written by the training side (one child run per (model, seed) job,
  tagged ``polypythia.kind=job``; see :func:`load_mlflow`),
* a folder of lm-evaluation-harness result files: v0.4 in the published PolyPythias layout
  ``pythia-<size>[-seed<k>]/step<S>/.../results_<timestamp>.json``, v0.3 in the Pythia suite's
  ``pythia-<size>[-deduped]/zero-shot/<name>_step<S>.json`` (:func:`load_lm_eval_folder`, :mod:`analysis.lmeval`),
* a tidy CSV/TSV file with the five columns, or a wide one with ``seed``, ``step`` and one column
  per metric such as the study's released training map table (:func:`load_tidy_file`).

``load_study(..., steps=POLYPYTHIAS_EVAL_STEPS)`` keeps only the study's 27 evaluation checkpoints.

:func:`load_study` picks one by looking at the source and returns a :class:`Study`: the tidy
metrics table plus a runs table (one row per (model, seed) with its status, so that diverged or
failed runs are kept and can be reported).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.configs import check_one_training_config
from analysis.errors import AnalysisError
from analysis.lmeval import lm_eval_rows
from analysis.lmeval_layout import LM_EVAL_LAYOUTS, has_lm_eval_results
from analysis.values import set_aside as set_impossible_aside
from polypythia.study import (
    TIDY_COLUMNS,
    label_order,
    label_replicate,
    parse_run_label,
    replicate_from_tags,
    run_label,
    search_job_runs,
    seeds_from_tags,
)

log = logging.getLogger(__name__)

# One row per run: (model, weight_seed, data_seed); ``seed`` is its label (polypythia.study.run_label).
RUN_COLUMNS = ["model", "seed", "weight_seed", "data_seed", "run_id", "status", "diverged", "budget"]

# The 27 checkpoints the PolyPythias analyses use (van der Wal et al., "PolyPythias", ICLR 2025,
# arXiv 2503.09543; EleutherAI/pythia branch polypythias, polypythias/data/training_maps.tsv):
# step 0, the log-spaced steps 1, 2, 4, ..., 512, then 1000, 3000 and every 10,000 from 13,000 to 143,000.
POLYPYTHIAS_EVAL_STEPS: tuple[int, ...] = (0, *(2**i for i in range(10)), 1000, 3000, *range(13000, 143001, 10000))
STEP_PRESETS = {"polypythias": POLYPYTHIAS_EVAL_STEPS}

# Tables: pandas names an unnamed header cell (a written index) "Unnamed: 0".
_UNNAMED_COLUMN = re.compile(r"^(unnamed: \d+(_level_\d+)?|)$")
# Columns of a wide table that identify a row rather than hold a metric.
_ID_COLUMNS = ("model", "seed", "step", "run_id", "weight_seed", "data_seed")
# A model size in a file name: "pythia-410m", "410m", "1.4b", "410m-deduped".
_SIZE_IN_NAME = re.compile(r"(?<![0-9a-z.])(?:pythia-)?(\d+(?:\.\d+)?[mb](?:-deduped)?)(?![0-9a-z])")
# A run label the analysis writes when weight and data seeds differ ("w1-d2"), or for a replicate ("1-rep1").
_RUN_LABEL = re.compile(r"^(?:\d+|w\d+-d\d+)(?:-rep\d+)?$")
# A run whose last value of one of these is NaN or infinite diverged (tidy() drops the value itself).
DIVERGENCE_METRICS = ("train/loss", "valid/loss")


@dataclass
class Study:
    """A loaded study: tidy per-step metrics and one row per run."""

    metrics: pd.DataFrame
    runs: pd.DataFrame
    source: str = ""
    kind: str = ""  # "mlflow", "lm-eval" or "table"
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    notes: list[str] = field(default_factory=list)
    replicates: pd.DataFrame | None = None  # further replicates of seeds, kept out of metrics (analysis.replicates)
    floor: pd.DataFrame | None = None  # their nondeterminism floor beside the seed spread, per model

    @property
    def models(self) -> list[str]:
        """Model names ordered by size (70m < 160m < 1b)."""
        return sort_models(self.metrics["model"].unique())


def sort_models(models) -> list[str]:
    """Order size names like "14m", "160m", "1.4b" by parameter count; unknown names last, by name."""

    def size_in_params(name: str) -> float:
        match = re.match(r"^(\d+(?:\.\d+)?)([mkb])", str(name).lower())
        if not match:
            return float("inf")
        scale = {"k": 1e3, "m": 1e6, "b": 1e9}[match.group(2)]
        return float(match.group(1)) * scale

    return sorted((str(m) for m in models), key=lambda m: (size_in_params(m), m))


def tidy(frame: pd.DataFrame, notes: list[str] | None = None) -> pd.DataFrame:
    """Check and normalise a tidy table: the five columns, typed, sorted, impossible values (NaN, an
    accuracy outside [0, 1], :mod:`analysis.values`) set aside with a note appended to ``notes`` (a
    run whose loss ended in NaN is found by :func:`non_finite_endings` before)."""
    missing = [c for c in TIDY_COLUMNS if c not in frame.columns]
    if missing:
        raise AnalysisError(
            f"The table lacks the column(s) {', '.join(missing)}; give a table with the columns "
            f"{', '.join(TIDY_COLUMNS)}."
        )
    out = frame[TIDY_COLUMNS].copy()
    out["value"] = pd.to_numeric(out["value"], errors="coerce").astype("float64")
    out["metric"] = as_string_category(out["metric"])
    out, note = set_impossible_aside(out)
    if note and notes is not None:
        notes.append(note)
    out["seed"] = run_label_column(out["seed"])
    out["step"] = pd.to_numeric(out["step"], errors="raise").astype("int64")
    out["model"] = as_string_category(out["model"])
    out["model"] = out["model"].cat.reorder_categories(sort_models(out["model"].cat.categories))
    out["metric"] = out["metric"].cat.remove_unused_categories()
    return out.sort_values(["model", "seed", "metric", "step"], kind="stable").reset_index(drop=True)


def run_label_column(column: pd.Series) -> pd.Series:
    """The ``seed`` column as run labels (categorical strings, see :mod:`polypythia.study`): a seed
    number k (also 3.0, "3" or "w3-d3") becomes "k"; "w1-d2" and a replicate's "3-rep1" stay; anything
    else is an AnalysisError."""
    column = column if isinstance(column.dtype, pd.CategoricalDtype) else column.astype("category")
    column = column.cat.remove_unused_categories()
    labels = []
    for category in column.cat.categories:
        number = pd.to_numeric(pd.Series([category]), errors="coerce").iloc[0]
        label = str(int(number)) if pd.notna(number) and float(number).is_integer() else str(category).strip()
        seeds = parse_run_label(label)
        if seeds is None:
            raise AnalysisError(
                f"The seed column holds {category!r}, which is neither a seed number nor a run "
                "label like w1-d2; give whole seed numbers."
            )
        labels.append(run_label(*seeds, label_replicate(label)))  # one label per run: w3-d3 is run 3
    column = column.cat.rename_categories(range(len(labels))).astype("int64").map(dict(enumerate(labels)))
    order = sorted(set(labels), key=label_order)
    return pd.Series(pd.Categorical(column, categories=order), index=column.index)


def as_string_category(column: pd.Series) -> pd.Series:
    """A categorical column with string categories (converting the few categories, not every row)."""
    if not isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype("category")
    column = column.cat.remove_unused_categories()
    categories = [str(c) for c in column.cat.categories]
    if len(set(categories)) < len(categories):  # 1 and "1" both present: merge them
        return column.astype(str).astype("category")
    return column.cat.rename_categories(categories)


def run_blocks(metrics: pd.DataFrame, names=None) -> pd.DataFrame | None:
    """Where each (model, seed, metric) run of ``metrics`` lies: columns model, seed, metric, start, stop
    (row positions ``start:stop``), in (model, seed, metric) category order; only the metrics in
    ``names`` when given. None unless every run is one contiguous stretch of rows with rising steps,
    as :func:`tidy` leaves them (sorted by model, seed, metric, step), and the three columns are
    categorical: then code can take each run's rows as array slices instead of copying and grouping
    a table of 143 million rows."""
    columns = ("model", "seed", "metric")
    if metrics.empty or not all(isinstance(metrics[c].dtype, pd.CategoricalDtype) for c in columns):
        return None
    codes = [metrics[c].cat.codes.to_numpy() for c in columns]
    if any((code < 0).any() for code in codes):  # a missing model, seed or metric
        return None
    change = np.zeros(len(metrics) - 1, dtype=bool)
    for code in codes:
        change |= code[1:] != code[:-1]
    starts = np.r_[0, np.flatnonzero(change) + 1]
    stops = np.r_[starts[1:], len(metrics)]
    keys = pd.DataFrame({c: code[starts] for c, code in zip(columns, codes)})
    if keys.duplicated().any():
        return None
    blocks = keys.assign(start=starts, stop=stops).sort_values(list(columns), kind="stable")
    for c in columns:  # codes -> names, in category order
        blocks[c] = np.asarray(metrics[c].cat.categories, dtype=object)[blocks[c].to_numpy()]
    if names is not None:
        blocks = blocks[blocks["metric"].isin(list(names)).to_numpy()]
    steps = metrics["step"].to_numpy()
    for start, stop in zip(blocks["start"], blocks["stop"]):
        if stop - start > 1 and not (np.diff(steps[start:stop]) > 0).all():
            return None
    return blocks.reset_index(drop=True)


def non_finite_endings(frame: pd.DataFrame) -> dict[tuple[str, str], tuple[str, int]]:
    """``(model, run label) -> (metric, step)`` of the runs whose last value of a loss
    (:data:`DIVERGENCE_METRICS`) is NaN or infinite, in a table of the five columns before :func:`tidy`
    drops those values: runs that diverged, which would otherwise be summarised with an earlier loss."""
    if not set(TIDY_COLUMNS) <= set(frame.columns):
        return {}
    losses = frame[frame["metric"].isin(DIVERGENCE_METRICS).to_numpy()]
    values = pd.to_numeric(losses["value"], errors="coerce").astype("float64").to_numpy()
    if np.isfinite(values).all():
        return {}
    losses = pd.DataFrame(
        {
            "model": losses["model"].astype(str).to_numpy(),
            "seed": run_label_column(losses["seed"]).astype(str).to_numpy(),
            "metric": losses["metric"].astype(str).to_numpy(),
            "step": pd.to_numeric(losses["step"], errors="coerce").to_numpy(),
            "value": values,
        }
    )
    losses = losses[losses["step"].notna()]
    last = losses.sort_values("step", kind="stable").groupby(["model", "seed", "metric"], sort=False).tail(1)
    ended = last[~np.isfinite(last["value"].to_numpy())]
    return {(row.model, row.seed): (row.metric, int(row.step)) for row in ended.itertuples()}


def diverged_notes(diverged: dict[tuple[str, str], tuple[str, int]]) -> list[str]:
    """One note per run that ended in a non-finite loss."""
    return [
        f"Model {model} run {seed} ends with a non-finite {metric} at step {step}; it is marked diverged "
        "(its earlier, finite values are kept)."
        for (model, seed), (metric, step) in sorted(diverged.items())
    ]


def run_pairs(metrics: pd.DataFrame) -> pd.DataFrame:
    """The distinct (model, seed) pairs as strings, in order of first appearance (``drop_duplicates``);
    for categorical columns sorted as :func:`tidy` leaves them, read off where the codes change
    rather than hashing every row (143 million rows for a 500-run study with dense curves)."""
    model, seed = metrics["model"], metrics["seed"]
    if isinstance(model.dtype, pd.CategoricalDtype) and isinstance(seed.dtype, pd.CategoricalDtype) and len(metrics):
        codes = model.cat.codes.to_numpy().astype("int64") * (len(seed.cat.categories) + 1) + seed.cat.codes.to_numpy()
        if (
            (model.cat.codes.to_numpy() >= 0).all()
            and (seed.cat.codes.to_numpy() >= 0).all()
            and (codes[1:] >= codes[:-1]).all()
        ):
            starts = np.r_[0, np.flatnonzero(codes[1:] != codes[:-1]) + 1]
            return pd.DataFrame(
                {"model": [str(m) for m in model.iloc[starts]], "seed": [str(s) for s in seed.iloc[starts]]},
                index=starts,
            )
    return metrics[["model", "seed"]].drop_duplicates().astype({"model": str, "seed": str})


def runs_from_metrics(metrics: pd.DataFrame, diverged: Iterable[tuple[str, str]] = ()) -> pd.DataFrame:
    """A runs table for sources that carry no run metadata: every (model, run) is FINISHED, its
    weight and data seeds read from its label; the (model, run label) pairs in ``diverged`` (see
    :func:`non_finite_endings`) are marked diverged, and listed even when none of their values was finite."""
    diverged = {(str(m), str(s)) for m, s in diverged}
    pairs = run_pairs(metrics)
    known = set(zip(pairs["model"], pairs["seed"]))
    extra = sorted(pair for pair in diverged if pair not in known)
    if extra:
        pairs = pd.concat([pairs, pd.DataFrame(extra, columns=["model", "seed"])], ignore_index=True)
    seeds = [parse_run_label(label) for label in pairs["seed"]]
    flags = [(m, s) in diverged for m, s in zip(pairs["model"], pairs["seed"])]
    runs = pairs.assign(
        run_id=None,
        status="FINISHED",
        diverged=flags,
        weight_seed=[w for w, _ in seeds],
        data_seed=[d for _, d in seeds],
        budget=None,
    )
    return runs[RUN_COLUMNS].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Source detection


@dataclass
class SourceChoice:
    """What a source names: ``kind`` "lm-eval" (a folder), "table" (a file) or "mlflow" (an experiment)."""

    kind: str
    name: str  # the path, or the experiment's name
    folder: str | None = None  # a folder without lm-eval results, read as the experiment ``name``
    note: str | None = None  # the sentence that says so


def choose_source(source: str | os.PathLike) -> SourceChoice:
    """A folder of lm-eval results, a table file, or else an MLflow experiment name. A folder without
    lm-eval results is never taken for data (``python -m analysis polypythia`` run in the repository,
    where ``polypythia/`` is the package): its name is read as an experiment name, and a note says so."""
    path = Path(source)
    if path.is_dir():
        if has_lm_eval_results(path):
            return SourceChoice("lm-eval", str(source))
        name = Path(os.path.abspath(path)).name
        note = (
            f"The folder {source} holds no lm-eval result files laid out as {LM_EVAL_LAYOUTS}, so it is read "
            f"as the MLflow experiment name {name!r}."
        )
        return SourceChoice("mlflow", name, folder=str(source), note=note)
    if path.suffix.lower() in (".csv", ".tsv", ".txt") or path.is_file():
        return SourceChoice("table", str(source))
    return SourceChoice("mlflow", str(source))


@contextmanager
def read_as_experiment(choice: SourceChoice):
    """Errors about the experiment a folder's name was read as also say that the folder held no results."""
    try:
        yield
    except AnalysisError as error:
        if choice.folder is None:
            raise
        text = str(error)
        text = text[0].lower() + text[1:] if text[:2].istitle() else text
        raise AnalysisError(
            f"The folder {choice.folder} holds no lm-eval result files laid out as {LM_EVAL_LAYOUTS}, "
            f"so it was read as the MLflow experiment name {choice.name!r}, and {text}"
        ) from None


def load_study(
    source: str | os.PathLike,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    metrics: list[str] | None = None,
    steps: Iterable[int] | str | None = None,
    model: str | None = None,
) -> Study:
    """Load a study from an MLflow experiment name, a folder of lm-eval results or a CSV/TSV file.

    ``metrics`` optionally restricts which metric keys are read (MLflow) or kept (files);
    an entry ending in ``*`` is a prefix (``"weights/*"``). ``steps`` optionally keeps only those
    training steps, from any source: a list of steps, or text that :func:`parse_steps` reads
    (``"polypythias"`` = :data:`POLYPYTHIAS_EVAL_STEPS`, or ``"0,1,2,512"``). ``model`` names the
    model of a table that has no ``model`` column (see :func:`load_tidy_file`).
    """
    wanted_steps = None if steps is None else parse_steps(steps)
    choice = choose_source(source)
    if choice.kind == "lm-eval":
        study = load_lm_eval_folder(choice.name, steps=wanted_steps)
    elif choice.kind == "table":
        study = load_tidy_file(choice.name, model=model)
    else:
        with read_as_experiment(choice):
            study = load_mlflow(
                choice.name, tracking_uri=tracking_uri, parent_run_id=parent_run_id, metric_keys=metrics
            )
        if choice.note:
            log.warning(choice.note)
            study.notes.insert(0, choice.note)
    if metrics:
        study.metrics = study.metrics[select_metrics(study.metrics["metric"], metrics)].reset_index(drop=True)
        study.metrics["metric"] = study.metrics["metric"].cat.remove_unused_categories()
    if wanted_steps is not None:
        restrict_steps(study, wanted_steps)
    if not study.metrics.empty:
        from analysis.replicates import set_study_replicates_aside

        set_study_replicates_aside(study)
    if study.metrics.empty:
        matching = " and ".join(
            what for what, given in (("--metrics", metrics), ("--steps", wanted_steps)) if given is not None
        )
        raise AnalysisError(
            f"The source {source} holds no metric values{' matching ' + matching if matching else ''}; "
            "check the path or experiment name."
        )
    return study


def parse_steps(text) -> list[int]:
    """The steps a ``--steps`` value names, sorted and unique: a preset (``"polypythias"``), a comma list
    (``"0,1,2,512"``), or already a list of step numbers."""
    if not isinstance(text, str):
        return sorted({int(step) for step in text})
    cleaned = text.strip()
    if cleaned.lower() in STEP_PRESETS:
        return list(STEP_PRESETS[cleaned.lower()])
    parts = [part.strip() for part in cleaned.split(",")]
    if not cleaned or not all(re.fullmatch(r"\d+", part) for part in parts):
        presets = ", ".join(repr(name) for name in STEP_PRESETS)
        raise AnalysisError(
            f"The steps {text!r} are neither a comma-separated list of whole step numbers "
            f"(such as 0,1,2,512) nor a preset ({presets}); give one of those."
        )
    return sorted({int(part) for part in parts})


def restrict_steps(study: Study, steps: Iterable[int]) -> None:
    """Keep only the metric rows at ``steps`` (in place); a note lists requested steps the source lacks."""
    wanted = sorted({int(s) for s in steps})
    metrics = study.metrics
    present = set(pd.unique(metrics["step"]).tolist())
    study.metrics = metrics[metrics["step"].isin(wanted)].reset_index(drop=True)
    for column in ("model", "metric"):
        if isinstance(study.metrics[column].dtype, pd.CategoricalDtype):
            study.metrics[column] = study.metrics[column].cat.remove_unused_categories()
    missing = [s for s in wanted if s not in present]
    if missing and not study.metrics.empty:
        shown = ", ".join(str(s) for s in missing[:10]) + (", ..." if len(missing) > 10 else "")
        study.notes.append(f"{len(missing)} of the {len(wanted)} requested steps are not in the source: {shown}.")


def select_metrics(names: pd.Series, patterns: list[str]) -> np.ndarray:
    """Boolean mask of the metric names matched by any pattern (exact name, or prefix ending in '*')."""
    unique = [str(n) for n in pd.unique(names)]
    wanted = [n for n in unique if any(n.startswith(p[:-1]) if p.endswith("*") else n == p for p in patterns)]
    return names.isin(wanted).to_numpy()


# ---------------------------------------------------------------------------------------------
# Tidy CSV / TSV


def load_tidy_file(path: str | os.PathLike, model: str | None = None) -> Study:
    """Read a CSV or TSV table (tab-separated when the name ends in .tsv or the header has only tabs).

    Two shapes are understood:

    * tidy: the columns ``model, seed, step, metric, value``;
    * wide: ``seed`` and ``step`` columns and one numeric column per metric, like the PolyPythias
      training map table (EleutherAI/pythia, branch polypythias, ``polypythias/data/training_maps.tsv``:
      an unnamed index, ``score, state, step, seed, group``). Every numeric column other than the
      identifying ones becomes a metric; non-numeric columns (``group``) and unnamed index
      columns are left out.

    A table without a ``model`` column gets ``model``, else the size in its file name
    (``pythia-410m``, ``410m``), else ``"unknown"``; a note says which. Seeds must be whole
    numbers (or ``w<k>-d<k>`` run labels) and steps whole numbers. Repeated
    (model, seed, step, metric) rows keep the last value, with a note counting those that disagree.
    Impossible values (NaN, an accuracy outside [0, 1]) are set aside with a note (:mod:`analysis.values`).
    """
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"The file {path} does not exist; give an existing .csv or .tsv file.")
    frame = read_table(path)
    notes: list[str] = []
    frame = frame.drop(columns=[c for c in frame.columns if _UNNAMED_COLUMN.match(str(c).strip().lower())])
    known = set(TIDY_COLUMNS) | set(_ID_COLUMNS)
    frame.columns = [
        str(c).strip().lower() if str(c).strip().lower() in known else str(c).strip() for c in frame.columns
    ]
    if frame.columns.duplicated().any():
        repeated = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
        raise AnalysisError(
            f"The table {path} has the column(s) {', '.join(repeated)} more than once; give each column once."
        )
    if "seed" in frame.columns:
        frame["seed"] = checked_seeds(frame["seed"], path)
    if "step" in frame.columns:
        frame["step"] = checked_steps(frame["step"], path)
    if not {"metric", "value"} <= set(frame.columns) and {"seed", "step"} <= set(frame.columns):
        frame, skipped = wide_to_tidy(frame, path)
        if skipped:
            notes.append(
                f"The table {path.name} has non-numeric column(s) {', '.join(skipped)}, "
                "which were left out of the metrics."
            )
    if "model" not in frame.columns:
        name, note = table_model(path, model)
        frame["model"] = name
        notes.append(note)
    if set(TIDY_COLUMNS) <= set(frame.columns):
        frame, note = drop_repeated_rows(frame, path)
        if note:
            notes.append(note)
    diverged = non_finite_endings(frame)
    metrics = tidy(frame, notes)
    notes += diverged_notes(diverged)
    for note in notes:
        log.warning(note)
    return Study(
        metrics=metrics, runs=runs_from_metrics(metrics, diverged), source=str(path), kind="table", notes=notes
    )


def read_table(path: Path) -> pd.DataFrame:
    """The raw table in ``path``; binary, non-UTF-8, empty or malformed files give an AnalysisError."""
    with open(path, "rb") as handle:
        head = handle.read(65536)
    if b"\x00" in head:
        raise AnalysisError(
            f"The file {path} holds binary data, not a CSV or TSV table; give a text table "
            f"with the columns {', '.join(TIDY_COLUMNS)} (or seed, step and one column per metric)."
        )
    first_line = head.split(b"\n", 1)[0]
    tab = path.suffix.lower() == ".tsv" or (b"\t" in first_line and b"," not in first_line)
    kind = "TSV" if tab else "CSV"
    try:
        return pd.read_csv(path, sep="\t" if tab else ",")
    except pd.errors.EmptyDataError:
        raise AnalysisError(
            f"The file {path} is empty; give a table with the columns {', '.join(TIDY_COLUMNS)}."
        ) from None
    except UnicodeDecodeError:
        raise AnalysisError(f"The file {path} is not UTF-8 text; give a {kind} table saved as UTF-8.") from None
    except pd.errors.ParserError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise AnalysisError(
            f"The file {path} is not a well-formed {kind} table ({reason}); "
            "repair it so that every row has as many fields as the header."
        ) from None


def first_bad(column: pd.Series, good: np.ndarray) -> str:
    """'<value> (data row N)' for the first entry of ``column`` where ``good`` is False."""
    index = int(np.flatnonzero(~good)[0])
    value = column.iloc[index]
    shown = "an empty cell" if pd.isna(value) else repr(value.item() if hasattr(value, "item") else value)
    return f"{shown} (data row {index + 1})"


def checked_seeds(column: pd.Series, path: Path) -> pd.Series:
    """Seeds as int64, or as strings when some are run labels ("w1-d2", "1-rep1"); anything else is an error."""
    numbers = pd.to_numeric(column, errors="coerce").astype("float64").to_numpy()
    whole = np.isfinite(numbers) & (numbers >= 0) & (np.round(numbers) == numbers)
    text = column.astype(str).str.strip()
    labels = (~whole) & text.str.fullmatch(_RUN_LABEL.pattern).fillna(False).to_numpy(dtype=bool)
    good = whole | labels
    if not good.all():
        raise AnalysisError(
            f"The column seed of {path} holds {first_bad(column, good)}, which is not a seed "
            "number; give whole-number seeds (0, 1, 2, ...)."
        )
    if not labels.any():
        return pd.Series(numbers.astype("int64"), index=column.index)
    as_text = [t if label else str(int(n)) for t, n, label in zip(text, numbers, labels)]
    return pd.Series(as_text, index=column.index, dtype=object)


def checked_steps(column: pd.Series, path: Path) -> pd.Series:
    """Steps as int64; a step that is not a whole non-negative number is an error."""
    numbers = pd.to_numeric(column, errors="coerce").astype("float64").to_numpy()
    good = np.isfinite(numbers) & (numbers >= 0) & (np.round(numbers) == numbers)
    if not good.all():
        raise AnalysisError(
            f"The column step of {path} holds {first_bad(column, good)}, which is not a "
            "training step; give whole-number steps (0, 1, 1000, ...)."
        )
    return pd.Series(numbers.astype("int64"), index=column.index)


def wide_to_tidy(frame: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Long rows from a wide table (one numeric column per metric) and the non-numeric columns skipped."""
    others = [c for c in frame.columns if c not in _ID_COLUMNS]
    numeric = [c for c in others if pd.api.types.is_numeric_dtype(frame[c])]
    skipped = [str(c) for c in others if c not in numeric]
    if not numeric:
        raise AnalysisError(
            f"The table {path} has seed and step columns but no metric/value columns and no "
            "numeric metric column; give a tidy table (model, seed, step, metric, value) or "
            "one numeric column per metric."
        )
    ids = [c for c in ("model", "seed", "step") if c in frame.columns]
    values = frame[ids].copy()
    for name in numeric:
        values[name] = frame[name].astype("float64")
    long = values.melt(id_vars=ids, value_vars=numeric, var_name="metric", value_name="value")
    return long, skipped


def table_model(path: Path, model: str | None) -> tuple[str, str]:
    """The model of a table without a model column, and a note saying where it came from."""
    if model:
        return str(model), f"The table {path.name} has no model column; its rows are model {model} (as given)."
    found = _SIZE_IN_NAME.search(path.stem.lower())
    if found:
        return found.group(1), (
            f"The table {path.name} has no model column; its rows are model {found.group(1)}, read from the file name."
        )
    return "unknown", (
        f"The table {path.name} has no model column and its name gives no model size; its rows "
        "are model 'unknown' (pass model=..., or add a model column)."
    )


def drop_repeated_rows(frame: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, str | None]:
    """Keep the last of repeated (model, seed, step, metric) rows; a note counts those with differing values."""
    keys = ["model", "seed", "step", "metric"]
    keyed = frame.astype({"model": str, "seed": str, "metric": str})
    repeated = keyed.duplicated(keys, keep=False).to_numpy()
    if not repeated.any():
        return frame, None
    values = pd.to_numeric(keyed.loc[repeated, "value"], errors="coerce")
    differing = int(
        (values.groupby([keyed.loc[repeated, k] for k in keys], sort=False).nunique(dropna=False) > 1).sum()
    )
    kept = frame[~keyed.duplicated(keys, keep="last").to_numpy()]
    if not differing:
        return kept, None
    return kept, (
        f"The table {path.name} repeats {differing} (model, seed, step, metric) row(s) with "
        "different values; the last row of each was kept."
    )


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness result folders (the files are parsed in analysis.lmeval)


def load_lm_eval_folder(root: str | os.PathLike, steps: Iterable[int] | None = None) -> Study:
    """Read every lm-eval result file below ``root`` (optionally only those at ``steps``); see
    :func:`analysis.lmeval.lm_eval_rows` for the layout and which files are left out."""
    frame, notes = lm_eval_rows(root, steps)
    diverged = non_finite_endings(frame)
    set_aside: list[str] = []
    metrics = tidy(frame, set_aside)
    for note in set_aside:
        log.warning(note)
    notes += set_aside + diverged_notes(diverged)
    return Study(
        metrics=metrics, runs=runs_from_metrics(metrics, diverged), source=str(root), kind="lm-eval", notes=notes
    )


# ---------------------------------------------------------------------------------------------
# MLflow


def mlflow_client(tracking_uri: str | None):
    """An MlflowClient for ``tracking_uri`` (or env MLFLOW_TRACKING_URI); error if neither is set."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise AnalysisError(
            "No MLflow tracking URI is set; pass --tracking-uri or set MLFLOW_TRACKING_URI "
            "(or give a folder or .csv/.tsv file as the source)."
        )
    from polypythia.config.preflight import is_file_store
    from polypythia.tracking import client as tracking

    if is_file_store(uri):  # MLflow 3 refuses file stores with a traceback-length message; polypythia never writes one
        raise AnalysisError(
            f"The tracking URI {uri} is an MLflow file store, which polypythia never writes and MLflow "
            "no longer reads by default; give the study's server (http://host:port, as printed by "
            "python -m polypythia.tracking.client status) or its database (sqlite:///.../mlflow.db)."
        )
    try:
        tracking.require_reachable(uri, "start it or fix --tracking-uri / MLFLOW_TRACKING_URI")
    except tracking.TrackingError as error:
        raise AnalysisError(str(error)) from None
    return tracking.client(uri), uri


def find_experiment(client, name: str):
    """The MLflow experiment called ``name``; a clear error when there is none."""
    try:
        experiment = client.get_experiment_by_name(name)
    except Exception as error:  # connection refused, bad URI, ...
        raise AnalysisError(
            f"The MLflow tracking server could not be reached ({type(error).__name__}); "
            "check --tracking-uri and that the server is running."
        ) from None
    if experiment is None:
        no_path = "" if Path(name).exists() else " and no file or folder has that name"
        raise AnalysisError(
            f"No MLflow experiment is called {name!r}{no_path}; "
            "check the experiment name, the tracking URI or the path."
        )
    return experiment


def run_record(run) -> dict | None:
    """The runs-table row of an MLflow job run, or None when it lacks the model or seed tag."""
    tags = run.data.tags
    if "model" not in tags or "seed" not in tags:
        log.warning("Run %s has no model/seed tag and is skipped.", run.info.run_id)
        return None
    weight_seed, data_seed = seeds_from_tags(tags)
    diverged = str(tags.get("diverged", "false")).lower() not in ("false", "0", "", "no")
    return {
        "model": tags["model"],
        "seed": run_label(weight_seed, data_seed, replicate_from_tags(tags)),
        "weight_seed": weight_seed,
        "data_seed": data_seed,
        "run_id": run.info.run_id,
        "status": run.info.status,
        "diverged": diverged,
        "budget": tags.get("budget"),
        "start_time": run.info.start_time or 0,
    }


def runs_table(runs: list) -> pd.DataFrame:
    """One row per run (model, weight seed, data seed); a run logged twice keeps its latest MLflow run."""
    records = [r for r in (run_record(run) for run in runs) if r is not None]
    if not records:
        return pd.DataFrame(columns=RUN_COLUMNS)
    table = pd.DataFrame(records).sort_values("start_time")
    duplicated = table.duplicated(["model", "seed"], keep="last")
    for _, row in table[duplicated].iterrows():
        log.warning(
            "MLflow run %s repeats model %s run %s (weight seed %s, data seed %s); the later one is used.",
            row.run_id,
            row.model,
            row.seed,
            row.weight_seed,
            row.data_seed,
        )
    return table[~duplicated][RUN_COLUMNS].reset_index(drop=True)


def metric_history(client, run_id: str, key: str) -> np.ndarray:
    """(step, value) pairs of one metric, the last logged value per step."""
    history = client.get_metric_history(run_id, key)
    if not history:
        return np.empty((0, 2))
    pairs = np.array([(m.step, m.timestamp, m.value) for m in history], dtype="float64")
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    last_per_step = np.r_[pairs[1:, 0] != pairs[:-1, 0], True]
    return pairs[last_per_step][:, [0, 2]]


def run_metrics(client, run, keys: list[str] | None, workers: int = 8) -> pd.DataFrame:
    """Tidy rows of every metric key of one run (or of the keys matching ``keys``)."""
    names = list(run.data.metrics.keys())
    if keys:
        names = [n for n, keep in zip(names, select_metrics(pd.Series(names, dtype=str), keys)) if keep]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        histories = list(pool.map(lambda key: metric_history(client, run.info.run_id, key), names))
    frames = [
        pd.DataFrame({"step": h[:, 0], "metric": name, "value": h[:, 1]}) for name, h in zip(names, histories) if len(h)
    ]
    if not frames:
        return pd.DataFrame(columns=["step", "metric", "value"])
    return pd.concat(frames, ignore_index=True)


def load_mlflow(
    experiment: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    metric_keys: list[str] | None = None,
) -> Study:
    """Read all job runs of an MLflow experiment (optionally one sweep's children) into a Study."""
    client, uri = mlflow_client(tracking_uri)
    found = find_experiment(client, experiment)
    runs = search_job_runs(client, found.experiment_id, parent_run_id)
    table = runs_table(runs)
    if table.empty:
        where = f"under parent run {parent_run_id}" if parent_run_id else f"in experiment {experiment!r}"
        raise AnalysisError(
            f"No runs tagged polypythia.kind=job were found {where}; check the experiment name and --parent-run."
        )
    check_one_training_config(runs, table)  # seeds of one model differ in their seeds alone (analysis.configs)
    by_id = {run.info.run_id: run for run in runs}
    frames = []
    for row in table.itertuples():
        rows = run_metrics(client, by_id[row.run_id], metric_keys)
        frames.append(rows.assign(model=row.model, seed=row.seed))
    every_row = pd.concat(frames, ignore_index=True)
    diverged = non_finite_endings(every_row)
    set_aside: list[str] = []
    metrics = tidy(every_row, set_aside)
    if diverged:
        ended = [(m, s) in diverged for m, s in zip(table["model"].astype(str), table["seed"].astype(str))]
        table["diverged"] = table["diverged"].astype(bool) | np.asarray(ended, dtype=bool)
    return Study(
        metrics=metrics,
        runs=table,
        source=experiment,
        kind="mlflow",
        tracking_uri=uri,
        experiment_id=found.experiment_id,
        parent_run_id=parent_run_id,
        notes=set_aside + diverged_notes(diverged),
    )
