"""Cross-seed statistics against direct numpy/scipy computations; Multi-Bootstrap; spread test."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from analysis import compare_models, cross_seed_stats, multi_bootstrap, spread_test
from analysis.stats import checkpoint_steps


def test_cross_seed_stats_match_numpy(outlier_study):
    steps = checkpoint_steps(outlier_study)
    table = cross_seed_stats(outlier_study, steps=steps, n_resamples=500)
    assert set(table["step"]) == set(steps)
    row = table[(table.model == "410m") & (table.step == 10_000) & (table.metric == "eval/piqa/acc")].iloc[0]
    rows = outlier_study[
        (outlier_study.model == "410m") & (outlier_study.step == 10_000) & (outlier_study.metric == "eval/piqa/acc")
    ]
    values = rows["value"].to_numpy()
    assert row["n"] == 10
    assert row["mean"] == pytest.approx(values.mean())
    assert row["std"] == pytest.approx(values.std(ddof=1))
    assert row["cv"] == pytest.approx(values.std(ddof=1) / abs(values.mean()))
    assert row["median"] == pytest.approx(np.median(values))
    assert row["iqr"] == pytest.approx(scipy_stats.iqr(values))
    assert (row["min"], row["max"]) == pytest.approx((values.min(), values.max()))
    direct = scipy_stats.bootstrap(
        (values,), np.mean, n_resamples=500, method="percentile", rng=np.random.default_rng(0)
    ).confidence_interval
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((direct.low, direct.high))


def test_cross_seed_stats_handle_missing_seeds():
    frame = pd.DataFrame(
        {"model": "70m", "seed": [0, 1, 2, 0], "step": [1, 1, 1, 2], "metric": "m", "value": [1.0, 2.0, 4.0, 5.0]}
    )
    table = cross_seed_stats(frame, n_resamples=200).set_index("step")
    assert table.loc[1, "n"] == 3 and table.loc[1, "std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert table.loc[2, "n"] == 1 and np.isnan(table.loc[2, "std"]) and np.isnan(table.loc[2, "ci_low"])


def test_multi_bootstrap_seed_level_and_per_item():
    rng = np.random.default_rng(0)
    a = rng.normal(0.50, 0.01, 10)
    b = rng.normal(0.55, 0.01, 10)
    result = multi_bootstrap(a, b, n_resamples=2000)
    assert result.difference == pytest.approx(b.mean() - a.mean())
    assert result.ci_low > 0 and result.p_value < 0.01 and result.n_items == 0
    same = multi_bootstrap(a, a + rng.normal(0, 0.01, 10), n_resamples=2000)
    assert same.ci_low < 0 < same.ci_high and same.p_value > 0.05
    # Per-item correctness (seeds x items): arm B answers 5 points more items right.
    items = rng.random(500)
    per_item_a = (rng.random((5, 500)) < items * 0 + 0.6).astype(float)
    per_item_b = (rng.random((5, 500)) < 0.65).astype(float)
    joint = multi_bootstrap(per_item_a, per_item_b, n_resamples=1000)
    assert joint.n_items == 500 and joint.ci_low < joint.difference < joint.ci_high
    assert joint.difference == pytest.approx(per_item_b.mean() - per_item_a.mean())


def test_compare_models_and_spread_test(stable_study):
    result = compare_models(stable_study, "train/loss", "70m", "160m", n_resamples=1000)
    assert result.difference == pytest.approx(-0.1, abs=0.03)  # the synthetic 160m loss is 0.1 lower
    assert result.ci_high < 0 and result.p_value == 1.0
    test = spread_test(stable_study, "valid/loss")
    finals = (
        stable_study[stable_study.metric == "valid/loss"]
        .sort_values("step")
        .groupby(["model", "seed"], observed=True)
        .tail(1)
    )
    groups = [g["value"].to_numpy() for _, g in finals.groupby("model", observed=True)]
    direct = scipy_stats.levene(*groups, center="median")
    assert test["statistic"] == pytest.approx(direct.statistic) and test["p_value"] == pytest.approx(direct.pvalue)


def test_bootstrap_interval_equals_scipy_bootstrap_for_every_row():
    """The batched percentile bootstrap draws scipy's resampling indices and takes scipy's quantiles:
    the same interval as ``scipy.stats.bootstrap`` row by row, up to rounding."""
    from analysis.stats import bootstrap_mean_ci

    rng = np.random.default_rng(1)
    for n_seeds in (2, 10, 100):
        values = rng.normal(size=(40, n_seeds)) * rng.uniform(0.1, 5, (40, 1)) + rng.normal(0, 50, (40, 1))
        ours = bootstrap_mean_ci(values, 500, 0.95, 3, groups_per_batch=7)
        scipy = scipy_stats.bootstrap(
            (values,),
            np.mean,
            axis=-1,
            vectorized=True,
            n_resamples=500,
            method="percentile",
            rng=np.random.default_rng(3),
        ).confidence_interval
        np.testing.assert_allclose(ours, np.c_[scipy.low, scipy.high], rtol=1e-12, atol=0)


def test_final_values_are_each_runs_last_value_in_label_order(stable_study):
    """Runs in model and run-label order (not the order of an unstable sort by step), the same whether
    the table is laid out as tidy() leaves it or shuffled."""
    from analysis.stats import final_values

    values = final_values(stable_study, "train/loss")
    assert list(values["seed"].astype(str)[values["model"] == "70m"]) == [str(s) for s in range(10)]
    assert (values["step"] == 30_000).all() and list(pd.unique(values["model"])) == ["70m", "160m"]
    last = stable_study[(stable_study.metric == "train/loss") & (stable_study.step == 30_000)]
    assert sorted(values["value"]) == sorted(last["value"])
    shuffled = final_values(stable_study.sample(frac=1, random_state=0), "train/loss")
    pd.testing.assert_frame_equal(values, shuffled)
    from analysis.tidy_table import run_blocks

    pd.testing.assert_frame_equal(values, final_values(stable_study, "train/loss", blocks=run_blocks(stable_study)))
