"""The batched E-step (analysis.hmm_batch) against hmmlearn's own GaussianHMM: the same fits."""

import warnings

import numpy as np
import pytest
from hmmlearn.hmm import GaussianHMM
from sklearn.utils import check_random_state

from analysis.hmm_batch import BatchedGaussianHMM, StopOnNonFinite, fit_together
from analysis.training_maps import Split, split_rows, wide_features
from tests.analysis.test_training_maps import planted_study


@pytest.fixture(scope="module")
def splits():
    study = planted_study(n_seeds=6, fall_back={2: 0})
    wide = wide_features(study, [f"weights/f{j}" for j in range(4)])
    train_at, heldout_at = split_rows(len(wide))
    return Split.of(wide.iloc[train_at], "run"), Split.of(wide.iloc[heldout_at], "run")


def fitted(cls, n_states, seed, X, lengths):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(
            n_components=n_states, covariance_type="diag", n_iter=10000, random_state=check_random_state(seed)
        ).fit(X, lengths)


@pytest.mark.parametrize("n_states", [1, 2, 3, 5, 8])
def test_batched_fit_is_hmmlearns_fit(splits, n_states):
    """Same EM iterations, parameters and held-out scores as hmmlearn.hmm.GaussianHMM (up to rounding),
    the same Viterbi paths; sequences of different lengths, one of a single row."""
    train, heldout = splits
    lengths = [*train.lengths[:-1], train.lengths[-1] - 1, 1]
    for seed in (5329, 4754):
        theirs = fitted(GaussianHMM, n_states, seed, train.X, lengths)
        ours = fitted(BatchedGaussianHMM, n_states, seed, train.X, lengths)
        assert ours.monitor_.iter == theirs.monitor_.iter and ours.monitor_.converged == theirs.monitor_.converged
        for name in ("startprob_", "transmat_", "means_", "covars_"):
            np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-7, atol=1e-10)
        for method in ("score", "bic", "aic"):
            assert getattr(ours, method)(heldout.X, heldout.lengths) == pytest.approx(
                getattr(theirs, method)(heldout.X, heldout.lengths), rel=1e-9
            )
        assert (ours.predict(train.X, lengths) == theirs.predict(train.X, lengths)).all()


def test_fitting_together_ends_where_each_fit_alone_ends(splits):
    train, _ = splits
    other = train.X[: sum(train.lengths[:3])] * 1.5
    models = [
        BatchedGaussianHMM(n_components=4, covariance_type="diag", n_iter=10000, random_state=check_random_state(seed))
        for seed in (5329, 2332, 4642)
    ]
    Xs, lengths = [train.X, other, train.X], [train.lengths, train.lengths[:3], train.lengths]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fit_together(models, Xs, lengths) == [None, None, None]
    for model, X, x, seed in zip(models, Xs, lengths, (5329, 2332, 4642)):
        alone = fitted(GaussianHMM, 4, seed, X, x)
        assert model.monitor_.iter == alone.monitor_.iter
        np.testing.assert_allclose(model.means_, alone.means_, rtol=1e-7, atol=1e-10)


def test_em_stops_once_the_log_likelihood_is_not_finite():
    """hmmlearn would iterate on NaN parameters up to n_iter (a NaN gain is never below tol); the
    model is unusable either way (its score raises, the released code skips it)."""
    monitor = StopOnNonFinite(tol=1e-2, n_iter=10000, verbose=False)
    monitor.report(-100.0)
    assert not monitor.converged
    monitor.report(np.nan)
    assert monitor.converged and monitor.iter == 2
