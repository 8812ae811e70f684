"""Outlier runs, with known answers: healthy studies flag nothing, planted collapses and dips are
found at their onset checkpoint, the published 410M map gives the study's two outlier seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import find_outliers, flag_mad_outliers, load_study, standardised_accuracy
from analysis.outliers import OutlierRule, band_deviation, decision_threshold, pooled_deviation
from analysis.synthetic import Dip, correlated_study

PUBLISHED_MAP = Path(__file__).parents[1] / "data" / "polypythias_410m_training_maps.tsv"


def test_published_410m_map_gives_the_studys_two_outlier_seeds():
    study = load_study(PUBLISHED_MAP)
    outliers = find_outliers(study.metrics)
    assert set(outliers["metric"]) == {"score"}  # the HMM state is an integer code, not judged
    assert outliers[["seed", "onset_step"]].values.tolist() == [["3", 83_000], ["4", 123_000]]
    assert (outliers["max_deviation_sd"] < -10).all() and not outliers["recovered"].any()
    assert (outliers["band_deviation_sd"] < -2).all()  # the study's own band says so too


def test_null_studies_with_correlated_noise_flag_nothing():
    """Healthy seeds only, 27 checkpoints, correlated noise and persistent offsets of every strength
    in between the calibration's null models and beyond them (correlation up to 0.95, offsets up to 70%)."""
    rng = np.random.default_rng(11)
    flagged = []
    for draw in range(60):
        study = correlated_study(
            correlation=rng.uniform(0.3, 0.95), offset_share=rng.uniform(0.0, 0.7), random_state=1000 + draw
        )
        flagged.append(find_outliers(study, outlier_metrics=["score"]))
    assert pd.concat(flagged).empty


@pytest.mark.parametrize("draw", range(8))
def test_planted_collapse_and_recovering_dip_are_found_at_their_onset(draw):
    dips = (
        Dip(seed=3, onset_step=83_000, depth_sd=12.0),
        Dip(seed=6, onset_step=23_000, depth_sd=12.0, recovery_step=63_000),
    )
    study = correlated_study(dips=dips, random_state=draw)
    outliers = find_outliers(study, outlier_metrics=["score"])
    assert outliers[["seed", "onset_step"]].values.tolist() == [["3", 83_000], ["6", 23_000]]
    collapse, dip = outliers.iloc[0], outliers.iloc[1]
    assert not collapse["recovered"] and collapse["end_step"] == 143_000
    assert dip["recovered"] and dip["recovery_step"] == 63_000 and dip["end_step"] == 53_000


def test_two_runs_collapsing_together_do_not_hide_each_other():
    study = correlated_study(dips=(Dip(2, 93_000, 12.0), Dip(7, 93_000, 12.0)), random_state=5)
    outliers = find_outliers(study, outlier_metrics=["score"])
    assert outliers[["seed", "onset_step"]].values.tolist() == [["2", 93_000], ["7", 93_000]]


def test_decisions_are_causal():
    """A decision at a checkpoint does not change when later checkpoints are added."""
    study = correlated_study(dips=(Dip(4, 73_000, 12.0),), random_state=3)
    table = study.pivot_table(index="step", columns="seed", values="value", observed=True)
    full = pooled_deviation(table)
    cut = pooled_deviation(table.loc[:73_000])
    assert np.allclose(full.loc[:73_000].to_numpy(), cut.to_numpy(), equal_nan=True)


def test_deviation_is_leave_one_out_in_pooled_sds():
    rng = np.random.default_rng(1)
    table = pd.DataFrame(rng.normal(size=(5, 6)))
    rule = OutlierRule(scale_window=1, exclude_sd=np.inf)
    deviation = pooled_deviation(table, rule)
    others = table.iloc[0].drop(index=1)
    assert deviation.iloc[0, 1] == pytest.approx((table.iloc[0, 1] - others.mean()) / others.std(ddof=1))
    pooled = pooled_deviation(table, OutlierRule(scale_window=3, exclude_sd=np.inf))
    variances = [table.iloc[i].drop(index=2).var(ddof=1) for i in (2, 3, 4)]
    others = table.iloc[4].drop(index=2)
    assert pooled.iloc[4, 2] == pytest.approx((table.iloc[4, 2] - others.mean()) / np.sqrt(np.mean(variances)))
    assert np.isnan(pooled.iloc[0, 2])  # a window of 3 decides once 2 checkpoints are pooled
    assert band_deviation(table).iloc[0, 1] == pytest.approx(deviation.iloc[0, 1])


