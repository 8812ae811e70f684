"""Fitting the hidden Markov models of the training maps (:mod:`analysis.training_maps`), one size at a
time: its rows prepared and split, every restart of every number of states fitted (in this process or
in worker processes), the kept restart and the number of states chosen as the PolyPythias release
does, and the size's paths decoded."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.map_paths import collapse, departure, majority_path, order_states_by_time
from analysis.map_rows import Split, split_rows

log = logging.getLogger(__name__)

MIN_CHECKPOINTS = 3  # a seed with fewer checkpoints is left out of its model's map

# Training rows x numbers of states from which the restarts are fitted in worker processes by default
# (about 25 runs x 154 checkpoints x 8; smaller studies fit in a second or two in this process).
PARALLEL_MIN_ROWS = 25_000
WORKER_IDLE_S = 10  # idle worker processes exit after this many seconds
TIE_RTOL = 1e-9  # held-out log-likelihoods this close are the same optimum (see better())


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
    for row, _ in kept.values():
        row["best_of_n"] = True
    if criterion == "ll":
        chosen = max(kept, key=lambda n: kept[n][0]["heldout_log_likelihood"])
    elif criterion in ("bic", "aic"):
        chosen = min(kept, key=lambda n: (kept[n][0][criterion], n))
    else:  # fixed: one candidate
        chosen = next(iter(kept))
    kept[chosen][0]["chosen"] = True
    return rows, kept[chosen][1], chosen


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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


def models_of(metrics: pd.DataFrame) -> list:
    """The models present in ``metrics``, in the order ``groupby("model")`` gives them."""
    column = metrics["model"]
    present = set(column.unique())
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [m for m in column.cat.categories if m in present]
    return sorted(present)


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
