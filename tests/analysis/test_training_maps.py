"""Training maps fitted as the PolyPythias release does: held-out selection of the number of states,
per-split z-scoring, the study's random states, decoding on chosen checkpoints, and the figures."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import zscore
from sklearn.model_selection import train_test_split

from analysis import AnalysisError, fit_training_maps
from analysis.training_maps import (
    POLYPYTHIAS_EVAL_STEPS,
    POLYPYTHIAS_RESTART_SEEDS,
    SELECTION_COLUMNS,
    Split,
    restart_seeds,
    split_rows,
    wide_features,
)

STEPS = np.asarray(POLYPYTHIAS_EVAL_STEPS)
FALL_BACK_STEP = int(STEPS[-4])  # 113,000: the last four checkpoints


N_FEATURES = 4  # features of a planted study
NOISE = 0.25  # SD of each feature's noise per checkpoint
LATE = 4  # checkpoints at the end for which a falling-back seed returns to an earlier phase


def planted_study(
    n_states: int = 4,
    n_seeds: int = 10,
    steps=STEPS,
    fall_back: dict | None = None,
    model: str = "410m",
    random_state: int = 0,
):
    """Features on a piecewise-constant trajectory: ``n_states`` phases of equal numbers of checkpoints,
    phase p at p * direction (one direction of size ~1 per feature, N_FEATURES of them) plus N(0, NOISE)
    per checkpoint. ``fall_back`` {seed: phase}: that seed returns to an earlier phase for its last
    LATE checkpoints (default: seed 3 to phase 1 and seed 4 to phase 0, like the study's two 410M outliers)."""
    n_features, noise, late = N_FEATURES, NOISE, LATE
    fall_back = {3: 1, 4: 0} if fall_back is None else fall_back
    rng = np.random.default_rng(random_state)
    steps = np.asarray(steps)
    phase = np.minimum(np.arange(len(steps)) * n_states // len(steps), n_states - 1)
    direction = rng.choice([-1.0, 1.0], n_features) * rng.uniform(0.7, 1.3, n_features)
    frames = []
    for seed in range(n_seeds):
        phases = phase.copy()
        if seed in fall_back:
            phases[len(steps) - late :] = fall_back[seed]
        values = phases[:, None] * direction[None, :] + rng.normal(0, noise, (len(steps), n_features))
        for j in range(n_features):
            frames.append(
                pd.DataFrame(
                    {"model": model, "seed": seed, "step": steps, "metric": f"weights/f{j}", "value": values[:, j]}
                )
            )
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def planted_maps():
    """The study's settings except half the checkpoint rows held out (see the test below)."""
    return fit_training_maps(planted_study(), heldout_fraction=0.5)


def test_heldout_bic_finds_the_planted_states_and_the_two_fall_back_seeds(planted_maps):
    maps = planted_maps
    assert list(maps.selection.columns) == SELECTION_COLUMNS
    selection = maps.selection
    assert sorted(selection["n_states"].unique()) == list(range(1, 9))
    assert set(selection["restart"]) == set(POLYPYTHIAS_RESTART_SEEDS) and len(selection) == 8 * 5
    assert selection[["heldout_log_likelihood", "bic", "aic"]].notna().all().all()
    assert (selection["n_heldout_rows"] == 135).all() and (selection["n_train_rows"] == 135).all()
    best = maps.best_per_n()
    assert list(best["n_states"]) == list(range(1, 9))  # one kept restart per n: the best held-out LL
    for n, group in selection.groupby("n_states"):
        kept = best.loc[best.n_states == n, "heldout_log_likelihood"].item()
        assert kept == pytest.approx(group["heldout_log_likelihood"].max(), rel=1e-9)
        # of restarts reaching the same optimum, the first is kept (as the released code's score > best)
        assert (
            best.loc[best.n_states == n, "restart"].item()
            == group.loc[np.isclose(group["heldout_log_likelihood"], kept, rtol=1e-9, atol=0), "restart"].iloc[0]
        )
    chosen = maps.chosen()
    assert len(chosen) == 1 and chosen["n_states"].item() == 4 and maps.criterion == "bic"
    assert (selection["criterion"] == "bic").all()
    assert chosen["bic"].item() == best["bic"].min()

    departures = maps.departures.set_index("seed")
    assert sorted(departures.index) == [3, 4]
    assert departures.loc[3, "path"] == "0-1-2-3-1" and departures.loc[4, "path"] == "0-1-2-3-0"
    assert departures["fell_back"].all() and (departures["fall_back_step"] == FALL_BACK_STEP).all()
    assert (departures["departure_step"] == FALL_BACK_STEP).all()
    paths = maps.paths
    assert list(paths.columns) == ["model", "seed", "step", "state"] and len(paths) == 10 * 27
    stable = paths[paths.seed == 0].sort_values("step")["state"].to_numpy()
    assert (np.diff(stable) >= 0).all() and list(np.unique(stable)) == [0, 1, 2, 3]  # states numbered by time
    assert list(maps.majority["state"]) == sorted(maps.majority["state"])


def test_the_study_default_split_holds_out_too_few_rows_per_seed_to_see_every_phase():
    """0.2 of 27 checkpoints is ~5 held-out rows per seed, z-scored over themselves: the held-out
    criteria then prefer fewer states than were planted (documented in analysis/training_maps.py)."""
    maps = fit_training_maps(planted_study(), n_iter=200)
    assert maps.settings["heldout_fraction"] == 0.2 and maps.settings["split_seed"] == 2546
    assert (maps.selection["n_heldout_rows"] == 54).all()
    assert maps.chosen()["n_states"].item() < 4


def test_fixed_states_fit_only_that_number_and_criteria_are_recorded():
    study = planted_study()
    fixed = fit_training_maps(study, states=4, restarts=2, heldout_fraction=0.5, n_iter=200)
    assert set(fixed.selection["n_states"]) == {4} and list(fixed.selection["restart"]) == [5329, 2332]
    assert fixed.criterion == "fixed" and fixed.chosen()["n_states"].item() == 4
    assert sorted(fixed.departures["seed"]) == [3, 4]
    by_aic = fit_training_maps(study, max_states=5, restarts=[7, 8], criterion="aic", heldout_fraction=0.5, n_iter=200)
    assert by_aic.criterion == "aic" and set(by_aic.selection["restart"]) == {7, 8}
    assert by_aic.chosen()["aic"].item() == by_aic.best_per_n()["aic"].min()
    by_ll = fit_training_maps(study, max_states=5, restarts=1, criterion="ll", heldout_fraction=0.5, n_iter=200)
    assert by_ll.chosen()["heldout_log_likelihood"].item() == by_ll.selection["heldout_log_likelihood"].max()
    with pytest.raises(AnalysisError, match="criterion"):
        fit_training_maps(study, criterion="cv")
    with pytest.raises(AnalysisError, match="held-out fraction"):
        fit_training_maps(study, heldout_fraction=1.0)


def test_restart_seeds_split_and_per_split_zscores_follow_the_released_code():
    assert restart_seeds() == (5329, 2332, 4642, 6432, 4754) and restart_seeds(2) == (5329, 2332)
    assert restart_seeds(7)[:5] == POLYPYTHIAS_RESTART_SEEDS and len(set(restart_seeds(7))) == 7
    assert restart_seeds([1, 2]) == (1, 2)
    with pytest.raises(AnalysisError):
        restart_seeds(0)
    train, heldout = train_test_split(np.arange(270), test_size=0.2, random_state=2546)
    ours = split_rows(270)
    assert (ours[0] == np.sort(train)).all() and (ours[1] == np.sort(heldout)).all() and len(ours[1]) == 54

    wide = wide_features(planted_study(n_seeds=3), [f"weights/f{j}" for j in range(4)])
    part = wide.iloc[split_rows(len(wide))[1]]
    split = Split.of(part.sample(frac=1, random_state=0), "run")  # any row order: sorted by (seed, step)
    expected = np.vstack(
        [zscore(part.xs(seed, level="seed").sort_index().to_numpy(), axis=0, ddof=0) for seed in (0, 1, 2)]
    )
    assert split.lengths == [int((part.index.get_level_values("seed") == s).sum()) for s in (0, 1, 2)]
    np.testing.assert_allclose(split.X, expected)


def test_steps_restrict_decoding_and_maps_are_deterministic():
    study = planted_study()
    few = POLYPYTHIAS_EVAL_STEPS[::2]
    maps = fit_training_maps(study, max_states=4, restarts=2, heldout_fraction=0.5, n_iter=200, steps=few)
    assert sorted(maps.paths["step"].unique()) == sorted(few) and maps.settings["steps"] == sorted(few)
    again = fit_training_maps(study, max_states=4, restarts=2, heldout_fraction=0.5, n_iter=200, steps=few)
    pd.testing.assert_frame_equal(maps.paths, again.paths)
    pd.testing.assert_frame_equal(maps.selection, again.selection)
    denser = planted_study(steps=np.arange(0, 143001, 1000))
    named = fit_training_maps(denser, states=3, restarts=1, n_iter=200, steps="polypythias")
    assert sorted(named.paths["step"].unique()) == [s for s in POLYPYTHIAS_EVAL_STEPS if s % 1000 == 0]
    assert (named.selection["n_train_rows"] + named.selection["n_heldout_rows"] == 10 * 17).all()
    everywhere = fit_training_maps(
        denser, states=3, restarts=1, n_iter=200, steps="polypythias", fit_all_steps=True, standardise="model"
    )
    assert (everywhere.selection["n_train_rows"] + everywhere.selection["n_heldout_rows"] == 10 * 144).all()
    assert len(everywhere.paths) == 10 * 17


def test_tiny_studies_leave_out_what_cannot_be_mapped_with_a_clear_reason():
    study = planted_study(n_seeds=4, fall_back={})
    short = study[(study.seed != 2) | (study.step <= 1)]  # seed 2 has two checkpoints
    maps = fit_training_maps(short, max_states=3, restarts=1, n_iter=100)
    assert set(maps.paths["seed"]) == {0, 1, 3} and any("seed(s) 2 left out" in n for n in maps.notes)

    tiny = planted_study(n_seeds=2, steps=[0, 1], model="14m", fall_back={})  # two checkpoints per seed
    both = fit_training_maps(pd.concat([study, tiny]), max_states=2, restarts=1, n_iter=100)
    assert set(both.paths["model"]) == {"410m"} and any("14m skipped" in n for n in both.notes)
    three_rows = fit_training_maps(
        planted_study(n_seeds=1, steps=[0, 1, 2], fall_back={}), max_states=2, restarts=1, n_iter=100
    )  # one seed, three checkpoints: still a map
    assert len(three_rows.paths) == 3
    with pytest.raises(AnalysisError, match="No model could be mapped"):
        fit_training_maps(planted_study(n_seeds=2, steps=[0, 1], fall_back={}), max_states=2, restarts=1)
    with pytest.raises(AnalysisError, match="no features"):
        fit_training_maps(
            pd.DataFrame({"model": "70m", "seed": 0, "step": [1, 2], "metric": "train/loss", "value": [1.0, 2.0]})
        )


def test_map_and_selection_figures(planted_maps, tmp_path):
    from analysis import plots

    paths = planted_maps.paths
    score = paths.assign(metric="score", value=paths["state"] + 0.1 * paths["seed"])[
        ["model", "seed", "step", "metric", "value"]
    ]
    one = plots.training_map_figure(score, paths, "410m", set(), "score")
    assert len(one.axes) == 1  # no outlier seeds: one panel, no empty second panel
    two = plots.training_map_figure(score, paths, "410m", {"3", 4}, "score")  # labels or numbers
    assert len(two.axes) == 2 and two.axes[1].get_xscale() == "symlog"
    assert "3, 4" in two.axes[1].get_title()
    assert plots.plot_training_map(score, paths, "410m", set(), tmp_path / "map.png", "score").is_file()
    figure = plots.map_selection_figure(planted_maps.selection, "410m")
    assert len(figure.axes) == 2 and "4 states chosen (by BIC)" in figure.get_suptitle()
    written = plots.plot_map_selection(planted_maps.selection, "410m", tmp_path / "analysis_map_selection_410m.png")
    assert written.is_file() and written.stat().st_size > 10_000
    assert plots.plot_map_selection(planted_maps.selection, "70m", tmp_path / "none.png") is None


def test_cli_map_options_reach_the_report(tmp_path):
    from analysis.__main__ import main

    path = tmp_path / "study.csv"
    planted_study(n_states=3, n_seeds=6, steps=np.arange(0, 143001, 1000)).to_csv(path, index=False)
    out = tmp_path / "out"
    assert (
        main(
            [
                str(path),
                "--out",
                str(out),
                "--states",
                "3",
                "--restarts",
                "2",
                "--map-heldout-fraction",
                "0.3",
                "--map-split-seed",
                "7",
                "--map-steps",
                "polypythias",
                "--no-mlflow-log",
            ]
        )
        == 0
    )
    selection = pd.read_csv(out / "training_map_selection.csv")
    assert set(selection["n_states"]) == {3} and list(selection["restart"]) == [5329, 2332]
    assert set(selection["criterion"]) == {"fixed"}
    assert set(pd.read_csv(out / "training_maps.csv")["step"]) == {s for s in POLYPYTHIAS_EVAL_STEPS if s % 1000 == 0}
    assert (out / "analysis_map_selection_410m.png").is_file() and (out / "analysis_training_map_410m.png").is_file()
    report = (out / "report.md").read_text()
    assert "The number of states was fixed (`--states`): 410m: 3 states" in report
    assert "0.3 of the checkpoint rows held out (split seed 7)" in report
    assert "analysis_map_selection_410m.png" in report
    assert (
        main(
            [
                str(path),
                "--out",
                str(tmp_path / "aic"),
                "--max-states",
                "3",
                "--restarts",
                "1",
                "--map-criterion",
                "aic",
                "--no-plots",
                "--no-mlflow-log",
            ]
        )
        == 0
    )
    assert "lowest AIC on the held-out rows (`--map-criterion aic`)" in (tmp_path / "aic" / "report.md").read_text()


def test_maps_do_not_depend_on_worker_processes():
    """The fits of several sizes in two worker processes give the maps of fitting them here, restart by restart."""
    study = pd.concat([planted_study(n_seeds=5), planted_study(n_seeds=4, model="70m", random_state=1)])
    here = fit_training_maps(study, max_states=4, restarts=2, heldout_fraction=0.5, n_jobs=1)
    workers = fit_training_maps(study, max_states=4, restarts=2, heldout_fraction=0.5, n_jobs=2)
    pd.testing.assert_frame_equal(here.selection, workers.selection)
    pd.testing.assert_frame_equal(here.paths, workers.paths)
    assert set(here.paths["model"]) == {"70m", "410m"}


def test_synthetic_studies_log_the_statistics_of_the_weight_table():
    """analysis/synthetic.py names the weights/* features without importing torch: they must be the rows
    of WEIGHT_STATISTICS, in order."""
    from analysis.synthetic import WEIGHT_FEATURES
    from polypythia.evaluate.weight_stats import WEIGHT_STATISTICS

    assert WEIGHT_FEATURES == tuple(f"weights/{statistic.name}" for statistic in WEIGHT_STATISTICS)
