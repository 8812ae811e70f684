"""Training maps (Hu, Chen, Saphra, Cho, TMLR 2023) fitted as the PolyPythias release does.

Method (EleutherAI/pythia, branch ``polypythias``, ``polypythias/training-maps/training_map.py``):

* rows are (seed, checkpoint) with one column per feature (default: every ``weights/*`` metric, the
  statistics in ``WEIGHT_STATISTICS`` of polypythia/evaluate/weight_stats.py);
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
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.load import POLYPYTHIAS_EVAL_STEPS, parse_steps
from analysis.map_fit import (
    MapSettings,
    ModelData,
    check_states_possible,
    finish_model,
    fit_all,
    models_of,
    prepare_model,
)
from analysis.map_rows import HELDOUT_FRACTION, POLYPYTHIAS_SPLIT_SEED, Split, feature_matrix, split_rows, wide_features

log = logging.getLogger(__name__)

# The random states of the released code's restarts (its held-out split: analysis/map_rows.py).
POLYPYTHIAS_RESTART_SEEDS: tuple[int, ...] = (5329, 2332, 4642, 6432, 4754)
N_ITER = 10000  # the released code's n_iter; tol stays hmmlearn's default
TOL = 1e-2  # hmmlearn.hmm.GaussianHMM's default tol
CRITERIA = ("bic", "aic", "ll")

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
    "HELDOUT_FRACTION",
    "MapOptions",
    "POLYPYTHIAS_EVAL_STEPS",
    "POLYPYTHIAS_RESTART_SEEDS",
    "POLYPYTHIAS_SPLIT_SEED",
    "Split",
    "TrainingMaps",
    "feature_matrix",
    "fit_training_maps",
    "restart_seeds",
    "split_rows",
    "start_training_maps",
    "wide_features",
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


@dataclass(frozen=True)
class MapOptions:
    """The knobs of :func:`fit_training_maps` (see its docstring; the defaults are the study's)."""

    features: list[str] | None = None  # metric names (None: every weights/* metric)
    max_states: int = 8
    restarts: int | Iterable[int] = POLYPYTHIAS_RESTART_SEEDS
    states: int | None = None  # fix the number of states (None: choose it by ``criterion``)
    criterion: str = "bic"
    heldout_fraction: float = HELDOUT_FRACTION
    split_seed: int = POLYPYTHIAS_SPLIT_SEED
    n_iter: int = N_ITER
    tol: float = TOL
    steps: Iterable[int] | str | None = None
    fit_all_steps: bool = False
    standardise: str = "run"
    n_jobs: int | None = None

    def check(self) -> None:
        """Each knob's range, before any fit starts."""
        if self.standardise not in ("run", "model"):
            raise AnalysisError(f"standardise must be 'run' or 'model', not {self.standardise!r}; pick one of the two.")
        if self.criterion not in CRITERIA:
            raise AnalysisError(f"The map criterion must be one of {', '.join(CRITERIA)}, not {self.criterion!r}.")
        if not 0 < self.heldout_fraction < 1:
            raise AnalysisError(
                f"The held-out fraction must lie between 0 and 1, not {self.heldout_fraction:g}; the study "
                "holds out 0.2 of the checkpoint rows."
            )
        if self.states is not None and int(self.states) < 1:
            raise AnalysisError(f"The number of HMM states must be at least 1, not {self.states}.")
        if self.states is None and self.max_states < 1:
            raise AnalysisError(f"max_states must be at least 1, not {self.max_states}.")
        if self.n_iter < 1:
            raise AnalysisError(f"n_iter must be at least 1, not {self.n_iter}.")

    def settings(self) -> MapSettings:
        """What every size's fit shares."""
        states = self.states
        return MapSettings(
            candidates=[int(states)] if states is not None else list(range(1, self.max_states + 1)),
            seeds=restart_seeds(self.restarts),
            criterion="fixed" if states is not None else self.criterion,
            heldout_fraction=float(self.heldout_fraction),
            split_seed=int(self.split_seed),
            n_iter=int(self.n_iter),
            tol=float(self.tol),
            steps=None if self.steps is None else parse_steps(self.steps),
            fit_all_steps=self.fit_all_steps,
            standardise=self.standardise,
        )


def fit_training_maps(metrics: pd.DataFrame, options: MapOptions | None = None, **knobs) -> TrainingMaps:
    """Fit one HMM per size as the PolyPythias release does, choose its number of states, decode every seed.

    ``options`` (or its fields as keywords, ``knobs``): ``features``: metric names (default: every
    ``weights/*`` metric). ``max_states``: try 1..max_states states, or only ``states`` when given.
    ``restarts``: a count (the first of the study's five random states) or a list of random states.
    ``criterion``: ``"bic"`` (default) or ``"aic"`` (lowest, of the held-out rows) or ``"ll"`` (highest
    held-out log-likelihood). ``heldout_fraction`` and ``split_seed``: the held-out checkpoint rows (the
    study's 0.2 and 2546). ``n_iter``/``tol``: EM limits (the study's 10000 and hmmlearn's default 0.01,
    which the released code leaves as it is: EM stops once an iteration gains less than 0.01 in
    log-likelihood). ``steps``: the checkpoints decoded and drawn (a list, or text such as
    ``"polypythias"`` for :data:`POLYPYTHIAS_EVAL_STEPS`; None: all); the HMM is fitted on the same rows,
    or on every checkpoint with ``fit_all_steps``. ``standardise``: ``"run"`` (z-score per seed within
    each split, as the study) or ``"model"`` (over all seeds of a size). ``n_jobs``: worker processes
    for the fits (None: every core for a large study, see :func:`analysis.map_fit.fit_all`).
    Deterministic: the same maps whatever ``n_jobs``.

    A size that cannot be mapped (too few checkpoints, no model fits) is left out with a note in
    ``TrainingMaps.notes``; an AnalysisError when no size can be mapped.
    """
    return start_training_maps(metrics, options, **knobs).result()


def map_features(metrics: pd.DataFrame, features: list[str] | None) -> list[str]:
    """The features of the maps: those named that the study has (default: its ``weights/*`` metrics)."""
    names = sorted(set(map(str, metrics["metric"].unique())))
    chosen = [f for f in features or [n for n in names if n.startswith("weights/")] if f in names]
    if not chosen:
        raise AnalysisError(
            "The study has no features for training maps (no weights/* metrics); "
            "name metrics to use with --map-features."
        )
    return chosen


def prepare_all(
    metrics: pd.DataFrame, features: list[str], settings: MapSettings, notes_by_model: dict[str, list[str]]
) -> list[ModelData]:
    """Every size's rows, split for fitting; a size that cannot be mapped gets a note instead."""
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
    return prepared


def start_training_maps(metrics: pd.DataFrame, options: MapOptions | None = None, **knobs) -> MapsJob:
    """:func:`fit_training_maps` with the fits left running in worker processes (when it uses them):
    the caller can do other work and then call ``.result()``. Argument errors raise here."""
    options = replace(options or MapOptions(), **knobs)
    options.check()
    features = map_features(metrics, options.features)
    settings = options.settings()
    notes_by_model: dict[str, list[str]] = {}
    logging.getLogger("hmmlearn").setLevel(logging.ERROR)
    import hmmlearn.hmm  # noqa: F401  (loads scikit-learn's OpenMP runtime so that the limit below applies)
    from threadpoolctl import threadpool_limits

    # One thread: the k-means initialisation on a few hundred rows spends its time in OpenMP
    # barriers otherwise, ten times slower on a busy 2-core machine.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")
        prepared = prepare_all(metrics, features, settings, notes_by_model)
        check_states_possible(prepared, options.states)
        wait_for_fits = fit_all(prepared, settings, options.n_jobs)
    parameters = {
        "fit_all_steps": options.fit_all_steps,
        "standardise": options.standardise,
        "states": options.states,
        "max_states": options.max_states,
    }
    return MapsJob(prepared, settings, wait_for_fits, features, notes_by_model, parameters)
