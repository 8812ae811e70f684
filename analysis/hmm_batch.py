"""hmmlearn's ``GaussianHMM`` with the forward-backward pass run for all sequences at once.

``hmmlearn.hmm.GaussianHMM.fit(X, lengths)`` runs its E-step one sequence at a time
(``hmmlearn/base.py``, ``_AbstractHMM._do_estep``: a Python loop over ``split_X_lengths`` calling the
compiled ``forward_log``/``backward_log``/``compute_log_xi_sum`` per sequence). A training map fits
one HMM on every seed of a size together (one sequence per seed, EleutherAI/pythia, branch
``polypythias``, ``polypythias/training-maps/training_map.py``), so at a hundred seeds the fit is
a hundred small calls per EM iteration and the Python overhead dominates.

:class:`BatchedGaussianHMM` is ``GaussianHMM`` with two methods replaced by the same computation
over all sequences together (arrays padded to the longest sequence, time-major):

* ``_do_estep``: the sufficient statistics hmmlearn accumulates (``start``, ``trans``, ``post``,
  ``obs``, ``obs**2``, ``nobs``) and the summed log-likelihood, from the scaled forward-backward
  recursions (Rabiner 1989, section V.A; hmmlearn's ``implementation="scaling"``), each frame's
  emission log-densities (hmmlearn's diagonal-Gaussian formula, its quadratic term as one matrix
  product, :func:`log_density_diag`) shifted by their maximum before exponentiating so that nothing
  underflows;
* ``_score`` without posteriors (``score``, and so ``bic``/``aic``): the same forward pass.

:func:`fit_together` runs hmmlearn's ``fit`` loop for several such models at once (the restarts of
one number of states, on one or several sizes' sequences), their E-steps in one batched pass.
Everything else is hmmlearn's own: ``_init`` (k-means means, Dirichlet start and transition
probabilities from the given random state), ``_do_mstep``, ``_check``, the convergence monitor
(``tol``, ``n_iter``), ``predict``/``decode`` (Viterbi). The statistics equal hmmlearn's log-space
ones up to floating-point rounding (``tests/analysis/test_hmm_batch.py`` compares iteration counts,
parameters, held-out scores and Viterbi paths). When a frame has zero probability under every
reachable state (a scaling factor of 0, which the log-space code still represents, e.g. a held-out
row whose likeliest state has start probability 0) that model's E-step or score falls back to
hmmlearn's per-sequence code.

One more difference, in time only: once the log-likelihood is not finite (the parameters have
become NaN, e.g. a state that lost all its mass), hmmlearn's EM keeps iterating on NaN until
``n_iter`` (a NaN gain is never below ``tol``), and the fitted model then fails ``score`` with
``ValueError`` ("startprob_ must sum to 1 (got nan)"), which the released code skips. Here EM stops
at the first non-finite log-likelihood; the model is just as NaN and is skipped the same way.
"""

from __future__ import annotations

import numpy as np
from hmmlearn.base import ConvergenceMonitor
from hmmlearn.hmm import GaussianHMM
from sklearn.utils import check_array
from sklearn.utils.validation import check_is_fitted


class StopOnNonFinite(ConvergenceMonitor):
    """hmmlearn's monitor (``history[-1] - history[-2] < tol`` or ``n_iter``), which also stops once
    the log-likelihood is NaN or infinite: EM cannot recover from it (NaN parameters stay NaN)."""

    @property
    def converged(self):
        return super().converged or (len(self.history) > 0 and not np.isfinite(self.history[-1]))


