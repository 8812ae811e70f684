"""The learning-rate search's decision (benchmarks/bench_lr_search.py) on synthetic curves, and the laptop
study's configs compose and validate."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from analysis.tidy_table import Study, runs_from_metrics, tidy
from polypythia.config.jobconfig import job_config, model_preset

REPO = Path(__file__).resolve().parent.parent
CONF = str(REPO / "conf")
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_lr_search import cell_summary, parse_seeds, parse_variant, unstable_runs  # noqa: E402

STEPS = 500
CHECKPOINTS = np.r_[0, 1, 2, 4, 8, 16, 32, 64, 128, 256, np.arange(20, STEPS + 1, 20)]


def curves(
    seed: int, rng: np.random.Generator, spike_at: int | None = None, jump_at: int | None = None
) -> pd.DataFrame:
    """A healthy run's train/loss (every step) and valid/loss (every checkpoint), optionally with a
    one-step train-loss spike or a lasting jump of both losses."""
    steps = np.arange(1, STEPS + 1)
    train = 3.0 + 4.0 * np.exp(-steps / 80) + rng.normal(0, 0.05, len(steps))
    checkpoints = np.unique(CHECKPOINTS)
    valid = (
        3.0 + 4.0 * np.exp(-checkpoints / 80) + 0.02 * rng.standard_normal() + rng.normal(0, 0.005, len(checkpoints))
    )
    if spike_at is not None:
        train[spike_at - 1] += 3.0
    if jump_at is not None:
        train[steps >= jump_at] += 1.5
        valid[checkpoints >= jump_at] += 1.5
    frames = [
        pd.DataFrame({"step": steps, "metric": "train/loss", "value": train}),
        pd.DataFrame({"step": checkpoints, "metric": "valid/loss", "value": valid}),
    ]
    return pd.concat(frames).assign(model="14m-hot", seed=str(seed))


def synthetic_cell(n_healthy: int = 6, diverged: bool = True) -> Study:
    """Seeds 1..n healthy; seed 11 with a loss spike at 300, seed 12 with a lasting jump at 300, seed
    13 (when ``diverged``) whose run ended in a non-finite loss at step 250."""
    rng = np.random.default_rng(0)
    frames = [curves(s, rng) for s in range(1, n_healthy + 1)]
    frames += [curves(11, rng, spike_at=300), curves(12, rng, jump_at=300)]
    gone = set()
    if diverged:
        run = curves(13, rng)
        run = run[run["step"] < 250]
        nan = pd.DataFrame(
            {"step": [250], "metric": ["train/loss"], "value": [np.nan], "model": ["14m-hot"], "seed": ["13"]}
        )
        frames.append(pd.concat([run, nan]))
        gone.add(("14m-hot", "13"))
    metrics = tidy(pd.concat(frames, ignore_index=True))
    return Study(metrics=metrics, runs=runs_from_metrics(metrics, gone))


def test_the_decision_flags_spikes_jumps_and_divergence_and_no_healthy_seed():
    reasons = unstable_runs(synthetic_cell())
    assert {seed for seed, why in reasons.items() if why} == {"11", "12", "13"}
    assert any(r.startswith("loss spike at 300") for r in reasons["11"])
    assert any(r.startswith("outlier valid/loss calibrated at 300") for r in reasons["12"])
    assert reasons["13"][0] == "diverged"


def test_a_cell_of_healthy_seeds_is_stable():
    rng = np.random.default_rng(1)
    metrics = tidy(pd.concat([curves(s, rng) for s in range(1, 10)], ignore_index=True))
    reasons = unstable_runs(Study(metrics=metrics, runs=runs_from_metrics(metrics)))
    assert len(reasons) == 9 and not any(reasons.values())


def test_seed_and_variant_arguments():
    assert parse_seeds("1-3,7") == [1, 2, 3, 7]
    assert parse_variant("noclip: train.gradient_clipping=0 budget.warmup_fraction=0") == (
        "noclip",
        ("train.gradient_clipping=0", "budget.warmup_fraction=0"),
    )
    with pytest.raises(ValueError):
        parse_variant("no clip: x=1")


def test_a_cell_sums_up_fresh_rows_and_rows_read_back_from_its_csv():
    fresh = [
        {"unstable": True, "final_train_loss": 5.0, "train_loss_max": 30.0, "attn_logit_max": 1e5},
        {"unstable": False, "final_train_loss": 4.0, "train_loss_max": 8.0, "attn_logit_max": float("nan")},
    ]
    read_back = [{k: str(v) for k, v in row.items()} for row in fresh]
    for rows in (fresh, read_back):
        assert cell_summary(rows) == {"n": 2, "unstable": 1, "final": 4.5, "peak": 19.0, "attn": 1e5}


def compose_config(*overrides, hydra=False):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def test_the_laptop_model_and_budget_validate(tmp_path):
    cfg = job_config(compose_config("model=14m-hot", "budget=laptop"), str(tmp_path))
    assert cfg.model == model_preset("14m-hot") and cfg.budget.name == "laptop"
    shape = model_preset("14m")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads) == (
        shape.num_layers,
        shape.hidden_size,
        shape.num_heads,
    )


def test_the_laptop_experiment_sweeps_two_arms_of_nine_seeds_at_one_learning_rate(tmp_path):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_config("experiment=laptop", hydra=True)
    overrides = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), max_batch_size=None)[0]
    assert sorted(tuple(sorted(j)) for j in jobs) == sorted(
        (f"model={m}", f"seed={s}") for m in ("14m-hot", "14m-hot-qknorm") for s in range(1, 10)
    )
    for model in ("14m-hot", "14m-hot-qknorm"):
        checked = job_config(compose_config("experiment=laptop", f"model={model}", "seed=3"), str(tmp_path))
        assert checked.study == "laptop" and checked.budget.name == "laptop" and checked.model.name == model
        assert checked.model.lr == cfg.model.lr and checked.data.vocab_size == cfg.data.vocab_size
        assert checked.model.qk_layernorm == (model == "14m-hot-qknorm")
