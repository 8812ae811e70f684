"""``python -m analysis power``: seeds per arm against published power tables, the other figures against
scipy's own simulations of the tests they stand for, and the seed SD taken from a study."""

import csv
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.__main__ import main
from analysis.power import (
    Design,
    outlier_distance_sd,
    power_at,
    sd_interval,
    seed_spread,
    seeds_per_arm,
    simulated_power,
)


@pytest.mark.parametrize(
    "effect, seeds",
    [
        # Cohen 1988, Statistical Power Analysis, Table 2.4.1: n per group, two-tailed alpha .05, power .80.
        (0.5, 64),
        (0.8, 26),
        (1.0, 17),
        # Larger effects, as the issue quotes them (the same noncentral t).
        (1.5, 9),
        (2.0, 6),
    ],
)
def test_seeds_per_arm_agrees_with_published_power_tables(effect, seeds):
    assert seeds_per_arm(Design(effect)) == seeds


def test_paired_and_one_sided_designs():
    # Paired t-test, d_z = 0.5, alpha .05 two-sided, power .80: 34 pairs (G*Power's exact noncentral t).
    assert seeds_per_arm(Design(0.5, paired=True)) == 34
    one_sided, two_sided, more_power = (
        seeds_per_arm(d) for d in (Design(1.0, one_sided=True), Design(1.0), Design(1.0, power=0.9))
    )
    assert one_sided < two_sided < more_power
    for design in (Design(1.0), Design(0.7, paired=True), Design(1.3, alpha=0.01, power=0.9, one_sided=True)):
        n = seeds_per_arm(design)  # the smallest n that reaches the power
        assert power_at(n, design) >= design.power > power_at(n - 1, design)


@pytest.mark.parametrize(
    "design, n",
    [
        (Design(1.0), 17),
        (Design(0.5, paired=True), 34),
        (Design(0.8, one_sided=True), 12),
        (Design(1.5, alpha=0.01), 9),
    ],
)
def test_analytic_power_agrees_with_scipys_simulation_of_the_test(design, n):
    studies = 20_000
    simulated = simulated_power(n, design, studies=studies, seed=3)
    assert simulated == pytest.approx(float(power_at(n, design)), abs=4 * np.sqrt(0.25 / studies))


def test_sd_interval_values_and_coverage():
    low, high = sd_interval(10)
    assert (round(float(low), 2), round(float(high), 2)) == (0.69, 1.83)
    low, high = sd_interval(3)
    assert (round(float(low), 2), round(float(high), 1)) == (0.52, 6.3)
    # The share of studies of 5 seeds whose interval around their measured SD holds the true SD (2.0).
    rng = np.random.default_rng(0)
    measured = rng.normal(10.0, 2.0, size=(40_000, 5)).std(axis=1, ddof=1)
    low, high = sd_interval(5, level=0.9)
    covered = np.mean((measured * low <= 2.0) & (2.0 <= measured * high))
    assert covered == pytest.approx(0.9, abs=0.006)


def test_outlier_distance_is_the_prediction_interval():
    assert float(outlier_distance_sd(10)) == pytest.approx(2.373, abs=1e-3)
    rng = np.random.default_rng(1)
    seeds = rng.normal(0.0, 1.0, size=(40_000, 11))  # 10 reference seeds and a new one, all healthy
    reference, new = seeds[:, :10], seeds[:, 10]
    k = float(outlier_distance_sd(10, level=0.95))
    beyond = np.abs(new - reference.mean(axis=1)) > k * reference.std(axis=1, ddof=1)
    assert beyond.mean() == pytest.approx(0.05, abs=0.004)  # a healthy seed is called an outlier 5% of the time
    # "Beyond 2 SD" of 10 reference seeds instead calls about 9% of healthy seeds outliers (docs/power.md).
    two_sd = np.abs(new - reference.mean(axis=1)) > 2 * reference.std(axis=1, ddof=1)
    assert two_sd.mean() == pytest.approx(0.089, abs=0.005)


