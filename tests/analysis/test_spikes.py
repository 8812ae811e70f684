"""Loss spikes: injected spikes are found at their steps, nothing in stable runs."""

import numpy as np
import pandas as pd
import pytest

from analysis import find_spikes
from analysis.spikes import rolling_band


def test_injected_spikes_are_found_exactly(outlier_study):
    scores, spikes = find_spikes(outlier_study)
    loss_spikes = spikes[spikes.metric == "train/loss"]
    assert set(zip(loss_spikes.model, loss_spikes.seed)) == {("70m", "2")}
    assert loss_spikes["step"].tolist() == [5_000, 9_000]
    assert loss_spikes["height_sd"].tolist()[0] == pytest.approx(30, rel=0.2)
    assert loss_spikes["height_sd"].tolist()[1] == pytest.approx(15, rel=0.2)
    assert loss_spikes["recovered"].all() and (loss_spikes["steps_to_recover"] <= 5).all()
    grad_spikes = spikes[spikes.metric == "train/grad_norm"]
    assert set(zip(grad_spikes.model, grad_spikes.seed)) == {("70m", "2")}
    assert grad_spikes["step"].tolist() == [4_999, 8_999]  # the gradient norm rises a step earlier
    flagged = scores[scores.n_spikes > 0]
    assert set(zip(flagged.model, flagged.seed)) == {("70m", "2")}
    run = scores[(scores.model == "70m") & (scores.seed == "2") & (scores.metric == "train/loss")].iloc[0]
    assert run["spike_score"] == pytest.approx(run["n_spike_values"] / run["n_values"])
    assert run["n_values"] == 20_001 - 1000


def test_stable_study_has_no_spikes(stable_study):
    scores, spikes = find_spikes(stable_study)
    assert spikes.empty
    assert (scores["spike_score"] == 0).all()


def test_rolling_band_uses_previous_values_only():
    values = np.arange(10, dtype=float)
    mean, sd = rolling_band(values, window_values=3)
    assert np.isnan(mean[:3]).all()
    assert mean[3] == pytest.approx(1.0) and sd[3] == pytest.approx(1.0)  # values 0, 1, 2


def test_unrecovered_spike_and_parameters():
    values = np.r_[np.random.default_rng(0).normal(0, 1, 200), np.full(20, 50.0)]
    frame = pd.DataFrame({"model": "70m", "seed": 0, "step": np.arange(220), "metric": "train/loss", "value": values})
    _, spikes = find_spikes(frame, window_values=100, threshold_sd=7)
    assert spikes["step"].tolist() == [200] and not spikes["recovered"].iloc[0]
    _, none = find_spikes(frame, window_values=100, threshold_sd=100)
    assert none.empty


def test_spikes_do_not_depend_on_the_row_order(outlier_study):
    """Array slices of a tidy table (analysis.tidy_table.run_blocks) and grouping a shuffled one agree."""
    from analysis.tidy_table import run_blocks

    assert run_blocks(outlier_study) is not None
    shuffled = outlier_study.sample(frac=1, random_state=0)
    assert run_blocks(shuffled) is None
    for ours, theirs in zip(find_spikes(outlier_study), find_spikes(shuffled)):
        pd.testing.assert_frame_equal(ours, theirs)