def test_threshold_is_calibrated_to_the_false_alarm_rate():
    strict, loose = decision_threshold(10, 27), decision_threshold(10, 27, OutlierRule(false_alarm_rate=0.05))
    assert 3 < loose < strict < 9
    assert decision_threshold(20, 27) < strict  # more runs: a tighter band
    assert decision_threshold(3, 27) == np.inf  # too few runs to judge


def test_standardised_accuracy_is_the_default_target(outlier_study):
    outliers = find_outliers(outlier_study)
    score = outliers[outliers["metric"] == "standardised_accuracy"]
    assert set(zip(score.model, score.seed, score.onset_step)) == {("410m", "3", 8_000), ("410m", "7", 12_000)}
    seed3 = score[score.seed == "3"].iloc[0]
    assert seed3["recovered"] and seed3["recovery_step"] == 14_000
    assert set(standardised_accuracy(outlier_study)["metric"]) == {"standardised_accuracy"}


def test_stable_study_flags_nothing(stable_study):
    assert find_outliers(stable_study).empty


def test_mad_rule_on_final_loss():
    losses = [2.50, 2.51, 2.49, 2.50, 2.95]  # five seeds, one far off
    frame = pd.DataFrame(
        {"model": "70m", "seed": [str(s) for s in range(5)], "step": 1000, "metric": "train/loss", "value": losses}
    )
    flagged = flag_mad_outliers(frame, "train/loss")
    assert flagged[["seed", "onset_step", "rule"]].values.tolist() == [["4", 1000, "mad_3.5"]]
    close = frame.assign(value=[2.500, 2.501, 2.499, 2.500, 2.510])  # 0.4% off: not an outlier
    assert flag_mad_outliers(close, "train/loss").empty
    assert not flag_mad_outliers(close, "train/loss", min_relative_deviation=0.0).empty
    assert flag_mad_outliers(frame[frame.seed != "0"], "train/loss").empty  # four runs: the MAD is too unstable


def test_unknown_outlier_metric_is_a_clear_error(stable_study):
    with pytest.raises(Exception, match="no metric 'nosuch'"):
        find_outliers(stable_study, outlier_metrics=["nosuch"])


def test_final_values_of_dense_curves_equal_those_of_the_pivoted_table(outlier_study):
    """final_rows takes each run's rows as slices of a tidy table: the same numbers, bit for bit, as
    final_row of the (step x run) table, and the same MAD flags on a shuffled table."""
    from analysis.outliers import final_row, final_rows, wide_by_seed

    study = outlier_study.copy()
    study.loc[(study.metric == "train/loss") & (study.model == "70m") & (study.seed == "5"), "value"] += 1.0
    from analysis.tidy_table import run_blocks

    blocks = run_blocks(study)
    for metric in ("train/loss", "valid/loss"):
        for fast in (final_rows(study, metric), final_rows(study, metric, blocks=blocks)):
            for model, table in wide_by_seed(study, metric).items():
                slow = final_row(table)
                assert list(map(str, slow.columns)) == list(fast[model].columns)
                assert list(slow.index) == list(fast[model].index)
                assert np.array_equal(slow.to_numpy(), fast[model].to_numpy())
    flagged = flag_mad_outliers(study, "train/loss")
    assert flagged[["model", "seed"]].values.tolist() == [["70m", "5"]]
    pd.testing.assert_frame_equal(flagged, flag_mad_outliers(study.sample(frac=1, random_state=0), "train/loss"))
    pd.testing.assert_frame_equal(flagged, flag_mad_outliers(study, "train/loss", blocks=blocks))
