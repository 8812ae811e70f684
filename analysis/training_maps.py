"""Training maps (Hu, Chen, Saphra, Cho, TMLR 2023) fitted as the PolyPythias release does.

Method (EleutherAI/pythia, branch ``polypythias``, ``polypythias/training-maps/training_map.py``):

* rows are (seed, checkpoint) with one column per feature (default: the 14 ``weights/*`` statistics);
* ``sklearn.model_selection.train_test_split(rows, test_size=0.2, random_state=2546)`` holds out
  checkpoint rows; each split is sorted by (seed, step);
* within each split every seed's features are z-scored over that seed's own rows in that split
  (``scipy.stats.zscore``, ddof=0; a feature constant over a seed's rows becomes 0 here, where
  scipy would give NaN);
* for n = 1..8 states and each restart seed in (5329, 2332, 4642, 6432, 4754):
  ``hmmlearn.hmm.GaussianHMM(n_components=n, covariance_type="diag", n_iter=10000,
  random_state=check_random_state(seed))`` is fitted on the training rows (one sequence per seed)
  and scored on the held-out rows: log-likelihood, ``bic()`` and ``aic()`` of the held-out rows and
  ``monitor_.converged``; a restart whose scoring fails (``ValueError``) is skipped; the restart with
  the best held-out log-likelihood is kept per n;
* the study read the number of states off the BIC/AIC plot (410M: 5). Here it is the n with the
  lowest BIC of its kept restart (``criterion="bic"``), or the lowest AIC, or the highest held-out
  log-likelihood, or fixed with ``states=N`` (then only N is fitted);
* the map: the kept model of that n Viterbi-decodes every seed on the decoded checkpoints (the
  study's "all" split, each seed z-scored over its own rows; ``steps`` restricts it, e.g. to the
  27 evaluation checkpoints :data:`POLYPYTHIAS_EVAL_STEPS`).

States are renumbered by the mean (log) step at which they are visited, so a lower state is an
earlier phase of training. The majority path is the most common state at each step across seeds; a
seed departs from it when its sequence of distinct states (the order of phases, ignoring exactly
when it moves) differs from the majority's: it skips a phase, visits an extra one, or falls back.

With only 27 checkpoints per seed the held-out split has about 5 rows per seed, z-scored over
those few rows and forming sparse sequences; on planted studies this biases the held-out criteria
towards fewer states than were planted (``heldout_fraction=0.5`` recovers them; see
``tests/analysis/test_training_maps.py``).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.load import POLYPYTHIAS_EVAL_STEPS, parse_steps

log = logging.getLogger(__name__)

# The random states of the released code: the held-out split and the restarts of every fit.
POLYPYTHIAS_SPLIT_SEED = 2546
POLYPYTHIAS_RESTART_SEEDS: tuple[int, ...] = (5329, 2332, 4642, 6432, 4754)
HELDOUT_FRACTION = 0.2
N_ITER = 10000  # the released code's n_iter; tol stays hmmlearn's default
TOL = 1e-2  # hmmlearn.hmm.GaussianHMM's default tol
CRITERIA = ("bic", "aic", "ll")
MIN_CHECKPOINTS = 3  # a seed with fewer checkpoints is left out of its model's map
# Training rows x numbers of states from which the restarts are fitted in worker processes by default
# (about 25 runs x 154 checkpoints x 8; smaller studies fit in a second or two in this process).
PARALLEL_MIN_ROWS = 25_000
WORKER_IDLE_S = 10  # idle worker processes exit after this many seconds
TIE_RTOL = 1e-9  # held-out log-likelihoods this close are the same optimum (see better())

PATH_COLUMNS = ["model", "seed", "step", "state"]
DEPARTURE_COLUMNS = [
    "model",
    "seed",
    "departure_step",
    "fell_back",
    "fall_back_step",
    "skipped_states",
    "revisited_states",
    "extra_states",
    "path",
]
SELECTION_COLUMNS = [
    "model",
    "n_states",
    "restart",
    "heldout_log_likelihood",
    "bic",
    "aic",
    "converged",
    "iterations",
    "n_train_rows",
    "n_heldout_rows",
    "best_of_n",
    "chosen",
    "criterion",
]

__all__ = [
    "CRITERIA",
    "POLYPYTHIAS_EVAL_STEPS",
    "POLYPYTHIAS_RESTART_SEEDS",
    "POLYPYTHIAS_SPLIT_SEED",
    "TrainingMaps",
    "feature_matrix",
    "fit_training_maps",
    "restart_seeds",
    "split_rows",
    "start_training_maps",
]


@dataclass
class TrainingMaps:
    """Fitted maps of a study: state paths, majority paths, departures and the model-selection table."""

    paths: pd.DataFrame  # model, seed, step, state
    majority: pd.DataFrame  # model, step, state
    departures: pd.DataFrame  # one row per seed whose phase order differs from the majority
    selection: pd.DataFrame  # SELECTION_COLUMNS: one row per (model, n_states, restart)
    features: list[str]
    criterion: str = "bic"  # "bic", "aic", "ll" or "fixed" (states=N)
    settings: dict = field(default_factory=dict)  # held-out fraction, split seed, restarts, n_iter, tol, steps
    notes: list[str] = field(default_factory=list)  # seeds or models left out, and why

    def best_per_n(self) -> pd.DataFrame:
        """The kept restart (best held-out log-likelihood) of every (model, n_states)."""
        return self.selection[self.selection["best_of_n"]].reset_index(drop=True)

    def chosen(self) -> pd.DataFrame:
        """One row per model: the number of states used for its map and the criterion that chose it."""
        return self.selection[self.selection["chosen"]].reset_index(drop=True)


def restart_seeds(restarts: int | Iterable[int] = POLYPYTHIAS_RESTART_SEEDS) -> tuple[int, ...]:
    """The restart random states: a list as given, or a count: the first ``restarts`` of the study's
    five, then 10000, 10001, ... for more than five."""
    if isinstance(restarts, (int, np.integer)):
        count = int(restarts)
        if count < 1:
            raise AnalysisError(
                f"The number of HMM restarts must be at least 1, not {count}; give 1 to 5 "
                "(the study's random states) or more."
            )
        extra = tuple(10000 + i for i in range(max(count - len(POLYPYTHIAS_RESTART_SEEDS), 0)))
        return (POLYPYTHIAS_RESTART_SEEDS + extra)[:count]
    seeds = tuple(int(s) for s in restarts)
    if not seeds:
        raise AnalysisError("The list of HMM restart seeds is empty; give at least one random state.")
    return seeds


def wide_features(metrics: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """Rows (seed, step) in (seed, step) order, one column per feature; checkpoints missing one are dropped."""
    rows = metrics[metrics["metric"].isin(features)]
    wide = rows.pivot_table(
        index=["seed", "step"], columns="metric", values="value", aggfunc="last", observed=True
    ).dropna()
    wide.columns = wide.columns.astype(str)
    return sort_rows(wide[[f for f in features if f in wide.columns]])


def sort_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by seed (run-label order: 0, 1, 2, ..., 10) and step."""
    from polypythia.study import label_order

    seeds = frame.index.get_level_values("seed")
    order = {s: i for i, s in enumerate(sorted(pd.unique(seeds), key=label_order))}
    keys = np.lexsort((frame.index.get_level_values("step").to_numpy(), np.array([order[s] for s in seeds])))
    return frame.iloc[keys]