class Padded:
    """Sequence sets, one per model, as time-major padded positions (T, G, S): ``rows[t, g, s]`` is the row
    of model g's X at time t of its sequence s, ``valid`` marks real ones (a model with fewer sequences
    has empty ones). ``flat`` is that row in all models' rows one after the other (padded positions: one
    past the last), ``positions`` the reverse: where each of those rows sits in (T, G, S), flattened."""

    def __init__(self, lengths_per_model: list):
        lengths = [np.asarray(lengths, dtype="int64") for lengths in lengths_per_model]
        n_seq = max(len(x) for x in lengths)
        self.lengths = np.zeros((len(lengths), n_seq), dtype="int64")  # (G, S)
        for g, x in enumerate(lengths):
            self.lengths[g, : len(x)] = x
        starts = np.cumsum(self.lengths, axis=1) - self.lengths
        t = np.arange(int(self.lengths.max()))[:, None, None]
        self.valid = t < self.lengths[None]  # (T, G, S)
        self.rows = np.where(self.valid, starts[None] + t, 0)
        self.last = t >= self.lengths[None] - 1  # at or after each sequence's last frame
        self.has_next = t[:-1] < self.lengths[None] - 1  # frames t and t+1 both real: a transition
        self.n_rows = self.lengths.sum(axis=1)  # (G,)
        offsets = np.cumsum(self.n_rows) - self.n_rows
        self.flat = np.where(self.valid, offsets[None, :, None] + self.rows, int(self.n_rows.sum()))
        order = np.arange(self.valid.size).reshape(self.valid.shape)
        self.positions = np.concatenate([order[:, g].T[self.valid[:, g].T] for g in range(len(lengths))])

    def spread(self, values: list[np.ndarray], fill: float) -> np.ndarray:
        """One (n_rows_g, k) array per model -> (T, G, S, k), ``fill`` at padded positions (one gather)."""
        rows = np.concatenate([*values, np.full((1, values[0].shape[1]), fill)])
        return np.take(rows, self.flat, axis=0)

    def gather(self, padded: np.ndarray) -> list[np.ndarray]:
        """(T, G, S, k) -> per model its (n_rows_g, k) in its X's row order (sequence by sequence)."""
        rows = np.take(padded.reshape(-1, padded.shape[-1]), self.positions, axis=0)
        return np.split(rows, np.cumsum(self.n_rows)[:-1])


def row_sum(values: np.ndarray) -> np.ndarray:
    """Sum over the last (states) axis as one matrix-vector product: numpy's reduction over a short last
    axis costs about ten times more."""
    return (values.reshape(-1, values.shape[-1]) @ np.ones(values.shape[-1])).reshape(values.shape[:-1])


def row_max(values: np.ndarray) -> np.ndarray:
    """Maximum over the last (states) axis, one state at a time (see :func:`row_sum`)."""
    out = values[..., 0].copy()
    for k in range(1, values.shape[-1]):
        np.maximum(out, values[..., k], out=out)
    return out


class Rows:
    """One model's training rows ``X`` with what every E-step reads of them: ``squares`` (X ** 2) and
    ``both`` ([X ** 2, X] side by side, for :func:`log_density_diag`), computed once per fit."""

    def __init__(self, X: np.ndarray):
        self.X = X
        self.squares = X**2
        self.both = np.hstack([self.squares, X])


def log_density_diag(X: np.ndarray, means: np.ndarray, covars: np.ndarray, rows: Rows | None = None) -> np.ndarray:
    """(n_samples, n_components) Gaussian log-densities with diagonal covariances, the formula of
    hmmlearn's ``stats._log_multivariate_normal_density_diag`` with its quadratic term expanded,
    sum((x - mu)^2 / var) = x^2 . (1/var) - 2 x . (mu/var) + sum(mu^2/var), as one matrix product
    instead of an (n_samples, n_components, n_features) array (the same up to rounding). ``rows``:
    :class:`Rows` of ``X``, when the caller keeps them."""
    n_features = means.shape[1]
    covars = np.maximum(covars, np.finfo(float).tiny)
    precision = 1.0 / covars
    both = rows.both if rows is not None else np.hstack([X**2, X])
    quadratic = both @ np.vstack([precision.T, (-2.0 * means * precision).T])
    constant = n_features * np.log(2 * np.pi) + np.log(covars).sum(axis=1) + (means**2 * precision).sum(axis=1)
    with np.errstate(over="ignore"):
        return -0.5 * (constant[None, :] + quadratic)