def run(argv, capsys):
    code = main(["power", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_command_prints_the_table_and_ends_with_seeds_per_arm(tmp_path, capsys):
    code, out, err = run(["--effect", 1, "--simulations", 2000, "--out", tmp_path / "power"], capsys)
    assert code == 0 and not err
    lines = out.splitlines()
    assert lines[-1] == "seeds per arm: 17"
    assert "17 give power 0.807 (noncentral t); 16 give 0.781." in out and "Simulated with scipy.stats.power" in out
    assert any(line.split()[:2] == ["17", "0.807"] and line.endswith("<- seeds per arm") for line in lines)
    rows = list(csv.DictReader((tmp_path / "power" / "power.csv").open()))
    assert [int(r["seeds"]) for r in rows] == list(range(2, 31))
    assert [float(r["power"]) for r in rows] == pytest.approx(power_at(np.arange(2, 31), Design(1.0)))
    assert (tmp_path / "power" / "power_curve.png").stat().st_size > 10_000


def write_study(path, sds=None):
    """Ten seeds of two models at two steps, arc_easy/acc; returns the table."""
    rng = np.random.default_rng(7)
    rows = [
        (model, seed, step, "arc_easy/acc", 0.4 + step / 1e6 + rng.normal(0, sd))
        for model, sd in (sds or {"70m": 0.01, "160m": 0.02}).items()
        for seed in range(10)
        for step in (1000, 143000)
    ]
    table = pd.DataFrame(rows, columns=["model", "seed", "step", "metric", "value"])
    table.to_csv(path, index=False)
    return table


def test_the_seed_sd_from_a_study_and_an_effect_in_its_units(tmp_path, capsys):
    table = write_study(tmp_path / "study.csv")
    final = table[(table.model == "70m") & (table.step == 143000)]["value"]
    sd = final.std(ddof=1)
    code, out, _ = run(
        [
            "--from",
            tmp_path / "study.csv",
            "--metric",
            "arc_easy/acc",
            "--model",
            "70m",
            "--delta",
            0.01,
            "--simulations",
            0,
        ],
        capsys,
    )
    assert code == 0
    assert f"model 70m, step 143000: {sd:.4g} (mean {final.mean():.4g}) over 10 runs: 0, 1, 2" in out
    assert f"delta 0.01 = {0.01 / sd:.3g} seed SDs" in out
    assert out.splitlines()[-1] == f"seeds per arm: {seeds_per_arm(Design(0.01 / sd))}"
    k = stats.t.ppf(0.975, 9) * np.sqrt(1.1)
    assert f"outside {final.mean() - k * sd:.4g} to {final.mean() + k * sd:.4g}" in out
    # --step takes another step's spread.
    spread = seed_spread(__import__("analysis").load_study(tmp_path / "study.csv"), "arc_easy/acc", "160m", 1000)
    assert spread.sd == pytest.approx(table[(table.model == "160m") & (table.step == 1000)]["value"].std(ddof=1))


def test_the_seed_sd_of_pythias_original_and_polypythias_seeds_together(tmp_path, capsys):
    """lm-eval 0.3 (the suite's seed 0) and 0.4 (PolyPythias' seeds 1-3) files give one spread."""
    root, accuracies = tmp_path / "evals", {0: 0.43, 1: 0.45, 2: 0.44, 3: 0.47}
    zero = root / "pythia-160m" / "zero-shot" / "160m_step143000.json"
    zero.parent.mkdir(parents=True)
    zero.write_text(
        json.dumps(
            {
                "results": {"arc_easy": {"acc": accuracies[0], "acc_stderr": 0.01}},
                "versions": {},
                "config": {
                    "model_args": "pretrained=EleutherAI/pythia-v1.1-160m,revision=step143000",
                    "num_fewshot": 0,
                },
            }
        )
    )
    for seed in (1, 2, 3):
        folder = root / f"pythia-160m-seed{seed}" / "step143000" / f"EleutherAI__pythia-160m-seed{seed}"
        folder.mkdir(parents=True)
        (folder / "results_2024-09-01T10-00-00.json").write_text(
            json.dumps(
                {
                    "results": {"arc_easy": {"acc,none": accuracies[seed]}},
                    "config": {"model_args": f"pretrained=EleutherAI/pythia-160m-seed{seed},revision=step143000"},
                }
            )
        )
    code, out, _ = run(["--from", root, "--metric", "arc_easy/acc", "--effect", 1, "--simulations", 0], capsys)
    sd = np.std(list(accuracies.values()), ddof=1)
    assert code == 0 and f"model 160m, step 143000: {sd:.4g}" in out and "over 4 runs: 0, 1, 2, 3;" in out


def one_error(argv, capsys, fragment):
    code, out, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


def test_bad_input_is_one_line_each(tmp_path, capsys):
    study = tmp_path / "study.csv"
    write_study(study)
    one_error(["--effect", 0], capsys, "The effect must be a positive number of seed SDs (Cohen's d), not 0")
    one_error(["--effect", -1], capsys, "not -1")
    one_error(["--effect", "nan"], capsys, "not nan")
    one_error([], capsys, "Give the difference to detect")
    one_error(["--effect", 1, "--delta", 0.1], capsys, "not both")
    one_error(["--delta", 0.1], capsys, "--delta is in the metric's units and needs the seed SD")
    one_error(["--effect", 1, "--alpha", 0], capsys, "--alpha must lie between 0 and 1")
    one_error(["--effect", 1, "--power", 0.01], capsys, "--power must lie between --alpha (0.05) and 1")
    one_error(["--effect", 0.001], capsys, "needs more than 100,000 seeds per arm")
    one_error(
        ["--from", study, "--metric", "arc_easy/ac", "--effect", 1, "--model", "70m"],
        capsys,
        "has no metric 'arc_easy/ac' (close: arc_easy/acc)",
    )
    one_error(
        ["--from", study, "--metric", "arc_easy/acc", "--effect", 1],
        capsys,
        "for the models 70m, 160m; choose one with --model",
    )
    one_error(
        ["--from", study, "--metric", "arc_easy/acc", "--delta", 0.01, "--paired", "--model", "70m"],
        capsys,
        "--delta with --paired needs the SD of the per-seed differences",
    )
    one_error(
        ["--from", study, "--metric", "arc_easy/acc", "--effect", 1, "--model", "70m", "--step", 5],
        capsys,
        "Model 70m has no arc_easy/acc at step 5; its steps run from 1000 to 143000",
    )
    single = tmp_path / "single.csv"
    pd.DataFrame({"model": "70m", "seed": [0, 0], "step": [0, 1], "metric": "loss", "value": [3.0, 2.0]}).to_csv(
        single, index=False
    )
    one_error(
        ["--from", single, "--metric", "loss", "--effect", 1],
        capsys,
        "for only 1 seed; the seed SD needs at least 2 seeds",
    )


def test_a_study_named_power_is_still_reachable(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "power").mkdir()  # a folder named power: the subcommand's error says how to reach it
    one_error([], capsys, "write python -m analysis ./power")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(["--", "power"])  # an MLflow experiment named power: read as a study, not the subcommand
    err = capsys.readouterr().err
    assert code == 2 and "Give the difference" not in err and "'power'" in err