def zscore(frame: pd.DataFrame, standardise: str = "run") -> pd.DataFrame:
    """Features z-scored per seed (``"run"``, the study's choice) or over all rows (``"model"``), ddof=0
    like ``scipy.stats.zscore``; a constant feature becomes 0."""
    if frame.empty:
        return frame
    if standardise == "model":
        return (frame - frame.mean()) / frame.std(ddof=0).replace(0, 1).fillna(1)
    grouped = frame.groupby(level="seed", sort=False, observed=True)
    scale = grouped.transform(lambda c: c.std(ddof=0)).replace(0, 1).fillna(1)
    return (frame - grouped.transform("mean")) / scale


def feature_matrix(metrics: pd.DataFrame, features: list[str], standardise: str = "run") -> pd.DataFrame:
    """Rows (seed, step), one column per feature, z-scored per seed (``"run"``) or over all seeds of a
    size (``"model"``); checkpoints missing a feature are dropped."""
    return zscore(wide_features(metrics, features), standardise)


def split_rows(
    n_rows: int, heldout_fraction: float = HELDOUT_FRACTION, split_seed: int = POLYPYTHIAS_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the training and held-out rows, as ``train_test_split(rows, test_size=heldout_fraction,
    random_state=split_seed)`` splits ``n_rows`` rows."""
    from sklearn.model_selection import train_test_split

    try:
        train, heldout = train_test_split(np.arange(n_rows), test_size=heldout_fraction, random_state=split_seed)
    except ValueError as error:
        raise AnalysisError(
            f"Cannot hold out {heldout_fraction:g} of {n_rows} checkpoint rows ({error}); give "
            "more checkpoints or another --map-heldout-fraction."
        ) from None
    return np.sort(train), np.sort(heldout)


@dataclass
class Split:
    """One split's rows as hmmlearn takes them: the z-scored matrix and one length per seed."""

    X: np.ndarray
    lengths: list[int]
    index: pd.MultiIndex

    @classmethod
    def of(cls, raw: pd.DataFrame, standardise: str) -> Split:
        """Rows sorted by (seed, step), z-scored within this split; seeds without rows are left out."""
        frame = zscore(sort_rows(raw), standardise)
        seeds = frame.index.get_level_values("seed")
        lengths = [int(n) for n in pd.Series(seeds).value_counts(sort=False).reindex(pd.unique(seeds))]
        return cls(frame.to_numpy(dtype="float64"), lengths, frame.index)


def fit_one(
    train: Split, heldout: Split, n_states: int, seed: int, n_iter: int, tol: float
) -> tuple[dict, object] | None:
    """One restart: fit on ``train``, score on ``heldout``; None when the fit or the scoring fails."""
    return fit_states([(train.X, train.lengths, heldout.X, heldout.lengths)], n_states, [seed], n_iter, tol)[0][0]


def fit_states(
    data: list[tuple], n_states: int, seeds: Sequence[int], n_iter: int, tol: float
) -> list[list[tuple[dict, object] | None]]:
    """Every restart of one number of states, for each size's ``(X, lengths, X_heldout, lengths_heldout)``:
    per size, per restart seed, ``(row, hmm)`` or None when the fit or the scoring fails (skipped, as
    the released code skips a restart whose scoring raises ``ValueError``).

    Each restart is the released code's ``GaussianHMM(n_components=n_states, covariance_type="diag",
    n_iter=n_iter, random_state=check_random_state(seed))`` (``tol``: hmmlearn's default 0.01), fitted on
    the training rows and scored (log-likelihood, ``bic``, ``aic``) on the held-out rows. The fits run
    together (:func:`analysis.hmm_batch.fit_together`: each follows hmmlearn's own EM loop and stops
    where it would alone), with one BLAS/OpenMP thread and hmmlearn's warnings silenced: the unit of
    work a worker process runs.
    """
    from sklearn.utils import check_random_state
    from threadpoolctl import threadpool_limits

    from analysis.hmm_batch import BatchedGaussianHMM, fit_together

    logging.getLogger("hmmlearn").setLevel(logging.ERROR)
    jobs = [
        (X, lengths, X_heldout, lengths_heldout, seed)
        for X, lengths, X_heldout, lengths_heldout in data
        for seed in seeds
    ]
    models = [
        BatchedGaussianHMM(
            n_components=n_states, covariance_type="diag", n_iter=n_iter, tol=tol, random_state=check_random_state(seed)
        )
        for *_, seed in jobs
    ]
    results = []
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")
        errors = fit_together(models, [job[0] for job in jobs], [job[1] for job in jobs])
        for hmm, error, (X, _, X_heldout, lengths_heldout, seed) in zip(models, errors, jobs):
            try:
                if error is not None:
                    raise error
                score = float(hmm.score(X_heldout, lengths_heldout))
                bic, aic = float(hmm.bic(X_heldout, lengths_heldout)), float(hmm.aic(X_heldout, lengths_heldout))
            except (ValueError, np.linalg.LinAlgError) as failure:  # e.g. "startprob_ must sum to 1 (got nan)"
                log.debug("HMM with %d states, restart %d skipped: %s", n_states, seed, failure)
                results.append(None)
                continue
            row = {
                "n_states": n_states,
                "restart": seed,
                "heldout_log_likelihood": score,
                "bic": bic,
                "aic": aic,
                "converged": bool(hmm.monitor_.converged),
                "iterations": int(hmm.monitor_.iter),
                "n_train_rows": len(X),
                "n_heldout_rows": len(X_heldout),
            }
            results.append((row, hmm))
    return [results[i : i + len(seeds)] for i in range(0, len(results), len(seeds))]


def better(score: float, best: float) -> bool:
    """Whether a restart's held-out log-likelihood beats the best so far. The released code keeps the
    first restart of equal scores (``score > best_score``); restarts that reach the same optimum differ
    only by rounding (1e-13 relative), so scores within :data:`TIE_RTOL` count as equal and the
    earlier restart is kept, whatever the rounding of the platform."""
    return score > best + TIE_RTOL * abs(best)


def select_model(
    train: Split,
    heldout: Split,
    candidates: list[int],
    seeds: Sequence[int],
    n_iter: int,
    tol: float,
    criterion: str,
    fitted: dict[int, list] | None = None,
) -> tuple[list[dict], object, int]:
    """Every restart's row, and the kept model of the chosen number of states (and that number).
    ``fitted``: the restarts of each number of states already fitted (:func:`fit_states`, in
    ``seeds`` order); otherwise they are fitted here."""
    rows, kept = [], {}
    for n_states in candidates:
        if n_states > len(train.X):
            continue
        results = (
            fitted[n_states]
            if fitted is not None
            else fit_states([(train.X, train.lengths, heldout.X, heldout.lengths)], n_states, seeds, n_iter, tol)[0]
        )
        for result in results:
            if result is None:
                continue
            row, hmm = result
            rows.append(row)
            score = row["heldout_log_likelihood"]
            if np.isfinite(score) and (
                n_states not in kept or better(score, kept[n_states][0]["heldout_log_likelihood"])
            ):
                kept[n_states] = (row, hmm)
    if not kept:
        return rows, None, 0
    for n_states, (row, _) in kept.items():
        row["best_of_n"] = True
    if criterion == "ll":
        chosen = max(kept, key=lambda n: kept[n][0]["heldout_log_likelihood"])
    elif criterion in ("bic", "aic"):
        chosen = min(kept, key=lambda n: (kept[n][0][criterion], n))
    else:  # fixed: one candidate
        chosen = next(iter(kept))
    kept[chosen][0]["chosen"] = True
    return rows, kept[chosen][1], chosen


def order_states_by_time(states: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Renumber states 0..k-1 by the mean log-step of their visits (earliest phase first)."""
    labels = np.unique(states)
    mean_step = [np.mean(np.log1p(steps[states == label])) for label in labels]
    mapping = {old: new for new, old in enumerate(labels[np.argsort(mean_step, kind="stable")])}
    return np.array([mapping[s] for s in states], dtype="int64")


def collapse(path: np.ndarray, steps: np.ndarray) -> list[tuple[int, int]]:
    """Run-length form of a path: (state, first step) for each stretch of equal states."""
    starts = np.flatnonzero(np.r_[True, path[1:] != path[:-1]])
    return [(int(path[i]), int(steps[i])) for i in starts]


def departure(model: str, seed, path: np.ndarray, steps: np.ndarray, majority: list[tuple[int, int]]) -> dict | None:
    """How a seed's phase order differs from the majority's (None when it follows it)."""
    own = collapse(path, steps)
    own_states, majority_states = [s for s, _ in own], [s for s, _ in majority]
    if own_states == majority_states:
        return None
    first = next(
        (i for i, (a, b) in enumerate(zip(own_states, majority_states)) if a != b),
        min(len(own_states), len(majority_states)),
    )
    departure_step = own[first][1] if first < len(own) else int(steps[-1])
    fall_backs = [step for (previous, _), (state, step) in zip(own, own[1:]) if state < previous]
    counts = pd.Series(own_states).value_counts()
    return {
        "model": model,
        "seed": seed,
        "departure_step": int(departure_step),
        "fell_back": bool(fall_backs),
        "fall_back_step": fall_backs[0] if fall_backs else None,
        "skipped_states": " ".join(str(s) for s in sorted(set(majority_states) - set(own_states))),
        "revisited_states": " ".join(str(s) for s in sorted(counts[counts > 1].index)),
        "extra_states": " ".join(str(s) for s in sorted(set(own_states) - set(majority_states))),
        "path": "-".join(str(s) for s in own_states),
    }


def majority_path(paths: pd.DataFrame) -> pd.DataFrame:
    """The most common state at each step across seeds (ties: the lower state)."""
    counts = paths.groupby(["step", "state"]).size().rename("count").reset_index()
    counts = counts.sort_values(["step", "count", "state"], ascending=[True, False, True])
    return counts.drop_duplicates("step")[["step", "state"]].reset_index(drop=True)


@dataclass
class MapSettings:
    """The knobs of :func:`fit_training_maps` that every size shares."""

    candidates: list[int]
    seeds: tuple[int, ...]
    criterion: str
    heldout_fraction: float
    split_seed: int
    n_iter: int
    tol: float
    steps: list[int] | None
    fit_all_steps: bool
    standardise: str


def usable_rows(model: str, wide: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """The rows of seeds with at least :data:`MIN_CHECKPOINTS` checkpoints (a note names the others)."""
    counts = pd.Series(wide.index.get_level_values("seed")).value_counts()
    short = sorted(map(str, counts[counts < MIN_CHECKPOINTS].index))
    if short:
        notes.append(
            f"Training map of {model}: seed(s) {', '.join(short)} left out (fewer than "
            f"{MIN_CHECKPOINTS} checkpoints with every map feature)."
        )
    return wide[~wide.index.get_level_values("seed").isin(counts[counts < MIN_CHECKPOINTS].index)]


@dataclass
class ModelData:
    """One size ready to be fitted: the decoded rows and the training and held-out splits."""

    model: str
    decoded: pd.DataFrame
    train: Split
    heldout: Split


def prepare_model(model: str, wide: pd.DataFrame, settings: MapSettings, notes: list[str]) -> ModelData:
    """The rows of one size to decode and to fit, split as the study does (AnalysisError when it cannot be mapped)."""
    steps = wide.index.get_level_values("step")
    decoded = wide if settings.steps is None else wide[steps.isin(settings.steps)]
    decoded = usable_rows(model, decoded, notes)
    if decoded.empty:
        raise AnalysisError(
            f"no seed of {model} has {MIN_CHECKPOINTS} checkpoints with every map feature"
            + ("" if settings.steps is None else " at the decoded steps")
        )
    fitted = usable_rows(model, wide, []) if settings.fit_all_steps else decoded
    train_at, heldout_at = split_rows(len(fitted), settings.heldout_fraction, settings.split_seed)
    return ModelData(
        model,
        decoded,
        Split.of(fitted.iloc[train_at], settings.standardise),
        Split.of(fitted.iloc[heldout_at], settings.standardise),
    )


def finish_model(data: ModelData, settings: MapSettings, fitted: dict[int, list] | None = None):
    """Model selection over the fitted restarts, then paths, majority path, departures and selection rows
    of one size (AnalysisError when no model could be fitted)."""
    model, train, heldout = data.model, data.train, data.heldout
    rows, hmm, n_chosen = select_model(
        train, heldout, settings.candidates, settings.seeds, settings.n_iter, settings.tol, settings.criterion, fitted
    )
    if hmm is None:
        tried = ", ".join(map(str, settings.candidates))
        raise AnalysisError(
            f"no hidden Markov model with {tried} state(s) could be fitted on the {len(train.X)} "
            f"training rows of {model} and scored on its {len(heldout.X)} held-out rows"
        )
    every = Split.of(data.decoded, settings.standardise)
    seeds = every.index.get_level_values("seed").to_numpy()
    step_values = every.index.get_level_values("step").to_numpy()
    states = order_states_by_time(hmm.predict(every.X, every.lengths), step_values)
    paths = pd.DataFrame({"model": model, "seed": seeds, "step": step_values, "state": states})
    majority = majority_path(paths)
    majority_runs = collapse(majority["state"].to_numpy(), majority["step"].to_numpy())
    departures = [
        d
        for seed, run in paths.groupby("seed", sort=False)
        if (d := departure(model, seed, run["state"].to_numpy(), run["step"].to_numpy(), majority_runs))
    ]
    criterion = settings.criterion
    selection = [{"model": model, "best_of_n": False, "chosen": False, **row, "criterion": criterion} for row in rows]
    log.info("Training map of %s: %d states (%s)", model, n_chosen, criterion)
    return paths, majority.assign(model=model), departures, selection


def map_one_model(model: str, wide: pd.DataFrame, settings: MapSettings, notes: list[str]):
    """Paths, majority path, departures and selection rows of one size (AnalysisError when it cannot be mapped)."""
    return finish_model(prepare_model(model, wide, settings, notes), settings)


def models_of(metrics: pd.DataFrame) -> list:
    """The models present in ``metrics``, in the order ``groupby("model")`` gives them."""
    column = metrics["model"]
    present = set(column.unique())
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [m for m in column.cat.categories if m in present]
    return sorted(present)


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_states_possible(prepared: list[ModelData], states: int | None) -> None:
    """A fixed number of states more than a size's training rows can be given no HMM: an error, not an
    empty map (the chosen number of states is only ever among those that fit)."""
    short = [
        (data.model, len(data.train.X)) for data in prepared if states is not None and int(states) > len(data.train.X)
    ]
    if short:
        model, rows = min(short, key=lambda item: item[1])
        raise AnalysisError(
            f"--states {states} is more than the {rows} checkpoint rows the training map of {model} "
            f"is fitted on; give at most {rows} (or leave --states out to choose the number)."
        )


def fit_all(prepared: list[ModelData], settings: MapSettings, n_jobs: int | None):
    """Start every restart of every number of states of every size; returns a function that waits for
    them and gives ``{model: {n_states: [result per restart]}}``.

    One task per number of states fits all sizes and restarts together (:func:`fit_states`). The
    tasks are independent, so with ``n_jobs`` > 1 they run in that many worker processes (``joblib``'s
    loky executor, one BLAS/OpenMP thread each, so the workers do not oversubscribe the cores; they
    exit after :data:`WORKER_IDLE_S` idle seconds), the largest number of states first, while the
    caller goes on. ``n_jobs`` None: every available core once the study has
    :data:`PARALLEL_MIN_ROWS` training rows x numbers of states (below that, starting the workers
    costs more than it saves). The results do not depend on ``n_jobs``.
    """
    tasks = []
    for n_states in sorted(settings.candidates, reverse=True):
        members = [data for data in prepared if n_states <= len(data.train.X)]
        if members:
            tasks.append((n_states, members))
    if n_jobs is None:
        rows = sum(len(data.train.X) for data in prepared)
        n_jobs = available_cores() if rows * len(settings.candidates) >= PARALLEL_MIN_ROWS else 1
    n_jobs = max(1, min(int(n_jobs), len(tasks)))

    def arguments(n_states: int, members: list[ModelData]) -> tuple:
        data = [(d.train.X, d.train.lengths, d.heldout.X, d.heldout.lengths) for d in members]
        return data, n_states, settings.seeds, settings.n_iter, settings.tol

    def collect(results: list) -> dict[str, dict[int, list]]:
        fitted: dict[str, dict[int, list]] = {data.model: {} for data in prepared}
        for (n_states, members), per_model in zip(tasks, results):
            for data, result in zip(members, per_model):
                fitted[data.model][n_states] = result
        return fitted

    if n_jobs == 1:
        done = collect([fit_states(*arguments(*task)) for task in tasks])
        return lambda: done
    from joblib.externals.loky import get_reusable_executor

    executor = get_reusable_executor(max_workers=n_jobs, timeout=WORKER_IDLE_S)
    futures = [executor.submit(fit_states, *arguments(*task)) for task in tasks]
    return lambda: collect([future.result() for future in futures])


class MapsJob:
    """Training maps being fitted (:func:`start_training_maps`); :meth:`result` waits for them."""

    def __init__(
        self,
        prepared: list[ModelData],
        settings: MapSettings,
        wait_for_fits,
        features: list[str],
        notes_by_model: dict[str, list[str]],
        parameters: dict,
    ):
        self.prepared, self.settings, self.wait_for_fits = prepared, settings, wait_for_fits
        self.features, self.notes_by_model, self.parameters = features, notes_by_model, parameters

    def result(self) -> TrainingMaps:
        """The maps: model selection, decoding and departures of every size once its fits are done."""
        fitted = self.wait_for_fits()
        paths, majorities, departures, selection = [], [], [], []
        settings = self.settings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for data in self.prepared:
                try:
                    p, m, d, s = finish_model(data, settings, fitted[data.model])
                except AnalysisError as error:
                    self.notes_by_model[data.model].append(f"Training map of {data.model} skipped: {error}.")
                    continue
                paths.append(p), majorities.append(m), departures.extend(d), selection.extend(s)
        notes = [note for model_notes in self.notes_by_model.values() for note in model_notes]
        if not paths:
            raise AnalysisError(
                "No model could be mapped (" + " ".join(notes) + "); give more checkpoints or other --map-features."
            )
        return TrainingMaps(
            paths=pd.concat(paths, ignore_index=True)[PATH_COLUMNS],
            majority=pd.concat(majorities, ignore_index=True)[["model", "step", "state"]],
            departures=pd.DataFrame(departures, columns=DEPARTURE_COLUMNS).astype({"fall_back_step": "Int64"}),
            selection=pd.DataFrame(selection, columns=SELECTION_COLUMNS),
            features=self.features,
            criterion=settings.criterion,
            settings={
                "heldout_fraction": settings.heldout_fraction,
                "split_seed": settings.split_seed,
                "restarts": list(settings.seeds),
                "n_iter": settings.n_iter,
                "tol": settings.tol,
                "steps": settings.steps,
                **self.parameters,
            },
            notes=notes,
        )


def fit_training_maps(
    metrics: pd.DataFrame,
    features: list[str] | None = None,
    max_states: int = 8,
    restarts: int | Iterable[int] = POLYPYTHIAS_RESTART_SEEDS,
    *,
    states: int | None = None,
    criterion: str = "bic",
    heldout_fraction: float = HELDOUT_FRACTION,
    split_seed: int = POLYPYTHIAS_SPLIT_SEED,
    n_iter: int = N_ITER,
    tol: float = TOL,
    steps: Iterable[int] | str | None = None,
    fit_all_steps: bool = False,
    standardise: str = "run",
    n_jobs: int | None = None,
) -> TrainingMaps:
    """Fit one HMM per size as the PolyPythias release does, choose its number of states, decode every seed.

    ``features``: metric names (default: every ``weights/*`` metric). ``max_states``: try 1..max_states
    states, or only ``states`` when given. ``restarts``: a count (the first of the study's five random
    states) or a list of random states. ``criterion``: ``"bic"`` (default) or ``"aic"`` (lowest, of the
    held-out rows) or ``"ll"`` (highest held-out log-likelihood). ``heldout_fraction`` and ``split_seed``:
    the held-out checkpoint rows (the study's 0.2 and 2546). ``n_iter``/``tol``: EM limits (the study's
    10000 and hmmlearn's default 0.01, which the released code leaves as it is: EM stops once an
    iteration gains less than 0.01 in log-likelihood). ``steps``: the checkpoints decoded and drawn (a
    list, or text such as ``"polypythias"`` for :data:`POLYPYTHIAS_EVAL_STEPS`; None: all); the HMM is
    fitted on the same rows, or on every checkpoint with ``fit_all_steps``. ``standardise``: ``"run"``
    (z-score per seed within each split, as the study) or ``"model"`` (over all seeds of a size).
    ``n_jobs``: worker processes for the fits (None: every core for a large study, see :func:`fit_all`).
    Deterministic: the same maps whatever ``n_jobs``.

    A size that cannot be mapped (too few checkpoints, no model fits) is left out with a note in
    ``TrainingMaps.notes``; an AnalysisError when no size can be mapped.
    """
    return start_training_maps(
        metrics,
        features,
        max_states,
        restarts,
        states=states,
        criterion=criterion,
        heldout_fraction=heldout_fraction,
        split_seed=split_seed,
        n_iter=n_iter,
        tol=tol,
        steps=steps,
        fit_all_steps=fit_all_steps,
        standardise=standardise,
        n_jobs=n_jobs,
    ).result()


def start_training_maps(
    metrics: pd.DataFrame,
    features: list[str] | None = None,
    max_states: int = 8,
    restarts: int | Iterable[int] = POLYPYTHIAS_RESTART_SEEDS,
    *,
    states: int | None = None,
    criterion: str = "bic",
    heldout_fraction: float = HELDOUT_FRACTION,
    split_seed: int = POLYPYTHIAS_SPLIT_SEED,
    n_iter: int = N_ITER,
    tol: float = TOL,
    steps: Iterable[int] | str | None = None,
    fit_all_steps: bool = False,
    standardise: str = "run",
    n_jobs: int | None = None,
) -> MapsJob:
    """:func:`fit_training_maps` with the fits left running in worker processes (when it uses them):
    the caller can do other work and then call ``.result()``. Argument errors raise here."""
    if standardise not in ("run", "model"):
        raise AnalysisError(f"standardise must be 'run' or 'model', not {standardise!r}; pick one of the two.")
    if criterion not in CRITERIA:
        raise AnalysisError(f"The map criterion must be one of {', '.join(CRITERIA)}, not {criterion!r}.")
    if not 0 < heldout_fraction < 1:
        raise AnalysisError(
            f"The held-out fraction must lie between 0 and 1, not {heldout_fraction:g}; the study "
            "holds out 0.2 of the checkpoint rows."
        )
    if states is not None and int(states) < 1:
        raise AnalysisError(f"The number of HMM states must be at least 1, not {states}.")
    if states is None and max_states < 1:
        raise AnalysisError(f"max_states must be at least 1, not {max_states}.")
    if n_iter < 1:
        raise AnalysisError(f"n_iter must be at least 1, not {n_iter}.")
    names = sorted(set(map(str, metrics["metric"].unique())))
    features = features or [n for n in names if n.startswith("weights/")]
    features = [f for f in features if f in names]
    if not features:
        raise AnalysisError(
            "The study has no features for training maps (no weights/* metrics); "
            "name metrics to use with --map-features."
        )
    wanted = None if steps is None else parse_steps(steps)
    settings = MapSettings(
        candidates=[int(states)] if states is not None else list(range(1, max_states + 1)),
        seeds=restart_seeds(restarts),
        criterion="fixed" if states is not None else criterion,
        heldout_fraction=float(heldout_fraction),
        split_seed=int(split_seed),
        n_iter=int(n_iter),
        tol=float(tol),
        steps=wanted,
        fit_all_steps=fit_all_steps,
        standardise=standardise,
    )
    notes_by_model: dict[str, list[str]] = {}
    logging.getLogger("hmmlearn").setLevel(logging.ERROR)
    import hmmlearn.hmm  # noqa: F401  (loads scikit-learn's OpenMP runtime so that the limit below applies)
    from threadpoolctl import threadpool_limits

    # One thread: the k-means initialisation on a few hundred rows spends its time in OpenMP
    # barriers otherwise, ten times slower on a busy 2-core machine.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")
        prepared = []
        feature_rows = metrics[metrics["metric"].isin(features).to_numpy()]  # not a copy of dense loss curves
        by_model = dict(iter(feature_rows.groupby("model", observed=True)))
        for model in models_of(metrics):
            rows = by_model.get(model, feature_rows.iloc[:0])
            notes = notes_by_model.setdefault(str(model), [])
            try:
                prepared.append(prepare_model(str(model), wide_features(rows, features), settings, notes))
            except AnalysisError as error:
                notes.append(f"Training map of {model} skipped: {error}.")
        check_states_possible(prepared, states)
        wait_for_fits = fit_all(prepared, settings, n_jobs)
    return MapsJob(
        prepared,
        settings,
        wait_for_fits,
        features,
        notes_by_model,
        {"fit_all_steps": fit_all_steps, "standardise": standardise, "states": states, "max_states": max_states},
    )