def forward(startprob: np.ndarray, transmat: np.ndarray, log_frameprob: np.ndarray, padded: Padded):
    """Scaled forward pass of G models over padded (T, G, S, N) log emission densities (startprob (G, N),
    transmat (G, N, N)): scaled alphas, scaling factors (T, G, S), the shifted frame probabilities and each
    model's log-likelihood (G,), NaN where a frame has zero probability under every reachable state.
    The frame probabilities are computed in the array ``log_frameprob`` (so it is no longer the caller's)."""
    shift = row_max(log_frameprob)[..., None]
    shift[~np.isfinite(shift)] = 0.0
    with np.errstate(under="ignore"):
        frameprob = np.exp(np.subtract(log_frameprob, shift, out=log_frameprob), out=log_frameprob)
    alpha = np.empty_like(frameprob)
    scale = np.empty(frameprob.shape[:3])
    a = startprob[:, None, :] * frameprob[0]
    with np.errstate(invalid="ignore", divide="ignore", under="ignore"):
        for t in range(frameprob.shape[0]):
            if t:
                a = np.matmul(alpha[t - 1], transmat) * frameprob[t]
            c = row_sum(a)
            scale[t] = c
            alpha[t] = a / c[..., None]
        impossible = (padded.valid & ~(scale > 0)).any(axis=(0, 2))
        log_scale = np.where(padded.valid, np.log(scale) + shift[..., 0], 0.0)
    log_prob = log_scale.sum(axis=(0, 2))
    log_prob[impossible] = np.nan
    return alpha, scale, frameprob, log_prob


def estep(
    models: list, Xs: list[np.ndarray], lengths: list, rows: list[Rows] | None = None, padded: Padded | None = None
) -> list[tuple[dict, float]]:
    """hmmlearn's E-step (sufficient statistics and summed log-likelihood) of several models with the
    same number of states, each on its own sequences, in one batched pass; a model with a frame that
    has zero probability under every reachable state gets hmmlearn's own log-space E-step. ``rows``
    (:class:`Rows` of each ``X``) and ``padded`` (``Padded(lengths)``): when the caller keeps them from
    one E-step to the next."""
    rows = rows if rows is not None else [Rows(X) for X in Xs]
    padded = padded if padded is not None else Padded(lengths)
    log_frameprob = padded.spread(
        [log_density_diag(X, h.means_, h._covars_, r) for h, X, r in zip(models, Xs, rows)], 0.0
    )
    startprob = np.stack([h.startprob_ for h in models])
    transmat = np.stack([h.transmat_ for h in models])
    alpha, scale, frameprob, log_prob = forward(startprob, transmat, log_frameprob, padded)
    beta = np.ones_like(alpha)
    transposed = transmat.transpose(0, 2, 1)
    last = padded.last[..., None].astype("float64")  # 1 at and after each sequence's last frame
    with np.errstate(under="ignore", invalid="ignore", divide="ignore"):
        scaled = np.divide(frameprob, scale[..., None], out=frameprob)  # b_t / c_t, 0 when padded
        scaled[~padded.valid] = 0.0
        for t in range(alpha.shape[0] - 2, -1, -1):
            # beta_t = A (b_{t+1} beta_{t+1} / c_{t+1}), 1 at the last frame (where frame t+1 is padding: 0 + 1)
            np.add(np.matmul(scaled[t + 1] * beta[t + 1], transposed), last[t], out=beta[t])
        weighted = scaled * beta  # b_{t+1} beta_{t+1} / c_{t+1}, read at t+1
        posteriors = alpha * beta
        posteriors /= row_sum(posteriors)[..., None]
    n = transmat.shape[1]
    gammas = padded.gather(posteriors)
    results = []
    for g, (h, X) in enumerate(zip(models, Xs)):
        if not np.isfinite(log_prob[g]):
            results.append(GaussianHMM._do_estep(h, X, lengths[g]))
            continue
        stats = h._initialize_sufficient_statistics()
        stats["nobs"] = len(lengths[g])
        if "s" in h.params:
            stats["start"] += posteriors[0, g][padded.valid[0, g]].sum(axis=0)
        if "t" in h.params and alpha.shape[0] > 1:
            left = (alpha[:-1, g] * padded.has_next[:, g, :, None]).reshape(-1, n)
            stats["trans"] += (left.T @ weighted[1:, g].reshape(-1, n)) * h.transmat_
        gamma = gammas[g]
        if h._needs_sufficient_statistics_for_mean():
            stats["post"] += gamma.sum(axis=0)
            stats["obs"] += gamma.T @ X
        if h._needs_sufficient_statistics_for_covars():
            stats["obs**2"] += gamma.T @ rows[g].squares
        results.append((stats, float(log_prob[g])))
    return results


