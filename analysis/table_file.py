"""Reading a study from one CSV or TSV table (:func:`load_tidy_file`): tidy (``model, seed, step, metric,
value``) or wide (``seed``, ``step`` and one column per metric), with every malformed file, seed or step
refused in one sentence that says which cell is wrong."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.tidy_table import Study, diverged_notes, non_finite_endings, runs_from_metrics, tidy
from polypythia.study import TIDY_COLUMNS

log = logging.getLogger(__name__)

# Tables: pandas names an unnamed header cell (a written index) "Unnamed: 0".
_UNNAMED_COLUMN = re.compile(r"^(unnamed: \d+(_level_\d+)?|)$")
# Columns of a wide table that identify a row rather than hold a metric.
_ID_COLUMNS = ("model", "seed", "step", "run_id", "weight_seed", "data_seed")
# A model size in a file name: "pythia-410m", "410m", "1.4b", "410m-deduped".
_SIZE_IN_NAME = re.compile(r"(?<![0-9a-z.])(?:pythia-)?(\d+(?:\.\d+)?[mb](?:-deduped)?)(?![0-9a-z])")
# A run label the analysis writes when weight and data seeds differ ("w1-d2"), or for a replicate ("1-rep1").
_RUN_LABEL = re.compile(r"^(?:\d+|w\d+-d\d+)(?:-rep\d+)?$")


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
    notes: list[str] = []
    frame = long_rows(named_columns(read_table(path), path), path, notes)
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


def named_columns(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The table without its unnamed index columns, the identifying and tidy column names in lower case
    (``Seed`` is ``seed``), each name once."""
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
    return frame


def long_rows(frame: pd.DataFrame, path: Path, notes: list[str]) -> pd.DataFrame:
    """The table with checked seeds and steps, and in long form (one row per metric value) when it is wide;
    a note in ``notes`` lists the non-numeric columns a wide table left out."""
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
    return frame


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