class BatchedGaussianHMM(GaussianHMM):
    """``hmmlearn.hmm.GaussianHMM`` whose E-step and scoring handle all sequences in one pass (see the
    module docstring); same constructor, same fitted parameters up to rounding. Diagonal covariances
    with ``implementation="log"`` (the default, and the study's); anything else runs hmmlearn's code."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.monitor_ = StopOnNonFinite(self.tol, self.n_iter, self.verbose)

    def _batched(self) -> bool:
        return self.covariance_type == "diag" and self.implementation == "log"

    def _do_estep(self, X, lengths):
        if not self._batched():
            return super()._do_estep(X, lengths)
        return estep([self], [X], [lengths])[0]

    def _score(self, X, lengths=None, *, compute_posteriors):
        if compute_posteriors or not self._batched():
            return super()._score(X, lengths, compute_posteriors=compute_posteriors)
        check_is_fitted(self, "startprob_")
        self._check()
        X = check_array(X)
        padded = Padded([[len(X)] if lengths is None else lengths])
        log_frameprob = padded.spread([self._compute_log_likelihood(X)], 0.0)
        log_prob = forward(self.startprob_[None], self.transmat_[None], log_frameprob, padded)[3][0]
        if not np.isfinite(log_prob):
            return super()._score(X, lengths, compute_posteriors=False)
        return float(log_prob), np.empty((0, self.n_components))


def fit_together(models: list[BatchedGaussianHMM], Xs: list[np.ndarray], lengths: list) -> list[Exception | None]:
    """``model.fit(X, lengths)`` for each model, the E-steps of all models still iterating batched into
    one pass (they must have the same number of states). Each model follows hmmlearn's ``fit`` loop
    (``hmmlearn/base.py``, ``_AbstractHMM.fit``): its own ``_init`` and random state, E-step, lower
    bound, ``_do_mstep``, ``monitor_.report`` and stop at ``monitor_.converged``; so each ends exactly
    where fitting it alone ends. Returns, per model, the ``ValueError`` its fit raised, or None."""
    errors: list[Exception | None] = [None] * len(models)
    if not all(h._batched() for h in models):
        for g, (h, X, x) in enumerate(zip(models, Xs, lengths)):
            try:
                h.fit(X, x)
            except ValueError as error:
                errors[g] = error
        return errors
    Xs = [check_array(X) for X in Xs]
    lengths = [np.asarray([len(X)]) if x is None else x for X, x in zip(Xs, lengths)]
    active = []
    for g, (h, X, x) in enumerate(zip(models, Xs, lengths)):
        try:
            h._init(X, x)
            h._check()
        except ValueError as error:
            errors[g] = error
            continue
        h.monitor_._reset()
        if h.n_iter > 0:
            active.append(g)
    rows = [Rows(X) for X in Xs]  # what each E-step reads of the rows, computed once
    padded = None  # the layout of the active models' sequences, made again when one of them stops
    while active:
        if padded is None or padded[0] != active:
            padded = (active, Padded([lengths[g] for g in active]))
        results = estep(
            [models[g] for g in active],
            [Xs[g] for g in active],
            [lengths[g] for g in active],
            [rows[g] for g in active],
            padded[1],
        )
        still = []
        for g, (stats, logprob) in zip(active, results):
            h = models[g]
            lower_bound = h._compute_lower_bound(logprob)
            h._do_mstep(stats)
            h.monitor_.report(lower_bound)
            if not h.monitor_.converged:
                still.append(g)
        active = still
    return errors
